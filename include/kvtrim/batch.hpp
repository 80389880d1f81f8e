// kvtrim: KVBatch<Policy, Backend>, the sequences of an engine's batch decoded together.
//
// An engine serves many sequences at once and decodes them one layer at a time. KVBatch holds one KVCache per
// sequence (its own budgets, positions and policy state, so sequences never interfere) behind stable ids:
// sequences join and leave between steps (continuous batching), and decode(layer, ids, Q, K, V, out) runs one
// token of every listed sequence. Why this shape: a batch is a set of independent caches with a shared thread
// pool, not one big tensor, because every sequence keeps its own token set per head (different lengths, budgets
// and evictions); the engine's rows map to sequences by id, so its own batch order can change freely.
//
//   kvtrim::KVBatch<Policy> batch(shape, params, {.threads = 4});
//   const int a = batch.add(), b = batch.add();           // each may have its own budgets (CacheConfig)
//   batch.sequence(a).prefill(layer, Q, K, V, out);       // prompts, chunks, drafts, introspection: per sequence
//   batch.decode(layer, ids, Q, K, V, out);               // row r of Q [B x n_q*d], K, V [B x n_kv*d], out: ids[r]
//   batch.remove(a);                                      // between steps
//
// fp16/bf16 engines pass their rows as kvtrim::half or kvtrim::bfloat16 spans (converted on the host, as KVCache).
//
// Every row is checked (shapes, positions, capacity, NaN/Inf, ids) before any sequence changes; a refused call
// changes nothing. On the CPU the (sequence, KV head) pairs of a call are spread over the batch's threads; the
// results are bit-identical for any thread count and equal to decoding the sequences one by one. Other backends
// (CUDA) decode the sequences one after the other, each with its own launches.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "cpu_backend.hpp"
#include "error.hpp"
#include "head_pool.hpp"
#include "kv_cache.hpp"

namespace kvtrim {

struct BatchOptions {
  int threads = 1;  // workers for the (sequence, KV head) pairs of a call; 1 = the calling thread only
};

template <class P, class Backend = CpuBackend<>>
class KVBatch {
 public:
  using Cache = KVCache<P, Backend>;
  using Params = typename P::Params;

  KVBatch(CacheConfig shape, Params params = {}, BatchOptions opt = {})
      : shape_((shape.validate(), std::move(shape))), params_(std::move(params)), opt_(opt) {
    KVTRIM_CHECK(opt.threads >= 1, "KVBatch: threads must be >= 1, got ", opt.threads);
    shape_.threads = 1;  // the batch's pool serves every sequence
    if (opt.threads > 1) pool_ = std::make_unique<detail::HeadPool>(opt.threads);
  }

  // A new sequence with the batch's configuration, or its own budgets (`own` must have the batch's shape: layers,
  // heads, head_dim). Returns its id, valid until remove().
  int add(std::optional<CacheConfig> own = std::nullopt) {
    CacheConfig cfg = own ? *own : shape_;
    KVTRIM_CHECK(cfg.n_layers == shape_.n_layers && cfg.n_kv_heads == shape_.n_kv_heads &&
                     cfg.n_q_heads == shape_.n_q_heads && cfg.head_dim == shape_.head_dim,
                 "KVBatch::add: a sequence's configuration must have the batch's shape (n_layers ", shape_.n_layers,
                 ", n_kv_heads ", shape_.n_kv_heads, ", n_q_heads ", shape_.n_q_heads, ", head_dim ", shape_.head_dim,
                 "); only budgets and check_finite may differ");
    cfg.threads = 1;
    auto cache = std::make_unique<Cache>(cfg, params_);
    scratch_.clear();  // sized for the sequences' budgets: made again on first use
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      if (!seqs_[i]) {
        seqs_[i] = std::move(cache);
        return static_cast<int>(i);
      }
    seqs_.push_back(std::move(cache));
    return static_cast<int>(seqs_.size() - 1);
  }
  // The sequence leaves; its memory is returned and its id may be reused by a later add().
  void remove(int id) {
    seqs_[checked(id, "remove")].reset();
    scratch_.clear();
  }

  Cache& sequence(int id) { return *seqs_[checked(id, "sequence")]; }
  const Cache& sequence(int id) const { return *seqs_[checked(id, "sequence")]; }
  // The ids in use, ascending.
  std::vector<int> ids() const {
    std::vector<int> out;
    for (std::size_t i = 0; i < seqs_.size(); ++i)
      if (seqs_[i]) out.push_back(static_cast<int>(i));
    return out;
  }
  int size() const { return static_cast<int>(ids().size()); }
  const CacheConfig& shape() const { return shape_; }

