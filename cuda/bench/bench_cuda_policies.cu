// Per-policy bookkeeping on the GPU as a % of the attention step, through the public API:
// kvtrim::KVCache<P, kvtrim::CudaBackend<T>> with device input pointers (cfg.check_finite = false), one layer.
//
//   bench_cuda_policies [kv_heads=8] [group=4] [head_dim=128] [iterations=200] [--lengths 4096,16384,32768]
//                       [--csv FILE]
//
// For each storage type (half, float) and kept length N:
//  - every policy's cache has budget N and is filled by one prefill of N tokens (the budget, so nothing is
//    evicted yet), then `warmup` (20) decode steps: from then on every step appends one token and evicts one
//    (checked after each measurement: the heads hold N tokens and the cache counted one eviction per step and
//    KV head; "unsteady" otherwise);
//  - the baseline is KVCache<FullCache> (budget N + iterations, so it never fills), prefilled with
//    N - warmup - iterations/2 tokens so that its timed steps attend over N + 1 tokens on average, as the
//    evicting policies' steps do (append, attention over N + 1, evict; a policy that evicts before attention
//    attends over N);
//  - the q, k, v of each step are rows of one device buffer of random values in [-1, 1) made once on the device.
// Two timings of `iterations` steps each, with CUDA events on cache.backend().stream(), no host synchronisation
// inside the timed loop, cache.backend().synchronize() after it (which also reports kernel errors):
//  - step: the steps are queued behind a spin kernel that holds the stream (kvbench::StreamBlocker) in batches
//    of 32, then released, so they run back to back: GPU time per step without the host's launch gaps. This is
//    the figure for the bookkeeping share: overhead = (step - FullCache step) / FullCache step;
//  - pipelined: the same number of steps queued freely, as an engine would: when queuing a step costs the host
//    more than the GPU needs to run it, this is the host's rate, not the GPU's;
//  - host: wall-clock time the host spent queuing one step (KVCache::decode's checks and the launches).
// FullCache's own row is its measurement; its overhead is 0 by definition. The policies are the registry's
// (every entry that evicts in decode and needs no calibration), with the registry's parameters. Policies that
// evict in bursts (structured re-segmentation) or merge do not hold N tokens step by step: their rows say
// "unsteady" with what the check found, and the timing is still the mean over the timed steps.
// Without a device it prints a message and exits 0. A bad argument exits 1 with the usage; a policy that fails
// (a CUDA or kvtrim error) is reported and the others still run; the exit status is then 1.
#include "bench_cuda_util.cuh"

#include <kvtrim/kvtrim.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <string>
#include <vector>

namespace {

using kvtrim::gpu::DeviceBuffer;

constexpr int kBatch = 32;   // steps queued behind the blocker at once (each step is at most ~8 launches)
constexpr int kWarmup = 20;  // decode steps after the prefill before timing

struct Setup {
  int H = 8, group = 4, d = 128, iters = 200, warmup = kWarmup;
  std::vector<int> lengths{4096, 16384, 32768};
  std::string device;
  std::size_t qw() const { return static_cast<std::size_t>(H) * group * d; }  // floats of q (and out) per token
  std::size_t kw() const { return static_cast<std::size_t>(H) * d; }          // floats of k (and v) per token
};

// Random token rows on the device: q [rows x qw], k and v [rows x kw], row-major, so that the first T rows are a
// prompt for prefill and any row serves as one decode step's input.
struct Inputs {
  std::size_t rows = 0;
  DeviceBuffer q, k, v, prefill_out, out;
  Inputs(const Setup& s, std::size_t n_rows, cudaStream_t st) : rows(n_rows) {
    q.allocate(sizeof(float) * rows * s.qw());
    k.allocate(sizeof(float) * rows * s.kw());
    v.allocate(sizeof(float) * rows * s.kw());
    prefill_out.allocate(sizeof(float) * rows * s.qw());
    out.allocate(sizeof(float) * s.qw());
    kvbench::fill_random<float>(q.as<float>(), rows * s.qw(), 11u, st);
    kvbench::fill_random<float>(k.as<float>(), rows * s.kw(), 12u, st);
    kvbench::fill_random<float>(v.as<float>(), rows * s.kw(), 13u, st);
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(st));
  }
};

