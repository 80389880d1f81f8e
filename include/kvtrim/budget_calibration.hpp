// kvtrim: measuring what each (layer, KV head) loses at each budget, on calibration text.
//
// BudgetCalibrator sees the attention inputs of whole sequences (the Q, K, V a prefill gets: keys rotated,
// every token attending causally to the ones before it), computes each query's exact softmax attention, and
// asks for every budget b: if this head kept only b tokens, what would this query lose? The answers, averaged
// over all queries, are the BudgetCurves that allocate_budgets() (budget_plan.hpp) turns into a plan.
//
//   BudgetCalibrator cal(cfg, {.max_budget = 512});
//   cal.set_output_projection(layer, W_o, model_dim);       // optional, per layer
//   for each calibration sequence and layer: cal.add(layer, Q, K, V);
//   BudgetPlan plan = allocate_budgets(cal.curves(), {.total = ...});
//
// Which b tokens a head keeps (KeepModel):
//  - kSinksAndRecent: the first `sinks` positions and the newest b - sinks (what `streaming` keeps; with
//    b <= sinks, the first b - 1 and the newest). It measures how far back a head looks.
//  - kTopAttention: the b positions this query attends to most (GQA: the mean over the query group), an
//    oracle that no causal policy reaches; it measures how concentrated a head's attention is.
// What a query loses (CostMeasure):
//  - kLostMass: the attention probability outside the kept tokens (mean over the group's query heads).
//  - kOutputError: |o - o_b|^2, where o is the exact attention output and o_b the output over the kept tokens
//    (softmax renormalised over them, as a cache computes it), summed over the group's query heads. With an
//    output projection set for the layer, the error is measured after it (|W_h (o - o_b)|^2 with W_h the
//    columns of W_o that read query head h), so heads are compared by what they change in the model's residual
//    stream rather than in their own value space.
// Every query counts once (a query at position t < b keeps everything and loses nothing); b = 0 loses
// everything (mass 1, error |o|^2). Probabilities and sums in double precision.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "budget_plan.hpp"
#include "config.hpp"
#include "error.hpp"

namespace kvtrim {

enum class KeepModel { kSinksAndRecent, kTopAttention };
enum class CostMeasure { kLostMass, kOutputError };

struct BudgetCalibration {
  int max_budget = 0;  // curves for b = 0..max_budget (required, >= 1)
  KeepModel keep = KeepModel::kSinksAndRecent;
  int sinks = 4;  // kSinksAndRecent only
  CostMeasure measure = CostMeasure::kOutputError;
};

class BudgetCalibrator {
 public:
  BudgetCalibrator(const CacheConfig& shape, const BudgetCalibration& opt) : cfg_(shape), opt_(opt) {
    CacheConfig c = shape;
    c.head_budgets.clear();
    c.budget = 1;
    c.validate();
    KVTRIM_CHECK(opt.max_budget >= 1 && opt.max_budget <= 1 << 20, "BudgetCalibrator: max_budget must be in 1..1048576, got ",
                 opt.max_budget);
    KVTRIM_CHECK(opt.sinks >= 0, "BudgetCalibrator: sinks must be >= 0, got ", opt.sinks);
    KVTRIM_CHECK(opt.keep == KeepModel::kSinksAndRecent || opt.keep == KeepModel::kTopAttention,
                 "BudgetCalibrator: unknown keep model");
    KVTRIM_CHECK(opt.measure == CostMeasure::kLostMass || opt.measure == CostMeasure::kOutputError,
                 "BudgetCalibrator: unknown cost measure");
    sum_.assign(static_cast<std::size_t>(cfg_.n_layers) * cfg_.n_kv_heads * (opt.max_budget + 1), 0.0);
    queries_.assign(static_cast<std::size_t>(cfg_.n_layers), 0);
    proj_.resize(static_cast<std::size_t>(cfg_.n_layers));
  }

