// L2Norm: keeps the lowest-norm keys. Hand-built victims, a differential test against a plain-loop reference
// (exact integer norms, so ties are frequent and the tie rule is exercised), protection, skipped layers,
// the FullCache equivalence and parameter errors.
#include <kvtrim/policies/l2_norm.hpp>

#include <map>

#include "property.hpp"
#include "testing.hpp"

using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::KVCache;
using kvtrim::L2Norm;

namespace {

std::vector<std::int64_t> sorted(std::vector<std::int64_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// Keys with entries m/4, m in -4..4: the squared norm is (sum of m^2)/16, exact in float, so the reference can
// compare integers and equal integers mean equal float norms.
void quantize_keys(Tokens& tok, std::uint64_t seed) {
  kvtest::Rng rng(seed);
  for (auto& k : tok.k)
    for (auto& x : k) x = static_cast<float>(rng.uniform_int(-4, 4)) / 4.0f;
}
int sq_units(const std::vector<float>& k, int head, int d) {
  int s = 0;
  for (int i = 0; i < d; ++i) {
    const int m = static_cast<int>(std::lround(k[static_cast<std::size_t>(head * d + i)] * 4.0f));
    s += m * m;
  }
  return s;
}

// Plain-loop reference of one (layer, KV head): the tokens it holds, as (position, squared-norm units).
struct RefHead {
  int budget = 0, sinks = 0, recent = 0;
  bool skipped = false;
  std::vector<std::pair<std::int64_t, int>> held;

  bool is_protected(std::int64_t pos, std::int64_t newest) const {
    if (pos < sinks) return true;
    return newest - pos < recent;  // the `recent` newest positions
  }
  void prompt(const std::vector<int>& sq) {
    const int T = static_cast<int>(sq.size());
    held.clear();
    if (T <= budget) {
      for (int t = 0; t < T; ++t) held.push_back({t, sq[t]});
      return;
    }
    std::vector<std::pair<std::int64_t, int>> others;
    for (int t = 0; t < T; ++t) {
      const bool prot = skipped ? t < sinks : is_protected(t, T - 1);
      (prot ? held : others).push_back({t, sq[t]});
    }
    const std::size_t room = static_cast<std::size_t>(budget) - held.size();
    if (skipped) {  // newest first
      std::sort(others.begin(), others.end(), [](auto& a, auto& b) { return a.first > b.first; });
    } else {  // smallest norm first, newer first among equal norms
      std::sort(others.begin(), others.end(),
                [](auto& a, auto& b) { return a.second != b.second ? a.second < b.second : a.first > b.first; });
    }
    for (std::size_t j = 0; j < room; ++j) held.push_back(others[j]);
  }
  void step(std::int64_t pos, int sq) {
    held.push_back({pos, sq});
    if (static_cast<int>(held.size()) <= budget) return;
    int victim = -1;
    for (int i = 0; i < static_cast<int>(held.size()); ++i) {
      const auto [p, s] = held[i];
      if (skipped ? p < sinks : is_protected(p, pos)) continue;
      if (victim < 0) {
        victim = i;
        continue;
      }
      const auto [vp, vs] = held[victim];
      if (skipped ? p < vp : (s > vs || (s == vs && p < vp))) victim = i;
    }
    REQUIRE(victim >= 0);
    held.erase(held.begin() + victim);
  }
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> p;
    for (auto& e : held) p.push_back(e.first);
    return sorted(p);
  }
};

// Prefill `prompt` tokens, then decode the rest; the cache must hold the reference's positions after every call
// and the decode output must be attention over what was held plus the new token (eviction comes after).
void run_differential(CacheConfig cfg, const L2Norm::Params& params, int prompt, int total, std::uint64_t seed) {
  KVCache<L2Norm> cache(cfg, params);
  Tokens tok(cfg, total, seed);
  quantize_keys(tok, seed + 100);
  const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
  std::vector<RefHead> ref;
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      RefHead r;
      r.budget = cfg.budget_of(l, h);
      r.sinks = params.sinks;
      r.recent = params.recent;
      r.skipped = std::find(params.skip_layers.begin(), params.skip_layers.end(), l) != params.skip_layers.end();
      ref.push_back(r);
    }
  if (prompt > 0) {
    std::vector<float> out(static_cast<std::size_t>(prompt) * cfg.n_q_heads * d);
    for (int l = 0; l < L; ++l) {
      cache.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt),
                    out);
      for (int h = 0; h < H; ++h) {
        std::vector<int> sq;
        for (int t = 0; t < prompt; ++t) sq.push_back(sq_units(tok.k[t], h, d));
        auto& r = ref[static_cast<std::size_t>(l * H + h)];
        r.prompt(sq);
        REQUIRE(cache.positions(l, h) == r.positions());
      }
    }
    kvtest::check_invariants(cache);
  }
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
  for (int t = prompt; t < total; ++t) {
    for (int l = 0; l < L; ++l) {
      std::vector<std::vector<std::int64_t>> before;
      for (int h = 0; h < H; ++h) before.push_back(cache.positions(l, h));
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      for (int h = 0; h < H; ++h) {
        auto& r = ref[static_cast<std::size_t>(l * H + h)];
        r.step(t, sq_units(tok.k[t], h, d));
        REQUIRE(cache.positions(l, h) == r.positions());
        // Attention ran over the held tokens plus the new one.
        auto attended = before[h];
        attended.push_back(t);
        kvtest::require_group_attention(tok, t, attended, h, g, out);
      }
    }
    kvtest::check_invariants(cache);
  }
}

