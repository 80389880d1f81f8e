// kvtrim: BUZZ (arXiv 2410.23079) — beehive-structured cache with segmented heavy hitters.
//
// What it keeps, per (layer, KV head): the first `sinks` tokens, the `window` newest tokens, and a middle
// region of at most `threshold` tokens. Nothing leaves until the middle grows past `threshold`; then the
// middle is re-segmented (the official algorithm, buzz-llm `BuzzKVCacheWithAccumulation`):
//  - old samples (middle tokens that survived an earlier re-segmentation) are thinned by position: in
//    position order keep the 1st, (h+1)-th, (2h+1)-th, ... (h = `thin_stride`, default ⌊(chunk+1)/2⌋ = 3);
//  - the new segment (middle tokens never re-segmented, i.e. the ones that arrived from the window since)
//    is cut, in position order, into consecutive chunks of `chunk` tokens (the last one may be shorter), and
//    in each chunk only the token with the highest score survives (the "local heavy hitter");
//  - every survivor becomes an old sample. Old history thus gets geometrically sparser (the beehive).
// With the defaults a re-segmentation fires about every 308 decode steps and the middle settles near
// x* = T / (1 + s(1 − 1/h)) ≈ 92 tokens right after one (T = 400, s = 5, h = 3).
//
// The score is pluggable: `Buzz<Scorer>`. The scorer decides which token of a chunk survives:
//  - AccumulatedAttention (default, the paper): sum of the attention probabilities each token received since
//    it joined, over all queries (prompt column sums at prefill, one row per decode step); GQA: the g query
//    heads of a KV group are reduced by `reduce` (mean by default; sum and max available).
//  - HashScorer (HashEvict-style, arXiv 2412.16187): each token keeps the SimHash code of its key
//    (simhash.hpp); the survivor is the chunk token whose code is closest in Hamming distance to the current
//    query's code (GQA: distances summed over the group by default, or max). Needs no attention.
// A composed policy is just a type: KVCache<Buzz<HashScorer>>.
// Scorer contract (see AccumulatedAttention): Params, trivially copyable SlotMeta, HeadState, kSignals,
// kBuzzName, a (Params, LayerContext) constructor, on_insert / on_attention / on_prompt hooks taking the
// scorer's HeadState and a ScorerSlots view, and `float score(const HeadState&, const ScorerSlots&, int slot)`
// (higher = survives). Scorers may keep state only in HeadState / SlotMeta during decode.
//
// Parameters (defaults = official main_run.py):
//  sinks 4, window 160, threshold 400 (T, official sample_threshold), chunk 5 (s, official sample_stride),
//  thin_stride 0 (= ⌊(chunk+1)/2⌋ as official), keep_oldest_on_tie true (official torch.max keeps the first),
//  scorer {} (the scorer's own Params).
// Budget: the official defaults need budget >= sinks + window + threshold = 564 (the +1 transient token is
// the store's extra slot). Budget-derived mode: window = 0 and/or threshold = 0 derive from each head's
// budget B: with both 0, A = B − sinks is split in the official 160:400 = 2:5 proportion, window = ⌊2A/7⌋,
// threshold = A − window (B = 32: 8 + 20; B = 256: 72 + 180; B = 564: 160 + 400); with one of them 0 it takes
// the rest, B − sinks − other. Every head must then have window >= 1 and threshold >= 2 and
// sinks + window + threshold <= B, else the constructor throws kvtrim::Error. A head keeps at most
// sinks + window + threshold tokens (= B in derived mode).
//
// Choices where the paper / official code is silent or differs from this library:
//  - Post-RoPE keys at their original positions. The official code caches pre-RoPE keys and re-rotates
//    them with contiguous in-cache indices every step (StreamingLLM pos-shift); kvtrim's cache receives
//    rotated keys, so there is no pos-shift here. This changes attention outputs versus the official code,
//    not which tokens the structure keeps for given scores.
//  - Sinks are the first `sinks` tokens the cache sees; the window is the `window` newest positions; the
//    middle is ordered by position (never by slot index).
//  - GQA: one kept set per KV head; the official code is MHA-only.
//  - Ties inside a chunk: the oldest token survives (official first-index argmax); keep_oldest_on_tie =
//    false keeps the newest.
//  - Budget after prefill: the official code chunks the prompt's middle once and may leave it above T,
//    trimming over later decode steps. Here the prompt's middle is chunked once (scores = prompt column
//    sums, with their causal bias, as official) and then, while it is still above T, thinned again by
//    position, so the budget holds when prefill returns.
//  - Scores are not reset after a re-segmentation (official: zeroed for sinks and old samples): an old
//    sample is never ranked by score again, so the reset changes nothing.
//  - Parameters that cannot shrink the middle are rejected: chunk must be >= 2 and the effective thin
//    stride >= 2 (chunk = 2 with the official formula gives a thin stride of 1; set thin_stride >= 2).
//
// The O(log n) claim: the released code, and this header, keep memory O(1) in the history length n (at
// most sinks + window + threshold tokens per head). Per decode step the work beyond attention is O(g·B)
// score accumulation (AccumulatedAttention) or O(g·bits·d) hashing (HashScorer), plus an O(1) check; a
// re-segmentation costs O(B log B) (one sort by position) and fires once per ≈ T − x* steps, so the
// amortised cost is independent of n. The geometric thinning keeps about log_h(n) "generations" of old
// samples, which is the likely reading of "log n"; the TIST "BUZZ with log n" variant whose threshold grows
// with n is not implemented (a fixed-capacity store cannot grow T).
// During decode only HeadState scratch (`order`, `keep`, reserved to budget + 1 on first use) is written.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "../simhash.hpp"
#include "streaming_llm.hpp"

