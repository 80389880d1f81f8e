// kvtrim: host storage types for keys and values: float, kvtrim::half (IEEE 754 binary16) and
// kvtrim::bfloat16 (the upper half of a binary32).
//
// half and bfloat16 are 2-byte trivially copyable wrappers around their bit pattern, so rows of them can be
// memcpy'd, stored in std::vector and read by the SIMD kernels directly. Conversion to float is exact (every
// half and every bfloat16 is a float); conversion from float rounds to nearest, ties to even, overflows to
// infinity as IEEE 754 prescribes, keeps the sign of zero and turns NaN into a quiet NaN of the same sign.
// The conversions are scalar and portable (no F16C needed); the decode kernels read these types with
// vector instructions where the CPU has them and give the same floats.
//
// Generic code converts with kvtrim::to_float(x) and kvtrim::from_float<T>(f) (both also accept float) and
// names a type with storage_traits<T>::kName ("float", "half", "bf16").
#pragma once

#include "config.hpp"  // first: its C++20 check stops older compilers with one message

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kvtrim {

namespace detail {

// binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
constexpr float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F)  // Inf, or NaN with its payload kept and the quiet bit set (as vcvtph2ps does)
    return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u));
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));  // 112 = 127 - 15
  // Zero or subnormal: mant * 2^-24, exact in float (and computed without a float multiply, so it does
  // not depend on the floating-point environment's denormal flags).
  if (mant == 0) return std::bit_cast<float>(sign);
  const int shift = std::countl_zero(mant) - 21;  // brings the leading 1 to bit 10
  const std::uint32_t m = (mant << shift) & 0x3FFu;
  const std::uint32_t e = static_cast<std::uint32_t>(113 - shift);  // 2^-14 has biased exponent 113
  return std::bit_cast<float>(sign | (e << 23) | (m << 13));
}

constexpr std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u)  // NaN: quiet, top payload bits kept
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520 (or Inf): Inf
  if (ax >= 0x38800000u) {  // normal half (>= 2^-14): rebias the exponent, round the 13 dropped bits
    const std::uint32_t odd = (ax >> 13) & 1u;
    return static_cast<std::uint16_t>(sign | ((ax - 0x38000000u + 0x0FFFu + odd) >> 13));
  }
  if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 (a tie with 0): zero
  // Subnormal half: value = m * 2^(e - 150) = (m >> s) units of 2^-24, with s = 126 - e in 14..24.
  const std::uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
  const std::uint32_t s = 126 - e;
  std::uint32_t q = m >> s;
  const std::uint32_t rest = m & ((1u << s) - 1), halfway = 1u << (s - 1);
  if (rest > halfway || (rest == halfway && (q & 1u))) ++q;  // may carry into the smallest normal: correct
  return static_cast<std::uint16_t>(sign | q);
}

constexpr float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

constexpr std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: quiet, sign and top payload bits kept
    return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  // Round the low 16 bits to nearest even; a carry moves into the exponent (up to Inf) as it should.
  return static_cast<std::uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace detail

// IEEE 754 binary16 storage. Arithmetic is done in float: convert with to_float / from_float.
struct half {
  std::uint16_t bits;

  half() = default;  // trivial, like float: uninitialised unless value-initialised
  explicit constexpr half(float f) : bits(detail::float_to_half_bits(f)) {}
  explicit constexpr operator float() const { return detail::half_bits_to_float(bits); }
  static constexpr half from_bits(std::uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
  friend constexpr bool operator==(half a, half b) { return a.bits == b.bits; }  // bitwise
};

// bfloat16 storage: the upper 16 bits of a float (8 exponent bits, 7 mantissa bits).
struct bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  explicit constexpr bfloat16(float f) : bits(detail::float_to_bf16_bits(f)) {}
  explicit constexpr operator float() const { return detail::bf16_bits_to_float(bits); }
  static constexpr bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  friend constexpr bool operator==(bfloat16 a, bfloat16 b) { return a.bits == b.bits; }  // bitwise
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half> && std::is_trivial_v<half>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16> && std::is_trivial_v<bfloat16>);

template <class T>
struct storage_traits;  // defined for the storage types below only
template <>
struct storage_traits<float> {
  static constexpr std::string_view kName = "float";
};
template <>
struct storage_traits<half> {
  static constexpr std::string_view kName = "half";
};
template <>
struct storage_traits<bfloat16> {
  static constexpr std::string_view kName = "bf16";
};

// The types keys and values can be stored as on the CPU.
template <class T>
concept StorageType = std::same_as<T, float> || std::same_as<T, half> || std::same_as<T, bfloat16>;

constexpr float to_float(float x) { return x; }
constexpr float to_float(half x) { return static_cast<float>(x); }
constexpr float to_float(bfloat16 x) { return static_cast<float>(x); }

template <StorageType T>
constexpr T from_float(float f) {
  return T(f);
}

// Row conversions (n elements), e.g. for storing an engine's fp32 row as T or reading one back.
template <StorageType T>
constexpr void from_float(const float* in, T* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = T(in[i]);
}
template <StorageType T>
constexpr void to_float(const T* in, float* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_float(in[i]);
}

// The 16-bit types an engine's activations (queries, keys, values, attention outputs) may come in.
template <class A>
concept Activation16 = std::same_as<A, half> || std::same_as<A, bfloat16>;

namespace detail {
// Float copies of a call's 16-bit rows and its float output, kept between calls (after the first call of a given
// size nothing is allocated).
struct WidenedRows {
  std::vector<float> in[3], out;
  template <Activation16 A>
  std::span<const float> widen(int i, std::span<const A> x) {
    std::vector<float>& b = in[i];
    b.resize(x.size());
    to_float(x.data(), b.data(), x.size());
    return b;
  }
  std::span<float> output(std::size_t n) {
    out.resize(n);
    return out;
  }
  // Rounds the float output into the caller's 16-bit span (after the call succeeded).
  template <Activation16 A>
  void narrow(std::span<A> y) const {
    from_float(out.data(), y.data(), y.size());
  }
};
}  // namespace detail

}  // namespace kvtrim