struct Timing {
  double step_us = NAN, pipelined_us = NAN, host_us = NAN;
  bool timed_out = false;
  bool steady = true;
  std::string note;  // what the steady-state check found, when it failed
};

struct Ctx {
  const Setup& s;
  Inputs& in;
  kvbench::StreamBlocker& blocker;
  cudaEvent_t e0, e1;
  std::size_t next_row = 0;
};

// One cache of policy P over storage T: fill, warm up, time held and pipelined steps (see the top).
template <class T, class P>
Timing measure(Ctx& c, int N, bool baseline, const typename P::Params& params) {
  const Setup& s = c.s;
  kvtrim::CacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = s.H;
  cfg.n_q_heads = s.H * s.group;
  cfg.head_dim = s.d;
  cfg.check_finite = false;  // inputs are device pointers (the host cannot read them); they are finite
  const int fill = baseline ? N - s.warmup - s.iters / 2 : N;
  cfg.budget = baseline ? N + s.iters : N;
  kvtrim::KVCache<P, kvtrim::CudaBackend<T>> cache(cfg, params);
  auto& be = cache.backend();
  const cudaStream_t st = be.stream();
  const std::size_t qw = s.qw(), kw = s.kw();

  auto prefill = [&] {
    cache.reset();
    const std::size_t T_ = static_cast<std::size_t>(fill);
    cache.prefill(0, std::span<const float>(c.in.q.as<float>(), T_ * qw),
                  std::span<const float>(c.in.k.as<float>(), T_ * kw),
                  std::span<const float>(c.in.v.as<float>(), T_ * kw),
                  std::span<float>(c.in.prefill_out.as<float>(), T_ * qw));
  };
  auto step = [&] {
    const std::size_t r = c.next_row++ % c.in.rows;
    cache.decode(0, std::span<const float>(c.in.q.as<float>() + r * qw, qw),
                 std::span<const float>(c.in.k.as<float>() + r * kw, kw),
                 std::span<const float>(c.in.v.as<float>() + r * kw, kw), std::span<float>(c.in.out.as<float>(), qw));
  };
  auto warm = [&] {
    for (int i = 0; i < s.warmup; ++i) step();
    be.synchronize();
  };
  Timing t;
  // Steady state after `steps` timed steps: every head holds N tokens (baseline: fill + warmup + steps) and the
  // evicting policies evicted one token per step and head.
  auto check = [&](std::uint64_t evictions_before, int steps) {
    const int want = baseline ? fill + s.warmup + steps : N;
    const std::uint64_t evicted = cache.evictions() + cache.merges() - evictions_before;
    const std::uint64_t want_evicted = baseline ? 0 : static_cast<std::uint64_t>(steps) * s.H;
    for (int h = 0; h < s.H; ++h) {
      if (cache.size(0, h) != want) {
        t.steady = false;
        t.note = kvbench::format("KV head %d holds %d tokens, expected %d", h, cache.size(0, h), want);
        return;
      }
    }
    if (evicted != want_evicted) {
      t.steady = false;
      t.note = kvbench::format("%llu evictions in %d steps x %d KV heads, expected %llu",
                               static_cast<unsigned long long>(evicted), steps, s.H,
                               static_cast<unsigned long long>(want_evicted));
    }
  };

  // held: GPU time per step
  prefill();
  warm();
  std::uint64_t ev = cache.evictions() + cache.merges();
  const kvbench::StepTiming held = kvbench::time_blocked(st, c.blocker, c.e0, c.e1, s.iters, kBatch, step);
  be.synchronize();
  t.step_us = held.gpu_us;
  t.host_us = held.host_us;
  t.timed_out = held.timed_out;
  check(ev, s.iters);

  // pipelined: steps queued freely
  if (baseline) {
    prefill();
    warm();
  }
  ev = cache.evictions() + cache.merges();
  KVTRIM_CUDA_CHECK(cudaEventRecord(c.e0, st));
  for (int i = 0; i < s.iters; ++i) step();
  KVTRIM_CUDA_CHECK(cudaEventRecord(c.e1, st));
  be.synchronize();
  t.pipelined_us = kvbench::elapsed_ms(c.e0, c.e1) * 1e3 / s.iters;
  if (t.steady) check(ev, s.iters);
  return t;
}

