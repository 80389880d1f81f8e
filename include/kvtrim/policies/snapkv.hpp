// kvtrim: SnapKV-style prompt compression (arXiv 2404.14469) in front of any decode-time policy.
//
// At the end of prefill, the last `window` prompt queries (the observation window) vote for the earlier
// prompt tokens: for each query head, their causal attention probabilities are summed over the window,
// smoothed with a 1-D pooling kernel over neighbouring positions, and reduced over the GQA group. Each KV
// head keeps the top (capacity - window) earlier tokens plus the whole window. Decoding is then handed to
// `Decode`: `SnapKV<>` (Decode = FullCache) is the paper (append, never evict); `SnapKV<D>` is SnapKV
// prefill + D's decode (the registry has an accumulated-attention decoder). SlotMeta is Decode's.
//
// Parameters (defaults):
//  - window (32): observation window, in prompt tokens (official init_snapkv default 32).
//  - kernel (5): pooling kernel size, odd and >= 1 (1 = no pooling).
//  - pooling (kAvg): kAvg (official default) or kMax.
//  - group_reduce (kMean): GQA rule over the pooled votes of a group's query heads (kvpress's mean).
//  - capacity (0): prompt tokens kept per KV head, SnapKV's max_capacity_prompt; 0 = the head's budget. A
//    capacity below the budget leaves room for generated tokens before the decode policy must evict.
//  - decode (Decode::Params{}): parameters of the decode-time policy.
//
// Choices where the paper / official code is silent or ambiguous:
//  - Compression happens only when the prompt is longer than the capacity (as the official code); a shorter
//    prompt is handed to Decode untouched.
//  - Votes cover the earlier tokens only (the window is always kept). Average pooling divides by the full
//    kernel size at the edges (zero padding, PyTorch avg_pool1d's count_include_pad as in the official
//    code); max pooling ignores out-of-range neighbours. Pooling runs per query head, then the group is
//    reduced (kvpress order). The official code repeats KV heads and keeps one set per *query* head, which
//    multiplies memory by the group size; we keep one set per KV head.
//  - The window's votes are the backend's prompt attention summed over the last `window` prompt queries
//    (vote_window(), PromptSums::vote), separate from the window sums Decode may ask for (prompt_window():
//    a last-query decoder needs the last row, for instance).
//  - Ties at the cut keep the newest position (the library's tie rule, select.hpp).
//  - Decode's metadata comes from Decode's own prompt_score for every prompt token (the kept ones keep it):
//    an accumulating decoder starts from the full prompt's column sums of the tokens that survived. Decode
//    must keep at least the capacity after a prompt (its prompt_limit), since SnapKV's cut is the only one;
//    the constructor checks it.
//  - With Decode = FullCache the cache cannot grow past the budget in decode: SnapKV declares
//    kNeverEvictsInDecode, so KVCache refuses such a decode step with kvtrim::Error before anything changes
//    (its prefill still shrinks long prompts, so it does not declare kNeverEvicts).
//  - SnapKV's State wraps Decode's (it adds the vote parameters); SlotMeta is Decode's. Decode evicts one
//    victim at a time by score (a merging or structured Decode is rejected at compile time).
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "../policy.hpp"
#include "../select.hpp"
#include "full_cache.hpp"

namespace kvtrim {

enum class SnapPooling { kAvg, kMax };
constexpr auto enum_names(SnapPooling) {
  return std::array{EnumName<SnapPooling>{SnapPooling::kAvg, "avg"}, EnumName<SnapPooling>{SnapPooling::kMax, "max"}};
}

namespace detail {
inline constexpr std::string_view kSnapPrefix = "snapkv+";
}  // namespace detail

template <class Decode = FullCache>
struct SnapKV {
  static_assert(Policy<Decode>, "SnapKV<Decode>: Decode must be a kvtrim::Policy");
  static_assert(!rules::merges<Decode>() && !rules::structured<Decode>() && !rules::host_prompt<Decode>(),
                "SnapKV<Decode>: Decode must evict one victim at a time by score (not a merging or structured policy)");

  struct Params {
    int window = 32;
    int kernel = 5;
    SnapPooling pooling = SnapPooling::kAvg;
    GroupReduce group_reduce = GroupReduce::kMean;
    int capacity = 0;  // 0: the head's budget
    typename Decode::Params decode{};
    static constexpr auto fields() {
      return std::tuple{field("window", &Params::window),     field("kernel", &Params::kernel),
                        field("pooling", &Params::pooling),   field("group_reduce", &Params::group_reduce),
                        field("capacity", &Params::capacity), field("decode", &Params::decode)};
    }
  };
  using DecodePolicy = Decode;
  using SlotMeta = typename Decode::SlotMeta;
  using DecodeState = typename Decode::State;
  struct State {
    DecodeState inner{};
    int window = 1;
    int kernel = 1;
    SnapPooling pooling = SnapPooling::kAvg;
    GroupReduce reduce = GroupReduce::kMean;
  };
  static constexpr std::string_view kName = std::is_same_v<Decode, FullCache>
                                                ? std::string_view("snapkv")
                                                : detail::ComposedName<detail::kSnapPrefix, Decode>::kValue;
  static constexpr Signals kSignals = Decode::kSignals;
  static constexpr EvictTiming kTiming = Decode::kTiming;
  static constexpr bool kNeverEvictsInDecode = never_evicts_in_decode<Decode>();
  static constexpr bool kSimHash = rules::simhash<Decode>();

