// kvtrim: how the CPU backend runs a policy's rules over one head's slots.
//
// The same selection the CUDA kernels make (policy.hpp, select.hpp), as host loops:
//  - observe: this step's probabilities reduced over the GQA group (the policy's rule), then on_attention
//    per slot;
//  - lowest_unprotected / evict_to_limit: the arg-min victim, one at a time while a head is over its limit;
//  - merge_evict_to_limit (kMerges): Stats, the victim, the most similar absorbing key, the weighted merge;
//  - fit (kStructured): fit_key and fit_slot for every slot, survivors compacted in slot order;
//  - select_prompt: prompt_score for every token, the lowest sort keys dropped.
// The hot loops are compiled twice, portable and for AVX2 (+POPCNT), and chosen at run time like the attention
// kernels (cpu_attention.hpp); FMA is never enabled here, so a rule's arithmetic rounds the same way in both
// builds and on the GPU.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_attention.hpp"  // KVTRIM_X86_AVX2_DISPATCH, cpu_has_avx2_fma
#include "error.hpp"
#include "head_store.hpp"
#include "policy.hpp"
#include "select.hpp"

#if defined(KVTRIM_X86_AVX2_DISPATCH)
#define KVTRIM_INLINE_LAMBDA __attribute__((always_inline))
#define KVTRIM_AVX2_POPCNT __attribute__((target("avx2,popcnt")))
#else
#define KVTRIM_INLINE_LAMBDA
#endif

