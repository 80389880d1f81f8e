// kvtrim: the CPU backend.
//
// Storage is one HeadStore per (layer, KV head) plus the policy's State and decode limit for it. A decode step
// of one head: the new token joins (on_insert with its SimHash codes when the policy asks), [eviction if the
// policy evicts before attention], attention (cpu_attention.hpp: every kept key and value read once for the
// whole GQA group, fp32, max-subtracted softmax; the probabilities stay in a scratch buffer), on_attention
// for every slot, [eviction after attention]. Eviction is the library's rule over the policy's scores
// (cpu_selection.hpp), the same the CUDA backend runs. Prefill computes exact causal attention in blocks of
// query rows (Eigen) with the column sums the policy asked for, then the policy's prompt selection.
//
// Threads: CacheConfig::threads > 1 runs the KV heads of a call on a small pool of persistent threads. Heads
// are independent (per-head state, per-thread scratch), so the results are identical to one thread.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <vector>

#include "config.hpp"
#include "cpu_attention.hpp"
#include "cpu_selection.hpp"
#include "error.hpp"
#include "head_pool.hpp"
#include "head_store.hpp"
#include "policy.hpp"
#include "simhash.hpp"

namespace kvtrim {

struct CpuBackend {
  static constexpr const char* kName = "cpu";

  template <class P>
  class Impl;
};

template <class P>
class CpuBackend::Impl {
 public:
  using Meta = typename P::SlotMeta;
  using State = typename P::State;
  using Head = HeadStore<Meta>;

  // A policy that stores keys/values in a smaller space (low-rank storage) defines key_width(kv_head),
  // value_width(kv_head), project_key/value(kv_head, in, out), project_queries(kv_head, group, in, out) and
  // unproject_outputs(kv_head, group, in, out). Queries are projected before the rules see them, so every rule
  // works in the stored space. Without these members the storage is head_dim wide.
  static constexpr bool kProjects = requires(const P& p, const float* in, float* out) {
    { p.key_width(0) } -> std::convertible_to<int>;
    { p.value_width(0) } -> std::convertible_to<int>;
    p.project_key(0, in, out);
    p.project_value(0, in, out);
    p.project_queries(0, 1, in, out);
    p.unproject_outputs(0, 1, in, out);
  };
  static constexpr bool kAttention = has(P::kSignals, Signals::kAttention);
  static constexpr bool kHash = rules::simhash<P>();
  static constexpr bool kMerges = rules::merges<P>();
  static constexpr bool kStructured = rules::structured<P>();
  static constexpr bool kHostPrompt = rules::host_prompt<P>();

  Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg) {
    const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
    policies_.reserve(static_cast<std::size_t>(L));
    int max_budget = 0;
    for (int l = 0; l < L; ++l) {
      LayerContext ctx{l, L, H, g, d, {}};
      for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
      policies_.emplace_back(params, ctx);
      const P& pol = policies_.back();
      for (int h = 0; h < H; ++h) {
        const int budget = cfg.budget_of(l, h);
        heads_.emplace_back(key_width(pol, h), value_width(pol, h), budget);
        const int limit = rules::keep_limit(pol, budget), plimit = rules::prompt_limit(pol, budget);
        KVTRIM_CHECK(limit >= 1 && limit <= budget && plimit >= 1 && plimit <= budget, P::kName, " keeps ", limit,
                     " tokens after a decode step and ", plimit, " after a prompt in layer ", l, " KV head ", h,
                     "; expected 1..budget (", budget, ")");
        initial_.push_back(pol.initial(h, budget));
        initial_limits_.push_back(limit);
        max_budget = std::max(max_budget, budget);
      }
      if constexpr (kHash) projections_.push_back(pol.projection(d));
    }
    states_ = initial_;
    limits_ = initial_limits_;
    if constexpr (kMerges) {
      norms_.resize(heads_.size());
      for (std::size_t i = 0; i < heads_.size(); ++i) norms_[i].resize(static_cast<std::size_t>(heads_[i].capacity()));
    }
    // A pool only when there is more than one head to share out; threads beyond the heads would idle.
    const int threads = std::min(cfg.threads, H);
    scratch_.resize(static_cast<std::size_t>(threads));
    for (auto& s : scratch_) {
      s.probs.resize(static_cast<std::size_t>(g) * (max_budget + 1));
      s.select.reserve(max_budget + 1);
      if constexpr (kProjects) {
        s.q_low.resize(static_cast<std::size_t>(g) * d);
        s.kv_low.resize(2 * static_cast<std::size_t>(d));
        s.o_low.resize(static_cast<std::size_t>(g) * d);
      }
      if constexpr (kHash) s.q_codes.resize(static_cast<std::size_t>(g));
    }
    errors_.resize(static_cast<std::size_t>(H));
    if (threads > 1) pool_ = std::make_unique<detail::HeadPool>(threads);
  }
  // Copies get their own worker threads (a pool is never shared).
  Impl(const Impl& o)
      : cfg_(o.cfg_), policies_(o.policies_), heads_(o.heads_), initial_(o.initial_), states_(o.states_),
        initial_limits_(o.initial_limits_), limits_(o.limits_), projections_(o.projections_), norms_(o.norms_),
        scratch_(o.scratch_), errors_(o.errors_.size()),
        pool_(o.pool_ ? std::make_unique<detail::HeadPool>(o.pool_->threads()) : nullptr) {}
  Impl& operator=(const Impl& o) {
    if (this != &o) {
      Impl copy(o);
      *this = std::move(copy);
    }
    return *this;
  }
  Impl(Impl&&) noexcept = default;
  Impl& operator=(Impl&&) noexcept = default;

