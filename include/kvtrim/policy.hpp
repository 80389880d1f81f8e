// kvtrim: the policy contract.
//
// A policy is a type with one object per layer. It decides which slot each token takes, which tokens leave
// (or merge), and declares which signals it needs so the backend computes only those. Per-slot state lives in
// `SlotMeta` (moved with the slot by the store); per-(layer, KV head) state in `HeadState`.
//
//   struct MyPolicy {
//     struct Params { ... };                 // user-facing knobs, validated in the constructor
//     struct SlotMeta { ... };               // trivially copyable, one per kept token
//     struct HeadState { ... };              // default-constructible, one per (layer, KV head)
//     static constexpr std::string_view kName = "mine";
//     static constexpr Signals kSignals = Signals::kAttention;
//     static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
//     MyPolicy(const Params&, const LayerContext&);            // throws kvtrim::Error on bad params
//     int prompt_window() const;                               // rows of prompt attention summed separately
//     void on_insert(HeadState&, Head&, const StepContext&);   // new token is in slot step.slot
//     void on_attention(HeadState&, Head&, const StepContext&, const AttentionRows&);
//     void evict(HeadState&, Head&, const StepContext&);       // leave head.size() <= head.budget()
//     void on_prompt(HeadState&, Head&, const PromptContext&); // whole prompt held; bring it to budget
//   };
//
// Decode step, per KV head: append → on_insert → [evict if kBeforeAttention] → attention →
// on_attention (if kAttention) → [evict if kAfterAttention]. Prefill: append every prompt token with
// on_insert, exact causal attention, then on_prompt.
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "config.hpp"
#include "head_store.hpp"
#include "macros.hpp"
#include "signals.hpp"

namespace kvtrim {

// The decode step (or one prompt token during prefill) as a policy sees it.
struct StepContext {
  int layer = 0;
  int kv_head = 0;
  int group = 1;     // query heads sharing this KV head
  int head_dim = 0;  // width of q (the stored key width can differ for low-rank storage)
  std::int64_t position = 0;  // position of the new token
  int slot = -1;              // slot the new token occupies (on_insert); -1 when not applicable
  const float* q = nullptr;   // [group x head_dim] queries of this KV head's group, post-RoPE
  bool prefill = false;       // on_insert called while a prompt is being loaded
};

// Attention probabilities of one decode step for one KV head: row g is query head g of the group,
// column i is slot i at the time of the step.
struct AttentionRows {
  const float* p = nullptr;
  int n = 0;
  int group = 1;
  int stride = 0;  // floats between rows

  KVTRIM_HOST_DEVICE float at(int g, int slot) const { return p[g * stride + slot]; }
  KVTRIM_HOST_DEVICE float reduce(int slot, GroupReduce how) const {
    float acc = at(0, slot);
    for (int g = 1; g < group; ++g) {
      const float x = at(g, slot);
      acc = how == GroupReduce::kMax ? (x > acc ? x : acc) : acc + x;
    }
    return how == GroupReduce::kMean ? acc / static_cast<float>(group) : acc;
  }
};

// The prompt after exact causal attention. Slot i holds prompt token i when on_prompt is called.
struct PromptContext {
  int layer = 0;
  int kv_head = 0;
  int group = 1;
  int n_tokens = 0;
  // [group x n_tokens]: sum over all prompt queries of the probability on token j (kAttention only).
  const float* col_sum = nullptr;
  // [group x n_tokens]: the same sum over the last `window` queries only (window = policy.prompt_window()).
  const float* window_sum = nullptr;
  int window = 0;

  float col(int g, int j) const { return col_sum[static_cast<std::size_t>(g) * n_tokens + j]; }
  float win(int g, int j) const { return window_sum[static_cast<std::size_t>(g) * n_tokens + j]; }
  // Group-reduced column sum (all queries) or window sum for token j.
  float reduce_col(int j, GroupReduce how) const { return reduce_rows(col_sum, j, how); }
  float reduce_win(int j, GroupReduce how) const { return reduce_rows(window_sum, j, how); }

 private:
  float reduce_rows(const float* base, int j, GroupReduce how) const {
    AttentionRows rows{base, n_tokens, group, n_tokens};
    return rows.reduce(j, how);
  }
};

template <class P>
using HeadOf = HeadStore<typename P::SlotMeta>;

template <class P>
concept Policy =
    requires {
      typename P::Params;
      typename P::SlotMeta;
      typename P::HeadState;
      { P::kName } -> std::convertible_to<std::string_view>;
      { P::kSignals } -> std::convertible_to<Signals>;
      { P::kTiming } -> std::convertible_to<EvictTiming>;
    } && std::is_trivially_copyable_v<typename P::SlotMeta> &&
    std::default_initializable<typename P::HeadState> &&
    std::constructible_from<P, const typename P::Params&, const LayerContext&> &&
    requires(P& p, const P& cp, typename P::HeadState& s, HeadOf<P>& h, const StepContext& step,
             const AttentionRows& rows, const PromptContext& prompt) {
      { cp.prompt_window() } -> std::convertible_to<int>;
      p.on_insert(s, h, step);
      p.on_attention(s, h, step, rows);
      p.evict(s, h, step);
      p.on_prompt(s, h, prompt);
    };

// Policies declare `static constexpr bool kNeverEvicts = true` when they never make room (FullCache), or
// `kNeverEvictsInDecode` when only their decode stage never does (a compressed prompt, then append-only).
template <class P>
constexpr bool never_evicts_in_prefill() {
  if constexpr (requires { P::kNeverEvicts; }) return P::kNeverEvicts;
  return false;
}
template <class P>
constexpr bool never_evicts_in_decode() {
  if constexpr (requires { P::kNeverEvictsInDecode; }) return P::kNeverEvictsInDecode;
  return never_evicts_in_prefill<P>();
}

// Spells out which part of the contract a type misses, one readable message each (used by KVCache).
template <class P>
constexpr bool check_policy() {
  static_assert(requires { typename P::Params; }, "kvtrim: a Policy needs a nested `Params` struct");
  static_assert(requires { typename P::SlotMeta; },
                "kvtrim: a Policy needs a nested `SlotMeta` struct (per-slot state; may be empty)");
  static_assert(requires { typename P::HeadState; },
                "kvtrim: a Policy needs a nested `HeadState` struct (per (layer, KV head) state; may be empty)");
  static_assert(requires { P::kName; }, "kvtrim: a Policy needs `static constexpr std::string_view kName`");
  static_assert(requires { P::kSignals; }, "kvtrim: a Policy needs `static constexpr Signals kSignals`");
  static_assert(requires { P::kTiming; }, "kvtrim: a Policy needs `static constexpr EvictTiming kTiming`");
  static_assert(Policy<P>,
                "kvtrim: this type does not satisfy kvtrim::Policy: check the constructor "
                "(const Params&, const LayerContext&), prompt_window(), on_insert, on_attention, evict and "
                "on_prompt signatures in policy.hpp, and that SlotMeta is trivially copyable");
  return true;
}

}  // namespace kvtrim
