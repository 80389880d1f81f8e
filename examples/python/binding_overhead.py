#!/usr/bin/env python3
"""binding_overhead.py: what a decode call costs from Python against the same call from C++.

    cmake --build build --target kvtrim_decode_overhead      # the C++ side (not built by default)
    python examples/python/binding_overhead.py [--cpp build/python/kvtrim_decode_overhead]

For each shape and policy: one layer, the cache filled to its budget, then timed decode calls (thread CPU time,
best of 5 runs)
  C++ typed      KVCache<P>::decode                         (examples/python/decode_overhead.cpp)
  C++ AnyCache   make_cache(name)->decode, what the module calls
  numpy _into    cache.decode_into(layer, q, k, v, out)     NumPy arrays, out given
  torch _into    the same with torch CPU tensors (DLPack through torch's __dlpack__)
  torch.numpy    the same with tensor.numpy() views (zero-copy; what kvtrim.hf passes)
  numpy decode   cache.decode(layer, q, k, v)               allocates out
The binding's overhead is the Python figure minus the C++ AnyCache figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

import kvtrim

SHAPES = [  # (name, n_q_heads, n_kv_heads, head_dim, budget)
    ("stories260K layer (8q/4kv x 8, budget 64)", 8, 4, 8, 64),
    ("Llama-3-8B layer (32q/8kv x 128, budget 256)", 32, 8, 128, 256),
]


def python_us(call, calls: int) -> float:
    """Thread CPU time per call, best of 5 runs (as the C++ side measures: robust on a shared machine)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(calls):
            call()
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return best


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpp", default=str(root / "build" / "python" / "kvtrim_decode_overhead"))
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        torch = None
    print(f"{'shape':<46} {'policy':<10} {'C++ typed':>10} {'C++ Any':>9} {'np _into':>9} {'torch _into':>11} "
          f"{'torch.numpy':>11} {'np decode':>10} {'overhead':>9}   (µs per decode call)")
    for name, hq, hkv, d, budget in SHAPES:
        calls = args.calls if d <= 16 else args.calls // 10
        for policy in ["streaming", "h2o"]:
            cpp = json.loads(subprocess.run([args.cpp, policy, str(hq), str(hkv), str(d), str(budget), str(calls)],
                                            check=True, capture_output=True, text=True).stdout)
            rng = np.random.default_rng(1)
            q = rng.standard_normal((hq, d), dtype=np.float32)
            k = rng.standard_normal((hkv, d), dtype=np.float32)
            v = rng.standard_normal((hkv, d), dtype=np.float32)
            out = np.empty_like(q)
            res = {}
            cache = kvtrim.Cache(policy, n_layers=1, n_kv_heads=hkv, n_q_heads=hq, head_dim=d, budget=budget)
            for _ in range(budget + 8):
                cache.decode_into(0, q, k, v, out)
            res["np_into"] = python_us(lambda: cache.decode_into(0, q, k, v, out), calls)
            res["np_decode"] = python_us(lambda: cache.decode(0, q, k, v), calls)
            if torch is not None:
                tq, tk, tv, to = (torch.from_numpy(x) for x in (q, k, v, out))
                res["torch_into"] = python_us(lambda: cache.decode_into(0, tq, tk, tv, to), calls)
                res["torch_np"] = python_us(lambda: cache.decode_into(0, tq.numpy(), tk.numpy(), tv.numpy(),
                                                                      to.numpy()), calls)
            print(f"{name:<46} {policy:<10} {cpp['typed_us']:>10.2f} {cpp['any_us']:>9.2f} {res['np_into']:>9.2f} "
                  f"{res.get('torch_into', float('nan')):>11.2f} {res.get('torch_np', float('nan')):>11.2f} "
                  f"{res['np_decode']:>10.2f} "
                  f"{res['np_into'] - cpp['any_us']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
