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
#include "kv_cache.hpp"  // declares CpuBackend with its default storage type
#include "cpu_attention.hpp"
#include "cpu_selection.hpp"
#include "error.hpp"
#include "head_pool.hpp"
#include "head_store.hpp"
#include "memory.hpp"
#include "policy.hpp"
#include "simhash.hpp"

namespace kvtrim {

// T: how keys and values are stored (float, kvtrim::half or kvtrim::bfloat16). Inputs are fp32 (or widened from
// 16-bit activations, kv_cache.hpp) and every computation is fp32; a 16-bit store rounds each row once, when it
// joins, and attention reads the stored rows. As on the CUDA backend, the rules see the fp32 inputs (L2 norms,
// SimHash codes), the prompt's attention and its prompt stage run on the fp32 prompt rows, and a merge mixes in fp32
// and rounds the result; cosines and norms for merging are of the stored rows.
template <StorageType T>  // = float (kv_cache.hpp declares it)
struct CpuBackend {
  static constexpr const char* kName = "cpu";
  using Storage = T;

  template <class P>
  class Impl;
};

template <StorageType Stored>  // the storage type (inside Impl, T names a chunk's token count)
template <class P>
class CpuBackend<Stored>::Impl {
 public:
  using Meta = typename P::SlotMeta;
  using State = typename P::State;
  using Head = HeadStore<Meta, Stored>;

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
  // Bytes of a merging policy's per-slot Stats (the selection scratch holds one per slot), else 0.
  static constexpr std::size_t kStatsSize = [] {
    if constexpr (kMerges)
      return sizeof(typename P::Stats);
    else
      return std::size_t{0};
  }();

  // What a cache of this configuration reserves: every head's slots at budget + 1 (keys, values, positions,
  // metadata, key norms for merging policies), the per-head state and the per-thread scratch.
  static ByteCount bytes_required(const CacheConfig& cfg, const typename P::Params& params) {
    const auto size = [](std::size_t bytes) { return static_cast<double>(bytes); };
    const int L = cfg.n_layers, H = cfg.n_kv_heads, g = cfg.group_size();
    const double heads = static_cast<double>(L) * H;
    const double per_slot = size(sizeof(std::int64_t) + sizeof(Meta) + (kMerges ? sizeof(float) : 0));
    ByteCount b;
    double slots = 0, max_budget = 0;  // over every head
    if (cfg.head_budgets.empty()) {
      slots = heads * (cfg.budget + 1.0);
      max_budget = cfg.budget;
    } else {
      for (int x : cfg.head_budgets) slots += x + 1.0, max_budget = std::max(max_budget, static_cast<double>(x));
    }
    if constexpr (kProjects) {  // stored widths differ per head: ask the policy of each layer
      for (int l = 0; l < L; ++l) {
        LayerContext ctx{l, L, H, g, cfg.head_dim, {}};
        for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
        const P pol(params, ctx);
        for (int h = 0; h < H; ++h)
          b.add(cfg.budget_of(l, h) + 1.0, size(sizeof(Stored)) * (pol.key_width(h) + pol.value_width(h)));
      }
    } else {
      (void)params;
      b.add(slots, size(2 * sizeof(Stored)) * cfg.head_dim);
    }
    b.add(slots, per_slot);
    b.add(heads, size(sizeof(Head) + 2 * sizeof(State) + 2 * sizeof(int)));
    // per thread: probabilities [g x (budget + 1)] and the selection scratch
    const double threads = std::min(cfg.threads, H);
    const double scratch = g * size(sizeof(float)) + size(5 * sizeof(float) + 2 * sizeof(int) + sizeof(Meta) +
                                                          sizeof(std::uint64_t) + kStatsSize);
    b.add(threads, (max_budget + 1) * scratch);
    return b;
  }

  Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg) {
    const ByteCount need = bytes_required(cfg, params);
    detail::require_bytes(need, physical_memory(), P::kName.data(), "this machine");
    detail::allocate_or_throw(need, "CpuBackend", [&] { build(params); });
  }