// A single-head cache fed keys by hand.
struct OneHead {
  CacheConfig cfg;
  KVCache<L2Norm> cache;
  std::vector<float> q, v, out;
  OneHead(int budget, L2Norm::Params p)
      : cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4, .budget = budget},
        cache(cfg, std::move(p)), q(4, 0.1f), v(4, 1.0f), out(4) {}
  void push(std::vector<float> k) { cache.decode(0, q, k, v, out); }
  std::vector<std::int64_t> pos() { return cache.positions(0, 0); }
};

}  // namespace

TEST_CASE("L2Norm evicts the key with the largest norm (hand-built)", "[l2]") {
  SECTION("no protection: the largest norm leaves, even the new token") {
    OneHead c(3, {});
    c.push({1, 0, 0, 0});     // pos 0, norm 1
    c.push({0, 3, 0, 0});     // pos 1, norm 3
    c.push({0, 0, 2, 0});     // pos 2, norm 2
    REQUIRE(c.pos() == std::vector<std::int64_t>{0, 1, 2});
    c.push({0.5f, 0, 0, 0});  // pos 3, norm 0.5: pos 1 (norm 3) leaves
    REQUIRE(c.pos() == std::vector<std::int64_t>{0, 2, 3});
    c.push({3, 4, 0, 0});  // pos 4, norm 5: the new token itself leaves
    REQUIRE(c.pos() == std::vector<std::int64_t>{0, 2, 3});
    // The norm was computed at insertion: sqrt(1 + 0) etc.
    const auto& h = c.cache.backend().head(0, 0);
    for (int i = 0; i < h.size(); ++i) {
      const float want = h.pos(i) == 0 ? 1.0f : h.pos(i) == 2 ? 2.0f : 0.5f;
      REQUIRE(h.meta(i).norm == want);
    }
  }
  SECTION("equal norms: the oldest leaves") {
    OneHead c(2, {});
    c.push({0, 2, 0, 0});  // pos 0, norm 2
    c.push({2, 0, 0, 0});  // pos 1, norm 2
    c.push({0, 0, 0, 2});  // pos 2, norm 2: pos 0 leaves
    REQUIRE(c.pos() == std::vector<std::int64_t>{1, 2});
    c.push({0, 0, -2, 0});  // pos 3, norm 2: pos 1 leaves
    REQUIRE(c.pos() == std::vector<std::int64_t>{2, 3});
  }
  SECTION("recent window protects the new token; sinks protect the first positions") {
    OneHead c(3, {.sinks = 1, .recent = 1});
    c.push({9, 0, 0, 0});  // pos 0, sink with the largest norm
    c.push({0, 1, 0, 0});  // pos 1, norm 1
    c.push({0, 0, 2, 0});  // pos 2, norm 2
    c.push({0, 0, 0, 5});  // pos 3, norm 5, recent: pos 2 (largest unprotected) leaves
    REQUIRE(c.pos() == std::vector<std::int64_t>{0, 1, 3});
    c.push({0, 0.1f, 0, 0});  // pos 4: pos 3 is no longer recent and has the largest unprotected norm
    REQUIRE(c.pos() == std::vector<std::int64_t>{0, 1, 4});
  }
}

