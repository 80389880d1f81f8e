// kvtrim: the policy contract. A policy is its rules, written once for every backend.
//
// A policy is a type with one object per layer (built on the host, where it validates its parameters) and a set
// of static KVTRIM_HOST_DEVICE rules over plain data: the per-token metadata `SlotMeta` and the per-(layer,
// KV head) `State`, both trivially copyable so that they live wherever the slots live (host memory for
// CpuBackend, device memory for CudaBackend). The backends own every loop (append, attention, victim search,
// compaction); a policy never sees storage, so the CPU and the GPU run the same decisions.
//
//   struct MyPolicy {
//     struct Params { ...; static constexpr auto fields(); };  // user knobs, settable by name (params.hpp)
//     struct SlotMeta { ... };                   // one per kept token, starts as SlotMeta{}
//     struct State { ... };                      // one per (layer, KV head)
//     static constexpr std::string_view kName = "mine";
//     static constexpr Signals kSignals = Signals::kAttention;     // what the backend must compute
//     static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
//     MyPolicy(const Params&, const LayerContext&);               // host; throws kvtrim::Error on bad params
//     State initial(int kv_head, int budget) const;               // host; the state of an empty head
//     // rules (KVTRIM_HOST_DEVICE static):
//     on_insert(State&, SlotMeta&, std::int64_t pos, const TokenInputs&)  // the new token, decode and prompt
//     protects(const State&, const SlotMeta&, pos, newest) -> bool        // never evicted
//     score(const State&, const SlotMeta&, pos, newest) -> float          // higher = keep
//     prompt_score(const State&, SlotMeta&, int t, const PromptSums&) -> float  // prompt token t (may record
//                                                                              // metadata the kept tokens keep)
//     // kAttention policies also:
//     group_reduce(const State&) -> GroupReduce                          // the GQA rule for one probability
//     on_attention(const State&, SlotMeta&, float p)                     // this step's probability of the slot
//   };
//
// Eviction, the same on every backend: after a decode step a head keeps at most keep_limit(budget) tokens;
// while it holds more, the unprotected slot with the lowest score leaves, the oldest position first on ties
// (select.hpp). A prompt keeps the prompt_limit(budget) tokens with the highest prompt_score, protected ones
// first, the newest on ties. Optional parts (defaults in namespace `rules` below):
//   int keep_limit(int budget) const, int prompt_limit(int budget) const   (default: budget)
//   prompt_protects(...) (default protects), int prompt_window() const / int vote_window() const (rows of the
//   prompt's last queries summed into PromptSums::win / ::vote; default 0)
//   kSimHash: SimHashProjection projection(int head_dim) const; the backend codes keys and the step's queries
//   kMerges (the victim may merge into another slot), kStructured (every slot decided at once), kHostPrompt
//   (the prompt stage runs host code): see `rules` below; kNeverEvicts / kNeverEvictsInDecode.
// Decode step, per KV head: append + on_insert, [evict if kBeforeAttention], attention, on_attention for every
// slot (kAttention), [evict if kAfterAttention]. Prefill: on_insert for every prompt token in order, exact causal
// attention with the sums the policy asked for, prompt_score, selection.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "config.hpp"
#include "macros.hpp"
#include "signals.hpp"
#include "simhash.hpp"

namespace kvtrim {

// Attention probabilities of one step for one KV head: row g is query head g of the group, column i is slot i.
struct AttentionRows {
  const float* p = nullptr;
  int n = 0;
  int group = 1;
  int stride = 0;  // floats between rows