  SnapKV(const Params& p, const LayerContext& ctx) : p_(p), inner_(p.decode, ctx) {
    KVTRIM_CHECK(p.window >= 1, "SnapKV: window must be >= 1 prompt token, got ", p.window);
    KVTRIM_CHECK(p.kernel >= 1 && p.kernel % 2 == 1, "SnapKV: kernel must be odd and >= 1, got ", p.kernel);
    KVTRIM_CHECK(p.capacity >= 0, "SnapKV: capacity must be >= 0 (0 = the budget), got ", p.capacity);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h) {
      const int b = ctx.budgets[h];
      KVTRIM_CHECK(p.capacity <= b, "SnapKV: capacity (", p.capacity, ") exceeds the budget ", b, " of layer ",
                   ctx.layer, " KV head ", h);
      const int cap = capacity(b);
      KVTRIM_CHECK(p.window < cap, "SnapKV: window (", p.window, ") must be smaller than the prompt capacity ", cap,
                   p.capacity > 0 ? " (capacity)" : " (the budget)", " of layer ", ctx.layer, " KV head ", h,
                   " so that some earlier tokens can be kept");
      KVTRIM_CHECK(rules::prompt_limit(inner_, b) >= cap, kName, ": the decode policy keeps only ",
                   rules::prompt_limit(inner_, b), " prompt tokens, fewer than SnapKV's capacity ", cap, " in layer ",
                   ctx.layer, " KV head ", h, "; lower SnapKV's capacity to that");
    }
  }

  const Params& params() const { return p_; }
  const Decode& decode_policy() const { return inner_; }
  int capacity(int budget) const { return p_.capacity > 0 ? p_.capacity : budget; }

  State initial(int kv_head, int budget) const {
    return {inner_.initial(kv_head, budget), p_.window, p_.kernel, p_.pooling, p_.group_reduce};
  }
  int keep_limit(int budget) const { return rules::keep_limit(inner_, budget); }
  int prompt_limit(int budget) const { return capacity(budget); }
  int prompt_window() const { return rules::prompt_window(inner_); }
  int vote_window() const { return p_.window; }
  SimHashProjection projection(int head_dim) const
    requires kSimHash
  {
    return inner_.projection(head_dim);
  }

  // Pooled vote of position j from votes[0..n): a `kernel`-wide window centred on j (kernel odd).
  KVTRIM_HOST_DEVICE static float pool_at(const float* votes, int n, int j, int kernel, SnapPooling how) {
    const int r = kernel / 2;
    float acc = how == SnapPooling::kMax ? votes[j] : 0.0f;
    for (int i = j - r; i <= j + r; ++i) {
      if (i < 0 || i >= n) continue;
      acc = how == SnapPooling::kMax ? (votes[i] > acc ? votes[i] : acc) : acc + votes[i];
    }
    return how == SnapPooling::kAvg ? acc / static_cast<float>(kernel) : acc;
  }
  // Score of earlier prompt token j (of n = T - window): each query head's window votes (row g of `votes`,
  // entries 0..n-1) pooled around j, then reduced over the group (AttentionRows::reduce's order).
  KVTRIM_HOST_DEVICE static float vote_score(const State& s, const AttentionRows& votes, int n, int j) {
    float acc = pool_at(votes.p, n, j, s.kernel, s.pooling);
    for (int g = 1; g < votes.group; ++g) {
      const float x = pool_at(votes.p + static_cast<std::ptrdiff_t>(g) * votes.stride, n, j, s.kernel, s.pooling);
      acc = s.reduce == GroupReduce::kMax ? (x > acc ? x : acc) : acc + x;
    }
    return s.reduce == GroupReduce::kMean ? acc / static_cast<float>(votes.group) : acc;
  }

  // ---- decode: Decode's rules on Decode's state
  KVTRIM_HOST_DEVICE static void on_insert(State& s, SlotMeta& m, std::int64_t pos, const TokenInputs& in) {
    Decode::on_insert(s.inner, m, pos, in);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta& m, std::int64_t pos, std::int64_t newest) {
    return Decode::protects(s.inner, m, pos, newest);
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const SlotMeta& m, std::int64_t pos, std::int64_t newest) {
    return Decode::score(s.inner, m, pos, newest);
  }
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s)
    requires(has(kSignals, Signals::kAttention))
  {
    return Decode::group_reduce(s.inner);
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, SlotMeta& m, float p)
    requires(has(kSignals, Signals::kAttention))
  {
    Decode::on_attention(s.inner, m, p);
  }

  // ---- prompt: the observation window is protected; earlier tokens score by their pooled votes, and Decode
  // records its own metadata for every token
  KVTRIM_HOST_DEVICE static bool prompt_protects(const State& s, const SlotMeta&, std::int64_t pos,
                                                 std::int64_t newest) {
    return pos > newest - s.window;
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int t, const PromptSums& in) {
    (void)Decode::prompt_score(s.inner, m, t, in);
    const int earlier = in.vote.n - s.window;
    if (in.vote.p == nullptr || t >= earlier) return 0.0f;  // the window itself is protected
    return vote_score(s, in.vote, earlier, t);
  }

 private:
  Params p_;
  Decode inner_;
};

}  // namespace kvtrim
