// kvtrim: SnapKV-style prompt compression (arXiv 2404.14469) in front of any decode-time policy.
//
// At the end of prefill, the last `window` prompt queries (the observation window) vote for the earlier
// prompt tokens: for each query head, their causal attention probabilities are summed over the window,
// smoothed with a 1-D pooling kernel over neighbouring positions, and reduced over the GQA group. Each KV
// head keeps the top (capacity - window) earlier tokens plus the whole window. Decoding is then handed to
// `Decode`: `SnapKV<>` (Decode = FullCache) is the paper (append, never evict); `SnapKV<H2O>` is SnapKV
// prefill + H2O decode, and so on. SlotMeta is Decode's, so HeadOf<SnapKV<D>> is HeadOf<D>.
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
//  - The window's attention is recomputed here (fp32, max-subtracted softmax, scale 1/sqrt(head_dim) as in
//    the backend) from the last `window` prompt queries, which on_insert keeps in a small per-head ring. So
//    the backend's prompt_window() stays free for Decode (TOVA needs the last row, for instance).
//  - Ties at the cut keep the newest position (the library's tie rule, select.hpp).
//  - Decode's state is initialised by calling its on_prompt with a compacted PromptContext: the column and
//    window sums of just the kept tokens (kept slot j is the j-th kept prompt token in position order). So
//    H2O starts from the full prompt's column sums of the tokens that survived, and does not evict more.
//  - With Decode = FullCache the cache cannot grow past the budget in decode: SnapKV declares
//    kNeverEvictsInDecode, so KVCache refuses such a decode step with kvtrim::Error before anything changes
//    (its prefill still shrinks long prompts, so it does not declare kNeverEvicts).
//  - SnapKV's HeadState wraps Decode's (it adds the query ring and prefill scratch); SlotMeta is Decode's.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"
#include "full_cache.hpp"