namespace kvtrim {

// Per-token math shared with a GPU backend.
KVTRIM_HOST_DEVICE inline float buzz_accumulate(float score, float p) { return score + p; }

// Affinity of a key code to the group's query codes: minus the summed (or the largest) Hamming distance.
KVTRIM_HOST_DEVICE inline float buzz_hash_affinity(std::uint64_t key_code, const std::uint64_t* query_codes,
                                                   int group, bool use_max) {
  int total = 0;
  for (int g = 0; g < group; ++g) {
    const int d = hamming(key_code, query_codes[g]);
    total = use_max ? (d > total ? d : total) : total + d;
  }
  return -static_cast<float>(total);
}

// A scorer's view of a head's slots: positions, keys and the scorer's own per-slot metadata.
template <class Head>
struct ScorerSlots {
  Head& h;
  int size() const { return h.size(); }
  int key_dim() const { return h.key_dim(); }
  std::int64_t pos(int i) const { return h.pos(i); }
  const float* key_ptr(int i) const { return h.key_ptr(i); }
  auto& meta(int i) { return h.meta(i).scorer; }
  const auto& meta(int i) const { return h.meta(i).scorer; }
};

// Default BUZZ scorer: accumulated attention since the token joined.
struct AccumulatedAttention {
  struct Params {
    GroupReduce reduce = GroupReduce::kMean;  // how the g query heads of a KV group combine
    static constexpr auto fields() { return std::tuple{field("reduce", &Params::reduce)}; }
  };
  struct SlotMeta {
    float score = 0.0f;
  };
  struct HeadState {};
  static constexpr std::string_view kBuzzName = "buzz";
  static constexpr Signals kSignals = Signals::kAttention;

  AccumulatedAttention(const Params& p, const LayerContext&) : p_(p) {}

  template <class Slots>
  void on_insert(HeadState&, Slots&, const StepContext&) const {}
  template <class Slots>
  void on_attention(HeadState&, Slots& slots, const StepContext&, const AttentionRows& rows) const {
    for (int i = 0; i < slots.size(); ++i)
      slots.meta(i).score = buzz_accumulate(slots.meta(i).score, rows.reduce(i, p_.reduce));
  }
  // Prompt in slots 0..T-1 in order: the score is the column sum over every prompt query.
  template <class Slots>
  void on_prompt(HeadState&, Slots& slots, const PromptContext& prompt) const {
    for (int i = 0; i < slots.size(); ++i) slots.meta(i).score = prompt.reduce_col(i, p_.reduce);
  }
  template <class Slots>
  float score(const HeadState&, const Slots& slots, int i) const {
    return slots.meta(i).score;
  }

