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
//   static State initial(const P&, const P::Params&, int budget, int group);  // host: state of an empty head
//   static int keep_limit(const P&, int budget);       // host: tokens a head keeps after eviction (<= budget)
//   on_insert(State&, Meta&, std::int64_t pos, const TokenInputs&)  // the new token; decode and prompt, in
//                                                      // order; Meta arrives as Meta{}
//   protects(const State&, const Meta&, pos, newest)   // never evicted
//   score(const State&, const Meta&, pos, newest)      // decode: higher = keep
//   on_attention(const State&, Meta&, int slot, const AttentionRows&)    // kAttention policies only; one
//                                                                       // thread per slot, so State is const
//   prompt_score(const State&, Meta&, int token, const PromptSums&)  // prompt, every token (protected ones
//                                                      // too), after on_insert; may record the score in the
//                                                      // token's metadata, which the kept tokens keep
// and optionally (defaults in gpu::traits below):
//   static int prompt_limit(const P&, int budget);     // tokens a head keeps after prefill (default keep_limit)
//   prompt_protects(const State&, const Meta&, pos, newest)  // prompt selection (default protects)
//   static int vote_window(const P&);                  // rows of a second prompt window summed into
//                                                      // PromptSums::vote (default 0: none)
//   static constexpr bool kSimHash = true; static SimHashProjection projection(const P&, int head_dim);
//                                                      // the backend hashes every key (and the step's
//                                                      // queries) with the layer's projection: TokenInputs codes
//   static constexpr bool kMerges = true;              // the victim may be merged into another slot (EMS):
//   struct Stats; stats_of(const Meta&), combine(Stats, Stats)  // a head-wide reduction before each victim
//   merge_score(const State&, const Stats&, const Meta&)   // replaces score(): lowest unprotected leaves
//   may_merge(const State&, const Stats&, const Meta& victim), absorbs(const State&, const Meta&, pos)
//   merge_threshold(const State&), merges_keys(const State&), merge_weight(const State&, const Meta&),
//   merge_meta(Meta& into, const Meta& from)         // the victim joins the absorbing slot whose key is the
//                                                      // most similar (cosine, older on ties) if >= threshold
//   static constexpr bool kHostPrompt = true;          // the prompt's selection runs the CPU policy's own
//   static State after_host_prompt(const State&, const P::HeadState&, int budget, int& limit)
//                                                      // on_prompt on the host (once per prefill), then the
//                                                      // device state and decode limit follow from its HeadState
//   static constexpr bool kStructured = true;          // eviction decides every slot at once instead of one
//                                                      // victim at a time (BUZZ's re-segmentation):
//   needs_fit(const State&, int n)                     // does a head of n tokens have to shrink?
//   fit_key(const State&, const pos*, const Meta*, int n, int i) -> int     // pass 1, every slot
//   fit_slot(const State&, const Meta*, const int* keys, int n, int i, Meta& out) -> bool  // pass 2: does
//                                                      // slot i stay (out = its new metadata)? Both passes see
//                                                      // the slots unchanged; passes repeat while needs_fit
//
// The functions are host-callable too, so the host tests replay the device algorithm against the CPU backend.
// Each policy's specialisation lives in policies/<policy>.hpp beside this file; device_policies.hpp includes
// them all.
#pragma once

#include <cstdint>

#include <kvtrim/macros.hpp>
#include <kvtrim/policy.hpp>
#include <kvtrim/select.hpp>
#include <kvtrim/simhash.hpp>

namespace kvtrim::gpu {

// What on_insert sees of the new token.
struct TokenInputs {
  const float* key = nullptr;  // [d] fp32 key as given
  int d = 0;
  int group = 1;
  bool prefill = false;                     // a prompt token (prefill), not a decode step
  std::uint64_t key_code = 0;               // SimHash code of key (kSimHash policies)
  const std::uint64_t* q_codes = nullptr;   // [group] codes of the step's queries (kSimHash policies; decode
                                            // steps and the last prompt token only, else null)
};

// Prompt attention sums per token, [group x n] each (kAttention policies; null where not asked for):
// col = all prompt queries, win = the last prompt_window() queries, vote = the last vote_window() queries.
struct PromptSums {
  AttentionRows col, win, vote;
};

template <class P>
struct DevicePolicy {
  static constexpr bool kDefined = false;
};

// The optional parts of a DevicePolicy, with their defaults.
namespace traits {
template <class DP, class P>
int prompt_limit(const P& pol, int budget) {
  if constexpr (requires { DP::prompt_limit(pol, budget); })
    return DP::prompt_limit(pol, budget);
  else
    return DP::keep_limit(pol, budget);
}
template <class DP>
KVTRIM_HOST_DEVICE bool prompt_protects(const typename DP::State& s, const typename DP::Meta& m, std::int64_t pos,
                                        std::int64_t newest) {
  if constexpr (requires { DP::prompt_protects(s, m, pos, newest); })
    return DP::prompt_protects(s, m, pos, newest);
  else
    return DP::protects(s, m, pos, newest);
}
template <class DP, class P>
int vote_window(const P& pol) {
  if constexpr (requires { DP::vote_window(pol); })
    return DP::vote_window(pol);
  else
    return 0;
}
template <class DP>
constexpr bool simhash() {
  if constexpr (requires { DP::kSimHash; })
    return DP::kSimHash;
  else
    return false;
}
template <class DP>
constexpr bool merges() {
  if constexpr (requires { DP::kMerges; })
    return DP::kMerges;
  else
    return false;
}
template <class DP>
constexpr bool host_prompt() {
  if constexpr (requires { DP::kHostPrompt; })
    return DP::kHostPrompt;
  else
    return false;
}
template <class DP>
constexpr bool structured() {
  if constexpr (requires { DP::kStructured; })
    return DP::kStructured;
  else
    return false;
}
}  // namespace traits

}  // namespace kvtrim::gpu