namespace kvtrim::cpu {

#if defined(KVTRIM_X86_AVX2_DISPATCH)
template <class F>
KVTRIM_AVX2_POPCNT void run_avx2(F& f) {
  f();
}
#endif
// Runs f (an always-inline lambda) compiled for AVX2 + POPCNT when the CPU has them, portable otherwise.
template <class F>
inline void dispatch(F&& f) {
#if defined(KVTRIM_X86_AVX2_DISPATCH)
  if (detail::cpu_has_avx2_fma()) return run_avx2(f);
#endif
  f();
}

// Per-thread scratch of the selection loops, reserved for the largest head (decode allocates nothing).
template <class Meta>
struct SelectScratch {
  std::vector<float> reduced, scores, dots;
  // 16-bit storage: a merge's victim key widened to fp32, and key rows widened for row_dots_portable (CPUs
  // without AVX2; the x86 kernel reads the stored rows)
  std::vector<float> victim_key, rows;
  std::vector<std::uint32_t> ranks;
  std::vector<int> keys, order;
  std::vector<Meta> metas;
  std::vector<std::uint64_t> sort_keys;
  std::vector<std::byte> stats;  // a merging policy's Stats of every slot (merge_evict_to_limit)
  // stats_size: sizeof(P::Stats) for merging policies, else 0
  // key_dim: the stored key width of a merging policy with 16-bit key storage (else 0)
  void reserve(int n, std::size_t stats_size = 0, int key_dim = 0) {
    const auto z = static_cast<std::size_t>(n);
    victim_key.reserve(static_cast<std::size_t>(key_dim));
    rows.reserve(static_cast<std::size_t>(detail::kDotTileRows) * key_dim);
    stats.reserve(z * stats_size);
    reduced.reserve(z);
    scores.reserve(z);
    ranks.reserve(z);
    dots.reserve(z);
    keys.reserve(z);
    order.reserve(z);
    metas.reserve(z);
  }
};

// out[i] = the group's probabilities of slot i made one (AttentionRows::reduce's arithmetic and order). One pass
// over the rows for the usual group sizes (a compile-time G), a pass per row otherwise.
template <int G>
KVTRIM_ALWAYS_INLINE void reduce_rows(const float* P, int n, GroupReduce how, float* out) {
  const auto at = [&](int r, int i) KVTRIM_INLINE_LAMBDA { return P[static_cast<std::size_t>(r) * n + i]; };
  if (how == GroupReduce::kMax) {
    for (int i = 0; i < n; ++i) {
      float x = at(0, i);
      for (int r = 1; r < G; ++r) x = at(r, i) > x ? at(r, i) : x;
      out[i] = x;
    }
    return;
  }
  const float gf = how == GroupReduce::kMean ? static_cast<float>(G) : 1.0f;  // x / 1 = x exactly
  for (int i = 0; i < n; ++i) {
    float x = at(0, i);
    for (int r = 1; r < G; ++r) x += at(r, i);
    out[i] = x / gf;
  }
}
KVTRIM_ALWAYS_INLINE void reduce_group(const float* P, int g, int n, GroupReduce how, float* out) {
  switch (g) {
    case 1: return reduce_rows<1>(P, n, how, out);
    case 2: return reduce_rows<2>(P, n, how, out);
    case 4: return reduce_rows<4>(P, n, how, out);
    case 8: return reduce_rows<8>(P, n, how, out);
    default: break;
  }
  std::copy(P, P + n, out);
  for (int r = 1; r < g; ++r) {
    const float* row = P + static_cast<std::size_t>(r) * n;
    if (how == GroupReduce::kMax) {
      for (int i = 0; i < n; ++i) out[i] = row[i] > out[i] ? row[i] : out[i];
    } else {
      for (int i = 0; i < n; ++i) out[i] += row[i];
    }
  }
  if (how == GroupReduce::kMean) {
    const float gf = static_cast<float>(g);
    for (int i = 0; i < n; ++i) out[i] /= gf;
  }
}

// Stands in for any field when counting an aggregate's fields (unevaluated only).
struct AnyField {
  template <class T>
  operator T() const;
};
// Whether Meta is an aggregate of one to four fields of 4 bytes each and nothing else (no padding).
template <class Meta>
constexpr bool made_of_words() {
  using A = AnyField;
  constexpr auto words = [](const auto&... f) {
    return ((sizeof(f) == 4) && ...) && sizeof...(f) * 4 == sizeof(Meta);
  };
  if constexpr (requires { Meta{A{}, A{}, A{}, A{}, A{}}; }) {
    return false;
  } else if constexpr (requires { Meta{A{}, A{}, A{}, A{}}; }) {
    const auto& [a, b, c, d] = Meta{};
    return words(a, b, c, d);
  } else if constexpr (requires { Meta{A{}, A{}, A{}}; }) {
    const auto& [a, b, c] = Meta{};
    return words(a, b, c);
  } else if constexpr (requires { Meta{A{}, A{}}; }) {
    const auto& [a, b] = Meta{};
    return words(a, b);
  } else if constexpr (requires { Meta{A{}}; }) {
    const auto& [a] = Meta{};
    return words(a);
  } else {
    return false;
  }
}

// One slot's rule. In place, a rule that writes several fields is vectorised as stores of some fields followed by
// loads of others from the same cache line: a store-forwarding stall per slot. Metadata made of 4-byte fields
// therefore moves as words through a copy ({float score; int32 count} written by one rule: 1.1 ns per slot in
// place, 0.11 as words, measured in isolation on this project's 2-core AVX2 machine). Other metadata (byte-sized
// fields, padding) is updated in place: through words its bytes are repacked one by one, which keeps the loop
// scalar ({float; bool; bool}).
template <class Meta, class F>
KVTRIM_ALWAYS_INLINE void update_slot(Meta* meta, int i, F&& rule) {
  if constexpr (made_of_words<Meta>()) {
    constexpr int kWords = static_cast<int>(sizeof(Meta) / 4);
    using Words = std::array<std::uint32_t, kWords>;
    Words w;
    char* at = reinterpret_cast<char*>(meta + i);
    // word by word, unrolled at compile time: the slot loop stays the innermost one
    [&]<int... k>(std::integer_sequence<int, k...>) KVTRIM_INLINE_LAMBDA {
      (std::memcpy(&w[k], at + 4 * k, 4), ...);
    }(std::make_integer_sequence<int, kWords>{});
    Meta m = std::bit_cast<Meta>(w);
    rule(m);
    w = std::bit_cast<Words>(m);
    [&]<int... k>(std::integer_sequence<int, k...>) KVTRIM_INLINE_LAMBDA {
      (std::memcpy(at + 4 * k, &w[k], 4), ...);
    }(std::make_integer_sequence<int, kWords>{});
  } else {
    rule(meta[i]);
  }
}

// The step's probabilities P [g x n] (row stride n) reach every slot's metadata (r: n floats of scratch).
template <class P, class Meta>
KVTRIM_ALWAYS_INLINE void observe_slots(Meta* meta, int n, const typename P::State& s, const float* probs, int g,
                                        float* r) {
  const int count = n;  // locals: the metadata stores cannot alias them, so the loop vectorises
  const typename P::State st = s;
  reduce_group(probs, g, count, P::group_reduce(st), r);
  for (int i = 0; i < count; ++i)
    update_slot(meta, i, [&](Meta& m) KVTRIM_INLINE_LAMBDA { P::on_attention(st, m, r[i]); });
}
template <class P, class Meta>
void observe(Meta* meta, int n, const typename P::State& s, const float* probs, int g, SelectScratch<Meta>& sc) {
  sc.reduced.resize(static_cast<std::size_t>(n));
  float* r = sc.reduced.data();
  dispatch([&]() KVTRIM_INLINE_LAMBDA { observe_slots<P>(meta, n, s, probs, g, r); });
}

// The slot with the lowest score_of(i) among those not excluded(i), the oldest (pos) on ties, or -1 when every
// slot is excluded: the sequential scan with evicts_before, the reference every faster path must match.
template <class ScoreOf, class Excluded>
int lowest_scan(int n, const std::int64_t* pos, ScoreOf&& score_of, Excluded&& excluded) {
  VictimKey best;
  for (int i = 0; i < n; ++i)
    if (!excluded(i)) best = better_victim(best, VictimKey{score_of(i), pos[i], i});
  return best.slot;
}

// lowest_scan over a policy's scores, protected slots excluded.
template <class P, class Meta>
int lowest_unprotected_scan(const Meta* meta, const std::int64_t* pos, int n, const typename P::State& s,
                            std::int64_t newest) {
  return lowest_scan(
      n, pos, [&](int i) { return P::score(s, meta[i], pos[i], newest); },
      [&](int i) { return P::protects(s, meta[i], pos[i], newest); });
}

// The oldest slot whose key is m; newest: a position no slot exceeds. Many slots may tie (a policy may score
// every slot alike). While positions fit 31 bits, each slot's age + 1 (newest - pos + 1) is a 32-bit integer:
// the largest among the slots holding m comes from a loop that vectorises, and blocks of 32 are tested at once
// for the slot that has both (a fixed-length minimum, 0 on a match). Beyond that, a scan of the 64-bit positions.
KVTRIM_ALWAYS_INLINE int oldest_with_key(const std::uint32_t* key, const std::int64_t* pos, int n, std::uint32_t m,
                                         std::int64_t newest) {
  if (newest < 0 || newest >= (std::int64_t{1} << 31)) {
    int best = -1;
    std::int64_t best_pos = INT64_MAX;
    for (int i = 0; i < n; ++i)
      if (key[i] == m && pos[i] < best_pos) {
        best = i;
        best_pos = pos[i];
      }
    return best;
  }
  const std::int64_t last = newest;
  const auto age1 = [&](int i) KVTRIM_INLINE_LAMBDA { return static_cast<std::uint32_t>(last - pos[i]) + 1u; };
  std::uint32_t oldest = 0;  // age + 1 of the oldest slot holding m (0: none)
  for (int i = 0; i < n; ++i) {
    const std::uint32_t a = age1(i) & (0u - static_cast<std::uint32_t>(key[i] == m));  // masks, not a branch
    oldest = a > oldest ? a : oldest;
  }
  if (oldest == 0) return -1;
  const auto differs = [&](int i) KVTRIM_INLINE_LAMBDA { return (key[i] ^ m) | (age1(i) ^ oldest); };
  constexpr int kBlock = 32;
  int i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    std::uint32_t z = 0xffffffffu;
    for (int j = 0; j < kBlock; ++j) z = differs(i0 + j) < z ? differs(i0 + j) : z;
    if (z != 0) continue;
    for (int i = i0; i < i0 + kBlock; ++i)
      if (differs(i) == 0) return i;
  }
  for (int i = i0; i < n; ++i)
    if (differs(i) == 0) return i;
  return -1;
}

