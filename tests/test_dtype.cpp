// 16-bit storage types: conversions against independent references (IEEE 754 decoding formulas for
// to-float, round-to-nearest-even computed in double from the neighbouring representable values for
// from-float).
#include <kvtrim/dtype.hpp>

#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

using kvtrim::bfloat16;
using kvtrim::half;

namespace {

std::uint32_t bits(float f) { return std::bit_cast<std::uint32_t>(f); }
float from_bits(std::uint32_t b) { return std::bit_cast<float>(b); }

// binary16 decoded with the textbook formula, in double.
double half_value(std::uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  double v;
  if (e == 31) v = m == 0 ? INFINITY : NAN;
  else if (e == 0) v = std::ldexp(m, -24);
  else v = std::ldexp(1024 + m, e - 25);
  return sign ? -v : v;
}

// bfloat16 decoded with the textbook formula (8 exponent bits, bias 127, 7 mantissa bits), in double.
double bf16_value(std::uint16_t b) {
  const int sign = b >> 15, e = (b >> 7) & 0xFF, m = b & 0x7F;
  double v;
  if (e == 255) v = m == 0 ? INFINITY : NAN;
  else if (e == 0) v = std::ldexp(m, -133);
  else v = std::ldexp(128 + m, e - 134);
  return sign ? -v : v;
}

// Round-to-nearest-even of x to a format whose finite non-negative values, in increasing order of value,
// are the bit patterns 0..max_bits (values from `value`), with `inf_bits` beyond. `overflow` is the value
// from which x rounds to infinity (the largest finite value plus half an ulp; a tie there goes to infinity,
// whose pattern is even). Returns the bit pattern, sign included (sign_bit is the format's sign mask).
template <class ValueOf>
std::uint16_t reference_round(float x, std::uint16_t max_bits, std::uint16_t inf_bits, std::uint16_t sign_bit,
                              double overflow, ValueOf value) {
  const std::uint16_t sign = std::signbit(x) ? sign_bit : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= overflow) return static_cast<std::uint16_t>(sign | inf_bits);
  // The largest pattern whose value is <= a (binary search over the increasing values).
  std::uint16_t lo = 0, hi = max_bits;
  while (lo < hi) {
    const std::uint16_t mid = static_cast<std::uint16_t>((lo + hi + 1) / 2);
    if (value(mid) <= a) lo = mid;
    else hi = static_cast<std::uint16_t>(mid - 1);
  }
  // Exact, or between the largest finite value and the overflow point: no rounding up.
  if (value(lo) == a || lo == max_bits) return static_cast<std::uint16_t>(sign | lo);
  const std::uint16_t up = static_cast<std::uint16_t>(lo + 1);
  const double below = a - value(lo), above = value(up) - a;  // exact: a and both neighbours are floats
  std::uint16_t r = below < above ? lo : above < below ? up : ((lo & 1) == 0 ? lo : up);
  return static_cast<std::uint16_t>(sign | r);
}

std::uint16_t reference_half(float x) {
  return reference_round(x, 0x7BFF, 0x7C00, 0x8000, 65520.0, [](std::uint16_t b) { return half_value(b); });
}
std::uint16_t reference_bf16(float x) {
  const double overflow = std::ldexp(1.0, 128) - std::ldexp(1.0, 119);  // max 0x7F7F plus half an ulp (2^120 / 2)
  return reference_round(x, 0x7F7F, 0x7F80, 0x8000, overflow, [](std::uint16_t b) { return bf16_value(b); });
}

// Floats that probe a 16-bit format's rounding: every representable value, every midpoint between
// neighbours (ties), one float ulp either side of each midpoint, and both signs.
template <class ValueOf>
std::vector<float> rounding_probes(std::uint16_t max_bits, ValueOf value) {
  std::vector<float> out;
  for (std::uint32_t b = 0; b <= max_bits; ++b) {
    const float v = static_cast<float>(value(static_cast<std::uint16_t>(b)));
    out.push_back(v);
    if (b < max_bits) {
      const double mid = 0.5 * (value(static_cast<std::uint16_t>(b)) + value(static_cast<std::uint16_t>(b + 1)));
      const float m = static_cast<float>(mid);
      if (static_cast<double>(m) != mid) throw std::logic_error("a midpoint is not a float");  // the probes are real ties
      out.push_back(m);
      out.push_back(std::nextafter(m, 0.0f));
      out.push_back(std::nextafter(m, INFINITY));
    }
  }
  const std::size_t k = out.size();
  for (std::size_t i = 0; i < k; ++i) out.push_back(-out[i]);
  return out;
}

}  // namespace

