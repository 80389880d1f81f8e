// kvtrim: decode attention on the CPU, one KV head at a time.
//
// attend<T>() computes the g queries of one KV head's group against the head's n kept keys and values, stored
// as T (float, kvtrim::half or kvtrim::bfloat16; rows contiguous): scores scaled by `scale`, a max-subtracted
// softmax whose probabilities are left in P for the policy, and the probability-weighted sum of the values.
// Queries, probabilities and outputs are fp32, and so is every accumulation.
//
// On x86-64 with GCC or Clang a hand-vectorised AVX2+FMA path (F16C for half) is chosen at run time when the
// CPU has it (the library is built without -march flags, so the compiler alone would use SSE2 only);
// elsewhere a portable path runs. The AVX2 path reads every key and value row exactly once per call, in
// one pass: tiles of keys and values that stay in L1, each tile's scores meet the tile's values at once
// under a running maximum (online softmax, the output rescaled when the maximum grows), and a last pass
// over the stored scores, which are still in cache, writes the exact probabilities exp(s - max) / sum into P
// and normalises the output. Both paths compute the same softmax from the same scores; results differ only
// by fp32 rounding (a few ulp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "dtype.hpp"

#if !defined(KVTRIM_NO_SIMD) && !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__x86_64__)
#define KVTRIM_X86_AVX2_DISPATCH 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace kvtrim::detail {

// softmax of row[0..n) in place (fp32, max-subtracted); n >= 1.
inline void softmax_inplace(float* row, int n) {
  Eigen::Map<Eigen::ArrayXf> r(row, n);
  const float m = r.maxCoeff();
  r = (r - m).exp();
  r /= r.sum();
}

// Decode attention of one KV head, portable version: g queries Q [g x dk] over n keys K [n x dk] and
// values V [n x dv] (rows contiguous); probabilities into P [g x n], output into O [g x dv].
template <StorageType T>
inline void attend_portable(const T* K, const std::type_identity_t<T>* V, int n, int dk, int dv, const float* Q,
                            int g, float scale, float* P, float* O) {
  using Rows = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> probs(P, g, n), Out(O, g, dv);
  Rows Qg(Q, g, dk);
  Out.setZero();
  if (n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    Rows Ks(K, n, dk), Vs(V, n, dv);
    for (int i = 0; i < n; ++i)  // one pass over K: every key row meets all g queries while it is in cache
      for (int gi = 0; gi < g; ++gi) probs(gi, i) = Qg.row(gi).dot(Ks.row(i)) * scale;
    for (int gi = 0; gi < g; ++gi) softmax_inplace(probs.row(gi).data(), n);
    for (int i = 0; i < n; ++i)
      for (int gi = 0; gi < g; ++gi) Out.row(gi) += probs(gi, i) * Vs.row(i);
  } else {  // 16-bit storage: each row converted to fp32 once, in chunks that stay in L1
    constexpr int kChunk = 256;
    float buf[kChunk];
    for (int i = 0; i < n; ++i) {
      const T* k = K + static_cast<std::size_t>(i) * dk;
      for (int gi = 0; gi < g; ++gi) probs(gi, i) = 0.0f;
      for (int c0 = 0; c0 < dk; c0 += kChunk) {
        const int w = std::min(kChunk, dk - c0);
        to_float(k + c0, buf, static_cast<std::size_t>(w));
        Eigen::Map<const Eigen::RowVectorXf> kc(buf, w);
        for (int gi = 0; gi < g; ++gi) probs(gi, i) += Qg.row(gi).segment(c0, w).dot(kc);
      }
      for (int gi = 0; gi < g; ++gi) probs(gi, i) *= scale;
    }
    for (int gi = 0; gi < g; ++gi) softmax_inplace(probs.row(gi).data(), n);
    for (int i = 0; i < n; ++i) {
      const T* v = V + static_cast<std::size_t>(i) * dv;
      for (int c0 = 0; c0 < dv; c0 += kChunk) {
        const int w = std::min(kChunk, dv - c0);
        to_float(v + c0, buf, static_cast<std::size_t>(w));
        Eigen::Map<const Eigen::RowVectorXf> vc(buf, w);
        for (int gi = 0; gi < g; ++gi) Out.row(gi).segment(c0, w) += probs(gi, i) * vc;
      }
    }
  }
}

