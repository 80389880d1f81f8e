// kvtrim CUDA backend: how a policy runs on the device.
//
// A policy's host hooks (on_insert, evict, ...) work on a HeadStore in host memory, so the GPU cannot call
// them. DevicePolicy<P> restates each policy's per-token decisions as small KVTRIM_HOST_DEVICE functions that
// the generic kernels call (append, masked arg-min eviction, prompt selection). Selection itself is shared:
// the victim is the unprotected slot with the lowest score(), oldest position on ties (select.hpp's rule),
// evicted one at a time while a head holds more than keep_limit() tokens. A specialisation provides:
//
//   static constexpr bool kDefined = true;
//   struct State { ... };                              // trivially copyable, one per (layer, KV head), on device
//   static State initial(const P&, const P::Params&, int budget);  // host: state of an empty head
//   static int keep_limit(const P&, int budget);       // host: tokens a head keeps after eviction (<= budget)
//   on_insert(State&, Meta&, std::int64_t pos, const float* key, int d)  // the new token (fp32 key as given);
//                                                      // decode and prompt, in order; Meta arrives as Meta{}
//   protects(const State&, const Meta&, pos, newest)   // never evicted
//   score(const State&, const Meta&, pos, newest)      // decode: higher = keep
//   on_attention(const State&, Meta&, int slot, const AttentionRows&)    // kAttention policies only; one
//                                                                       // thread per slot, so State is const
//   prompt_score(const State&, Meta&, int token, col, win)  // prompt, every token (protected ones too), after
//                                                           // on_insert: col/win are AttentionRows over the
//                                                           // prompt (kAttention only); may record the score
//                                                           // in the token's metadata, which the kept tokens keep
//
// The functions are host-callable too, so the host tests replay the device algorithm against the CPU backend.
#pragma once

#include <cstdint>

#include <kvtrim/macros.hpp>
#include <kvtrim/policies/full_cache.hpp>
#include <kvtrim/policies/h2o.hpp>
#include <kvtrim/policies/l2_norm.hpp>
#include <kvtrim/policies/streaming_llm.hpp>
#include <kvtrim/policies/tova.hpp>
#include <kvtrim/policy.hpp>
#include <kvtrim/select.hpp>

namespace kvtrim::gpu {

template <class P>
struct DevicePolicy {
  static constexpr bool kDefined = false;
};

template <>
struct DevicePolicy<FullCache> {
  static constexpr bool kDefined = true;
  using Meta = FullCache::SlotMeta;
  struct State {};
  static State initial(const FullCache&, const FullCache::Params&, int) { return {}; }
  static int keep_limit(const FullCache&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const float*, int) {}
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta&, std::int64_t, std::int64_t) { return true; }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta&, int, const AttentionRows&,
                                               const AttentionRows&) {
    return 0.0f;
  }
};

// StreamingLLM: the first `sinks` tokens seen are protected (a flag in SlotMeta, as on the CPU); every other
// token scores 0, so the tie rule evicts the oldest non-sink. keep_limit is the policy's own capacity().
template <>
struct DevicePolicy<StreamingLLM> {
  static constexpr bool kDefined = true;
  using Meta = StreamingLLM::SlotMeta;
  struct State {
    int sinks_seen = 0;
    int sinks = 0;
  };
  static State initial(const StreamingLLM&, const StreamingLLM::Params& p, int) { return {0, p.sinks}; }
  static int keep_limit(const StreamingLLM& pol, int budget) { return pol.capacity(budget); }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t, const float*, int) {
    streaming_mark_sink(s.sinks_seen, s.sinks, m.sink);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta& m, std::int64_t, std::int64_t) {
    return m.sink;
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta&, int, const AttentionRows&,
                                               const AttentionRows&) {
    return 0.0f;
  }
};

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
  static State initial(const H2O& pol, const H2O::Params& p, int budget) {
    return {pol.protection(budget), p.group_reduce, p.normalize};
  }
  static int keep_limit(const H2O&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const float*, int) {}
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
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const AttentionRows& col,
                                               const AttentionRows&) {
    m.score = col.reduce(t, s.reduce);
    m.seen = col.n - t;
    return h2o_rank(m.score, m.seen, s.normalize);
  }
};

// TOVA: this step's (group-reduced) probability; the prompt uses the last prompt query's row (window 1).
template <>
struct DevicePolicy<TOVA> {
  static constexpr bool kDefined = true;
  using Meta = TOVA::SlotMeta;
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static State initial(const TOVA& pol, const TOVA::Params& p, int) { return {pol.protection(), p.group_reduce}; }
  static int keep_limit(const TOVA&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const float*, int) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta& m, std::int64_t, std::int64_t) {
    return m.attention;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    m.attention = rows.reduce(slot, s.reduce);
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const AttentionRows&,
                                               const AttentionRows& win) {
    return m.attention = win.reduce(t, s.reduce);
  }
};

// L2Norm: key norm at insertion (key_l2_norm from l2_norm.hpp), largest norm evicted first (score = -norm).
// A skipped layer falls back to "oldest non-sink" as on the CPU: score 0 and only the sinks protected.
template <>
struct DevicePolicy<L2Norm> {
  static constexpr bool kDefined = true;
  using Meta = L2Norm::SlotMeta;
  struct State {
    Protection protect;
    bool skipped = false;
  };
  static State initial(const L2Norm& pol, const L2Norm::Params& p, int) {
    return {Protection{p.sinks, p.recent}, pol.skipped()};
  }
  static int keep_limit(const L2Norm&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta& m, std::int64_t, const float* key, int d) {
    m.norm = key_l2_norm(key, d);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.skipped ? pos < s.protect.sinks : s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t, std::int64_t) {
    return s.skipped ? 0.0f : -m.norm;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int, const AttentionRows&,
                                               const AttentionRows&) {
    return s.skipped ? 0.0f : -m.norm;
  }
};

}  // namespace kvtrim::gpu
