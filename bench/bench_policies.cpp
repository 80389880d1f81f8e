// Per-policy costs on the CPU backend (one core, CPU time of the benchmark thread).
//
//   BM_Step_<policy>/budget/d   one decode step of one KV head (4 query heads) in steady state at the
//       given budget. Each iteration runs the policy's step and then the same step with FullCache holding
//       exactly as many tokens as the policy's step attended over (same shapes, same kernel). Counters:
//         step_us, full_us     medians of the two
//         bookkeeping_share    (step - full) / step: everything the policy adds to a decode step
//                              (scoring, selection, state update, merges, and their cache misses)
//         kept                 tokens the step attended over
//       cold = 0: caches warm (the head's K, V and metadata stay in L2/L3 from step to step: the fastest
//       attention gets, so the shares are upper bounds). cold = 1: a 64 MiB read evicts the caches before
//       each measured step (policy and FullCache alike), as in a model whose KV cache exceeds the
//       last-level cache and each (layer, KV head) is visited once per token.
//       The policy cache is primed by a prefill of budget + 64 random tokens (so the prompt compression
//       ran) and 64 decode steps.
//   BM_Scaling_<policy>   budget 1024, d 64, 4 query heads: the median step after 4K, 16K and 64K tokens of
//       history streamed through decode (copies of the cache taken at each mark are then stepped in turn,
//       512 rounds, so machine noise hits the three alike); ratio_16k, ratio_64k = step / step at 4K
//       (target <= 1.1), and mem_ratio_64k = bytes reserved at 64K / at 4K.
//   BM_Prefill_<policy>/T  prompt of T tokens (d 128, one query head per KV head), budget T/4 (FullCache:
//       T), compression included: tokens_per_s.
//   Every registered policy that needs no calibration runs, with the registry's parameters (registry.hpp).
#include <kvtrim/registry.hpp>

#include "bench_util.hpp"

namespace {

using kvbench::Xorshift;

constexpr int kGroup = 4;

// Never-evicting policies (in decode) are benchmarked at a fixed size: the newest token leaves after each step.
template <class P>
constexpr bool kNeverEvicts = kvtrim::never_evicts_in_decode<P>();

template <class Cache>
double timed_decode(Cache& cache, kvbench::Token& tok) {
  const double t0 = kvbench::thread_cpu_seconds();
  cache.decode(0, tok.q, tok.k, tok.v, tok.out);
  return kvbench::thread_cpu_seconds() - t0;
}

// Evicts the caches: reads a buffer twice the size of a 32 MiB last-level cache.
void flush_caches() {
  static std::vector<float> junk(std::size_t(64) << 18, 1.0f);  // 64 MiB
  float s = kvbench::stream_sum(junk.data(), junk.size());
  benchmark::DoNotOptimize(s);
}

template <class P>
void BM_Step(benchmark::State& state, typename P::Params params) {
  const int budget = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const bool cold = state.range(2) != 0;
  constexpr bool kFull = kNeverEvicts<P>;
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = kGroup, .head_dim = d,
                          .budget = kFull ? budget + 1 : budget};
  kvtrim::KVCache<P> cache(cfg, params);
  kvtrim::CacheConfig full_cfg = cfg;
  full_cfg.budget = budget + 2;
  kvtrim::KVCache<kvtrim::FullCache> full(full_cfg);
  Xorshift rng(11);
  std::vector<float> row;
  if constexpr (kFull) {
    kvbench::fill_direct(cache, budget, rng);
  } else {
    const int T = budget + 64;
    auto Q = rng.vec(static_cast<std::size_t>(T) * kGroup * d), K = rng.vec(static_cast<std::size_t>(T) * d),
         V = rng.vec(static_cast<std::size_t>(T) * d);
    std::vector<float> out(Q.size());
    cache.prefill(0, Q, K, V, out);
  }
  kvbench::fill_direct(full, budget, rng);
  kvbench::Token tok(cfg, rng);
  auto& head = cache.backend().head(0, 0);
  for (int i = 0; i < 64; ++i) {
    tok.refresh(rng);
    cache.decode(0, tok.q, tok.k, tok.v, tok.out);
    if constexpr (kFull) head.remove(head.size() - 1);
  }
  std::vector<double> pol, ref;
  pol.reserve(1024), ref.reserve(1024);
  int attended = 0;
  for (auto _ : state) {
    tok.refresh(rng);
    const int before = head.size();
    if (cold) flush_caches();
    const double t = timed_decode(cache, tok);
    if constexpr (kFull) head.remove(head.size() - 1);
    attended = P::kTiming == kvtrim::EvictTiming::kAfterAttention ? before + 1 : head.size();
    pol.push_back(t);
    state.SetIterationTime(t);
    // The same step with FullCache over exactly as many tokens.
    kvbench::hold_size(full, attended - 1, rng, row);
    if (cold) flush_caches();
    ref.push_back(timed_decode(full, tok));
  }
  const double step = kvbench::median(pol), base = kvbench::median(ref);
  state.counters["step_us"] = step * 1e6;
  state.counters["full_us"] = base * 1e6;
  state.counters["bookkeeping_share"] = step > 0 ? (step - base) / step : 0;
  state.counters["kept"] = attended;
}

