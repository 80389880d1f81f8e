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
//    code), and the new token starts with its self-attention weight. A new token starts from score 0 — no
//    stale score from an evicted token.
//  - The recent window and the sinks are counted in positions (select.hpp's Protection): with no gaps in
//    positions that is the `recent` newest tokens. Ties: the oldest position is evicted first (select.hpp).
//  - Scores are fp32 (float), accumulated per KV head after the group reduction of each step. For kMean and
//    kSum that equals reducing per-query-head sums; for kMax it is the sum over steps of the per-step group
//    maximum (keeping g accumulators per slot would cost g floats per token).
//  - Prefill: scores start from the column sums of the exact causal prompt attention (reduced over the
//    group with the same rule; for kMax that is the max of the query heads' column sums, the per-row max is
//    not available from column sums), and the prompt is cut to budget in one pass keeping the protected
//    tokens plus the top-scored others (newest on ties). The number of queries that saw a prompt token is
//    counted from the prompt (PromptSums::queries_seeing).
//  - Budgets are absolute token counts per head (the official mask version uses fractions of the prompt
//    length; give the cache a budget of ratio * prompt length to reproduce that).
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <tuple>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

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
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
    bool normalize = false;
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

  // Heavy-hitter share of a head's budget; the rest after the sinks is the recent window.
  int heavy(int budget) const {
    return static_cast<int>(std::floor(p_.heavy_ratio * static_cast<double>(budget - p_.sinks) + 1e-9));
  }
  int recent(int budget) const { return budget - p_.sinks - heavy(budget); }
  State initial(int, int budget) const { return {Protection{p_.sinks, recent(budget)}, p_.group_reduce, p_.normalize}; }

  // The value H2O ranks a slot by: the raw sum, or the average over the queries that saw it (x / 1 = x exactly,
  // so the division needs no branch and the backends' loops vectorise).
  KVTRIM_HOST_DEVICE static float rank(const State& s, const SlotMeta& m) {
    return m.score / (s.normalize && m.seen > 0 ? static_cast<float>(m.seen) : 1.0f);
  }

  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const SlotMeta& m, std::int64_t, std::int64_t) {
    return rank(s, m);
  }
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s) { return s.reduce; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, SlotMeta& m, float p) {
    m.score += p;
    ++m.seen;
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int t, const PromptSums& in) {
    m.score = in.col.reduce(t, s.reduce);
    m.seen = in.queries_seeing(t);
    return rank(s, m);
  }

 private:
  Params p_;
};

}  // namespace kvtrim