  KVTRIM_HOST_DEVICE float at(int g, int slot) const { return p[g * stride + slot]; }
  // The group's probabilities of one slot made one (sum, mean or max, in query-head order).
  KVTRIM_HOST_DEVICE float reduce(int slot, GroupReduce how) const {
    float acc = at(0, slot);
    for (int g = 1; g < group; ++g) {
      const float x = at(g, slot);
      acc = how == GroupReduce::kMax ? (x > acc ? x : acc) : acc + x;
    }
    return how == GroupReduce::kMean ? acc / static_cast<float>(group) : acc;
  }
};

// What on_insert sees of the new token.
struct TokenInputs {
  const float* key = nullptr;  // [d] fp32 key as stored (projected under low-rank storage)
  int d = 0;
  int group = 1;
  bool prefill = false;                    // a prompt token, not a decode step
  std::uint64_t key_code = 0;              // kSimHash: SimHash code of the key
  const std::uint64_t* q_codes = nullptr;  // kSimHash: [group] codes of the step's queries (decode steps and
                                           // the last prompt token only; null otherwise)
};

// The prompt after exact causal attention, per token j of n, each [group x n] (null where not asked for):
// col = every prompt query's probability on j, win = the last prompt_window() queries', vote = the last
// vote_window() queries'.
struct PromptSums {
  AttentionRows col, win, vote;
  // Number of prompt queries that attended to token t (itself and every later one).
  KVTRIM_HOST_DEVICE int queries_seeing(int t) const { return col.n - t; }
};

template <class P>
concept Policy =
    requires {
      typename P::Params;
      typename P::SlotMeta;
      typename P::State;
      { P::kName } -> std::convertible_to<std::string_view>;
      { P::kSignals } -> std::convertible_to<Signals>;
      { P::kTiming } -> std::convertible_to<EvictTiming>;
    } && std::is_trivially_copyable_v<typename P::SlotMeta> && std::is_trivially_copyable_v<typename P::State> &&
    std::default_initializable<typename P::State> && std::default_initializable<typename P::SlotMeta> &&
    std::constructible_from<P, const typename P::Params&, const LayerContext&> &&
    requires(const P& pol, typename P::State& s, const typename P::State& cs, typename P::SlotMeta& m,
             const typename P::SlotMeta& cm, std::int64_t pos, const TokenInputs& in, const PromptSums& sums) {
      { pol.initial(0, 1) } -> std::same_as<typename P::State>;
      P::on_insert(s, m, pos, in);
      { P::protects(cs, cm, pos, pos) } -> std::convertible_to<bool>;
      { P::score(cs, cm, pos, pos) } -> std::convertible_to<float>;
      { P::prompt_score(cs, m, 0, sums) } -> std::convertible_to<float>;
    } &&
    (!has(P::kSignals, Signals::kAttention) ||
     requires(const typename P::State& cs, typename P::SlotMeta& m) {
       { P::group_reduce(cs) } -> std::convertible_to<GroupReduce>;
       P::on_attention(cs, m, 0.0f);
     });

// The optional parts of the contract, with their defaults. Backends ask these, never the policy directly.
namespace rules {

template <class P>
int keep_limit(const P& pol, int budget) {
  if constexpr (requires { pol.keep_limit(budget); })
    return pol.keep_limit(budget);
  else
    return budget;
}
template <class P>
int prompt_limit(const P& pol, int budget) {
  if constexpr (requires { pol.prompt_limit(budget); })
    return pol.prompt_limit(budget);
  else
    return keep_limit(pol, budget);
}
template <class P>
KVTRIM_HOST_DEVICE bool prompt_protects(const typename P::State& s, const typename P::SlotMeta& m, std::int64_t pos,
                                        std::int64_t newest) {
  if constexpr (requires { P::prompt_protects(s, m, pos, newest); })
    return P::prompt_protects(s, m, pos, newest);
  else
    return P::protects(s, m, pos, newest);
}
template <class P>
int prompt_window(const P& pol) {
  if constexpr (requires { pol.prompt_window(); })
    return pol.prompt_window();
  else
    return 0;
}
template <class P>
int vote_window(const P& pol) {
  if constexpr (requires { pol.vote_window(); })
    return pol.vote_window();
  else
    return 0;
}

// kSimHash: the backend codes every key, and the queries of every decode step (and of the last prompt token),
// with the layer's projection(head_dim) and hands the codes to on_insert (TokenInputs).
template <class P>
constexpr bool simhash() {
  if constexpr (requires { P::kSimHash; })
    return P::kSimHash;
  else
    return false;
}

// kMerges: the victim (lowest merge_score among the unprotected, after a head-wide Stats reduction) may fold
// into the absorbing slot whose key is the most similar (cosine; the older slot on ties) when the cosine reaches
// merge_threshold; the rows mix as a·dst + b·src with mix_weights (each product rounded, no fused multiply-add),
// then merge_meta folds the metadata. A policy provides:
//   struct Stats; stats_of(const SlotMeta&) -> Stats; combine(Stats, Stats) -> Stats
//   merge_score(const State&, const Stats&, const SlotMeta&) -> float      (replaces score)
//   may_merge(const State&, const Stats&, const SlotMeta& victim) -> bool
//   absorbs(const State&, const SlotMeta&, std::int64_t pos) -> bool
//   merge_threshold(const State&) -> float; merges_keys(const State&) -> bool
//   mix_weights(const State&, const SlotMeta& dst, const SlotMeta& src) -> MixWeights
//   merge_meta(SlotMeta& into, const SlotMeta& from)
template <class P>
constexpr bool merges() {
  if constexpr (requires { P::kMerges; })
    return P::kMerges;
  else
    return false;
}

// kStructured: eviction decides every slot at once (BUZZ's re-segmentation). While needs_fit(state, n), every
// slot i gets fit_key(state, pos, meta, n, i) (pass 1), then fit_slot(state, meta, keys, n, i, new_meta) says
// whether it stays and with which metadata (pass 2); both passes see the slots unchanged.
template <class P>
constexpr bool structured() {
  if constexpr (requires { P::kStructured; })
    return P::kStructured;
  else
    return false;
}

// kHostPrompt: the prompt stage is host code that the rules cannot express (a batch evict-then-merge):
// `int host_prompt(State&, HeadStore<SlotMeta>&, const PromptSums&) const` brings a head holding the prompt
// (token j in slot j, SlotMeta after on_insert) within budget and returns the head's decode limit from then on.
// CudaBackend runs it on a host copy of the prompt once per prefill.
template <class P>
constexpr bool host_prompt() {
  if constexpr (requires { P::kHostPrompt; })
    return P::kHostPrompt;
  else
    return false;
}

}  // namespace rules

// The two coefficients of a merge: dst <- a * dst + b * src.
struct MixWeights {
  float a = 0.5f, b = 0.5f;
};
// a * x + b * y with each product rounded before the sum (no fused multiply-add on any backend), so merged rows
// are the same bits everywhere.
KVTRIM_HOST_DEVICE inline float mix_rn(const MixWeights& w, float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(w.a, x), __fmul_rn(w.b, y));
#else
  const volatile float ax = w.a * x;  // volatile: no contraction into an FMA, whatever the target flags
  return ax + w.b * y;
#endif
}