struct Row {
  std::string policy, status;
  Timing t;
};

void print_header(const char* type, int N, const Setup& s) {
  std::printf("\n%s, N = %d kept tokens per KV head (K+V %.1f MiB per step)\n", type, N,
              static_cast<double>(N) * s.H * s.d * 2 * (type[0] == 'h' ? 2 : 4) / (1024.0 * 1024.0));
  std::printf("  %-22s %10s %10s %14s %10s %10s  %s\n", "policy", "step us", "vs full", "pipelined us", "vs full",
              "host us", "status");
}

double pct(double x, double base) { return 100.0 * (x - base) / base; }

void print_row(const Row& r, const Timing& full) {
  if (r.status == "error") {
    std::printf("  %-22s %10s %10s %14s %10s %10s  %s\n", r.policy.c_str(), "-", "-", "-", "-", "-",
                "error (see above)");
  } else {
    std::printf("  %-22s %10.1f %+9.1f%% %14.1f %+9.1f%% %10.1f  %s%s%s\n", r.policy.c_str(), r.t.step_us,
                pct(r.t.step_us, full.step_us), r.t.pipelined_us, pct(r.t.pipelined_us, full.pipelined_us),
                r.t.host_us, r.status.c_str(), r.t.note.empty() ? "" : ": ", r.t.note.c_str());
  }
  std::fflush(stdout);
}

void write_csv(kvbench::CsvFile& csv, const char* type, int N, const Setup& s, const Row& r, const Timing& full) {
  std::string line = kvbench::format("%s,%d,%s,%d,%d,%d,%d,", type, N, kvbench::csv_field(r.policy).c_str(), s.H,
                                     s.group, s.d, s.iters);
  if (r.status == "error")
    line += ",,,,,,,";
  else
    line += kvbench::format("%.3f,%.3f,%.2f,%.3f,%.3f,%.2f,%.3f,", r.t.step_us, full.step_us,
                            pct(r.t.step_us, full.step_us), r.t.pipelined_us, full.pipelined_us,
                            pct(r.t.pipelined_us, full.pipelined_us), r.t.host_us);
  csv.line(line + r.status + "," + kvbench::csv_field(s.device));
}

std::string status_of(const Timing& t) {
  if (!t.steady) return "unsteady";
  if (t.timed_out) return "blocker_timeout";
  return "ok";
}

// Measures policy P and prints / records its row.
template <class T, class P>
Row bench_policy(Ctx& c, int N, const typename P::Params& params, bool baseline) {
  Row r;
  r.policy = std::string(P::kName);
  try {
    r.t = measure<T, P>(c, N, baseline, params);
    r.status = status_of(r.t);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_policies: %s N=%d %s: %s\n", sizeof(T) == 2 ? "half" : "float", N,
                 r.policy.c_str(), e.what());
    r.status = "error";
  }
  return r;
}

template <class T>
bool run_type(const char* type, Ctx& c, kvbench::CsvFile& csv) {
  const Setup& s = c.s;
  bool ok = true;
  for (int N : s.lengths) {
    print_header(type, N, s);
    std::vector<Row> rows;
    rows.push_back(bench_policy<T, kvtrim::FullCache>(c, N, {}, true));
    const Timing full = rows[0].t;
    print_row(rows.back(), full);
    auto add = [&](Row r) {
      print_row(r, full);
      rows.push_back(std::move(r));
    };
    kvtrim::for_each_policy([&](const auto& entry) {
      using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
      if constexpr (!kvtrim::never_evicts_in_decode<P>() && !kvtrim::Entry<P>::kNeedsBasis)
        add(bench_policy<T, P>(c, N, entry.params(), false));
    });
    for (const Row& r : rows) {
      write_csv(csv, type, N, s, r, full);
      ok = ok && r.status != "error";
      if (r.status == "unsteady" || r.status == "blocker_timeout")
        std::fprintf(stderr, "bench_cuda_policies: warning: %s N=%d %s: %s%s%s\n", type, N, r.policy.c_str(),
                     r.status.c_str(), r.t.note.empty() ? "" : ": ", r.t.note.c_str());
    }
  }
  return ok;
}

