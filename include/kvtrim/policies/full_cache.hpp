// kvtrim: FullCache — never evicts; the budget is the capacity.
//
// The reference every other policy is measured against. A token that would exceed a head's budget is
// rejected with kvtrim::Error before the cache changes (raise the budget or choose an evicting policy).
#pragma once

#include <cstdint>
#include <string_view>

#include "../policy.hpp"

namespace kvtrim {

struct FullCache {
  struct Params {};  // no fields
  struct SlotMeta {};
  struct State {};
  static constexpr std::string_view kName = "full";
  static constexpr Signals kSignals = Signals::kNone;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
  static constexpr bool kNeverEvicts = true;  // KVCache checks capacity before accepting tokens

  FullCache(const Params&, const LayerContext&) {}
  State initial(int, int) const { return {}; }

  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return true; }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, SlotMeta&, int, const PromptSums&) { return 0.0f; }
};

}  // namespace kvtrim
