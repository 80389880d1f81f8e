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
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

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
  std::vector<float> reduced, dots;
  std::vector<std::uint32_t> ranks;
  std::vector<int> keys, order;
  std::vector<Meta> metas;
  std::vector<std::uint64_t> sort_keys;
  void reserve(int n) {
    const auto z = static_cast<std::size_t>(n);
    reduced.reserve(z);
    ranks.reserve(z);
    dots.reserve(z);
    keys.reserve(z);
    order.reserve(z);
    metas.reserve(z);
  }
};

// out[i] = the group's probabilities of slot i made one (AttentionRows::reduce's arithmetic and order).
KVTRIM_ALWAYS_INLINE void reduce_group(const float* P, int g, int n, GroupReduce how, float* out) {
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

// The step's probabilities P [g x n] (row stride n) reach every slot's metadata.
template <class P, class Meta>
void observe(Meta* meta, int n, const typename P::State& s, const float* probs, int g, SelectScratch<Meta>& sc) {
  sc.reduced.resize(static_cast<std::size_t>(n));
  float* r = sc.reduced.data();
  dispatch([&]() KVTRIM_INLINE_LAMBDA {
    const int count = n;  // locals: the metadata stores cannot alias them, so the loop vectorises
    const typename P::State st = s;
    reduce_group(probs, g, count, P::group_reduce(st), r);
    for (int i = 0; i < count; ++i) P::on_attention(st, meta[i], r[i]);
  });
}

// The unprotected slot with the lowest score (oldest on ties), or -1 when every slot is protected: the sequential
// scan with evicts_before, the reference every faster path must match.
template <class P, class Meta>
int lowest_unprotected_scan(const Meta* meta, const std::int64_t* pos, int n, const typename P::State& s,
                            std::int64_t newest) {
  VictimKey best;
  for (int i = 0; i < n; ++i) {
    if (P::protects(s, meta[i], pos[i], newest)) continue;
    const float sc = P::score(s, meta[i], pos[i], newest);
    if (best.slot < 0 || evicts_before(sc, pos[i], best.score, best.pos)) best = VictimKey{sc, pos[i], i};
  }
  return best.slot;
}

// The same slot in passes that vectorise: each slot's score as an order-preserving integer (select.hpp's
// ordered_bits; a protected slot gets the largest), their minimum, then the oldest slot holding it. Equal floats
// (-0 and +0 included) map to equal integers, so the tie rule is the scan's. When no finite unprotected score
// exists, or a score is NaN (check_finite off), the sequential scan decides.
template <class P, class Meta>
int lowest_unprotected(const Meta* meta, const std::int64_t* pos, int n, const typename P::State& s,
                       std::int64_t newest, SelectScratch<Meta>& sc) {
  sc.ranks.resize(static_cast<std::size_t>(n));
  std::uint32_t* key = sc.ranks.data();
  constexpr std::uint32_t kProtected = 0xffffffffu;
  int best = -1;
  bool exact = true;
  dispatch([&]() KVTRIM_INLINE_LAMBDA {
    // locals: the stores cannot alias them, so the loops vectorise
    const int count = n;
    const std::int64_t last = newest;
    const typename P::State st = s;
    std::uint32_t nan = 0;  // an integer OR reduction (a bool one does not vectorise)
    for (int i = 0; i < count; ++i) {
      const float score = P::score(st, meta[i], pos[i], last);
      const bool prot = P::protects(st, meta[i], pos[i], last);
      nan |= static_cast<std::uint32_t>(score != score);
      key[i] = ordered_bits(score) | (0u - static_cast<std::uint32_t>(prot));  // protected: all ones
    }
    std::uint32_t m = kProtected;
    for (int i = 0; i < count; ++i) m = key[i] < m ? key[i] : m;
    if (nan || m >= ordered_bits(INFINITY)) {
      exact = false;
      return;
    }
    std::int64_t best_pos = INT64_MAX;
    for (int i = 0; i < count; ++i)
      if (key[i] == m && pos[i] < best_pos) {
        best = i;
        best_pos = pos[i];
      }
  });
  return exact ? best : lowest_unprotected_scan<P>(meta, pos, n, s, newest);
}

// The error when a head must shrink but every token it holds is protected.
template <class P>
[[noreturn]] void all_protected(int layer, int kv, int size, int limit) {
  detail::throw_error(P::kName, ": every token is protected but layer ", layer, " KV head ", kv, " holds ", size,
                      " tokens and keeps ", limit, " (the policy's protected tokens must fit its budget)");
}

// Evicts lowest-scored unprotected slots one at a time until the head holds at most `limit` tokens.
template <class P>
void evict_to_limit(HeadStore<typename P::SlotMeta>& h, const typename P::State& s, int limit, int layer, int kv,
                    SelectScratch<typename P::SlotMeta>& sc) {
  while (h.size() > limit) {
    const int v = lowest_unprotected<P>(h.meta_data(), h.pos_data(), h.size(), s, h.newest_pos(), sc);
    if (v < 0) all_protected<P>(layer, kv, h.size(), limit);
    h.remove(v);
  }
}

// kMerges policies: while over the limit, the victim (lowest merge_score among the unprotected, oldest on ties)
// folds into the absorbing slot with the most similar key (cosine, older on ties) when that reaches the
// policy's threshold, else it is evicted. `norms` holds every slot's key norm and follows the slots.
template <class P>
void merge_evict_to_limit(HeadStore<typename P::SlotMeta>& h, const typename P::State& s, int limit,
                          std::vector<float>& norms, SelectScratch<typename P::SlotMeta>& sc, int layer, int kv) {
  using Meta = typename P::SlotMeta;
  while (h.size() > limit) {
    const int n = h.size();
    const Meta* meta = h.meta_data();
    const std::int64_t* pos = h.pos_data();
    const std::int64_t newest = h.newest_pos();
    typename P::Stats st{};
    VictimKey best;
    dispatch([&]() KVTRIM_INLINE_LAMBDA {
      for (int i = 0; i < n; ++i) st = P::combine(st, P::stats_of(meta[i]));
      for (int i = 0; i < n; ++i) {
        if (P::protects(s, meta[i], pos[i], newest)) continue;
        const float sc2 = P::merge_score(s, st, meta[i]);
        if (best.slot < 0 || evicts_before(sc2, pos[i], best.score, best.pos)) best = VictimKey{sc2, pos[i], i};
      }
    });
    const int v = best.slot;
    if (v < 0) all_protected<P>(layer, kv, n, limit);
    int target = -1;
    if (P::may_merge(s, st, meta[v])) {
      sc.dots.resize(static_cast<std::size_t>(n));
      Eigen::Map<Eigen::VectorXf> dots(sc.dots.data(), n);
      dots.noalias() = h.keys() * h.key(v);
      VictimKey cand;  // better_victim on minus the cosine: the highest cosine, the older slot on ties
      for (int c = 0; c < n; ++c) {
        if (c == v || !P::absorbs(s, meta[c], pos[c])) continue;
        cand = better_victim(cand, VictimKey{-cosine_from(dots[c], norms[c], norms[v]), pos[c], c});
      }
      if (cand.slot >= 0 && -cand.score >= P::merge_threshold(s)) target = cand.slot;
    }
    if (target >= 0) {
      const MixWeights w = P::mix_weights(s, meta[target], meta[v]);
      float* kt = h.key_ptr(target);
      float* vt = h.value_ptr(target);
      if (P::merges_keys(s)) {
        const float* kvic = h.key_ptr(v);
        for (int e = 0; e < h.key_dim(); ++e) kt[e] = mix_rn(w, kt[e], kvic[e]);
        norms[static_cast<std::size_t>(target)] = h.key(target).norm();
      }
      const float* vv = h.value_ptr(v);
      for (int e = 0; e < h.value_dim(); ++e) vt[e] = mix_rn(w, vt[e], vv[e]);
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
template <class P>
void fit(HeadStore<typename P::SlotMeta>& h, const typename P::State& s, SelectScratch<typename P::SlotMeta>& sc) {
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
template <class P>
void score_prompt(HeadStore<typename P::SlotMeta>& h, const typename P::State& s, const PromptSums& sums,
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
template <class P>
void keep_prompt(HeadStore<typename P::SlotMeta>& h, int limit, SelectScratch<typename P::SlotMeta>& sc) {
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
