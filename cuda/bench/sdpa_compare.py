#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the decode shapes of bench_cuda_decode, side by side with kvtrim.

    python3 cuda/bench/sdpa_compare.py OUT/decode.csv [--runs 7] [--iters 20] [--warmup 5] [--csv-out FILE]

Reads the CSV that `bench_cuda_decode --csv FILE` writes (one line per storage type and kept length N, with
kv_heads H, group g, head_dim d and kvtrim's attention time) and times, for each line, one decode step of
torch.nn.functional.scaled_dot_product_attention on the same shape:

  q: [1, H*g, 1, d]  (one new token per query head)     k, v: [1, H, N, d]  (N kept tokens per KV head)

in float16 for "half" and float32 for "float" (inputs ~N(0, 1); no mask, no causal flag: one query sees every
kept token, as in kvtrim's decode step). GQA is given to SDPA in the two ways a user would write it, and both
are timed:
  - "gqa":    enable_gqa=True (PyTorch >= 2.5): K/V stay [1, H, N, d]; kernels that support it read each KV head
              once for its group, the others fall back (the math backend repeats K/V internally);
  - "expand": K/V repeated to [1, H*g, N, d] with repeat_interleave beforehand (not timed), as models written
              before enable_gqa do (Hugging Face's repeat_kv); the kernel then reads g times the bytes.
The reported SDPA time is the faster of the two with PyTorch's default backend choice (what a user's call
gets). Each backend (flash, efficient, cudnn, math) is also forced in turn with torch.nn.attention.sdpa_kernel
(or the older torch.backends.cuda.sdp_kernel) and listed with its time, or "not available" when PyTorch refuses
it for this shape and type; the backend the default call dispatched to and its kernels are read with torch.profiler when possible.

Timing: `iters` calls are captured in a CUDA graph and replayed between CUDA events after `warmup` eager calls;
the figure is the median over `runs` replays, per call. The graph removes Python's and the launch's host cost,
as kvtrim's benchmark removes it by holding the stream while it queues the steps, so both figures are GPU time;
the eager time per call (Python loop, what an unoptimised caller sees) is listed too. If graph capture fails,
eager timing is used and the line says so. Bandwidth counts the same bytes as bench_cuda_decode: the K and V
of N tokens per KV head (N * H * d * 2 * element size), whichever variant ran. Neither benchmark flushes the L2
cache between steps, so K+V below the L2 size (50 MB on an H100) is read from L2 by both.

Output per (type, N): kvtrim us, SDPA us, the ratio SDPA/kvtrim (> 1: kvtrim is faster), and both GB/s.
Exit status: 0 done; 1 a shape failed in every backend; 2 bad arguments or CSV; 3 PyTorch or CUDA absent
(a clear message says which).
"""

import argparse
import csv
import math
import statistics
import sys
import warnings

REQUIRED = ["type", "N", "kv_heads", "group", "head_dim", "attention_us", "gbs"]
ELEMENT_BYTES = {"half": 2, "float": 4, "bf16": 2}


def fail(code, message):
    print(f"sdpa_compare.py: {message}", file=sys.stderr)
    sys.exit(code)


def read_rows(path):
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                fail(2, f"{path}: missing column(s) {', '.join(missing)}; expected the CSV of "
                        f"`bench_cuda_decode --csv FILE` (columns {', '.join(REQUIRED)}, ...)")
            rows = []
            for i, r in enumerate(reader, start=2):
                try:
                    row = {
                        "type": r["type"],
                        "N": int(r["N"]),
                        "H": int(r["kv_heads"]),
                        "g": int(r["group"]),
                        "d": int(r["head_dim"]),
                        "kvtrim_us": float(r["attention_us"]),
                        "kvtrim_gbs": float(r["gbs"]),
                        "device": r.get("device", ""),
                    }
                except (TypeError, ValueError) as e:
                    fail(2, f"{path}, line {i}: cannot read the numbers ({e})")
                if row["type"] not in ELEMENT_BYTES:
                    fail(2, f"{path}, line {i}: unknown type '{row['type']}' (expected one of "
                            f"{', '.join(ELEMENT_BYTES)})")
                if min(row["N"], row["H"], row["g"], row["d"]) < 1:
                    fail(2, f"{path}, line {i}: N, kv_heads, group and head_dim must be positive")
                rows.append(row)
    except OSError as e:
        fail(2, f"cannot read {path}: {e}")
    if not rows:
        fail(2, f"{path} holds no data lines (did bench_cuda_decode run on a GPU?)")
    return rows


def import_torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        fail(3, f"PyTorch is not installed ({e}); the SDPA comparison needs PyTorch with CUDA")
    import torch
    if not torch.cuda.is_available():
        fail(3, f"PyTorch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False; "
                f"built with CUDA {torch.version.cuda}); the SDPA comparison needs a GPU")
    return torch


class Sdpa:
    """SDPA with a forced backend, across PyTorch versions."""

    def __init__(self, torch):
        self.torch = torch
        self.F = torch.nn.functional
        self.new_api = None
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # PyTorch >= 2.3
            self.new_api = (SDPBackend, sdpa_kernel)
        except ImportError:
            pass
        self.has_gqa = True
        try:
            q = torch.zeros(1, 2, 1, 8, device="cuda")
            k = torch.zeros(1, 1, 4, 8, device="cuda")
            self.F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        except TypeError:
            self.has_gqa = False  # PyTorch < 2.5: no enable_gqa argument
        except RuntimeError:
            pass  # the argument exists; this tiny shape may simply have no kernel

    def backends(self):
        names = ["flash", "efficient", "cudnn", "math"]
        if self.new_api is None:
            names.remove("cudnn")  # the old context manager cannot select it
        return names

    def context(self, backend):
        """Context manager that forces `backend` (None: PyTorch's default choice)."""
        import contextlib
        if backend is None:
            return contextlib.nullcontext()
        if self.new_api is not None:
            SDPBackend, sdpa_kernel = self.new_api
            enum = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                    "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend]
            if not hasattr(SDPBackend, enum):
                raise RuntimeError(f"this PyTorch has no SDPBackend.{enum}")
            return sdpa_kernel(getattr(SDPBackend, enum))
        return self.torch.backends.cuda.sdp_kernel(
            enable_flash=backend == "flash", enable_mem_efficient=backend == "efficient",
            enable_math=backend == "math")

    def call(self, q, k, v, gqa):
        if gqa:
            return self.F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.F.scaled_dot_product_attention(q, k, v)


def time_call(torch, fn, args):
    """(graph us per call or None, eager us per call, note). Medians over args.runs."""
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()

    def median_of(run_once, per):
        times = []
        for _ in range(args.runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run_once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / per)
        return statistics.median(times)

    def eager():
        for _ in range(args.iters):
            fn()

    eager_us = median_of(eager, args.iters)
    graph_us, note = None, ""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        graph_us = median_of(graph.replay, args.iters)
        del graph
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
        note = f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); eager time"
        torch.cuda.synchronize()
    return graph_us, eager_us, note


def backend_of_call(torch, fn):
    """(backend, kernel names) of one call, read with torch.profiler: the backend from the ATen operator
    PyTorch dispatched to (aten::_scaled_dot_product_flash_attention, ..._efficient_attention,
    ..._cudnn_attention, ..._attention_math), the kernels from the CUDA activity. ("unknown", []) when the
    profiler cannot tell."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = list(prof.key_averages())
    except Exception:  # noqa: BLE001 - the profiler is optional
        return "unknown", []
    ops = " ".join(e.key for e in events).lower()
    backend = "unknown"
    for marker, name in (("flash_attention", "flash"), ("efficient_attention", "efficient"),
                         ("cudnn_attention", "cudnn"), ("attention_math", "math")):
        if marker in ops:
            backend = name
            break
    kernels = [e.key for e in events if "cuda" in str(getattr(e, "device_type", "")).lower()
               and not e.key.startswith("cuda") and "memcpy" not in e.key.lower() and "memset" not in e.key.lower()]
    return backend, kernels


def compare(torch, sdpa, row, args):
    dtype = {"half": torch.float16, "float": torch.float32, "bf16": torch.bfloat16}[row["type"]]
    N, H, g, d = row["N"], row["H"], row["g"], row["d"]
    gen = torch.Generator(device="cuda").manual_seed(1234)
    q = torch.randn(1, H * g, 1, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, H, N, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, H, N, d, device="cuda", dtype=dtype, generator=gen)
    variants = {}
    if g == 1:
        variants["mha"] = (k, v, False)
    else:
        if sdpa.has_gqa:
            variants["gqa"] = (k, v, True)
        variants["expand"] = (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False)

    results = {}  # (backend or "default", variant) -> (graph_us, eager_us, note) or error text
    for backend in [None] + sdpa.backends():
        for name, (kk, vv, gqa) in variants.items():
            key = (backend or "default", name)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with sdpa.context(backend):
                        fn = lambda kk=kk, vv=vv, gqa=gqa: sdpa.call(q, kk, vv, gqa)  # noqa: E731
                        fn()
                        torch.cuda.synchronize()
                        results[key] = time_call(torch, fn, args)
            except RuntimeError as e:
                torch.cuda.synchronize()
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                results[key] = f"not available ({first[:80]})"

    def best_time(r):
        return r[0] if r[0] is not None else r[1]

    default = {n: r for (b, n), r in results.items() if b == "default" and not isinstance(r, str)}
    out = dict(row)
    out["sdpa_us"] = math.nan
    out["sdpa_eager_us"] = math.nan
    out["variant"] = "-"
    out["timing"] = "-"
    out["default_backend"] = "unknown"
    out["details"] = results
    if default:
        name = min(default, key=lambda n: best_time(default[n]))
        graph_us, eager_us, note = default[name]
        out["sdpa_us"] = best_time(default[name])
        out["sdpa_eager_us"] = eager_us
        out["variant"] = name
        out["timing"] = "graph" if graph_us is not None else "eager"
        out["note"] = note
        kk, vv, gqa = variants[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["default_backend"], out["kernels"] = backend_of_call(torch, lambda: sdpa.call(q, kk, vv, gqa))
    bytes_read = N * H * d * 2 * ELEMENT_BYTES[row["type"]]
    out["sdpa_gbs"] = bytes_read / (out["sdpa_us"] * 1e-6) / 1e9 if out["sdpa_us"] == out["sdpa_us"] else math.nan
    out["ratio"] = out["sdpa_us"] / row["kvtrim_us"] if row["kvtrim_us"] > 0 else math.nan
    del q, k, v, variants
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="the CSV written by `bench_cuda_decode --csv FILE`")
    ap.add_argument("--runs", type=int, default=7, help="timed repetitions; the median is reported (7)")
    ap.add_argument("--iters", type=int, default=20, help="SDPA calls per timed repetition (20)")
    ap.add_argument("--warmup", type=int, default=5, help="eager calls before timing (5)")
    ap.add_argument("--csv-out", default="", help="also write the comparison to this CSV file")
    args = ap.parse_args()
    if args.runs < 1 or args.iters < 1 or args.warmup < 0:
        fail(2, "--runs and --iters must be >= 1 and --warmup >= 0")

    rows = read_rows(args.csv)
    torch = import_torch()
    sdpa = Sdpa(torch)
    device = torch.cuda.get_device_name(0)
    csv_devices = sorted({r["device"] for r in rows if r["device"]})
    print(f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) on {device}; enable_gqa "
          f"{'available' if sdpa.has_gqa else 'not available (PyTorch < 2.5)'}")
    other = [d for d in csv_devices if d != device]
    if other:
        print(f"warning: kvtrim figures in {args.csv} were measured on {', '.join(other)}, not on {device}: "
              f"the ratios compare different devices", file=sys.stderr)
    print(f"SDPA: median of {args.runs} x {args.iters} calls (CUDA graph replay), after {args.warmup} warm-up calls; "
          f"ratio = SDPA us / kvtrim us (> 1: kvtrim is faster)\n")
    header = (f"{'type':<5} {'N':>7}  {'kvtrim us':>9} {'GB/s':>7}  {'SDPA us':>9} {'GB/s':>7}  {'SDPA/kvtrim':>11}  "
              f"{'SDPA eager us':>13}  SDPA call")
    print(header)
    results, failed = [], 0
    for row in rows:
        try:
            r = compare(torch, sdpa, row, args)
        except torch.cuda.OutOfMemoryError as e:
            print(f"{row['type']:<5} {row['N']:>7}  out of GPU memory: {str(e).splitlines()[0]}")
            failed += 1
            torch.cuda.empty_cache()
            continue
        results.append(r)
        if r["sdpa_us"] != r["sdpa_us"]:
            failed += 1
        print(f"{r['type']:<5} {r['N']:>7}  {r['kvtrim_us']:>9.1f} {r['kvtrim_gbs']:>7.1f}  {r['sdpa_us']:>9.1f} "
              f"{r['sdpa_gbs']:>7.1f}  {r['ratio']:>11.2f}  {r['sdpa_eager_us']:>13.1f}  "
              f"{r['variant']}, default backend: {r['default_backend']} ({r['timing']})"
              + (f"; {r['note']}" if r.get("note") else ""))
        for (backend, name), res in r["details"].items():
            if backend == "default":
                continue
            if isinstance(res, str):
                text = res
            else:
                graph_us, eager_us, note = res
                text = (f"{graph_us:.1f} us (graph), {eager_us:.1f} us (eager)" if graph_us is not None
                        else f"{eager_us:.1f} us (eager; {note})")
            print(f"        forced {backend:<9} {name:<6}  {text}")
        if r.get("kernels"):
            print(f"        default call's kernels: {', '.join(r['kernels'][:4])}")
        sys.stdout.flush()

    if args.csv_out:
        try:
            with open(args.csv_out, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["type", "N", "kv_heads", "group", "head_dim", "kvtrim_us", "kvtrim_gbs", "sdpa_us",
                            "sdpa_gbs", "sdpa_over_kvtrim", "sdpa_eager_us", "sdpa_variant", "sdpa_timing",
                            "sdpa_default_backend", "torch_version", "device"])
                for r in results:
                    w.writerow([r["type"], r["N"], r["H"], r["g"], r["d"], f"{r['kvtrim_us']:.3f}",
                                f"{r['kvtrim_gbs']:.2f}", f"{r['sdpa_us']:.3f}", f"{r['sdpa_gbs']:.2f}",
                                f"{r['ratio']:.3f}", f"{r['sdpa_eager_us']:.3f}", r["variant"], r["timing"],
                                r["default_backend"], torch.__version__, device])
            print(f"\nCSV written to {args.csv_out}")
        except OSError as e:
            fail(1, f"cannot write {args.csv_out}: {e}")
    if failed:
        fail(1, f"{failed} shape(s) could not be run by SDPA (see above)")


if __name__ == "__main__":
    main()