#ifdef KVTRIM_X86_AVX2_DISPATCH
namespace avx2 {

#define KVTRIM_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define KVTRIM_UNROLL _Pragma("unroll")
#else
#define KVTRIM_UNROLL _Pragma("GCC unroll 16")
#endif

// Eight stored elements as eight floats (exact conversions).
KVTRIM_AVX2_FN inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
KVTRIM_AVX2_FN inline __m256 load8(const half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KVTRIM_AVX2_FN inline __m256 load8(const bfloat16* p) {  // bf16 is the upper half of a float
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

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

#define KVTRIM_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#define KVTRIM_AVX2_LAMBDA __attribute__((target("avx2,fma,f16c")))
#define KVTRIM_AVX2_LAMBDA_INLINE __attribute__((target("avx2,fma,f16c"), always_inline))

// [sum(a0), sum(a1), sum(a2), sum(a3) | sum(b0), sum(b1), sum(b2), sum(b3)].
KVTRIM_AVX2_INLINE __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 b0, __m256 b1, __m256 b2,
                                __m256 b3) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit lane
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Keeps a value in a register: the compiler would otherwise fold its load into every FMA that uses it,
// which costs a load per FMA.
KVTRIM_AVX2_INLINE __m256 in_register(__m256 x) {
  __asm__("" : "+x"(x));
  return x;
}

// How far ahead of the tile being computed the keys and values are prefetched, per stream. Far enough to
// cover DRAM latency under load (a tile takes ~0.5-1 us), near enough that the lines are still in L1 when
// their tile comes (two streams x (tile + distance) fill most of the 32 KiB L1 already).
inline constexpr std::size_t kPrefetchAhead = 8192;

// A byte range to prefetch in equal slices while a tile is computed: a burst of a whole tile's prefetches
// would occupy every L1 miss buffer at once and stall the tile's own loads.
struct Prefetch {
  const char* p = nullptr;
  std::size_t len = 0, slice = 0, done = 0;
  KVTRIM_AVX2_INLINE void next() {
    const std::size_t end = std::min(len, done + slice);
    for (std::size_t o = done; o < end; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    done = end;
  }
};

// The rows of X (n rows of `row` bytes) kPrefetchAhead bytes past tile t (TL rows per tile), in `parts` slices.
template <int TL>
inline Prefetch prefetch_tile(const void* X, int n, std::size_t row, int t, int parts) {
  Prefetch f;
  const std::size_t total = static_cast<std::size_t>(n) * row;
  const std::size_t from = static_cast<std::size_t>(t) * TL * row + kPrefetchAhead;
  if (from >= total) return f;
  const std::size_t k = static_cast<std::size_t>(parts);
  f.p = static_cast<const char*>(X) + from;
  f.len = std::min(static_cast<std::size_t>(TL) * row, total - from);
  f.slice = ((f.len + k - 1) / k + 63) & ~std::size_t(63);
  return f;
}

// acc[4 * j + a] = the 8-lane partial dot products of query a < QB (rows of Q, stride d) with key j < KB
// (consecutive rows at K, stride d); the lanes of queries a >= QB stay 0. D > 0: d == D at compile time.
// Returns the first column not covered (d rounded down to a multiple of 8).
template <int D, int QB, int KB, class T>
KVTRIM_AVX2_INLINE int dot_block(const float* Q, const T* K, int d, __m256 (&acc)[4 * KB]) {
  const int dd = D > 0 ? D : d;
  KVTRIM_UNROLL for (int x = 0; x < 4 * KB; ++x) acc[x] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 <= dd; c += 8) {
    __m256 kv[KB];
    KVTRIM_UNROLL for (int j = 0; j < KB; ++j) kv[j] = load8(K + static_cast<std::size_t>(j) * dd + c);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const __m256 q = in_register(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * dd + c));
      KVTRIM_UNROLL for (int j = 0; j < KB; ++j) acc[4 * j + a] = _mm256_fmadd_ps(q, kv[j], acc[4 * j + a]);
    }
  }
  return c;
}

