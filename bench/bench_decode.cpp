// Decode attention on the CPU backend against the machine's streaming read bandwidth.
//
//   BM_ReadBandwidth            one sequential read of a 512 MiB buffer (the reference figure)
//   BM_DecodeAttention/<type>/d/g/n
//                               one decode step of one KV head (KVCache<FullCache, CpuBackend<type>>: keys and
//                               values stored as float, half or bf16) with g query heads over n kept tokens:
//                               KV_GBps = bytes of K and V read / time (n x (dk + dv) x sizeof(type)); bw_ratio = KV_GBps /
//                               read_GBps, where read_GBps is the best of 6 passes of the streaming read,
//                               measured in this process before the first attention benchmark;
//                               bw_ratio_median and bw_ratio_best = the median and the fastest single step
//                               against the same best read pass (on a shared host the mean carries the
//                               steps that other tenants slowed down; the median does not)
//   BM_Attend/<type>/path/d/g/n the decode kernel alone (detail::attend) on keys and values stored as
//                               <type> (float, half, bf16) by one path: 0 portable, 1 AVX2, 2 AVX-512
//                               (detail::AttendPath; a path this CPU cannot run reports an error).
//                               KV_GBps counts the bytes actually read, n x (dk + dv) x sizeof(type),
//                               so 16-bit storage reads half the bytes of fp32;
//                               bw_ratio (mean step), bw_ratio_median and bw_ratio_best (fastest step) are
//                               against read_GBps as above. Probabilities and outputs are not counted.
//   BM_DecodeThreads/t          8 KV heads x 4 query heads, d 128, 8K tokens each (64 MiB of K+V), with
//                               CacheConfig::threads = t (wall time: the only figure that shows threads)
//
// Single-thread figures are CPU time of the benchmark thread (Google Benchmark's default), and so is the
// reference bandwidth: the machine these run on is shared, and wall time would count other processes.
// K and V larger than the last-level cache (32 MiB here) are read from DRAM on every step; smaller ones stay
// in cache between steps, and their ratios above 1 are cache bandwidth.
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

template <class T>
void BM_DecodeAttention(benchmark::State& state) {
  const int d = static_cast<int>(state.range(0)), g = static_cast<int>(state.range(1));
  const int n = static_cast<int>(state.range(2));
  kvbench::read_bandwidth();  // measured before the first step, outside the timed region
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = g, .head_dim = d, .budget = n + 1};
  kvtrim::KVCache<kvtrim::FullCache, kvtrim::CpuBackend<T>> cache(cfg);
  Xorshift rng(42);
  kvbench::fill_direct(cache, n, rng);
  kvbench::Token tok(cfg, rng);
  auto& head = cache.backend().head(0, 0);
  std::vector<double> steps;  // CPU time of each step
  steps.reserve(1 << 20);     // no allocation between steps
  for (auto _ : state) {
    const double t0 = kvbench::thread_cpu_seconds();
    cache.decode(0, tok.q, tok.k, tok.v, tok.out);
    steps.push_back(kvbench::thread_cpu_seconds() - t0);
    head.remove(head.size() - 1);  // back to n tokens (the new token is the last slot)
  }
  const double best = *std::min_element(steps.begin(), steps.end()), med = kvbench::median(steps);
  benchmark::DoNotOptimize(tok.out.data());
  const double bytes = kvbench::kv_bytes<T>(n + 1, d, d);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * static_cast<double>(state.iterations())));
  state.counters["KV_MiB"] = bytes / (1 << 20);
  state.counters["KV_GBps"] =
      benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["read_GBps"] = kvbench::read_bandwidth() * 1e-9;
  // bw_ratio = KV_GBps / read_GBps: a rate counter divided by the (constant) reference bandwidth.
  state.counters["bw_ratio"] = benchmark::Counter(
      bytes / kvbench::read_bandwidth() * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["bw_ratio_median"] = bytes / med / kvbench::read_bandwidth();
  state.counters["bw_ratio_best"] = bytes / best / kvbench::read_bandwidth();
}
void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "g", "n"})->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  b->ArgsProduct({{64, 128}, {1, 4}, {1024, 4096, 16384, 65536, 131072}});
}
BENCHMARK_TEMPLATE(BM_DecodeAttention, float)->Name("BM_DecodeAttention/float")->Apply(decode_args);
BENCHMARK_TEMPLATE(BM_DecodeAttention, kvtrim::half)->Name("BM_DecodeAttention/half")->Apply(decode_args);
BENCHMARK_TEMPLATE(BM_DecodeAttention, kvtrim::bfloat16)->Name("BM_DecodeAttention/bf16")->Apply(decode_args);

// The decode kernel alone, keys and values stored as T.
template <class T>
void BM_Attend(benchmark::State& state) {
  using kvtrim::detail::AttendPath;
  const auto path = static_cast<AttendPath>(state.range(0));
  const int d = static_cast<int>(state.range(1)), g = static_cast<int>(state.range(2));
  const int n = static_cast<int>(state.range(3));
  if (!kvtrim::detail::attend_available<T>(path)) {
    state.SkipWithError("this path does not run on this machine");
    return;
  }
  kvbench::read_bandwidth();  // measured before the first step, outside the timed region
  Xorshift rng(3);
  std::vector<T> K(static_cast<std::size_t>(n) * d), V(K.size());
  for (auto* x : {&K, &V})
    for (auto& e : *x) e = kvtrim::from_float<T>(rng.next());
  std::vector<float> Q = rng.vec(static_cast<std::size_t>(g) * d), P(static_cast<std::size_t>(g) * n),
                     O(static_cast<std::size_t>(g) * d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<double> steps;
  steps.reserve(1 << 20);  // no allocation between steps
  for (auto _ : state) {
    const double t0 = kvbench::thread_cpu_seconds();
    kvtrim::detail::attend(path, K.data(), V.data(), n, d, d, Q.data(), g, scale, P.data(), O.data());
    steps.push_back(kvbench::thread_cpu_seconds() - t0);
    benchmark::DoNotOptimize(O.data());
  }
  const double bytes = static_cast<double>(n) * (d + d) * sizeof(T), bw = kvbench::read_bandwidth();
  const double med = kvbench::median(steps), best = *std::min_element(steps.begin(), steps.end());
  state.counters["KV_MiB"] = bytes / (1 << 20);
  state.counters["KV_GBps"] =
      benchmark::Counter(bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["read_GBps"] = bw * 1e-9;
  state.counters["bw_ratio"] =
      benchmark::Counter(bytes / bw * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["us_median"] = med * 1e6;
  state.counters["bw_ratio_median"] = bytes / med / bw;
  state.counters["bw_ratio_best"] = bytes / best / bw;
}
// Every storage type at group 4, d 64 and 128, 4K to 128K tokens, by both x86 paths; the portable path for
// comparison at 4K and 64K; group 1 (MHA) at d 128 for float.
void attend_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"path", "d", "g", "n"})->Unit(benchmark::kMicrosecond)->MinTime(0.2);
  for (int path : {1, 2})
    for (int d : {64, 128})
      for (int n : {4096, 16384, 65536, 131072}) b->Args({path, d, 4, n});
  for (int d : {64, 128})
    for (int n : {4096, 65536}) b->Args({0, d, 4, n});
}
BENCHMARK_TEMPLATE(BM_Attend, float)->Name("BM_Attend/float")->Apply(attend_args)->Args({2, 128, 1, 65536});
BENCHMARK_TEMPLATE(BM_Attend, kvtrim::half)->Name("BM_Attend/half")->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_Attend, kvtrim::bfloat16)->Name("BM_Attend/bf16")->Apply(attend_args);

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