  // The layer's output projection W_o, row-major [out_dim x n_q_heads*head_dim] (y = W_o o): output errors of
  // this layer are then measured in its out_dim-dimensional output space. Set it before add() for the layer.
  void set_output_projection(int layer, std::span<const float> wo, int out_dim) {
    check_layer(layer, "set_output_projection");
    const int d = cfg_.head_dim, nq = cfg_.n_q_heads;
    KVTRIM_CHECK(queries_[static_cast<std::size_t>(layer)] == 0, "BudgetCalibrator::set_output_projection: layer ",
                 layer, " already has samples; set the projection before add()");
    KVTRIM_CHECK(out_dim >= 1 && out_dim <= 1 << 20, "BudgetCalibrator::set_output_projection: out_dim ", out_dim,
                 " out of range 1..1048576");
    const std::size_t cols = static_cast<std::size_t>(nq) * d;
    KVTRIM_CHECK(wo.size() == static_cast<std::size_t>(out_dim) * cols, "BudgetCalibrator::set_output_projection: W_o has ",
                 wo.size(), " floats; expected out_dim * n_q_heads * head_dim = ", static_cast<std::size_t>(out_dim) * cols);
    for (float x : wo)
      KVTRIM_CHECK(std::isfinite(x), "BudgetCalibrator::set_output_projection: W_o has a non-finite entry");
    // |W_h e|^2 = e^T G e with G = W_h^T W_h = U diag(l) U^T; R = diag(sqrt(l)) U^T gives |R e|^2 = |W_h e|^2,
    // so values are mapped once by R and errors stay O(head_dim) per budget.
    auto& heads = proj_[static_cast<std::size_t>(layer)];
    heads.assign(static_cast<std::size_t>(nq), Eigen::MatrixXd());
    for (int qh = 0; qh < nq; ++qh) {
      Eigen::MatrixXd W(out_dim, d);
      for (int r = 0; r < out_dim; ++r)
        for (int c = 0; c < d; ++c) W(r, c) = wo[static_cast<std::size_t>(r) * cols + static_cast<std::size_t>(qh) * d + c];
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(W.transpose() * W);
      const Eigen::VectorXd l = es.eigenvalues().cwiseMax(0.0).cwiseSqrt();
      heads[static_cast<std::size_t>(qh)] = l.asDiagonal() * es.eigenvectors().transpose();
    }
  }