TEST_CASE("L2Norm matches a plain-loop reference over thousands of steps", "[l2][differential]") {
  SECTION("MHA, official defaults, decode only") {
    run_differential({.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 8, .budget = 24}, {}, 0, 3000, 1);
  }
  SECTION("GQA, sinks + recent, long prompt, per-head budgets") {
    CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 8, .budget = 0};
    cfg.head_budgets = {20, 31, 17, 26};
    run_differential(cfg, {.sinks = 3, .recent = 5}, 90, 3000, 2);
  }
  SECTION("GQA, skipped layer 0 with a recency fallback, sinks") {
    run_differential({.n_layers = 2, .n_kv_heads = 1, .n_q_heads = 4, .head_dim = 16, .budget = 16},
                     {.sinks = 2, .recent = 0, .skip_layers = {0}}, 40, 2500, 3);
  }
}

TEST_CASE("L2Norm without protection keeps exactly the budget lowest norms seen so far", "[l2]") {
  // An invariant independent of the step-by-step rule: after every step the kept set is the `budget`
  // tokens with the smallest norms among all tokens seen (Gaussian keys: no ties).
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 32, .budget = 40};
  KVCache<L2Norm> cache(cfg, {});
  Tokens tok(cfg, 1500, 11);
  std::vector<float> out(4 * 32);
  std::vector<std::vector<std::pair<double, std::int64_t>>> seen(2);
  for (int t = 0; t < tok.size(); ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int h = 0; h < 2; ++h) {
      double s = 0;
      for (int i = 0; i < 32; ++i) s += double(tok.k[t][h * 32 + i]) * tok.k[t][h * 32 + i];
      seen[h].push_back({std::sqrt(s), t});
      auto all = seen[h];
      std::sort(all.begin(), all.end());
      std::vector<std::int64_t> want;
      for (std::size_t j = 0; j < std::min<std::size_t>(40, all.size()); ++j) want.push_back(all[j].second);
      REQUIRE(cache.positions(0, h) == sorted(want));
    }
  }
}

TEST_CASE("L2Norm never evicts protected tokens, even with the largest norms", "[l2][protection]") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 8, .budget = 12};
  KVCache<L2Norm> cache(cfg, {.sinks = 3, .recent = 4});
  Tokens tok(cfg, 600, 5);
  // Every third token gets a huge key: as soon as it leaves the recent window it must go.
  for (int t = 0; t < tok.size(); t += 3)
    for (auto& x : tok.k[t]) x *= 50.0f;
  for (auto& x : tok.k[1]) x *= 50.0f;  // a sink with a huge norm
  std::vector<float> out(16);
  for (int t = 0; t < tok.size(); ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    kvtest::check_invariants(cache);
    for (int h = 0; h < 2; ++h) {
      const auto p = cache.positions(0, h);
      for (std::int64_t s = 0; s <= std::min<std::int64_t>(t, 2); ++s) REQUIRE(std::count(p.begin(), p.end(), s) == 1);
      for (std::int64_t r = std::max(0, t - 3); r <= t; ++r) REQUIRE(std::count(p.begin(), p.end(), r) == 1);
      // One token leaves per step and a large key leaves the window every third step, so once the start-up
      // backlog is gone (t >= 14) every large key outside the protected tokens has left.
      if (t >= 14)
        for (auto x : p)
          if (x >= 3 && x < t - 3) REQUIRE(x % 3 != 0);
    }
  }
}

TEST_CASE("L2Norm skipped layers: a recency window, or everything with a large head budget", "[l2][skip]") {
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 0};
  cfg.head_budgets = {200, 10};  // layer 0 is skipped and gets room for the whole sequence
  KVCache<L2Norm> cache(cfg, {.sinks = 2, .skip_layers = {0}});
  REQUIRE(cache.policy(0).skipped());
  REQUIRE_FALSE(cache.policy(1).skipped());
  Tokens tok(cfg, 150, 8);
  std::vector<float> out(8);
  for (int t = 0; t < 150; ++t)
    for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
  std::vector<std::int64_t> all(150);
  for (int i = 0; i < 150; ++i) all[i] = i;
  REQUIRE(cache.positions(0, 0) == all);
  REQUIRE(cache.size(1, 0) == 10);

  KVCache<L2Norm> small({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 6},
                        {.sinks = 2, .skip_layers = {0}});
  for (int t = 0; t < 50; ++t) small.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
  REQUIRE(small.positions(0, 0) == std::vector<std::int64_t>{0, 1, 46, 47, 48, 49});
}

