// kvtrim CUDA backend: the device side of kvtrim/policies/tova.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/tova.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// TOVA: this step's (group-reduced) probability; the prompt uses the last prompt query's row (window 1).
template <>
struct DevicePolicy<TOVA> {
  static constexpr bool kDefined = true;
  using Meta = TOVA::SlotMeta;
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static State initial(const TOVA& pol, const TOVA::Params& p, int, int) { return {pol.protection(), p.group_reduce}; }
  static int keep_limit(const TOVA&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta& m, std::int64_t, std::int64_t) {
    return m.attention;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    m.attention = rows.reduce(slot, s.reduce);
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    return m.attention = in.win.reduce(t, s.reduce);
  }
};

}  // namespace kvtrim::gpu
