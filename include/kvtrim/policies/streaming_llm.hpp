// kvtrim: StreamingLLM (arXiv 2309.17453) — attention sinks plus a recent window.
//
// Keeps the first `sinks` tokens of the sequence and the `window` most recent tokens; everything in
// between is evicted oldest first. No scores. Choices:
//  - Counted in tokens, not positions: the first `sinks` tokens the cache sees are the sinks, whatever
//    positions the engine gave them, and the window is the `window` newest tokens.
//  - window = 0 (default) means "the rest of the budget": window = budget - sinks for each head.
//  - An explicit window must fit: sinks + window <= budget for every head; then exactly sinks + window
//    tokens are kept even if the budget is larger.
//  - Evicts before attention (like the official cache, which trims before the forward), so each step
//    attends to exactly the sinks and the window, the new token included.
//  - Keys are cached post-RoPE at their original positions (no pos-shift re-rotation).
//  - Prefill keeps the set a token-by-token stream would keep: sinks + the last `window` prompt tokens.
#pragma once

#include <string_view>
#include <vector>

#include "../policy.hpp"

namespace kvtrim {

// Per-token StreamingLLM math (shared with device code): the first `sinks` tokens seen become sinks.
KVTRIM_HOST_DEVICE inline void streaming_mark_sink(int& sinks_seen, int sinks, bool& sink) {
  if (sinks_seen < sinks) {
    sink = true;
    ++sinks_seen;
  }
}

struct StreamingLLM {
  struct Params {
    int sinks = 4;
    int window = 0;  // 0: budget - sinks
    static constexpr auto fields() { return std::tuple{field("sinks", &Params::sinks), field("window", &Params::window)}; }
  };
  struct SlotMeta {
    bool sink = false;
  };
  struct HeadState {
    int sinks_seen = 0;
    std::vector<int> keep;  // prompt-compression scratch
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

  int prompt_window() const { return 0; }
  int capacity(int budget) const { return p_.window > 0 ? p_.sinks + p_.window : budget; }

  void on_insert(HeadState& s, HeadOf<StreamingLLM>& h, const StepContext& step) {
    streaming_mark_sink(s.sinks_seen, p_.sinks, h.meta(step.slot).sink);
  }
  void on_attention(HeadState&, HeadOf<StreamingLLM>&, const StepContext&, const AttentionRows&) {}

  // One token in, at most one out: the oldest non-sink.
  void evict(HeadState&, HeadOf<StreamingLLM>& h, const StepContext&) {
    while (h.size() > capacity(h.budget())) {
      int victim = -1;
      for (int i = 0; i < h.size(); ++i)
        if (!h.meta(i).sink && (victim < 0 || h.pos(i) < h.pos(victim))) victim = i;
      h.remove(victim);  // a non-sink exists: sinks < capacity
    }
  }

  // The prompt sits in slots 0..T-1 in order: keep the sinks and the last window tokens in one pass.
  void on_prompt(HeadState& s, HeadOf<StreamingLLM>& h, const PromptContext&) {
    const int cap = capacity(h.budget());
    if (h.size() <= cap) return;
    s.keep.clear();
    for (int i = 0; i < h.size(); ++i)
      if (h.meta(i).sink || i >= h.size() - (cap - p_.sinks)) s.keep.push_back(i);
    h.keep_only(s.keep);
  }

 private:
  Params p_;
};

}  // namespace kvtrim
