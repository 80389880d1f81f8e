// kvtrim: the CPU backend.
//
// Storage is one HeadStore per (layer, KV head). Decode attention reads each kept key and value once for
// the whole query group (GQA), accumulates in fp32 with a max-subtracted softmax, and writes the
// probabilities into a scratch buffer that policies read: no second pass over K or V, no allocation.
// Prefill computes exact causal attention in blocks of query rows (Eigen) and sums the probability
// columns that score-based policies need.
//
// Decode kernels: on x86-64 with GCC or Clang, a hand-vectorised AVX2+FMA path is chosen at run time when
// the CPU has it (the library is built without -march flags, so the compiler alone would use SSE2 only);
// elsewhere a portable Eigen path runs. Both compute the same thing with the same reduction structure per
// query; results differ only by fp32 rounding (a few ulp). Memory traffic per step and KV head: every key
// row once (scores of all g queries of the group, in tiles of keys that stay in L1), the g x n
// probabilities (L2), every value row once (tiles of values reused from L1 for all queries and columns).
//
// Threads: CacheConfig::threads > 1 runs the KV heads of a decode step (and the attention part of a
// prefill) on a small pool of persistent threads. Heads are independent (per-head state lives in HeadState
// and HeadStore, scratch buffers are per thread), so the results are identical to one thread.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "head_store.hpp"
#include "policy.hpp"

#if !defined(KVTRIM_NO_SIMD) && !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__x86_64__)
#define KVTRIM_X86_AVX2_DISPATCH 1
#include <immintrin.h>
#endif

