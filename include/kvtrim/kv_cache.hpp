// kvtrim: KVCache<Policy, Backend>, the one cache an engine talks to.
//
// One KVCache serves one sequence: call prefill() once per layer with the prompt, then decode() once per
// layer per generated token. Keys arrive already rotated (RoPE applied by the engine at the token's
// position); the cache keeps each token's original position next to its key so that nothing is inferred
// from slot order. Every input is checked before any state changes: a rejected call leaves the cache as it was.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "policy.hpp"

namespace kvtrim {

struct CpuBackend;  // cpu_backend.hpp; any backend with the same Impl interface works (the CUDA one, for instance)

// decode() without an explicit position takes the next one after the layer's last token.
inline constexpr std::int64_t kNextPosition = -1;
// Positions stay below 2^62 so that position arithmetic (windows, next position) cannot overflow.
inline constexpr std::int64_t kMaxPosition = std::int64_t{1} << 62;

template <class P, class Backend = CpuBackend>
class KVCache {
  static_assert(check_policy<P>(), "kvtrim: KVCache's first template argument must be a kvtrim::Policy");

 public:
  using PolicyType = P;
  using Params = typename P::Params;

  explicit KVCache(CacheConfig cfg, Params params = {})
      : cfg_((cfg.validate(), std::move(cfg))),
        impl_(cfg_, params),
        next_pos_(static_cast<std::size_t>(cfg_.n_layers), 0) {}

  const CacheConfig& config() const { return cfg_; }
  static constexpr std::string_view policy_name() { return P::kName; }

  // Prompt of T tokens for one layer: Q [T x n_q_heads*head_dim], K and V [T x n_kv_heads*head_dim],
  // row-major (token t's heads side by side). Writes causal attention for every prompt token into out
  // [T x n_q_heads*head_dim], then the policy brings each KV head down to its budget.
  void prefill(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
               std::span<float> out) {
    check_layer(layer, "prefill");
    const std::size_t qw = static_cast<std::size_t>(cfg_.n_q_heads) * cfg_.head_dim;
    const std::size_t kw = static_cast<std::size_t>(cfg_.n_kv_heads) * cfg_.head_dim;
    KVTRIM_CHECK(!Q.empty() && Q.size() % qw == 0, "prefill: Q has ", Q.size(),
                 " floats; expected a positive multiple of n_q_heads*head_dim = ", qw);
    const std::size_t T = Q.size() / qw;
    KVTRIM_CHECK(K.size() == T * kw, "prefill: K has ", K.size(), " floats; expected T*n_kv_heads*head_dim = ",
                 T, "*", kw, " = ", T * kw);
    KVTRIM_CHECK(V.size() == T * kw, "prefill: V has ", V.size(), " floats; expected T*n_kv_heads*head_dim = ",
                 T * kw);
    KVTRIM_CHECK(out.size() == T * qw, "prefill: out has ", out.size(), " floats; expected T*n_q_heads*head_dim = ",
                 T * qw);
    KVTRIM_CHECK(T <= static_cast<std::size_t>(INT32_MAX / 2), "prefill: prompt of ", T, " tokens is too long");
    KVTRIM_CHECK(next_pos_[layer] == 0, "prefill: layer ", layer, " already holds ", next_pos_[layer],
                 " tokens; prefill starts a sequence (call reset(), or feed further tokens through decode)");
    check_capacity(layer, static_cast<int>(T), /*prefill=*/true);
    check_finite(Q, "prefill", "Q");
    check_finite(K, "prefill", "K");
    check_finite(V, "prefill", "V");
    impl_.prefill(layer, Q.data(), K.data(), V.data(), out.data(), static_cast<int>(T), 0);
    next_pos_[layer] = static_cast<std::int64_t>(T);
  }

  // One new token for one layer: q [n_q_heads*head_dim], k and v [n_kv_heads*head_dim]; writes attention
  // over what the cache keeps plus the new token (unless the policy evicts before attention) into out
  // [n_q_heads*head_dim]. `position` must increase from call to call (gaps allowed).
  void decode(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
              std::span<float> out, std::int64_t position = kNextPosition) {
    check_layer(layer, "decode");
    const std::size_t qw = static_cast<std::size_t>(cfg_.n_q_heads) * cfg_.head_dim;
    const std::size_t kw = static_cast<std::size_t>(cfg_.n_kv_heads) * cfg_.head_dim;
    KVTRIM_CHECK(q.size() == qw, "decode: q has ", q.size(), " floats; expected n_q_heads*head_dim = ", qw);
    KVTRIM_CHECK(k.size() == kw, "decode: k has ", k.size(), " floats; expected n_kv_heads*head_dim = ", kw);
    KVTRIM_CHECK(v.size() == kw, "decode: v has ", v.size(), " floats; expected n_kv_heads*head_dim = ", kw);
    KVTRIM_CHECK(out.size() == qw, "decode: out has ", out.size(), " floats; expected n_q_heads*head_dim = ", qw);
    const std::int64_t pos = position == kNextPosition ? next_pos_[layer] : position;
    KVTRIM_CHECK(pos >= next_pos_[layer], "decode: position ", pos, " goes backwards; layer ", layer,
                 " expects a position >= ", next_pos_[layer]);
    KVTRIM_CHECK(pos < kMaxPosition, "decode: position ", pos, " is too large; positions must stay below ",
                 kMaxPosition);
    check_capacity(layer, 1, /*prefill=*/false);
    check_finite(q, "decode", "q");
    check_finite(k, "decode", "k");
    check_finite(v, "decode", "v");
    impl_.decode(layer, q.data(), k.data(), v.data(), out.data(), pos);
    next_pos_[layer] = pos + 1;
  }