 private:
  Params p_;
};

// HashEvict-style scorer: closeness of the key's SimHash code to the current query's code.
struct HashScorer {
  struct Params {
    int bits = 16;                    // code length (HashEvict default), 1..64
    std::uint64_t seed = 0x5EED;      // projection seed; layer l uses simhash_stream_seed(seed, l)
    GroupReduce reduce = GroupReduce::kSum;  // kSum/kMean: summed distances; kMax: the largest distance
    static constexpr auto fields() {
      return std::tuple{field("bits", &Params::bits), field("seed", &Params::seed), field("reduce", &Params::reduce)};
    }
  };
  struct SlotMeta {
    std::uint64_t code = 0;  // SimHash code of the token's stored key
  };
  struct HeadState {
    SimHashProjection proj;             // built on the first token, at the stored key width
    std::vector<std::uint64_t> query;   // codes of the group's current queries
  };
  static constexpr std::string_view kBuzzName = "buzz-hash";
  static constexpr Signals kSignals = Signals::kQuery;

  HashScorer(const Params& p, const LayerContext& ctx) : p_(p), layer_(ctx.layer) {
    KVTRIM_CHECK(p.bits >= 1 && p.bits <= kSimHashMaxBits, "Buzz<HashScorer>: scorer.bits must be in 1..",
                 kSimHashMaxBits, ", got ", p.bits);
  }

  const Params& params() const { return p_; }
  // This layer's projection for keys of width `dim`.
  SimHashProjection projection(int dim) const {
    return SimHashProjection(dim, p_.bits, simhash_stream_seed(p_.seed, static_cast<std::uint64_t>(layer_)));
  }

  // Codes the new key and the current queries (the probe). Runs for every prompt token too, so after
  // prefill the probe is the last prompt token's query.
  template <class Slots>
  void on_insert(HeadState& s, Slots& slots, const StepContext& step) const {
    if (s.proj.empty() || s.proj.dim() != slots.key_dim()) {  // first token of this head: warm-up
      s.proj = projection(slots.key_dim());
      s.query.assign(static_cast<std::size_t>(step.group), 0);
    }
    slots.meta(step.slot).code = s.proj.code(slots.key_ptr(step.slot));
    for (int g = 0; g < step.group; ++g)
      s.query[static_cast<std::size_t>(g)] = s.proj.code(step.q + static_cast<std::size_t>(g) * step.head_dim);
  }
  template <class Slots>
  void on_attention(HeadState&, Slots&, const StepContext&, const AttentionRows&) const {}
  template <class Slots>
  void on_prompt(HeadState&, Slots&, const PromptContext&) const {}
  template <class Slots>
  float score(const HeadState& s, const Slots& slots, int i) const {
    return buzz_hash_affinity(slots.meta(i).code, s.query.data(), static_cast<int>(s.query.size()),
                              p_.reduce == GroupReduce::kMax);
  }