// t[4 * j + a] = the dot products over the columns [c, d) past the last multiple of 8, for dot_block's pairs.
template <int QB, int KB, class T>
inline void dot_tail(const float* Q, const T* K, int c, int d, float* t) {
  for (int j = 0; j < KB; ++j)
    for (int a = 0; a < 4; ++a) {
      float s = 0.0f;
      if (a < QB)
        for (int e = c; e < d; ++e)
          s += Q[static_cast<std::size_t>(a) * d + e] * to_float(K[static_cast<std::size_t>(j) * d + e]);
      t[4 * j + a] = s;
    }
}

// Scaled scores of QB queries against KB consecutive keys: S[4 * j + a] (lanes a >= QB get 0).
template <int D, int QB, int KB, class T>
KVTRIM_AVX2_INLINE void score_rows(const float* Q, const T* K, int d, float scale, float* S) {
  __m256 acc[4 * KB];
  const int c = dot_block<D, QB, KB>(Q, K, d, acc);
  alignas(16) float t[4 * KB];
  const bool tail = D <= 0 && c < d;
  if (tail) dot_tail<QB, KB>(Q, K, c, d, t);
  KVTRIM_UNROLL for (int j = 0; j < KB; ++j) {
    __m128 s = hsum4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    if (tail) s = _mm_add_ps(s, _mm_load_ps(t + 4 * j));
    _mm_store_ps(S + 4 * j, _mm_mul_ps(s, _mm_set1_ps(scale)));
  }
}

// Scaled scores of 4 queries against two consecutive keys, as one 8-lane vector at S (S[4 * j + a]).
template <int D, class T>
KVTRIM_AVX2_INLINE void score_pair(const float* Q, const T* K, int d, float scale, float* S) {
  __m256 acc[8];
  const int c = dot_block<D, 4, 2>(Q, K, d, acc);
  __m256 s = hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  if (D <= 0 && c < d) {
    alignas(32) float t[8];
    dot_tail<4, 2>(Q, K, c, d, t);
    s = _mm256_add_ps(s, _mm256_load_ps(t));
  }
  _mm256_store_ps(S, _mm256_mul_ps(s, _mm256_set1_ps(scale)));
}

// Register blocking of a tile that is not Full: keys per score block and 8-column chunks per value block,
// by the number of queries in the block (registers: QB x blocks accumulators + operands <= 16).
constexpr int score_keys(int qb) { return qb >= 3 ? 3 : 4; }
constexpr int value_chunks(int qb) { return qb >= 3 ? 2 : qb == 2 ? 4 : 8; }

// Scaled scores of a tile's `rows` keys (Full: rows == TL and QB == 4): S[4 * r + a], and a zero row after
// an odd last row (the softmax reads rows in pairs). Each block of keys issues the next slice of pk.
template <int D, int TL, int QB, bool Full, class T>
KVTRIM_AVX2_FN inline void score_tile(const float* Q, const T* K, int dk, int rows, float scale, float* S,
                                      Prefetch& pk) {
  const int ddk = D > 0 ? D : dk;
  if constexpr (Full) {
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 2) {
      pk.next();
      score_pair<D>(Q, K + static_cast<std::size_t>(r) * ddk, dk, scale, S + 4 * r);
    }
  } else {
    constexpr int KB = score_keys(QB);
    int j = 0;
    for (; j + KB <= rows; j += KB) {
      pk.next();
      score_rows<D, QB, KB>(Q, K + static_cast<std::size_t>(j) * ddk, dk, scale, S + 4 * j);
    }
    for (; j < rows; ++j) score_rows<D, QB, 1>(Q, K + static_cast<std::size_t>(j) * ddk, dk, scale, S + 4 * j);
    if (rows & 1) _mm_store_ps(S + 4 * rows, _mm_setzero_ps());
  }
}

