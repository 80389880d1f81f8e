// Shared helpers for kvtrim's Google Benchmark programs: the machine's streaming read bandwidth (measured
// in the same process), cheap deterministic data, a FullCache filled without paying O(n^2) attention, a
// policy wrapper that times the policy's own hooks, and the list of policies that exist in this tree.
#pragma once

#include <benchmark/benchmark.h>

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVBENCH_X86 1
#endif

// Policies appear here as their headers land (each block compiles only when the header exists).
#if __has_include(<kvtrim/policies/h2o.hpp>)
#include <kvtrim/policies/h2o.hpp>
#define KVBENCH_HAS_H2O 1
#endif
#if __has_include(<kvtrim/policies/tova.hpp>)
#include <kvtrim/policies/tova.hpp>
#define KVBENCH_HAS_TOVA 1
#endif
#if __has_include(<kvtrim/policies/snapkv.hpp>)
#include <kvtrim/policies/snapkv.hpp>
#define KVBENCH_HAS_SNAPKV 1
#endif
#if __has_include(<kvtrim/policies/l2_norm.hpp>)
#include <kvtrim/policies/l2_norm.hpp>
#define KVBENCH_HAS_L2 1
#endif
#if __has_include(<kvtrim/policies/hash_evict.hpp>)
#include <kvtrim/policies/hash_evict.hpp>
#define KVBENCH_HAS_HASH 1
#endif
#if __has_include(<kvtrim/policies/buzz.hpp>)
#include <kvtrim/policies/buzz.hpp>
#define KVBENCH_HAS_BUZZ 1
#endif
#if __has_include(<kvtrim/policies/ems.hpp>)
#include <kvtrim/policies/ems.hpp>
#define KVBENCH_HAS_EMS 1
#endif
#if __has_include(<kvtrim/policies/eigen_attention.hpp>)
#include <kvtrim/policies/eigen_attention.hpp>
#define KVBENCH_HAS_EIGEN 1
#endif

namespace kvbench {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
// CPU time of the calling thread. The single-core figures use CPU time (as Google Benchmark does by
// default): the build machine is shared, and wall time would count the time other processes held the core.
inline double thread_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// ---- streaming read bandwidth -------------------------------------------------------------------------

#ifdef KVBENCH_X86
__attribute__((target("avx2"))) inline float sum_avx2(const float* x, std::size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0;
  for (float e : t) s += e;
  for (; i < n; ++i) s += x[i];
  return s;
}
#endif

// Sum of x[0..n): one sequential read of every byte (the simplest streaming read a core can do).
inline float stream_sum(const float* x, std::size_t n) {
#ifdef KVBENCH_X86
  if (__builtin_cpu_supports("avx2")) return sum_avx2(x, n);
#endif
  float s[8] = {};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j];
  float t = 0;
  for (float e : s) t += e;
  for (; i < n; ++i) t += x[i];
  return t;
}

// Single-core streaming read bandwidth in bytes/s (per CPU second of this thread) over a buffer far larger
// than the last-level cache: the best of several passes (the machine is shared; the best pass is the
// closest to what one core can do).
inline double measure_read_bandwidth(std::size_t bytes = std::size_t(512) << 20, int passes = 6) {
  std::vector<float> buf(bytes / sizeof(float));
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i & 1023) * 1e-3f;
  double best = 0;
  for (int p = 0; p < passes; ++p) {
    const double t0 = thread_cpu_seconds();
    float s = stream_sum(buf.data(), buf.size());
    benchmark::DoNotOptimize(s);
    best = std::max(best, static_cast<double>(bytes) / (thread_cpu_seconds() - t0));
  }
  return best;
}

// Measured once per process, on first use (so every benchmark of a run compares against the same figure).
inline double read_bandwidth() {
  static const double bw = measure_read_bandwidth();
  return bw;
}

// Bytes a decode step reads from K and V of one KV head holding n tokens (fp32).
inline double kv_bytes(int n, int dk, int dv) { return static_cast<double>(n) * (dk + dv) * sizeof(float); }

// ---- data -----------------------------------------------------------------------------------------------

// Deterministic values in [-1, 1) (xorshift), cheap enough to fill hundreds of MB.
struct Xorshift {
  std::uint64_t s;
  explicit Xorshift(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  float next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<float>(static_cast<std::int64_t>(s >> 40) - (1 << 23)) / static_cast<float>(1 << 23);
  }
  void fill(float* x, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) x[i] = next();
  }
  std::vector<float> vec(std::size_t n) {
    std::vector<float> v(n);
    fill(v.data(), n);
    return v;
  }
};

