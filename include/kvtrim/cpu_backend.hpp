// kvtrim: the CPU backend.
//
// Storage is one HeadStore per (layer, KV head). Decode attention reads each kept key and value once for
// the whole query group (GQA), accumulates in fp32 with a max-subtracted softmax, and writes the
// probabilities into a scratch buffer that policies read: no second pass over K or V, no allocation.
// Prefill computes exact causal attention in blocks of query rows (Eigen) and sums the probability
// columns that score-based policies need.
//
// Decode kernels: cpu_attention.hpp.
//
// Threads: CacheConfig::threads > 1 runs the KV heads of a decode step (and the attention part of a
// prefill) on a small pool of persistent threads. Heads are independent (per-head state lives in HeadState
// and HeadStore, scratch buffers are per thread), so the results are identical to one thread.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "config.hpp"
#include "cpu_attention.hpp"
#include "error.hpp"
#include "head_pool.hpp"
#include "head_store.hpp"
#include "policy.hpp"

namespace kvtrim {

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
      // A pool only when there is more than one head to share out; threads beyond the heads would idle.
      const int threads = std::min(cfg.threads, H);
      scratch_.resize(static_cast<std::size_t>(threads));
      for (auto& s : scratch_) {
        s.probs.resize(static_cast<std::size_t>(g) * (max_budget + 1));
        if constexpr (kProjects) {
          s.q_low.resize(static_cast<std::size_t>(g) * d);
          s.kv_low.resize(2 * static_cast<std::size_t>(d));
          s.o_low.resize(static_cast<std::size_t>(g) * d);
        }
      }
      errors_.resize(static_cast<std::size_t>(H));
      if (threads > 1) pool_ = std::make_unique<detail::HeadPool>(threads);
    }
    // Copies get their own worker threads (a pool is never shared).
    Impl(const Impl& o)
        : cfg_(o.cfg_), policies_(o.policies_), heads_(o.heads_), states_(o.states_), scratch_(o.scratch_),
          errors_(o.errors_.size()),
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
    // Threads that serve a call (1 = the caller only).
    int threads() const { return pool_ ? pool_->threads() : 1; }

    void reset() {
      for (auto& h : heads_) {
        h.clear();
        h.shrink_to_budget();
      }
      for (auto& s : states_) s = State{};
    }

    // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d].
    void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
      const int H = cfg_.n_kv_heads;
      if (!pool_) {
        for (int kv = 0; kv < H; ++kv) decode_head(layer, kv, q, k, v, out, pos, scratch_[0]);
        return;
      }
      auto task = [&](int kv, int worker) {
        try {
          decode_head(layer, kv, q, k, v, out, pos, scratch_[static_cast<std::size_t>(worker)]);
        } catch (...) {
          errors_[static_cast<std::size_t>(kv)] = std::current_exception();
        }
      };
      pool_->run(H, task);
      rethrow_first_error();
    }

    // Q: [T x n_q_heads*d], K, V: [T x n_kv_heads*d], out: [T x n_q_heads*d], all row-major; positions
    // start at `first_pos` (0 for a fresh cache). With threads, the attention of the heads runs in
    // parallel; the policy hooks then run head by head in order on the calling thread (policies may keep
    // prompt-time scratch in the policy object).
    void prefill(int layer, const float* Q, const float* K, const float* V, float* out, int T,
                 std::int64_t first_pos) {
      const int H = cfg_.n_kv_heads, g = cfg_.group_size();
      P& pol = policy(layer);
      const int window = std::clamp(pol.prompt_window(), 0, T);
      const std::size_t sums = kNeedAttention ? static_cast<std::size_t>(g) * T : 0;
      const std::size_t wsums = kNeedAttention && window > 0 ? static_cast<std::size_t>(g) * T : 0;
      const int workers = pool_ ? pool_->threads() : 1;
      std::vector<PrefillScratch> work(static_cast<std::size_t>(workers));
      // Column sums of every head (the hooks need them after the parallel part).
      std::vector<float> col(sums * H), win(wsums * H);
      auto attend_head = [&](int kv, int worker) {
        PrefillScratch& s = work[static_cast<std::size_t>(worker)];
        load_prompt(pol, kv, Q, K, V, T, s);
        prompt_attention(pol, kv, T, window, s, out, col.data() + sums * kv, win.data() + wsums * kv);
      };
      if (pool_) {
        auto task = [&](int kv, int worker) {
          try {
            attend_head(kv, worker);
          } catch (...) {
            errors_[static_cast<std::size_t>(kv)] = std::current_exception();
          }
        };
        pool_->run(H, task);
        rethrow_first_error();
      }
      PrefillScratch& s = work[0];
      for (int kv = 0; kv < H; ++kv) {
        if (pool_) {
          load_prompt(pol, kv, Q, K, V, T, s);  // the stored-space rows again, for the hooks
        } else {
          attend_head(kv, 0);
        }
        Head& h = head(layer, kv);
        State& st = state(layer, kv);
        h.reserve(T + 1);
        for (int t = 0; t < T; ++t) {
          StepContext step{layer, kv, g, h.key_dim(), first_pos + t, -1, s.Qg.row(t).data(), true};
          step.slot = h.append(s.Kh.row(t).data(), s.Vh.row(t).data(), first_pos + t);
          pol.on_insert(st, h, step);
        }
        PromptContext prompt{layer, kv, g, T, kNeedAttention ? col.data() + sums * kv : nullptr,
                             wsums ? win.data() + wsums * kv : nullptr, window};
        pol.on_prompt(st, h, prompt);
        KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " prompt tokens in layer ", layer,
                     " KV head ", kv, " over its budget of ", h.budget());
        h.shrink_to_budget();
      }
    }

   private:
    static constexpr bool kNeedAttention = has(P::kSignals, Signals::kAttention);

    struct Scratch {  // one per thread: the current decode step of one head
      std::vector<float> probs;                 // [group x (max budget + 1)] attention probabilities
      std::vector<float> q_low, kv_low, o_low;  // projected q, k|v and output (low-rank storage only)
    };
    struct PrefillScratch {  // one per thread: one head's prompt in the stored space, and the score block
      RowMajorMatrixXf S, Kh, Vh, Qg, Oh;
    };

    void rethrow_first_error() {
      for (auto& e : errors_)
        if (e) {
          std::exception_ptr first = e;
          for (auto& x : errors_) x = nullptr;
          std::rethrow_exception(first);
        }
    }

    void decode_head(int layer, int kv, const float* q, const float* k, const float* v, float* out, std::int64_t pos,
                     Scratch& s) {
      const int d = cfg_.head_dim, g = cfg_.group_size();
      P& pol = policy(layer);
      Head& h = head(layer, kv);
      State& st = state(layer, kv);
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
      StepContext step{layer, kv, g, h.key_dim(), pos, -1, qg, false};
      step.slot = h.append(kh, vh, pos);
      pol.on_insert(st, h, step);
      if constexpr (P::kTiming == EvictTiming::kBeforeAttention) pol.evict(st, h, step);
      const int n = h.size();
      float* o = kProjects ? s.o_low.data() : oh;
      detail::attend(h.key_ptr(0), h.value_ptr(0), n, h.key_dim(), h.value_dim(), qg, g,
                     1.0f / std::sqrt(static_cast<float>(d)), s.probs.data(), o);
      if constexpr (kProjects) pol.unproject_outputs(kv, g, s.o_low.data(), oh);
      if constexpr (kNeedAttention) pol.on_attention(st, h, step, AttentionRows{s.probs.data(), n, g, n});
      if constexpr (P::kTiming == EvictTiming::kAfterAttention) pol.evict(st, h, step);
      KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer, " KV head ", kv,
                   " over its budget of ", h.budget());
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

    // Exact causal attention of one head's prompt (rows already in s): writes the head's output columns of
    // out and, for policies that read attention, the column sums col [g x T] and window sums win [g x T].
    void prompt_attention(const P& pol, int kv, int T, int window, PrefillScratch& s, float* out, float* col, float* win) const {
      const int d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads;
      const int dk = static_cast<int>(s.Kh.cols()), dv = static_cast<int>(s.Vh.cols());
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      constexpr int kBlock = 128;
      if constexpr (kNeedAttention) {
        std::fill(col, col + static_cast<std::size_t>(g) * T, 0.0f);
        if (window > 0) std::fill(win, win + static_cast<std::size_t>(g) * T, 0.0f);
      }
      s.Oh.resize(T, static_cast<Eigen::Index>(g) * dv);
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
            if constexpr (kNeedAttention) {
              float* c = col + static_cast<std::size_t>(gi) * T;
              for (int j = 0; j <= t; ++j) c[j] += s.S(r, j);
              if (t >= T - window) {
                float* w = win + static_cast<std::size_t>(gi) * T;
                for (int j = 0; j <= t; ++j) w[j] += s.S(r, j);
              }
            }
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
    std::size_t index(int layer, int kv) const {
      return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv;
    }

    CacheConfig cfg_;
    std::vector<P> policies_;
    std::vector<Head> heads_;
    std::vector<State> states_;
    std::vector<Scratch> scratch_;                 // one per thread
    std::vector<std::exception_ptr> errors_;       // per KV head, from worker threads
    std::unique_ptr<detail::HeadPool> pool_;       // null with one thread
  };
};

}  // namespace kvtrim
