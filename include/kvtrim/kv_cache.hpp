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
#include "dtype.hpp"
#include "error.hpp"
#include "policy.hpp"

namespace kvtrim {

template <StorageType T = float>
struct CpuBackend;  // cpu_backend.hpp (T: the storage type); any backend with the same Impl interface works
template <class P, class Backend>
class KVBatch;  // batch.hpp

// decode() without an explicit position takes the next one after the layer's last token.
inline constexpr std::int64_t kNextPosition = -1;
// Positions stay below 2^62 so that position arithmetic (windows, next position) cannot overflow.
inline constexpr std::int64_t kMaxPosition = std::int64_t{1} << 62;

template <class P, class Backend = CpuBackend<>>
class KVCache {
  static_assert(check_policy<P>(), "kvtrim: KVCache's first template argument must be a kvtrim::Policy");

 public:
  using PolicyType = P;
  using Params = typename P::Params;

  explicit KVCache(CacheConfig cfg, Params params = {})
      : cfg_((cfg.validate(), std::move(cfg))),
        impl_(cfg_, params),
        next_pos_(static_cast<std::size_t>(cfg_.n_layers), 0),
        pending_(static_cast<std::size_t>(cfg_.n_layers), 0) {}

  // Bytes a cache of this configuration reserves, computed without allocating it (the parameters are validated:
  // kvtrim::Error as from the constructor). The constructor refuses a configuration that cannot fit in memory.
  static std::size_t bytes_required(const CacheConfig& cfg, const Params& params = {}) {
    cfg.validate();
    return Backend::template Impl<P>::bytes_required(cfg, params).value();
  }

  const CacheConfig& config() const { return cfg_; }
  static constexpr std::string_view policy_name() { return P::kName; }

  // Prompt of T tokens for one layer: Q [T x n_q_heads*head_dim], K and V [T x n_kv_heads*head_dim],
  // row-major (token t's heads side by side). Writes causal attention for every prompt token into out
  // [T x n_q_heads*head_dim], then the policy brings each KV head down to its budget.
  void prefill(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
               std::span<float> out) {
    const int T = check_chunk("prefill", layer, Q, K, V, out);
    KVTRIM_CHECK(next_pos_[layer] == 0, "prefill: layer ", layer, " already holds ", next_pos_[layer],
                 " tokens; prefill starts a sequence (call reset(), or feed further tokens through append or decode)");
    check_capacity(layer, T, /*prefill=*/true);
    impl_.prefill(layer, Q.data(), K.data(), V.data(), out.data(), T, 0);
    next_pos_[layer] = T;
  }

  // T more tokens for one layer, after what it holds (chunked prefill, a new chat turn, accepted draft tokens),
  // at the next T positions; same layouts as prefill. The rule: token t of the chunk attends causally to what the
  // layer kept before the chunk plus chunk tokens 0..t (no eviction inside a chunk); every chunk token then goes
  // through the policy's decode bookkeeping in order (on_insert, and on_attention with its own row of
  // probabilities, which covers the chunk tokens before it), and at the end of the chunk the decode rule evicts
  // until each head is within its limit. For T = 1 and a policy that evicts after attention this is decode().
  // Memory: a head holds up to budget + T tokens while the chunk is processed.
  void append(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
              std::span<float> out) {
    const int T = check_chunk("append", layer, Q, K, V, out);
    check_positions("append", layer, T);
    check_capacity(layer, T, /*prefill=*/false);
    impl_.append(layer, Q.data(), K.data(), V.data(), out.data(), T, next_pos_[layer]);
    next_pos_[layer] += T;
  }

  // Speculative decoding: the outputs append() would write for these T draft tokens, and nothing else: the cache
  // does not change (kept tokens, metadata, policy state, counters, positions). Accept a prefix of n drafts by
  // append()ing their rows: their outputs equal the ones returned here, and the rejected drafts leave no trace
  // because they never entered.
  void verify(int layer, std::span<const float> Q, std::span<const float> K, std::span<const float> V,
              std::span<float> out) {
    const int T = check_chunk("verify", layer, Q, K, V, out);
    check_positions("verify", layer, T);
    impl_.verify(layer, Q.data(), K.data(), V.data(), out.data(), T, next_pos_[layer]);
  }

