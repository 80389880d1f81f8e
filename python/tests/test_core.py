"""kvtrim.Cache from Python: the registry's policies, attention against naive NumPy attention, zero-copy tensors,
budgets and per-head budgets, parameters by name, errors."""

from __future__ import annotations

import numpy as np
import pytest

import kvtrim

L, H, HQ, D = 2, 2, 4, 16  # layers, KV heads, query heads (GQA group 2), head dim


def rand(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def make(policy="full", budget=64, **kw):
    return kvtrim.Cache(policy, n_layers=L, n_kv_heads=H, n_q_heads=HQ, head_dim=D, budget=budget, **kw)


def naive_attention(q, K, V):
    """q [HQ, D] over keys/values [N, H, D]; query head h reads KV head h // (HQ // H); scale 1/sqrt(D)."""
    g = HQ // H
    out = np.empty((HQ, D), dtype=np.float64)
    for h in range(HQ):
        s = K[:, h // g, :].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(D)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ V[:, h // g, :].astype(np.float64)
    return out


def test_policies_come_from_the_registry():
    names = kvtrim.policies()
    for expected in ["full", "streaming", "h2o", "tova", "l2norm", "hashevict", "snapkv+h2o", "buzz", "buzz-hash",
                     "ems", "eigen+full", "eigen+h2o"]:
        assert expected in names
    assert len(set(names)) == len(names)
    assert kvtrim.needs_basis("eigen+h2o") and not kvtrim.needs_basis("h2o")
    assert kvtrim.never_evicts("full") and not kvtrim.never_evicts("h2o")
    assert kvtrim.policy_params("full") == {}
    assert kvtrim.policy_params("buzz")["window"] == "0"  # the registry entry's defaults over Params{}


def calibrated_basis(rng):
    cal = kvtrim.EigenCalibrator(n_layers=L, n_kv_heads=H, n_q_heads=HQ, head_dim=D)
    for layer in range(L):
        cal.add(layer, rand(rng, 200, H, D), rand(rng, 200, H, D), rand(rng, 200, HQ, D))
    return cal.basis(key_rank=8, value_rank=8)


@pytest.mark.parametrize("policy", kvtrim.policies())
def test_every_registered_policy_prefills_and_decodes(policy):
    rng = np.random.default_rng(1)
    budget = 48
    kw = {"basis": calibrated_basis(rng)} if kvtrim.needs_basis(policy) else {}
    steps = budget - 30 if kvtrim.never_evicts(policy) else 100
    cache = make(policy, budget, **kw)
    for layer in range(L):
        out = cache.prefill(layer, rand(rng, 30, HQ, D), rand(rng, 30, H, D), rand(rng, 30, H, D))
        assert out.shape == (30, HQ, D) and np.isfinite(out).all()
    for _ in range(steps):
        for layer in range(L):
            out = cache.decode(layer, rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D))
            assert np.isfinite(out).all()
    for layer in range(L):
        assert cache.next_position(layer) == 30 + steps
        for h in range(H):
            pos = cache.positions(layer, h)
            assert len(pos) == cache.size(layer, h) <= budget
            assert np.all(np.diff(pos) > 0) and pos[-1] <= 30 + steps - 1
    assert 0 < cache.bytes_used <= cache.bytes_reserved
    assert cache.policy == policy


def test_full_cache_equals_naive_attention():
    rng = np.random.default_rng(2)
    T, steps = 20, 12
    cache = make("full", T + steps)
    Q, K, V = rand(rng, T, HQ, D), rand(rng, T, H, D), rand(rng, T, H, D)
    out = cache.prefill(0, Q, K, V)
    for t in range(T):  # causal: prompt token t sees tokens 0..t
        np.testing.assert_allclose(out[t], naive_attention(Q[t], K[:t + 1], V[:t + 1]), rtol=2e-5, atol=2e-6)
    for _ in range(steps):
        q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
        K, V = np.concatenate([K, k[None]]), np.concatenate([V, v[None]])
        np.testing.assert_allclose(cache.decode(0, q, k, v), naive_attention(q, K, V), rtol=2e-5, atol=2e-6)
    assert cache.evictions == 0 and cache.size(0, 0) == T + steps


@pytest.mark.parametrize("storage, dtype", [("float16", np.float16), ("bfloat16", None)])
def test_16bit_storage_is_attention_over_the_rounded_rows(storage, dtype):
    # keys and values kept in 16 bits: decode equals attention over the rows rounded to nearest even, in half the
    # memory of float32 storage
    def rounded(x):
        if dtype is not None:
            return x.astype(dtype).astype(np.float32)
        bits = x.view(np.uint32).astype(np.uint64)  # bfloat16: round the low 16 bits to nearest even
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)

    rng = np.random.default_rng(12)
    n = 24
    cache, wide = make("full", n, storage=storage), make("full", n)
    K, V = [], []
    for _ in range(n):
        q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
        K.append(rounded(k)), V.append(rounded(v))
        wide.decode(0, q, k, v)
        out = cache.decode(0, q, k, v)
        np.testing.assert_allclose(out, naive_attention(q, np.stack(K), np.stack(V)), rtol=2e-5, atol=2e-6)
    assert cache.bytes_used < wide.bytes_used
    assert wide.bytes_used - cache.bytes_used == n * 2 * D * 2 * H  # 2 bytes saved per element, keys and values
    with pytest.raises(ValueError, match="storage 'float8'; expected float32, float16 or bfloat16"):
        make("full", n, storage="float8")


