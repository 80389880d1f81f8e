// append() (chunks after the prompt) and verify() (speculative drafts), for every registered policy:
//  - each chunk token's output is exact attention over what the layer held before the chunk plus the chunk up to
//    it (a double-precision naive reference over the stored rows);
//  - verify() writes the outputs append() writes, bit for bit, and changes nothing: the cache after
//    verify + append(accepted prefix) equals a cache that only saw append(accepted prefix);
//  - append of one token is decode() for policies that evict after attention;
//  - the kept set after a chunk follows the decode rule with eviction after the chunk (exact for StreamingLLM
//    here; H2O's slow reference in test_h2o.cpp checks its scores and kept sets through chunks).
#include <kvtrim/any_cache.hpp>

#include "testing.hpp"

namespace {

using kvtest::Tokens;

kvtrim::CacheConfig shape() { return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 40}; }


// Every head's stored state, sorted by position: positions, rows, each slot's score and protection, counters.
template <class Cache>
std::vector<float> snapshot(const Cache& c) {
  std::vector<float> s;
  const auto& cfg = c.config();
  for (int l = 0; l < cfg.n_layers; ++l) {
    s.push_back(static_cast<float>(c.next_position(l)));
    for (int h = 0; h < cfg.n_kv_heads; ++h) {
      const auto& head = c.backend().head(l, h);
      std::vector<int> order(static_cast<std::size_t>(head.size()));
      for (int i = 0; i < head.size(); ++i) order[static_cast<std::size_t>(i)] = i;
      std::sort(order.begin(), order.end(), [&](int a, int b) { return head.pos(a) < head.pos(b); });
      for (int i : order) {
        s.push_back(static_cast<float>(head.pos(i)));
        s.insert(s.end(), head.key_ptr(i), head.key_ptr(i) + head.key_dim());
        s.insert(s.end(), head.value_ptr(i), head.value_ptr(i) + head.value_dim());
        // The slot's metadata as the policy reads it (its bytes would include padding, which is not state).
        using P = typename Cache::PolicyType;
        const auto& st = c.backend().state(l, h);
        s.push_back(P::score(st, head.meta(i), head.pos(i), head.newest_pos()));
        s.push_back(P::protects(st, head.meta(i), head.pos(i), head.newest_pos()) ? 1.0f : 0.0f);
      }
      s.push_back(static_cast<float>(head.evictions()));
      s.push_back(static_cast<float>(head.merges()));
    }
  }
  return s;
}

// Prefill `prompt` tokens on every layer.
template <class Cache>
void prefill(Cache& c, const Tokens& tok, int prompt) {
  const std::size_t qw = static_cast<std::size_t>(c.config().n_q_heads) * c.config().head_dim;
  std::vector<float> out(static_cast<std::size_t>(prompt) * qw);
  for (int l = 0; l < c.config().n_layers; ++l)
    c.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt), out);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("append: every chunk token attends to what was held plus the chunk so far",
                        "[append]", kvtest::ApiPolicies) {
  using P = TestType;
  auto cfg = shape();
  if constexpr (kvtrim::never_evicts_in_decode<P>()) cfg.budget = 200;  // room for every chunk
  const int d = cfg.head_dim, g = cfg.group_size(), H = cfg.n_kv_heads;
  kvtrim::KVCache<P> cache(cfg, kvtest::registry_params<P>(cfg));
  Tokens tok(cfg, 190, 5);
  prefill(cache, tok, 30);
  int t = 30;
  for (const int T : {1, 5, 17, 3, 41, 2}) {
    for (int l = 0; l < cfg.n_layers; ++l) {
      // the stored rows before the chunk (merges may have rewritten some), then the chunk's own rows
      std::vector<std::vector<std::vector<float>>> keys(H), values(H);
      for (int h = 0; h < H; ++h) {
        const auto& head = cache.backend().head(l, h);
        for (int i = 0; i < head.size(); ++i) {
          keys[h].emplace_back(head.key_ptr(i), head.key_ptr(i) + d);
          values[h].emplace_back(head.value_ptr(i), head.value_ptr(i) + d);
        }
      }
      std::vector<float> out(static_cast<std::size_t>(T) * cfg.n_q_heads * d);
      cache.append(l, Tokens::rows(tok.q, t, t + T), Tokens::rows(tok.k, t, t + T), Tokens::rows(tok.v, t, t + T), out);
      for (int h = 0; h < H; ++h)
        for (int u = 0; u < T; ++u) {
          keys[h].emplace_back(tok.k[t + u].begin() + h * d, tok.k[t + u].begin() + (h + 1) * d);
          values[h].emplace_back(tok.v[t + u].begin() + h * d, tok.v[t + u].begin() + (h + 1) * d);
          std::vector<const float*> kp, vp;
          for (std::size_t j = 0; j < keys[h].size(); ++j) kp.push_back(keys[h][j].data()), vp.push_back(values[h][j].data());
          for (int gi = 0; gi < g; ++gi) {
            const int qh = h * g + gi;
            const auto want = kvtest::naive_attention(tok.q[t + u].data() + qh * d, kp, vp, d);
            const float* got = out.data() + (static_cast<std::size_t>(u) * cfg.n_q_heads + qh) * d;
            for (int e = 0; e < d; ++e) REQUIRE(std::abs(got[e] - want[e]) <= 2e-5 * (1.0 + std::abs(want[e])));
          }
        }
      kvtest::check_invariants(cache);
    }
    t += T;
  }
  for (int l = 0; l < cfg.n_layers; ++l) REQUIRE(cache.next_position(l) == t);
}

