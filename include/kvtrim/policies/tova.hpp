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
//  - The score is this step's probability (fp32) stored in SlotMeta between on_attention and evict.
#pragma once

#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"
#include "h2o.hpp"  // group_probability

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
  struct HeadState {
    int victim = -1;        // found by on_attention's pass when the step leaves the head one over budget
    std::vector<int> keep;  // prompt-compression scratch
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

  const Params& params() const { return p_; }
  Protection protection() const { return Protection{p_.sinks, p_.recent}; }

  int prompt_window() const { return 1; }

  void on_insert(HeadState&, HeadOf<TOVA>& h, const StepContext& step) { h.meta(step.slot) = SlotMeta{}; }

  // Stores the step's probabilities; when the head is one over budget the same pass finds the victim
  // (lowest among unprotected slots, oldest on ties, the select.hpp rule), so evict needs no second pass.
  void on_attention(HeadState& s, HeadOf<TOVA>& h, const StepContext&, const AttentionRows& rows) {
    s.victim = -1;
    if (h.size() != h.budget() + 1) {
      for (int i = 0; i < rows.n; ++i) h.meta(i).attention = group_probability(rows, i, p_.group_reduce);
      return;
    }
    const Protection pr = protection();
    const std::int64_t newest = h.newest_pos();
    float best = 0.0f;
    std::int64_t best_pos = 0;
    for (int i = 0; i < rows.n; ++i) {
      const float a = group_probability(rows, i, p_.group_reduce);
      h.meta(i).attention = a;
      const std::int64_t pos = h.pos(i);
      if (pr.protects(pos, newest)) continue;
      if (s.victim < 0 || evicts_before(a, pos, best, best_pos)) {
        s.victim = i;
        best = a;
        best_pos = pos;
      }
    }
  }

  void evict(HeadState& s, HeadOf<TOVA>& h, const StepContext&) {
    if (h.size() <= h.budget()) return;
    if (s.victim >= 0 && h.size() == h.budget() + 1) {
      h.remove(s.victim);
      s.victim = -1;
      return;
    }
    evict_lowest_until_budget(h, protection(), [&](int i) { return h.meta(i).attention; }, "TOVA");
  }

  void on_prompt(HeadState& s, HeadOf<TOVA>& h, const PromptContext& prompt) {
    KVTRIM_CHECK(prompt.window_sum != nullptr && prompt.window == 1 && prompt.n_tokens == h.size(),
                 "internal: TOVA needs the last prompt query's attention row for every held token");
    for (int j = 0; j < h.size(); ++j) h.meta(j).attention = prompt.reduce_win(j, p_.group_reduce);
    keep_top_scored(h, protection(), [&](int i) { return h.meta(i).attention; }, s.keep, "TOVA");
  }

 private:
  Params p_;
};

}  // namespace kvtrim
