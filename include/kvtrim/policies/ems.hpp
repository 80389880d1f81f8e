// kvtrim: EMS (arXiv 2412.08521) — Global-Local importance and evict-then-merge, head-wise.
//
// Only the abstract of EMS is public (no code), so this is kvtrim's own realisation of it; every formula is
// written here and in docs/EMS.md, and each choice with a reasonable alternative is a parameter.
//
// Per kept token i of one (layer, KV head) the policy keeps (SlotMeta):
//   G_i  global mass: attention the token received, summed over every query that saw it (GQA: the g query
//        heads of the group reduced by `reduce`, mean by default). G is also the token's "mass".
//   n_i  number of queries that saw it;   L_i  local score;   c_i  number of original tokens it represents.
// Updates. Prefill (prompt of T tokens, token j in slot j): G_j = Σ_{t>=j} a_{t,j} (column sum),
//   n_j = T − j, L_j = Σ_{t >= T−w} a_{t,j} (the last w = local_window prompt queries), c_j = 1.
//   Decode step with probabilities a_i (new token included): G_i += a_i, n_i += 1, L_i = λ L_i + a_i with
//   λ = 1 − 1/w (an exponential window of about w queries; an exact sliding sum would need w floats per token).
// Score (at every eviction, over the tokens held):
//   ĝ_i = (G_i / n_i) / max_j (G_j / n_j)   (normalised by the queries that saw i: no causal-mask bias),
//   l̂_i = L_i / max_j L_j                   (local: the recent queries' view),
//   GL_i = combine(ĝ_i, l̂_i): kMax (default, max(ĝ, l̂)), kMean ((ĝ + l̂)/2), kGlobal (ĝ), kLocal (l̂).
//   A zero maximum gives that term 0 for every token.
// Evict-then-merge, bringing a head to its target size k (k = budget unless adaptation lowers it):
//   - centers: the `sinks` first positions and the `recent` newest positions (protected, select.hpp
//     Protection), plus the highest-GL other tokens up to k (ties: the older token leaves first);
//   - every other token j gets a class: the center c (a sink only if merge_into_sinks) with the highest key
//     cosine cos(k_j, k_c) (ties: older center), or the zero class;
//     j goes to the zero class (is evicted) when GL_j < evict_below or cos < merge_similarity;
//   - each class is merged into its center with weights w = G (merge_weight kMass, default) or c
//     (kCount): k_c ← (w_c k_c + Σ_j w_j k_j) / (w_c + Σ_j w_j) (only if merge_keys, default true), the same
//     for v; G_c += Σ G_j, L_c += Σ L_j, c_c += Σ c_j, n_c = max(n_c, n_j). Mass is conserved: the G of the
//     merged tokens moves to the center. Equal weights are used when the weights sum to 0.
//   - merged tokens leave through remove_merged (counted as merges), zero-class ones through remove
//     (evictions). Classes are assigned against the centers' keys before any merge, so the result does not
//     depend on processing order (merges are applied in position order).
//   Decode: one token joins per step and the same rule runs with one non-center (the lowest-GL unprotected
//   token): the library's merge rule (policy.hpp, kMerges), which every backend runs from the rules below; the
//   prompt runs it once as a batch, host code (kHostPrompt: a batch of classes is not a per-slot rule).
// Head-wise adaptation to sparsity (the paper splits one global budget across heads by sparsity; kvtrim's
// store gives each (layer, KV head) a fixed capacity = its budget, so here adaptation can only keep FEWER
// tokens than the capacity, never more; for a real re-split give per-head budgets in CacheConfig):
//   with coverage ρ < 1, at prefill (when the whole prompt is visible) a head's target becomes
//   k = clamp(k*, min(B, max(sinks + recent, ⌈min_keep · B⌉)), B), where k* is the smallest number of prompt
//   tokens whose largest normalised global scores G_j/n_j sum to at least ρ · Σ_j G_j/n_j. A sparse head
//   (few tokens take the attention) gets a small k; a flat head keeps its budget. The target then holds for
//   the whole sequence: re-measuring during decode would only see the tokens already kept, so a flat head
//   would lose a share ρ of its tokens at every re-measure and never recover. Without a prefill (decode
//   only) there is nothing to measure and the head keeps its budget. ρ = 1 (default) turns adaptation off.
//   The paper's "zero class" is what makes heads with different splits run as one batch shape on a GPU; on
//   the CPU it is the per-token class above (merge target or zero = evict).
//
// Parameters (defaults): sinks 4, recent 8, local_window 32, combine kMax, reduce kMean,
//   merge_similarity 0.9 (key cosine; > 1 never merges = plain eviction, −1 always merges),
//   evict_below 0 (GL under this is always evicted), merge_keys true, merge_weight kMass,
//   merge_into_sinks false, coverage 1 (off), min_keep 0.25.
// Choices where the paper is silent (all [I]): the formulas above; protection by position (tokens at
//   positions < sinks, and positions > newest − recent); keys merged post-RoPE (they mix rotation phases;
//   merge_keys = false merges values only and keeps the center's key); the merged token keeps the center's
//   position; no log-count attention bias for merged tokens (the backend computes plain attention, so a token
//   representing c_i tokens is under-weighted); cosine of a zero key is 0; compression runs at prefill and
//   at every decode step (after attention), not periodically.
// Decode writes only SlotMeta, the kept keys/values and the backend's per-slot key norms.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <vector>

