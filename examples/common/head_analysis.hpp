// Per-(layer, KV head) attention statistics on calibration text, from the exact attention of whole windows:
// where each head looks (attention on BOS, mean distance, the window holding 90% of the rest, entropy), the
// L2-norm paper's diagnostic (rank correlation between a key's norm and the attention it gets, and the
// attention mass each keep rule captures at one budget), and an upper bound for a shared slot pool per layer
// (the best per-step split of a layer's slots between its heads, against the best fixed split).
//
// GQA: attention is the mean over the query heads of a KV head's group (what the policies score with), except
// the entropy, which is per query head, then averaged. Queries from position `from` on, every `stride`-th, are
// used for the norm diagnostic and the pool bound (the other statistics use every query).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace examples {

struct HeadStats {
  double queries = 0;
  double bos_mass = 0;        // attention on position 0 (BOS)
  double mean_distance = 0;   // sum_j p_j (t - j), BOS excluded and renormalised
  double entropy = 0;         // nats, per query head
  std::vector<double> by_distance;  // attention mass by distance t - j (BOS excluded)
  // Norm diagnostic (sampled queries).
  double sampled = 0;
  double norm_rank_corr = 0;  // Spearman(|k_j|, p_j) over j <= t, mean over queries
  double bos_norm_rank = 0;   // rank of |k_0| among the window's keys so far, 0 = lowest norm, 1 = highest
  double mass_top = 0;        // mass captured by the `probe` most-attended keys (oracle)
  double mass_recent = 0;     // ... by BOS + the probe - 1 newest (`streaming` with 1 sink)
  double mass_low_norm = 0;   // ... by the probe lowest-norm keys (L2, nothing protected)
  double mass_l2_protected = 0;  // ... by 4 sinks + 10 newest + the lowest-norm others (L2 + Cold-Compress)

  // Smallest distance window (newest first, BOS aside) holding `share` of the non-BOS attention.
  int distance_for(double share) const {
    const double total = std::accumulate(by_distance.begin(), by_distance.end(), 0.0);
    double acc = 0;
    for (std::size_t r = 0; r < by_distance.size(); ++r)
      if ((acc += by_distance[r]) >= share * total) return static_cast<int>(r) + 1;
    return static_cast<int>(by_distance.size());
  }
};

// Attention mass lost per query and head (mean over the layer's heads) for one layer and one mean budget per
// head, under three ways of
// splitting the layer's n_kv_heads * budget slots (keep model: 4 sinks + the newest; at least 5 per head).
// Over the sampled queries at positions >= budget (before that nothing is evicted).
struct PoolBound {
  int layer = 0, budget = 0;
  double queries = 0;
  double uniform = 0;  // every head the same budget
  double fixed = 0;    // the best fixed split for these queries
  double oracle = 0;   // the best split for every query separately: what a dynamic pool could reach at most
  std::vector<double> sum;  // per head and budget: summed lost mass (for `fixed`)
};

// min over b_0 + ... + b_{H-1} = total, b_h >= lo, of sum_h cost[h][b_h] (exact dynamic programme).
inline double best_split(const std::vector<std::vector<double>>& cost, int total, int lo) {
  const double inf = 1e300;
  std::vector<double> f(static_cast<std::size_t>(total) + 1, inf), next(f.size());
  f[0] = 0;
  for (const auto& c : cost) {
    std::fill(next.begin(), next.end(), inf);
    const int hi = static_cast<int>(c.size()) - 1;
    for (int used = 0; used <= total; ++used) {
      if (f[static_cast<std::size_t>(used)] >= inf) continue;
      for (int b = lo; b <= hi && used + b <= total; ++b)
        next[static_cast<std::size_t>(used + b)] = std::min(next[static_cast<std::size_t>(used + b)],
                                                            f[static_cast<std::size_t>(used)] + c[static_cast<std::size_t>(b)]);
    }
    f.swap(next);
  }
  return f[static_cast<std::size_t>(total)];
}

class HeadAnalysis {
 public:
  HeadAnalysis(int n_layers, int n_kv_heads, int group, int head_dim, int max_len, std::vector<int> pool_budgets,
               int probe = 32, int from = 64, int stride = 16)
      : L_(n_layers), H_(n_kv_heads), g_(group), d_(head_dim), max_(max_len), probe_(probe), from_(from),
        stride_(stride), pool_budgets_(std::move(pool_budgets)) {
    stats_.resize(static_cast<std::size_t>(L_) * H_);
    for (auto& s : stats_) s.by_distance.assign(static_cast<std::size_t>(max_), 0.0);
    for (int l = 0; l < L_; ++l)
      for (int b : pool_budgets_)
        pools_.push_back({l, b, 0, 0, 0, 0, std::vector<double>(static_cast<std::size_t>(H_) * (max_ + 1), 0.0)});
  }

