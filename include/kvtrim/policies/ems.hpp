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
//   token); the prompt runs it once as a batch.
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
// Decode writes only SlotMeta, HeadState scratch (reserved on first use) and the kept keys/values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include <Eigen/Core>

#include "../policy.hpp"
#include "../select.hpp"

namespace kvtrim {

// ---- per-token math shared with a GPU backend ----------------------------------------------------------
struct EmsTokenState {
  float mass = 0.0f;   // G: accumulated attention
  float local = 0.0f;  // L: decayed recent attention
  int seen = 0;        // n: queries that saw the token
  int count = 1;       // c: original tokens represented
};

// One decode query's (group-reduced) probability p on a token.
KVTRIM_HOST_DEVICE inline void ems_observe(EmsTokenState& s, float p, float decay) {
  s.mass += p;
  s.local = decay * s.local + p;
  s.seen += 1;
}

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

// GL score from the raw global average (G/n), the raw local score, and their maxima over the head.
KVTRIM_HOST_DEVICE inline float ems_score(float global_avg, float local, float max_global_avg, float max_local,
                                          EmsCombine how) {
  const float g = max_global_avg > 0.0f ? global_avg / max_global_avg : 0.0f;
  const float l = max_local > 0.0f ? local / max_local : 0.0f;
  switch (how) {
    case EmsCombine::kMean: return 0.5f * (g + l);
    case EmsCombine::kGlobal: return g;
    case EmsCombine::kLocal: return l;
    case EmsCombine::kMax: default: return g > l ? g : l;
  }
}

KVTRIM_HOST_DEVICE inline float ems_global_avg(const EmsTokenState& s) {
  return s.seen > 0 ? s.mass / static_cast<float>(s.seen) : 0.0f;
}

// Cosine similarity from a dot product and the two norms; 0 when either vector is zero.
KVTRIM_HOST_DEVICE inline float ems_cosine_from(float dot, float norm_a, float norm_b) {
  return norm_a > 0.0f && norm_b > 0.0f ? dot / (norm_a * norm_b) : 0.0f;
}

// The two merge coefficients a = w_dst / (w_dst + w_src), b = w_src / (w_dst + w_src); equal weights when the
// sum is not positive.
struct EmsMix {
  float a = 0.5f, b = 0.5f;
};
KVTRIM_HOST_DEVICE inline EmsMix ems_mix_weights(float w_dst, float w_src) {
  EmsMix m;
  if (w_dst + w_src > 0.0f) {
    m.a = w_dst / (w_dst + w_src);
    m.b = w_src / (w_dst + w_src);
  }
  return m;
}
// a x + b y, each product rounded before the sum (no fused multiply-add on the device either).
KVTRIM_HOST_DEVICE inline float ems_mix(const EmsMix& m, float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(m.a, x), __fmul_rn(m.b, y));
#else
  return m.a * x + m.b * y;
#endif
}

// dst ← (w_dst dst + w_src src) / (w_dst + w_src), equal weights when the sum is not positive.
KVTRIM_HOST_DEVICE inline void ems_merge_row(float* dst, const float* src, int d, float w_dst, float w_src) {
  const EmsMix m = ems_mix_weights(w_dst, w_src);
  for (int i = 0; i < d; ++i) dst[i] = ems_mix(m, dst[i], src[i]);
}

// The weight of a token in a merge.
KVTRIM_HOST_DEVICE inline float ems_merge_weight(const EmsTokenState& s, EmsMergeWeight how) {
  return how == EmsMergeWeight::kMass ? s.mass : static_cast<float>(s.count);
}