 private:
  void build(const typename P::Params& params) {
    const CacheConfig& cfg = cfg_;
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
        heads_.emplace_back(key_width(cfg, pol, h), value_width(cfg, pol, h), budget);
        max_key_width_ = std::max(max_key_width_, key_width(cfg, pol, h));
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
    max_budget_ = max_budget;
    scratch_.resize(static_cast<std::size_t>(threads));
    for (auto& s : scratch_) s = make_scratch();
    errors_.resize(static_cast<std::size_t>(H));
    if (threads > 1) pool_ = std::make_unique<detail::HeadPool>(threads);
  }

 public:
  // Copies get their own worker threads (a pool is never shared).
  Impl(const Impl& o)
      : cfg_(o.cfg_), policies_(o.policies_), heads_(o.heads_), initial_(o.initial_), states_(o.states_),
        initial_limits_(o.initial_limits_), limits_(o.limits_), projections_(o.projections_), norms_(o.norms_),
        max_budget_(o.max_budget_), max_key_width_(o.max_key_width_), scratch_(o.scratch_), errors_(o.errors_.size()),
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

  // The working memory of one thread for decode steps (decode allocates nothing once it exists).
  struct Scratch {
    std::vector<float> probs;                 // [group x (max budget + 1)] attention probabilities
    std::vector<float> q_low, kv_low, o_low;  // projected q, k|v and output (low-rank storage only)
    std::vector<std::uint64_t> q_codes;       // the step's query codes (SimHash policies)
    cpu::SelectScratch<Meta> select;
  };
  Scratch make_scratch() const {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    Scratch s;
    s.probs.resize(static_cast<std::size_t>(g) * (max_budget_ + 1));
    s.select.reserve(max_budget_ + 1, kStatsSize, kMerges && !std::is_same_v<Stored, float> ? max_key_width_ : 0);
    if constexpr (kProjects) {
      s.q_low.resize(static_cast<std::size_t>(g) * d);
      s.kv_low.resize(2 * static_cast<std::size_t>(d));
      s.o_low.resize(static_cast<std::size_t>(g) * d);
    }
    if constexpr (kHash) s.q_codes.resize(static_cast<std::size_t>(g));
    return s;
  }

  // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d].
  void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
    run_heads([&](int kv, Scratch& s) { decode_head(layer, kv, q, k, v, out, pos, s); });
  }

  // One KV head of a decode step with the caller's scratch (KVBatch spreads the heads of many caches over one
  // pool); the caller has checked the inputs and advances the position.
  void decode_one_head(int layer, int kv, const float* q, const float* k, const float* v, float* out,
                       std::int64_t pos, Scratch& s) {
    decode_head(layer, kv, q, k, v, out, pos, s);
  }

  // T tokens after the ones held (KVCache::append states the rule): every chunk token joins and attends
  // causally, with the policy's decode bookkeeping, and the eviction comes once, after the chunk.
  void append(int layer, const float* Q, const float* K, const float* V, float* out, int T, std::int64_t first_pos) {
    run_heads([&](int kv, Scratch& s) { chunk_head(layer, kv, Q, K, V, out, T, first_pos, s, /*keep=*/true); });
  }
  // The outputs append() would write; the head's slots are restored afterwards and no policy code runs.
  void verify(int layer, const float* Q, const float* K, const float* V, float* out, int T, std::int64_t first_pos) {
    run_heads([&](int kv, Scratch& s) { chunk_head(layer, kv, Q, K, V, out, T, first_pos, s, /*keep=*/false); });
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

  // Decide-only steps (KVCache::insert / observe): the new token joins (and a policy that evicts before attention
  // evicts), the engine attends over the kept rows itself, then hands the probabilities back.
  void insert_step(int layer, const float* q, const float* k, const float* v, std::int64_t pos) {
    run_heads([&](int kv, Scratch& s) {
      const int d = cfg_.head_dim, g = cfg_.group_size();
      const std::size_t i = index(layer, kv);
      const float* kh = k + static_cast<std::size_t>(kv) * d;
      insert(i, kh, v + static_cast<std::size_t>(kv) * d, pos,
             token_inputs(layer, kh, d, q + static_cast<std::size_t>(kv) * g * d, false, s));
      if constexpr (P::kTiming == EvictTiming::kBeforeAttention) evict(layer, kv, s);
    });
  }
  // probs: [n_q_heads x stride], query head h's probabilities over its KV head's slots in slot order.
  void observe_step(int layer, const float* probs, int stride) {
    run_heads([&](int kv, Scratch& s) {
      const int g = cfg_.group_size();
      const std::size_t i = index(layer, kv);
      Head& h = heads_[i];
      if constexpr (kAttention) {
        float* p = s.probs.data();  // the head's rows, packed
        for (int r = 0; r < g; ++r)
          std::copy_n(probs + static_cast<std::size_t>(kv * g + r) * stride, h.size(),
                      p + static_cast<std::size_t>(r) * h.size());
        observe_then_evict(layer, kv, p, s);
      } else if constexpr (P::kTiming == EvictTiming::kAfterAttention) {
        evict(layer, kv, s);
      }
    });
  }

 private:
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
    if constexpr (kMerges) norms_[i][static_cast<std::size_t>(slot)] = h.key_norm(slot);
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

  // A step's probabilities (packed [group x size]) reach the head's slots, then the eviction after attention if
  // the policy has one; plain one-at-a-time eviction finds its first victim in the same pass.
  void observe_then_evict(int layer, int kv, const float* probs, Scratch& s) {
    const std::size_t i = index(layer, kv);
    Head& h = heads_[i];
    const int g = cfg_.group_size();
    if constexpr (P::kTiming == EvictTiming::kAfterAttention && !kStructured && !kMerges) {
      cpu::observe_and_evict<P>(h, states_[i], probs, g, limits_[i], layer, kv, s.select);
    } else {
      cpu::observe<P>(h.meta_data(), h.size(), states_[i], probs, g, s.select);
      if constexpr (P::kTiming == EvictTiming::kAfterAttention) evict(layer, kv, s);
    }
  }

  // A token's query group, key and value rows as the head stores them: projected into the low-rank space for
  // low-rank storage (in the scratch), the inputs themselves otherwise.
  struct StoredRows {
    const float *q, *k, *v;
  };
  StoredRows stored_rows(P& pol, int kv, const float* qg, const float* kh, const float* vh, Scratch& s) const {
    if constexpr (kProjects) {
      const int g = cfg_.group_size(), d = cfg_.head_dim;
      pol.project_queries(kv, g, qg, s.q_low.data());
      pol.project_key(kv, kh, s.kv_low.data());
      pol.project_value(kv, vh, s.kv_low.data() + d);
      return {s.q_low.data(), s.kv_low.data(), s.kv_low.data() + d};
    } else {
      (void)pol, (void)kv, (void)s;
      return {qg, kh, vh};
    }
  }

  void decode_head(int layer, int kv, const float* q, const float* k, const float* v, float* out, std::int64_t pos,
                   Scratch& s) {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    const std::size_t i = index(layer, kv);
    P& pol = policy(layer);
    Head& h = heads_[i];
    float* oh = out + static_cast<std::size_t>(kv) * g * d;
    // everything below happens in the stored (projected) space
    const auto [qg, kh, vh] = stored_rows(pol, kv, q + static_cast<std::size_t>(kv) * g * d,
                                          k + static_cast<std::size_t>(kv) * d, v + static_cast<std::size_t>(kv) * d, s);
    insert(i, kh, vh, pos, token_inputs(layer, kh, h.key_dim(), qg, false, s));
    if constexpr (P::kTiming == EvictTiming::kBeforeAttention) evict(layer, kv, s);
    const int n = h.size();
    float* o = kProjects ? s.o_low.data() : oh;
    detail::attend(h.key_ptr(0), h.value_ptr(0), n, h.key_dim(), h.value_dim(), qg, g,
                   1.0f / std::sqrt(static_cast<float>(d)), s.probs.data(), o);
    if constexpr (kProjects) pol.unproject_outputs(kv, g, s.o_low.data(), oh);
    if constexpr (kAttention)
      observe_then_evict(layer, kv, s.probs.data(), s);
    else if constexpr (P::kTiming == EvictTiming::kAfterAttention)
      evict(layer, kv, s);
    KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer, " KV head ", kv,
                 " over its budget of ", h.budget());
  }

  // One head's chunk for append (keep: the policy's bookkeeping, then eviction) or verify (the rows leave again).
  void chunk_head(int layer, int kv, const float* Q, const float* K, const float* V, float* out, int T,
                  std::int64_t first_pos, Scratch& s, bool keep) {
    const int d = cfg_.head_dim, g = cfg_.group_size(), Hq = cfg_.n_q_heads, H = cfg_.n_kv_heads;
    const std::size_t i = index(layer, kv);
    P& pol = policy(layer);
    Head& h = heads_[i];
    const int n0 = h.size();
    const std::int64_t newest0 = h.newest_pos();
    h.reserve(n0 + T);
    if constexpr (kMerges) norms_[i].resize(static_cast<std::size_t>(h.capacity()));
    if (s.probs.size() < static_cast<std::size_t>(g) * (n0 + T)) s.probs.resize(static_cast<std::size_t>(g) * (n0 + T));
    for (int t = 0; t < T; ++t) {
      float* oh = out + (static_cast<std::size_t>(t) * Hq + static_cast<std::size_t>(kv) * g) * d;
      const auto [qg, kh, vh] = stored_rows(pol, kv, Q + (static_cast<std::size_t>(t) * Hq + static_cast<std::size_t>(kv) * g) * d,
                                            K + (static_cast<std::size_t>(t) * H + kv) * d,
                                            V + (static_cast<std::size_t>(t) * H + kv) * d, s);
      if (keep)
        insert(i, kh, vh, first_pos + t, token_inputs(layer, kh, h.key_dim(), qg, false, s));
      else
        h.append(kh, vh, first_pos + t);
      const int n = h.size();
      float* o = kProjects ? s.o_low.data() : oh;
      detail::attend(h.key_ptr(0), h.value_ptr(0), n, h.key_dim(), h.value_dim(), qg, g,
                     1.0f / std::sqrt(static_cast<float>(d)), s.probs.data(), o);
      if constexpr (kProjects) pol.unproject_outputs(kv, g, s.o_low.data(), oh);
      if constexpr (kAttention)
        if (keep) cpu::observe<P>(h.meta_data(), n, states_[i], s.probs.data(), g, s.select);
    }
    if (keep) {
      evict(layer, kv, s);
      KVTRIM_CHECK(h.size() <= h.budget(), P::kName, " left ", h.size(), " tokens in layer ", layer, " KV head ", kv,
                   " over its budget of ", h.budget());
    } else {
      h.truncate(n0, newest0);
    }
    h.shrink_to_budget();
    if constexpr (kMerges) norms_[i].resize(static_cast<std::size_t>(h.capacity()));
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
      if constexpr (std::is_same_v<Stored, float>) {
        limits_[i] = pol.host_prompt(states_[i], h, sums);
      } else {  // on the fp32 prompt rows (the CUDA backend's rule), then stored
        HeadStore<Meta> fp32(h.key_dim(), h.value_dim(), h.budget());
        fp32.reserve(T + 1);
        for (int t = 0; t < T; ++t) fp32.meta(fp32.append(w.Kh.row(t).data(), w.Vh.row(t).data(), h.pos(t))) = h.meta(t);
        limits_[i] = pol.host_prompt(states_[i], fp32, sums);
        h.truncate(0, h.newest_pos());
        h.assign(fp32);
      }
      if constexpr (kMerges)
        for (int j = 0; j < h.size(); ++j) norms_[i][static_cast<std::size_t>(j)] = h.key_norm(j);
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
    const int dk = key_width(cfg_, pol, kv), dv = value_width(cfg_, pol, kv);
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

  static int key_width(const CacheConfig& cfg, const P& p, int kv) {
    if constexpr (kProjects) return p.key_width(kv);
    return cfg.head_dim;
  }
  static int value_width(const CacheConfig& cfg, const P& p, int kv) {
    if constexpr (kProjects) return p.value_width(kv);
    return cfg.head_dim;
  }
  std::size_t index(int layer, int kv) const { return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv; }

  CacheConfig cfg_;
  std::vector<P> policies_;
  std::vector<Head> heads_;
  std::vector<State> initial_, states_;  // per head: an empty head's state, and the current one
  std::vector<int> initial_limits_, limits_;
  std::vector<SimHashProjection> projections_;  // per layer (SimHash policies)
  std::vector<std::vector<float>> norms_;       // per head, per slot key norms (merging policies)
  int max_budget_ = 0, max_key_width_ = 0;
  std::vector<Scratch> scratch_;                // one per thread
  std::vector<std::exception_ptr> errors_;      // per KV head, from worker threads
  std::unique_ptr<detail::HeadPool> pool_;      // null with one thread
};

}  // namespace kvtrim
