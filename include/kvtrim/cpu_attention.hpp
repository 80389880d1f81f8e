// kvtrim: decode attention on the CPU, one KV head at a time.
//
// attend() computes the g queries of one KV head's group against the head's n kept keys and values (rows
// contiguous): scores scaled by 1/sqrt(head_dim), a max-subtracted softmax in fp32 whose probabilities are
// left in P for the policy, and the weighted sum of values. Memory traffic per call: every key row once (scores
// of all g queries, in tiles of keys that stay in L1), the g x n probabilities (L2), every value row once
// (tiles of values reused from L1 for all queries and columns).
//
// On x86-64 with GCC or Clang a hand-vectorised AVX2+FMA path is chosen at run time when the CPU has it (the
// library is built without -march flags, so the compiler alone would use SSE2 only); elsewhere a portable
// Eigen path runs. Both compute the same thing with the same reduction structure per query; results differ
// only by fp32 rounding (a few ulp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "head_store.hpp"  // RowMajorMatrixXf

#if !defined(KVTRIM_NO_SIMD) && !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__x86_64__)
#define KVTRIM_X86_AVX2_DISPATCH 1
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


}  // namespace kvtrim::detail
