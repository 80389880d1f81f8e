// kvtrim CUDA backend: the device side of kvtrim/policies/ems.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/error.hpp>
#include <kvtrim/policies/ems.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// EMS: accumulated and decayed-local attention per token (ems_observe), GL scores normalised by the head's
// maxima (ems_score; Stats = the two maxima), one victim per decode step (the lowest GL unprotected, oldest on
// ties), merged into the most key-similar absorbing slot (every other slot; sinks only with merge_into_sinks)
// when its GL >= evict_below and the cosine >= merge_similarity, else evicted: the CPU policy's decode rule.
// The prompt (batch evict-then-merge and the head-wise target of coverage < 1) runs the CPU policy's own
// on_prompt on the host; the target it sets becomes the head's decode limit.
template <>
struct DevicePolicy<Ems> {
  static constexpr bool kDefined = true;
  static constexpr bool kMerges = true;
  static constexpr bool kHostPrompt = true;
  using Meta = EmsTokenState;
  struct State {
    Protection protect;
    float decay = 1.0f;
    Ems::Params p;  // scalars only
  };
  struct Stats {
    float max_global = 0.0f, max_local = 0.0f;
  };
  static State initial(const Ems& pol, const Ems::Params& p, int, int) { return {pol.protection(), pol.decay(), p}; }
  static int keep_limit(const Ems&, int budget) { return budget; }
  static State after_host_prompt(const State& s, const Ems::HeadState& hs, int budget, int& limit) {
    limit = hs.target < 0 ? budget : hs.target;
    return s;
  }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    ems_observe(m, rows.reduce(slot, s.p.reduce), s.decay);
  }
  KVTRIM_HOST_DEVICE static Stats stats_of(const Meta& m) { return {ems_global_avg(m), m.local}; }
  KVTRIM_HOST_DEVICE static Stats combine(const Stats& a, const Stats& b) {
    return {a.max_global > b.max_global ? a.max_global : b.max_global,
            a.max_local > b.max_local ? a.max_local : b.max_local};
  }
  KVTRIM_HOST_DEVICE static float merge_score(const State& s, const Stats& st, const Meta& m) {
    return ems_score(ems_global_avg(m), m.local, st.max_global, st.max_local, s.p.combine);
  }
  KVTRIM_HOST_DEVICE static bool may_merge(const State& s, const Stats& st, const Meta& victim) {
    return merge_score(s, st, victim) >= s.p.evict_below;
  }
  KVTRIM_HOST_DEVICE static bool absorbs(const State& s, const Meta&, std::int64_t pos) {
    return s.p.merge_into_sinks || pos >= s.protect.sinks;
  }
  KVTRIM_HOST_DEVICE static float merge_threshold(const State& s) { return s.p.merge_similarity; }
  KVTRIM_HOST_DEVICE static bool merges_keys(const State& s) { return s.p.merge_keys; }
  KVTRIM_HOST_DEVICE static float merge_weight(const State& s, const Meta& m) {
    return ems_merge_weight(m, s.p.merge_weight);
  }
  KVTRIM_HOST_DEVICE static void merge_meta(Meta& into, const Meta& from) { ems_merge_state(into, from); }
};

}  // namespace kvtrim::gpu