// The slot with the lowest score_of(i) among those not excluded(i), the oldest (pos) on ties: the rule of
// lowest_scan, in passes that vectorise. Each score becomes an order-preserving integer (select.hpp's
// ordered_bits; an excluded slot gets the largest), then their minimum, then the oldest slot holding it. Equal
// floats (-0 and +0 included) map to equal integers, so the tie rule is the scan's. Returns -1 when every slot is
// excluded, -2 when no finite candidate score exists or a score is NaN (check_finite off): then the caller's
// sequential scan decides. newest: no slot's position exceeds it; score, key: n floats / integers of scratch.
template <class ScoreOf, class Excluded>
KVTRIM_ALWAYS_INLINE int lowest_key(int n, const std::int64_t* pos, std::int64_t newest, float* score,
                                    std::uint32_t* key, ScoreOf&& score_of, Excluded&& excluded) {
  constexpr std::uint32_t kExcluded = 0xffffffffu;
  const int count = n;                           // a local: the stores cannot alias it, so the loops vectorise
  std::uint32_t nan = 0, m = kExcluded;          // integer reductions (a bool one does not vectorise)
  // the scores in their own loop: one that does not vectorise (a popcount) leaves the others vectorised
  for (int i = 0; i < count; ++i) score[i] = score_of(i);
  for (int i = 0; i < count; ++i) {
    const float sc = score[i];
    nan |= static_cast<std::uint32_t>(sc != sc);
    key[i] = ordered_bits(sc) | (0u - static_cast<std::uint32_t>(excluded(i)));  // excluded: all ones
  }
  for (int i = 0; i < count; ++i) m = key[i] < m ? key[i] : m;  // its own loop: fused in, neither vectorises
  if (nan || m >= ordered_bits(INFINITY)) return m == kExcluded && !nan ? -1 : -2;
  return oldest_with_key(key, pos, count, m, newest);
}

