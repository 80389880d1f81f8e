// kvtrim CUDA backend: the device side of kvtrim/policies/streaming_llm.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/streaming_llm.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

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
  static State initial(const StreamingLLM&, const StreamingLLM::Params& p, int, int) { return {0, p.sinks}; }
  static int keep_limit(const StreamingLLM& pol, int budget) { return pol.capacity(budget); }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t, const TokenInputs&) {
    streaming_mark_sink(s.sinks_seen, s.sinks, m.sink);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta& m, std::int64_t, std::int64_t) {
    return m.sink;
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta&, int, const PromptSums&) {
    return 0.0f;
  }
};

}  // namespace kvtrim::gpu