#include <Eigen/Core>

#include "../head_store.hpp"
#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

enum class EmsCombine { kMax, kMean, kGlobal, kLocal };
enum class EmsMergeWeight { kMass, kCount };
constexpr auto enum_names(EmsCombine) {
  return std::array{EnumName<EmsCombine>{EmsCombine::kMax, "max"}, EnumName<EmsCombine>{EmsCombine::kMean, "mean"},
                    EnumName<EmsCombine>{EmsCombine::kGlobal, "global"}, EnumName<EmsCombine>{EmsCombine::kLocal, "local"}};
}
constexpr auto enum_names(EmsMergeWeight) {
  return std::array{EnumName<EmsMergeWeight>{EmsMergeWeight::kMass, "mass"},
                    EnumName<EmsMergeWeight>{EmsMergeWeight::kCount, "count"}};
}

struct Ems {
  struct Params {
    int sinks = 4;
    int recent = 8;
    int local_window = 32;
    EmsCombine combine = EmsCombine::kMax;
    GroupReduce reduce = GroupReduce::kMean;
    float merge_similarity = 0.9f;
    float evict_below = 0.0f;
    bool merge_keys = true;
    EmsMergeWeight merge_weight = EmsMergeWeight::kMass;
    bool merge_into_sinks = false;
    float coverage = 1.0f;
    float min_keep = 0.25f;
    static constexpr auto fields() {
      return std::tuple{field("sinks", &Params::sinks),
                        field("recent", &Params::recent),
                        field("local_window", &Params::local_window),
                        field("combine", &Params::combine),
                        field("reduce", &Params::reduce),
                        field("merge_similarity", &Params::merge_similarity),
                        field("evict_below", &Params::evict_below),
                        field("merge_keys", &Params::merge_keys),
                        field("merge_weight", &Params::merge_weight),
                        field("merge_into_sinks", &Params::merge_into_sinks),
                        field("coverage", &Params::coverage),
                        field("min_keep", &Params::min_keep)};
    }
  };
  struct SlotMeta {
    float mass = 0.0f;   // G: accumulated attention
    float local = 0.0f;  // L: decayed recent attention
    int seen = 0;        // n: queries that saw the token
    int count = 1;       // c: original tokens represented
  };
  struct State {
    Protection protect;
    float decay = 1.0f;
    Params p;  // scalars only: trivially copyable
  };
  // The head's maxima of G/n and L, which normalise every GL score of a step.
  struct Stats {
    float max_global = 0.0f, max_local = 0.0f;
  };
  static constexpr std::string_view kName = "ems";
  static constexpr Signals kSignals = Signals::kAttention;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;
  static constexpr bool kMerges = true;
  static constexpr bool kHostPrompt = true;