// Folds token src's bookkeeping into dst (after the rows were merged with the weights taken before this).
KVTRIM_HOST_DEVICE inline void ems_merge_state(EmsTokenState& dst, const EmsTokenState& src) {
  dst.mass += src.mass;
  dst.local += src.local;
  dst.count += src.count;
  dst.seen = dst.seen > src.seen ? dst.seen : src.seen;
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
  using SlotMeta = EmsTokenState;
  struct HeadState {
    int target = -1;  // adapted size target (set at prefill); -1 = the budget
    std::vector<float> scratch, norms, dots;
    std::vector<int> order, cls;
  };
  static constexpr std::string_view kName = "ems";
  static constexpr Signals kSignals = Signals::kAttention;
  static constexpr EvictTiming kTiming = EvictTiming::kAfterAttention;

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
  float decay() const { return 1.0f - 1.0f / static_cast<float>(p_.local_window); }
  Protection protection() const { return Protection{p_.sinks, p_.recent}; }
  int target(const HeadState& s, const HeadOf<Ems>& h) const { return s.target < 0 ? h.budget() : s.target; }

  void on_insert(HeadState&, HeadOf<Ems>& h, const StepContext& step) { h.meta(step.slot) = EmsTokenState{}; }

  void on_attention(HeadState&, HeadOf<Ems>& h, const StepContext&, const AttentionRows& rows) {
    const float lam = decay();
    for (int i = 0; i < h.size(); ++i) ems_observe(h.meta(i), rows.reduce(i, p_.reduce), lam);
  }

  void evict(HeadState& s, HeadOf<Ems>& h, const StepContext&) {
    reserve_scratch(s, h.budget() + 1);
    while (h.size() > target(s, h)) compress(s, h, h.size() - 1);
  }

  void on_prompt(HeadState& s, HeadOf<Ems>& h, const PromptContext& prompt) {
    const int T = prompt.n_tokens;
    for (int j = 0; j < T; ++j) {
      EmsTokenState& m = h.meta(j);
      m.mass = prompt.reduce_col(j, p_.reduce);
      m.local = prompt.window_sum != nullptr ? prompt.reduce_win(j, p_.reduce) : 0.0f;
      m.seen = T - j;
      m.count = 1;
    }
    reserve_scratch(s, std::max(T, h.budget() + 1));
    if (p_.coverage < 1.0f) adapt(s, h);
    if (h.size() > target(s, h)) compress(s, h, target(s, h));
  }

 private:
  void reserve_scratch(HeadState& s, int n) const {
    if (static_cast<int>(s.order.capacity()) >= n) return;
    s.scratch.reserve(static_cast<std::size_t>(n));
    s.norms.reserve(static_cast<std::size_t>(n));
    s.dots.reserve(static_cast<std::size_t>(n));
    s.order.reserve(static_cast<std::size_t>(n));
    s.cls.reserve(static_cast<std::size_t>(n));
  }

  // GL of every slot into s.scratch.
  void score_all(HeadState& s, const HeadOf<Ems>& h) const {
    float max_g = 0.0f, max_l = 0.0f;
    for (int i = 0; i < h.size(); ++i) {
      max_g = std::max(max_g, ems_global_avg(h.meta(i)));
      max_l = std::max(max_l, h.meta(i).local);
    }
    s.scratch.resize(static_cast<std::size_t>(h.size()));
    for (int i = 0; i < h.size(); ++i)
      s.scratch[static_cast<std::size_t>(i)] =
          ems_score(ems_global_avg(h.meta(i)), h.meta(i).local, max_g, max_l, p_.combine);
  }

  // Target from sparsity: smallest k whose top normalised global scores hold `coverage` of their sum.
  void adapt(HeadState& s, const HeadOf<Ems>& h) const {
    s.scratch.resize(static_cast<std::size_t>(h.size()));
    double total = 0.0;
    for (int i = 0; i < h.size(); ++i) total += (s.scratch[static_cast<std::size_t>(i)] = ems_global_avg(h.meta(i)));
    std::sort(s.scratch.begin(), s.scratch.end(), [](float a, float b) { return a > b; });
    int k = h.size();
    double acc = 0.0;
    for (int i = 0; i < h.size(); ++i) {
      acc += s.scratch[static_cast<std::size_t>(i)];
      if (acc >= static_cast<double>(p_.coverage) * total) {
        k = i + 1;
        break;
      }
    }
    const int floor_keep = std::max(p_.sinks + p_.recent,
                                    static_cast<int>(std::ceil(static_cast<double>(p_.min_keep) * h.budget())));
    s.target = std::clamp(k, std::min(floor_keep, h.budget()), h.budget());
  }

  // Evict-then-merge down to k tokens in one pass (see the header comment).
  void compress(HeadState& s, HeadOf<Ems>& h, int k) const {
    const int n = h.size();
    const std::int64_t newest = h.newest_pos();
    const Protection pr = protection();
    score_all(s, h);
    const auto& gl = s.scratch;
    // s.cls: 0 = center, 1 = to remove (class decided below); s.order: non-protected slots, keep-first order.
    s.cls.assign(static_cast<std::size_t>(n), 0);
    s.order.clear();
    int protected_n = 0;
    for (int i = 0; i < n; ++i) {
      if (pr.protects(h.pos(i), newest))
        ++protected_n;
      else
        s.order.push_back(i);
    }
    KVTRIM_CHECK(protected_n <= k, "Ems: ", protected_n, " protected tokens (sinks ", pr.sinks, " + recent ",
                 pr.recent, ") exceed the target ", k);
    const std::size_t room = static_cast<std::size_t>(k - protected_n);
    auto keeps_before = [&](int a, int b) {
      return evicts_before(gl[static_cast<std::size_t>(b)], h.pos(b), gl[static_cast<std::size_t>(a)], h.pos(a));
    };
    if (room + 1 == s.order.size()) {  // decode: one victim, the lowest GL (oldest on ties)
      int v = s.order[0];
      for (int i : s.order)
        if (keeps_before(v, i)) v = i;
      s.cls[static_cast<std::size_t>(v)] = 1;
    } else if (room < s.order.size()) {
      std::nth_element(s.order.begin(), s.order.begin() + static_cast<std::ptrdiff_t>(room), s.order.end(),
                       keeps_before);
      for (std::size_t j = room; j < s.order.size(); ++j) s.cls[static_cast<std::size_t>(s.order[j])] = 1;
    }
    // Removed tokens in position order; class = merge target slot or -1 (zero class).
    s.order.clear();
    for (int i = 0; i < n; ++i)
      if (s.cls[static_cast<std::size_t>(i)] == 1) s.order.push_back(i);
    std::sort(s.order.begin(), s.order.end(), [&](int a, int b) { return h.pos(a) < h.pos(b); });
    const int d = h.key_dim();
    s.norms.resize(static_cast<std::size_t>(n));
    s.dots.resize(static_cast<std::size_t>(n));
    Eigen::Map<Eigen::VectorXf> norms(s.norms.data(), n), dots(s.dots.data(), n);
    if (!s.order.empty()) norms = h.keys().rowwise().norm();
    std::vector<int>& target = s.cls;  // reuse: for removed slots, store target + 2 (>= 2) or 1 (zero class)
    for (int j : s.order) {
      int best = -1;
      float best_cos = 0.0f;
      if (gl[static_cast<std::size_t>(j)] >= p_.evict_below) {
        dots.noalias() = h.keys() * h.key(j);
        for (int c = 0; c < n; ++c) {
          if (target[static_cast<std::size_t>(c)] != 0) continue;  // not a center
          if (!p_.merge_into_sinks && h.pos(c) < p_.sinks) continue;
          const float cs = ems_cosine_from(dots[c], norms[c], norms[j]);
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
    for (int j : s.order) {
      const int c = target[static_cast<std::size_t>(j)] - 2;
      if (c < 0) continue;
      EmsTokenState& mc = h.meta(c);
      const EmsTokenState& mj = h.meta(j);
      const float wc = ems_merge_weight(mc, p_.merge_weight), wj = ems_merge_weight(mj, p_.merge_weight);
      if (p_.merge_keys) ems_merge_row(h.key_ptr(c), h.key_ptr(j), d, wc, wj);
      ems_merge_row(h.value_ptr(c), h.value_ptr(j), h.value_dim(), wc, wj);
      ems_merge_state(mc, mj);
    }
    // Remove in descending slot order so the slot moved into each hole is always a kept one.
    std::sort(s.order.begin(), s.order.end(), [](int a, int b) { return a > b; });
    for (int j : s.order) {
      if (target[static_cast<std::size_t>(j)] >= 2)
        h.remove_merged(j);
      else
        h.remove(j);
    }
  }

  Params p_;
};

}  // namespace kvtrim
