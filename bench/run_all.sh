#!/usr/bin/env bash
# Runs kvtrim's benchmark suite and writes a short markdown summary.
#
#   bench/run_all.sh [BUILD_DIR] [OUT_DIR]      defaults: build, out/bench
#   FILTER=regex bench/run_all.sh ...           only the benchmarks matching regex (Google Benchmark filter)
#   BENCHES="bench_decode" bench/run_all.sh ...  only these programs (default: bench_decode bench_policies)
#
# Needs a Release build with benchmarks (./test.sh makes one in build/) and python3 for the summary.
# Writes OUT_DIR/{decode,policies}.json (raw Google Benchmark output) and OUT_DIR/summary.md. About 5-10
# minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-out/bench}
filter=${FILTER:-.}
benches=${BENCHES:-bench_decode bench_policies}
mkdir -p "$out"
for b in $benches; do
  [ -x "$build/bench/$b" ] || { echo "run_all.sh: $build/bench/$b is missing; build it first" >&2; exit 1; }
done
rm -f "$out/decode.json" "$out/policies.json"

for b in $benches; do
  echo "== $b" >&2
  "$build/bench/$b" --benchmark_filter="$filter" --benchmark_out="$out/${b#bench_}.json" \
    --benchmark_out_format=json --benchmark_counters_tabular=false
done

python3 - "$out" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
rows = []
for f in ("decode.json", "policies.json"):
    p = os.path.join(out, f)
    if os.path.exists(p):
        with open(p) as fh:
            data = json.load(fh)
        ctx = data["context"]
        rows += data["benchmarks"]

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"

def args(name):
    return dict(re.findall(r"(\w+):(\d+)", name))