namespace detail {
// Prefix + Inner::kName as a constexpr string: the names of composed policies ("outer+inner").
template <const std::string_view& Prefix, class Inner>
struct ComposedName {
  static constexpr std::string_view kInner = Inner::kName;
  static constexpr auto kChars = [] {
    std::array<char, Prefix.size() + kInner.size()> a{};
    std::size_t i = 0;
    for (char c : Prefix) a[i++] = c;
    for (char c : kInner) a[i++] = c;
    return a;
  }();
  static constexpr std::string_view kValue{kChars.data(), kChars.size()};
};
}  // namespace detail

// Cosine similarity from a dot product and the two norms; 0 when either vector is zero (the merge rule's
// similarity of two keys). No division under a branch (a compiler keeps such a loop over slots scalar): the
// divisor is made 1 and the quotient multiplied by 0 instead, which gives the same value for finite inputs.
KVTRIM_HOST_DEVICE inline float cosine_from(float dot, float norm_a, float norm_b) {
  const float zero = static_cast<float>(!((norm_a > 0.0f) & (norm_b > 0.0f)));  // 1 when either norm is 0
  return dot / (norm_a * norm_b + zero) * (1.0f - zero);
}

// Policies declare `static constexpr bool kNeverEvicts = true` when they never make room (FullCache), or
// `kNeverEvictsInDecode` when only their decode stage never does (a compressed prompt, then append-only).
template <class P>
constexpr bool never_evicts_in_prefill() {
  if constexpr (requires { P::kNeverEvicts; })
    return P::kNeverEvicts;
  else
    return false;
}
template <class P>
constexpr bool never_evicts_in_decode() {
  if constexpr (requires { P::kNeverEvictsInDecode; })
    return P::kNeverEvictsInDecode;
  else
    return never_evicts_in_prefill<P>();
}

// Spells out which part of the contract a type misses, one readable message each (used by KVCache).
template <class P>
constexpr bool check_policy() {
  static_assert(requires { typename P::Params; }, "kvtrim: a Policy needs a nested `Params` struct");
  static_assert(requires { typename P::SlotMeta; },
                "kvtrim: a Policy needs a nested `SlotMeta` struct (per-slot metadata; may be empty)");
  static_assert(requires { typename P::State; },
                "kvtrim: a Policy needs a nested `State` struct (per (layer, KV head) state; may be empty)");
  static_assert(requires { P::kName; }, "kvtrim: a Policy needs `static constexpr std::string_view kName`");
  static_assert(requires { P::kSignals; }, "kvtrim: a Policy needs `static constexpr Signals kSignals`");
  static_assert(requires { P::kTiming; }, "kvtrim: a Policy needs `static constexpr EvictTiming kTiming`");
  static_assert(Policy<P>,
                "kvtrim: this type does not satisfy kvtrim::Policy: check the constructor (const Params&, const "
                "LayerContext&), initial(kv_head, budget), the static rules on_insert, protects, score and "
                "prompt_score (plus group_reduce and on_attention for Signals::kAttention) in policy.hpp, and "
                "that SlotMeta and State are trivially copyable");
  return true;
}

}  // namespace kvtrim
