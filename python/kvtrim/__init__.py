"""kvtrim: KV-cache eviction and compression policies, from Python, over the same C++ code.

    import numpy as np, kvtrim
    cache = kvtrim.Cache("h2o", n_layers=2, n_kv_heads=4, n_q_heads=8, head_dim=64, budget=128,
                         params={"heavy_ratio": 0.25})
    out = cache.decode(0, q, k, v)          # q [8, 64], k/v [4, 64] float32: NumPy or torch, no copies

Every policy in the C++ registry is available by name (``kvtrim.policies()``) with its parameters by name
(``kvtrim.policy_params(name)``); nothing here is written per policy. ``kvtrim.hf`` runs Hugging Face
transformers models with a kvtrim cache; ``kvtrim.llama2c`` converts llama2.c checkpoints to Hugging Face.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from . import _kvtrim
from ._kvtrim import EigenBasis, Error, has_cuda  # noqa: F401  (re-exported)

__all__ = ["Cache", "Batch", "EigenBasis", "EigenCalibrator", "Error", "policies", "policy_params", "needs_basis", "never_evicts", "has_cuda"]
__version__ = "0.1.0"


def policies() -> list[str]:
    """The registered policy names, in registry order (include/kvtrim/registry.hpp)."""
    return _kvtrim.policies()


def policy_params(name: str) -> dict[str, str]:
    """A policy's parameters and their defaults (as text, the form ``Cache(params=...)`` also accepts)."""
    return dict(_kvtrim.policy_params(name))


def needs_basis(name: str) -> bool:
    """Whether the policy stores low-rank keys and needs ``basis=`` (an EigenBasis)."""
    return _kvtrim.needs_basis(name)


def never_evicts(name: str) -> bool:
    """Whether the policy never evicts while decoding (FullCache-like: the budget must hold every token)."""
    return _kvtrim.never_evicts(name)


def _param_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(_param_text(key, v) for v in value)
    if hasattr(value, "__index__"):  # int, numpy integers
        return str(int(value))
    if hasattr(value, "__float__"):  # float, numpy floats: shortest text that reads back the same
        return repr(float(value))
    raise Error(f"kvtrim: parameter {key}: value {value!r} of type {type(value).__name__}; expected a number, "
                "a bool, a string or a list of integers")