// lowest_key over a policy's scores, protected slots excluded.
template <class P, class Meta>
KVTRIM_ALWAYS_INLINE int lowest_key_pass(const Meta* meta, const std::int64_t* pos, int n,
                                         const typename P::State& s, std::int64_t newest, float* score,
                                         std::uint32_t* key) {
  const std::int64_t last = newest;  // locals: the stores cannot alias them
  const typename P::State st = s;
  return lowest_key(
      n, pos, last, score, key, [&](int i) KVTRIM_INLINE_LAMBDA { return P::score(st, meta[i], pos[i], last); },
      [&](int i) KVTRIM_INLINE_LAMBDA { return P::protects(st, meta[i], pos[i], last); });
}

// The unprotected slot with the lowest score (oldest on ties), or -1 when every slot is protected.
template <class P, class Meta>
int lowest_unprotected(const Meta* meta, const std::int64_t* pos, int n, const typename P::State& s,
                       std::int64_t newest, SelectScratch<Meta>& sc) {
  sc.scores.resize(static_cast<std::size_t>(n));
  sc.ranks.resize(static_cast<std::size_t>(n));
  float* score = sc.scores.data();
  std::uint32_t* key = sc.ranks.data();
  int best = -2;
  dispatch([&]() KVTRIM_INLINE_LAMBDA { best = lowest_key_pass<P>(meta, pos, n, s, newest, score, key); });
  return best >= -1 ? best : lowest_unprotected_scan<P>(meta, pos, n, s, newest);
}