def test_streaming_keeps_sinks_and_the_newest_window():
    rng = np.random.default_rng(3)
    budget, sinks, n = 16, 4, 50
    cache = make("streaming", budget, params={"sinks": sinks})
    for _ in range(n):
        cache.decode(1, rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D))
    expected = list(range(sinks)) + list(range(n - (budget - sinks), n))
    assert cache.positions(1, 0).tolist() == expected and cache.positions(1, 1).tolist() == expected
    assert cache.evictions == H * (n - budget)


def test_decode_output_is_attention_over_the_kept_tokens():
    # H2O evicts after attention: each step's output is attention over the kept tokens plus the new one.
    rng = np.random.default_rng(4)
    cache = make("h2o", 12)
    keys: dict[int, np.ndarray] = {}
    vals: dict[int, np.ndarray] = {}
    for t in range(40):
        q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
        keys[t], vals[t] = k, v
        kept = {h: [int(p) for p in cache.positions(0, h)] for h in range(H)}
        out = cache.decode(0, q, k, v, position=t)
        g = HQ // H
        for h in range(H):
            pos = kept[h] + [t]
            K = np.stack([keys[p] for p in pos]).reshape(len(pos), H, D)
            V = np.stack([vals[p] for p in pos]).reshape(len(pos), H, D)
            want = naive_attention(q, K, V)
            np.testing.assert_allclose(out[h * g:(h + 1) * g], want[h * g:(h + 1) * g], rtol=2e-5, atol=2e-6)


def test_torch_cpu_tensors_are_used_in_place():
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[hf]')")
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
    a, b = make("h2o", 8), make("h2o", 8)
    out = torch.full((HQ, D), float("nan"))
    ptr = out.data_ptr()
    got = a.decode(0, torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), out=out)
    assert got is out and out.data_ptr() == ptr  # written in place
    np.testing.assert_array_equal(out.numpy(), b.decode(0, q, k, v))
    assert isinstance(a.decode(0, torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)), torch.Tensor)
    # a strided view is refused, not copied behind the caller's back
    wide = torch.from_numpy(rand(rng, HQ, 2 * D))
    with pytest.raises(kvtrim.Error, match="not C-contiguous"):
        a.decode(0, wide[:, ::2], torch.from_numpy(k), torch.from_numpy(v))
    # a NumPy out array is written in place too
    np_out = np.zeros((HQ * D,), np.float32)
    a.decode_into(0, q, k, v, np_out)
    assert np.abs(np_out).sum() > 0


def test_decode_rows_equals_one_decode_per_token():
    rng = np.random.default_rng(6)
    T = 40
    Q, K, V = rand(rng, T, HQ, D), rand(rng, T, H, D), rand(rng, T, H, D)
    a, b = make("h2o", 10), make("h2o", 10)
    out = a.decode_rows(0, Q, K, V, position=5)
    for t in range(T):
        np.testing.assert_array_equal(out[t], b.decode(0, Q[t], K[t], V[t], position=5 + t))
    assert a.positions(0, 0).tolist() == b.positions(0, 0).tolist() and a.next_position(0) == 5 + T