TEMPLATE_LIST_TEST_CASE("verify: append's outputs, and no trace in the cache", "[append][verify]",
                        kvtest::ApiPolicies) {
  using P = TestType;
  auto cfg = shape();
  if constexpr (kvtrim::never_evicts_in_decode<P>()) cfg.budget = 200;
  kvtrim::KVCache<P> spec(cfg, kvtest::registry_params<P>(cfg)), plain(cfg, kvtest::registry_params<P>(cfg));
  Tokens tok(cfg, 160, 9);
  prefill(spec, tok, 30);
  prefill(plain, tok, 30);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  int t = 30;
  for (const auto& [drafts, accepted] : {std::pair{4, 2}, {6, 0}, {3, 3}, {8, 5}, {1, 1}, {5, 1}}) {
    for (int l = 0; l < cfg.n_layers; ++l) {
      const auto before = snapshot(spec);
      std::vector<float> vo(static_cast<std::size_t>(drafts) * qw);
      spec.verify(l, Tokens::rows(tok.q, t, t + drafts), Tokens::rows(tok.k, t, t + drafts),
                  Tokens::rows(tok.v, t, t + drafts), vo);
      REQUIRE(snapshot(spec) == before);  // nothing changed
      if (accepted == 0) continue;
      std::vector<float> a(static_cast<std::size_t>(accepted) * qw), b(a.size());
      spec.append(l, Tokens::rows(tok.q, t, t + accepted), Tokens::rows(tok.k, t, t + accepted),
                  Tokens::rows(tok.v, t, t + accepted), a);
      plain.append(l, Tokens::rows(tok.q, t, t + accepted), Tokens::rows(tok.k, t, t + accepted),
                   Tokens::rows(tok.v, t, t + accepted), b);
      REQUIRE(a == b);
      REQUIRE(std::equal(a.begin(), a.end(), vo.begin()));  // the accepted drafts' outputs, bit for bit
    }
    REQUIRE(snapshot(spec) == snapshot(plain));  // as if the rejected drafts never came
    t += accepted;
  }
}

TEMPLATE_LIST_TEST_CASE("append of one token is decode for policies that evict after attention", "[append]",
                        kvtest::ApiPolicies) {
  using P = TestType;
  if constexpr (P::kTiming == kvtrim::EvictTiming::kAfterAttention && !kvtrim::never_evicts_in_decode<P>()) {
    const auto cfg = shape();
    kvtrim::KVCache<P> a(cfg, kvtest::registry_params<P>(cfg)), b(cfg, kvtest::registry_params<P>(cfg));
    Tokens tok(cfg, 200, 13);
    prefill(a, tok, 30);
    prefill(b, tok, 30);
    const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
    std::vector<float> oa(qw), ob(qw);
    for (int t = 30; t < 200; ++t)
      for (int l = 0; l < cfg.n_layers; ++l) {
        a.append(l, tok.q[t], tok.k[t], tok.v[t], oa);
        b.decode(l, tok.q[t], tok.k[t], tok.v[t], ob);
        REQUIRE(oa == ob);
      }
    REQUIRE(snapshot(a) == snapshot(b));
  }
}

TEST_CASE("append: StreamingLLM keeps its sinks and the newest tokens after each chunk", "[append]") {
  const auto cfg = shape();
  kvtrim::KVCache<kvtrim::StreamingLLM> cache(cfg, {.sinks = 3});
  Tokens tok(cfg, 150, 21);
  prefill(cache, tok, 10);
  int t = 10;
  for (const int T : {7, 33, 1, 50, 12}) {
    std::vector<float> out(static_cast<std::size_t>(T) * cfg.n_q_heads * cfg.head_dim);
    for (int l = 0; l < cfg.n_layers; ++l)
      cache.append(l, Tokens::rows(tok.q, t, t + T), Tokens::rows(tok.k, t, t + T), Tokens::rows(tok.v, t, t + T), out);
    t += T;
    std::vector<std::int64_t> want{0, 1, 2};
    for (std::int64_t p = std::max<std::int64_t>(3, t - (cfg.budget - 3)); p < t; ++p) want.push_back(p);
    for (int l = 0; l < cfg.n_layers; ++l)
      for (int h = 0; h < cfg.n_kv_heads; ++h) REQUIRE(cache.positions(l, h) == want);
    REQUIRE(cache.bytes_reserved() == 2u * 2u * 41u * cache.backend().head(0, 0).bytes_per_slot());  // memory back
  }
}

TEST_CASE("append and verify refuse what does not fit or is malformed, and change nothing", "[append][errors]") {
  const auto cfg = shape();
  kvtrim::KVCache<kvtrim::FullCache> full(cfg);
  Tokens tok(cfg, 60, 3);
  prefill(full, tok, 30);
  std::vector<float> out(11 * 32);
  REQUIRE_THROWS_WITH(full.append(0, Tokens::rows(tok.q, 30, 41), Tokens::rows(tok.k, 30, 41),
                                  Tokens::rows(tok.v, 30, 41), out),
                      Catch::Contains("never evicts"));
  REQUIRE(full.size(0, 0) == 30);
  REQUIRE(full.next_position(0) == 30);
  REQUIRE_THROWS_WITH(full.verify(0, Tokens::rows(tok.q, 30, 41), Tokens::rows(tok.k, 30, 40),
                                  Tokens::rows(tok.v, 30, 41), out),
                      Catch::Contains("verify: K has"));
  REQUIRE_THROWS_WITH(full.append(2, Tokens::rows(tok.q, 30, 31), Tokens::rows(tok.k, 30, 31),
                                  Tokens::rows(tok.v, 30, 31), std::span<float>(out.data(), 32)),
                      Catch::Contains("layer 2 out of range"));
}