 private:
  Params p_;
  int layer_ = 0;
};

template <class S>
concept BuzzScorer =
    requires {
      typename S::Params;
      typename S::SlotMeta;
      typename S::HeadState;
      { S::kBuzzName } -> std::convertible_to<std::string_view>;
      { S::kSignals } -> std::convertible_to<Signals>;
    } && std::is_trivially_copyable_v<typename S::SlotMeta> && std::default_initializable<typename S::HeadState> &&
    std::constructible_from<S, const typename S::Params&, const LayerContext&>;

template <BuzzScorer Scorer = AccumulatedAttention>
class Buzz {
 public:
  struct Params {
    int sinks = 4;
    int window = 160;     // 0: derived from the head's budget (see the header comment)
    int threshold = 400;  // T: the most middle tokens; 0: derived from the head's budget
    int chunk = 5;        // s: chunk size of the new segment (official sample_stride)
    int thin_stride = 0;  // h: old samples keep every h-th; 0 = (chunk + 1) / 2 as official
    bool keep_oldest_on_tie = true;
    typename Scorer::Params scorer{};
    static constexpr auto fields() {
      return std::tuple{field("sinks", &Params::sinks),
                        field("window", &Params::window),
                        field("threshold", &Params::threshold),
                        field("chunk", &Params::chunk),
                        field("thin_stride", &Params::thin_stride),
                        field("keep_oldest_on_tie", &Params::keep_oldest_on_tie),
                        field("scorer", &Params::scorer)};
    }
  };
  struct SlotMeta {
    typename Scorer::SlotMeta scorer{};
    bool sink = false;
    bool sampled = false;  // survived a re-segmentation (an "old sample")
  };
  struct HeadState {
    typename Scorer::HeadState scorer{};
    int sinks_seen = 0;
    std::vector<int> order, keep;  // scratch for a re-segmentation
    std::uint64_t resegmentations = 0;
  };
  static constexpr std::string_view kName = Scorer::kBuzzName;
  static constexpr Signals kSignals = Scorer::kSignals;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;

  Buzz(const Params& p, const LayerContext& ctx) : p_(p), scorer_(p.scorer, ctx) {
    KVTRIM_CHECK(p.sinks >= 0, "Buzz: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.window >= 0, "Buzz: window must be >= 0 (0 = derived from the budget), got ", p.window);
    KVTRIM_CHECK(p.threshold >= 0, "Buzz: threshold must be >= 0 (0 = derived from the budget), got ",
                 p.threshold);
    KVTRIM_CHECK(p.chunk >= 2, "Buzz: chunk (segment size) must be >= 2 (a chunk of 1 keeps every token, so the "
                 "middle could never shrink), got ", p.chunk);
    KVTRIM_CHECK(p.thin_stride >= 0, "Buzz: thin_stride must be >= 0 (0 = (chunk+1)/2), got ", p.thin_stride);
    KVTRIM_CHECK(thin() >= 2, "Buzz: the thin stride must be >= 2 so old samples thin out; got ", thin(),
                 p.thin_stride == 0 ? " from (chunk+1)/2 with chunk " : " from thin_stride ",
                 p.thin_stride == 0 ? p.chunk : p.thin_stride, " (set thin_stride >= 2)");
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h) {
      const int b = ctx.budgets[h], w = window_of(b), t = threshold_of(b);
      KVTRIM_CHECK(w >= 1 && t >= 2 && p.sinks + w + t <= b, "Buzz: sinks (", p.sinks, ") + window (", w,
                   p.window == 0 ? ", derived" : "", ") + threshold (", t, p.threshold == 0 ? ", derived" : "",
                   ") must fit the budget ", b, " of layer ", ctx.layer, " KV head ", h,
                   " with window >= 1 and threshold >= 2 (use window = threshold = 0 to derive both from the "
                   "budget, or raise the budget)");
    }
  }

  int prompt_window() const { return 0; }
  int thin() const { return p_.thin_stride > 0 ? p_.thin_stride : (p_.chunk + 1) / 2; }
  // Effective window and threshold for a head with budget b.
  int window_of(int b) const {
    if (p_.window > 0) return p_.window;
    if (p_.threshold > 0) return b - p_.sinks - p_.threshold;
    return (b - p_.sinks) * 2 / 7;
  }
  int threshold_of(int b) const {
    if (p_.threshold > 0) return p_.threshold;
    return b - p_.sinks - window_of(b);
  }
  // Most tokens a head with budget b keeps.
  int capacity(int b) const { return p_.sinks + window_of(b) + threshold_of(b); }
  const Params& params() const { return p_; }
  const Scorer& scorer() const { return scorer_; }

