// The CPU decode path: no heap allocation in steady-state decode with float or half storage (global operator
// new/delete are replaced by counting versions in this executable only), results identical for any
// CacheConfig::threads, and the vectorised attention kernel against a naive double-precision reference on shapes
// that exercise every tail (head dims not a multiple of 8, groups above 4, token counts not a multiple of the
// tiles).
#include "testing.hpp"

#include <atomic>
#include <cstdlib>
#include <new>

// ---- counting allocator ------------------------------------------------------------------------------------
// Every replaced operator new below allocates with malloc/posix_memalign, so free() is the matching release.
// GCC 12 at -O1 inlines a replaced delete next to a `new` expression and flags the pair by name alone.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<long> g_allocations{0};
std::atomic<bool> g_counting{false};
void* counted_alloc(std::size_t n, std::size_t align = 0) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  void* p = nullptr;
  if (align > alignof(std::max_align_t)) {
    if (posix_memalign(&p, align, n) != 0) p = nullptr;
  } else {
    p = std::malloc(n);
  }
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using kvtest::Tokens;

// Allocations made while f runs (this thread and the cache's worker threads).
template <class F>
long allocations_during(F&& f) {
  g_allocations.store(0);
  g_counting.store(true);
  f();
  g_counting.store(false);
  return g_allocations.load();
}

template <class P>
constexpr bool kNeverEvicts = kvtrim::never_evicts_in_decode<P>();

// Prefill, warm up, then count allocations over many decode steps (long enough for BUZZ to re-segment
// and for every policy to evict), keys and values stored as Stored.
template <class P, class Stored = float>
void check_no_alloc(int threads) {
  kvtrim::CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 32, .budget = 64};
  cfg.threads = threads;
  const int prompt = 100, warm = 200, counted = 600;
  Tokens tok(cfg, prompt + warm + counted, 99);
  kvtrim::KVCache<P, kvtrim::CpuBackend<Stored>> cache(cfg, kvtest::registry_params<P>(cfg));
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  for (int l = 0; l < cfg.n_layers; ++l) {
    auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
    std::vector<float> out(Q.size());
    cache.prefill(l, Q, K, V, out);
  }
  std::vector<float> out(qw);
  for (int t = prompt; t < prompt + warm; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
  const std::uint64_t before = cache.evictions() + cache.merges();
  const long n = allocations_during([&] {
    for (int t = prompt + warm; t < prompt + warm + counted; ++t)
      for (int l = 0; l < cfg.n_layers; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
  });
  CAPTURE(P::kName, kvtrim::storage_traits<Stored>::kName, threads);
  REQUIRE(n == 0);
  REQUIRE(cache.evictions() + cache.merges() > before);  // the counted steps really evicted
  kvtest::check_invariants(cache);
}

// Same prompt and stream with 1 thread and with `threads`: identical outputs (bit for bit), kept positions,
// and eviction counts.
template <class P>
void check_threads_identical(int threads, int n_kv, int group) {
  kvtrim::CacheConfig one{.n_layers = 2, .n_kv_heads = n_kv, .n_q_heads = n_kv * group, .head_dim = 24, .budget = 48};
  kvtrim::CacheConfig many = one;
  many.threads = threads;
  many.head_budgets.clear();
  for (int l = 0; l < one.n_layers; ++l)  // unequal budgets: heads finish at different times
    for (int h = 0; h < n_kv; ++h) many.head_budgets.push_back(40 + 8 * ((l + h) % 3));
  one.head_budgets = many.head_budgets;
  const int prompt = 70, total = 260;
  Tokens tok(one, total, 1234);
  kvtrim::KVCache<P> a(one, kvtest::registry_params<P>(one)), b(many, kvtest::registry_params<P>(many));
  REQUIRE(b.backend().threads() == std::min(threads, n_kv));
  for (int l = 0; l < one.n_layers; ++l) {
    auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
    std::vector<float> oa(Q.size()), ob(Q.size());
    a.prefill(l, Q, K, V, oa);
    b.prefill(l, Q, K, V, ob);
    REQUIRE(oa == ob);
  }
  const std::size_t qw = static_cast<std::size_t>(one.n_q_heads) * one.head_dim;
  std::vector<float> oa(qw), ob(qw);
  for (int t = prompt; t < total; ++t)
    for (int l = 0; l < one.n_layers; ++l) {
      a.decode(l, tok.q[t], tok.k[t], tok.v[t], oa);
      b.decode(l, tok.q[t], tok.k[t], tok.v[t], ob);
      REQUIRE(oa == ob);
    }
  for (int l = 0; l < one.n_layers; ++l)
    for (int h = 0; h < n_kv; ++h) REQUIRE(a.positions(l, h) == b.positions(l, h));
  REQUIRE(a.evictions() == b.evictions());
  REQUIRE(a.merges() == b.merges());
  kvtest::check_invariants(b);
}

}  // namespace