  Head& head(int layer, int kv) { return heads_[index(layer, kv)]; }
  const Head& head(int layer, int kv) const { return heads_[index(layer, kv)]; }
  State& state(int layer, int kv) { return states_[index(layer, kv)]; }
  const State& state(int layer, int kv) const { return states_[index(layer, kv)]; }
  // Tokens the head keeps after a decode step (the policy's keep_limit, or what its prompt stage set).
  int limit(int layer, int kv) const { return limits_[index(layer, kv)]; }
  P& policy(int layer) { return policies_[static_cast<std::size_t>(layer)]; }
  const P& policy(int layer) const { return policies_[static_cast<std::size_t>(layer)]; }
  // Threads that serve a call (1 = the caller only).
  int threads() const { return pool_ ? pool_->threads() : 1; }

  void reset() {
    for (auto& h : heads_) {
      h.clear();
      h.shrink_to_budget();
    }
    states_ = initial_;
    limits_ = initial_limits_;
  }

  // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d].
  void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
    run_heads([&](int kv, Scratch& s) { decode_head(layer, kv, q, k, v, out, pos, s); });
  }

  // Q: [T x n_q_heads*d], K, V: [T x n_kv_heads*d], out: [T x n_q_heads*d], all row-major; positions start at
  // `first_pos` (0 for a fresh cache).
  void prefill(int layer, const float* Q, const float* K, const float* V, float* out, int T, std::int64_t first_pos) {
    const int workers = pool_ ? pool_->threads() : 1;
    std::vector<PrefillScratch> work(static_cast<std::size_t>(workers));
    run_heads([&](int kv, Scratch& s) {
      const auto worker = static_cast<std::size_t>(&s - scratch_.data());
      prefill_head(layer, kv, Q, K, V, out, T, first_pos, work[worker], s);
    });
  }

 private:
  struct Scratch {  // one per thread
    std::vector<float> probs;                 // [group x (max budget + 1)] attention probabilities
    std::vector<float> q_low, kv_low, o_low;  // projected q, k|v and output (low-rank storage only)
    std::vector<std::uint64_t> q_codes;       // the step's query codes (SimHash policies)
    cpu::SelectScratch<Meta> select;
  };
  struct PrefillScratch {  // one per thread: one head's prompt in the stored space, the score block, the sums
    RowMajorMatrixXf S, Kh, Vh, Qg, Oh;
    std::vector<float> col, win, vote;
  };

  // f(kv, scratch) for every KV head, on the pool when there is one; the first error is rethrown.
  template <class F>
  void run_heads(F&& f) {
    const int H = cfg_.n_kv_heads;
    if (!pool_) {
      for (int kv = 0; kv < H; ++kv) f(kv, scratch_[0]);
      return;
    }
    auto task = [&](int kv, int worker) {
      try {
        f(kv, scratch_[static_cast<std::size_t>(worker)]);
      } catch (...) {
        errors_[static_cast<std::size_t>(kv)] = std::current_exception();
      }
    };
    pool_->run(H, task);
    for (auto& e : errors_)
      if (e) {
        std::exception_ptr first = e;
        for (auto& x : errors_) x = nullptr;
        std::rethrow_exception(first);
      }
  }

  // What on_insert sees of a token whose stored key is `key`; `queries` (the group's, stored width) are coded
  // when given.
  TokenInputs token_inputs(int layer, const float* key, int dk, const float* queries, bool prefill, Scratch& s) const {
    TokenInputs in{key, dk, cfg_.group_size(), prefill};
    if constexpr (kHash) {
      const SimHashProjection& pr = projections_[static_cast<std::size_t>(layer)];
      std::uint64_t* qc = s.q_codes.data();
      const int g = cfg_.group_size();
      cpu::dispatch([&]() KVTRIM_INLINE_LAMBDA {
        in.key_code = pr.code_by_columns(key);
        if (queries != nullptr)
          for (int j = 0; j < g; ++j) qc[j] = pr.code_by_columns(queries + static_cast<std::size_t>(j) * dk);
      });
      if (queries != nullptr) in.q_codes = qc;
    }
    return in;
  }

  // The new token joins slot n; merging policies keep its key norm beside it.
  void insert(std::size_t i, const float* k, const float* v, std::int64_t pos, const TokenInputs& in) {
    Head& h = heads_[i];
    const int slot = h.append(k, v, pos);
    P::on_insert(states_[i], h.meta(slot), pos, in);
    if constexpr (kMerges) norms_[i][static_cast<std::size_t>(slot)] = h.key(slot).norm();
  }

  // Brings head (layer, kv) down to its decode limit with the policy's kind of eviction.
  void evict(int layer, int kv, Scratch& s) {
    const std::size_t i = index(layer, kv);
    Head& h = heads_[i];
    if constexpr (kStructured)
      cpu::fit<P>(h, states_[i], s.select);
    else if constexpr (kMerges)
      cpu::merge_evict_to_limit<P>(h, states_[i], limits_[i], norms_[i], s.select, layer, kv);
    else
      cpu::evict_to_limit<P>(h, states_[i], limits_[i], layer, kv, s.select);
  }

  void decode_head(int layer, int kv, const float* q, const float* k, const float* v, float* out, std::int64_t pos,
                   Scratch& s) {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    const std::size_t i = index(layer, kv);
    P& pol = policy(layer);
    Head& h = heads_[i];
    const float* qg = q + static_cast<std::size_t>(kv) * g * d;
    const float* kh = k + static_cast<std::size_t>(kv) * d;
    const float* vh = v + static_cast<std::size_t>(kv) * d;
    float* oh = out + static_cast<std::size_t>(kv) * g * d;
    if constexpr (kProjects) {  // everything below happens in the stored (projected) space
      pol.project_queries(kv, g, qg, s.q_low.data());
      pol.project_key(kv, kh, s.kv_low.data());
      pol.project_value(kv, vh, s.kv_low.data() + d);
      qg = s.q_low.data();
      kh = s.kv_low.data();
      vh = s.kv_low.data() + d;
    }
    insert(i, kh, vh, pos, token_inputs(layer, kh, h.key_dim(), qg, false, s));
    if constexpr (P::kTiming == EvictTiming::kBeforeAttention) evict(layer, kv, s);
    const int n = h.size();
    float* o = kProjects ? s.o_low.data() : oh;
    detail::attend(h.key_ptr(0), h.value_ptr(0), n, h.key_dim(), h.value_dim(), qg, g,
                   1.0f / std::sqrt(static_cast<float>(d)), s.probs.data(), o);
    if constexpr (kProjects) pol.unproject_outputs(kv, g, s.o_low.data(), oh);
    if constexpr (kAttention) cpu::observe<P>(h.meta_data(), n, states_[i], s.probs.data(), g, s.select);
    if constexpr (P::kTiming == EvictTiming::kAfterAttention) evict(layer, kv, s);
    KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer, " KV head ", kv,
                 " over its budget of ", h.budget());
  }

  void prefill_head(int layer, int kv, const float* Q, const float* K, const float* V, float* out, int T,
                    std::int64_t first_pos, PrefillScratch& w, Scratch& s) {
    const int g = cfg_.group_size();
    const std::size_t i = index(layer, kv);
    P& pol = policy(layer);
    const int window = std::clamp(rules::prompt_window(pol), 0, T);
    const int vote = std::clamp(rules::vote_window(pol), 0, T);
    load_prompt(pol, kv, Q, K, V, T, w);
    prompt_attention(pol, kv, T, window, vote, w, out);
    Head& h = heads_[i];
    h.reserve(T + 1);
    if constexpr (kMerges) norms_[i].resize(static_cast<std::size_t>(h.capacity()));
    for (int t = 0; t < T; ++t)
      insert(i, w.Kh.row(t).data(), w.Vh.row(t).data(), first_pos + t,
             token_inputs(layer, w.Kh.row(t).data(), h.key_dim(), t == T - 1 ? w.Qg.row(t).data() : nullptr, true, s));
    const auto rows = [&](const std::vector<float>& x) {
      return AttentionRows{x.empty() ? nullptr : x.data(), T, g, T};
    };
    const PromptSums sums{rows(w.col), rows(w.win), rows(w.vote)};
    if constexpr (kHostPrompt) {
      limits_[i] = pol.host_prompt(states_[i], h, sums);
      if constexpr (kMerges)
        for (int j = 0; j < h.size(); ++j) norms_[i][static_cast<std::size_t>(j)] = h.key(j).norm();
    } else if constexpr (kStructured) {
      cpu::score_prompt<P>(h, states_[i], sums, s.select);
      cpu::fit<P>(h, states_[i], s.select);
    } else {
      cpu::score_prompt<P>(h, states_[i], sums, s.select);
      cpu::keep_prompt<P>(h, rules::prompt_limit(pol, h.budget()), s.select);
    }
    KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " prompt tokens in layer ", layer, " KV head ",
                 kv, " over its budget of ", h.budget());
    h.shrink_to_budget();
    if constexpr (kMerges) norms_[i].resize(static_cast<std::size_t>(h.capacity()));
  }

  // The prompt rows of KV head kv in the stored (maybe projected) space, contiguous.
  void load_prompt(const P& pol, int kv, const float* Q, const float* K, const float* V, int T,
                   PrefillScratch& s) const {
    const int H = cfg_.n_kv_heads, d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
    const int dk = key_width(pol, kv), dv = value_width(pol, kv);
    Strided Kin(K + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
    Strided Vin(V + static_cast<std::size_t>(kv) * d, T, d, Eigen::OuterStride<>(H * d));
    Strided Qin(Q + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                Eigen::OuterStride<>(Hq * d));
    s.Kh.resize(T, dk);
    s.Vh.resize(T, dv);
    s.Qg.resize(T, static_cast<Eigen::Index>(g) * dk);
    if constexpr (kProjects) {
      for (int t = 0; t < T; ++t) {
        pol.project_key(kv, Kin.row(t).data(), s.Kh.row(t).data());
        pol.project_value(kv, Vin.row(t).data(), s.Vh.row(t).data());
        pol.project_queries(kv, g, Qin.row(t).data(), s.Qg.row(t).data());
      }
    } else {
      s.Kh = Kin;
      s.Vh = Vin;
      s.Qg = Qin;
    }
  }

  // Exact causal attention of one head's prompt (rows already in s): writes the head's output columns of out
  // and the sums the policy asked for: col (kAttention), win (its prompt_window) and vote (its vote_window),
  // each [g x T].
  void prompt_attention(const P& pol, int kv, int T, int window, int vote, PrefillScratch& s, float* out) const {
    const int d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
    const int dk = static_cast<int>(s.Kh.cols()), dv = static_cast<int>(s.Vh.cols());
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    constexpr int kBlock = 128;
    const std::size_t sums = static_cast<std::size_t>(g) * T;
    s.col.assign(kAttention ? sums : 0, 0.0f);
    s.win.assign(kAttention && window > 0 ? sums : 0, 0.0f);
    s.vote.assign(vote > 0 ? sums : 0, 0.0f);
    s.Oh.resize(T, static_cast<Eigen::Index>(g) * dv);
    auto add_row = [&](std::vector<float>& dst, int gi, int r, int t) {
      float* c = dst.data() + static_cast<std::size_t>(gi) * T;
      for (int j = 0; j <= t; ++j) c[j] += s.S(r, j);
    };
    for (int gi = 0; gi < g; ++gi) {
      const auto Qh = s.Qg.middleCols(static_cast<Eigen::Index>(gi) * dk, dk);
      for (int t0 = 0; t0 < T; t0 += kBlock) {
        const int b = std::min(kBlock, T - t0), width = t0 + b;  // rows t0..t0+b-1 see keys 0..t
        s.S.resize(b, width);
        s.S.noalias() = (Qh.middleRows(t0, b) * s.Kh.topRows(width).transpose()) * scale;
        for (int r = 0; r < b; ++r) {
          const int t = t0 + r;
          detail::softmax_inplace(s.S.row(r).data(), t + 1);
          s.S.row(r).tail(width - t - 1).setZero();
          if (!s.col.empty()) add_row(s.col, gi, r, t);
          if (!s.win.empty() && t >= T - window) add_row(s.win, gi, r, t);
          if (!s.vote.empty() && t >= T - vote) add_row(s.vote, gi, r, t);
        }
        s.Oh.block(t0, static_cast<Eigen::Index>(gi) * dv, b, dv).noalias() = s.S * s.Vh.topRows(width);
      }
    }
    StridedOut Oout(out + static_cast<std::size_t>(kv) * g * d, T, static_cast<Eigen::Index>(g) * d,
                    Eigen::OuterStride<>(Hq * d));
    if constexpr (kProjects) {
      for (int t = 0; t < T; ++t) pol.unproject_outputs(kv, g, s.Oh.row(t).data(), Oout.row(t).data());
    } else {
      Oout = s.Oh;
    }
  }

  using Strided = Eigen::Map<const RowMajorMatrixXf, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<RowMajorMatrixXf, 0, Eigen::OuterStride<>>;

  int key_width(const P& p, int kv) const {
    if constexpr (kProjects) return p.key_width(kv);
    return cfg_.head_dim;
  }
  int value_width(const P& p, int kv) const {
    if constexpr (kProjects) return p.value_width(kv);
    return cfg_.head_dim;
  }
  std::size_t index(int layer, int kv) const { return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv; }

  CacheConfig cfg_;
  std::vector<P> policies_;
  std::vector<Head> heads_;
  std::vector<State> initial_, states_;  // per head: an empty head's state, and the current one
  std::vector<int> initial_limits_, limits_;
  std::vector<SimHashProjection> projections_;  // per layer (SimHash policies)
  std::vector<std::vector<float>> norms_;       // per head, per slot key norms (merging policies)
  std::vector<Scratch> scratch_;                // one per thread
  std::vector<std::exception_ptr> errors_;      // per KV head, from worker threads
  std::unique_ptr<detail::HeadPool> pool_;      // null with one thread
};

}  // namespace kvtrim
