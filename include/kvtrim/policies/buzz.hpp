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
// The rules decide every slot at once (kStructured), by counting instead of sorting, so that a GPU block runs
// one pass in parallel: a sink stays; a non-sink whose rank by position among the non-sinks is >= n_mid
// (= non-sinks - window) is in the window and stays; an old sample stays when the number of older old samples
// is a multiple of the stride; any other middle token belongs to chunk (number of older new-segment tokens) /
// chunk and stays when no member of its chunk beats it (higher score; equal score and older, or newer with
// keep_oldest_on_tie = false); every middle token that stays becomes an old sample.
//
// The score is pluggable: `Buzz<Scorer>`. The scorer decides which token of a chunk survives:
//  - AccumulatedAttention (default, the paper): sum of the attention probabilities each token received since
//    it joined, over all queries (prompt column sums at prefill, one row per decode step); GQA: the g query
//    heads of a KV group are reduced by `reduce` (mean by default; sum and max available).
//  - HashScorer (the SimHash idea of arXiv 2412.16187): each token keeps the SimHash code of its key
//    (simhash.hpp); the survivor is the chunk token whose code is closest in Hamming distance to the current
//    query's code (GQA: distances summed over the group by default, or max). Needs no attention.
// A composed policy is just a type: KVCache<Buzz<HashScorer>>.
// Scorer contract (see AccumulatedAttention): Params, trivially copyable SlotMeta and State, kSignals,
// kBuzzName, a (Params, LayerContext) constructor, `State initial() const`, and KVTRIM_HOST_DEVICE static rules
// on_insert(State&, SlotMeta&, std::int64_t pos, const TokenInputs&), on_prompt(const State&, SlotMeta&, int t, const
// PromptSums&), score(const State&, const SlotMeta&) (higher = survives its chunk), plus group_reduce and
// on_attention for kAttention scorers and kSimHash + projection(head_dim) for scorers that need SimHash codes.
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
//    them with contiguous in-cache indices every step (the attention-sink papers' pos-shift); kvtrim's cache receives
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
// with n is not implemented (a fixed-capacity store cannot grow T). The counting rules cost O(n^2) per
// re-segmentation pass (O(n^2 / threads) on a GPU block); at the budgets BUZZ is run with this stays small
// next to the ≈ T − x* attention steps between two re-segmentations.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <string_view>
#include <tuple>

#include "../policy.hpp"
#include "../select.hpp"
#include "../simhash.hpp"

namespace kvtrim {

// Default BUZZ scorer: accumulated attention since the token joined.
struct AccumulatedAttention {
  struct Params {
    GroupReduce reduce = GroupReduce::kMean;  // how the g query heads of a KV group combine
    static constexpr auto fields() { return std::tuple{field("reduce", &Params::reduce)}; }
  };
  struct SlotMeta {
    float score = 0.0f;
  };
  struct State {
    GroupReduce reduce = GroupReduce::kMean;
  };
  static constexpr std::string_view kBuzzName = "buzz";
  static constexpr Signals kSignals = Signals::kAttention;

  AccumulatedAttention(const Params& p, const LayerContext&) : p_(p) {}
  State initial() const { return {p_.reduce}; }

  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s) { return s.reduce; }
  KVTRIM_HOST_DEVICE static void on_attention(const State&, SlotMeta& m, float p) { m.score += p; }
  // The prompt's score is the column sum over every prompt query.
  KVTRIM_HOST_DEVICE static void on_prompt(const State& s, SlotMeta& m, int t, const PromptSums& in) {
    m.score = in.col.reduce(t, s.reduce);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta& m) { return m.score; }

 private:
  Params p_;
};

// SimHash scorer: closeness of the key's SimHash code to the current queries' codes.
struct HashScorer {
  static constexpr int kMaxProbes = 64;  // query heads per KV head
  struct Params {
    int bits = 16;                           // code length (arXiv 2412.16187's default), 1..64
    std::uint64_t seed = 0x5EED;             // projection seed; layer l uses simhash_stream_seed(seed, l)
    GroupReduce reduce = GroupReduce::kSum;  // kSum/kMean: summed distances; kMax: the largest distance
    static constexpr auto fields() {
      return std::tuple{field("bits", &Params::bits), field("seed", &Params::seed), field("reduce", &Params::reduce)};
    }
  };
  struct SlotMeta {
    std::uint64_t code = 0;  // SimHash code of the token's stored key
  };
  struct State {
    bool use_max = false;
    int n_probes = 0;
    std::uint64_t probes[kMaxProbes] = {};  // codes of the group's current queries
  };
  static constexpr std::string_view kBuzzName = "buzz-hash";
  static constexpr Signals kSignals = Signals::kQuery;
  static constexpr bool kSimHash = true;

  HashScorer(const Params& p, const LayerContext& ctx) : p_(p), layer_(ctx.layer) {
    KVTRIM_CHECK(p.bits >= 1 && p.bits <= kSimHashMaxBits, "Buzz<HashScorer>: scorer.bits must be in 1..",
                 kSimHashMaxBits, ", got ", p.bits);
    KVTRIM_CHECK(ctx.group <= kMaxProbes, "Buzz<HashScorer>: up to ", kMaxProbes, " query heads per KV head, got ",
                 ctx.group);
  }
  State initial() const { return {p_.reduce == GroupReduce::kMax, 0, {}}; }
  // This layer's projection for keys of width `dim`.
  SimHashProjection projection(int dim) const {
    return SimHashProjection(dim, p_.bits, simhash_stream_seed(p_.seed, static_cast<std::uint64_t>(layer_)));
  }