namespace kvtrim {

namespace detail {

// softmax of row[0..n) in place (fp32, max-subtracted); n >= 1.
inline void softmax_inplace(float* row, int n) {
  Eigen::Map<Eigen::ArrayXf> r(row, n);
  const float m = r.maxCoeff();
  r = (r - m).exp();
  r /= r.sum();
}

// Decode attention of one KV head, portable version: g queries Q [g x dk] over n keys K [n x dk] and
// values V [n x dv] (rows contiguous); probabilities into P [g x n], output into O [g x dv].
inline void attend_portable(const float* K, const float* V, int n, int dk, int dv, const float* Q, int g,
                            float scale, float* P, float* O) {
  using Rows = Eigen::Map<const RowMajorMatrixXf>;
  Rows Qg(Q, g, dk), Ks(K, n, dk), Vs(V, n, dv);
  Eigen::Map<RowMajorMatrixXf> probs(P, g, n);
  for (int i = 0; i < n; ++i)  // one pass over K: every key row meets all g queries while it is in cache
    for (int gi = 0; gi < g; ++gi) probs(gi, i) = Qg.row(gi).dot(Ks.row(i)) * scale;
  for (int gi = 0; gi < g; ++gi) softmax_inplace(probs.row(gi).data(), n);
  Eigen::Map<RowMajorMatrixXf> Out(O, g, dv);
  Out.setZero();
  for (int i = 0; i < n; ++i)
    for (int gi = 0; gi < g; ++gi) Out.row(gi) += probs(gi, i) * Vs.row(i);
}

#ifdef KVTRIM_X86_AVX2_DISPATCH
namespace avx2 {

#define KVTRIM_AVX2_FN __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define KVTRIM_UNROLL _Pragma("unroll")
#else
#define KVTRIM_UNROLL _Pragma("GCC unroll 16")
#endif

// Horizontal sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
KVTRIM_AVX2_FN inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: partial sums of a, b, c, d
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// exp(x) for x <= 88 (Cephes-style: x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1-2 ulp).
// Inputs below ln(FLT_MIN) give 0 (so -inf gives 0).
KVTRIM_AVX2_FN inline __m256 exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Scores of QB queries (rows of Q, stride d) against KB consecutive keys (rows of K, stride d), scaled,
// written to S[a * stride + j].
template <int QB, int KB>
KVTRIM_AVX2_FN inline void score_block(const float* Q, const float* K, int d, float scale, float* S, int stride) {
  __m256 acc[QB * KB];
  KVTRIM_UNROLL for (int x = 0; x < QB * KB; ++x) acc[x] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 <= d; c += 8) {
    __m256 kv[KB];
    KVTRIM_UNROLL for (int j = 0; j < KB; ++j) kv[j] = _mm256_loadu_ps(K + static_cast<std::size_t>(j) * d + c);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const __m256 qa = _mm256_loadu_ps(Q + static_cast<std::size_t>(a) * d + c);
      KVTRIM_UNROLL for (int j = 0; j < KB; ++j) acc[a * KB + j] = _mm256_fmadd_ps(qa, kv[j], acc[a * KB + j]);
    }
  }
  alignas(16) float sums[((QB * KB + 3) / 4) * 4];
  KVTRIM_UNROLL for (int x = 0; x < QB * KB; x += 4) {
    const __m256 z = _mm256_setzero_ps();
    _mm_store_ps(sums + x, hsum4(acc[x], x + 1 < QB * KB ? acc[x + 1] : z, x + 2 < QB * KB ? acc[x + 2] : z,
                                 x + 3 < QB * KB ? acc[x + 3] : z));
  }
  for (int a = 0; a < QB; ++a)
    for (int j = 0; j < KB; ++j) {
      float s = sums[a * KB + j];
      for (int t = c; t < d; ++t) s += Q[static_cast<std::size_t>(a) * d + t] * K[static_cast<std::size_t>(j) * d + t];
      S[static_cast<std::size_t>(a) * stride + j] = s * scale;
    }
}

// Scores of QB queries against one key, with two partial sums per query (even and odd 8-float chunks)
// so that the FMA chains are short enough to keep up with a sequential read of the key row.
template <int QB>
KVTRIM_AVX2_FN inline void score_row(const float* Q, const float* k, int d, float scale, float* S, int stride) {
  __m256 acc0[QB], acc1[QB];
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) acc0[a] = acc1[a] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 16 <= d; c += 16) {
    const __m256 k0 = _mm256_loadu_ps(k + c), k1 = _mm256_loadu_ps(k + c + 8);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      acc0[a] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * d + c), k0, acc0[a]);
      acc1[a] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * d + c + 8), k1, acc1[a]);
    }
  }
  if (c + 8 <= d) {
    const __m256 k0 = _mm256_loadu_ps(k + c);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) acc0[a] =
        _mm256_fmadd_ps(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * d + c), k0, acc0[a]);
    c += 8;
  }
  const __m256 z = _mm256_setzero_ps();
  alignas(16) float sums[4];
  _mm_store_ps(sums, hsum4(_mm256_add_ps(acc0[0], acc1[0]), QB > 1 ? _mm256_add_ps(acc0[QB > 1 ? 1 : 0], acc1[QB > 1 ? 1 : 0]) : z,
                           QB > 2 ? _mm256_add_ps(acc0[QB > 2 ? 2 : 0], acc1[QB > 2 ? 2 : 0]) : z,
                           QB > 3 ? _mm256_add_ps(acc0[QB > 3 ? 3 : 0], acc1[QB > 3 ? 3 : 0]) : z));
  for (int a = 0; a < QB; ++a) {
    float s = sums[a];
    for (int t = c; t < d; ++t) s += Q[static_cast<std::size_t>(a) * d + t] * k[t];
    S[static_cast<std::size_t>(a) * stride] = s * scale;
  }
}

// One block of up to 4 queries against keys [i0, i1), KB keys at a time.
template <int QB, int KB>
KVTRIM_AVX2_FN inline void score_range(const float* Q, const float* K, int d, int i0, int i1, float scale, float* S,
                                       int stride) {
  int i = i0;
  if constexpr (KB == 1) {
    for (; i < i1; ++i) score_row<QB>(Q, K + static_cast<std::size_t>(i) * d, d, scale, S + i, stride);
    return;
  }
  for (; i + KB <= i1; i += KB) score_block<QB, KB>(Q, K + static_cast<std::size_t>(i) * d, d, scale, S + i, stride);
  for (; i < i1; ++i) score_block<QB, 1>(Q, K + static_cast<std::size_t>(i) * d, d, scale, S + i, stride);
}