// observe() and the first lowest_unprotected() of the eviction after it under one dispatch, while the slots are
// in the L1 cache (policies that evict one victim at a time after attention). Returns the victim, or -1 when
// every slot is protected.
template <class P, class Meta>
int observe_and_pick(Meta* meta, const std::int64_t* pos, int n, const typename P::State& s, const float* probs,
                     int g, std::int64_t newest, SelectScratch<Meta>& sc) {
  sc.reduced.resize(static_cast<std::size_t>(n));
  sc.scores.resize(static_cast<std::size_t>(n));
  sc.ranks.resize(static_cast<std::size_t>(n));
  float* r = sc.reduced.data();
  float* score = sc.scores.data();
  std::uint32_t* key = sc.ranks.data();
  int best = -2;
  dispatch([&]() KVTRIM_INLINE_LAMBDA {
    observe_slots<P>(meta, n, s, probs, g, r);
    best = lowest_key_pass<P>(meta, pos, n, s, newest, score, key);
  });
  return best >= -1 ? best : lowest_unprotected_scan<P>(meta, pos, n, s, newest);
}

// The error when a head must shrink but every token it holds is protected.
template <class P>
[[noreturn]] void all_protected(int layer, int kv, int size, int limit) {
  detail::throw_error(P::kName, ": every token is protected but layer ", layer, " KV head ", kv, " holds ", size,
                      " tokens and keeps ", limit, " (the policy's protected tokens must fit its budget)");
}

// Evicts lowest-scored unprotected slots one at a time until the head holds at most `limit` tokens.
template <class P, class Stored>
void evict_to_limit(HeadStore<typename P::SlotMeta, Stored>& h, const typename P::State& s, int limit, int layer, int kv,
                    SelectScratch<typename P::SlotMeta>& sc) {
  while (h.size() > limit) {
    const int v = lowest_unprotected<P>(h.meta_data(), h.pos_data(), h.size(), s, h.newest_pos(), sc);
    if (v < 0) all_protected<P>(layer, kv, h.size(), limit);
    h.remove(v);
  }
}

// observe(), then evict_to_limit() with its first victim found in the same pass over the slots (policies that
// evict one victim at a time after attention).
template <class P, class Stored>
void observe_and_evict(HeadStore<typename P::SlotMeta, Stored>& h, const typename P::State& s, const float* probs, int g,
                       int limit, int layer, int kv, SelectScratch<typename P::SlotMeta>& sc) {
  if (h.size() <= limit) return observe<P>(h.meta_data(), h.size(), s, probs, g, sc);
  const int v = observe_and_pick<P>(h.meta_data(), h.pos_data(), h.size(), s, probs, g, h.newest_pos(), sc);
  if (v < 0) all_protected<P>(layer, kv, h.size(), limit);
  h.remove(v);
  evict_to_limit<P>(h, s, limit, layer, kv, sc);
}

