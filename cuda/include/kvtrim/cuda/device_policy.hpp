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
#pragma once

#include <cstdint>
#include <type_traits>

#include <kvtrim/error.hpp>
#include <kvtrim/macros.hpp>
#include <kvtrim/policies/buzz.hpp>
#include <kvtrim/policies/eigen_attention.hpp>
#include <kvtrim/policies/ems.hpp>
#include <kvtrim/policies/full_cache.hpp>
#include <kvtrim/policies/h2o.hpp>
#include <kvtrim/policies/hash_evict.hpp>
#include <kvtrim/policies/l2_norm.hpp>
#include <kvtrim/policies/snapkv.hpp>
#include <kvtrim/policies/streaming_llm.hpp>
#include <kvtrim/policies/tova.hpp>
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

template <>
struct DevicePolicy<FullCache> {
  static constexpr bool kDefined = true;
  using Meta = FullCache::SlotMeta;
  struct State {};
  static State initial(const FullCache&, const FullCache::Params&, int, int) { return {}; }
  static int keep_limit(const FullCache&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta&, std::int64_t, std::int64_t) { return true; }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, Meta&, int, const PromptSums&) {
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

// TOVA: this step's (group-reduced) probability; the prompt uses the last prompt query's row (window 1).
template <>
struct DevicePolicy<TOVA> {
  static constexpr bool kDefined = true;
  using Meta = TOVA::SlotMeta;
  struct State {
    Protection protect;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static State initial(const TOVA& pol, const TOVA::Params& p, int, int) { return {pol.protection(), p.group_reduce}; }
  static int keep_limit(const TOVA&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta& m, std::int64_t, std::int64_t) {
    return m.attention;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    m.attention = rows.reduce(slot, s.reduce);
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    return m.attention = in.win.reduce(t, s.reduce);
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
  static State initial(const L2Norm& pol, const L2Norm::Params& p, int, int) {
    return {Protection{p.sinks, p.recent}, pol.skipped()};
  }
  static int keep_limit(const L2Norm&, int budget) { return budget; }
  KVTRIM_HOST_DEVICE static void on_insert(State&, Meta& m, std::int64_t, const TokenInputs& in) {
    m.norm = key_l2_norm(in.key, in.d);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const Meta&, std::int64_t pos, std::int64_t newest) {
    return s.skipped ? pos < s.protect.sinks : s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const Meta& m, std::int64_t, std::int64_t) {
    return s.skipped ? 0.0f : -m.norm;
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, Meta&, int, const AttentionRows&) {}
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int, const PromptSums&) {
    return s.skipped ? 0.0f : -m.norm;
  }
};

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

// BUZZ: the sinks, the window and the re-segmented middle. Eviction is structured: when the middle exceeds the
// threshold, every slot decides at once whether it survives (fit_slot), by counting instead of sorting, so a
// block of threads runs one pass in O(n^2 / threads) with no ordered scratch:
//  - sinks stay; a non-sink whose rank by position among the non-sinks is >= n_mid (= non-sinks - window) is in
//    the window and stays;
//  - an old sample (sampled) stays when the number of old samples older than it is a multiple of the stride;
//  - any other middle token belongs to chunk (number of unsampled non-sinks older than it) / chunk and stays
//    when no member of its chunk beats it (higher score; equal score and older, or newer with
//    keep_oldest_on_tie = false), the CPU scan's "first (or last) maximum";
//  - every middle token that stays becomes an old sample.
// The CPU policy sorts and scans (buzz.hpp); the host tests check that both keep the same tokens. Scores are
// the accumulated attention (AccumulatedAttention) or minus the Hamming distance of the key's code to the
// step's query codes (HashScorer, codes from the backend's simhash_kernel).
template <class S>
struct DevicePolicy<Buzz<S>> {
  using Pol = Buzz<S>;
  static constexpr bool kHashScorer = std::is_same_v<S, HashScorer>;
  static constexpr bool kDefined = kHashScorer || std::is_same_v<S, AccumulatedAttention>;
  static constexpr bool kSimHash = kHashScorer;
  static constexpr bool kStructured = true;
  static constexpr int kMaxProbes = 16;
  using Meta = typename Pol::SlotMeta;
  struct State {
    int sinks = 0, sinks_seen = 0, window = 1, threshold = 2, chunk = 2, stride = 2;
    bool oldest_on_tie = true;
    GroupReduce reduce = GroupReduce::kMean;
    int n_probes = 0;
    std::uint64_t probes[kHashScorer ? kMaxProbes : 1] = {};
  };
  static State initial(const Pol& pol, const typename Pol::Params& p, int budget, int group) {
    State s;
    s.sinks = p.sinks;
    s.window = pol.window_of(budget);
    s.threshold = pol.threshold_of(budget);
    s.chunk = p.chunk;
    s.stride = pol.thin();
    s.oldest_on_tie = p.keep_oldest_on_tie;
    s.reduce = p.scorer.reduce;
    if constexpr (kHashScorer)
      KVTRIM_CHECK(group <= kMaxProbes, Pol::kName, " on the GPU supports up to ", kMaxProbes,
                   " query heads per KV head, got ", group, " (use CpuBackend)");
    return s;
  }
  static int keep_limit(const Pol& pol, int budget) { return pol.capacity(budget); }
  static SimHashProjection projection(const Pol& pol, int head_dim)
    requires kHashScorer
  {
    return pol.scorer().projection(head_dim);
  }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t, const TokenInputs& in) {
    streaming_mark_sink(s.sinks_seen, s.sinks, m.sink);
    if constexpr (kHashScorer) {
      m.scorer.code = in.key_code;
      if (in.q_codes != nullptr) {
        for (int g = 0; g < in.group; ++g) s.probes[g] = in.q_codes[g];
        s.n_probes = in.group;
      }
    }
  }
  // Arg-min eviction is never used (kStructured); these keep the generic prompt kernel's interface.
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta& m, std::int64_t, std::int64_t) { return m.sink; }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    if constexpr (!kHashScorer) m.scorer.score = buzz_accumulate(m.scorer.score, rows.reduce(slot, s.reduce));
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    if constexpr (!kHashScorer) m.scorer.score = in.col.reduce(t, s.reduce);
    return 0.0f;
  }
  KVTRIM_HOST_DEVICE static float chunk_score(const State& s, const Meta& m) {
    if constexpr (kHashScorer)
      return buzz_hash_affinity(m.scorer.code, s.probes, s.n_probes, s.reduce == GroupReduce::kMax);
    else
      return m.scorer.score;
  }
  KVTRIM_HOST_DEVICE static bool needs_fit(const State& s, int n) { return n - s.sinks_seen - s.window > s.threshold; }
  // Pass 1, per slot: -1 sink, -2 window, else the number of older old samples (sampled) or of older new-segment
  // tokens (the token's index in the new segment).
  static constexpr int kSink = -1, kWindow = -2;
  KVTRIM_HOST_DEVICE static int fit_key(const State& s, const std::int64_t* pos, const Meta* meta, int n, int i) {
    if (meta[i].sink) return kSink;
    const std::int64_t p = pos[i];
    int older = 0, older_samples = 0;
    for (int j = 0; j < n; ++j) {
      if (meta[j].sink || pos[j] >= p) continue;
      ++older;
      older_samples += meta[j].sampled ? 1 : 0;
    }
    if (older >= n - s.sinks_seen - s.window) return kWindow;  // every sink is still held: n - sinks_seen non-sinks
    return meta[i].sampled ? older_samples : older - older_samples;
  }
  // Pass 2, per slot, with every slot's key.
  KVTRIM_HOST_DEVICE static bool fit_slot(const State& s, const Meta* meta, const int* keys, int n, int i,
                                          Meta& out) {
    out = meta[i];
    if (keys[i] < 0) return true;  // sink or window
    bool stays = true;
    if (meta[i].sampled) {
      stays = keys[i] % s.stride == 0;
    } else {
      const int chunk = keys[i] / s.chunk;
      const float mine = chunk_score(s, meta[i]);
      for (int j = 0; j < n && stays; ++j) {
        if (j == i || keys[j] < 0 || meta[j].sampled || keys[j] / s.chunk != chunk) continue;
        const float theirs = chunk_score(s, meta[j]);
        // keys order the new segment by position: a smaller key is an older token
        stays = !(theirs > mine || (theirs == mine && (s.oldest_on_tie ? keys[j] < keys[i] : keys[j] > keys[i])));
      }
    }
    out.sampled = stays;
    return stays;
  }
};

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

// EigenAttention<I>: low-rank storage is the backend's business (CudaBackend projects q, k, v and the output
// with cuBLAS and stores the projected rows); every decision is I's, on the projected keys, as on the CPU.
template <class I>
struct DevicePolicy<EigenAttention<I>> : DevicePolicy<I> {
  using Base = DevicePolicy<I>;
  using Pol = EigenAttention<I>;
  static typename Base::State initial(const Pol& pol, const typename Pol::Params& p, int budget, int group) {
    return Base::initial(pol.inner(), p.inner, budget, group);
  }
  static int keep_limit(const Pol& pol, int budget) { return Base::keep_limit(pol.inner(), budget); }
  static int prompt_limit(const Pol& pol, int budget) { return traits::prompt_limit<Base>(pol.inner(), budget); }
  static int vote_window(const Pol& pol) { return traits::vote_window<Base>(pol.inner()); }
};

}  // namespace kvtrim::gpu