// Prefetches floats [from + ahead, from + count + ahead) of x[0..total) (clipped), one request per line.
KVTRIM_AVX2_FN inline void prefetch_ahead(const float* x, std::size_t total, std::size_t from, std::size_t count,
                                          std::size_t ahead) {
  if (ahead == 0 || from + ahead >= total) return;
  const std::size_t end = std::min(total, from + count + ahead);
  const char* p = reinterpret_cast<const char*>(x);
  for (std::size_t off = (from + ahead) * sizeof(float); off < end * sizeof(float); off += 64)
    _mm_prefetch(p + off, _MM_HINT_T0);
}

// S[a * n + i] = scale * <Q_a, K_i> for all g queries and n keys. Keys are visited in tiles that stay in
// L1 while every block of (up to 4) queries meets them.
KVTRIM_AVX2_FN inline void scores(const float* K, int n, int d, const float* Q, int g, float scale, float* S) {
  constexpr int kTile = 8;
  constexpr std::size_t kAhead = 2048;  // floats (8 KiB) ahead of the tile being read
  for (int i0 = 0; i0 < n; i0 += kTile) {
    const int i1 = std::min(n, i0 + kTile);
    prefetch_ahead(K, static_cast<std::size_t>(n) * d, static_cast<std::size_t>(i0) * d,
                   static_cast<std::size_t>(i1 - i0) * d, kAhead);
    for (int q0 = 0; q0 < g; q0 += 4) {
      const float* Qb = Q + static_cast<std::size_t>(q0) * d;
      float* Sb = S + static_cast<std::size_t>(q0) * n;
      switch (std::min(4, g - q0)) {
        case 4: score_range<4, 2>(Qb, K, d, i0, i1, scale, Sb, n); break;
        case 3: score_range<3, 2>(Qb, K, d, i0, i1, scale, Sb, n); break;
        case 2: score_range<2, 4>(Qb, K, d, i0, i1, scale, Sb, n); break;
        default: score_range<1, 2>(Qb, K, d, i0, i1, scale, Sb, n); break;
      }
    }
  }
}

// In-place softmax of row[0..n), n >= 1.
KVTRIM_AVX2_FN inline void softmax(float* row, int n) {
  const int n8 = n & ~7;
  __m256 vm = _mm256_set1_ps(-INFINITY);
  for (int i = 0; i < n8; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + i));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, vm);
  float m = tmp[0];
  for (int t = 1; t < 8; ++t) m = std::max(m, tmp[t]);
  for (int i = n8; i < n; ++i) m = std::max(m, row[i]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  for (int i = 0; i < n8; i += 8) {
    const __m256 e = exp(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
    _mm256_storeu_ps(row + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  if (n8 < n) {  // the tail through a padded buffer, so every value goes through the same exp
    for (int t = 0; t < 8; ++t) tmp[t] = n8 + t < n ? row[n8 + t] : -INFINITY;
    const __m256 e = exp(_mm256_sub_ps(_mm256_load_ps(tmp), mv));
    _mm256_store_ps(tmp, e);
    vs = _mm256_add_ps(vs, e);
    for (int t = 0; n8 + t < n; ++t) row[n8 + t] = tmp[t];
  }
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
  alignas(16) float s[4];
  _mm_store_ps(s, s4);
  const float inv = 1.0f / ((s[0] + s[2]) + (s[1] + s[3]));
  const __m256 iv = _mm256_set1_ps(inv);
  for (int i = 0; i < n8; i += 8) _mm256_storeu_ps(row + i, _mm256_mul_ps(_mm256_loadu_ps(row + i), iv));
  for (int i = n8; i < n; ++i) row[i] *= inv;
}

// O[a, c .. c + 8*DB) += sum over i in [i0, i1) of P[a * stride + i] * V[i, c ..), for QB queries.
template <int QB, int DB>
KVTRIM_AVX2_FN inline void weighted_block(const float* P, int stride, const float* V, int dv, int i0, int i1, int c,
                                          float* O) {
  __m256 acc[QB * DB];
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] =
      _mm256_loadu_ps(O + static_cast<std::size_t>(a) * dv + c + 8 * b);
  for (int i = i0; i < i1; ++i) {
    const float* vi = V + static_cast<std::size_t>(i) * dv + c;
    __m256 v[DB];
    KVTRIM_UNROLL for (int b = 0; b < DB; ++b) v[b] = _mm256_loadu_ps(vi + 8 * b);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const __m256 p = _mm256_broadcast_ss(P + static_cast<std::size_t>(a) * stride + i);
      KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] = _mm256_fmadd_ps(p, v[b], acc[a * DB + b]);
    }
  }
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b)
      _mm256_storeu_ps(O + static_cast<std::size_t>(a) * dv + c + 8 * b, acc[a * DB + b]);
}