TEST_CASE("steady-state decode of FullCache allocates nothing, with 1 and 2 threads", "[no_alloc]") {
  // FullCache never evicts: give it room for the whole stream and check the steps still allocate nothing.
  {
    kvtrim::CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 32, .budget = 700};
    for (int threads : {1, 2}) {
      cfg.threads = threads;
      Tokens tok(cfg, 600, 5);
      kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
      std::vector<float> out(8 * 32);
      for (int t = 0; t < 100; ++t)
        for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      const long n = allocations_during([&] {
        for (int t = 100; t < 600; ++t)
          for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      });
      CAPTURE(threads);
      REQUIRE(n == 0);
      REQUIRE(cache.size(1, 1) == 600);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("steady-state decode of every evicting policy allocates nothing, with 1 and 2 threads",
                        "[no_alloc]", kvtrim::RegisteredPolicies) {
  if constexpr (!kNeverEvicts<TestType>) {
    check_no_alloc<TestType>(1);
    check_no_alloc<TestType>(2);
    check_no_alloc<TestType, kvtrim::half>(1);  // 16-bit storage: merges widen key rows into kept scratch
  }
}

TEST_CASE("the counting allocator sees allocations (the no-allocation test can fail)", "[no_alloc]") {
  std::vector<float>* v = nullptr;
  const long n = allocations_during([&] { v = new std::vector<float>(100); });
  delete v;
  REQUIRE(n == 2);
}

TEMPLATE_LIST_TEST_CASE("threads over KV heads give results identical to one thread, for every evicting policy",
                        "[threads]", kvtrim::RegisteredPolicies) {
  if constexpr (!kNeverEvicts<TestType>) {
    check_threads_identical<TestType>(2, 4, 2);
    check_threads_identical<TestType>(3, 5, 1);
  }
}

TEST_CASE("threads over KV heads give results identical to one thread", "[threads]") {
  // FullCache: decode only, within capacity; more threads than heads.
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 6, .head_dim = 16, .budget = 200};
  kvtrim::CacheConfig cfg4 = cfg;
  cfg4.threads = 4;
  Tokens tok(cfg, 150, 3);
  kvtrim::KVCache<kvtrim::FullCache> a(cfg), b(cfg4);
  REQUIRE(b.backend().threads() == 2);
  std::vector<float> oa(6 * 16), ob(6 * 16);
  for (int t = 0; t < 150; ++t) {
    a.decode(0, tok.q[t], tok.k[t], tok.v[t], oa);
    b.decode(0, tok.q[t], tok.k[t], tok.v[t], ob);
    REQUIRE(oa == ob);
  }
}

TEST_CASE("threads: errors from a worker thread reach the caller; bad thread counts are rejected", "[threads]") {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 4, .n_q_heads = 4, .head_dim = 8, .budget = 10};
  cfg.threads = 0;
  REQUIRE_THROWS_WITH(kvtrim::KVCache<kvtrim::FullCache>(cfg), Catch::Contains("threads") && Catch::Contains("0"));
  cfg.threads = -2;
  REQUIRE_THROWS_AS(kvtrim::KVCache<kvtrim::StreamingLLM>(cfg), kvtrim::Error);
  // A copy of a threaded cache has its own pool and continues identically.
  cfg.threads = 2;
  Tokens tok(cfg, 40, 8);
  kvtrim::KVCache<kvtrim::StreamingLLM> a(cfg, {.sinks = 2});
  std::vector<float> oa(32), ob(32);
  for (int t = 0; t < 20; ++t) a.decode(0, tok.q[t], tok.k[t], tok.v[t], oa);
  kvtrim::KVCache<kvtrim::StreamingLLM> b = a;
  REQUIRE(b.backend().threads() == 2);
  for (int t = 20; t < 40; ++t) {
    a.decode(0, tok.q[t], tok.k[t], tok.v[t], oa);
    b.decode(0, tok.q[t], tok.k[t], tok.v[t], ob);
    REQUIRE(oa == ob);
  }
}

namespace {
// A policy that protects every token of KV head 2: eviction there fails inside a worker thread.
struct AllProtectedOnHead2 {
  struct Params {};
  struct SlotMeta {};
  struct State {
    bool all = false;
  };
  static constexpr std::string_view kName = "all_protected_test";
  static constexpr kvtrim::Signals kSignals = kvtrim::Signals::kNone;
  static constexpr kvtrim::EvictTiming kTiming = kvtrim::EvictTiming::kAfterAttention;
  AllProtectedOnHead2(const Params&, const kvtrim::LayerContext&) {}
  State initial(int kv_head, int) const { return {kv_head == 2}; }
  static void on_insert(State&, SlotMeta&, std::int64_t, const kvtrim::TokenInputs&) {}
  static bool protects(const State& s, const SlotMeta&, std::int64_t, std::int64_t) { return s.all; }
  static float score(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return 0.0f; }
  static float prompt_score(const State&, SlotMeta&, int, const kvtrim::PromptSums&) { return 0.0f; }
};
}  // namespace