// O[a, c .. c + 8*DB) += sum over the tile's rows r of W[4 * r + a] * V[r, c ..), for QB queries (O rows of
// stride dv). Full: rows == TL.
template <int TL, int QB, int DB, bool Full, class T>
KVTRIM_AVX2_INLINE void value_block(const float* W, const T* V, int dv, int rows, int c, float* O) {
  __m256 acc[QB * DB];
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] =
      _mm256_loadu_ps(O + static_cast<std::size_t>(a) * dv + c + 8 * b);
  auto row = [&](int r) KVTRIM_AVX2_LAMBDA_INLINE {
    const T* vr = V + static_cast<std::size_t>(r) * dv + c;
    __m256 v[DB];
    KVTRIM_UNROLL for (int b = 0; b < DB; ++b) v[b] = load8(vr + 8 * b);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const __m256 p = _mm256_broadcast_ss(W + 4 * r + a);
      KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] = _mm256_fmadd_ps(p, v[b], acc[a * DB + b]);
    }
  };
  if constexpr (Full) {
    KVTRIM_UNROLL for (int r = 0; r < TL; ++r) row(r);
  } else {
    for (int r = 0; r < rows; ++r) row(r);
  }
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b)
      _mm256_storeu_ps(O + static_cast<std::size_t>(a) * dv + c + 8 * b, acc[a * DB + b]);
}

// O[a, :] += sum over the tile's rows r of W[4 * r + a] * V[r, :] for QB queries. The tile is read in
// column blocks (every row of a block meets all QB queries in registers); each block issues the next slice
// of pv.
template <int D, int TL, int QB, bool Full, class T>
KVTRIM_AVX2_FN inline void value_tile(const float* W, const T* V, int dv, int rows, float* O, Prefetch& pv) {
  constexpr int DB = value_chunks(QB);
  const int dd = D > 0 ? D : dv;
  int c = 0;
  for (; c + 8 * DB <= dd; c += 8 * DB) {
    pv.next();
    value_block<TL, QB, DB, Full>(W, V, dd, rows, c, O);
  }
  for (; c + 8 <= dd; c += 8) value_block<TL, QB, 1, Full>(W, V, dd, rows, c, O);
  for (; c < dd; ++c)  // columns past the last multiple of 8
    for (int a = 0; a < QB; ++a) {
      float s = O[static_cast<std::size_t>(a) * dd + c];
      for (int r = 0; r < rows; ++r) s += W[4 * r + a] * to_float(V[static_cast<std::size_t>(r) * dd + c]);
      O[static_cast<std::size_t>(a) * dd + c] = s;
    }
}

KVTRIM_AVX2_FN inline void scale_row(float* x, int n, float f) {
  const __m256 fv = _mm256_set1_ps(f);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), fv));
  for (; i < n; ++i) x[i] *= f;
}

// A tile's scores S[4 * r + a] out to P (QB rows of stride n, from the tile's first token); returns the
// tile's maximum per query (lanes >= QB: 0).
template <int TL, int QB, bool Full>
KVTRIM_AVX2_INLINE __m128 scores_out(const float* S, int rows, float* P, int n) {
  if constexpr (Full) {  // per 8 rows: a (4 x 2) x 4 transpose, then the rows back in order
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 8) {
      const float* s = S + 4 * r;
      const __m256 x0 = _mm256_load_ps(s), x1 = _mm256_load_ps(s + 8), x2 = _mm256_load_ps(s + 16),
                   x3 = _mm256_load_ps(s + 24);  // rows r, r+1 | r+2, r+3 | r+4, r+5 | r+6, r+7
      mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_max_ps(x0, x1), _mm256_max_ps(x2, x3)));
      const __m256 t0 = _mm256_unpacklo_ps(x0, x1), t1 = _mm256_unpackhi_ps(x0, x1);
      const __m256 t2 = _mm256_unpacklo_ps(x2, x3), t3 = _mm256_unpackhi_ps(x2, x3);
      // query a: rows r, r+2, r+4, r+6 | r+1, r+3, r+5, r+7
      const __m256 q0 = _mm256_shuffle_ps(t0, t2, 0x44), q1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 q2 = _mm256_shuffle_ps(t1, t3, 0x44), q3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      _mm256_storeu_ps(P + r, _mm256_permutevar8x32_ps(q0, order));
      _mm256_storeu_ps(P + static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q1, order));
      _mm256_storeu_ps(P + 2 * static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q2, order));
      _mm256_storeu_ps(P + 3 * static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q3, order));
    }
    return _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  } else {
    __m128 mt = _mm_set1_ps(-INFINITY);
    for (int j = 0; j < rows; ++j) mt = _mm_max_ps(mt, _mm_load_ps(S + 4 * j));
    for (int a = 0; a < QB; ++a)
      for (int j = 0; j < rows; ++j) P[static_cast<std::size_t>(a) * n + j] = S[4 * j + a];
    return mt;
  }
}