def test_append_attends_to_kept_tokens_plus_the_chunk_then_evicts_once():
    # StreamingLLM keeps the sinks and the newest tokens, so the kept set before and after a chunk is known by hand.
    rng = np.random.default_rng(9)
    P, T, budget, sinks = 20, 12, 10, 2
    Q, K, V = rand(rng, P + T, HQ, D), rand(rng, P + T, H, D), rand(rng, P + T, H, D)
    cache = make("streaming", budget, params={"sinks": sinks})
    cache.prefill(0, Q[:P], K[:P], V[:P])
    kept = list(range(sinks)) + list(range(P - (budget - sinks), P))
    assert cache.positions(0, 0).tolist() == kept
    out = cache.append(0, Q[P:], K[P:], V[P:])
    for t in range(T):  # token P+t sees the kept tokens and chunk tokens 0..t: no eviction inside the chunk
        seen = kept + list(range(P, P + t + 1))
        np.testing.assert_allclose(out[t], naive_attention(Q[P + t], K[seen], V[seen]), rtol=2e-5, atol=2e-5)
    assert cache.positions(0, 0).tolist() == list(range(sinks)) + list(range(P + T - (budget - sinks), P + T))
    assert cache.next_position(0) == P + T and cache.size(0, 0) == budget
    # once the head is full, decode_rows (an eviction after every token) sees fewer tokens than append
    other = make("streaming", budget, params={"sinks": sinks})
    other.prefill(0, Q[:P], K[:P], V[:P])
    assert not np.allclose(other.decode_rows(0, Q[P:], K[P:], V[P:])[-1], out[-1], atol=1e-4)


def test_verify_changes_nothing_and_gives_appends_outputs():
    rng = np.random.default_rng(10)
    a, b = make("h2o", 16), make("h2o", 16)
    for _ in range(30):
        q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
        np.testing.assert_array_equal(a.decode(0, q, k, v), b.decode(0, q, k, v))
    Q, K, V = rand(rng, 5, HQ, D), rand(rng, 5, H, D), rand(rng, 5, H, D)
    state = (a.positions(0, 0).tolist(), a.positions(0, 1).tolist(), a.next_position(0), a.evictions, a.bytes_used)
    drafts = a.verify(0, Q, K, V)
    assert state == (a.positions(0, 0).tolist(), a.positions(0, 1).tolist(), a.next_position(0), a.evictions,
                     a.bytes_used)
    accepted = 3  # the first three drafts are accepted: appending them gives the verified outputs
    np.testing.assert_array_equal(b.append(0, Q[:accepted], K[:accepted], V[:accepted]), drafts[:accepted])
    np.testing.assert_array_equal(a.append(0, Q[:accepted], K[:accepted], V[:accepted]), drafts[:accepted])
    assert a.positions(0, 0).tolist() == b.positions(0, 0).tolist() and a.next_position(0) == 30 + accepted
    with pytest.raises(kvtrim.Error, match="verify: .*same number of rows"):
        a.verify(0, Q, K[:4], V)


def test_threads_give_identical_results():
    rng = np.random.default_rng(7)
    data = [(rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)) for _ in range(30)]
    one, two = make("tova", 8), make("tova", 8, threads=2)
    for q, k, v in data:
        np.testing.assert_array_equal(one.decode(1, q, k, v), two.decode(1, q, k, v))


def test_per_head_budgets_set_sizes_and_memory():
    rng = np.random.default_rng(8)
    budgets = [[4, 16], [32, 8]]
    per_head = make("h2o", head_budgets=budgets)
    uniform = make("h2o", 15)  # the same total (60 tokens) spread evenly
    assert per_head.budgets() == budgets
    for _ in range(100):
        for layer in range(L):
            q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
            per_head.decode(layer, q, k, v)
            uniform.decode(layer, q, k, v)
    assert per_head.sizes() == budgets
    # memory follows the budgets: bytes per kept token are the same, whatever the split
    assert per_head.bytes_used * 60 == uniform.bytes_used * sum(map(sum, budgets))
    small = make("h2o", head_budgets=[1, 1, 1, 1])
    assert small.bytes_reserved * sum(b + 1 for b in [15] * 4) == uniform.bytes_reserved * 8  # budget + 1 slots