// kMerges policies: while over the limit, the victim (lowest merge_score among the unprotected, oldest on ties)
// folds into the absorbing slot with the most similar key (cosine, older on ties) when that reaches the
// policy's threshold, else it is evicted. `norms` holds every slot's key norm and follows the slots.
template <class P, class Stored>
void merge_evict_to_limit(HeadStore<typename P::SlotMeta, Stored>& h, const typename P::State& s, int limit,
                          std::vector<float>& norms, SelectScratch<typename P::SlotMeta>& sc, int layer, int kv) {
  using Meta = typename P::SlotMeta;
  using Stats = typename P::Stats;
  static_assert(std::is_trivially_copyable_v<Stats> && alignof(Stats) <= alignof(std::max_align_t));
  while (h.size() > limit) {
    const int n = h.size();
    const Meta* meta = h.meta_data();
    const std::int64_t* pos = h.pos_data();
    const std::int64_t newest = h.newest_pos();
    sc.scores.resize(static_cast<std::size_t>(n));
    sc.ranks.resize(static_cast<std::size_t>(n));
    sc.stats.resize(static_cast<std::size_t>(n) * sizeof(Stats));
    float* score = sc.scores.data();
    std::uint32_t* key = sc.ranks.data();
    Stats* stats = reinterpret_cast<Stats*>(sc.stats.data());  // operator new's storage: aligned for any Stats
    Stats st{};
    int v = -2;
    dispatch([&]() KVTRIM_INLINE_LAMBDA {
      const typename P::State ls = s;  // locals: the stores cannot alias them
      // each slot's stats in a loop of their own, which vectorises (a division per slot, say), then four running
      // reductions combined at the end: a reduction is order-free (the GPU reduces in a tree), and one chain of
      // dependent maxima would wait on each step's latency
      Stats* each = stats;
      for (int i = 0; i < n; ++i) each[i] = P::stats_of(meta[i]);
      Stats part[4] = {};
      int at = 0;
      for (; at + 4 <= n; at += 4)
        for (int k = 0; k < 4; ++k) part[k] = P::combine(part[k], each[at + k]);
      for (; at < n; ++at) part[0] = P::combine(part[0], each[at]);
      const Stats lst = P::combine(P::combine(part[0], part[1]), P::combine(part[2], part[3]));
      st = lst;
      v = lowest_key(
          n, pos, newest, score, key, [&](int i) KVTRIM_INLINE_LAMBDA { return P::merge_score(ls, lst, meta[i]); },
          [&](int i) KVTRIM_INLINE_LAMBDA { return P::protects(ls, meta[i], pos[i], newest); });
    });
    if (v == -2)  // NaN or no finite score: the sequential scan
      v = lowest_scan(
          n, pos, [&](int i) { return P::merge_score(s, st, meta[i]); },
          [&](int i) { return P::protects(s, meta[i], pos[i], newest); });
    if (v < 0) all_protected<P>(layer, kv, n, limit);
    int target = -1;
    if (P::may_merge(s, st, meta[v])) {
      sc.dots.resize(static_cast<std::size_t>(n));
      const float* victim_key = nullptr;  // in fp32: float rows as they are, 16-bit ones widened
      if constexpr (std::is_same_v<Stored, float>) {
        victim_key = h.key_ptr(v);
      } else {
        sc.victim_key.resize(static_cast<std::size_t>(h.key_dim()));
        detail::widen(h.key_ptr(v), sc.victim_key.data(), sc.victim_key.size());
        victim_key = sc.victim_key.data();
      }
      detail::row_dots(h.key_ptr(0), n, h.key_dim(), victim_key, sc.dots.data(), sc.rows);
      // the most similar absorbing key: the lowest minus-cosine, the older slot on ties
      const float* dot = sc.dots.data();
      const float* norm = norms.data();
      const float norm_v = norms[static_cast<std::size_t>(v)];
      const auto minus_cosine = [&](int j) KVTRIM_INLINE_LAMBDA { return -cosine_from(dot[j], norm[j], norm_v); };
      int c = -2;
      dispatch([&]() KVTRIM_INLINE_LAMBDA {
        const typename P::State ls = s;
        c = lowest_key(n, pos, newest, score, key, minus_cosine,
                       [&](int j) KVTRIM_INLINE_LAMBDA { return (j == v) | !P::absorbs(ls, meta[j], pos[j]); });
      });
      if (c == -2)  // NaN: the sequential scan
        c = lowest_scan(n, pos, minus_cosine, [&](int j) { return j == v || !P::absorbs(s, meta[j], pos[j]); });
      if (c >= 0 && cosine_from(dot[c], norm[c], norm_v) >= P::merge_threshold(s)) target = c;
    }
    if (target >= 0) {
      const MixWeights w = P::mix_weights(s, meta[target], meta[v]);
      // in fp32, rounded to the storage type (as the CUDA kernel does)
      const auto mix_into = [&](Stored* dst, const Stored* src, int width) {
        for (int e = 0; e < width; ++e) dst[e] = from_float<Stored>(mix_rn(w, to_float(dst[e]), to_float(src[e])));
      };
      if (P::merges_keys(s)) {
        mix_into(h.key_ptr(target), h.key_ptr(v), h.key_dim());
        norms[static_cast<std::size_t>(target)] = h.key_norm(target);
      }
      mix_into(h.value_ptr(target), h.value_ptr(v), h.value_dim());
      P::merge_meta(h.meta(target), h.meta(v));
    }
    norms[static_cast<std::size_t>(v)] = norms[static_cast<std::size_t>(n - 1)];  // follows the slot move
    if (target >= 0)
      h.remove_merged(v);
    else
      h.remove(v);
  }
}