  Ems(const Params& p, const LayerContext& ctx) : p_(p) {
    KVTRIM_CHECK(p.sinks >= 0, "Ems: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.recent >= 0, "Ems: recent must be >= 0, got ", p.recent);
    KVTRIM_CHECK(p.local_window >= 1, "Ems: local_window must be >= 1 query, got ", p.local_window);
    KVTRIM_CHECK(std::isfinite(p.merge_similarity), "Ems: merge_similarity must be finite, got ",
                 p.merge_similarity);
    KVTRIM_CHECK(std::isfinite(p.evict_below) && p.evict_below >= 0.0f,
                 "Ems: evict_below must be a finite score >= 0, got ", p.evict_below);
    KVTRIM_CHECK(p.coverage > 0.0f && p.coverage <= 1.0f, "Ems: coverage must be in (0, 1] (1 = no adaptation), got ",
                 p.coverage);
    KVTRIM_CHECK(p.min_keep > 0.0f && p.min_keep <= 1.0f, "Ems: min_keep must be in (0, 1] of the budget, got ",
                 p.min_keep);
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks + p.recent <= ctx.budgets[h], "Ems: sinks (", p.sinks, ") + recent (", p.recent,
                   ") = ", p.sinks + p.recent, " exceeds the budget ", ctx.budgets[h], " of layer ", ctx.layer,
                   " KV head ", h);
  }

  const Params& params() const { return p_; }
  int prompt_window() const { return p_.local_window; }
  State initial(int, int) const {
    return {Protection{p_.sinks, p_.recent}, 1.0f - 1.0f / static_cast<float>(p_.local_window), p_};
  }

  // ---- per-token math
  // The divisions below have no branch around them (a compiler does not move a division that may trap out of a
  // condition, and a branch keeps the loops over slots scalar): where the plain form is `cond ? x / y : 0`, the
  // divisor becomes infinity instead, and x / inf is 0 for every finite x (G, L and the maxima are never negative).
  KVTRIM_HOST_DEVICE static float global_avg(const SlotMeta& m) {
    const float n = static_cast<float>(m.seen);  // converted outside the select, which stays a blend
    return m.mass / (n > 0.0f ? n : INFINITY);
  }
  // x / max when max > 0, else 0.
  KVTRIM_HOST_DEVICE static float share_of_max(float x, float max) { return x / (max > 0.0f ? max : INFINITY); }
  // GL score from the raw global average (G/n), the raw local score, and their maxima over the head.
  KVTRIM_HOST_DEVICE static float gl_score(float global_avg, float local, float max_global_avg, float max_local,
                                           EmsCombine how) {
    const float g = share_of_max(global_avg, max_global_avg);
    const float l = share_of_max(local, max_local);
    const float larger = g > l ? g : l;  // selects, not a switch: loops over slots vectorise
    return how == EmsCombine::kMean ? 0.5f * (g + l)
           : how == EmsCombine::kGlobal ? g
           : how == EmsCombine::kLocal  ? l
                                        : larger;  // kMax
  }