def us(b, key="cpu_time"):
    t = b[key]
    unit = b.get("time_unit", "ns")
    return t * {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[unit]

L = []
bw = next((b["read_GBps"] for b in rows if "read_GBps" in b), None)
L.append("# kvtrim benchmark summary\n")
L.append(f"Machine: {cpu_model()}, {ctx.get('num_cpus')} CPUs, load average at start "
         f"{', '.join('%.1f' % x for x in ctx.get('load_avg', []))}; library build: {ctx.get('library_build_type')}.")
if bw:
    L.append(f"Measured single-core streaming read bandwidth (best of 6 passes over 512 MiB, CPU time): **{bw:.1f} GB/s**.")
L.append("Single-thread figures are CPU time of the benchmark thread; thread figures are wall time.\n")

dec = [b for b in rows if b["name"].startswith("BM_DecodeAttention")]
if dec:
    L.append("## Decode attention (KVCache<FullCache, CpuBackend<type>>, one KV head)\n")
    L.append("ratio = mean step's K+V GB/s (bytes as stored) / best read pass; median, best = the median and the "
             "fastest step against the same pass.\n")
    L.append("| storage | head dim | group | kept tokens | K+V MiB | us/step | K+V GB/s | ratio to read bandwidth | median | best |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in dec:
        a = args(b["name"])
        L.append(f"| {b['name'].split('/')[1]} | {a['d']} | {a['g']} | {a['n']} | {b['KV_MiB']:.1f} | {us(b):.1f} | {b['KV_GBps']:.1f} | "
                 f"{b['bw_ratio']:.2f} | {b['bw_ratio_median']:.2f} | {b['bw_ratio_best']:.2f} |")
    L.append("")
att = [b for b in rows if b["name"].startswith("BM_Attend/") and "error_occurred" not in b]
if att:
    L.append("## Decode kernel per storage type and path (one KV head; path 1 = AVX2, 2 = AVX-512)\n")
    L.append("GB/s = bytes of K and V actually read (n x (dk + dv) x sizeof(type)) per second of the median step; "
             "ratio = that / the best read pass (median step; mean step; fastest step).\n")
    L.append("| type | path | head dim | group | kept tokens | K+V MiB | us/step (median) | K+V GB/s | ratio median | ratio mean | ratio best |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in att:
        a = args(b["name"])
        if a["path"] == "0":
            continue
        gbs = b["KV_MiB"] * (1 << 20) / (b["us_median"] * 1e-6) * 1e-9
        L.append(f"| {b['name'].split('/')[1]} | {a['path']} | {a['d']} | {a['g']} | {a['n']} | {b['KV_MiB']:.1f} | {b['us_median']:.0f} | "
                 f"{gbs:.1f} | {b['bw_ratio_median']:.2f} | {b['bw_ratio']:.2f} | {b['bw_ratio_best']:.2f} |")
    L.append("")
    L.append("## Decode kernel: the paths against each other (median step; - where a path did not run)\n")
    L.append("| type | head dim | group | tokens | portable us | AVX2 us | AVX-512 us | AVX2 / AVX-512 |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    byk = {}
    for b in att:
        a = args(b["name"])
        byk.setdefault((b["name"].split("/")[1], a["d"], a["g"], a["n"]), {})[a["path"]] = b
    cell = lambda v, p: f"{v[p]['us_median']:.0f}" if p in v else "-"
    for (t, d, g, n), v in byk.items():
        if len(v) > 1:
            ratio = f"{v['1']['us_median'] / v['2']['us_median']:.2f}" if "1" in v and "2" in v else "-"
            L.append(f"| {t} | {d} | {g} | {n} | {cell(v, '0')} | {cell(v, '1')} | {cell(v, '2')} | {ratio} |")
    L.append("")
thr = [b for b in rows if b["name"].startswith("BM_DecodeThreads")]
if thr:
    L.append("## Threads over KV heads (8 KV heads x 4 query heads, d 128, 8K tokens each; wall time)\n")
    L.append("| threads | us/step | K+V GB/s | speedup |")
    L.append("|---:|---:|---:|---:|")
    base = None
    for b in thr:
        t = us(b, "real_time")
        base = base or t
        L.append(f"| {args(b['name'])['threads']} | {t:.0f} | {b['KV_GBps']:.1f} | {base / t:.2f} |")
    L.append("")
steps = [b for b in rows if b["name"].startswith("BM_Step_")]
if steps:
    L.append("## Per-policy decode step: bookkeeping vs attention (one KV head, 4 query heads)\n")
    L.append("bookkeeping share = (policy step - FullCache step over the same number of tokens) / policy step; "
             "hook share = time inside the policy's hooks / policy step. Medians. cold = caches flushed before "
             "each step.\n")
    L.append("| policy | budget | d | cold | step us | FullCache us | bookkeeping share | hook share |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in steps:
        pol = b["name"].split("/")[0][len("BM_Step_"):]
        a = args(b["name"])
        L.append(f"| {pol} | {a['budget']} | {a['d']} | {a['cold']} | {b['step_us']:.1f} | {b['full_us']:.1f} | "
                 f"{100 * b['bookkeeping_share']:.1f}% | {100 * b['hook_share']:.1f}% |")
    L.append("")
sc = [b for b in rows if b["name"].startswith("BM_Scaling_")]
if sc:
    L.append("## Scaling with history (budget 1024, d 64, 4 query heads; median step)\n")
    L.append("| policy | us at 4K | us at 16K | us at 64K | 16K/4K | 64K/4K | memory 64K/4K |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for b in sc:
        pol = b["name"].split("/")[0][len("BM_Scaling_"):]
        L.append(f"| {pol} | {b['us_4k']:.1f} | {b['us_16k']:.1f} | {b['us_64k']:.1f} | {b['ratio_16k']:.2f} | "
                 f"{b['ratio_64k']:.2f} | {b['mem_ratio_64k']:.2f} |")
    L.append("")
pre = [b for b in rows if b["name"].startswith("BM_Prefill_")]
if pre:
    L.append("## Prefill with compression (one KV head, one query head, d 128, budget T/4)\n")
    L.append("| policy | T | ms | tokens/s | kept |")
    L.append("|---|---:|---:|---:|---:|")
    for b in pre:
        pol = b["name"].split("/")[0][len("BM_Prefill_"):]
        L.append(f"| {pol} | {args(b['name'])['T']} | {us(b) / 1e3:.1f} | {b['tokens_per_s']:.0f} | {b['kept']:.0f} |")
    L.append("")
with open(os.path.join(out, "summary.md"), "w") as fh:
    fh.write("\n".join(L) + "\n")
print("\n".join(L))
print(f"(written to {os.path.join(out, 'summary.md')})", file=sys.stderr)
EOF