// One decode token for a cache shape.
struct Token {
  std::vector<float> q, k, v, out;
  Token(const kvtrim::CacheConfig& c, Xorshift& rng)
      : q(rng.vec(static_cast<std::size_t>(c.n_q_heads) * c.head_dim)),
        k(rng.vec(static_cast<std::size_t>(c.n_kv_heads) * c.head_dim)),
        v(rng.vec(static_cast<std::size_t>(c.n_kv_heads) * c.head_dim)),
        out(static_cast<std::size_t>(c.n_q_heads) * c.head_dim) {}
  void refresh(Xorshift& rng) {  // new q, k, v without allocating
    rng.fill(q.data(), q.size());
    rng.fill(k.data(), k.size());
    rng.fill(v.data(), v.size());
  }
};

// Puts n random tokens straight into every head of a FullCache (positions 0..n-1), in O(n d): the
// attention benchmarks need large caches without streaming n decode steps through them first.
template <class Cache>
void fill_direct(Cache& cache, int n, Xorshift& rng) {
  const auto& c = cache.config();
  std::vector<float> k(static_cast<std::size_t>(c.head_dim)), v(k.size());
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      auto& head = cache.backend().head(l, h);
      for (int t = 0; t < n; ++t) {
        rng.fill(k.data(), k.size());
        rng.fill(v.data(), v.size());
        head.append(k.data(), v.data(), t);
      }
    }
}

// Keeps every head of a FullCache at exactly n tokens: drops the newest (the last slot: FullCache never
// reorders) or appends random tokens. O(1) per dropped token.
template <class Cache>
void hold_size(Cache& cache, int n, Xorshift& rng, std::vector<float>& row) {
  const auto& c = cache.config();
  row.resize(static_cast<std::size_t>(c.head_dim));
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      auto& head = cache.backend().head(l, h);
      while (head.size() > n) head.remove(head.size() - 1);
      while (head.size() < n) {
        rng.fill(row.data(), row.size());
        head.append(row.data(), row.data(), head.newest_pos() + 1);
      }
    }
}

// ---- timing a policy's own work ------------------------------------------------------------------------

// Seconds spent inside the wrapped policy's decode hooks (and projections) while `enabled`.
struct HookClock {
  double seconds = 0;
  bool enabled = false;
};
inline HookClock& hook_clock() {
  static HookClock c;
  return c;
}

template <class P>
concept Projects = requires(const P& p, const float* in, float* out) {
  p.key_width(0);
  p.project_key(0, in, out);
};
template <class P>
struct NeverEvictsTag {};
template <class P>
  requires requires { P::kNeverEvicts; }
struct NeverEvictsTag<P> {
  static constexpr bool kNeverEvicts = P::kNeverEvicts;
};

// Forwards everything to P and adds the time spent in on_insert, on_attention, evict (and, for policies
// with low-rank storage, the projections) to hook_clock() when it is enabled. The hooks see the same
// HeadStore type as P's, so the wrapped cache behaves exactly like KVCache<P>.
template <class P>
struct Timed : NeverEvictsTag<P> {
  using Params = typename P::Params;
  using SlotMeta = typename P::SlotMeta;
  using HeadState = typename P::HeadState;
  using Head = kvtrim::HeadOf<P>;
  static constexpr std::string_view kName = P::kName;
  static constexpr kvtrim::Signals kSignals = P::kSignals;
  static constexpr kvtrim::EvictTiming kTiming = P::kTiming;

  Timed(const Params& p, const kvtrim::LayerContext& ctx) : inner(p, ctx) {}
  int prompt_window() const { return inner.prompt_window(); }
  template <class F>
  static void timed(F&& f) {
    HookClock& c = hook_clock();
    if (!c.enabled) return f();
    const auto t0 = Clock::now();
    f();
    c.seconds += seconds_since(t0);
  }
  void on_insert(HeadState& s, Head& h, const kvtrim::StepContext& st) {
    timed([&] { inner.on_insert(s, h, st); });
  }
  void on_attention(HeadState& s, Head& h, const kvtrim::StepContext& st, const kvtrim::AttentionRows& r) {
    timed([&] { inner.on_attention(s, h, st, r); });
  }
  void evict(HeadState& s, Head& h, const kvtrim::StepContext& st) {
    timed([&] { inner.evict(s, h, st); });
  }
  void on_prompt(HeadState& s, Head& h, const kvtrim::PromptContext& pr) { inner.on_prompt(s, h, pr); }