// kStructured policies: while needs_fit, every slot is decided at once (fit_key, then fit_slot); the survivors
// keep their slot order.
template <class P, class Stored>
void fit(HeadStore<typename P::SlotMeta, Stored>& h, const typename P::State& s, SelectScratch<typename P::SlotMeta>& sc) {
  using Meta = typename P::SlotMeta;
  std::vector<Meta>& next = sc.metas;
  while (P::needs_fit(s, h.size())) {
    const int n = h.size();
    sc.keys.resize(static_cast<std::size_t>(n));
    sc.order.clear();
    next.resize(static_cast<std::size_t>(n));
    const Meta* meta = h.meta_data();
    const std::int64_t* pos = h.pos_data();
    for (int i = 0; i < n; ++i) sc.keys[static_cast<std::size_t>(i)] = P::fit_key(s, pos, meta, n, i);
    for (int i = 0; i < n; ++i)
      if (P::fit_slot(s, meta, sc.keys.data(), n, i, next[static_cast<std::size_t>(i)])) sc.order.push_back(i);
    KVTRIM_CHECK(static_cast<int>(sc.order.size()) < n, "internal: ", P::kName,
                 " structured eviction kept every token of a head that must shrink");
    for (int i : sc.order) h.meta(i) = next[static_cast<std::size_t>(i)];
    h.keep_only(sc.order);
  }
}

// The prompt (token t in slot t, on_insert done): prompt_score for every token (the policy may record
// metadata), into sort keys (protected tokens +inf).
template <class P, class Stored>
void score_prompt(HeadStore<typename P::SlotMeta, Stored>& h, const typename P::State& s, const PromptSums& sums,
                  SelectScratch<typename P::SlotMeta>& sc) {
  const int T = h.size();
  const std::int64_t newest = h.newest_pos();
  sc.sort_keys.resize(static_cast<std::size_t>(T));
  for (int t = 0; t < T; ++t) {
    const float score = P::prompt_score(s, h.meta(t), t, sums);
    const bool prot = rules::prompt_protects<P>(s, h.meta(t), h.pos(t), newest);
    sc.sort_keys[static_cast<std::size_t>(t)] = prompt_sort_key(prot ? INFINITY : score, t);
  }
}

// Keeps the `limit` prompt tokens with the highest sort keys (score_prompt's): protected ones first, then the
// highest scores, the newest on ties.
template <class P, class Stored>
void keep_prompt(HeadStore<typename P::SlotMeta, Stored>& h, int limit, SelectScratch<typename P::SlotMeta>& sc) {
  const int T = h.size();
  if (T <= limit) return;
  const auto drop = static_cast<std::ptrdiff_t>(T - limit);
  std::nth_element(sc.sort_keys.begin(), sc.sort_keys.begin() + drop - 1, sc.sort_keys.end());
  // [0, drop) now holds the dropped keys, the largest of them at drop - 1
  KVTRIM_CHECK(!sort_key_protected(sc.sort_keys[static_cast<std::size_t>(drop - 1)]), P::kName,
               ": the prompt's protected tokens exceed the ", limit, " tokens a head keeps");
  sc.order.clear();
  for (std::ptrdiff_t j = drop; j < T; ++j) sc.order.push_back(sort_key_token(sc.sort_keys[static_cast<std::size_t>(j)]));
  h.keep_only(sc.order);
}

}  // namespace kvtrim::cpu
