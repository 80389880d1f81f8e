// kvtrim: SimHash — signs of a seeded Gaussian random projection, packed into one 64-bit word.
//
// Two vectors at angle θ agree on each bit with probability 1 − θ/π (Charikar 2002), so the Hamming distance
// between two codes estimates the angle between the vectors. arXiv 2412.16187 uses it to predict,
// before attention, which cached key the current query attends to least.
//
// Contents:
//  - splitmix64 (Steele, Lea, Flood 2014) as the generator and a seed mixer, written out here so a projection
//    is reproducible from its seed on every platform and standard library (std::normal_distribution is not
//    specified bit for bit and differs between libstdc++, libc++ and MSVC).
//  - SimHashProjection: a `bits x dim` matrix of N(0, 1) entries drawn with Box-Muller from splitmix64.
//  - simhash_code(): bit j = [x · row_j >= 0]; an exact 0 maps to bit 1 like that paper's official code
//    (torch.sign then >= 0). Bit j of the result is bit j of the code; bits above `bits` are 0.
//  - hamming(): popcount of the XOR of two codes.
//
// Generation, exactly (so another implementation can reproduce a matrix):
//  state = seed; next() = splitmix64 step (state += 0x9E3779B97F4A7C15, then the mix below).
//  Entries are filled in row-major order (row j = direction of bit j, entry (j, c) at index j * dim + c),
//  two at a time: u1 = ((next() >> 11) + 1) * 2^-53 in (0, 1], u2 = (next() >> 11) * 2^-53 in [0, 1),
//  r = sqrt(-2 ln u1), z0 = r cos(2π u2), z1 = r sin(2π u2), in double, rounded to float. With an odd
//  number of entries the last z1 is dropped. (log/cos/sin come from the C library and may differ in the last
//  ulp between platforms; on one platform the matrix is bit-identical for a seed.)
//  Separate streams (e.g. one per layer) come from simhash_stream_seed(seed, stream), which mixes both so
//  that (seed, stream) pairs never collide the way `seed + stream` would.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "error.hpp"
#include "macros.hpp"

namespace kvtrim {

inline constexpr int kSimHashMaxBits = 64;

// The splitmix64 output function: a bijective 64-bit mix.
KVTRIM_HOST_DEVICE constexpr std::uint64_t splitmix64_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One splitmix64 step: advances `state` and returns the next 64 random bits.
KVTRIM_HOST_DEVICE constexpr std::uint64_t splitmix64_next(std::uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  return splitmix64_mix(state);
}

// Seed of stream `stream` (e.g. a layer index) derived from a user seed.
KVTRIM_HOST_DEVICE constexpr std::uint64_t simhash_stream_seed(std::uint64_t seed, std::uint64_t stream) {
  return splitmix64_mix(seed ^ splitmix64_mix(stream + 0x632BE59BD9B4E019ull));
}

// Number of differing bits between two codes.
KVTRIM_HOST_DEVICE inline int hamming(std::uint64_t a, std::uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __popcll(a ^ b);
#else
  return std::popcount(a ^ b);
#endif
}

// One bit of a code: [x · row >= 0], the dot product accumulated in float, in index order, each product
// rounded before it is added (no fused multiply-add on the device either), so a GPU thread computing one bit
// gets the host's bit exactly.
KVTRIM_HOST_DEVICE inline bool simhash_bit(const float* row, int dim, const float* x) {
  float dot = 0.0f;
#if defined(__CUDA_ARCH__)
  for (int c = 0; c < dim; ++c) dot = __fadd_rn(dot, __fmul_rn(row[c], x[c]));
#else
  for (int c = 0; c < dim; ++c) dot += row[c] * x[c];
#endif
  return dot >= 0.0f;
}

// Packed sign code of x (dim floats) under a `bits x dim` row-major projection: bit j = simhash_bit(row j).
KVTRIM_HOST_DEVICE inline std::uint64_t simhash_code(const float* proj, int dim, int bits, const float* x) {
  std::uint64_t code = 0;
  for (int j = 0; j < bits; ++j)
    if (simhash_bit(proj + static_cast<std::size_t>(j) * static_cast<std::size_t>(dim), dim, x))
      code |= std::uint64_t{1} << j;
  return code;
}

// A fixed Gaussian projection, `bits` directions of width `dim`, reproducible from `seed`.
class SimHashProjection {
 public:
  SimHashProjection() = default;
  SimHashProjection(int dim, int bits, std::uint64_t seed) : dim_(dim), bits_(bits), seed_(seed) {
    KVTRIM_CHECK(dim > 0, "SimHashProjection: dim (key width) must be > 0, got ", dim);
    KVTRIM_CHECK(bits >= 1 && bits <= kSimHashMaxBits, "SimHashProjection: bits must be in 1..", kSimHashMaxBits,
                 " (one packed 64-bit code), got ", bits);
    const std::size_t n = static_cast<std::size_t>(dim) * static_cast<std::size_t>(bits);
    m_.resize(n);
    std::uint64_t state = seed;
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    constexpr double kInv53 = 1.0 / 9007199254740992.0;  // 2^-53
    for (std::size_t i = 0; i < n; i += 2) {
      const double u1 = static_cast<double>((splitmix64_next(state) >> 11) + 1) * kInv53;
      const double u2 = static_cast<double>(splitmix64_next(state) >> 11) * kInv53;
      const double r = std::sqrt(-2.0 * std::log(u1));
      m_[i] = static_cast<float>(r * std::cos(kTwoPi * u2));
      if (i + 1 < n) m_[i + 1] = static_cast<float>(r * std::sin(kTwoPi * u2));
    }
    t_.resize(n);
    for (int j = 0; j < bits; ++j)
      for (int c = 0; c < dim; ++c) t_[static_cast<std::size_t>(c) * bits + j] = at(j, c);
  }