  // The new key's code, and the current queries' codes as the probe (after prefill: the last prompt token's).
  KVTRIM_HOST_DEVICE static void on_insert(State& s, SlotMeta& m, std::int64_t, const TokenInputs& in) {
    m.code = in.key_code;
    if (in.q_codes == nullptr) return;
    for (int g = 0; g < in.group; ++g) s.probes[g] = in.q_codes[g];
    s.n_probes = in.group;
  }
  KVTRIM_HOST_DEVICE static void on_prompt(const State&, SlotMeta&, int, const PromptSums&) {}
  // Minus the summed (or the largest) Hamming distance to the probes.
  KVTRIM_HOST_DEVICE static float score(const State& s, const SlotMeta& m) {
    int total = 0;
    for (int g = 0; g < s.n_probes; ++g) {
      const int d = hamming(m.code, s.probes[g]);
      total = s.use_max ? (d > total ? d : total) : total + d;
    }
    return -static_cast<float>(total);
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
      typename S::State;
      { S::kBuzzName } -> std::convertible_to<std::string_view>;
      { S::kSignals } -> std::convertible_to<Signals>;
    } && std::is_trivially_copyable_v<typename S::SlotMeta> && std::is_trivially_copyable_v<typename S::State> &&
    std::constructible_from<S, const typename S::Params&, const LayerContext&> &&
    requires(const S& sc, typename S::State& st, typename S::SlotMeta& m, const TokenInputs& in, const PromptSums& ps) {
      { sc.initial() } -> std::same_as<typename S::State>;
      S::on_insert(st, m, std::int64_t{0}, in);
      S::on_prompt(st, m, 0, ps);
      { S::score(st, m) } -> std::convertible_to<float>;
    };

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
  struct State {
    typename Scorer::State scorer{};
    int sinks = 0, sinks_seen = 0, window = 1, threshold = 2, chunk = 2, stride = 2;
    bool oldest_on_tie = true;
  };
  static constexpr std::string_view kName = Scorer::kBuzzName;
  static constexpr Signals kSignals = Scorer::kSignals;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
  static constexpr bool kStructured = true;
  static constexpr bool kSimHash = rules::simhash<Scorer>();

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

  State initial(int, int budget) const {
    State s;
    s.scorer = scorer_.initial();
    s.sinks = p_.sinks;
    s.window = window_of(budget);
    s.threshold = threshold_of(budget);
    s.chunk = p_.chunk;
    s.stride = thin();
    s.oldest_on_tie = p_.keep_oldest_on_tie;
    return s;
  }
  int keep_limit(int budget) const { return capacity(budget); }
  SimHashProjection projection(int head_dim) const
    requires kSimHash
  {
    return scorer_.projection(head_dim);
  }

  KVTRIM_HOST_DEVICE static void on_insert(State& s, SlotMeta& m, std::int64_t pos, const TokenInputs& in) {
    m.sink = take_first(s.sinks_seen, s.sinks);
    Scorer::on_insert(s.scorer, m.scorer, pos, in);
  }
  // The selection is structured (fit_key / fit_slot); these two only describe the sinks for the prompt's
  // interface.
  KVTRIM_HOST_DEVICE static bool protects(const State&, const SlotMeta& m, std::int64_t, std::int64_t) {
    return m.sink;
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s)
    requires(has(kSignals, Signals::kAttention))
  {
    return Scorer::group_reduce(s.scorer);
  }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, SlotMeta& m, float p)
    requires(has(kSignals, Signals::kAttention))
  {
    Scorer::on_attention(s.scorer, m.scorer, p);
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int t, const PromptSums& in) {
    Scorer::on_prompt(s.scorer, m.scorer, t, in);
    return 0.0f;
  }

  // ---- structured eviction
  // The score a chunk compares; a NaN (non-finite inputs with check_finite off) counts as -inf, so every chunk
  // still has exactly one survivor.
  KVTRIM_HOST_DEVICE static float chunk_score(const State& s, const SlotMeta& m) {
    const float x = Scorer::score(s.scorer, m.scorer);
    return x != x ? -INFINITY : x;
  }
  KVTRIM_HOST_DEVICE static bool needs_fit(const State& s, int n) { return n - s.sinks_seen - s.window > s.threshold; }
  // Pass 1, per slot: kSink, kWindow, else the number of older old samples (an old sample) or of older
  // new-segment tokens (its index in the new segment).
  static constexpr int kSink = -1, kWindow = -2;
  KVTRIM_HOST_DEVICE static int fit_key(const State& s, const std::int64_t* pos, const SlotMeta* meta, int n, int i) {
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
  // Pass 2, per slot, with every slot's key: does slot i stay (out = its new metadata)?
  KVTRIM_HOST_DEVICE static bool fit_slot(const State& s, const SlotMeta* meta, const int* keys, int n, int i,
                                          SlotMeta& out) {
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

 private:
  Params p_;
  Scorer scorer_;
};

}  // namespace kvtrim