// A tile's scores S out to P; the running maxima m[0..QB) updated, and the rows of O (stride dv) whose maximum
// grew multiplied by exp(old - new) (0 while nothing has been accumulated: old = -inf); then S = exp(S - m),
// the tile's weights.
template <int TL, int QB, bool Full>
KVTRIM_AVX2_FN inline void softmax_tile(float* S, int rows, float* P, int n, float* m, float* O, int dv) {
  const __m128 mt = scores_out<TL, QB, Full>(S, rows, P, n);
  alignas(16) float old[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // lanes >= QB: scores and maxima 0
  for (int a = 0; a < QB; ++a) old[a] = m[a];
  const __m128 mo = _mm_load_ps(old), mn = _mm_max_ps(mo, mt);
  const int grew = _mm_movemask_ps(_mm_cmpgt_ps(mt, mo)) & ((1 << QB) - 1);
  if (grew != 0) {  // rare after the first tiles: the maximum grows about log(n) times
    alignas(32) float f[8];
    _mm256_store_ps(f, exp(_mm256_set_m128(_mm_setzero_ps(), _mm_sub_ps(mo, mn))));
    alignas(16) float mnew[4];
    _mm_store_ps(mnew, mn);
    for (int a = 0; a < QB; ++a)
      if ((grew >> a) & 1) {
        scale_row(O + static_cast<std::size_t>(a) * dv, dv, f[a]);
        m[a] = mnew[a];
      }
  }
  const __m256 mv = _mm256_set_m128(mn, mn);
  auto pair = [&](int r) KVTRIM_AVX2_LAMBDA_INLINE {
    _mm256_store_ps(S + 4 * r, exp(_mm256_sub_ps(_mm256_load_ps(S + 4 * r), mv)));
  };
  if constexpr (Full) {
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 2) pair(r);
  } else {
    for (int r = 0; r < rows; r += 2) pair(r);
  }
}

