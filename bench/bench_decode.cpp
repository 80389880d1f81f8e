// Decode attention on the CPU backend (FullCache, fp32) against the machine's streaming read bandwidth.
//
//   BM_ReadBandwidth            one sequential read of a 512 MiB buffer (the reference figure)
//   BM_DecodeAttention/d/g/n    one decode step of one KV head with g query heads over n kept tokens:
//                               KV_GBps = bytes of K and V read / time; bw_ratio = KV_GBps / read_GBps,
//                               where read_GBps is the best of 6 passes of the streaming read, measured in
//                               this process before the first attention benchmark; bw_ratio_best = the
//                               fastest single step against the same best read pass (best vs best)
//   BM_AttendKernel/fast/d/g/n  the attention kernel alone: the portable Eigen loops vs the dispatched path
//   BM_DecodeThreads/t          8 KV heads x 4 query heads, d 128, 8K tokens each (64 MiB of K+V), with
//                               CacheConfig::threads = t (wall time: the only figure that shows threads)
//
// Single-thread figures are CPU time of the benchmark thread (Google Benchmark's default), and so is the
// reference bandwidth: the machine these run on is shared, and wall time would count other processes.
//
// The cache is filled directly (HeadStore::append) so a 64K-token cache costs O(n d) to build, and the
// token a step appends is dropped again after the step (O(1)), so every step attends over n + 1 tokens.
#include "bench_util.hpp"

namespace {

using kvbench::Xorshift;

void BM_ReadBandwidth(benchmark::State& state) {
  const std::size_t bytes = std::size_t(512) << 20;
  std::vector<float> buf(bytes / sizeof(float));
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i & 1023) * 1e-3f;
  for (auto _ : state) {
    float s = kvbench::stream_sum(buf.data(), buf.size());
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
  state.counters["read_GBps_best_of_6"] = kvbench::read_bandwidth() * 1e-9;
}
BENCHMARK(BM_ReadBandwidth)->Unit(benchmark::kMillisecond)->MinTime(0.5);

void BM_DecodeAttention(benchmark::State& state) {
  const int d = static_cast<int>(state.range(0)), g = static_cast<int>(state.range(1));
  const int n = static_cast<int>(state.range(2));
  kvbench::read_bandwidth();  // measured before the first step, outside the timed region
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = g, .head_dim = d, .budget = n + 1};
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  Xorshift rng(42);
  kvbench::fill_direct(cache, n, rng);
  kvbench::Token tok(cfg, rng);
  auto& head = cache.backend().head(0, 0);
  double best = 1e30;  // fastest single step (CPU time): compared with the best read pass
  for (auto _ : state) {
    const double t0 = kvbench::thread_cpu_seconds();
    cache.decode(0, tok.q, tok.k, tok.v, tok.out);
    best = std::min(best, kvbench::thread_cpu_seconds() - t0);
    head.remove(head.size() - 1);  // back to n tokens (the new token is the last slot)
  }
  benchmark::DoNotOptimize(tok.out.data());
  const double bytes = kvbench::kv_bytes(n + 1, d, d);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * static_cast<double>(state.iterations())));
  state.counters["KV_MiB"] = bytes / (1 << 20);
  state.counters["KV_GBps"] =
      benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["read_GBps"] = kvbench::read_bandwidth() * 1e-9;
  // bw_ratio = KV_GBps / read_GBps: a rate counter divided by the (constant) reference bandwidth.
  state.counters["bw_ratio"] = benchmark::Counter(
      bytes / kvbench::read_bandwidth() * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["bw_ratio_best"] = bytes / best / kvbench::read_bandwidth();
}
BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"d", "g", "n"})
    ->ArgsProduct({{64, 128}, {1, 4}, {1024, 4096, 16384, 65536}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);

// The attention kernel alone on the same data: 0 = the portable Eigen loops (what the backend ran before
// the AVX2 path), 1 = what detail::attend dispatches to on this machine.
void BM_AttendKernel(benchmark::State& state) {
  const int impl = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const int g = static_cast<int>(state.range(2)), n = static_cast<int>(state.range(3));
  kvbench::read_bandwidth();
  Xorshift rng(3);
  std::vector<float> K = rng.vec(static_cast<std::size_t>(n) * d), V = rng.vec(K.size());
  std::vector<float> Q = rng.vec(static_cast<std::size_t>(g) * d), P(static_cast<std::size_t>(g) * n),
                     O(static_cast<std::size_t>(g) * d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (auto _ : state) {
    if (impl == 0)
      kvtrim::detail::attend_portable(K.data(), V.data(), n, d, d, Q.data(), g, scale, P.data(), O.data());
    else
      kvtrim::detail::attend(K.data(), V.data(), n, d, d, Q.data(), g, scale, P.data(), O.data());
    benchmark::DoNotOptimize(O.data());
  }
  const double bytes = kvbench::kv_bytes(n, d, d);
  state.counters["KV_GBps"] =
      benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["bw_ratio"] = benchmark::Counter(
      bytes / kvbench::read_bandwidth() * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_AttendKernel)
    ->ArgNames({"fast", "d", "g", "n"})
    ->ArgsProduct({{0, 1}, {128}, {1, 4}, {4096, 65536}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);

void BM_DecodeThreads(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const int n = 8192;
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 8, .n_q_heads = 32, .head_dim = 128, .budget = n + 1};
  cfg.threads = threads;
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  Xorshift rng(7);
  kvbench::fill_direct(cache, n, rng);
  kvbench::Token tok(cfg, rng);
  std::vector<float> row;
  for (auto _ : state) {
    cache.decode(0, tok.q, tok.k, tok.v, tok.out);
    kvbench::hold_size(cache, n, rng, row);
  }
  const double bytes = 8 * kvbench::kv_bytes(n + 1, 128, 128);
  state.counters["KV_MiB"] = bytes / (1 << 20);
  state.counters["KV_GBps"] =
      benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeThreads)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();
