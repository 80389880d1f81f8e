// kvtrim: H2O — Heavy-Hitter Oracle (arXiv 2306.14048).
//
// Every kept token carries, per KV head, the attention probability it has received so far (summed over all
// queries that saw it, prompt rows included). The cache keeps the `recent` newest tokens plus the heavy
// hitters: when a step leaves a head over budget, the unprotected token with the smallest accumulated score
// goes (one token per step, as in the paper's greedy rule; the official real-drop code keeps the top-`hh`
// by the same score, which is the same set when one token arrives per step).
//
// Parameters (defaults):
//  - heavy_ratio (0.5): share of the budget left after the sinks that goes to heavy hitters; the rest is the
//    recent window. heavy = floor(heavy_ratio * (budget - sinks)), recent = budget - sinks - heavy, per head.
//    0.5 is the paper's 50/50 split; 0 gives a pure sliding window (plus sinks); 1 gives pure accumulated score.
//  - sinks (0): the first `sinks` positions are never evicted. The paper and official code have none
//    (early tokens survive on their large scores); Cold-Compress protects 4.
//  - group_reduce (kMean): GQA rule turning the g query heads of a KV head into one probability per slot and
//    step (mean, sum or max). Keys are stored once per KV head, never duplicated.
//  - normalize (false): rank by score / (number of queries that saw the token), the kvpress / Cold-Compress
//    average. Off = the paper's and official code's raw sum.
//
// Choices where the paper / official code is silent or ambiguous:
//  - Evicts after attention, so the step's own probabilities count before the decision (as the official
//    code), and the new token starts with its self-attention weight. A slot reused for a new token starts
//    from score 0 (on_insert resets it) — no stale score from the evicted token.
//  - The recent window and the sinks are counted in positions (select.hpp's Protection): with no gaps in
//    positions that is the `recent` newest tokens. Ties: the oldest position is evicted first (select.hpp).
//  - Scores are fp32 (float), accumulated per KV head after the group reduction of each step. For kMean and
//    kSum that equals reducing per-query-head sums; for kMax it is the sum over steps of the per-step group
//    maximum (keeping g accumulators per slot would cost g floats per token).
//  - Prefill: scores start from the column sums of the exact causal prompt attention (reduced over the
//    group with the same rule; for kMax that is the max of the query heads' column sums, the per-row max is
//    not available from column sums), and the prompt is cut to budget in one pass keeping the protected
//    tokens plus the top-scored others (newest on ties). The number of queries that saw a prompt token is
//    newest_pos - pos + 1 (read from positions, so it stays right after a SnapKV-style compaction).
//  - Cost per decode step and KV head: one pass over the slots that accumulates and finds the victim
//    (no allocation, no second scan); the fallback evict_lowest_until_budget only runs if more than one
//    token must go.
//  - Budgets are absolute token counts per head (the official mask version uses fractions of the prompt
//    length; give the cache a budget of ratio * prompt length to reproduce that).
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

// Per-token H2O math (shared with device code): one step's probability joins the running sum.
KVTRIM_HOST_DEVICE inline void h2o_accumulate(float& score, std::int32_t& seen, float p) {
  score += p;
  ++seen;
}
// The value H2O ranks a slot by: the raw sum, or the average over the queries that saw it.
KVTRIM_HOST_DEVICE inline float h2o_rank(float score, std::int32_t seen, bool normalize) {
  return normalize && seen > 0 ? score / static_cast<float>(seen) : score;
}
// The group-reduced probability of slot i; a single query head (MHA) skips the reduction loop.
KVTRIM_HOST_DEVICE inline float group_probability(const AttentionRows& rows, int i, GroupReduce how) {
  return rows.group == 1 ? rows.p[i] : rows.reduce(i, how);
}
// Heavy-hitter share of a head's budget.
KVTRIM_HOST_DEVICE inline int h2o_heavy_slots(int budget, int sinks, double heavy_ratio) {
  return static_cast<int>(std::floor(heavy_ratio * static_cast<double>(budget - sinks) + 1e-9));
}
KVTRIM_HOST_DEVICE inline int h2o_recent_slots(int budget, int sinks, double heavy_ratio) {
  return budget - sinks - h2o_heavy_slots(budget, sinks, heavy_ratio);
}