template <int QB, int DB>
KVTRIM_AVX2_FN inline void weighted_range(const float* P, int stride, const float* V, int dv, int i0, int i1,
                                          float* O) {
  int c = 0;
  for (; c + 8 * DB <= dv; c += 8 * DB) weighted_block<QB, DB>(P, stride, V, dv, i0, i1, c, O);
  for (; c + 8 <= dv; c += 8) weighted_block<QB, 1>(P, stride, V, dv, i0, i1, c, O);
  for (; c < dv; ++c)  // columns past the last multiple of 8
    for (int a = 0; a < QB; ++a) {
      float s = O[static_cast<std::size_t>(a) * dv + c];
      for (int i = i0; i < i1; ++i) s += P[static_cast<std::size_t>(a) * stride + i] * V[static_cast<std::size_t>(i) * dv + c];
      O[static_cast<std::size_t>(a) * dv + c] = s;
    }
}

// O [g x dv] = P [g x n] * V [n x dv]. Values are visited in tiles that stay in L1 while every block of
// queries and columns meets them; the next tile is prefetched (the column blocks read a tile in strides).
KVTRIM_AVX2_FN inline void weighted_sum(const float* P, int n, const float* V, int dv, int g, float* O) {
  std::fill(O, O + static_cast<std::size_t>(g) * dv, 0.0f);
  constexpr int kTile = 8;
  constexpr std::size_t kAhead = 2048;
  for (int i0 = 0; i0 < n; i0 += kTile) {
    const int i1 = std::min(n, i0 + kTile);
    prefetch_ahead(V, static_cast<std::size_t>(n) * dv, static_cast<std::size_t>(i0) * dv,
                   static_cast<std::size_t>(i1 - i0) * dv, kAhead);
    for (int q0 = 0; q0 < g; q0 += 4) {
      const float* Pb = P + static_cast<std::size_t>(q0) * n;
      float* Ob = O + static_cast<std::size_t>(q0) * dv;
      switch (std::min(4, g - q0)) {
        case 4: weighted_range<4, 2>(Pb, n, V, dv, i0, i1, Ob); break;
        case 3: weighted_range<3, 2>(Pb, n, V, dv, i0, i1, Ob); break;
        case 2: weighted_range<2, 4>(Pb, n, V, dv, i0, i1, Ob); break;
        default: weighted_range<1, 8>(Pb, n, V, dv, i0, i1, Ob); break;
      }
    }
  }
}

KVTRIM_AVX2_FN inline void attend(const float* K, const float* V, int n, int dk, int dv, const float* Q, int g,
                                  float scale, float* P, float* O) {
  scores(K, n, dk, Q, g, scale, P);
  for (int a = 0; a < g; ++a) softmax(P + static_cast<std::size_t>(a) * n, n);
  weighted_sum(P, n, V, dv, g, O);
}

#undef KVTRIM_UNROLL
#undef KVTRIM_AVX2_FN

}  // namespace avx2

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif  // KVTRIM_X86_AVX2_DISPATCH

// Decode attention of one KV head (see attend_portable for the layout); n == 0 gives a zero output.
inline void attend(const float* K, const float* V, int n, int dk, int dv, const float* Q, int g, float scale,
                   float* P, float* O) {
  if (n == 0) {
    std::fill(O, O + static_cast<std::size_t>(g) * dv, 0.0f);
    return;
  }
#ifdef KVTRIM_X86_AVX2_DISPATCH
  if (cpu_has_avx2_fma()) return avx2::attend(K, V, n, dk, dv, Q, g, scale, P, O);
#endif
  attend_portable(K, V, n, dk, dv, Q, g, scale, P, O);
}