TEST_CASE("threads: an error on one head is rethrown by decode", "[threads]") {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 4, .n_q_heads = 4, .head_dim = 8, .budget = 3};
  cfg.threads = 2;
  Tokens tok(cfg, 5, 1);
  kvtrim::KVCache<AllProtectedOnHead2> cache(cfg);
  std::vector<float> out(32);
  for (int t = 0; t < 3; ++t) cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
  REQUIRE_THROWS_WITH(cache.decode(0, tok.q[3], tok.k[3], tok.v[3], out),
                      Catch::Contains("KV head 2") && Catch::Contains("every token is protected"));
}

TEST_CASE("decode kernel matches naive attention on tail shapes (d % 8 != 0, groups > 4, odd n)", "[kernel]") {
  struct Shape {
    int g, d;
  };
  const Shape shapes[] = {{1, 1}, {1, 5}, {2, 12}, {3, 20}, {5, 36}, {8, 8}, {6, 72}, {4, 128}, {9, 64}, {1, 130}};
  kvtest::Rng rng(77);
  for (auto s : shapes)
    for (int n : {1, 2, 7, 9, 17, 33, 100, 1031}) {
      CAPTURE(s.g, s.d, n);
      const auto K = rng.normal(static_cast<std::size_t>(n) * s.d), V = rng.normal(K.size());
      const auto Q = rng.normal(static_cast<std::size_t>(s.g) * s.d, 2.0f);
      std::vector<float> P(static_cast<std::size_t>(s.g) * n), O(static_cast<std::size_t>(s.g) * s.d);
      const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
      kvtrim::detail::attend(K.data(), V.data(), n, s.d, s.d, Q.data(), s.g, scale, P.data(), O.data());
      std::vector<const float*> keys, values;
      for (int i = 0; i < n; ++i) {
        keys.push_back(K.data() + static_cast<std::size_t>(i) * s.d);
        values.push_back(V.data() + static_cast<std::size_t>(i) * s.d);
      }
      for (int a = 0; a < s.g; ++a) {
        const auto ref = kvtest::naive_attention(Q.data() + static_cast<std::size_t>(a) * s.d, keys, values, s.d);
        for (int c = 0; c < s.d; ++c) REQUIRE(std::abs(O[static_cast<std::size_t>(a) * s.d + c] - ref[c]) < 2e-5);
        // Probabilities: a distribution, and the reference's weights (recomputed here in double).
        double m = -INFINITY, z = 0, total = 0;
        std::vector<double> e(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
          double dot = 0;
          for (int c = 0; c < s.d; ++c) dot += double(Q[static_cast<std::size_t>(a) * s.d + c]) * double(keys[i][c]);
          e[i] = dot / std::sqrt(double(s.d));
          m = std::max(m, e[i]);
        }
        for (auto& x : e) z += (x = std::exp(x - m));
        for (int i = 0; i < n; ++i) {
          const float p = P[static_cast<std::size_t>(a) * n + i];
          total += p;
          REQUIRE(std::abs(p - e[i] / z) < 1e-6 + 1e-5 * e[i] / z);
        }
        REQUIRE(std::abs(total - 1.0) < 1e-5);
      }
    }
}

TEST_CASE("decode kernel and the portable path agree; extreme logits stay finite", "[kernel]") {
  kvtest::Rng rng(5);
  for (int n : {3, 64, 257})
    for (float qscale : {1.0f, 300.0f}) {  // 300: logits in the thousands, most probabilities underflow to 0
      const int g = 4, d = 40;
      const auto K = rng.normal(static_cast<std::size_t>(n) * d), V = rng.normal(K.size());
      const auto Q = rng.normal(static_cast<std::size_t>(g) * d, qscale);
      std::vector<float> P1(static_cast<std::size_t>(g) * n), P2(P1.size()), O1(static_cast<std::size_t>(g) * d),
          O2(O1.size());
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      kvtrim::detail::attend(K.data(), V.data(), n, d, d, Q.data(), g, scale, P1.data(), O1.data());
      kvtrim::detail::attend_portable(K.data(), V.data(), n, d, d, Q.data(), g, scale, P2.data(), O2.data());
      for (std::size_t i = 0; i < P1.size(); ++i) {
        REQUIRE(std::isfinite(P1[i]));
        REQUIRE(std::abs(P1[i] - P2[i]) < 1e-6);
      }
      for (std::size_t i = 0; i < O1.size(); ++i) REQUIRE(std::abs(O1[i] - O2[i]) < 1e-4);
    }
}