  // One new token for one layer: q [n_q_heads*head_dim], k and v [n_kv_heads*head_dim]; writes attention
  // over what the cache keeps plus the new token (unless the policy evicts before attention) into out
  // [n_q_heads*head_dim]. `position` must increase from call to call (gaps allowed).
  void decode(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
              std::span<float> out, std::int64_t position = kNextPosition) {
    const std::int64_t pos = check_decode(layer, q, k, v, out, position);
    impl_.decode(layer, q.data(), k.data(), v.data(), out.data(), pos);
    next_pos_[layer] = pos + 1;
  }

  // Every check decode() makes, without changing anything; returns the position the token would take.
  std::int64_t check_decode(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
                            std::span<float> out, std::int64_t position = kNextPosition) const {
    const std::int64_t pos = check_step("decode", layer, q, k, v, position);
    const std::size_t qw = static_cast<std::size_t>(cfg_.n_q_heads) * cfg_.head_dim;
    KVTRIM_CHECK(out.size() == qw, "decode: out has ", out.size(), " floats; expected n_q_heads*head_dim = ", qw);
    return pos;
  }

  // ---- fp16 / bf16 activations --------------------------------------------------------------------------
  // An engine that runs in half or bfloat16 passes its rows as they are: prefill, append, verify and decode take
  // kvtrim::half or kvtrim::bfloat16 spans (same layouts, host memory). The rows widen to float exactly, the call
  // runs in fp32 as above (the same checks and decisions as the float call on the widened rows), and the outputs
  // are rounded to the input type (to nearest even) once the call has succeeded: a refused call leaves `out`
  // untouched too. The float copies are kept, so a decode loop allocates nothing after its first step.
  // A compile-time check: 16-bit rows are widened on the host, so they must live there (KVBatch uses it too).
  static constexpr void host_inputs_only() {
    static_assert(!requires(const typename Backend::template Impl<P>& i, const void* p) { i.is_device_memory(p); },
                  "kvtrim: half/bfloat16 rows are converted on the host; a device backend takes float rows (or "
                  "16-bit storage through CudaBackend<T> with float inputs)");
  }
  template <Activation16 A>
  void prefill(int layer, std::span<const A> Q, std::span<const A> K, std::span<const A> V, std::span<A> out) {
    widened(Q, K, V, out, [&](auto q, auto k, auto v, auto o) { prefill(layer, q, k, v, o); });
  }
  template <Activation16 A>
  void append(int layer, std::span<const A> Q, std::span<const A> K, std::span<const A> V, std::span<A> out) {
    widened(Q, K, V, out, [&](auto q, auto k, auto v, auto o) { append(layer, q, k, v, o); });
  }
  template <Activation16 A>
  void verify(int layer, std::span<const A> Q, std::span<const A> K, std::span<const A> V, std::span<A> out) {
    widened(Q, K, V, out, [&](auto q, auto k, auto v, auto o) { verify(layer, q, k, v, o); });
  }
  template <Activation16 A>
  void decode(int layer, std::span<const A> q, std::span<const A> k, std::span<const A> v, std::span<A> out,
              std::int64_t position = kNextPosition) {
    widened(q, k, v, out, [&](auto q32, auto k32, auto v32, auto o) { decode(layer, q32, k32, v32, o, position); });
  }