  // One causal sequence of T tokens for one layer (positions 0..T-1): Q [T x n_q_heads*head_dim], K and V
  // [T x n_kv_heads*head_dim], row-major, keys and queries already rotated.
  void add(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V) {
    check_layer(layer, "add");
    const int d = cfg_.head_dim, nq = cfg_.n_q_heads, nkv = cfg_.n_kv_heads, g = cfg_.group_size();
    const std::size_t qw = static_cast<std::size_t>(nq) * d, kw = static_cast<std::size_t>(nkv) * d;
    KVTRIM_CHECK(!Q.empty() && Q.size() % qw == 0, "BudgetCalibrator::add: Q has ", Q.size(),
                 " floats; expected a positive multiple of n_q_heads*head_dim = ", qw);
    const std::size_t T = Q.size() / qw;
    KVTRIM_CHECK(K.size() == T * kw && V.size() == T * kw, "BudgetCalibrator::add: K and V must have T*n_kv_heads*head_dim = ",
                 T * kw, " floats, got ", K.size(), " and ", V.size());
    KVTRIM_CHECK(T <= (1u << 20), "BudgetCalibrator::add: a sequence of ", T, " tokens is too long");
    for (auto s : {Q, K, V})
      for (float x : s) KVTRIM_CHECK(std::isfinite(x), "BudgetCalibrator::add: non-finite input");

    const int B = opt_.max_budget;
    const double scale = 1.0 / std::sqrt(double(d));
    const auto& proj = proj_[static_cast<std::size_t>(layer)];
    const bool error = opt_.measure == CostMeasure::kOutputError;
    std::vector<double> p(static_cast<std::size_t>(g) * T), pbar(T), vals(static_cast<std::size_t>(g) * T * d);
    std::vector<double> cost(static_cast<std::size_t>(B) + 1);
    std::vector<std::size_t> order(T);
    // Per query head of the group: prefix sums of mass and mass-weighted value, over sinks and over recency
    // (or over the top-attention order), and the full output.
    std::vector<double> cm((T + 1) * static_cast<std::size_t>(g)), ca((T + 1) * static_cast<std::size_t>(g) * d);
    std::vector<double> sm((static_cast<std::size_t>(opt_.sinks) + 1) * g),
        sa((static_cast<std::size_t>(opt_.sinks) + 1) * g * d), full(static_cast<std::size_t>(g) * d);

    for (int h = 0; h < nkv; ++h) {
      // Values as each query head of the group sees them (mapped by its R when a projection is set).
      for (int j = 0; j < g; ++j)
        for (std::size_t s = 0; s < T; ++s) {
          const float* v = V.data() + s * kw + static_cast<std::size_t>(h) * d;
          double* out = vals.data() + (static_cast<std::size_t>(j) * T + s) * d;
          if (proj.empty()) {
            for (int c = 0; c < d; ++c) out[c] = v[c];
          } else {
            const Eigen::MatrixXd& R = proj[static_cast<std::size_t>(h * g + j)];
            for (int r = 0; r < d; ++r) {
              double acc = 0;
              for (int c = 0; c < d; ++c) acc += R(r, c) * v[c];
              out[r] = acc;
            }
          }
        }
      double* acc = sum_.data() + (static_cast<std::size_t>(layer) * nkv + h) * (B + 1);
      for (std::size_t t = 0; t < T; ++t) {
        const std::size_t n = t + 1;
        // Exact softmax of every query head of the group over positions 0..t.
        std::fill(pbar.begin(), pbar.begin() + static_cast<std::ptrdiff_t>(n), 0.0);
        for (int j = 0; j < g; ++j) {
          const float* q = Q.data() + t * qw + static_cast<std::size_t>(h * g + j) * d;
          double* pj = p.data() + static_cast<std::size_t>(j) * T;
          double mx = -1e300;
          for (std::size_t s = 0; s < n; ++s) {
            const float* k = K.data() + s * kw + static_cast<std::size_t>(h) * d;
            double dot = 0;
            for (int c = 0; c < d; ++c) dot += double(q[c]) * double(k[c]);
            pj[s] = dot * scale;
            mx = std::max(mx, pj[s]);
          }
          double z = 0;
          for (std::size_t s = 0; s < n; ++s) z += (pj[s] = std::exp(pj[s] - mx));
          for (std::size_t s = 0; s < n; ++s) {
            pj[s] /= z;
            pbar[s] += pj[s] / g;
          }
          double* f = full.data() + static_cast<std::size_t>(j) * d;
          std::fill(f, f + d, 0.0);
          for (std::size_t s = 0; s < n; ++s) {
            const double* v = vals.data() + (static_cast<std::size_t>(j) * T + s) * d;
            for (int c = 0; c < d; ++c) f[c] += pj[s] * v[c];
          }
        }
        // The order in which tokens are kept as b grows: newest first (recency) or by attention.
        if (opt_.keep == KeepModel::kSinksAndRecent) {
          for (std::size_t i = 0; i < n; ++i) order[i] = t - i;
        } else {
          std::iota(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n), std::size_t{0});
          std::sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n), [&](std::size_t a, std::size_t b) {
            return pbar[a] != pbar[b] ? pbar[a] > pbar[b] : a > b;  // ties: the newer is kept first
          });
        }
        prefix(p, vals, order, n, T, g, d, cm, ca);
        const int s_max = opt_.keep == KeepModel::kSinksAndRecent ? std::min<int>(opt_.sinks, static_cast<int>(n)) : 0;
        if (s_max > 0) {
          std::vector<std::size_t> first(static_cast<std::size_t>(s_max));
          std::iota(first.begin(), first.end(), std::size_t{0});
          prefix(p, vals, first, static_cast<std::size_t>(s_max), T, g, d, sm, sa);
        }
        // b = 0 keeps nothing.
        cost[0] = error ? squared_norm_sum(full, g, d) : 1.0;
        const int last = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(B), t));  // b > t keeps all
        for (int b = 1; b <= last; ++b) {
          int se = 0, r = b;  // sinks and recency (or top) counts
          if (opt_.keep == KeepModel::kSinksAndRecent) {
            se = std::min(s_max, b - 1);
            r = b - se;
          }
          double c = 0;
          for (int j = 0; j < g; ++j) {
            const std::size_t mj = static_cast<std::size_t>(j) * (T + 1), msj = static_cast<std::size_t>(j) * (opt_.sinks + 1);
            const double m = cm[mj + r] + (se > 0 ? sm[msj + se] : 0.0);
            if (!error) {
              c += (1.0 - m) / g;
              continue;
            }
            const double* a = ca.data() + (mj + r) * d;
            const double* as = se > 0 ? sa.data() + (msj + se) * d : nullptr;
            const double* f = full.data() + static_cast<std::size_t>(j) * d;
            double e = 0;
            for (int x = 0; x < d; ++x) {
              const double kept = (a[x] + (as ? as[x] : 0.0)) / std::max(m, 1e-300);
              e += (f[x] - kept) * (f[x] - kept);
            }
            c += e;
          }
          cost[static_cast<std::size_t>(b)] = c;
        }
        for (int b = 0; b <= last; ++b) acc[b] += cost[static_cast<std::size_t>(b)];
      }
    }
    queries_[static_cast<std::size_t>(layer)] += static_cast<std::int64_t>(T);
  }

  std::int64_t queries(int layer) const {
    check_layer(layer, "queries");
    return queries_[static_cast<std::size_t>(layer)];
  }

  // Mean cost per query for every (layer, KV head) and budget 0..max_budget; every layer needs samples.
  BudgetCurves curves() const {
    const int B = opt_.max_budget;
    BudgetCurves c(cfg_.n_layers, cfg_.n_kv_heads, B);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      const std::int64_t n = queries_[static_cast<std::size_t>(l)];
      KVTRIM_CHECK(n > 0, "BudgetCalibrator::curves: layer ", l, " has no samples (call add() for every layer)");
      for (int h = 0; h < cfg_.n_kv_heads; ++h)
        for (int b = 0; b <= B; ++b)
          c.at(l, h, b) = sum_[(static_cast<std::size_t>(l) * cfg_.n_kv_heads + h) * (B + 1) + b] / double(n);
    }
    return c;
  }

 private:
  void check_layer(int layer, const char* fn) const {
    KVTRIM_CHECK(layer >= 0 && layer < cfg_.n_layers, "BudgetCalibrator::", fn, ": layer ", layer, " out of range 0..",
                 cfg_.n_layers - 1);
  }

  // Prefix sums over positions taken in `order` (the first n): mass cm[j][i] and mass-weighted values ca[j][i].
  static void prefix(const std::vector<double>& p, const std::vector<double>& vals, const std::vector<std::size_t>& order,
                     std::size_t n, std::size_t T, int g, int d, std::vector<double>& cm, std::vector<double>& ca) {
    const std::size_t stride = cm.size() / static_cast<std::size_t>(g);  // entries per query head
    for (int j = 0; j < g; ++j) {
      double* m = cm.data() + static_cast<std::size_t>(j) * stride;
      double* a = ca.data() + static_cast<std::size_t>(j) * stride * d;
      m[0] = 0;
      std::fill(a, a + d, 0.0);
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t s = order[i];
        const double w = p[static_cast<std::size_t>(j) * T + s];
        const double* v = vals.data() + (static_cast<std::size_t>(j) * T + s) * d;
        m[i + 1] = m[i] + w;
        for (int x = 0; x < d; ++x) a[(i + 1) * d + x] = a[i * d + x] + w * v[x];
      }
    }
  }
  static double squared_norm_sum(const std::vector<double>& full, int g, int d) {
    double s = 0;
    for (std::size_t i = 0; i < static_cast<std::size_t>(g) * d; ++i) s += full[i] * full[i];
    return s;
  }

  CacheConfig cfg_;
  BudgetCalibration opt_;
  std::vector<double> sum_;
  std::vector<std::int64_t> queries_;
  std::vector<std::vector<Eigen::MatrixXd>> proj_;  // per layer, per query head: R (empty: identity)
};

}  // namespace kvtrim