def _device_of(device: Any) -> tuple[str, int]:
    text = str(device)  # also torch.device
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return "cpu", -1
    if kind == "cuda":
        if index:
            return "cuda", int(index)
        try:
            import torch

            return "cuda", torch.cuda.current_device()
        except Exception:  # torch absent or no device: CUDA device 0
            return "cuda", 0
    raise Error(f"kvtrim: Cache: device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _empty_like(x: Any):
    """A new float32 array with x's shape, from x's library (torch or NumPy) and on x's device."""
    if _is_torch(x):
        import torch

        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    import numpy as np

    return np.empty(getattr(x, "shape", ()), dtype=np.float32)


class Cache(_kvtrim.Cache):
    """One sequence's KV cache for every layer, with the registered policy ``policy``.

    Shapes: ``prefill(layer, Q, K, V)`` takes the prompt, Q ``[T, n_q_heads, head_dim]`` (or
    ``[T, n_q_heads*head_dim]``), K and V ``[T, n_kv_heads, head_dim]``; ``decode(layer, q, k, v)`` one token,
    q ``[n_q_heads, head_dim]``, k and v ``[n_kv_heads, head_dim]``. Keys arrive already rotated (RoPE).
    Arrays are float32, C-contiguous NumPy arrays or torch tensors (CPU; CUDA with ``device="cuda"``), used in
    place. Each call returns ``out`` (allocated like q when not given). ``*_into`` methods take ``out`` and
    return nothing: the lowest-overhead path.

    Budgets: ``budget`` tokens per (layer, KV head), or ``head_budgets`` of shape ``[n_layers, n_kv_heads]``
    (or flat, layer-major): memory follows them. ``params``: the policy's parameters by name
    (``kvtrim.policy_params(policy)``), e.g. ``{"heavy_ratio": 0.25, "decode.sinks": 4}``.

    ``storage``: how keys and values are kept, ``"float32"``, ``"float16"`` or ``"bfloat16"`` (on the CPU and
    on CUDA); 16-bit storage halves the cache's memory. Inputs and outputs stay float32 and attention
    accumulates in float32.
    """

    def __init__(self, policy: str, *, n_layers: int, n_kv_heads: int, n_q_heads: int, head_dim: int,
                 budget: int = 0, head_budgets: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 params: Mapping[str, Any] | None = None, basis: EigenBasis | None = None, threads: int = 1,
                 check_finite: bool | None = None, device: Any = "cpu", storage: str = "float32"):
        kind, index = _device_of(device)
        flat = _flat_budgets(head_budgets)
        items = [(str(k), _param_text(str(k), v)) for k, v in (params or {}).items()]
        if check_finite is None:
            check_finite = kind == "cpu"  # on a GPU the check would read device memory on the host
        super().__init__(policy, n_layers, n_kv_heads, n_q_heads, head_dim, budget, flat, items, basis, threads,
                         bool(check_finite), kind, index, storage)
        self._stream = None

    # ---- calls ----------------------------------------------------------------------------------------------
    def prefill(self, layer: int, Q, K, V, out=None):
        """Prompt of T tokens for one layer; returns causal attention for every prompt token (like Q)."""
        if out is None:
            out = _empty_like(Q)
        self._follow_stream(Q)
        self.prefill_into(layer, Q, K, V, out)
        return out

    def decode(self, layer: int, q, k, v, out=None, position: int = -1):
        """One new token for one layer (at ``position``, default the next); returns attention (like q)."""
        if out is None:
            out = _empty_like(q)
        self._follow_stream(q)
        self.decode_into(layer, q, k, v, out, position)
        return out

    def decode_rows(self, layer: int, Q, K, V, out=None, position: int = -1):
        """T new tokens of one layer, each decoded in order (as T ``decode`` calls, at ``position``, ``position``
        + 1, ... or the next positions); returns their outputs. A rejected row leaves the rows before it applied."""
        if out is None:
            out = _empty_like(Q)
        self._follow_stream(Q)
        self.decode_rows_into(layer, Q, K, V, out, position)
        return out

    def append(self, layer: int, Q, K, V, out=None):
        """A chunk of T tokens after what the layer holds (chunked prefill, a new turn, accepted drafts): token t
        attends to the kept tokens plus chunk tokens 0..t, every token gets the decode bookkeeping, and the policy
        evicts once, after the chunk (C++ ``KVCache::append``). Returns the outputs (like Q)."""
        if out is None:
            out = _empty_like(Q)
        self._follow_stream(Q)
        self.append_into(layer, Q, K, V, out)
        return out

    def verify(self, layer: int, Q, K, V, out=None):
        """Speculative drafts: the outputs ``append`` would return for these T tokens; the cache does not change.
        Accept n drafts by ``append``-ing their rows (C++ ``KVCache::verify``)."""
        if out is None:
            out = _empty_like(Q)
        self._follow_stream(Q)
        self.verify_into(layer, Q, K, V, out)
        return out

    def _follow_stream(self, x) -> None:
        # CUDA tensors: run on torch's current stream of their device (as torch's own ops would).
        if self.on_device and _is_torch(x) and x.is_cuda:
            import torch

            stream = torch.cuda.current_stream(x.device).cuda_stream
            if stream != self._stream:
                self._set_stream(stream)
                self._stream = stream

    # ---- introspection --------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, str]:
        """The policy's parameters in effect (registry defaults and overrides), as text."""
        return dict(self._params)

    def budgets(self) -> list[list[int]]:
        """Budget of every (layer, KV head): ``[n_layers][n_kv_heads]``."""
        return [[self.budget(l, h) for h in range(self.n_kv_heads)] for l in range(self.n_layers)]

    def sizes(self) -> list[list[int]]:
        """Tokens kept by every (layer, KV head): ``[n_layers][n_kv_heads]``."""
        return [[self.size(l, h) for h in range(self.n_kv_heads)] for l in range(self.n_layers)]

    def __repr__(self) -> str:
        if not hasattr(self, "_stream"):  # construction failed
            return "kvtrim.Cache(<not constructed>)"
        return (f"kvtrim.Cache({self.policy!r}, n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, "
                f"n_q_heads={self.n_q_heads}, head_dim={self.head_dim}, bytes_used={self.bytes_used}, "
                f"evictions={self.evictions})")


def _flat_budgets(head_budgets) -> list[int]:
    flat: list[int] = []
    if head_budgets is not None:
        for row in head_budgets:
            if isinstance(row, (list, tuple)) or (hasattr(row, "__len__") and not isinstance(row, str)):
                flat.extend(int(b) for b in row)
            else:
                flat.append(int(row))
    return flat


class Batch(_kvtrim.Batch):
    """The sequences of an engine's batch, decoded together on the CPU (C++ ``KVBatch``, include/kvtrim/batch.hpp).

    Each sequence has its own cache (budgets, positions, policy state) behind an id from ``add()``; sequences
    join and leave between steps (continuous batching). ``decode(layer, ids, Q, K, V)`` runs one token of each
    listed sequence: row r of Q ``[B, n_q_heads, head_dim]``, K and V ``[B, n_kv_heads, head_dim]`` belongs to
    ``ids[r]``, and the (sequence, KV head) pairs run on ``threads`` threads; the results equal decoding each
    sequence through its own ``Cache``. Prompts, chunks and drafts go to one sequence: ``prefill(id, layer, Q,
    K, V)``, ``append``, ``verify``. Arguments as for ``Cache`` (float32, C-contiguous, CPU memory).
    """

    def __init__(self, policy: str, *, n_layers: int, n_kv_heads: int, n_q_heads: int, head_dim: int,
                 budget: int = 0, head_budgets: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 params: Mapping[str, Any] | None = None, basis: EigenBasis | None = None, threads: int = 1,
                 check_finite: bool = True, storage: str = "float32"):
        items = [(str(k), _param_text(str(k), v)) for k, v in (params or {}).items()]
        super().__init__(policy, n_layers, n_kv_heads, n_q_heads, head_dim, budget, _flat_budgets(head_budgets),
                         items, basis, threads, bool(check_finite), storage)

    def add(self, budget: int = 0, head_budgets=None) -> int:
        """A new sequence (the batch's budgets, or its own); returns its id."""
        return self._add(budget, _flat_budgets(head_budgets))

    def decode(self, layer: int, ids: Sequence[int], Q, K, V, out=None, positions: Sequence[int] | None = None):
        """One token of each sequence in ``ids`` (each sequence's next position, or ``positions[r]``); returns
        the attention outputs, like Q."""
        if out is None:
            out = _empty_like(Q)
        self.decode_into(layer, [int(i) for i in ids], Q, K, V, out, [int(p) for p in (positions or [])])
        return out

    def prefill(self, id: int, layer: int, Q, K, V, out=None):
        """The prompt of sequence ``id`` for one layer (``Cache.prefill``)."""
        if out is None:
            out = _empty_like(Q)
        self.prefill_into(id, layer, Q, K, V, out)
        return out

    def append(self, id: int, layer: int, Q, K, V, out=None):
        """A chunk of T tokens of sequence ``id`` (``Cache.append``)."""
        if out is None:
            out = _empty_like(Q)
        self.append_into(id, layer, Q, K, V, out)
        return out

    def verify(self, id: int, layer: int, Q, K, V, out=None):
        """Draft tokens of sequence ``id``: append's outputs, nothing kept (``Cache.verify``)."""
        if out is None:
            out = _empty_like(Q)
        self.verify_into(id, layer, Q, K, V, out)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"kvtrim.Batch({self.policy!r}, sequences={self.ids})"


class EigenCalibrator(_kvtrim.EigenCalibrator):
    """Collects post-RoPE keys, values and queries per layer; ``basis(energy=...)`` gives an EigenBasis for the
    ``eigen+...`` policies."""

    def __init__(self, *, n_layers: int, n_kv_heads: int, n_q_heads: int, head_dim: int):
        super().__init__(n_layers=n_layers, n_kv_heads=n_kv_heads, n_q_heads=n_q_heads, head_dim=head_dim)
        self._shape = (n_kv_heads, n_q_heads, head_dim)

    def add(self, layer: int, K, V, Q=None) -> None:
        """Rows of one layer: K and V ``[N, n_kv_heads, head_dim]``, Q ``[N, n_q_heads, head_dim]`` or None."""
        self._add(layer, *self._shape, K, V, Q)