  // ---- decide-only steps: the engine runs its own attention kernel over the kept rows -------------------
  // insert(layer, q, k, v) makes a decode step's token join (checked like decode; a policy that evicts before
  // attention evicts now); view(layer, kv_head) then shows the rows this step attends to; the engine computes
  // attention itself and hands back what the policy needs with observe(layer, probs, stride): the probabilities
  // of query head h over its KV head's slots, in slot order, at probs[h * stride + slot] (nothing is read for a
  // policy that does not use attention: pass an empty span). observe() finishes the step (the policy's attention
  // rule, then eviction after attention). Every insert() must be followed by the layer's observe() before the
  // layer's next call. Not for low-rank storage (the engine would have to project its queries).
  struct View {
    const void* keys;                 // [size x key_dim] in the backend's storage type (host or device memory)
    const void* values;               // [size x value_dim]
    const std::int64_t* positions;    // [size], slots are unordered
    int size, key_dim, value_dim;
  };
  void insert(int layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
              std::int64_t position = kNextPosition) {
    static_assert(!requires(const P& p) { p.key_width(0); },
                  "kvtrim: insert/observe are not available with low-rank storage (queries would need projecting)");
    check_layer(layer, "insert");
    const std::int64_t pos = check_step("insert", layer, q, k, v, position);
    impl_.insert_step(layer, q.data(), k.data(), v.data(), pos);
    next_pos_[layer] = pos + 1;
    pending_[layer] = 1;
  }
  View view(int layer, int kv_head) const {
    const auto& h = head_checked(layer, kv_head);
    return {h.key_data(), h.value_data(), h.positions().data(), h.size(), h.key_dim(), h.value_dim()};
  }
  // The stride observe() expects at least: the most slots any head of the layer can hold during a step.
  int max_slots(int layer) const {
    check_layer(layer, "max_slots");
    int m = 0;
    for (int h = 0; h < cfg_.n_kv_heads; ++h) m = std::max(m, impl_.head(layer, h).budget() + 1);
    return m;
  }
  void observe(int layer, std::span<const float> probs, int stride) {
    check_layer(layer, "observe");
    KVTRIM_CHECK(pending_[layer], "observe: layer ", layer, " has no insert() to finish");
    if constexpr (has(P::kSignals, Signals::kAttention)) {
      KVTRIM_CHECK(stride >= max_slots(layer), "observe: stride ", stride, " is below max_slots(", layer, ") = ",
                   max_slots(layer));
      const std::size_t want = static_cast<std::size_t>(cfg_.n_q_heads) * stride;
      KVTRIM_CHECK(probs.size() >= want, "observe: probs has ", probs.size(), " floats; expected n_q_heads * stride = ",
                   want, " (", P::kName, " reads attention probabilities)");
      check_finite(probs, "observe", "probs");
    }
    impl_.observe_step(layer, probs.data(), stride);
    pending_[layer] = 0;
  }