template <class P>
void BM_Scaling(benchmark::State& state, typename P::Params params) {
  const int budget = 1024, d = 64;
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = kGroup, .head_dim = d, .budget = budget};
  Xorshift rng(21);
  for (auto _ : state) {
    kvtrim::KVCache<P> cache(cfg, params);
    kvbench::Token tok(cfg, rng);
    {
      const int T = budget;
      auto Q = rng.vec(static_cast<std::size_t>(T) * kGroup * d), K = rng.vec(static_cast<std::size_t>(T) * d),
           V = rng.vec(static_cast<std::size_t>(T) * d);
      std::vector<float> out(Q.size());
      cache.prefill(0, Q, K, V, out);
    }
    // Stream to 4K, 16K and 64K tokens of history, keeping a copy of the cache at each mark; then time the
    // three caches in turn, step by step, so that whatever else the machine does hits all three alike.
    const int marks[] = {4096, 16384, 65536};
    std::vector<kvtrim::KVCache<P>> at;
    at.reserve(3);
    double mem[3] = {};
    int t = budget;
    for (int m = 0; m < 3; ++m) {
      for (; t < marks[m]; ++t) {
        tok.refresh(rng);
        cache.decode(0, tok.q, tok.k, tok.v, tok.out);
      }
      at.push_back(cache);
      mem[m] = static_cast<double>(cache.bytes_reserved());
    }
    constexpr int kRounds = 512;
    std::vector<double> samples[3];
    for (auto& v : samples) v.reserve(kRounds);
    for (int r = 0; r < kRounds; ++r)
      for (int m = 0; m < 3; ++m) {
        tok.refresh(rng);
        samples[m].push_back(timed_decode(at[static_cast<std::size_t>(m)], tok));
      }
    double med[3];
    for (int m = 0; m < 3; ++m) med[m] = kvbench::median(samples[m]);
    state.SetIterationTime(med[2]);
    state.counters["us_4k"] = med[0] * 1e6;
    state.counters["us_16k"] = med[1] * 1e6;
    state.counters["us_64k"] = med[2] * 1e6;
    state.counters["ratio_16k"] = med[1] / med[0];
    state.counters["ratio_64k"] = med[2] / med[0];
    state.counters["mem_ratio_64k"] = mem[2] / mem[0];
  }
}

template <class P>
void BM_Prefill(benchmark::State& state, typename P::Params params) {
  const int T = static_cast<int>(state.range(0)), d = 128;
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = d,
                          .budget = kNeverEvicts<P> ? T : std::max(128, T / 4)};
  kvtrim::KVCache<P> cache(cfg, params);
  Xorshift rng(31);
  auto Q = rng.vec(static_cast<std::size_t>(T) * d), K = rng.vec(Q.size()), V = rng.vec(Q.size());
  std::vector<float> out(Q.size());
  for (auto _ : state) {
    state.PauseTiming();
    cache.reset();
    state.ResumeTiming();
    cache.prefill(0, Q, K, V, out);
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(T) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["kept"] = cache.size(0, 0);
}

// Every registered policy that needs no calibrated basis, with the registry's parameters.
void register_all() {
  kvtrim::for_each_policy([](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    if constexpr (!kvtrim::Entry<P>::kNeedsBasis) {
      const std::string name(entry.name());
      const auto params = entry.params();
      for (int cold : {0, 1})
        benchmark::RegisterBenchmark(("BM_Step_" + name).c_str(), BM_Step<P>, params)
            ->ArgNames({"budget", "d", "cold"})
            ->ArgsProduct({{256, 1024, 4096}, {64, 128}, {cold}})
            ->UseManualTime()
            ->Iterations(cold ? 60 : 400)
            ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("BM_Prefill_" + name).c_str(), BM_Prefill<P>, params)
          ->ArgName("T")
          ->Arg(512)
          ->Arg(2048)
          ->Arg(8192)
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.1);
      if constexpr (!kNeverEvicts<P>)
        benchmark::RegisterBenchmark(("BM_Scaling_" + name).c_str(), BM_Scaling<P>, params)
            ->UseManualTime()
            ->Iterations(1)
            ->Unit(benchmark::kMicrosecond);
    }
  });
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
