// kvtrim CUDA backend: the device side of kvtrim/policies/hash_evict.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/error.hpp>
#include <kvtrim/policies/hash_evict.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// HashEvict: every key keeps its SimHash code (computed by the backend's simhash_kernel with the layer's
// projection); the step's probe codes (the g query codes, or the new key's code) are copied into State by
// on_insert, and a slot scores minus its summed Hamming distance to them (hash_probe_distance). Prompt: the
// kRecentGlobal mode keeps the sinks and the newest tokens (score 0, oldest dropped first), kHash keeps the
// protected tokens plus the keys closest to the last prompt token's probe, as on the CPU.
template <>
struct DevicePolicy<HashEvict> {
  static constexpr bool kDefined = true;
  static constexpr bool kSimHash = true;
  static constexpr int kMaxProbes = 16;  // query heads per KV head this implementation supports
  using Meta = HashEvict::SlotMeta;
  struct State {
    Protection protect;
    bool key_probe = false;
    bool hash_prompt = false;
    int n_probes = 0;
    std::uint64_t probes[kMaxProbes] = {};
  };
  static State initial(const HashEvict&, const HashEvict::Params& p, int, int group) {
    KVTRIM_CHECK(p.probe == HashProbe::kKey || group <= kMaxProbes, "HashEvict on the GPU: the query probe supports ",
                 "up to ", kMaxProbes, " query heads per KV head, got ", group, " (use HashProbe::kKey or CpuBackend)");
    State s;
    s.protect = Protection{p.sinks, p.recent + 1};
    s.key_probe = p.probe == HashProbe::kKey;
    s.hash_prompt = p.prompt == HashPromptMode::kHash;
    return s;
  }
  static int keep_limit(const HashEvict&, int budget) { return budget; }
  static SimHashProjection projection(const HashEvict& pol, int) { return pol.projection(); }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t, const TokenInputs& in) {
    m.code = in.key_code;
    if (in.prefill && !s.hash_prompt) return;  // only the kHash prompt mode needs a probe during prefill
    if (s.key_probe) {
      s.probes[0] = in.key_code;
      s.n_probes = 1;
    } else if (in.q_codes != nullptr) {
      for (int g = 0; g < in.group; ++g) s.probes[g] = in.q_codes[g];
      s.n_probes = in.group;
    }
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static bool prompt_protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.hash_prompt ? s.protect.protects(pos, newest) : pos < s.protect.sinks;
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t, std::int64_t) {
    return -static_cast<float>(hash_probe_distance(s.probes, s.n_probes, m.code));
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int, const PromptSums&) {
    return s.hash_prompt ? score(s, m, 0, 0) : 0.0f;
  }
};

}  // namespace kvtrim::gpu
