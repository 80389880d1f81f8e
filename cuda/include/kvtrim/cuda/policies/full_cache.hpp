// kvtrim CUDA backend: the device side of kvtrim/policies/full_cache.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/full_cache.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// FullCache: never evicts; every token protected.
template <>
struct DevicePolicy<FullCache> {
  static constexpr bool kDefined = true;
  using Meta = FullCache::SlotMeta;
  struct State {};
  static State initial(const FullCache&, const FullCache::Params&, int, int) { return {}; }
  static int keep_limit(const FullCache&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta&, std::int64_t, std::int64_t) { return true; }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta&, int, const PromptSums&) {
    return 0.0f;
  }
};

}  // namespace kvtrim::gpu
