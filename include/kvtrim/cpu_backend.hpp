// kvtrim: the CPU backend (Eigen).
//
// Storage is one HeadStore per (layer, KV head). Decode attention reads each kept key and value once for
// the whole query group (GQA), accumulates in fp32 with a max-subtracted softmax, and writes the
// probabilities into a per-layer scratch buffer that policies read: no second pass, no allocation.
// Prefill computes exact causal attention in blocks of query rows and sums the probability columns that
// score-based policies need.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "head_store.hpp"
#include "policy.hpp"

namespace kvtrim {

namespace detail {

// softmax of row[0..n) in place (fp32, max-subtracted); n >= 1.
inline void softmax_inplace(float* row, int n) {
  Eigen::Map<Eigen::ArrayXf> r(row, n);
  const float m = r.maxCoeff();
  r = (r - m).exp();
  r /= r.sum();
}

}  // namespace detail

struct CpuBackend {
  static constexpr const char* kName = "cpu";

  template <class P>
  class Impl {
   public:
    using Meta = typename P::SlotMeta;
    using Head = HeadStore<Meta>;
    using State = typename P::HeadState;

    Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg) {
      const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
      policies_.reserve(static_cast<std::size_t>(L));
      int max_budget = 0;
      for (int l = 0; l < L; ++l) {
        LayerContext ctx{l, L, H, g, d, {}};
        for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
        policies_.emplace_back(params, ctx);
        for (int h = 0; h < H; ++h) {
          heads_.emplace_back(key_width(policies_.back(), h), value_width(policies_.back(), h), cfg.budget_of(l, h));
          max_budget = std::max(max_budget, cfg.budget_of(l, h));
        }
      }
      states_.resize(heads_.size());
      probs_.resize(static_cast<std::size_t>(g) * (max_budget + 1));
      if constexpr (kProjects) {
        q_low_.resize(static_cast<std::size_t>(g) * d);
        kv_low_.resize(2 * static_cast<std::size_t>(d));
        o_low_.resize(static_cast<std::size_t>(g) * d);
      }
    }

    // A policy that stores keys/values in a smaller space (low-rank storage) defines key_width(kv_head),
    // value_width(kv_head), project_key/value(kv_head, in, out), project_queries(kv_head, group, in, out)
    // and unproject_outputs(kv_head, group, in, out). Queries are projected before the policy sees them,
    // so every policy hook works in the stored space. Without these members the storage is head_dim wide.
    static constexpr bool kProjects = requires(const P& p, const float* in, float* out) {
      { p.key_width(0) } -> std::convertible_to<int>;
      { p.value_width(0) } -> std::convertible_to<int>;
      p.project_key(0, in, out);
      p.project_value(0, in, out);
      p.project_queries(0, 1, in, out);
      p.unproject_outputs(0, 1, in, out);
    };

    Head& head(int layer, int kv) { return heads_[index(layer, kv)]; }
    const Head& head(int layer, int kv) const { return heads_[index(layer, kv)]; }
    State& state(int layer, int kv) { return states_[index(layer, kv)]; }
    P& policy(int layer) { return policies_[static_cast<std::size_t>(layer)]; }
    const P& policy(int layer) const { return policies_[static_cast<std::size_t>(layer)]; }

    void reset() {
      for (auto& h : heads_) {
        h.clear();
        h.shrink_to_budget();
      }
      for (auto& s : states_) s = State{};
    }

    // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d].
    void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
      const int H = cfg_.n_kv_heads, d = cfg_.head_dim, g = cfg_.group_size();
      P& pol = policy(layer);
      for (int kv = 0; kv < H; ++kv) {
        Head& h = head(layer, kv);
        State& st = state(layer, kv);
        const float* qg = q + static_cast<std::size_t>(kv) * g * d;
        const float* kh = k + static_cast<std::size_t>(kv) * d;
        const float* vh = v + static_cast<std::size_t>(kv) * d;
        float* oh = out + static_cast<std::size_t>(kv) * g * d;
        if constexpr (kProjects) {  // everything below happens in the stored (projected) space
          pol.project_queries(kv, g, qg, q_low_.data());
          pol.project_key(kv, kh, kv_low_.data());
          pol.project_value(kv, vh, kv_low_.data() + d);
          qg = q_low_.data();
          kh = kv_low_.data();
          vh = kv_low_.data() + d;
        }
        StepContext step{layer, kv, g, h.key_dim(), pos, -1, qg, false};
        step.slot = h.append(kh, vh, pos);
        pol.on_insert(st, h, step);
        if constexpr (P::kTiming == EvictTiming::kBeforeAttention) pol.evict(st, h, step);
        const AttentionRows rows = attend(h, qg, kProjects ? o_low_.data() : oh);
        if constexpr (kProjects) pol.unproject_outputs(kv, g, o_low_.data(), oh);
        if constexpr (has(P::kSignals, Signals::kAttention)) pol.on_attention(st, h, step, rows);
        if constexpr (P::kTiming == EvictTiming::kAfterAttention) pol.evict(st, h, step);
        KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer,
                     " KV head ", kv, " over its budget of ", h.budget());
      }
    }

    // Q: [T x n_q_heads*d], K, V: [T x n_kv_heads*d], out: [T x n_q_heads*d], all row-major; positions
    // start at `first_pos` (0 for a fresh cache).
    void prefill(int layer, const float* Q, const float* K, const float* V, float* out, int T,
                 std::int64_t first_pos) {
      const int H = cfg_.n_kv_heads, d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
      P& pol = policy(layer);
      const int window = std::clamp(pol.prompt_window(), 0, T);
      constexpr bool kNeedAttention = has(P::kSignals, Signals::kAttention);
      std::vector<float> col(kNeedAttention ? static_cast<std::size_t>(g) * T : 0);
      std::vector<float> win(kNeedAttention && window > 0 ? static_cast<std::size_t>(g) * T : 0);
      using Strided = Eigen::Map<const RowMajorMatrixXf, 0, Eigen::OuterStride<>>;
      using StridedOut = Eigen::Map<RowMajorMatrixXf, 0, Eigen::OuterStride<>>;
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      constexpr int kBlock = 128;
      RowMajorMatrixXf S, Kh, Vh, Qg, Oh;  // per head, contiguous, in the stored (maybe projected) space
      for (int kv = 0; kv < H; ++kv) {
        Head& h = head(layer, kv);
        const int dk = h.key_dim(), dv = h.value_dim();
        Strided Kin(K + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
        Strided Vin(V + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
        Strided Qin(Q + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                    Eigen::OuterStride<>(Hq * d));
        Kh.resize(T, dk);
        Vh.resize(T, dv);
        Qg.resize(T, static_cast<Eigen::Index>(g) * dk);
        if constexpr (kProjects) {
          for (int t = 0; t < T; ++t) {
            pol.project_key(kv, Kin.row(t).data(), Kh.row(t).data());
            pol.project_value(kv, Vin.row(t).data(), Vh.row(t).data());
            pol.project_queries(kv, g, Qin.row(t).data(), Qg.row(t).data());
          }
        } else {
          Kh = Kin;
          Vh = Vin;
          Qg = Qin;
        }
        Oh.resize(T, static_cast<Eigen::Index>(g) * dv);
        std::fill(col.begin(), col.end(), 0.0f);
        std::fill(win.begin(), win.end(), 0.0f);
        for (int gi = 0; gi < g; ++gi) {
          const auto Qh = Qg.middleCols(static_cast<Eigen::Index>(gi) * dk, dk);
          for (int t0 = 0; t0 < T; t0 += kBlock) {
            const int b = std::min(kBlock, T - t0), width = t0 + b;  // rows t0..t0+b-1 see keys 0..t
            S.resize(b, width);
            S.noalias() = (Qh.middleRows(t0, b) * Kh.topRows(width).transpose()) * scale;
            for (int r = 0; r < b; ++r) {
              const int t = t0 + r;
              detail::softmax_inplace(S.row(r).data(), t + 1);
              S.row(r).tail(width - t - 1).setZero();
              if constexpr (kNeedAttention) {
                float* c = col.data() + static_cast<std::size_t>(gi) * T;
                for (int j = 0; j <= t; ++j) c[j] += S(r, j);
                if (t >= T - window) {
                  float* w = win.data() + static_cast<std::size_t>(gi) * T;
                  for (int j = 0; j <= t; ++j) w[j] += S(r, j);
                }
              }
            }
            Oh.block(t0, static_cast<Eigen::Index>(gi) * dv, b, dv).noalias() = S * Vh.topRows(width);
          }
        }
        StridedOut Oout(out + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                        Eigen::OuterStride<>(Hq * d));
        if constexpr (kProjects) {
          for (int t = 0; t < T; ++t) pol.unproject_outputs(kv, g, Oh.row(t).data(), Oout.row(t).data());
        } else {
          Oout = Oh;
        }
        State& st = state(layer, kv);
        h.reserve(T + 1);
        for (int t = 0; t < T; ++t) {
          StepContext step{layer, kv, g, dk, first_pos + t, -1, Qg.row(t).data(), true};
          step.slot = h.append(Kh.row(t).data(), Vh.row(t).data(), first_pos + t);
          pol.on_insert(st, h, step);
        }
        PromptContext prompt{layer, kv, g, T, kNeedAttention ? col.data() : nullptr,
                             win.empty() ? nullptr : win.data(), window};
        pol.on_prompt(st, h, prompt);
        KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " prompt tokens in layer ", layer,
                     " KV head ", kv, " over its budget of ", h.budget());
        h.shrink_to_budget();
      }
    }

   private:
    int key_width(const P& p, int kv) const {
      if constexpr (kProjects) return p.key_width(kv);
      return cfg_.head_dim;
    }
    int value_width(const P& p, int kv) const {
      if constexpr (kProjects) return p.value_width(kv);
      return cfg_.head_dim;
    }
    std::size_t index(int layer, int kv) const {
      return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv;
    }

    // Attention of the group's queries over every slot of h; returns the probabilities (scratch).
    AttentionRows attend(const Head& h, const float* qg, float* out) {
      const int n = h.size(), g = cfg_.group_size(), dk = h.key_dim(), dv = h.value_dim();
      const float scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
      Eigen::Map<const RowMajorMatrixXf> Qg(qg, g, dk);
      Eigen::Map<RowMajorMatrixXf> probs(probs_.data(), g, n);
      // One pass over K: every key row meets all g queries while it is in cache.
      for (int i = 0; i < n; ++i) {
        const auto ki = h.key(i);
        for (int gi = 0; gi < g; ++gi) probs(gi, i) = Qg.row(gi).dot(ki.transpose()) * scale;
      }
      for (int gi = 0; gi < g; ++gi) detail::softmax_inplace(probs.row(gi).data(), n);
      Eigen::Map<RowMajorMatrixXf> O(out, g, dv);
      O.setZero();
      for (int i = 0; i < n; ++i) {
        const auto vi = h.value(i);
        for (int gi = 0; gi < g; ++gi) O.row(gi) += probs(gi, i) * vi.transpose();
      }
      return AttentionRows{probs_.data(), n, g, n};
    }

    CacheConfig cfg_;
    std::vector<P> policies_;
    std::vector<Head> heads_;
    std::vector<State> states_;
    std::vector<float> probs_;  // [group x (max budget + 1)] attention scratch of the current step
    std::vector<float> q_low_, kv_low_, o_low_;  // projected q, k|v and output of the current step
  };
};

}  // namespace kvtrim