struct H2O {
  struct Params {
    double heavy_ratio = 0.5;
    int sinks = 0;
    GroupReduce group_reduce = GroupReduce::kMean;
    bool normalize = false;
    static constexpr auto fields() {
      return std::tuple{field("heavy_ratio", &Params::heavy_ratio), field("sinks", &Params::sinks),
                        field("group_reduce", &Params::group_reduce), field("normalize", &Params::normalize)};
    }
  };
  struct SlotMeta {
    float score = 0.0f;     // accumulated (group-reduced) attention probability
    std::int32_t seen = 0;  // queries that attended to this token (for the normalised ranking)
  };
  struct HeadState {
    int victim = -1;        // found by on_attention's pass when the step leaves the head one over budget
    std::vector<int> keep;  // prompt-compression scratch
  };
  static constexpr std::string_view kName = "h2o";
  static constexpr Signals kSignals = Signals::kAttention;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;

  H2O(const Params& p, const LayerContext& ctx) : p_(p) {
    KVTRIM_CHECK(p.heavy_ratio >= 0.0 && p.heavy_ratio <= 1.0, "H2O: heavy_ratio must be in [0, 1], got ",
                 p.heavy_ratio);
    KVTRIM_CHECK(p.sinks >= 0, "H2O: sinks must be >= 0, got ", p.sinks);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks < ctx.budgets[h], "H2O: sinks (", p.sinks, ") must be smaller than the budget ",
                   ctx.budgets[h], " of layer ", ctx.layer, " KV head ", h, " (leave room for other tokens)");
  }

  const Params& params() const { return p_; }
  int heavy(int budget) const { return h2o_heavy_slots(budget, p_.sinks, p_.heavy_ratio); }
  int recent(int budget) const { return h2o_recent_slots(budget, p_.sinks, p_.heavy_ratio); }
  Protection protection(int budget) const { return Protection{p_.sinks, recent(budget)}; }
  float rank(const SlotMeta& m) const { return h2o_rank(m.score, m.seen, p_.normalize); }

  int prompt_window() const { return 0; }

  void on_insert(HeadState&, HeadOf<H2O>& h, const StepContext& step) { h.meta(step.slot) = SlotMeta{}; }

  // Accumulates the step's probabilities; when the head is one over budget the same pass finds the victim
  // (lowest rank among unprotected slots, oldest on ties, the select.hpp rule), so evict needs no second pass.
  void on_attention(HeadState& s, HeadOf<H2O>& h, const StepContext&, const AttentionRows& rows) {
    s.victim = -1;
    if (h.size() != h.budget() + 1) {
      for (int i = 0; i < rows.n; ++i) {
        SlotMeta& m = h.meta(i);
        h2o_accumulate(m.score, m.seen, group_probability(rows, i, p_.group_reduce));
      }
      return;
    }
    const Protection pr = protection(h.budget());
    const std::int64_t newest = h.newest_pos();
    float best = 0.0f;
    std::int64_t best_pos = 0;
    for (int i = 0; i < rows.n; ++i) {
      SlotMeta& m = h.meta(i);
      h2o_accumulate(m.score, m.seen, group_probability(rows, i, p_.group_reduce));
      const std::int64_t pos = h.pos(i);
      if (pr.protects(pos, newest)) continue;
      const float r = rank(m);
      if (s.victim < 0 || evicts_before(r, pos, best, best_pos)) {
        s.victim = i;
        best = r;
        best_pos = pos;
      }
    }
  }

  void evict(HeadState& s, HeadOf<H2O>& h, const StepContext&) {
    if (h.size() <= h.budget()) return;
    if (s.victim >= 0 && h.size() == h.budget() + 1) {
      h.remove(s.victim);
      s.victim = -1;
      return;
    }
    evict_lowest_until_budget(h, protection(h.budget()), [&](int i) { return rank(h.meta(i)); }, "H2O");
  }

  void on_prompt(HeadState& s, HeadOf<H2O>& h, const PromptContext& prompt) {
    KVTRIM_CHECK(prompt.col_sum != nullptr && prompt.n_tokens == h.size(),
                 "internal: H2O needs the prompt's column sums for every held token");
    const std::int64_t newest = h.newest_pos();
    for (int j = 0; j < h.size(); ++j) {
      SlotMeta& m = h.meta(j);
      m.score = prompt.reduce_col(j, p_.group_reduce);
      m.seen = static_cast<std::int32_t>(newest - h.pos(j) + 1);
    }
    keep_top_scored(h, protection(h.budget()), [&](int i) { return rank(h.meta(i)); }, s.keep, "H2O");
  }

 private:
  Params p_;
};

}  // namespace kvtrim
