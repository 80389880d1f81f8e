// kvtrim: decode attention on the CPU, one KV head at a time.
//
// attend<T>() computes the g queries of one KV head's group against the head's n kept keys and values, stored
// as T (float, kvtrim::half or kvtrim::bfloat16; rows contiguous): scores scaled by `scale`, a max-subtracted
// softmax whose probabilities are left in P for the policy, and the probability-weighted sum of the values.
// Queries, probabilities and outputs are fp32, and so is every accumulation.
//
// On x86-64 with GCC or Clang a hand-vectorised path is chosen at run time: AVX-512F where the CPU has it,
// else AVX2+FMA (F16C for half). The library is built without -march flags, so the compiler alone would use
// SSE2 only; elsewhere a portable path runs. The two x86 paths are one kernel (cpu_attention_x86.inl) built
// for each instruction set, with bit-identical results. It reads every key and value row exactly once per call,
// in one pass: tiles of keys and values that stay in L1, each tile's scores meet the tile's values at once
// under a running maximum (online softmax, the output rescaled when the maximum grows), and a last pass
// over the stored scores, which are still in cache, writes the exact probabilities exp(s - max) / sum into P
// and normalises the output. The portable path computes the same softmax from the same scores; results differ
// from the x86 kernel's only by fp32 rounding (a few ulp).
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
#define KVTRIM_SIMD_TARGET "avx2,fma,f16c"
#define KVTRIM_SIMD_WIDE 0
#include "cpu_attention_x86.inl"
}  // namespace avx2

namespace avx512 {
#define KVTRIM_SIMD_TARGET "avx512f,avx2,fma,f16c"
#define KVTRIM_SIMD_WIDE 1
#include "cpu_attention_x86.inl"
}  // namespace avx512

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
// The AVX-512 path adds 512-bit registers (AVX-512F; the OS must save them, which the builtin checks).
template <StorageType T>
inline bool cpu_has_avx512_path() {
  static const bool ok = cpu_has_avx2_path<T>() && cpu_has_f16c() && __builtin_cpu_supports("avx512f");
  return ok;
}
#endif  // KVTRIM_X86_AVX2_DISPATCH

// The implementations of attend(). kAvx2 and kAvx512 exist on x86-64 with GCC or Clang: kAvx2 runs where the CPU
// has AVX2 and FMA (and F16C for half), kAvx512 where it also has AVX-512F. The two give bit-identical results
// (cpu_attention_x86.inl says how), so which one a CPU takes never changes a decision; attend() takes the widest
// that can run, since CPUs with 512-bit multiply-add units run twice the multiply-adds in it.
enum class AttendPath { kPortable, kAvx2, kAvx512 };

template <StorageType T>
inline bool attend_available(AttendPath path) {
  if (path == AttendPath::kPortable) return true;
#ifdef KVTRIM_X86_AVX2_DISPATCH
  return path == AttendPath::kAvx2 ? cpu_has_avx2_path<T>() : cpu_has_avx512_path<T>();
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
  if (path == AttendPath::kAvx512 && cpu_has_avx512_path<T>())
    return avx512::attend(K, V, n, dk, dv, Q, g, scale, P, O);
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
// Every stored row of K [n x d] dotted with x [d], fp32, into out [n] (a merging policy's key cosines).
// The portable way: float rows are one Eigen matrix-vector product; 16-bit rows are widened kDotTileRows at a time
// into `tile` (resized to kDotTileRows * d floats: reserve that to keep the call allocation-free), then the same
// product per tile.
inline constexpr int kDotTileRows = 32;
template <StorageType T>
inline void row_dots_portable(const T* K, int n, int d, const float* x, float* out, std::vector<float>& tile) {
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
// The same, by one x86 kernel where the CPU has AVX2 and FMA (the same bits on every such CPU), else portably.
template <StorageType T>
inline void row_dots(const T* K, int n, int d, const float* x, float* out, std::vector<float>& tile) {
#ifdef KVTRIM_X86_AVX2_DISPATCH
  if (cpu_has_avx2_path<T>()) {
    if (d == 64) return avx2::row_dots<64>(K, n, d, x, out);
    if (d == 128) return avx2::row_dots<128>(K, n, d, x, out);
    return avx2::row_dots<0>(K, n, d, x, out);
  }
#endif
  row_dots_portable(K, n, d, x, out, tile);
}

// Decode attention of one KV head by the fastest path this CPU runs.
template <StorageType T>
inline void attend(const T* K, const std::type_identity_t<T>* V, int n, int dk, int dv, const float* Q, int g,
                   float scale, float* P, float* O) {
  static const AttendPath best = attend_available<T>(AttendPath::kAvx512) ? AttendPath::kAvx512
                                 : attend_available<T>(AttendPath::kAvx2) ? AttendPath::kAvx2
                                                                          : AttendPath::kPortable;
  attend(best, K, V, n, dk, dv, Q, g, scale, P, O);
}

}  // namespace kvtrim::detail
