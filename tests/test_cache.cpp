// The cache itself: baselines, budgets, memory, positions and configuration errors.
#include "property.hpp"
#include "testing.hpp"

using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::KVCache;

namespace {
CacheConfig small(int budget) {
  return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = budget};
}
std::vector<std::int64_t> iota(std::int64_t a, std::int64_t b) {
  std::vector<std::int64_t> v;
  for (auto i = a; i < b; ++i) v.push_back(i);
  return v;
}
}  // namespace

TEST_CASE("StreamingLLM with a budget that holds everything equals FullCache", "[cache][streaming]") {
  kvtest::check_equals_full_cache<kvtrim::StreamingLLM>({.sinks = 4}, small(0), 20, 60);
  kvtest::check_equals_full_cache<kvtrim::StreamingLLM>({.sinks = 0}, small(0), 0, 40);
}

TEST_CASE("StreamingLLM keeps exactly the sinks and the most recent tokens", "[cache][streaming]") {
  SECTION("decode only, window = rest of the budget") {
    KVCache<kvtrim::StreamingLLM> cache(small(10), {.sinks = 3});
    Tokens tok(cache.config(), 50, 3);
    std::vector<float> out(32);
    for (int t = 0; t < 50; ++t) {
      for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      std::vector<std::int64_t> want = iota(0, std::min(t + 1, 3));
      const auto recent = iota(std::max<std::int64_t>(3, t + 1 - 7), t + 1);
      want.insert(want.end(), recent.begin(), recent.end());
      for (int l = 0; l < 2; ++l)
        for (int h = 0; h < 2; ++h) REQUIRE(cache.positions(l, h) == want);
      kvtest::check_invariants(cache);
    }
    REQUIRE(cache.evictions() == 4u * (50 - 10));
  }
  SECTION("prefill longer than the budget, explicit window smaller than the budget") {
    KVCache<kvtrim::StreamingLLM> cache(small(16), {.sinks = 2, .window = 5});
    Tokens tok(cache.config(), 40, 4);
    std::vector<float> out(30 * 32);
    for (int l = 0; l < 2; ++l)
      cache.prefill(l, Tokens::rows(tok.q, 0, 30), Tokens::rows(tok.k, 0, 30), Tokens::rows(tok.v, 0, 30), out);
    REQUIRE(cache.positions(1, 1) == std::vector<std::int64_t>{0, 1, 25, 26, 27, 28, 29});
    std::vector<float> o(32);
    for (int t = 30; t < 40; ++t)
      for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], o);
    REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{0, 1, 35, 36, 37, 38, 39});
    // Memory really follows the budget after a long prompt: capacity is budget + 1 per head again.
    REQUIRE(cache.bytes_reserved() == 4u * 17u * cache.backend().head(0, 0).bytes_per_slot());
  }
}

TEST_CASE("decode output over a StreamingLLM cache is attention over exactly the kept tokens", "[cache][streaming]") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 16, .budget = 12};
  KVCache<kvtrim::StreamingLLM> cache(cfg, {.sinks = 2});
  Tokens tok(cfg, 60, 9);
  std::vector<float> out(64);
  for (int t = 0; t < 60; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int kv = 0; kv < 2; ++kv) kvtest::require_group_attention(tok, t, cache.positions(0, kv), kv, 2, out);
  }
}

TEST_CASE("budgets per layer and per head are respected at every step", "[cache][budget]") {
  CacheConfig cfg = small(0);
  cfg.head_budgets = {5, 9, 13, 7};  // layer 0: heads 5, 9; layer 1: heads 13, 7
  KVCache<kvtrim::StreamingLLM> cache(cfg, {.sinks = 1});
  Tokens tok(cfg, 80, 12);
  std::vector<float> out(24 * 32);
  for (int l = 0; l < 2; ++l)
    cache.prefill(l, Tokens::rows(tok.q, 0, 24), Tokens::rows(tok.k, 0, 24), Tokens::rows(tok.v, 0, 24), out);
  std::vector<float> o(32);
  const std::size_t reserved = cache.bytes_reserved();
  for (int t = 24; t < 80; ++t) {
    for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], o);
    kvtest::check_invariants(cache);
    REQUIRE(cache.size(0, 0) == 5);
    REQUIRE(cache.size(0, 1) == 9);
    REQUIRE(cache.size(1, 0) == 13);
    REQUIRE(cache.size(1, 1) == 7);
    REQUIRE(cache.bytes_reserved() == reserved);  // nothing grows while streaming
  }
  const std::size_t slot = cache.backend().head(0, 0).bytes_per_slot();
  REQUIRE(cache.bytes_used() == (5u + 9 + 13 + 7) * slot);
  REQUIRE(reserved == (6u + 10 + 14 + 8) * slot);
}