// Persistent worker threads for per-head work. run(n, f) calls f(task, worker) for task = 0..n-1 spread
// over the calling thread (worker 0) and the pool's workers (1..threads-1); it returns when all are done.
// No allocation per run. Workers spin briefly between runs (decode calls come back to back), then sleep.
class HeadPool {
 public:
  explicit HeadPool(int threads) : n_threads_(threads) {
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  HeadPool(const HeadPool&) = delete;
  HeadPool& operator=(const HeadPool&) = delete;
  ~HeadPool() {
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return n_threads_; }

  template <class F>
  void run(int n_tasks, F& f) {
    call_ = [](void* ctx, int task, int worker) { (*static_cast<F*>(ctx))(task, worker); };
    ctx_ = &f;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    work(0);
    for (int spins = 0;; ++spins) {
      const int p = pending_.load(std::memory_order_acquire);
      if (p == 0) break;
      if (spins < kSpins) {
        pause();
      } else {
        pending_.wait(p, std::memory_order_acquire);
      }
    }
  }

 private:
  static constexpr int kSpins = 2000;  // ~50-100 us of pause instructions before sleeping
  static void pause() {
#ifdef KVTRIM_X86_AVX2_DISPATCH
    _mm_pause();
#endif
  }
  void work(int worker) {
    for (int t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) call_(ctx_, t, worker);
  }
  void worker_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      for (int spins = 0;; ++spins) {
        const std::uint64_t g = generation_.load(std::memory_order_acquire);
        if (g != seen) {
          seen = g;
          break;
        }
        if (spins < kSpins) {
          pause();
        } else {
          generation_.wait(g, std::memory_order_acquire);
        }
      }
      if (stop_.load(std::memory_order_relaxed)) return;
      work(worker);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }

  int n_threads_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  void (*call_)(void*, int, int) = nullptr;
  void* ctx_ = nullptr;
  int n_tasks_ = 0;
};

}  // namespace detail

struct CpuBackend {
  static constexpr const char* kName = "cpu";

  template <class P>
  class Impl {
   public:
    using Meta = typename P::SlotMeta;
    using Head = HeadStore<Meta>;
    using State = typename P::HeadState;

    Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg) {
      const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
      policies_.reserve(static_cast<std::size_t>(L));
      int max_budget = 0;
      for (int l = 0; l < L; ++l) {
        LayerContext ctx{l, L, H, g, d, {}};
        for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
        policies_.emplace_back(params, ctx);
        for (int h = 0; h < H; ++h) {
          heads_.emplace_back(key_width(policies_.back(), h), value_width(policies_.back(), h), cfg.budget_of(l, h));
          max_budget = std::max(max_budget, cfg.budget_of(l, h));
        }
      }
      states_.resize(heads_.size());
      // A pool only when there is more than one head to share out; threads beyond the heads would idle.
      const int threads = std::min(cfg.threads, H);
      scratch_.resize(static_cast<std::size_t>(threads));
      for (auto& s : scratch_) {
        s.probs.resize(static_cast<std::size_t>(g) * (max_budget + 1));
        if constexpr (kProjects) {
          s.q_low.resize(static_cast<std::size_t>(g) * d);
          s.kv_low.resize(2 * static_cast<std::size_t>(d));
          s.o_low.resize(static_cast<std::size_t>(g) * d);
        }
      }
      errors_.resize(static_cast<std::size_t>(H));
      if (threads > 1) pool_ = std::make_unique<detail::HeadPool>(threads);
    }
    // Copies get their own worker threads (a pool is never shared).
    Impl(const Impl& o)
        : cfg_(o.cfg_), policies_(o.policies_), heads_(o.heads_), states_(o.states_), scratch_(o.scratch_),
          errors_(o.errors_.size()),
          pool_(o.pool_ ? std::make_unique<detail::HeadPool>(o.pool_->threads()) : nullptr) {}
    Impl& operator=(const Impl& o) {
      if (this != &o) {
        Impl copy(o);
        *this = std::move(copy);
      }
      return *this;
    }
    Impl(Impl&&) noexcept = default;
    Impl& operator=(Impl&&) noexcept = default;