TEST_CASE("L2Norm with a budget that holds everything equals FullCache", "[l2][full]") {
  const CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<L2Norm>({}, cfg, 20, 60);
  kvtest::check_equals_full_cache<L2Norm>({.sinks = 4, .recent = 8, .skip_layers = {0}}, cfg, 0, 50);
}

TEST_CASE("L2Norm is deterministic and its memory stays bounded", "[l2]") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 16, .budget = 32};
  KVCache<L2Norm> a(cfg, {.sinks = 1, .recent = 2}), b(cfg, {.sinks = 1, .recent = 2});
  Tokens tok(cfg, 400, 21);
  std::vector<float> oa(64), ob(64);
  std::vector<float> big(100 * 64);
  a.prefill(0, Tokens::rows(tok.q, 0, 100), Tokens::rows(tok.k, 0, 100), Tokens::rows(tok.v, 0, 100), big);
  b.prefill(0, Tokens::rows(tok.q, 0, 100), Tokens::rows(tok.k, 0, 100), Tokens::rows(tok.v, 0, 100), big);
  const std::size_t reserved = a.bytes_reserved();
  REQUIRE(reserved == 2u * 33u * a.backend().head(0, 0).bytes_per_slot());
  for (int t = 100; t < 400; ++t) {
    a.decode(0, tok.q[t], tok.k[t], tok.v[t], oa);
    b.decode(0, tok.q[t], tok.k[t], tok.v[t], ob);
    REQUIRE(oa == ob);
    REQUIRE(a.positions(0, 1) == b.positions(0, 1));
    REQUIRE(a.bytes_reserved() == reserved);
  }
}

TEST_CASE("L2Norm rejects bad parameters with a message", "[l2][errors]") {
  using Catch::Contains;
  const CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 8, .budget = 8};
  auto make = [&](L2Norm::Params p, CacheConfig c) { KVCache<L2Norm> cache(c, std::move(p)); };
  REQUIRE_THROWS_WITH(make({.sinks = -1}, cfg), Contains("sinks must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(make({.recent = -2}, cfg), Contains("recent must be >= 0, got -2"));
  REQUIRE_THROWS_WITH(make({.sinks = 8}, cfg), Contains("must be smaller than the budget 8"));
  REQUIRE_THROWS_WITH(make({.recent = 8}, cfg), Contains("recent (8)"));
  REQUIRE_THROWS_WITH(make({.sinks = 4, .recent = 4}, cfg), Contains("= 8 must be smaller than the budget 8"));
  REQUIRE_THROWS_WITH(make({.skip_layers = {2}}, cfg), Contains("skip_layers holds layer 2; expected 0..1"));
  REQUIRE_THROWS_WITH(make({.skip_layers = {-1}}, cfg), Contains("skip_layers holds layer -1"));
  CacheConfig per_head = cfg;
  per_head.head_budgets = {8, 8, 8, 3};
  REQUIRE_THROWS_WITH(make({.sinks = 1, .recent = 2}, per_head), Contains("budget 3 of layer 1 KV head 1"));
  REQUIRE_NOTHROW(make({.sinks = 1, .recent = 1}, per_head));
  REQUIRE_THROWS_AS(make({.sinks = 9}, cfg), kvtrim::Error);
}

namespace {
struct L2Spec : kvtest::prop::SpecBase<L2Norm> {
  static constexpr const char* kLabel = "L2Norm";
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p;
    p.sinks = rng.uniform_int(0, (min_budget - 1) / 2);
    p.recent = rng.uniform_int(0, min_budget - 1 - p.sinks);
    return p;
  }
  static kvtest::prop::Seen must_keep(const Policy::Params& p, int, const kvtest::prop::Seen& seen) {
    return kvtest::prop::protected_positions(seen, p.sinks, p.recent);
  }
};
}  // namespace

TEST_CASE("L2Norm: random prefill/decode/reset sequences agree with the reference model", "[l2][property]") {
  kvtest::prop::require_properties<L2Spec>(1);
}