TEST_CASE("FullCache refuses tokens beyond its capacity without changing state", "[cache][full]") {
  KVCache<kvtrim::FullCache> cache(small(4));
  Tokens tok(cache.config(), 6, 1);
  std::vector<float> out(32);
  for (int t = 0; t < 4; ++t) cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
  REQUIRE_THROWS_WITH(cache.decode(0, tok.q[4], tok.k[4], tok.v[4], out),
                      Catch::Contains("never evicts") && Catch::Contains("raise the budget"));
  REQUIRE(cache.size(0, 0) == 4);
  REQUIRE(cache.next_position(0) == 4);
  std::vector<float> big(5 * 32);
  REQUIRE_THROWS_AS(cache.prefill(1, Tokens::rows(tok.q, 0, 5), Tokens::rows(tok.k, 0, 5),
                                  Tokens::rows(tok.v, 0, 5), big),
                    kvtrim::Error);
  REQUIRE(cache.size(1, 0) == 0);
}

TEST_CASE("positions: explicit, with gaps, never backwards; reset starts over", "[cache][positions]") {
  KVCache<kvtrim::StreamingLLM> cache(small(4), {.sinks = 1});
  Tokens tok(cache.config(), 8, 2);
  std::vector<float> out(32);
  cache.decode(0, tok.q[0], tok.k[0], tok.v[0], out, 10);
  cache.decode(0, tok.q[1], tok.k[1], tok.v[1], out, 15);
  cache.decode(0, tok.q[2], tok.k[2], tok.v[2], out);  // takes 16
  REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{10, 15, 16});
  REQUIRE_THROWS_WITH(cache.decode(0, tok.q[3], tok.k[3], tok.v[3], out, 12), Catch::Contains("goes backwards"));
  REQUIRE(cache.size(0, 0) == 3);
  std::vector<float> pout(2 * 32);
  REQUIRE_THROWS_WITH(cache.prefill(0, Tokens::rows(tok.q, 0, 2), Tokens::rows(tok.k, 0, 2),
                                    Tokens::rows(tok.v, 0, 2), pout),
                      Catch::Contains("already holds"));
  cache.reset();
  REQUIRE(cache.size(0, 0) == 0);
  REQUIRE(cache.evictions() == 0);
  cache.prefill(0, Tokens::rows(tok.q, 0, 2), Tokens::rows(tok.k, 0, 2), Tokens::rows(tok.v, 0, 2), pout);
  REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{0, 1});
}

TEST_CASE("invalid configurations throw kvtrim::Error with a message", "[cache][errors]") {
  using Catch::Contains;
  auto make = [](CacheConfig c) { KVCache<kvtrim::FullCache> cache(c); };
  REQUIRE_THROWS_WITH(make({.n_layers = 0, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 4}),
                      Contains("n_layers must be > 0"));
  REQUIRE_THROWS_WITH(make({.n_layers = 1, .n_kv_heads = -2, .n_q_heads = 1, .head_dim = 8, .budget = 4}),
                      Contains("n_kv_heads must be > 0"));
  REQUIRE_THROWS_WITH(make({.n_layers = 1, .n_kv_heads = 3, .n_q_heads = 4, .head_dim = 8, .budget = 4}),
                      Contains("multiple of n_kv_heads"));
  REQUIRE_THROWS_WITH(make({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 0, .budget = 4}),
                      Contains("head_dim must be > 0"));
  REQUIRE_THROWS_WITH(make({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 0}),
                      Contains("budget must be in 1..268435456 tokens, got 0"));
  REQUIRE_THROWS_WITH(make({.n_layers = 2, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 4,
                            .head_budgets = {4}}),
                      Contains("head_budgets must have"));
  REQUIRE_THROWS_WITH(make({.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 8, .budget = 4,
                            .head_budgets = {4, -1}}),
                      Contains("head_budgets[1]"));
  REQUIRE_THROWS_WITH((KVCache<kvtrim::StreamingLLM>(small(8), {.sinks = 4, .window = 5})),
                      Contains("exceeds the budget 8"));
  REQUIRE_THROWS_WITH((KVCache<kvtrim::StreamingLLM>(small(4), {.sinks = 4})), Contains("leave room for a window"));
  REQUIRE_THROWS_WITH((KVCache<kvtrim::StreamingLLM>(small(8), {.sinks = -1})), Contains("sinks must be >= 0"));
}

