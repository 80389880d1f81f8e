// Shared helpers for kvtrim's Google Benchmark programs: the machine's streaming read bandwidth (measured
// in the same process), cheap deterministic data, and a FullCache filled without paying O(n^2) attention.
// The list of policies is the registry's (kvtrim/registry.hpp).
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
// Bytes of n keys and values stored as T.
template <class T = float>
double kv_bytes(int n, int dk, int dv) {
  return static_cast<double>(n) * (dk + dv) * sizeof(T);
}

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