namespace kvtrim {

enum class SnapPooling { kAvg, kMax };
constexpr auto enum_names(SnapPooling) {
  return std::array{EnumName<SnapPooling>{SnapPooling::kAvg, "avg"}, EnumName<SnapPooling>{SnapPooling::kMax, "max"}};
}

// Pooled vote of position j from votes[0..n): a `kernel`-wide window centred on j (kernel odd).
KVTRIM_HOST_DEVICE inline float snapkv_pool_at(const float* votes, int n, int j, int kernel, SnapPooling how) {
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
KVTRIM_HOST_DEVICE inline float snapkv_score_at(const AttentionRows& votes, int n, int j, int kernel,
                                                SnapPooling how, GroupReduce reduce) {
  float acc = snapkv_pool_at(votes.p, n, j, kernel, how);
  for (int g = 1; g < votes.group; ++g) {
    const float x = snapkv_pool_at(votes.p + static_cast<std::ptrdiff_t>(g) * votes.stride, n, j, kernel, how);
    acc = reduce == GroupReduce::kMax ? (x > acc ? x : acc) : acc + x;
  }
  return reduce == GroupReduce::kMean ? acc / static_cast<float>(votes.group) : acc;
}

namespace detail {
template <class Decode>
struct SnapKVName {
  static constexpr std::string_view prefix = "snapkv+";
  static constexpr std::size_t n = prefix.size() + std::string_view(Decode::kName).size();
  static constexpr std::array<char, n + 1> chars = [] {
    std::array<char, n + 1> a{};
    const std::string_view inner = Decode::kName;
    for (std::size_t i = 0; i < prefix.size(); ++i) a[i] = prefix[i];
    for (std::size_t i = 0; i < inner.size(); ++i) a[prefix.size() + i] = inner[i];
    return a;
  }();
  static constexpr std::string_view value{chars.data(), n};
};
}  // namespace detail

template <class Decode = FullCache>
struct SnapKV {
  static_assert(Policy<Decode>, "SnapKV<Decode>: Decode must be a kvtrim::Policy");

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
  using SlotMeta = typename Decode::SlotMeta;
  struct HeadState {
    typename Decode::HeadState inner{};
    // Prefill only (released when the prompt is done): the last `window` prompt queries, ring-ordered by
    // position % window, [window x group*key_dim]; and the selection's scratch.
    std::vector<float> queries;
    std::int64_t prompt_seen = 0;
    std::vector<float> votes, scores, sums;
    std::vector<int> keep;
  };
  static constexpr std::string_view kName =
      std::is_same_v<Decode, FullCache> ? std::string_view("snapkv") : detail::SnapKVName<Decode>::value;
  static constexpr Signals kSignals = Decode::kSignals;
  static constexpr EvictTiming kTiming = Decode::kTiming;
  static constexpr bool kNeverEvictsInDecode = never_evicts_in_decode<Decode>();

  SnapKV(const Params& p, const LayerContext& ctx)
      : p_(validated(p, ctx)),
        inner_(p.decode, ctx),
        scale_(1.0f / std::sqrt(static_cast<float>(ctx.head_dim))) {}

  const Params& params() const { return p_; }
  const Decode& decode_policy() const { return inner_; }
  int capacity(int budget) const { return p_.capacity > 0 ? p_.capacity : budget; }

  int prompt_window() const { return inner_.prompt_window(); }

  void on_insert(HeadState& s, HeadOf<SnapKV>& h, const StepContext& step) {
    if (step.prefill) {
      remember_query(s, h, step);
    }
    inner_.on_insert(s.inner, h, step);
  }
  void on_attention(HeadState& s, HeadOf<SnapKV>& h, const StepContext& step, const AttentionRows& rows) {
    inner_.on_attention(s.inner, h, step, rows);
  }
  void evict(HeadState& s, HeadOf<SnapKV>& h, const StepContext& step) { inner_.evict(s.inner, h, step); }

  void on_prompt(HeadState& s, HeadOf<SnapKV>& h, const PromptContext& prompt) {
    const int T = h.size();
    const int cap = capacity(h.budget());
    if (T <= cap) {
      inner_.on_prompt(s.inner, h, prompt);
      release(s);
      return;
    }
    KVTRIM_CHECK(s.prompt_seen == T && prompt.n_tokens == T,
                 "internal: SnapKV saw ", s.prompt_seen, " prompt queries for ", T, " prompt tokens");
    score_prefix(s, h, prompt.group);
    select(s, h, cap);
    // kept slot j is now prompt token s.keep[j] (keep_only sorted the list ascending)
    const int K = static_cast<int>(s.keep.size());
    const int g = prompt.group;
    const bool has_col = prompt.col_sum != nullptr, has_win = prompt.window_sum != nullptr;
    s.sums.assign(static_cast<std::size_t>(g) * K * ((has_col ? 1 : 0) + (has_win ? 1 : 0)), 0.0f);
    float* col = s.sums.data();
    float* win = s.sums.data() + (has_col ? static_cast<std::size_t>(g) * K : 0);
    for (int gi = 0; gi < g; ++gi)
      for (int j = 0; j < K; ++j) {
        const std::size_t at = static_cast<std::size_t>(gi) * K + j;
        if (has_col) col[at] = prompt.col(gi, s.keep[j]);
        if (has_win) win[at] = prompt.win(gi, s.keep[j]);
      }
    const PromptContext kept{prompt.layer, prompt.kv_head, g, K, has_col ? col : nullptr,
                             has_win ? win : nullptr, prompt.window};
    inner_.on_prompt(s.inner, h, kept);
    release(s);
  }

 private:
  static const Params& validated(const Params& p, const LayerContext& ctx) {
    KVTRIM_CHECK(p.window >= 1, "SnapKV: window must be >= 1 prompt token, got ", p.window);
    KVTRIM_CHECK(p.kernel >= 1 && p.kernel % 2 == 1, "SnapKV: kernel must be odd and >= 1, got ", p.kernel);
    KVTRIM_CHECK(p.capacity >= 0, "SnapKV: capacity must be >= 0 (0 = the budget), got ", p.capacity);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h) {
      const int b = ctx.budgets[h];
      KVTRIM_CHECK(p.capacity <= b, "SnapKV: capacity (", p.capacity, ") exceeds the budget ", b, " of layer ",
                   ctx.layer, " KV head ", h);
      const int cap = p.capacity > 0 ? p.capacity : b;
      KVTRIM_CHECK(p.window < cap, "SnapKV: window (", p.window, ") must be smaller than the prompt capacity ", cap,
                   p.capacity > 0 ? " (capacity)" : " (the budget)", " of layer ", ctx.layer, " KV head ", h,
                   " so that some earlier tokens can be kept");
    }
    return p;
  }

  void remember_query(HeadState& s, const HeadOf<SnapKV>& h, const StepContext& step) {
    const std::size_t width = static_cast<std::size_t>(step.group) * step.head_dim;
    if (h.size() == 1) s.prompt_seen = 0;  // first token of a prompt
    if (s.queries.size() != width * p_.window) s.queries.assign(width * p_.window, 0.0f);
    const std::size_t row = static_cast<std::size_t>(s.prompt_seen % p_.window);
    std::copy(step.q, step.q + width, s.queries.begin() + static_cast<std::ptrdiff_t>(row * width));
    ++s.prompt_seen;
  }

  // s.scores[j], j < T - window: pooled, group-reduced window votes for the earlier prompt tokens.
  void score_prefix(HeadState& s, const HeadOf<SnapKV>& h, int g) {
    const int T = h.size(), w = p_.window, P = T - w, dk = h.key_dim();
    const auto keys = h.keys();  // slot j = prompt token j
    s.votes.assign(static_cast<std::size_t>(g) * P, 0.0f);
    float* votes = s.votes.data();
    Eigen::VectorXf logits(T);
    for (int r = 0; r < w; ++r) {
      const int t = P + r;  // query of prompt token t sees keys 0..t
      const float* qrow = s.queries.data() + static_cast<std::size_t>(t % w) * g * dk;
      for (int gi = 0; gi < g; ++gi) {
        Eigen::Map<const Eigen::VectorXf> q(qrow + static_cast<std::size_t>(gi) * dk, dk);
        auto l = logits.head(t + 1);
        l.noalias() = (keys.topRows(t + 1) * q) * scale_;
        const float m = l.maxCoeff();
        l = (l.array() - m).exp().matrix();
        const float z = l.sum();
        float* v = votes + static_cast<std::size_t>(gi) * P;
        for (int j = 0; j < P; ++j) v[j] += l[j] / z;
      }
    }
    s.scores.resize(static_cast<std::size_t>(P));
    const AttentionRows rows{votes, P, g, P};
    for (int j = 0; j < P; ++j) s.scores[j] = snapkv_score_at(rows, P, j, p_.kernel, p_.pooling, p_.group_reduce);
  }

  // Keeps the top (cap - window) earlier tokens by score (newest on ties) plus the window.
  void select(HeadState& s, HeadOf<SnapKV>& h, int cap) {
    const int T = h.size(), P = T - p_.window;
    const std::size_t room = static_cast<std::size_t>(cap - p_.window);
    s.keep.resize(static_cast<std::size_t>(P));
    for (int j = 0; j < P; ++j) s.keep[j] = j;
    auto keeps_before = [&](int a, int b) { return evicts_before(s.scores[b], h.pos(b), s.scores[a], h.pos(a)); };
    if (room < s.keep.size()) {
      std::nth_element(s.keep.begin(), s.keep.begin() + static_cast<std::ptrdiff_t>(room), s.keep.end(),
                       keeps_before);
      s.keep.resize(room);
    }
    for (int j = P; j < T; ++j) s.keep.push_back(j);
    h.keep_only(s.keep);
  }

  static void release(HeadState& s) {
    s.prompt_seen = 0;
    for (auto* v : {&s.queries, &s.votes, &s.scores, &s.sums}) {
      v->clear();
      v->shrink_to_fit();
    }
    s.keep.clear();
    s.keep.shrink_to_fit();
  }

  Params p_;
  Decode inner_;
  float scale_;
};

}  // namespace kvtrim