  // Forget everything (a new sequence); budgets and policy parameters stay.
  void reset() {
    impl_.reset();
    std::fill(next_pos_.begin(), next_pos_.end(), 0);
    std::fill(pending_.begin(), pending_.end(), 0);
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
  // Shapes, position, capacity and values of one token (decode, insert); returns its position.
  std::int64_t check_step(const char* op, int layer, std::span<const float> q, std::span<const float> k,
                          std::span<const float> v, std::int64_t position) const {
    check_layer(layer, op);
    check_not_pending(op, layer);
    const std::size_t qw = static_cast<std::size_t>(cfg_.n_q_heads) * cfg_.head_dim;
    const std::size_t kw = static_cast<std::size_t>(cfg_.n_kv_heads) * cfg_.head_dim;
    KVTRIM_CHECK(q.size() == qw, op, ": q has ", q.size(), " floats; expected n_q_heads*head_dim = ", qw);
    KVTRIM_CHECK(k.size() == kw, op, ": k has ", k.size(), " floats; expected n_kv_heads*head_dim = ", kw);
    KVTRIM_CHECK(v.size() == kw, op, ": v has ", v.size(), " floats; expected n_kv_heads*head_dim = ", kw);
    const std::int64_t pos = position == kNextPosition ? next_pos_[layer] : position;
    KVTRIM_CHECK(pos >= next_pos_[layer], op, ": position ", pos, " goes backwards; layer ", layer,
                 " expects a position >= ", next_pos_[layer]);
    KVTRIM_CHECK(pos < kMaxPosition, op, ": position ", pos, " is too large; positions must stay below ", kMaxPosition);
    check_capacity(layer, 1, /*prefill=*/false);
    check_finite(q, op, "q");
    check_finite(k, op, "k");
    check_finite(v, op, "v");
    return pos;
  }
  void check_not_pending(const char* op, int layer) const {
    KVTRIM_CHECK(!pending_[layer], op, ": layer ", layer, " has an insert() waiting for its observe()");
  }
  // Shapes and values of a chunk of T tokens (prefill, append, verify); returns T.
  int check_chunk(const char* op, int layer, std::span<const float> Q, std::span<const float> K,
                  std::span<const float> V, std::span<float> out) const {
    check_layer(layer, op);
    check_not_pending(op, layer);
    const std::size_t qw = static_cast<std::size_t>(cfg_.n_q_heads) * cfg_.head_dim;
    const std::size_t kw = static_cast<std::size_t>(cfg_.n_kv_heads) * cfg_.head_dim;
    KVTRIM_CHECK(!Q.empty() && Q.size() % qw == 0, op, ": Q has ", Q.size(),
                 " floats; expected a positive multiple of n_q_heads*head_dim = ", qw);
    const std::size_t T = Q.size() / qw;
    KVTRIM_CHECK(K.size() == T * kw, op, ": K has ", K.size(), " floats; expected T*n_kv_heads*head_dim = ", T, "*",
                 kw, " = ", T * kw);
    KVTRIM_CHECK(V.size() == T * kw, op, ": V has ", V.size(), " floats; expected T*n_kv_heads*head_dim = ", T * kw);
    KVTRIM_CHECK(out.size() == T * qw, op, ": out has ", out.size(), " floats; expected T*n_q_heads*head_dim = ",
                 T * qw);
    KVTRIM_CHECK(T <= static_cast<std::size_t>(INT32_MAX / 2), op, ": ", T, " tokens are too many for one call");
    check_finite(Q, op, "Q");
    check_finite(K, op, "K");
    check_finite(V, op, "V");
    return static_cast<int>(T);
  }
  // The next T positions of a layer stay below kMaxPosition.
  void check_positions(const char* op, int layer, int T) const {
    KVTRIM_CHECK(next_pos_[layer] < kMaxPosition - T, op, ": positions ", next_pos_[layer], "..",
                 next_pos_[layer] + T - 1, " reach the limit ", kMaxPosition);
  }
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
    if constexpr (requires { impl_.is_device_memory(x.data()); })  // never read device memory on the host
      KVTRIM_CHECK(!impl_.is_device_memory(x.data()), op, ": ", name,
                   " is in device memory and CacheConfig::check_finite is on, which reads inputs on the host; "
                   "check them on the device and set check_finite = false (the caller's promise that they are finite)");
    bool finite = true;
    for (float e : x) finite &= (e - e) == 0.0f;  // false for NaN and +-Inf; a branch-free pass the compiler vectorises
    if (finite) return;
    for (std::size_t i = 0; i < x.size(); ++i)
      KVTRIM_CHECK(std::isfinite(x[i]), op, ": ", name, "[", i, "] is ", x[i],
                   "; inputs must be finite (NaN/Inf would make attention and eviction undefined)");
  }
  // call(q, k, v, out) as float spans over the widened rows; then the output rounded into `out`.
  template <Activation16 A, class Call>
  void widened(std::span<const A> q, std::span<const A> k, std::span<const A> v, std::span<A> out, Call&& call) {
    host_inputs_only();
    call(io_.widen(0, q), io_.widen(1, k), io_.widen(2, v), io_.output(out.size()));
    io_.narrow(out);
  }
  template <class F>
  auto sum_heads(F f) const {
    decltype(f(impl_.head(0, 0))) total{};
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (int h = 0; h < cfg_.n_kv_heads; ++h) total += f(impl_.head(l, h));
    return total;
  }

  template <class, class>
  friend class KVBatch;  // runs checked decode steps of many caches on one thread pool

  CacheConfig cfg_;
  typename Backend::template Impl<P> impl_;
  std::vector<std::int64_t> next_pos_;
  std::vector<char> pending_;  // per layer: an insert() waits for its observe()
  detail::WidenedRows io_;     // float copies of 16-bit calls
};

}  // namespace kvtrim