// row[0..n) = exp(row - m) / sum, given m = max(row): the exact softmax the policies read.
// Returns the sum (of the unnormalised exponentials).
KVTRIM_AVX2_FN inline float softmax_given_max(float* row, int n, float m) {
  const int n8 = n & ~7;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  for (int i = 0; i < n8; i += 8) {
    const __m256 e = exp(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
    _mm256_storeu_ps(row + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  if (n8 < n) {  // the tail through a padded buffer, so every value goes through the same exp
    alignas(32) float tmp[8];
    for (int t = 0; t < 8; ++t) tmp[t] = n8 + t < n ? row[n8 + t] : -INFINITY;
    const __m256 e = exp(_mm256_sub_ps(_mm256_load_ps(tmp), mv));
    _mm256_store_ps(tmp, e);
    vs = _mm256_add_ps(vs, e);
    for (int t = 0; n8 + t < n; ++t) row[n8 + t] = tmp[t];
  }
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
  alignas(16) float s[4];
  _mm_store_ps(s, s4);
  const float sum = (s[0] + s[2]) + (s[1] + s[3]);
  scale_row(row, n, 1.0f / sum);
  return sum;
}

// Rows per tile for head dim D and storage T: about 16 KiB of keys and values together, 16 or 32 rows.
template <int D, class T>
inline constexpr int kTileRows = D <= 0 ? 16 : std::clamp(16384 / (2 * D * static_cast<int>(sizeof(T))), 16, 32);
// Queries per sweep over K and V (the running maxima and the tiles' scores live on the stack); larger groups
// take several sweeps.
inline constexpr int kMaxSweep = 32;

// Runs CALL with QB (queries in the block) and Full (a full tile of 4 queries) as compile-time constants.
#define KVTRIM_TILE_DISPATCH(qb, full, CALL) \
  do {                                       \
    if ((qb) == 4 && (full)) {               \
      constexpr int QB = 4;                  \
      constexpr bool Full = true;            \
      CALL;                                  \
    } else if ((qb) == 4) {                  \
      constexpr int QB = 4;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else if ((qb) == 3) {                  \
      constexpr int QB = 3;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else if ((qb) == 2) {                  \
      constexpr int QB = 2;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else {                                 \
      constexpr int QB = 1;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    }                                        \
  } while (0)

// One sweep of g <= kMaxSweep queries over all keys and values, in tiles of TL rows and blocks of 4 queries.
// Software-pipelined: the scores of tile t + 1 are computed between tile t's softmax bookkeeping (a chain of
// dependent steps: maximum, rescale, exp) and tile t's weighted sum of values, so the out-of-order core has
// independent FMAs to run while the chain completes. Keys are prefetched while scores are computed, values
// while values are summed.
template <int D, class T>
KVTRIM_AVX2_FN inline void sweep(const T* K, const T* V, int n, int dk, int dv, const float* Q, int g, float scale,
                                 float* P, float* O) {
  constexpr int TL = kTileRows<D, T>;
  alignas(32) float S[2][kMaxSweep / 4][4 * TL];  // scores, then weights, of tiles t (index t & 1) and t + 1
  float m[kMaxSweep];
  std::fill(m, m + g, -INFINITY);
  const std::size_t krow = static_cast<std::size_t>(dk) * sizeof(T), vrow = static_cast<std::size_t>(dv) * sizeof(T);
  const int tiles = (n + TL - 1) / TL, blocks = (g + 3) / 4;
  // The first query block issues the prefetches, one slice per block of keys (columns) it computes.
  const int qb0 = std::min(4, g);
  const int vparts = std::max(1, (D > 0 ? D : dv) / (8 * value_chunks(qb0)));
  auto scores = [&](int t) KVTRIM_AVX2_LAMBDA {
    const int i0 = t * TL, rows = std::min(TL, n - i0);
    const int kparts = qb0 == 4 && rows == TL ? TL / 2 : std::max(1, rows / score_keys(qb0));
    Prefetch pk = prefetch_tile<TL>(K, n, krow, t, kparts), none;
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (score_tile<D, TL, QB, Full>(Q + static_cast<std::size_t>(4 * b) * dk,
                                                        K + static_cast<std::size_t>(i0) * dk, dk, rows, scale,
                                                        S[t & 1][b], b == 0 ? pk : none)));
  };
  scores(0);
  for (int t = 0; t < tiles; ++t) {
    const int i0 = t * TL, rows = std::min(TL, n - i0);
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (softmax_tile<TL, QB, Full>(S[t & 1][b], rows, P + static_cast<std::size_t>(4 * b) * n + i0,
                                                       n, m + 4 * b, O + static_cast<std::size_t>(4 * b) * dv, dv)));
    if (t + 1 < tiles) scores(t + 1);
    Prefetch pv = prefetch_tile<TL>(V, n, vrow, t, vparts), none;
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (value_tile<D, TL, QB, Full>(S[t & 1][b], V + static_cast<std::size_t>(i0) * dv, dv, rows,
                                                        O + static_cast<std::size_t>(4 * b) * dv, b == 0 ? pv : none)));
  }
  for (int a = 0; a < g; ++a) {  // exact probabilities from the stored scores; the output normalised alike
    const float sum = softmax_given_max(P + static_cast<std::size_t>(a) * n, n, m[a]);
    scale_row(O + static_cast<std::size_t>(a) * dv, dv, 1.0f / sum);
  }
}

#undef KVTRIM_TILE_DISPATCH

template <class T>
KVTRIM_AVX2_FN inline void attend(const T* K, const T* V, int n, int dk, int dv, const float* Q, int g, float scale,
                                  float* P, float* O) {
  std::fill(O, O + static_cast<std::size_t>(g) * dv, 0.0f);
  if (n == 0) return;
  for (int q0 = 0; q0 < g; q0 += kMaxSweep) {
    const int gs = std::min(kMaxSweep, g - q0);
    const float* Qs = Q + static_cast<std::size_t>(q0) * dk;
    float* Ps = P + static_cast<std::size_t>(q0) * n;
    float* Os = O + static_cast<std::size_t>(q0) * dv;
    // The common head dims get kernels with the dim known at compile time (no loop tails).
    if (dk == 128 && dv == 128) sweep<128>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
    else if (dk == 64 && dv == 64) sweep<64>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
    else sweep<0>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
  }
}

// n stored elements as floats (exact).
template <class T>
KVTRIM_AVX2_FN inline void widen(const T* in, float* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(in + i));
  for (; i < n; ++i) out[i] = to_float(in[i]);
}

#undef KVTRIM_AVX2_INLINE
#undef KVTRIM_AVX2_LAMBDA
#undef KVTRIM_AVX2_LAMBDA_INLINE
#undef KVTRIM_UNROLL
#undef KVTRIM_AVX2_FN

}  // namespace avx2

// F16C (vcvtph2ps): CPUID leaf 1, ECX bit 29 (not every compiler's __builtin_cpu_supports knows "f16c").
inline bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && ((c >> 29) & 1u);
}