  int key_width(int kv) const requires Projects<P> { return inner.key_width(kv); }
  int value_width(int kv) const requires Projects<P> { return inner.value_width(kv); }
  void project_key(int kv, const float* in, float* out) const requires Projects<P> {
    timed([&] { inner.project_key(kv, in, out); });
  }
  void project_value(int kv, const float* in, float* out) const requires Projects<P> {
    timed([&] { inner.project_value(kv, in, out); });
  }
  void project_queries(int kv, int g, const float* in, float* out) const requires Projects<P> {
    timed([&] { inner.project_queries(kv, g, in, out); });
  }
  void unproject_outputs(int kv, int g, const float* in, float* out) const requires Projects<P> {
    timed([&] { inner.unproject_outputs(kv, g, in, out); });
  }

  P inner;
};

// Parameters a benchmark uses for P: the defaults, except where the defaults need a larger budget than
// the smallest one benchmarked (BUZZ's official window 160 + threshold 400 needs 564: derive both from
// the budget instead, in the official 2:5 proportion).
template <class P>
typename P::Params bench_params() {
  return {};
}
#ifdef KVBENCH_HAS_BUZZ
template <>
inline kvtrim::Buzz<>::Params bench_params<kvtrim::Buzz<>>() {
  kvtrim::Buzz<>::Params p;
  p.window = 0;
  p.threshold = 0;
  return p;
}
#endif

// Median of a sample (copies; not on a timed path).
inline double median(std::vector<double> x) {
  if (x.empty()) return 0;
  std::nth_element(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(x.size() / 2), x.end());
  return x[x.size() / 2];
}

// The machine's read bandwidth as a counter, so every line of the output carries the reference figure.
inline void report_bandwidth(benchmark::State& state, double bytes_per_step, double seconds_per_step) {
  const double bw = read_bandwidth();
  const double achieved = bytes_per_step / seconds_per_step;
  state.counters["KV_GBps"] = achieved * 1e-9;
  state.counters["read_GBps"] = bw * 1e-9;
  state.counters["bw_ratio"] = achieved / bw;
}

}  // namespace kvbench

// Calls M(Type, "name") for every evicting policy present in this tree (FullCache is the reference).
#define KVBENCH_EVICTING_BASE(M) M(kvtrim::StreamingLLM, streaming)
#ifdef KVBENCH_HAS_H2O
#define KVBENCH_P_H2O(M) M(kvtrim::H2O, h2o)
#else
#define KVBENCH_P_H2O(M)
#endif
#ifdef KVBENCH_HAS_TOVA
#define KVBENCH_P_TOVA(M) M(kvtrim::TOVA, tova)
#else
#define KVBENCH_P_TOVA(M)
#endif
#ifdef KVBENCH_HAS_SNAPKV
#define KVBENCH_P_SNAPKV(M) M(kvtrim::SnapKV<kvtrim::StreamingLLM>, snapkv_streaming)
#else
#define KVBENCH_P_SNAPKV(M)
#endif
#ifdef KVBENCH_HAS_L2
#define KVBENCH_P_L2(M) M(kvtrim::L2Norm, l2_norm)
#else
#define KVBENCH_P_L2(M)
#endif
#ifdef KVBENCH_HAS_HASH
#define KVBENCH_P_HASH(M) M(kvtrim::HashEvict, hash_evict)
#else
#define KVBENCH_P_HASH(M)
#endif
#ifdef KVBENCH_HAS_BUZZ
#define KVBENCH_P_BUZZ(M) M(kvtrim::Buzz<>, buzz)
#else
#define KVBENCH_P_BUZZ(M)
#endif
#ifdef KVBENCH_HAS_EMS
#define KVBENCH_P_EMS(M) M(kvtrim::Ems, ems)
#else
#define KVBENCH_P_EMS(M)
#endif
// EigenAttention needs a calibrated basis (Params::basis), so it is not in the generic list.
#define KVBENCH_P_EIGEN(M)
#define KVBENCH_FOR_EACH_EVICTING(M)                                                                      \
  KVBENCH_EVICTING_BASE(M)                                                                                \
  KVBENCH_P_H2O(M) KVBENCH_P_TOVA(M) KVBENCH_P_SNAPKV(M) KVBENCH_P_L2(M) KVBENCH_P_HASH(M) KVBENCH_P_BUZZ(M) \
      KVBENCH_P_EMS(M) KVBENCH_P_EIGEN(M)