  // One token for each sequence in `ids` (each id once), row r of Q [B x n_q_heads*head_dim], K and V
  // [B x n_kv_heads*head_dim] and out [B x n_q_heads*head_dim] belonging to ids[r]; positions: each sequence's
  // next one, or `positions[r]` when given.
  void decode(int layer, std::span<const int> ids, std::span<const float> Q, std::span<const float> K,
              std::span<const float> V, std::span<float> out, std::span<const std::int64_t> positions = {}) {
    const std::size_t B = ids.size();
    const std::size_t qw = static_cast<std::size_t>(shape_.n_q_heads) * shape_.head_dim;
    const std::size_t kw = static_cast<std::size_t>(shape_.n_kv_heads) * shape_.head_dim;
    KVTRIM_CHECK(B > 0, "KVBatch::decode: no sequences given");
    KVTRIM_CHECK(Q.size() == B * qw && out.size() == B * qw, "KVBatch::decode: Q has ", Q.size(), " and out ",
                 out.size(), " floats; expected ", B, " rows of n_q_heads*head_dim = ", qw);
    KVTRIM_CHECK(K.size() == B * kw && V.size() == B * kw, "KVBatch::decode: K has ", K.size(), " and V ", V.size(),
                 " floats; expected ", B, " rows of n_kv_heads*head_dim = ", kw);
    KVTRIM_CHECK(positions.empty() || positions.size() == B, "KVBatch::decode: ", positions.size(),
                 " positions for ", B, " sequences");
    std::vector<std::int64_t>& pos = pos_;
    pos.resize(B);
    for (std::size_t r = 0; r < B; ++r) {
      const std::size_t i = checked(ids[r], "decode");
      for (std::size_t u = 0; u < r; ++u)
        KVTRIM_CHECK(ids[u] != ids[r], "KVBatch::decode: sequence ", ids[r], " appears twice (rows ", u, " and ", r,
                     ")");
      pos[r] = seqs_[i]->check_decode(layer, Q.subspan(r * qw, qw), K.subspan(r * kw, kw), V.subspan(r * kw, kw),
                                      out.subspan(r * qw, qw), positions.empty() ? kNextPosition : positions[r]);
    }
    constexpr bool kPerHead = requires(typename Backend::template Impl<P>& impl, typename Backend::template Impl<P>::Scratch& s) {
      impl.decode_one_head(0, 0, nullptr, nullptr, nullptr, nullptr, std::int64_t{0}, s);
    };
    if constexpr (kPerHead) {
      run_heads(layer, ids, Q, K, V, out, qw, kw);
    } else {
      for (std::size_t r = 0; r < B; ++r)
        seqs_[static_cast<std::size_t>(ids[r])]->impl_.decode(layer, Q.data() + r * qw, K.data() + r * kw,
                                                               V.data() + r * kw, out.data() + r * qw, pos[r]);
    }
    for (std::size_t r = 0; r < B; ++r) seqs_[static_cast<std::size_t>(ids[r])]->next_pos_[layer] = pos[r] + 1;
  }

  // The same step with half or bfloat16 rows (kv_cache.hpp, "fp16 / bf16 activations"): widened to float, run as
  // above, the outputs rounded to A once the step has succeeded.
  template <Activation16 A>
  void decode(int layer, std::span<const int> ids, std::span<const A> Q, std::span<const A> K, std::span<const A> V,
              std::span<A> out, std::span<const std::int64_t> positions = {}) {
    Cache::host_inputs_only();
    decode(layer, ids, io_.widen(0, Q), io_.widen(1, K), io_.widen(2, V), io_.output(out.size()), positions);
    io_.narrow(out);
  }

 private:
  using Impl = typename Backend::template Impl<P>;

  std::size_t checked(int id, const char* what) const {
    KVTRIM_CHECK(id >= 0 && static_cast<std::size_t>(id) < seqs_.size() && seqs_[static_cast<std::size_t>(id)],
                 "KVBatch::", what, ": no sequence with id ", id, " (ids in use: ", ids().size(), ")");
    return static_cast<std::size_t>(id);
  }

  // Tasks = (row, KV head), on the pool when there is one; per-worker scratch is kept between calls.
  template <class S = typename Impl::Scratch>
  void run_heads(int layer, std::span<const int> ids, std::span<const float> Q, std::span<const float> K,
                 std::span<const float> V, std::span<float> out, std::size_t qw, std::size_t kw) {
    const int H = shape_.n_kv_heads, B = static_cast<int>(ids.size());
    const int workers = pool_ ? pool_->threads() : 1;
    if (scratch_.size() != static_cast<std::size_t>(workers) * seqs_.size()) {
      scratch_.clear();
      scratch_.resize(static_cast<std::size_t>(workers) * seqs_.size());
    }
    auto task = [&](int t, int worker) {
      const auto r = static_cast<std::size_t>(t / H);
      const int kv = t % H;
      Cache& c = *seqs_[static_cast<std::size_t>(ids[r])];
      // scratch per (worker, sequence): sized for that sequence's budgets, made on first use
      auto& slot = scratch_[static_cast<std::size_t>(worker) * seqs_.size() + static_cast<std::size_t>(ids[r])];
      if (!slot) slot = std::make_shared<S>(c.impl_.make_scratch());
      c.impl_.decode_one_head(layer, kv, Q.data() + r * qw, K.data() + r * kw, V.data() + r * kw,
                              out.data() + r * qw, pos_[r], *std::static_pointer_cast<S>(slot));
    };
    if (!pool_) {
      for (int t = 0; t < B * H; ++t) task(t, 0);
      return;
    }
    errors_.assign(static_cast<std::size_t>(B) * H, nullptr);
    auto guarded = [&](int t, int worker) {
      try {
        task(t, worker);
      } catch (...) {
        errors_[static_cast<std::size_t>(t)] = std::current_exception();
      }
    };
    pool_->run(B * H, guarded);
    for (auto& e : errors_)
      if (e) std::rethrow_exception(e);
  }

  CacheConfig shape_;
  Params params_;
  BatchOptions opt_;
  std::vector<std::unique_ptr<Cache>> seqs_;       // by id; null = free
  std::vector<std::int64_t> pos_;                 // per row of the current call
  std::vector<std::shared_ptr<void>> scratch_;    // per (worker, sequence id)
  std::vector<std::exception_ptr> errors_;
  std::unique_ptr<detail::HeadPool> pool_;
  detail::WidenedRows io_;  // float copies of 16-bit steps
};

}  // namespace kvtrim
