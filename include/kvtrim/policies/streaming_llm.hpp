// kvtrim: StreamingLLM (arXiv 2309.17453) — attention sinks plus a recent window.
//
// Keeps the first `sinks` tokens of the sequence and the `window` most recent tokens; everything in
// between is evicted oldest first. No scores. Choices:
//  - Counted in tokens, not positions: the first `sinks` tokens the cache sees are the sinks (a flag in the
//    slot's metadata), whatever positions the engine gave them, and the window is the `window` newest tokens.
//  - window = 0 (default) means "the rest of the budget": window = budget - sinks for each head.
//  - An explicit window must fit: sinks + window <= budget for every head; then exactly sinks + window
//    tokens are kept even if the budget is larger (keep_limit).
//  - Evicts before attention (like the official cache, which trims before the forward), so each step
//    attends to exactly the sinks and the window, the new token included.
//  - Keys are cached post-RoPE at their original positions (no pos-shift re-rotation).
//  - Rules: a sink is protected, every other token scores 0, so the selection's tie rule evicts the oldest
//    non-sink; a prompt keeps the sinks and its newest tokens, the set a token-by-token stream would keep.
#pragma once

#include <cstdint>
#include <string_view>
#include <tuple>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

struct StreamingLLM {
  struct Params {
    int sinks = 4;
    int window = 0;  // 0: budget - sinks
    static constexpr auto fields() { return std::tuple{field("sinks", &Params::sinks), field("window", &Params::window)}; }
  };
  struct SlotMeta {
    std::uint8_t sink = 0;  // 0 or 1: a byte, not a bool, so that loops over the slots vectorise
  };
  struct State {
    int sinks = 0;
    int sinks_seen = 0;
  };
  static constexpr std::string_view kName = "streaming";
  static constexpr Signals kSignals = Signals::kNone;
  static constexpr EvictTiming kTiming = EvictTiming::kBeforeAttention;

  StreamingLLM(const Params& p, const LayerContext& ctx) : p_(p) {
    KVTRIM_CHECK(p.sinks >= 0, "StreamingLLM: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.window >= 0, "StreamingLLM: window must be >= 0 (0 = rest of the budget), got ", p.window);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h) {
      const int b = ctx.budgets[h];
      if (p.window > 0)
        KVTRIM_CHECK(p.sinks + p.window <= b, "StreamingLLM: sinks (", p.sinks, ") + window (", p.window,
                     ") = ", p.sinks + p.window, " exceeds the budget ", b, " of layer ", ctx.layer, " KV head ", h);
      else
        KVTRIM_CHECK(p.sinks < b, "StreamingLLM: sinks (", p.sinks, ") must leave room for a window in the budget ",
                     b, " of layer ", ctx.layer, " KV head ", h);
    }
  }

  State initial(int, int) const { return {p_.sinks, 0}; }
  int keep_limit(int budget) const { return p_.window > 0 ? p_.sinks + p_.window : budget; }

  // The first `sinks` tokens seen become sinks.
  KVTRIM_HOST_DEVICE static void on_insert(State& s, SlotMeta& m, std::int64_t, const TokenInputs&) {
    m.sink = static_cast<std::uint8_t>(take_first(s.sinks_seen, s.sinks));
  }
  KVTRIM_HOST_DEVICE static bool protects(const State&, const SlotMeta& m, std::int64_t, std::int64_t) {
    return m.sink != 0;
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, SlotMeta&, int, const PromptSums&) { return 0.0f; }

 private:
  Params p_;
};

}  // namespace kvtrim
