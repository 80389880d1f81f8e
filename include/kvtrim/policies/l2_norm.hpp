// kvtrim: L2-norm / K-norm (arXiv 2406.11430, Devoto et al., EMNLP 2024) — keep the keys with the lowest
// L2 norm.
//
// Keys with a low L2 norm tend to receive high attention, so the key with the largest norm is evicted first.
// The norm of each key (post-RoPE, as stored, over head.key_dim() floats) is computed once when the token is
// inserted and kept in SlotMeta; no step recomputes it and no attention probabilities are needed.
//
// Parameters (defaults):
//  - sinks (0): tokens at positions < sinks are never evicted. The official code (alessiodevoto/l2compress)
//    protects nothing; Cold-Compress's `l2` uses sinks 4 and recent 10.
//  - recent (0): the `recent` newest tokens, the one just decoded included, are never evicted.
//  - skip_layers ({}): layers that are not scored. The paper leaves layers 0 and 1 uncompressed (pass {0, 1}
//    for that); the official function's default skips nothing.
//  Constraint, per (layer, KV head): sinks + recent < budget, so the norm always decides at least one slot.
//
// Choices where the paper and the official code are silent or do not fit a bounded cache:
//  - Fixed budget instead of keep_ratio/prune_after: whenever a head holds more than its budget, the
//    unprotected key with the largest norm leaves (Cold-Compress's `l2` does the same, one per step). The
//    official sawtooth (grow to prune_after, cut to keep_ratio) has no fixed memory bound.
//  - Evicts after attention (EvictTiming::kAfterAttention): the decoded token attends to the whole cache plus
//    itself, then the largest norm leaves, like the official code, which prunes after each forward pass. With
//    recent = 0 the new token itself leaves when its key has the largest norm.
//  - Ties (equal norms): the oldest position leaves first (select.hpp's rule; slot order never matters).
//  - Skipped layers cannot keep everything within a bounded budget. They fall back to a recency window: the
//    oldest token that is not a sink leaves (StreamingLLM with this policy's sinks). To leave a skipped layer
//    uncompressed as in the paper, give it a budget that holds the whole sequence via CacheConfig::head_budgets.
//  - Prompt: keeps the protected tokens plus the lowest-norm others up to the budget (equal norms: the newer
//    token stays), i.e. the set the decode rule would keep without protection moving; a skipped layer keeps
//    its sinks and the newest prompt tokens.
//  - Norms in fp32 (sum of squares in index order, then sqrt), per KV head; GQA needs no aggregation.
#pragma once

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

// L2 norm of a key of width d (fp32, index order): the per-token score of L2Norm.
KVTRIM_HOST_DEVICE inline float key_l2_norm(const float* k, int d) {
  float s = 0.0f;
  for (int i = 0; i < d; ++i) s += k[i] * k[i];
  return std::sqrt(s);
}

struct L2Norm {
  struct Params {
    int sinks = 0;
    int recent = 0;
    std::vector<int> skip_layers = {};
    static constexpr auto fields() {
      return std::tuple{field("sinks", &Params::sinks), field("recent", &Params::recent),
                        field("skip_layers", &Params::skip_layers)};
    }
  };
  struct SlotMeta {
    float norm = 0.0f;
  };
  struct HeadState {
    std::vector<int> keep;  // prompt scratch
  };
  static constexpr std::string_view kName = "l2norm";
  static constexpr Signals kSignals = Signals::kNone;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;

  L2Norm(const Params& p, const LayerContext& ctx) : pr_{p.sinks, p.recent} {
    KVTRIM_CHECK(p.sinks >= 0, "L2Norm: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.recent >= 0, "L2Norm: recent must be >= 0, got ", p.recent);
    for (int l : p.skip_layers) {
      KVTRIM_CHECK(l >= 0 && l < ctx.n_layers, "L2Norm: skip_layers holds layer ", l, "; expected 0..",
                   ctx.n_layers - 1);
      if (l == ctx.layer) skipped_ = true;
    }
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks + p.recent < ctx.budgets[h], "L2Norm: sinks (", p.sinks, ") + recent (", p.recent,
                   ") = ", p.sinks + p.recent, " must be smaller than the budget ", ctx.budgets[h], " of layer ",
                   ctx.layer, " KV head ", h, " (at least one slot has to be chosen by key norm)");
  }

  bool skipped() const { return skipped_; }
  int prompt_window() const { return 0; }

  void on_insert(HeadState&, HeadOf<L2Norm>& h, const StepContext& step) {
    h.meta(step.slot).norm = key_l2_norm(h.key_ptr(step.slot), h.key_dim());
  }
  void on_attention(HeadState&, HeadOf<L2Norm>&, const StepContext&, const AttentionRows&) {}

  void evict(HeadState&, HeadOf<L2Norm>& h, const StepContext&) {
    if (skipped_) {
      while (h.size() > h.budget()) h.remove(oldest_non_sink(h));
      return;
    }
    evict_lowest_until_budget(h, pr_, [&h](int i) { return -h.meta(i).norm; }, "L2Norm");
  }

  void on_prompt(HeadState& s, HeadOf<L2Norm>& h, const PromptContext&) {
    if (h.size() <= h.budget()) return;
    if (skipped_) {
      keep_sinks_and_newest(h, pr_.sinks, s.keep);
      return;
    }
    keep_top_scored(h, pr_, [&h](int i) { return -h.meta(i).norm; }, s.keep, "L2Norm");
  }

 private:
  int oldest_non_sink(const HeadOf<L2Norm>& h) const {
    int v = -1;
    for (int i = 0; i < h.size(); ++i)
      if (h.pos(i) >= pr_.sinks && (v < 0 || h.pos(i) < h.pos(v))) v = i;
    return v;  // exists: sinks < budget < size
  }

  Protection pr_;
  bool skipped_ = false;
};

}  // namespace kvtrim