TEST_CASE("storage types are 2-byte trivially copyable values with names", "[dtype]") {
  STATIC_REQUIRE(sizeof(half) == 2);
  STATIC_REQUIRE(sizeof(bfloat16) == 2);
  STATIC_REQUIRE(std::is_trivially_copyable_v<half>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<bfloat16>);
  STATIC_REQUIRE(kvtrim::storage_traits<float>::kName == "float");
  STATIC_REQUIRE(kvtrim::storage_traits<half>::kName == "half");
  STATIC_REQUIRE(kvtrim::storage_traits<bfloat16>::kName == "bf16");
  STATIC_REQUIRE(kvtrim::StorageType<half> && kvtrim::StorageType<bfloat16> && kvtrim::StorageType<float>);
  STATIC_REQUIRE(!kvtrim::StorageType<double>);
  // constexpr conversions
  STATIC_REQUIRE(kvtrim::to_float(half(1.5f)) == 1.5f);
  STATIC_REQUIRE(half(1.0f).bits == 0x3C00);
  STATIC_REQUIRE(bfloat16(-2.0f).bits == 0xC000);
  STATIC_REQUIRE(kvtrim::from_float<float>(0.25f) == 0.25f);
}

TEST_CASE("half -> float is exact for all 65536 bit patterns", "[dtype]") {
  std::vector<std::uint32_t> wrong;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = half::from_bits(static_cast<std::uint16_t>(b));
    const float got = kvtrim::to_float(h);
    const double want = half_value(h.bits);
    const bool sign_ok = std::signbit(got) == ((b & 0x8000) != 0);  // -0 stays -0, NaN keeps its sign
    const bool ok = std::isnan(want) ? std::isnan(got) && sign_ok && (bits(got) & 0x00400000u) != 0 &&  // quiet
                                           ((bits(got) >> 13) & 0x1FFu) == (b & 0x1FFu)  // payload kept
                                     : static_cast<double>(got) == want && sign_ok;
    if (!ok) wrong.push_back(b);
  }
  CAPTURE(wrong.size(), wrong.empty() ? 0u : wrong[0]);
  REQUIRE(wrong.empty());
}

TEST_CASE("bfloat16 -> float is exact for all 65536 bit patterns", "[dtype]") {
  std::vector<std::uint32_t> wrong;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = bfloat16::from_bits(static_cast<std::uint16_t>(b));
    const float got = kvtrim::to_float(h);
    const double want = bf16_value(h.bits);
    const bool ok = std::isnan(want) ? std::isnan(got) && bits(got) == b << 16  // the pattern itself
                                     : static_cast<double>(got) == want && std::signbit(got) == ((b & 0x8000) != 0);
    if (!ok) wrong.push_back(b);
  }
  CAPTURE(wrong.size(), wrong.empty() ? 0u : wrong[0]);
  REQUIRE(wrong.empty());
}

