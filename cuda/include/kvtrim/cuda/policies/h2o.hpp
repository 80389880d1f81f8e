// kvtrim CUDA backend: the device side of kvtrim/policies/h2o.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/h2o.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// H2O: accumulated attention (h2o_accumulate, h2o_rank from h2o.hpp), sinks + recent window protected.
template <>
struct DevicePolicy<H2O> {
  static constexpr bool kDefined = true;
  using Meta = H2O::SlotMeta;
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
    bool normalize = false;
  };
  static State initial(const H2O& pol, const H2O::Params& p, int budget, int) {
    return {pol.protection(budget), p.group_reduce, p.normalize};
  }
  static int keep_limit(const H2O&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t, std::int64_t) {
    return h2o_rank(m.score, m.seen, s.normalize);
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    h2o_accumulate(m.score, m.seen, rows.reduce(slot, s.reduce));
  }
  // prompt token t of n = col.n was seen by the n - t queries at and after it
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    m.score = in.col.reduce(t, s.reduce);
    m.seen = in.col.n - t;
    return h2o_rank(m.score, m.seen, s.normalize);
  }
};

}  // namespace kvtrim::gpu