TEST_CASE("mismatched input shapes and bad indices throw before any change", "[cache][errors]") {
  using Catch::Contains;
  KVCache<kvtrim::StreamingLLM> cache(small(8), {.sinks = 1});
  std::vector<float> q(32), k(16), v(16), out(32), bad(15);
  REQUIRE_THROWS_WITH(cache.decode(0, bad, k, v, out), Contains("q has 15 floats; expected n_q_heads*head_dim = 32"));
  REQUIRE_THROWS_WITH(cache.decode(0, q, bad, v, out), Contains("k has 15 floats"));
  REQUIRE_THROWS_WITH(cache.decode(0, q, k, bad, out), Contains("v has 15 floats"));
  REQUIRE_THROWS_WITH(cache.decode(0, q, k, v, bad), Contains("out has 15 floats"));
  REQUIRE_THROWS_WITH(cache.decode(2, q, k, v, out), Contains("layer 2 out of range 0..1"));
  REQUIRE_THROWS_WITH(cache.size(0, 5), Contains("KV head 5 out of range"));
  std::vector<float> Q(3 * 32), K(3 * 16), V(2 * 16), O(3 * 32);
  REQUIRE_THROWS_WITH(cache.prefill(0, Q, K, V, O), Contains("V has 32 floats"));
  REQUIRE_THROWS_WITH(cache.prefill(0, std::vector<float>(31), K, V, O), Contains("positive multiple"));
  k[3] = std::nanf("");
  REQUIRE_THROWS_WITH(cache.decode(0, q, k, v, out), Contains("k[3] is nan"));
  k[3] = 0;
  q[31] = INFINITY;
  REQUIRE_THROWS_WITH(cache.decode(0, q, k, v, out), Contains("q[31] is inf"));
  REQUIRE(cache.size(0, 0) == 0);
  REQUIRE(cache.next_position(0) == 0);
}

// ---- the property harness (property.hpp) on the two score-free policies ----------------------------------

namespace {
using kvtest::prop::Seen;

struct FullSpec : kvtest::prop::SpecBase<kvtrim::FullCache> {
  static constexpr const char* kLabel = "FullCache";
  static Policy::Params params(kvtest::Rng&, const CacheConfig&, int) { return {}; }
  static std::optional<Seen> expected(const Policy::Params&, int, const Seen& seen) { return seen; }
};

struct StreamingSpec : kvtest::prop::SpecBase<kvtrim::StreamingLLM> {
  static constexpr const char* kLabel = "StreamingLLM";
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p;
    p.sinks = rng.uniform_int(0, min_budget - 1);
    p.window = rng.uniform_int(0, 1) ? 0 : rng.uniform_int(1, min_budget - p.sinks);
    return p;
  }
  // The first `sinks` tokens sent and the newest (capacity - sinks), capacity = sinks + window or the budget.
  static std::optional<Seen> expected(const Policy::Params& p, int budget, const Seen& seen) {
    const std::size_t cap = static_cast<std::size_t>(p.window > 0 ? p.sinks + p.window : budget);
    if (seen.size() <= cap) return seen;
    const std::size_t sinks = static_cast<std::size_t>(p.sinks);
    Seen keep(seen.begin(), seen.begin() + static_cast<std::ptrdiff_t>(sinks));
    keep.insert(keep.end(), seen.end() - static_cast<std::ptrdiff_t>(cap - sinks), seen.end());
    return keep;
  }
};
}  // namespace

TEMPLATE_TEST_CASE("random prefill/decode/reset sequences agree with the reference model (10^5 steps)",
                   "[property]", FullSpec, StreamingSpec) {
  kvtest::prop::require_properties<TestType>(1);
}
