// kvtrim: FullCache — never evicts; the budget is the capacity.
//
// The reference every other policy is measured against. A token that would exceed a head's budget is
// rejected with kvtrim::Error before the cache changes (raise the budget or choose an evicting policy).
#pragma once

#include <string_view>

#include "../policy.hpp"

namespace kvtrim {

struct FullCache {
  struct Params {};  // no fields
  struct SlotMeta {};
  struct HeadState {};
  static constexpr std::string_view kName = "full";
  static constexpr Signals kSignals = Signals::kNone;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
  static constexpr bool kNeverEvicts = true;  // KVCache checks capacity before accepting tokens

  FullCache(const Params&, const LayerContext&) {}
  int prompt_window() const { return 0; }
  void on_insert(HeadState&, HeadOf<FullCache>&, const StepContext&) {}
  void on_attention(HeadState&, HeadOf<FullCache>&, const StepContext&, const AttentionRows&) {}
  void evict(HeadState&, HeadOf<FullCache>&, const StepContext&) {}
  void on_prompt(HeadState&, HeadOf<FullCache>&, const PromptContext&) {}
};

}  // namespace kvtrim