  // Forget everything (a new sequence); budgets and policy parameters stay.
  void reset() {
    impl_.reset();
    std::fill(next_pos_.begin(), next_pos_.end(), 0);
  }

  // ---- introspection -------------------------------------------------------------------------------
  int size(int layer, int kv_head) const { return head_checked(layer, kv_head).size(); }
  int budget(int layer, int kv_head) const { return head_checked(layer, kv_head).budget(); }
  // Original positions of the kept tokens, ascending.
  std::vector<std::int64_t> positions(int layer, int kv_head) const {
    auto p = head_checked(layer, kv_head).positions();
    std::vector<std::int64_t> out(p.begin(), p.end());
    std::sort(out.begin(), out.end());
    return out;
  }
  // Position the next decode() of this layer takes by default (= tokens seen when positions have no gaps).
  std::int64_t next_position(int layer) const {
    check_layer(layer, "next_position");
    return next_pos_[layer];
  }
  std::size_t bytes_used() const { return sum_heads([](const auto& h) { return h.bytes_used(); }); }
  std::size_t bytes_reserved() const { return sum_heads([](const auto& h) { return h.bytes_reserved(); }); }
  std::uint64_t evictions() const { return sum_heads([](const auto& h) { return h.evictions(); }); }
  std::uint64_t merges() const { return sum_heads([](const auto& h) { return h.merges(); }); }

  // Backend access for tests, benchmarks and advanced users (per-slot keys, metadata, policy state).
  auto& backend() { return impl_; }
  const auto& backend() const { return impl_; }
  P& policy(int layer) {
    check_layer(layer, "policy");
    return impl_.policy(layer);
  }

 private:
  void check_layer(int layer, const char* what) const {
    KVTRIM_CHECK(layer >= 0 && layer < cfg_.n_layers, what, ": layer ", layer, " out of range 0..",
                 cfg_.n_layers - 1);
  }
  const auto& head_checked(int layer, int kv_head) const {
    check_layer(layer, "head");
    KVTRIM_CHECK(kv_head >= 0 && kv_head < cfg_.n_kv_heads, "KV head ", kv_head, " out of range 0..",
                 cfg_.n_kv_heads - 1);
    return impl_.head(layer, kv_head);
  }
  // A policy that never evicts (FullCache; a prompt compressor over FullCache once its prompt is done) cannot make
  // room: refuse the tokens before anything changes.
  void check_capacity(int layer, int incoming, bool prefill) const {
    if (!(prefill ? never_evicts_in_prefill<P>() : never_evicts_in_decode<P>())) return;
    for (int h = 0; h < cfg_.n_kv_heads; ++h) {
      const auto& head = impl_.head(layer, h);
      KVTRIM_CHECK(head.size() + incoming <= head.budget(), prefill ? "prefill" : "decode", ": ", P::kName,
                   " never evicts and layer ", layer,
                   " KV head ", h, " holds ", head.size(), " of its ", head.budget(), " tokens; ", incoming,
                   " more do not fit (raise the budget or choose an evicting policy)");
    }
  }
  void check_finite(std::span<const float> x, const char* op, const char* name) const {
    if (!cfg_.check_finite) return;
    bool finite = true;
    for (float e : x) finite &= (e - e) == 0.0f;  // false for NaN and +-Inf; a branch-free pass the compiler vectorises
    if (finite) return;
    for (std::size_t i = 0; i < x.size(); ++i)
      KVTRIM_CHECK(std::isfinite(x[i]), op, ": ", name, "[", i, "] is ", x[i],
                   "; inputs must be finite (NaN/Inf would make attention and eviction undefined)");
  }
  template <class F>
  auto sum_heads(F f) const {
    decltype(f(impl_.head(0, 0))) total{};
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (int h = 0; h < cfg_.n_kv_heads; ++h) total += f(impl_.head(l, h));
    return total;
  }

  CacheConfig cfg_;
  typename Backend::template Impl<P> impl_;
  std::vector<std::int64_t> next_pos_;
};

}  // namespace kvtrim
