// A small score-based test policy with a device implementation, so the CUDA tests exercise the paths that
// need attention probabilities (decode probabilities from the attention kernel, prompt column sums).
//
// AccumAttention: each slot's score is its attention accumulated over decode steps (mean over the query group,
// H2O-like); the `recent` newest tokens are protected; evicts after attention; the prompt keeps the protected
// tokens plus the highest column sums. The per-token update accumulate_attention() is shared by the CPU hooks
// and DevicePolicy<AccumAttention>.
#pragma once

#include <kvtrim/kvtrim.hpp>
#include <kvtrim/cuda/device_policy.hpp>

#include <vector>

namespace kvtest {

KVTRIM_HOST_DEVICE inline float accumulate_attention(float old, const kvtrim::AttentionRows& rows, int slot) {
  return old + rows.reduce(slot, kvtrim::GroupReduce::kMean);
}

struct AccumAttention {
  struct Params {
    int recent = 4;
  };
  struct SlotMeta {
    float score = 0.0f;
  };
  struct HeadState {
    std::vector<int> keep;
  };
  static constexpr std::string_view kName = "accum_test";
  static constexpr kvtrim::Signals kSignals = kvtrim::Signals::kAttention;
  static constexpr kvtrim::EvictTiming kTiming = kvtrim::EvictTiming::kAfterAttention;

  AccumAttention(const Params& p, const kvtrim::LayerContext& ctx) : recent(p.recent) {
    KVTRIM_CHECK(p.recent >= 0 && p.recent < ctx.min_budget(), "AccumAttention: recent must be in 0..budget-1, got ",
                 p.recent);
  }
  int prompt_window() const { return 0; }
  void on_insert(HeadState&, kvtrim::HeadOf<AccumAttention>&, const kvtrim::StepContext&) {}
  void on_attention(HeadState&, kvtrim::HeadOf<AccumAttention>& h, const kvtrim::StepContext&,
                    const kvtrim::AttentionRows& rows) {
    for (int i = 0; i < h.size(); ++i) h.meta(i).score = accumulate_attention(h.meta(i).score, rows, i);
  }
  void evict(HeadState&, kvtrim::HeadOf<AccumAttention>& h, const kvtrim::StepContext&) {
    kvtrim::evict_lowest_until_budget(h, kvtrim::Protection{0, recent}, [&](int i) { return h.meta(i).score; },
                                      "AccumAttention");
  }
  void on_prompt(HeadState& s, kvtrim::HeadOf<AccumAttention>& h, const kvtrim::PromptContext& ctx) {
    for (int i = 0; i < h.size(); ++i) h.meta(i).score = ctx.reduce_col(i, kvtrim::GroupReduce::kMean);
    kvtrim::keep_top_scored(h, kvtrim::Protection{0, recent}, [&](int i) { return h.meta(i).score; }, s.keep,
                            "AccumAttention");
  }
  int recent;
};

}  // namespace kvtest

template <>
struct kvtrim::gpu::DevicePolicy<kvtest::AccumAttention> {
  static constexpr bool kDefined = true;
  using Meta = kvtest::AccumAttention::SlotMeta;
  struct State {
    int recent = 0;
  };
  static State initial(const kvtest::AccumAttention& p, const kvtest::AccumAttention::Params&, int, int) {
    return {p.recent};
  }
  static int keep_limit(const kvtest::AccumAttention&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const kvtrim::gpu::TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return kvtrim::Protection{0, s.recent}.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta& m, std::int64_t, std::int64_t) { return m.score; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta& m, int slot, const kvtrim::AttentionRows& rows) {
    m.score = kvtest::accumulate_attention(m.score, rows, slot);
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta& m, int t, const kvtrim::gpu::PromptSums& in) {
    return m.score = in.col.reduce(t, kvtrim::GroupReduce::kMean);
  }
};