TEST_CASE("float -> half rounds to nearest even (ties, subnormals, overflow)", "[dtype]") {
  std::vector<float> wrong;
  std::size_t checked = 0;
  auto check = [&](float x) {
    const half h(x);
    const bool ok = std::isnan(x) ? std::isnan(kvtrim::to_float(h)) && (h.bits & 0x8000) == (std::signbit(x) ? 0x8000 : 0)
                                  : h.bits == reference_half(x);
    if (!ok) wrong.push_back(x);
    ++checked;
  };
  for (float x : rounding_probes(0x7BFF, half_value)) check(x);
  // Named boundaries: the smallest subnormal and its half (a tie with 0), the subnormal/normal border, the
  // largest half, the overflow tie, infinities, float extremes.
  const float named[] = {0.0f,
                         -0.0f,
                         std::ldexp(1.0f, -24),
                         std::ldexp(1.0f, -25),
                         std::nextafter(std::ldexp(1.0f, -25), 1.0f),
                         std::nextafter(std::ldexp(1.0f, -25), 0.0f),
                         std::ldexp(1.5f, -25),
                         std::ldexp(1.0f, -14),
                         std::nextafter(std::ldexp(1.0f, -14), 0.0f),
                         std::ldexp(1023.5f, -24),
                         65504.0f,
                         65519.99f,
                         65520.0f,
                         65536.0f,
                         FLT_MAX,
                         FLT_MIN,
                         std::numeric_limits<float>::denorm_min(),
                         INFINITY,
                         -INFINITY,
                         NAN,
                         -NAN,
                         from_bits(0x7F800001u),
                         from_bits(0xFFC00001u)};
  for (float x : named) check(x), check(-x);
  // One million random bit patterns (every exponent) and values in the half range.
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) check(from_bits(static_cast<std::uint32_t>(rng())));
  std::uniform_real_distribution<float> wide(-70000.0f, 70000.0f), tiny(-1e-4f, 1e-4f);
  for (int i = 0; i < 100000; ++i) check(wide(rng)), check(tiny(rng));
  CAPTURE(checked, wrong.size(), wrong.empty() ? 0.0f : wrong[0], wrong.empty() ? 0u : bits(wrong[0]));
  REQUIRE(wrong.empty());
}

TEST_CASE("float -> bfloat16 rounds to nearest even (ties, subnormals, overflow)", "[dtype]") {
  std::vector<float> wrong;
  std::size_t checked = 0;
  auto check = [&](float x) {
    const bfloat16 h(x);
    const bool ok = std::isnan(x) ? std::isnan(kvtrim::to_float(h)) && (h.bits & 0x8000) == (std::signbit(x) ? 0x8000 : 0)
                                  : h.bits == reference_bf16(x);
    if (!ok) wrong.push_back(x);
    ++checked;
  };
  for (float x : rounding_probes(0x7F7F, bf16_value)) check(x);
  const float named[] = {0.0f,    -0.0f,   FLT_MAX, std::nextafter(FLT_MAX, 0.0f), FLT_MIN,
                         std::numeric_limits<float>::denorm_min(), INFINITY, NAN,   from_bits(0x7F800001u),
                         from_bits(0x7F7F8000u), from_bits(0x7F7F7FFFu), from_bits(0x3F808000u),
                         from_bits(0x3F818000u)};
  for (float x : named) check(x), check(-x);
  std::mt19937 rng(11);
  for (int i = 0; i < 200000; ++i) check(from_bits(static_cast<std::uint32_t>(rng())));
  CAPTURE(checked, wrong.size(), wrong.empty() ? 0.0f : wrong[0], wrong.empty() ? 0u : bits(wrong[0]));
  REQUIRE(wrong.empty());
}

TEST_CASE("row conversions and round trips", "[dtype]") {
  std::vector<float> x = {0.0f, 1.0f, -2.5f, 3.14159f, 65504.0f, 1e-6f, -1e30f};
  std::vector<half> h(x.size());
  std::vector<bfloat16> b(x.size());
  std::vector<float> back(x.size());
  kvtrim::from_float(x.data(), h.data(), x.size());
  kvtrim::from_float(x.data(), b.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    REQUIRE(h[i] == half(x[i]));
    REQUIRE(b[i] == bfloat16(x[i]));
  }
  kvtrim::to_float(h.data(), back.data(), x.size());
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(back[i] == kvtrim::to_float(h[i]));
  // Every non-NaN half survives half -> float -> half; every bf16 survives bf16 -> float -> bf16.
  int lost = 0;
  for (std::uint32_t v = 0; v < 65536; ++v) {
    const auto hh = half::from_bits(static_cast<std::uint16_t>(v));
    const auto bb = bfloat16::from_bits(static_cast<std::uint16_t>(v));
    if (!std::isnan(kvtrim::to_float(hh)) && half(kvtrim::to_float(hh)).bits != hh.bits) ++lost;
    if (!std::isnan(kvtrim::to_float(bb)) && bfloat16(kvtrim::to_float(bb)).bits != bb.bits) ++lost;
  }
  REQUIRE(lost == 0);
}