    // A policy that stores keys/values in a smaller space (low-rank storage) defines key_width(kv_head),
    // value_width(kv_head), project_key/value(kv_head, in, out), project_queries(kv_head, group, in, out)
    // and unproject_outputs(kv_head, group, in, out). Queries are projected before the policy sees them,
    // so every policy hook works in the stored space. Without these members the storage is head_dim wide.
    static constexpr bool kProjects = requires(const P& p, const float* in, float* out) {
      { p.key_width(0) } -> std::convertible_to<int>;
      { p.value_width(0) } -> std::convertible_to<int>;
      p.project_key(0, in, out);
      p.project_value(0, in, out);
      p.project_queries(0, 1, in, out);
      p.unproject_outputs(0, 1, in, out);
    };

    Head& head(int layer, int kv) { return heads_[index(layer, kv)]; }
    const Head& head(int layer, int kv) const { return heads_[index(layer, kv)]; }
    State& state(int layer, int kv) { return states_[index(layer, kv)]; }
    P& policy(int layer) { return policies_[static_cast<std::size_t>(layer)]; }
    const P& policy(int layer) const { return policies_[static_cast<std::size_t>(layer)]; }
    // Threads that serve a call (1 = the caller only).
    int threads() const { return pool_ ? pool_->threads() : 1; }

    void reset() {
      for (auto& h : heads_) {
        h.clear();
        h.shrink_to_budget();
      }
      for (auto& s : states_) s = State{};
    }

    // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d].
    void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
      const int H = cfg_.n_kv_heads;
      if (!pool_) {
        for (int kv = 0; kv < H; ++kv) decode_head(layer, kv, q, k, v, out, pos, scratch_[0]);
        return;
      }
      auto task = [&](int kv, int worker) {
        try {
          decode_head(layer, kv, q, k, v, out, pos, scratch_[static_cast<std::size_t>(worker)]);
        } catch (...) {
          errors_[static_cast<std::size_t>(kv)] = std::current_exception();
        }
      };
      pool_->run(H, task);
      rethrow_first_error();
    }

    // Q: [T x n_q_heads*d], K, V: [T x n_kv_heads*d], out: [T x n_q_heads*d], all row-major; positions
    // start at `first_pos` (0 for a fresh cache). With threads, the attention of the heads runs in
    // parallel; the policy hooks then run head by head in order on the calling thread (policies may keep
    // prompt-time scratch in the policy object).
    void prefill(int layer, const float* Q, const float* K, const float* V, float* out, int T,
                 std::int64_t first_pos) {
      const int H = cfg_.n_kv_heads, g = cfg_.group_size();
      P& pol = policy(layer);
      const int window = std::clamp(pol.prompt_window(), 0, T);
      const std::size_t sums = kNeedAttention ? static_cast<std::size_t>(g) * T : 0;
      const std::size_t wsums = kNeedAttention && window > 0 ? static_cast<std::size_t>(g) * T : 0;
      const int workers = pool_ ? pool_->threads() : 1;
      std::vector<PrefillScratch> work(static_cast<std::size_t>(workers));
      // Column sums of every head (the hooks need them after the parallel part).
      std::vector<float> col(sums * H), win(wsums * H);
      auto attend_head = [&](int kv, int worker) {
        PrefillScratch& s = work[static_cast<std::size_t>(worker)];
        load_prompt(pol, kv, Q, K, V, T, s);
        prompt_attention(pol, kv, T, window, s, out, col.data() + sums * kv, win.data() + wsums * kv);
      };
      if (pool_) {
        auto task = [&](int kv, int worker) {
          try {
            attend_head(kv, worker);
          } catch (...) {
            errors_[static_cast<std::size_t>(kv)] = std::current_exception();
          }
        };
        pool_->run(H, task);
        rethrow_first_error();
      }
      PrefillScratch& s = work[0];
      for (int kv = 0; kv < H; ++kv) {
        if (pool_) {
          load_prompt(pol, kv, Q, K, V, T, s);  // the stored-space rows again, for the hooks
        } else {
          attend_head(kv, 0);
        }
        Head& h = head(layer, kv);
        State& st = state(layer, kv);
        h.reserve(T + 1);
        for (int t = 0; t < T; ++t) {
          StepContext step{layer, kv, g, h.key_dim(), first_pos + t, -1, s.Qg.row(t).data(), true};
          step.slot = h.append(s.Kh.row(t).data(), s.Vh.row(t).data(), first_pos + t);
          pol.on_insert(st, h, step);
        }
        PromptContext prompt{layer, kv, g, T, kNeedAttention ? col.data() + sums * kv : nullptr,
                             wsums ? win.data() + wsums * kv : nullptr, window};
        pol.on_prompt(st, h, prompt);
        KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " prompt tokens in layer ", layer,
                     " KV head ", kv, " over its budget of ", h.budget());
        h.shrink_to_budget();
      }
    }

   private:
    static constexpr bool kNeedAttention = has(P::kSignals, Signals::kAttention);

    struct Scratch {  // one per thread: the current decode step of one head
      std::vector<float> probs;                 // [group x (max budget + 1)] attention probabilities
      std::vector<float> q_low, kv_low, o_low;  // projected q, k|v and output (low-rank storage only)
    };
    struct PrefillScratch {  // one per thread: one head's prompt in the stored space, and the score block
      RowMajorMatrixXf S, Kh, Vh, Qg, Oh;
    };

    void rethrow_first_error() {
      for (auto& e : errors_)
        if (e) {
          std::exception_ptr first = e;
          for (auto& x : errors_) x = nullptr;
          std::rethrow_exception(first);
        }
    }

    void decode_head(int layer, int kv, const float* q, const float* k, const float* v, float* out, std::int64_t pos,
                     Scratch& s) {
      const int d = cfg_.head_dim, g = cfg_.group_size();
      P& pol = policy(layer);
      Head& h = head(layer, kv);
      State& st = state(layer, kv);
      const float* qg = q + static_cast<std::size_t>(kv) * g * d;
      const float* kh = k + static_cast<std::size_t>(kv) * d;
      const float* vh = v + static_cast<std::size_t>(kv) * d;
      float* oh = out + static_cast<std::size_t>(kv) * g * d;
      if constexpr (kProjects) {  // everything below happens in the stored (projected) space
        pol.project_queries(kv, g, qg, s.q_low.data());
        pol.project_key(kv, kh, s.kv_low.data());
        pol.project_value(kv, vh, s.kv_low.data() + d);
        qg = s.q_low.data();
        kh = s.kv_low.data();
        vh = s.kv_low.data() + d;
      }
      StepContext step{layer, kv, g, h.key_dim(), pos, -1, qg, false};
      step.slot = h.append(kh, vh, pos);
      pol.on_insert(st, h, step);
      if constexpr (P::kTiming == EvictTiming::kBeforeAttention) pol.evict(st, h, step);
      const int n = h.size();
      float* o = kProjects ? s.o_low.data() : oh;
      detail::attend(h.key_ptr(0), h.value_ptr(0), n, h.key_dim(), h.value_dim(), qg, g,
                     1.0f / std::sqrt(static_cast<float>(d)), s.probs.data(), o);
      if constexpr (kProjects) pol.unproject_outputs(kv, g, s.o_low.data(), oh);
      if constexpr (kNeedAttention) pol.on_attention(st, h, step, AttentionRows{s.probs.data(), n, g, n});
      if constexpr (P::kTiming == EvictTiming::kAfterAttention) pol.evict(st, h, step);
      KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer, " KV head ", kv,
                   " over its budget of ", h.budget());
    }

    // The prompt rows of KV head kv in the stored (maybe projected) space, contiguous.
    void load_prompt(const P& pol, int kv, const float* Q, const float* K, const float* V, int T,
                     PrefillScratch& s) const {
      const int H = cfg_.n_kv_heads, d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
      const int dk = key_width(pol, kv), dv = value_width(pol, kv);
      Strided Kin(K + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
      Strided Vin(V + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
      Strided Qin(Q + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                  Eigen::OuterStride<>(Hq * d));
      s.Kh.resize(T, dk);
      s.Vh.resize(T, dv);
      s.Qg.resize(T, static_cast<Eigen::Index>(g) * dk);
      if constexpr (kProjects) {
        for (int t = 0; t < T; ++t) {
          pol.project_key(kv, Kin.row(t).data(), s.Kh.row(t).data());
          pol.project_value(kv, Vin.row(t).data(), s.Vh.row(t).data());
          pol.project_queries(kv, g, Qin.row(t).data(), s.Qg.row(t).data());
        }
      } else {
        s.Kh = Kin;
        s.Vh = Vin;
        s.Qg = Qin;
      }
    }

    // Exact causal attention of one head's prompt (rows already in s): writes the head's output columns of
    // out and, for policies that read attention, the column sums col [g x T] and window sums win [g x T].
    void prompt_attention(const P& pol, int kv, int T, int window, PrefillScratch& s, float* out, float* col, float* win) const {
      const int d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
      const int dk = static_cast<int>(s.Kh.cols()), dv = static_cast<int>(s.Vh.cols());
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      constexpr int kBlock = 128;
      if constexpr (kNeedAttention) {
        std::fill(col, col + static_cast<std::size_t>(g) * T, 0.0f);
        if (window > 0) std::fill(win, win + static_cast<std::size_t>(g) * T, 0.0f);
      }
      s.Oh.resize(T, static_cast<Eigen::Index>(g) * dv);
      for (int gi = 0; gi < g; ++gi) {
        const auto Qh = s.Qg.middleCols(static_cast<Eigen::Index>(gi) * dk, dk);
        for (int t0 = 0; t0 < T; t0 += kBlock) {
          const int b = std::min(kBlock, T - t0), width = t0 + b;  // rows t0..t0+b-1 see keys 0..t
          s.S.resize(b, width);
          s.S.noalias() = (Qh.middleRows(t0, b) * s.Kh.topRows(width).transpose()) * scale;
          for (int r = 0; r < b; ++r) {
            const int t = t0 + r;
            detail::softmax_inplace(s.S.row(r).data(), t + 1);
            s.S.row(r).tail(width - t - 1).setZero();
            if constexpr (kNeedAttention) {
              float* c = col + static_cast<std::size_t>(gi) * T;
              for (int j = 0; j <= t; ++j) c[j] += s.S(r, j);
              if (t >= T - window) {
                float* w = win + static_cast<std::size_t>(gi) * T;
                for (int j = 0; j <= t; ++j) w[j] += s.S(r, j);
              }
            }
          }
          s.Oh.block(t0, static_cast<Eigen::Index>(gi) * dv, b, dv).noalias() = s.S * s.Vh.topRows(width);
        }
      }
      StridedOut Oout(out + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                      Eigen::OuterStride<>(Hq * d));
      if constexpr (kProjects) {
        for (int t = 0; t < T; ++t) pol.unproject_outputs(kv, g, s.Oh.row(t).data(), Oout.row(t).data());
      } else {
        Oout = s.Oh;
      }
    }

    using Strided = Eigen::Map<const RowMajorMatrixXf, 0, Eigen::OuterStride<>>;
    using StridedOut = Eigen::Map<RowMajorMatrixXf, 0, Eigen::OuterStride<>>;

    int key_width(const P& p, int kv) const {
      if constexpr (kProjects) return p.key_width(kv);
      return cfg_.head_dim;
    }
    int value_width(const P& p, int kv) const {
      if constexpr (kProjects) return p.value_width(kv);
      return cfg_.head_dim;
    }
    std::size_t index(int layer, int kv) const {
      return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv;
    }

    CacheConfig cfg_;
    std::vector<P> policies_;
    std::vector<Head> heads_;
    std::vector<State> states_;
    std::vector<Scratch> scratch_;                 // one per thread
    std::vector<std::exception_ptr> errors_;       // per KV head, from worker threads
    std::unique_ptr<detail::HeadPool> pool_;       // null with one thread
  };
};

}  // namespace kvtrim
