// libFuzzer target: EigenBasis::from_bytes (the Eigen Attention basis file parser) on arbitrary bytes, and a
// cache built from whatever it accepts. Success or kvtrim::Error are fine; a crash, a sanitizer report or another
// exception type is a finding. A basis that loads must round-trip through to_bytes() unchanged.
#include <kvtrim/kvtrim.hpp>
#include <kvtrim/policies/eigen_attention.hpp>

#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto basis = kvtrim::EigenBasis::from_bytes(std::span<const unsigned char>(data, size));
    if constexpr (requires { basis.to_bytes(); }) {
      const auto again = basis.to_bytes();
      if (again.size() != size || !std::equal(again.begin(), again.end(), data)) __builtin_trap();
    }
  } catch (const kvtrim::Error&) {
  }
  return 0;
}
