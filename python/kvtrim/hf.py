"""kvtrim as the KV cache of a Hugging Face transformers model (transformers 5.x, Llama-family attention).

    import kvtrim.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvtrim")  # or kvtrim.hf.enable(model)
    cache = kvtrim.hf.KVTrimCache(model, "h2o", budget=64)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=200, do_sample=False)

How it hooks in, with two public transformers interfaces and nothing patched:
  * ``KVTrimCache`` is a ``transformers.Cache`` whose layers keep nothing in torch: ``update()`` hands the new,
    already rotated keys and values of a layer to the attention function, unchanged;
  * ``"kvtrim"`` is registered in ``AttentionInterface``: for a layer whose keys came from a KVTrimCache it
    runs kvtrim's ``prefill`` / ``decode`` (attention over the kept tokens, the policy's eviction, with the
    probabilities that score-based policies need computed by kvtrim itself) and returns the output. For any
    other call (no cache, a DynamicCache) it falls back to SDPA, so the setting is safe to leave on.

Scope: batch size 1 (one kvtrim cache serves one sequence; kvtrim.Batch serves many, but this adapter does not
use it yet), no padding, inference only (nothing is differentiable), float32 attention (other model dtypes are
converted around the call).
A forward of T > 1 tokens into an empty cache is a prompt (``prefill``: the policy compresses it) unless the
cache was made with ``prompt="stream"``; T > 1 tokens into a non-empty cache are decoded one by one
(``decode_rows``), which equals feeding them one per forward.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from . import Cache as _KvCache
from . import EigenBasis, Error

_major = int(transformers.__version__.split(".")[0])
if _major != 5:
    raise ImportError(f"kvtrim.hf supports transformers 5.x; found transformers {transformers.__version__}")

ATTN_IMPLEMENTATION = "kvtrim"

# update() of layer l hands (cache, layer, key, value) to the attention call that follows it in the same
# thread; the attention function checks it got the very tensors update() returned.
_handoff = threading.local()


class KVTrimLayer(CacheLayerMixin):
    """One layer's view of the kvtrim cache (for transformers' bookkeeping; the state lives in C++)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "KVTrimCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states=None) -> None:  # nothing to allocate in torch
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._stage(self.layer_idx, key_states, value_states)

    def get_seq_length(self, *args) -> int:
        return int(self.owner.kv.next_position(self.layer_idx))

    def get_mask_sizes(self, query_length_or_position, *args) -> tuple[int, int]:
        q = query_length_or_position
        q_len = int(q.shape[0]) if isinstance(q, torch.Tensor) else int(q)
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # older 5.x name
        return -1

    def reset(self) -> None:
        pass  # the owner resets the C++ cache once for all layers

    def reorder_cache(self, beam_idx) -> None:
        if beam_idx.numel() != 1 or int(beam_idx.reshape(-1)[0]) != 0:
            raise Error("kvtrim: KVTrimCache serves one sequence; beam search is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise Error("kvtrim: a KVTrimCache cannot be cropped (evicted tokens are gone; use a new cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise Error("kvtrim: KVTrimCache serves one sequence (batch size 1)")

    def batch_select_indices(self, indices) -> None:
        if indices.numel() != 1:
            raise Error("kvtrim: KVTrimCache serves one sequence (batch size 1)")


class KVTrimCache(Cache):
    """A transformers Cache whose attention and eviction are kvtrim's registered policy ``policy``.

    ``model``: the model (or its config) the cache serves: layers, heads and head size come from it.
    ``budget`` / ``head_budgets`` (``[n_layers][n_kv_heads]``) / ``params`` / ``basis``: as ``kvtrim.Cache``.
    ``prompt``: ``"compress"`` (default) prefills a multi-token first forward in one pass, letting the policy
    compress it; ``"stream"`` decodes it token by token (every token goes through eviction).
    ``tap(layer, q, k, v)``: sees each layer's rotated queries ``[T, n_q_heads, head_dim]``, keys and values
    ``[T, n_kv_heads, head_dim]`` (float32) before kvtrim does, e.g. to calibrate an EigenBasis.
    """

    def __init__(self, model: Any, policy: str, *, budget: int = 0,
                 head_budgets: Sequence[Sequence[int]] | None = None, params: Mapping[str, Any] | None = None,
                 basis: EigenBasis | None = None, prompt: str = "compress", threads: int = 1,
                 check_finite: bool | None = None, device: Any = "cpu", storage: str = "float32",
                 tap: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None):
        config = getattr(model, "config", model)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.config = config
        n_layers = config.num_hidden_layers
        n_q = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_q
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
        if prompt not in ("compress", "stream"):
            raise Error(f"kvtrim: KVTrimCache: prompt={prompt!r}; expected 'compress' or 'stream'")
        self.prompt = prompt
        self.tap = tap
        self.kv = _KvCache(policy, n_layers=n_layers, n_kv_heads=n_kv, n_q_heads=n_q, head_dim=head_dim,
                           budget=budget, head_budgets=head_budgets, params=params, basis=basis, threads=threads,
                           check_finite=check_finite, device=device, storage=storage)
        self.scaling = head_dim ** -0.5
        super().__init__(layers=[KVTrimLayer(self, i) for i in range(n_layers)])

    # ---- what transformers asks -------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0, *args) -> int:
        """Tokens seen (the next position), not tokens kept: generate() numbers positions from it."""
        return int(self.kv.next_position(layer_idx if 0 <= layer_idx < self.kv.n_layers else 0))

    def reset(self):
        self.kv.reset()

    # ---- kvtrim introspection ------------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return self.kv.bytes_used

    @property
    def evictions(self) -> int:
        return self.kv.evictions

    def positions(self, layer: int, kv_head: int):
        return self.kv.positions(layer, kv_head)

    def __repr__(self) -> str:
        return f"KVTrimCache({self.kv!r})"

    # ---- the handoff ---------------------------------------------------------------------------------------
    def _stage(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise Error(f"kvtrim: KVTrimCache needs the model's attention implementation to be "
                        f"'{ATTN_IMPLEMENTATION}' (it is {impl!r}): load the model with "
                        f"attn_implementation='{ATTN_IMPLEMENTATION}' or call kvtrim.hf.enable(model)")
        if key_states.shape[0] != 1:
            raise Error(f"kvtrim: KVTrimCache serves one sequence; got a batch of {key_states.shape[0]}")
        _handoff.pending = (self, layer_idx, key_states, value_states)
        return key_states, value_states


def _first_position(kwargs: dict, T: int, cache: KVTrimCache, layer: int) -> int:
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = kwargs.get("cache_position")  # older 5.x
    if pos is None:
        return int(cache.kv.next_position(layer))
    p = pos.reshape(-1)
    first = int(p[0])
    if p.numel() != T or (T > 1 and not torch.equal(p.cpu(), torch.arange(first, first + T))):
        raise Error("kvtrim: positions of one forward must be consecutive (one sequence, no padding)")
    return first


def kvtrim_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs):
    """The ``"kvtrim"`` attention function: kvtrim's attention for layers fed by a KVTrimCache, SDPA otherwise."""
    pending = getattr(_handoff, "pending", None)
    if pending is None:  # no KVTrimCache behind this call: plain SDPA
        fallback = AttentionInterface._global_mapping["sdpa"]
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _handoff.pending = None
    if pending[2] is not key or pending[3] is not value:
        raise Error("kvtrim: this model's attention does not use the keys and values its cache returned "
                    f"({type(module).__name__}); kvtrim.hf supports Llama-family attention")
    cache, layer = pending[0], pending[1]
    if dropout:
        raise Error("kvtrim: attention dropout is not supported (kvtrim serves inference)")
    if scaling is not None and abs(scaling - cache.scaling) > 1e-6 * cache.scaling:
        raise Error(f"kvtrim: the model scales attention by {scaling}; kvtrim uses 1/sqrt(head_dim) = "
                    f"{cache.scaling}")
    dtype = query.dtype
    # [1, heads, T, D] -> [T, heads, D]; for one token this is a view of the model's own tensor (no copy).
    q = query.detach()[0].transpose(0, 1)
    k = key.detach()[0].transpose(0, 1)
    v = value.detach()[0].transpose(0, 1)
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    T = q.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if cache.tap is not None:
        cache.tap(layer, q, k, v)
    kv = cache.kv
    kv._follow_stream(q)
    first = _first_position(kwargs, T, cache, layer)
    if not q.is_cuda:  # NumPy views of the same memory cross the binding ~4x faster than torch's __dlpack__
        q, k, v = q.numpy(), k.numpy(), v.numpy()
        out_np = out.numpy()
    else:
        out_np = out
    if T == 1:
        kv.decode_into(layer, q[0], k[0], v[0], out_np[0], first)
    elif kv.next_position(layer) == 0 and first == 0 and cache.prompt == "compress":
        kv.prefill_into(layer, q, k, v, out_np)
    else:
        kv.decode_rows_into(layer, q, k, v, out_np, first)
    out = out.unsqueeze(0)
    return (out if dtype == torch.float32 else out.to(dtype)), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvtrim_attention)


def enable(model: Any) -> Any:
    """Switches a loaded model's attention to ``"kvtrim"`` (SDPA still serves calls without a KVTrimCache)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    return model


def cache_argument(model: Any) -> str:
    """The keyword this transformers version takes the cache under: ``cache`` (5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