def test_parameters_by_name_with_python_values():
    c = make("h2o", 16, params={"heavy_ratio": 0.25, "normalize": True, "group_reduce": "max", "sinks": 2})
    assert c.params == {"heavy_ratio": "0.25", "sinks": "2", "group_reduce": "max", "normalize": "true"}
    assert make("l2norm", 16, params={"skip_layers": [0, 1]}).params["skip_layers"] == "0,1"
    assert make("snapkv+h2o", 64, params={"decode.heavy_ratio": 0.75}).params["decode.heavy_ratio"] == "0.75"
    assert make("hashevict", 16, params={"probe": "key"}).params["probe"] == "key"
    assert make("h2o", 16, params={"heavy_ratio": np.float32(0.5), "sinks": np.int64(3)}).params["sinks"] == "3"


def test_errors_are_kvtrim_errors_with_the_cpp_message():
    assert issubclass(kvtrim.Error, ValueError)
    rng = np.random.default_rng(9)
    c = make("full", 4)
    q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
    with pytest.raises(kvtrim.Error) as e:
        c.decode(2, q, k, v)
    assert str(e.value) == f"kvtrim: decode: layer 2 out of range 0..{L - 1}"  # kv_cache.hpp's text
    with pytest.raises(ValueError, match="dtype float64.*float32"):
        c.decode(0, q.astype(np.float64), k, v)
    with pytest.raises(ValueError, match="dtype float16"):
        c.decode(0, q.astype(np.float16), k, v)
    with pytest.raises(ValueError, match=r"k has shape \(16, 2\); expected \(2, 16\) or \(32,\)"):
        c.decode(0, q, k.T.copy(), v)
    with pytest.raises(ValueError, match="not C-contiguous"):
        c.decode(0, np.asfortranarray(rand(rng, HQ, D)), k, v)
    with pytest.raises(ValueError, match="same number of rows"):
        c.prefill(0, rand(rng, 3, HQ, D), rand(rng, 2, H, D), rand(rng, 3, H, D))
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"q\[18\] is nan"):
        c.decode(0, bad, k, v)
    with pytest.raises(ValueError, match="unknown policy 'nope'; the registered policies are full, streaming"):
        make("nope")
    with pytest.raises(ValueError, match="unknown parameter 'bogus'"):
        make("h2o", params={"bogus": 1})
    with pytest.raises(ValueError, match="heavy_ratio: 'lots' is not a number"):
        make("h2o", params={"heavy_ratio": "lots"})
    with pytest.raises(ValueError, match="needs a calibrated basis"):
        make("eigen+h2o")
    with pytest.raises(ValueError, match="head_budgets must have"):
        make("h2o", head_budgets=[4, 4, 4])
    with pytest.raises(ValueError, match="device"):
        make("h2o", device="tpu")
    for _ in range(4):
        c.decode(0, q, k, v)
    with pytest.raises(ValueError, match="never evicts"):  # FullCache at its budget refuses, cache unchanged
        c.decode(0, q, k, v)
    assert c.size(0, 0) == 4 and c.next_position(0) == 4


def test_eigen_basis_save_and_load(tmp_path):
    rng = np.random.default_rng(10)
    basis = calibrated_basis(rng)
    assert basis.key_rank(0, 0) == 8 and basis.n_layers == L and basis.head_dim == D
    path = str(tmp_path / "basis.kvte")
    basis.save(path)
    again = kvtrim.EigenBasis.load(path)
    q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
    a, b = make("eigen+h2o", 8, basis=basis), make("eigen+h2o", 8, basis=again)
    np.testing.assert_array_equal(a.decode(0, q, k, v), b.decode(0, q, k, v))


def test_cuda_tensors_on_the_cuda_backend():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not kvtrim.has_cuda:
        pytest.skip("this kvtrim module was built without the CUDA backend (KVTRIM_PYTHON_CUDA=ON pip install .)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    rng = np.random.default_rng(11)
    gpu = make("h2o", 12, device="cuda")
    cpu = make("h2o", 12)
    for _ in range(30):
        q, k, v = rand(rng, HQ, D), rand(rng, H, D), rand(rng, H, D)
        out = gpu.decode(0, *(torch.from_numpy(x).cuda() for x in (q, k, v)))
        assert out.is_cuda
        np.testing.assert_allclose(out.cpu().numpy(), cpu.decode(0, q, k, v), rtol=1e-4, atol=1e-5)
    assert gpu.positions(0, 0).tolist() == cpu.positions(0, 0).tolist()
