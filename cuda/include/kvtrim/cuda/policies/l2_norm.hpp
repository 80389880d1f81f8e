// kvtrim CUDA backend: the device side of kvtrim/policies/l2_norm.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/l2_norm.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// L2Norm: key norm at insertion (key_l2_norm from l2_norm.hpp), largest norm evicted first (score = -norm).
// A skipped layer falls back to "oldest non-sink" as on the CPU: score 0 and only the sinks protected.
template <>
struct DevicePolicy<L2Norm> {
  static constexpr bool kDefined = true;
  using Meta = L2Norm::SlotMeta;
  struct State {
    Protection protect;
    bool skipped = false;
  };
  static State initial(const L2Norm& pol, const L2Norm::Params& p, int, int) {
    return {Protection{p.sinks, p.recent}, pol.skipped()};
  }
  static int keep_limit(const L2Norm&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta& m, std::int64_t, const TokenInputs& in) {
    m.norm = key_l2_norm(in.key, in.d);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.skipped ? pos < s.protect.sinks : s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t, std::int64_t) {
    return s.skipped ? 0.0f : -m.norm;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int, const PromptSums&) {
    return s.skipped ? 0.0f : -m.norm;
  }
};

}  // namespace kvtrim::gpu