  // ---- the rules
  KVTRIM_HOST_DEVICE static void on_insert(State&, SlotMeta&, std::int64_t, const TokenInputs&) {}
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  KVTRIM_HOST_DEVICE static GroupReduce group_reduce(const State& s) { return s.p.reduce; }
  // One decode query's (group-reduced) probability p on a token.
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, SlotMeta& m, float p) {
    m.mass += p;
    m.local = s.decay * m.local + p;
    m.seen += 1;
  }
  KVTRIM_HOST_DEVICE static Stats stats_of(const SlotMeta& m) { return {global_avg(m), m.local}; }
  KVTRIM_HOST_DEVICE static Stats combine(const Stats& a, const Stats& b) {
    return {a.max_global > b.max_global ? a.max_global : b.max_global,
            a.max_local > b.max_local ? a.max_local : b.max_local};
  }
  KVTRIM_HOST_DEVICE static float merge_score(const State& s, const Stats& st, const SlotMeta& m) {
    return gl_score(global_avg(m), m.local, st.max_global, st.max_local, s.p.combine);
  }
  KVTRIM_HOST_DEVICE static float score(const State&, const SlotMeta& m, std::int64_t, std::int64_t) {
    return global_avg(m);  // merge_score decides; this orders nothing on its own
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State&, SlotMeta&, int, const PromptSums&) { return 0.0f; }
  KVTRIM_HOST_DEVICE static bool may_merge(const State& s, const Stats& st, const SlotMeta& victim) {
    return merge_score(s, st, victim) >= s.p.evict_below;
  }
  KVTRIM_HOST_DEVICE static bool absorbs(const State& s, const SlotMeta&, std::int64_t pos) {
    return s.p.merge_into_sinks || pos >= s.protect.sinks;
  }
  KVTRIM_HOST_DEVICE static float merge_threshold(const State& s) { return s.p.merge_similarity; }
  KVTRIM_HOST_DEVICE static bool merges_keys(const State& s) { return s.p.merge_keys; }
  // dst <- (w_dst dst + w_src src) / (w_dst + w_src), w = G or c; equal weights when the sum is not positive.
  KVTRIM_HOST_DEVICE static MixWeights mix_weights(const State& s, const SlotMeta& dst, const SlotMeta& src) {
    const float wd = weight(s.p.merge_weight, dst), ws = weight(s.p.merge_weight, src);
    MixWeights m;
    if (wd + ws > 0.0f) {
      m.a = wd / (wd + ws);
      m.b = ws / (wd + ws);
    }
    return m;
  }
  // Folds token src's bookkeeping into dst (after the rows were merged with the weights taken before this).
  KVTRIM_HOST_DEVICE static void merge_meta(SlotMeta& dst, const SlotMeta& src) {
    dst.mass += src.mass;
    dst.local += src.local;
    dst.count += src.count;
    dst.seen = dst.seen > src.seen ? dst.seen : src.seen;
  }

  // ---- the prompt stage (kHostPrompt): the batch evict-then-merge and the head-wise target, on a head that
  // holds the whole prompt (token j in slot j). Returns the head's decode limit from now on.
  int host_prompt(State&, HeadStore<SlotMeta>& h, const PromptSums& in) const {
    const int T = h.size();
    for (int j = 0; j < T; ++j) {
      SlotMeta& m = h.meta(j);
      m.mass = in.col.reduce(j, p_.reduce);
      m.local = in.win.p != nullptr ? in.win.reduce(j, p_.reduce) : 0.0f;
      m.seen = in.queries_seeing(j);
      m.count = 1;
    }
    const int target = p_.coverage < 1.0f ? adapted_target(h) : h.budget();
    if (h.size() > target) compress(h, target);
    return target;
  }

 private:
  KVTRIM_HOST_DEVICE static float weight(EmsMergeWeight how, const SlotMeta& m) {
    return how == EmsMergeWeight::kMass ? m.mass : static_cast<float>(m.count);
  }

  // Target from sparsity: smallest k whose top normalised global scores hold `coverage` of their sum.
  int adapted_target(const HeadStore<SlotMeta>& h) const {
    std::vector<float> g(static_cast<std::size_t>(h.size()));
    double total = 0.0;
    for (int i = 0; i < h.size(); ++i) total += (g[static_cast<std::size_t>(i)] = global_avg(h.meta(i)));
    std::sort(g.begin(), g.end(), [](float a, float b) { return a > b; });
    int k = h.size();
    double acc = 0.0;
    for (int i = 0; i < h.size(); ++i) {
      acc += g[static_cast<std::size_t>(i)];
      if (acc >= static_cast<double>(p_.coverage) * total) {
        k = i + 1;
        break;
      }
    }
    const int floor_keep = std::max(p_.sinks + p_.recent,
                                    static_cast<int>(std::ceil(static_cast<double>(p_.min_keep) * h.budget())));
    return std::clamp(k, std::min(floor_keep, h.budget()), h.budget());
  }

  // Evict-then-merge down to k tokens in one pass (see the header comment).
  void compress(HeadStore<SlotMeta>& h, int k) const {
    const int n = h.size();
    const std::int64_t newest = h.newest_pos();
    const Protection pr{p_.sinks, p_.recent};
    float max_g = 0.0f, max_l = 0.0f;
    for (int i = 0; i < n; ++i) {
      max_g = std::max(max_g, global_avg(h.meta(i)));
      max_l = std::max(max_l, h.meta(i).local);
    }
    std::vector<float> gl(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i)
      gl[static_cast<std::size_t>(i)] = gl_score(global_avg(h.meta(i)), h.meta(i).local, max_g, max_l, p_.combine);
    // cls: 0 = center, 1 = to remove; order: the unprotected slots, keep-first after the partial sort.
    std::vector<int> cls(static_cast<std::size_t>(n), 0), order;
    int protected_n = 0;
    for (int i = 0; i < n; ++i) {
      if (pr.protects(h.pos(i), newest))
        ++protected_n;
      else
        order.push_back(i);
    }
    KVTRIM_CHECK(protected_n <= k, "Ems: ", protected_n, " protected tokens (sinks ", pr.sinks, " + recent ",
                 pr.recent, ") exceed the target ", k);
    const std::size_t room = static_cast<std::size_t>(k - protected_n);
    auto keeps_before = [&](int a, int b) {
      return evicts_before(gl[static_cast<std::size_t>(b)], h.pos(b), gl[static_cast<std::size_t>(a)], h.pos(a));
    };
    if (room < order.size()) {
      std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(room), order.end(), keeps_before);
      for (std::size_t j = room; j < order.size(); ++j) cls[static_cast<std::size_t>(order[j])] = 1;
    }
    // Removed tokens in position order; target = merge target slot + 2, or 1 (zero class).
    order.clear();
    for (int i = 0; i < n; ++i)
      if (cls[static_cast<std::size_t>(i)] == 1) order.push_back(i);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return h.pos(a) < h.pos(b); });
    Eigen::VectorXf norms, dots(n);
    if (!order.empty()) norms = h.keys().rowwise().norm();
    std::vector<int>& target = cls;
    for (int j : order) {
      int best = -1;
      float best_cos = 0.0f;
      if (gl[static_cast<std::size_t>(j)] >= p_.evict_below) {
        dots.noalias() = h.keys() * h.key(j);
        for (int c = 0; c < n; ++c) {
          if (target[static_cast<std::size_t>(c)] != 0) continue;  // not a center
          if (!p_.merge_into_sinks && h.pos(c) < p_.sinks) continue;
          const float cs = cosine_from(dots[c], norms[c], norms[j]);
          if (best < 0 || cs > best_cos || (cs == best_cos && h.pos(c) < h.pos(best))) {
            best = c;
            best_cos = cs;
          }
        }
        if (best >= 0 && !(best_cos >= p_.merge_similarity)) best = -1;
      }
      target[static_cast<std::size_t>(j)] = best >= 0 ? best + 2 : 1;
    }
    // Apply merges in position order (weights taken before each fold; equal to the batch weighted average).
    const State s = initial(0, h.budget());
    for (int j : order) {
      const int c = target[static_cast<std::size_t>(j)] - 2;
      if (c < 0) continue;
      const MixWeights w = mix_weights(s, h.meta(c), h.meta(j));
      if (p_.merge_keys)
        for (int e = 0; e < h.key_dim(); ++e) h.key_ptr(c)[e] = mix_rn(w, h.key_ptr(c)[e], h.key_ptr(j)[e]);
      for (int e = 0; e < h.value_dim(); ++e) h.value_ptr(c)[e] = mix_rn(w, h.value_ptr(c)[e], h.value_ptr(j)[e]);
      merge_meta(h.meta(c), h.meta(j));
    }
    // Remove in descending slot order so the slot moved into each hole is always a kept one.
    std::sort(order.begin(), order.end(), [](int a, int b) { return a > b; });
    for (int j : order) {
      if (target[static_cast<std::size_t>(j)] >= 2)
        h.remove_merged(j);
      else
        h.remove(j);
    }
  }

  Params p_;
};

}  // namespace kvtrim