// What the AVX2 path of storage type T needs from the CPU (checked once).
template <StorageType T>
inline bool cpu_has_avx2_path() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         (!std::is_same_v<T, half> || cpu_has_f16c());
  return ok;
}
inline bool cpu_has_avx2_fma() { return cpu_has_avx2_path<float>(); }
#endif  // KVTRIM_X86_AVX2_DISPATCH

// The implementations of attend(). kAvx2 exists on x86-64 with GCC or Clang and runs where the CPU has AVX2
// and FMA (and F16C for half); attend() takes it whenever it can run.
enum class AttendPath { kPortable, kAvx2 };

template <StorageType T>
inline bool attend_available(AttendPath path) {
  if (path == AttendPath::kPortable) return true;
#ifdef KVTRIM_X86_AVX2_DISPATCH
  return cpu_has_avx2_path<T>();
#else
  return false;
#endif
}

// Decode attention of one KV head by the given path (see attend_portable for the layout; a path that is not
// available here runs the portable one); n == 0 gives a zero output.
template <StorageType T>
inline void attend(AttendPath path, const T* K, const std::type_identity_t<T>* V, int n, int dk, int dv,
                   const float* Q, int g, float scale, float* P, float* O) {
#ifdef KVTRIM_X86_AVX2_DISPATCH
  if (path == AttendPath::kAvx2 && cpu_has_avx2_path<T>()) return avx2::attend(K, V, n, dk, dv, Q, g, scale, P, O);
#else
  (void)path;
#endif
  attend_portable(K, V, n, dk, dv, Q, g, scale, P, O);
}

// n stored elements as floats (exact), vectorised where the CPU can.
template <StorageType T>
inline void widen(const T* in, float* out, std::size_t n) {
#ifdef KVTRIM_X86_AVX2_DISPATCH
  if constexpr (!std::is_same_v<T, float>)
    if (cpu_has_avx2_path<T>()) return avx2::widen(in, out, n);
#endif
  to_float(in, out, n);
}
// Every stored row of K [n x d] dotted with x [d], fp32, into out [n] (a merging policy's key cosines). Float rows
// are one Eigen matrix-vector product; 16-bit rows are widened kDotTileRows at a time into `tile` (resized to
// kDotTileRows * d floats: reserve that to keep the call allocation-free), then the same product per tile.
inline constexpr int kDotTileRows = 32;
template <StorageType T>
inline void row_dots(const T* K, int n, int d, const float* x, float* out, std::vector<float>& tile) {
  using Rows = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
  Eigen::Map<const Eigen::VectorXf> xv(x, d);
  if constexpr (std::is_same_v<T, float>) {
    Eigen::Map<Eigen::VectorXf>(out, n).noalias() = Rows(K, n, d) * xv;
  } else {
    tile.resize(static_cast<std::size_t>(kDotTileRows) * d);
    for (int r0 = 0; r0 < n; r0 += kDotTileRows) {
      const int rows = std::min(kDotTileRows, n - r0);
      widen(K + static_cast<std::size_t>(r0) * d, tile.data(), static_cast<std::size_t>(rows) * d);
      Eigen::Map<Eigen::VectorXf>(out + r0, rows).noalias() = Rows(tile.data(), rows, d) * xv;
    }
  }
}

// Decode attention of one KV head by the fastest path this CPU runs.
template <StorageType T>
inline void attend(const T* K, const std::type_identity_t<T>* V, int n, int dk, int dv, const float* Q, int g,
                   float scale, float* P, float* O) {
  attend(AttendPath::kAvx2, K, V, n, dk, dv, Q, g, scale, P, O);
}

}  // namespace kvtrim::detail
