// kvtrim: a batch of sequences whose policy is chosen at run time, by its registry name (KVBatch behind one
// interface, as AnyCache is KVCache's; the Python module's Batch is this).
//
//   auto batch = kvtrim::make_batch(name, shape, {.params = {{"key", "value"}}}, {.threads = 4});
//   const int id = batch->add();
//   batch->sequence(id).prefill(layer, Q, K, V, out);    // an AnyCache view of that sequence
//   batch->decode(layer, ids, Q, K, V, out);             // one token of each listed sequence
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "any_cache.hpp"
#include "batch.hpp"

namespace kvtrim {

class AnyBatch {
 public:
  virtual ~AnyBatch() = default;

  virtual std::string_view policy_name() const = 0;
  virtual const CacheConfig& shape() const = 0;
  // KVBatch's calls (batch.hpp states them).
  virtual int add(std::optional<CacheConfig> own = std::nullopt) = 0;
  virtual void remove(int id) = 0;
  virtual std::vector<int> ids() const = 0;
  // Sequence `id` (kvtrim::Error for an id not in use), valid until it is removed.
  virtual AnyCache& sequence(int id) = 0;
  virtual void decode(int layer, std::span<const int> ids, std::span<const float> Q, std::span<const float> K,
                      std::span<const float> V, std::span<float> out, std::span<const std::int64_t> positions = {}) = 0;
};

template <class P, class Backend = CpuBackend<>>
class AnyBatchOf final : public AnyBatch {
 public:
  AnyBatchOf(const CacheConfig& shape, const typename P::Params& p, BatchOptions opt)
      : batch_(shape, p, opt), params_(p) {}

  std::string_view policy_name() const override { return P::kName; }
  const CacheConfig& shape() const override { return batch_.shape(); }
  int add(std::optional<CacheConfig> own) override {
    const int id = batch_.add(std::move(own));
    if (views_.size() <= static_cast<std::size_t>(id)) views_.resize(static_cast<std::size_t>(id) + 1);
    views_[static_cast<std::size_t>(id)] = std::make_unique<AnyCacheOf<P, Backend>>(batch_.sequence(id), params_);
    return id;
  }
  void remove(int id) override {
    batch_.remove(id);  // checks the id
    views_[static_cast<std::size_t>(id)].reset();
  }
  std::vector<int> ids() const override { return batch_.ids(); }
  AnyCache& sequence(int id) override {
    batch_.sequence(id);  // checks the id
    return *views_[static_cast<std::size_t>(id)];
  }
  void decode(int layer, std::span<const int> ids, std::span<const float> Q, std::span<const float> K,
              std::span<const float> V, std::span<float> out, std::span<const std::int64_t> positions) override {
    batch_.decode(layer, ids, Q, K, V, out, positions);
  }

  KVBatch<P, Backend>& typed() { return batch_; }

 private:
  KVBatch<P, Backend> batch_;
  typename P::Params params_;
  std::vector<std::unique_ptr<AnyCacheOf<P, Backend>>> views_;  // by id; null = free
};

template <class Backend = CpuBackend<>>
std::unique_ptr<AnyBatch> make_batch(std::string_view name, const CacheConfig& shape, const PolicyOptions& opt = {},
                                     BatchOptions batch = {}) {
  std::unique_ptr<AnyBatch> out;
  with_policy(name, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    out = std::make_unique<AnyBatchOf<P, Backend>>(shape, policy_params(entry, opt), batch);
  });
  return out;
}

}  // namespace kvtrim