  // One window for one layer: Q [T x n_q*d], K [T x n_kv*d] as the cache receives them (rotated).
  void add(int layer, std::span<const float> Q, std::span<const float> K) {
    const std::size_t qw = static_cast<std::size_t>(H_) * g_ * d_, kw = static_cast<std::size_t>(H_) * d_;
    const int T = static_cast<int>(Q.size() / qw);
    const double scale = 1.0 / std::sqrt(double(d_));
    std::vector<double> p(static_cast<std::size_t>(T)), pbar(static_cast<std::size_t>(T)), norm(static_cast<std::size_t>(T));
    // Per query (sampled) and head: lost mass of sinks + newest at every budget, for the pool bound.
    std::vector<std::vector<double>> lost(static_cast<std::size_t>(H_));
    for (int t = 0; t < T; ++t) {
      const bool sampled = t >= from_ && (t - from_) % stride_ == 0;
      for (int h = 0; h < H_; ++h) {
        HeadStats& st = stats_[static_cast<std::size_t>(layer) * H_ + h];
        std::fill(pbar.begin(), pbar.begin() + t + 1, 0.0);
        for (int j = 0; j < g_; ++j) {
          const float* q = Q.data() + static_cast<std::size_t>(t) * qw + static_cast<std::size_t>(h * g_ + j) * d_;
          double mx = -1e300;
          for (int s = 0; s <= t; ++s) {
            const float* k = K.data() + static_cast<std::size_t>(s) * kw + static_cast<std::size_t>(h) * d_;
            double dot = 0;
            for (int x = 0; x < d_; ++x) dot += double(q[x]) * double(k[x]);
            mx = std::max(mx, p[s] = dot * scale);
          }
          double z = 0, ent = 0;
          for (int s = 0; s <= t; ++s) z += (p[s] = std::exp(p[s] - mx));
          for (int s = 0; s <= t; ++s) {
            p[s] /= z;
            pbar[s] += p[s] / g_;
            if (p[s] > 0) ent -= p[s] * std::log(p[s]);
          }
          st.entropy += ent / g_;
        }
        st.queries += 1;
        st.bos_mass += pbar[0];
        double rest = 0, dist = 0;
        for (int s = 1; s <= t; ++s) {
          rest += pbar[s];
          dist += pbar[s] * (t - s);
          st.by_distance[static_cast<std::size_t>(t - s)] += pbar[s];
        }
        if (rest > 0) st.mean_distance += dist / rest;
        // Lost mass of 4 sinks + the newest at every budget (sampled queries; a budget beyond t loses nothing).
        if (sampled) {
          std::vector<double>& lh = lost[static_cast<std::size_t>(h)];
          lh.assign(static_cast<std::size_t>(max_) + 1, 0.0);
          lh[0] = 1.0;
          const int sinks = std::min(4, t + 1);
          double recent = 0, sink_mass = 0;
          int r_done = 0, s_done = 0;
          for (int b = 1; b <= std::min(max_, t); ++b) {
            const int se = std::min(sinks, b - 1), r = b - se;
            while (r_done < r) recent += pbar[static_cast<std::size_t>(t - r_done++)];
            while (s_done < se) sink_mass += pbar[static_cast<std::size_t>(s_done++)];
            lh[static_cast<std::size_t>(b)] = std::max(0.0, 1.0 - recent - sink_mass);
          }
        }
        if (sampled) norm_diagnostic(st, K, layer, h, t, pbar, norm);
      }
      if (sampled) pool_step(layer, t, lost);
    }
  }

  const HeadStats& stats(int layer, int kv_head) const { return stats_[static_cast<std::size_t>(layer) * H_ + kv_head]; }

  // The pool bounds (call once all windows are added).
  std::vector<PoolBound> pool_bounds() const {
    std::vector<PoolBound> out = pools_;
    for (PoolBound& pb : out) {
      if (pb.queries == 0) continue;
      std::vector<std::vector<double>> mean(static_cast<std::size_t>(H_));
      for (int h = 0; h < H_; ++h)
        for (int b = 0; b <= max_; ++b)
          mean[static_cast<std::size_t>(h)].push_back(pb.sum[static_cast<std::size_t>(h) * (max_ + 1) + b] / pb.queries);
      pb.fixed = best_split(mean, H_ * pb.budget, kMinPerHead) / H_;
      pb.uniform = 0;
      for (int h = 0; h < H_; ++h) pb.uniform += mean[static_cast<std::size_t>(h)][static_cast<std::size_t>(pb.budget)] / H_;
      pb.oracle /= pb.queries * H_;
    }
    return out;
  }

