// kvtrim: L2-norm / K-norm (arXiv 2406.11430, Devoto et al., EMNLP 2024) — keep the keys with the lowest
// L2 norm.
//
// Keys with a low L2 norm tend to receive high attention, so the key with the largest norm is evicted first.
// The norm of each key (post-RoPE, as stored, over its stored width) is computed once when the token is
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
//    oldest token that is not a sink leaves (every token scores 0 and only the sinks are protected). To leave a
//    skipped layer uncompressed as in the paper, give it a budget that holds the whole sequence via
//    CacheConfig::head_budgets.
//  - Prompt: keeps the protected tokens plus the lowest-norm others up to the budget (equal norms: the newer
//    token stays), i.e. the set the decode rule would keep without protection moving; a skipped layer keeps
//    its sinks and the newest prompt tokens.
//  - Norms in fp32 (sum of squares in index order, then sqrt), per KV head; GQA needs no aggregation.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

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
  struct State {
    Protection protect;
    bool skipped = false;
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
  State initial(int, int) const { return {pr_, skipped_}; }

  // L2 norm of a key (fp32, index order).
  KVTRIM_HOST_DEVICE static float key_norm(const float* k, int d) {
    float s = 0.0f;
    for (int i = 0; i < d; ++i) s += k[i] * k[i];
    return std::sqrt(s);
  }

  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta& m, std::int64_t, const TokenInputs& in) {
    m.norm = key_norm(in.key, in.d);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.skipped ? pos < s.protect.sinks : s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const SlotMeta& m, std::int64_t, std::int64_t) {
    return s.skipped ? 0.0f : -m.norm;
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int, const PromptSums&) {
    return score(s, m, 0, 0);
  }

 private:
  Protection pr_;
  bool skipped_ = false;
};

}  // namespace kvtrim
