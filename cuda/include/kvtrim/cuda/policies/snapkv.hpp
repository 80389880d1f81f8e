// kvtrim CUDA backend: the device side of kvtrim/policies/snapkv.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/error.hpp>
#include <kvtrim/policies/snapkv.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// SnapKV<D>: the prompt keeps its observation window (the last `window` tokens) plus the earlier tokens with
// the highest pooled window votes (snapkv_score_at over PromptSums::vote, the same function the CPU policy
// uses), up to its capacity; decoding is D's, so every decode hook forwards to DevicePolicy<D> on the inner
// state, and D's prompt_score still records D's metadata for every token (the kept ones keep it, as the CPU
// policy's compacted PromptContext gives D the full prompt's sums of the kept tokens). One GPU-only limit: D
// must keep at least the capacity after a prompt (D's own prompt cut would run after SnapKV's on the CPU).
template <class D>
struct DevicePolicy<SnapKV<D>> {
  using Inner = DevicePolicy<D>;
  using Pol = SnapKV<D>;
  static constexpr bool kDefined = Inner::kDefined;
  static constexpr bool kSimHash = traits::simhash<Inner>();
  using Meta = typename Pol::SlotMeta;
  struct State {
    typename Inner::State inner;
    int window = 1;
    int kernel = 1;
    SnapPooling pooling = SnapPooling::kAvg;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static State initial(const Pol& pol, const typename Pol::Params& p, int budget, int group) {
    KVTRIM_CHECK(traits::prompt_limit<Inner>(pol.decode_policy(), budget) >= pol.capacity(budget), Pol::kName,
                 " on the GPU: the decode policy keeps only ", traits::prompt_limit<Inner>(pol.decode_policy(), budget),
                 " prompt tokens, fewer than SnapKV's capacity ", pol.capacity(budget),
                 "; lower SnapKV's capacity to that or use CpuBackend");
    return {Inner::initial(pol.decode_policy(), p.decode, budget, group), p.window, p.kernel, p.pooling,
            p.group_reduce};
  }
  static int keep_limit(const Pol& pol, int budget) { return Inner::keep_limit(pol.decode_policy(), budget); }
  static int prompt_limit(const Pol& pol, int budget) { return pol.capacity(budget); }
  static int vote_window(const Pol& pol) { return pol.params().window; }
  static SimHashProjection projection(const Pol& pol, int head_dim)
    requires kSimHash
  {
    return Inner::projection(pol.decode_policy(), head_dim);
  }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t pos, const TokenInputs& in) {
    Inner::on_insert(s.inner, m, pos, in);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta& m, std::int64_t pos, std::int64_t newest) {
    return Inner::protects(s.inner, m, pos, newest);
  }
  KVTRIM_HOST_DEVICE static bool prompt_protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return pos > newest - s.window;
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t pos, std::int64_t newest) {
    return Inner::score(s.inner, m, pos, newest);
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    Inner::on_attention(s.inner, m, slot, rows);
  }
  // Only called with the vote sums when the prompt is longer than the window (the backend clamps the window).
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    (void)Inner::prompt_score(s.inner, m, t, in);
    const int earlier = in.vote.n - s.window;
    if (in.vote.p == nullptr || t >= earlier) return 0.0f;  // the window itself is protected
    return snapkv_score_at(in.vote, earlier, t, s.kernel, s.pooling, s.reduce);
  }
};

}  // namespace kvtrim::gpu
