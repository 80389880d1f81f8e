"""kvtrim.Batch from Python (C++ KVBatch): sequences joining and leaving give what one Cache per sequence gives,
FullCache rows are naive attention over each sequence's own tokens, per-sequence budgets, errors."""

from __future__ import annotations

import numpy as np
import pytest

import kvtrim
from test_core import HQ, D, H, L, naive_attention, rand


# an evicting policy from the registry (no policy is named here: each has its own test file)
EVICTING = next(p for p in kvtrim.policies() if not kvtrim.never_evicts(p) and not kvtrim.needs_basis(p))


def make_batch(policy, budget=40, **kw):
    return kvtrim.Batch(policy, n_layers=L, n_kv_heads=H, n_q_heads=HQ, head_dim=D, budget=budget, **kw)


@pytest.mark.parametrize("policy", [p for p in kvtrim.policies() if not kvtrim.needs_basis(p)])
def test_batch_equals_one_cache_per_sequence(policy):
    rng = np.random.default_rng(5)
    budget = 40 if not kvtrim.never_evicts(policy) else 80  # SnapKV needs room beyond its 32-token window
    batch = make_batch(policy, budget, threads=2)
    caches: dict[int, kvtrim.Cache] = {}
    for step in range(60):
        if step in (0, 20):  # sequences join
            for _ in range(2):
                i = batch.add()
                caches[i] = kvtrim.Cache(policy, n_layers=L, n_kv_heads=H, n_q_heads=HQ, head_dim=D, budget=budget)
                Q, K, V = rand(rng, 10, HQ, D), rand(rng, 10, H, D), rand(rng, 10, H, D)
                for layer in range(L):
                    np.testing.assert_array_equal(batch.prefill(i, layer, Q, K, V), caches[i].prefill(layer, Q, K, V))
        if step == 40:  # one leaves
            gone = batch.ids[0]
            batch.remove(gone)
            del caches[gone]
        ids = batch.ids
        Q, K, V = rand(rng, len(ids), HQ, D), rand(rng, len(ids), H, D), rand(rng, len(ids), H, D)
        for layer in range(L):
            out = batch.decode(layer, ids, Q, K, V)
            for r, i in enumerate(ids):
                np.testing.assert_array_equal(out[r], caches[i].decode(layer, Q[r], K[r], V[r]))
    for i in batch.ids:
        for layer in range(L):
            for h in range(H):
                np.testing.assert_array_equal(batch.positions(i, layer, h), caches[i].positions(layer, h))
        assert batch.evictions(i) == caches[i].evictions
        assert batch.next_position(i, 0) == caches[i].next_position(0)
    assert len(batch) == 3


def test_full_cache_rows_are_naive_attention_and_budgets_are_per_sequence():
    rng = np.random.default_rng(6)
    batch = make_batch("full", 40, storage="float32")
    a, b = batch.add(), batch.add(budget=12)
    assert batch.budget(a, 0, 0) == 40 and batch.budget(b, 1, 1) == 12
    keys = {a: [], b: []}
    vals = {a: [], b: []}
    for _ in range(12):
        Q, K, V = rand(rng, 2, HQ, D), rand(rng, 2, H, D), rand(rng, 2, H, D)
        out = batch.decode(0, [b, a], Q, K, V)  # rows in any order of ids
        for r, i in enumerate([b, a]):
            keys[i].append(K[r]), vals[i].append(V[r])
            np.testing.assert_allclose(out[r], naive_attention(Q[r], np.stack(keys[i]), np.stack(vals[i])),
                                       rtol=2e-5, atol=2e-6)
    assert batch.size(b, 0, 0) == 12 and batch.bytes_used(a) == batch.bytes_used(b)


def test_16bit_storage_halves_each_sequences_memory():
    rng = np.random.default_rng(7)
    wide, narrow = make_batch(EVICTING), make_batch(EVICTING, storage="bfloat16")
    i, j = wide.add(), narrow.add()
    Q, K, V = rand(rng, 1, HQ, D), rand(rng, 1, H, D), rand(rng, 1, H, D)
    wide.decode(0, [i], Q, K, V)
    narrow.decode(0, [j], Q, K, V)
    assert wide.bytes_used(i) - narrow.bytes_used(j) == 2 * H * D * 2  # one token: keys and values, 2 bytes saved


def test_batch_errors_are_kvtrim_errors_and_change_nothing():
    rng = np.random.default_rng(8)
    batch = make_batch(EVICTING)
    a, b = batch.add(), batch.add()
    Q, K, V = rand(rng, 2, HQ, D), rand(rng, 2, H, D), rand(rng, 2, H, D)
    with pytest.raises(kvtrim.Error, match="Q has 2 rows for 1 sequence ids"):
        batch.decode(0, [a], Q, K, V)
    with pytest.raises(kvtrim.Error, match="appears twice"):
        batch.decode(0, [a, a], Q, K, V)
    with pytest.raises(kvtrim.Error, match="no sequence with id 7"):
        batch.decode(0, [a, 7], Q, K, V)
    with pytest.raises(kvtrim.Error, match="no sequence with id 7"):
        batch.prefill(7, 0, Q, K, V)
    bad = Q.copy()
    bad[1, 0, 3] = np.inf
    with pytest.raises(kvtrim.Error, match=r"q\[3\] is inf"):
        batch.decode(0, [a, b], bad, K, V)
    assert batch.next_position(a, 0) == 0 and batch.next_position(b, 0) == 0  # nothing ran
    with pytest.raises(kvtrim.Error, match="dtype float64"):
        batch.decode(0, [a, b], Q.astype(np.float64), K, V)
    with pytest.raises(kvtrim.Error, match="storage 'int8'"):
        make_batch(EVICTING, storage="int8")
    with pytest.raises(kvtrim.Error, match="unknown policy 'nope'"):
        make_batch("nope")
    batch.remove(a)
    assert batch.ids == [b]