 private:
  void norm_diagnostic(HeadStats& st, std::span<const float> K, int layer, int h, int t, const std::vector<double>& pbar,
                       std::vector<double>& norm) {
    (void)layer;
    const std::size_t kw = static_cast<std::size_t>(H_) * d_;
    const int n = t + 1;
    for (int s = 0; s < n; ++s) {
      const float* k = K.data() + static_cast<std::size_t>(s) * kw + static_cast<std::size_t>(h) * d_;
      double x = 0;
      for (int i = 0; i < d_; ++i) x += double(k[i]) * double(k[i]);
      norm[static_cast<std::size_t>(s)] = std::sqrt(x);
    }
    const std::vector<double> rn = ranks(norm, n), rp = ranks(pbar, n);
    double mean = (n - 1) / 2.0, sxy = 0, sxx = 0, syy = 0;
    for (int s = 0; s < n; ++s) {
      const double a = rn[static_cast<std::size_t>(s)] - mean, b = rp[static_cast<std::size_t>(s)] - mean;
      sxy += a * b, sxx += a * a, syy += b * b;
    }
    st.sampled += 1;
    st.norm_rank_corr += sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : 0.0;
    st.bos_norm_rank += n > 1 ? rn[0] / (n - 1) : 0.0;
    const int b = std::min(probe_, n);
    std::vector<int> idx(static_cast<std::size_t>(n));
    // Oracle: the b largest attention weights.
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + b, idx.end(), [&](int x, int y) { return pbar[x] > pbar[y]; });
    for (int i = 0; i < b; ++i) st.mass_top += pbar[static_cast<std::size_t>(idx[i])];
    // BOS + the newest b - 1.
    st.mass_recent += pbar[0];
    for (int s = std::max(1, n - (b - 1)); s < n; ++s) st.mass_recent += pbar[static_cast<std::size_t>(s)];
    // The b lowest norms (ties: the newer stays, as the policy's prompt rule).
    std::iota(idx.begin(), idx.end(), 0);
    auto by_norm = [&](int x, int y) { return norm[x] != norm[y] ? norm[x] < norm[y] : x > y; };
    std::partial_sort(idx.begin(), idx.begin() + b, idx.end(), by_norm);
    for (int i = 0; i < b; ++i) st.mass_low_norm += pbar[static_cast<std::size_t>(idx[i])];
    // 4 sinks + 10 newest protected, the rest of the b by lowest norm.
    std::vector<char> kept(static_cast<std::size_t>(n), 0);
    int count = 0;
    for (int s = 0; s < n && count < b; ++s)
      if (s < 4 || s >= n - 10) kept[static_cast<std::size_t>(s)] = 1, ++count;
    std::sort(idx.begin(), idx.end(), by_norm);
    for (int i = 0; i < n && count < b; ++i)
      if (!kept[static_cast<std::size_t>(idx[i])]) kept[static_cast<std::size_t>(idx[i])] = 1, ++count;
    for (int s = 0; s < n; ++s) st.mass_l2_protected += kept[static_cast<std::size_t>(s)] ? pbar[static_cast<std::size_t>(s)] : 0;
  }

  // Average ranks (ties share their mean rank) of the first n values.
  static std::vector<double> ranks(const std::vector<double>& v, int n) {
    std::vector<int> idx(static_cast<std::size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] < v[b]; });
    std::vector<double> r(static_cast<std::size_t>(n));
    for (int i = 0; i < n;) {
      int j = i;
      while (j + 1 < n && v[idx[j + 1]] == v[idx[i]]) ++j;
      for (int k = i; k <= j; ++k) r[static_cast<std::size_t>(idx[k])] = (i + j) / 2.0;
      i = j + 1;
    }
    return r;
  }

  // The best split of the layer's slots for this one query.
  void pool_step(int layer, int t, const std::vector<std::vector<double>>& lost) {
    for (PoolBound& pb : pools_) {
      if (pb.layer != layer || t < pb.budget) continue;
      const int total = H_ * pb.budget;
      std::vector<std::vector<double>> c(static_cast<std::size_t>(H_));
      for (int h = 0; h < H_; ++h) {
        const auto& lh = lost[static_cast<std::size_t>(h)];
        c[static_cast<std::size_t>(h)].assign(lh.begin(), lh.begin() + std::min(total, max_) + 1);
        for (int b = 0; b <= max_; ++b) pb.sum[static_cast<std::size_t>(h) * (max_ + 1) + b] += lh[static_cast<std::size_t>(b)];
      }
      pb.oracle += best_split(c, total, kMinPerHead);
      pb.queries += 1;
    }
  }

  static constexpr int kMinPerHead = 5;  // 4 sinks + 1, as the `streaming` plans
  int L_, H_, g_, d_, max_, probe_, from_, stride_;
  std::vector<int> pool_budgets_;
  std::vector<HeadStats> stats_;
  std::vector<PoolBound> pools_;
};

}  // namespace examples