  int dim() const { return dim_; }
  int bits() const { return bits_; }
  std::uint64_t seed() const { return seed_; }
  bool empty() const { return m_.empty(); }
  // Row-major [bits x dim]: row j is the direction of bit j.
  const float* data() const { return m_.data(); }
  float at(int bit, int c) const { return m_[static_cast<std::size_t>(bit) * dim_ + c]; }

  std::uint64_t code(const float* x) const { return simhash_code(m_.data(), dim_, bits_, x); }

  // The same code as code(x), bit for bit (each bit's products rounded and summed in index order), computed from
  // the transposed matrix so that the bits accumulate side by side: the loop over bits vectorises, the order
  // within each bit is unchanged. For hot paths on the host (and inlined into vectorised callers).
  // The usual code lengths get a compile-time width, so the accumulators stay in registers.
  KVTRIM_ALWAYS_INLINE std::uint64_t code_by_columns(const float* x) const {
    switch (bits_) {
      case 8: return columns<8>(x, 8);
      case 16: return columns<16>(x, 16);
      case 32: return columns<32>(x, 32);
      case 64: return columns<64>(x, 64);
      default: return columns<kSimHashMaxBits>(x, bits_);
    }
  }

 private:
  // code_by_columns for `bits` (<= B) bits.
  template <int B>
  KVTRIM_ALWAYS_INLINE std::uint64_t columns(const float* x, int bits) const {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
    if constexpr (B % 8 == 0 && B < kSimHashMaxBits + 1) {
      if (bits == B) {
        // GNU vector extensions: the compilers leave the portable loop below scalar-ish (0.40 us per 16-bit code
        // at width 64 against 0.05 this way, on this project's AVX2 machine). Same arithmetic, lane by lane.
        typedef float Lanes __attribute__((vector_size(32)));
        Lanes acc[B / 8] = {};
        const float* t = t_.data();
        for (int c = 0; c < dim_; ++c) {
          const float xc = x[c];
          const float* col = t + static_cast<std::size_t>(c) * B;
          for (int k = 0; k < B / 8; ++k) {
            Lanes v;
            std::memcpy(&v, col + 8 * k, sizeof v);
            acc[k] += v * xc;
          }
        }
        float a[B];
        std::memcpy(a, acc, sizeof a);
        std::uint64_t code = 0;
        for (int j = 0; j < B; ++j) code |= static_cast<std::uint64_t>(a[j] >= 0.0f) << j;
        return code;
      }
    }
#endif
    float acc[B] = {};
    const float* t = t_.data();
    for (int c = 0; c < dim_; ++c) {
      const float xc = x[c];
      const float* col = t + static_cast<std::size_t>(c) * bits;
      for (int j = 0; j < (B == kSimHashMaxBits ? bits : B); ++j) acc[j] += col[j] * xc;
    }
    std::uint64_t code = 0;
    for (int j = 0; j < bits; ++j) code |= static_cast<std::uint64_t>(acc[j] >= 0.0f) << j;
    return code;
  }

  int dim_ = 0, bits_ = 0;
  std::uint64_t seed_ = 0;
  std::vector<float> m_;
  std::vector<float> t_;  // the transpose, [dim x bits]
};

}  // namespace kvtrim
