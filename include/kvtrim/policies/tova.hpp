// kvtrim: TOVA — Token Omission Via Attention (arXiv 2401.06104).
//
// After each decode step's attention, a head over budget drops the token that the *current* query attends
// to least. Nothing accumulates across steps: a token that mattered before but not now can go.
//
// Parameters (defaults):
//  - group_reduce (kMean): GQA rule turning the g query heads of a KV head into one probability per slot
//    (mean, sum or max). The paper averages over all heads of the layer.
//  - sinks (0): the first `sinks` positions are never evicted (the paper has none).
//  - recent (0): the `recent` newest positions are never evicted. 0 is the paper (the new token itself can
//    be dropped if it gets the least attention); 1 is kvpress's TOVAPress, which always keeps the last token.
//
// Choices where the paper / official code is silent or differs from this library:
//  - Per KV head, not per layer: the paper (and official code) averages the last query's attention over all
//    heads of the layer and evicts the same token from every head. Our cache keeps one token set per KV head
//    and a policy sees one KV head at a time, so each KV head drops its own least-attended token, scored by
//    its own query group. A layer-wise variant needs a layer-level eviction hook in the core (not available).
//  - Evicts after attention (the step attends to budget + 1 tokens, the new one included, as in the paper).
//  - Prefill: the prompt is cut with the attention row of the last prompt query (prompt_window() = 1, the
//    official code reduces after every forward, the prompt's included), keeping the protected tokens and the
//    top-scored others (newest on ties). Ties in decode: the oldest position goes first (select.hpp).
//  - The score is this step's probability (fp32) stored in SlotMeta between attention and eviction.
#pragma once

#include <cstdint>
#include <string_view>
#include <tuple>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

struct TOVA {
  struct Params {
    GroupReduce group_reduce = GroupReduce::kMean;
    int sinks = 0;
    int recent = 0;
    static constexpr auto fields() {
      return std::tuple{field("group_reduce", &Params::group_reduce), field("sinks", &Params::sinks),
                        field("recent", &Params::recent)};
    }
  };
  struct SlotMeta {
    float attention = 0.0f;  // group-reduced probability from the latest query
  };
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static constexpr std::string_view kName = "tova";
  static constexpr Signals kSignals = Signals::kAttention;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;

  TOVA(const Params& p, const LayerContext& ctx) : p_(p) {
    KVTRIM_CHECK(p.sinks >= 0, "TOVA: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.recent >= 0, "TOVA: recent must be >= 0, got ", p.recent);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks + p.recent <= ctx.budgets[h], "TOVA: sinks (", p.sinks, ") + recent (", p.recent,
                   ") = ", p.sinks + p.recent, " exceeds the budget ", ctx.budgets[h], " of layer ", ctx.layer,
                   " KV head ", h);
  }

  State initial(int, int) const { return {Protection{p_.sinks, p_.recent}, p_.group_reduce}; }
  int prompt_window() const { return 1; }

  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta& m, std::int64_t, std::int64_t) {
    return m.attention;
  }
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s) { return s.reduce; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, SlotMeta& m, float p) { m.attention = p; }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int t, const PromptSums& in) {
    return m.attention = in.win.reduce(t, s.reduce);
  }

 private:
  Params p_;
};

}  // namespace kvtrim
