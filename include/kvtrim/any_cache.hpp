// kvtrim: a cache whose policy is chosen at run time, by its registry name.
//
// KVCache<Policy, Backend> fixes the policy at compile time, which is what an engine wants. Tools that let a
// user pick the policy (the examples' --policy, the Python module) use AnyCache instead: the same calls
// behind one virtual call each (a few nanoseconds against a decode step of microseconds), made by
// make_cache() from a registry name and "key=value" parameter settings.
//
//   auto cache = kvtrim::make_cache(name, cfg, {.params = {{"key", "value"}}});  // name: kvtrim::policy_names()
//   cache->decode(layer, q, k, v, out);
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "config.hpp"
#include "cpu_backend.hpp"  // make_cache() builds CPU caches unless told otherwise
#include "kv_cache.hpp"
#include "registry.hpp"

namespace kvtrim {

class AnyCache {
 public:
  virtual ~AnyCache() = default;

  virtual std::string_view policy_name() const = 0;
  // The policy's parameters as "key=value ..." (params.hpp), after defaults and overrides.
  virtual std::string params() const = 0;
  virtual const CacheConfig& config() const = 0;

  virtual void prefill(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
                       std::span<float> out) = 0;
  virtual void decode(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
                      std::span<float> out, std::int64_t position = kNextPosition) = 0;
  virtual void append(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
                      std::span<float> out) = 0;
  virtual void verify(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
                      std::span<float> out) = 0;
  virtual void reset() = 0;

  virtual int size(int layer, int kv_head) const = 0;
  virtual int budget(int layer, int kv_head) const = 0;
  virtual std::vector<std::int64_t> positions(int layer, int kv_head) const = 0;
  virtual std::int64_t next_position(int layer) const = 0;
  virtual std::size_t bytes_used() const = 0;
  virtual std::size_t bytes_reserved() const = 0;
  virtual std::uint64_t evictions() const = 0;
  virtual std::uint64_t merges() const = 0;
};

template <class P, class Backend = CpuBackend<>>
class AnyCacheOf final : public AnyCache {
 public:
  AnyCacheOf(const CacheConfig& cfg, const typename P::Params& p)
      : owned_(std::make_unique<KVCache<P, Backend>>(cfg, p)), cache_(*owned_), params_(p) {}
  // A view of a cache owned elsewhere (a KVBatch's sequence: any_batch.hpp), which must outlive the view.
  AnyCacheOf(KVCache<P, Backend>& cache, const typename P::Params& p) : cache_(cache), params_(p) {}

  std::string_view policy_name() const override { return P::kName; }
  std::string params() const override { return describe_params(params_); }
  const CacheConfig& config() const override { return cache_.config(); }

  void prefill(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
               std::span<float> out) override {
    cache_.prefill(layer, Q, K, V, out);
  }
  void decode(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
              std::span<float> out, std::int64_t position) override {
    cache_.decode(layer, q, k, v, out, position);
  }
  void append(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
              std::span<float> out) override {
    cache_.append(layer, Q, K, V, out);
  }
  void verify(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
              std::span<float> out) override {
    cache_.verify(layer, Q, K, V, out);
  }
  void reset() override { cache_.reset(); }

  int size(int layer, int kv_head) const override { return cache_.size(layer, kv_head); }
  int budget(int layer, int kv_head) const override { return cache_.budget(layer, kv_head); }
  std::vector<std::int64_t> positions(int layer, int kv_head) const override { return cache_.positions(layer, kv_head); }
  std::int64_t next_position(int layer) const override { return cache_.next_position(layer); }
  std::size_t bytes_used() const override { return cache_.bytes_used(); }
  std::size_t bytes_reserved() const override { return cache_.bytes_reserved(); }
  std::uint64_t evictions() const override { return cache_.evictions(); }
  std::uint64_t merges() const override { return cache_.merges(); }

  KVCache<P, Backend>& typed() { return cache_; }

 private:
  std::unique_ptr<KVCache<P, Backend>> owned_;  // null for a view
  KVCache<P, Backend>& cache_;
  typename P::Params params_;
};

// What make_cache needs besides the shape: parameter overrides ("key", "value"), applied over the registry
// entry's defaults, and a calibrated basis for the policies that store low-rank keys (Entry::kNeedsBasis).
struct PolicyOptions {
  std::vector<std::pair<std::string, std::string>> params;
  std::shared_ptr<const EigenBasis> basis;
};

// The registered policy `name` (kvtrim::Error listing the valid names otherwise) with its parameters.
template <class P>
typename P::Params policy_params(const Entry<P>& entry, const PolicyOptions& opt) {
  typename P::Params p = entry.params();
  set_params(p, opt.params);
  if constexpr (Entry<P>::kNeedsBasis) {
    KVTRIM_CHECK(opt.basis != nullptr, "policy ", P::kName,
                 " stores low-rank keys and needs a calibrated basis (PolicyOptions::basis; see EigenCalibrator)");
    p.basis = opt.basis;
  }
  return p;
}

template <class Backend = CpuBackend<>>
std::unique_ptr<AnyCache> make_cache(std::string_view name, const CacheConfig& cfg, const PolicyOptions& opt = {}) {
  std::unique_ptr<AnyCache> out;
  with_policy(name, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    out = std::make_unique<AnyCacheOf<P, Backend>>(cfg, policy_params(entry, opt));
  });
  return out;
}

}  // namespace kvtrim