  void on_insert(HeadState& s, HeadOf<Buzz>& h, const StepContext& step) {
    streaming_mark_sink(s.sinks_seen, p_.sinks, h.meta(step.slot).sink);
    ScorerSlots<HeadOf<Buzz>> slots{h};
    scorer_.on_insert(s.scorer, slots, step);
  }
  void on_attention(HeadState& s, HeadOf<Buzz>& h, const StepContext& step, const AttentionRows& rows) {
    ScorerSlots<HeadOf<Buzz>> slots{h};
    scorer_.on_attention(s.scorer, slots, step, rows);
  }
  void evict(HeadState& s, HeadOf<Buzz>& h, const StepContext&) { fit(s, h); }
  void on_prompt(HeadState& s, HeadOf<Buzz>& h, const PromptContext& prompt) {
    ScorerSlots<HeadOf<Buzz>> slots{h};
    scorer_.on_prompt(s.scorer, slots, prompt);
    fit(s, h);
  }

 private:
  int middle_size(const HeadState& s, const HeadOf<Buzz>& h) const {
    return h.size() - s.sinks_seen - window_of(h.budget());
  }

  // Re-segments while the middle exceeds the threshold (once per trigger during decode; a long prompt may
  // need a few passes, the later ones thinning by position only).
  void fit(HeadState& s, HeadOf<Buzz>& h) {
    const int t = threshold_of(h.budget());
    while (middle_size(s, h) > t) {
      const int before = h.size();
      resegment(s, h);
      KVTRIM_CHECK(h.size() < before, "internal: Buzz re-segmentation did not shrink the middle");
    }
  }

  void resegment(HeadState& s, HeadOf<Buzz>& h) {
    const int cap = std::max(h.size(), h.budget() + 1);
    if (static_cast<int>(s.order.capacity()) < cap) {  // warm-up (or a long prompt)
      s.order.reserve(static_cast<std::size_t>(cap));
      s.keep.reserve(static_cast<std::size_t>(cap));
    }
    s.order.clear();
    s.keep.clear();
    for (int i = 0; i < h.size(); ++i) (h.meta(i).sink ? s.keep : s.order).push_back(i);
    std::sort(s.order.begin(), s.order.end(), [&](int a, int b) { return h.pos(a) < h.pos(b); });
    const int n_mid = static_cast<int>(s.order.size()) - window_of(h.budget());
    // Window: the newest tokens, all kept.
    for (std::size_t j = static_cast<std::size_t>(n_mid); j < s.order.size(); ++j) s.keep.push_back(s.order[j]);
    // Old samples, in position order: keep every h-th, starting with the oldest.
    const int stride = thin();
    int k = 0;
    for (int j = 0; j < n_mid; ++j) {
      const int i = s.order[static_cast<std::size_t>(j)];
      if (!h.meta(i).sampled) continue;
      if (k++ % stride == 0) s.keep.push_back(i);
    }
    // New segment, in position order: chunks of `chunk`, the highest-scored token of each survives.
    ScorerSlots<HeadOf<Buzz>> slots{h};
    int in_chunk = 0, best = -1;
    float best_score = 0.0f;
    for (int j = 0; j < n_mid; ++j) {
      const int i = s.order[static_cast<std::size_t>(j)];
      if (h.meta(i).sampled) continue;
      const float sc = scorer_.score(s.scorer, slots, i);
      if (best < 0 || sc > best_score || (!p_.keep_oldest_on_tie && sc == best_score)) {
        best = i;
        best_score = sc;
      }
      if (++in_chunk == p_.chunk) {
        s.keep.push_back(best);
        best = -1;
        in_chunk = 0;
      }
    }
    if (best >= 0) s.keep.push_back(best);
    // Every kept middle token is now an old sample (metadata moves with the slot in keep_only).
    for (int j = 0; j < n_mid; ++j) h.meta(s.order[static_cast<std::size_t>(j)]).sampled = true;
    ++s.resegmentations;
    h.keep_only(s.keep);
  }

  Params p_;
  Scorer scorer_;
};

}  // namespace kvtrim