const char* kUsage =
    "usage: bench_cuda_policies [kv_heads=8] [group=4] [head_dim=128] [iterations=200]\n"
    "                           [--lengths 4096,16384,32768] [--csv FILE]\n"
    "  head_dim: a multiple of 4, at most 256; each length must be at least 20 + iterations + 64\n";

}  // namespace

int main(int argc, char** argv) {
  Setup s;
  kvbench::Options opt;
  try {
    opt = kvbench::parse_options(argc, argv, 4, true);
    if (opt.help) {
      std::printf("%s", kUsage);
      return 0;
    }
    s.H = kvbench::positional_or(opt, 0, 8, "kv_heads", 1, 1024);
    s.group = kvbench::positional_or(opt, 1, 4, "group", 1, 64);
    s.d = kvbench::positional_or(opt, 2, 128, "head_dim", 4, 256);
    s.iters = kvbench::positional_or(opt, 3, 200, "iterations", 1, 100000);
    if (s.d % 4 != 0) throw std::invalid_argument("head_dim is " + std::to_string(s.d) + "; expected a multiple of 4");
    if (!opt.lengths.empty()) s.lengths = opt.lengths;
    for (int N : s.lengths)
      if (N < s.warmup + s.iters + 64)
        throw std::invalid_argument("length " + std::to_string(N) + " is too short for " + std::to_string(s.iters) +
                                    " iterations: expected at least warm-up (" + std::to_string(s.warmup) +
                                    ") + iterations + 64 = " + std::to_string(s.warmup + s.iters + 64));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_policies: %s\n%s", e.what(), kUsage);
    return 1;
  }
  if (kvtrim::gpu::device_count() == 0) {
    std::printf("bench_cuda_policies: no CUDA device; nothing to measure\n");
    return 0;
  }
  bool ok = true;
  try {
    cudaDeviceProp prop{};
    KVTRIM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    s.device = prop.name;
    kvbench::CsvFile csv(opt.csv,
                         "type,N,policy,kv_heads,group,head_dim,iterations,step_us,full_step_us,overhead_pct,"
                         "pipelined_us,full_pipelined_us,pipelined_overhead_pct,host_us,status,device");
    std::size_t max_n = 0;
    for (int N : s.lengths) max_n = std::max(max_n, static_cast<std::size_t>(N));
    cudaStream_t st = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    KVTRIM_CUDA_CHECK(cudaStreamCreate(&st));
    KVTRIM_CUDA_CHECK(cudaEventCreate(&e0));
    KVTRIM_CUDA_CHECK(cudaEventCreate(&e1));
    Inputs in(s, max_n, st);
    kvbench::StreamBlocker blocker;
    std::printf("device: %s; one layer, kv_heads %d, group %d, head_dim %d; %d timed decode steps after %d warm-up "
                "steps\n",
                prop.name, s.H, s.group, s.d, s.iters, s.warmup);
    std::printf("step = GPU time per decode step (steps queued behind a held stream, then run back to back); "
                "pipelined = steps queued freely;\nhost = host time to queue one step; vs full = difference to "
                "FullCache over the same number of tokens\n");
    Ctx c{s, in, blocker, e0, e1};
    ok = run_type<__half>("half", c, csv) && ok;
    ok = run_type<float>("float", c, csv) && ok;
    csv.close();
    if (!opt.csv.empty()) std::printf("\nCSV written to %s\n", opt.csv.c_str());
    KVTRIM_CUDA_CHECK(cudaEventDestroy(e0));
    KVTRIM_CUDA_CHECK(cudaEventDestroy(e1));
    KVTRIM_CUDA_CHECK(cudaStreamDestroy(st));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_policies: error: %s\n", e.what());
    return 1;
  }
  if (!ok) std::fprintf(stderr, "bench_cuda_policies: some policies failed (see the messages above)\n");
  return ok ? 0 : 1;
}
