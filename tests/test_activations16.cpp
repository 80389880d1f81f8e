// Half and bfloat16 activations (KVCache and KVBatch, kv_cache.hpp "fp16 / bf16 activations"):
//  - a cache fed 16-bit rows and one fed the same values as floats stay identical step by step through prefill,
//    decode, verify and append: the 16-bit outputs are the float outputs rounded to nearest even, bit for bit,
//    and the kept positions and counters agree (a policy of each kind of rule);
//  - the 16-bit outputs are within the type's rounding of a double-precision naive reference (full cache);
//  - a refused 16-bit call (NaN, wrong size) changes nothing, its output span included;
//  - KVBatch::decode with 16-bit rows equals the float batch step on the widened rows.
#include <kvtrim/batch.hpp>

#include "testing.hpp"

namespace {

using kvtest::narrowed;
using kvtest::Rounded;
using kvtest::Tokens;
using Policies = std::tuple<kvtrim::PolicyNamed<"full">, kvtrim::PolicyNamed<"streaming">, kvtrim::PolicyNamed<"h2o">,
                            kvtrim::PolicyNamed<"snapkv+h2o">, kvtrim::PolicyNamed<"hashevict">,
                            kvtrim::PolicyNamed<"buzz">, kvtrim::PolicyNamed<"ems">>;

kvtrim::CacheConfig shape() { return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 16, .budget = 24}; }

template <class Cache>
void require_same_state(const Cache& a, const Cache& b) {
  for (int l = 0; l < a.config().n_layers; ++l) {
    REQUIRE(a.next_position(l) == b.next_position(l));
    for (int h = 0; h < a.config().n_kv_heads; ++h) REQUIRE(a.positions(l, h) == b.positions(l, h));
  }
  REQUIRE(a.evictions() == b.evictions());
  REQUIRE(a.merges() == b.merges());
}

template <class P, class A>
void lockstep() {
  auto cfg = shape();
  cfg.budget = kvtrim::never_evicts_in_decode<P>() ? 160 : 40;  // SnapKV's window (32) needs room
  const auto params = kvtest::registry_params<P>(cfg);
  kvtrim::KVCache<P> c16(cfg, params), c32(cfg, params);
  Tokens tok(cfg, 120, 3);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  const std::size_t kw = static_cast<std::size_t>(cfg.n_kv_heads) * cfg.head_dim;
  const int prompt = 50;  // over the budget: the prompt rule runs
  for (int l = 0; l < cfg.n_layers; ++l) {
    const Rounded<A> Q(Tokens::rows(tok.q, 0, prompt)), K(Tokens::rows(tok.k, 0, prompt)), V(Tokens::rows(tok.v, 0, prompt));
    std::vector<A> o16(prompt * qw);
    std::vector<float> o32(prompt * qw);
    c16.prefill(l, Q.rows(), K.rows(), V.rows(), std::span<A>(o16));
    c32.prefill(l, Q.f, K.f, V.f, o32);
    REQUIRE(o16 == narrowed<A>(o32));
  }
  int t = prompt;
  for (; t < 100; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      const Rounded<A> q(tok.q[t]), k(tok.k[t]), v(tok.v[t]);
      std::vector<A> o16(qw);
      std::vector<float> o32(qw);
      c16.decode(l, q.rows(), k.rows(), v.rows(), std::span<A>(o16));
      c32.decode(l, q.f, k.f, v.f, o32);
      REQUIRE(o16 == narrowed<A>(o32));
    }
  require_same_state(c16, c32);
  // drafts: verify four, accept two through append
  for (int l = 0; l < cfg.n_layers; ++l) {
    const Rounded<A> Q(Tokens::rows(tok.q, t, t + 4)), K(Tokens::rows(tok.k, t, t + 4)), V(Tokens::rows(tok.v, t, t + 4));
    std::vector<A> drafts(4 * qw), o16(2 * qw);
    std::vector<float> o32(2 * qw);
    c16.verify(l, Q.rows(), K.rows(), V.rows(), std::span<A>(drafts));
    c16.append(l, Q.rows().first(2 * qw), K.rows().first(2 * kw), V.rows().first(2 * kw), std::span<A>(o16));
    c32.append(l, std::span<const float>(Q.f).first(2 * qw), std::span<const float>(K.f).first(2 * kw),
               std::span<const float>(V.f).first(2 * kw), o32);
    REQUIRE(o16 == narrowed<A>(o32));
    REQUIRE(std::vector<A>(drafts.begin(), drafts.begin() + 2 * static_cast<std::ptrdiff_t>(qw)) == o16);
  }
  require_same_state(c16, c32);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("16-bit activations: the float call on the widened rows, outputs rounded", "[dtype][api]",
                        Policies) {
  SECTION("half") { lockstep<TestType, kvtrim::half>(); }
  SECTION("bfloat16") { lockstep<TestType, kvtrim::bfloat16>(); }
}

TEST_CASE("16-bit activations: outputs within the type's rounding of naive attention", "[dtype][api]") {
  auto cfg = shape();
  cfg.budget = 64;
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  Tokens tok(cfg, 40, 8);
  const int d = cfg.head_dim, g = cfg.group_size();
  std::vector<Rounded<kvtrim::half>> q, k, v;
  for (int t = 0; t < 40; ++t) {
    q.emplace_back(tok.q[t]), k.emplace_back(tok.k[t]), v.emplace_back(tok.v[t]);
    std::vector<kvtrim::half> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
    cache.decode(0, q.back().rows(), k.back().rows(), v.back().rows(), std::span<kvtrim::half>(out));
    for (int h = 0; h < cfg.n_kv_heads; ++h) {
      std::vector<const float*> keys, values;
      for (int u = 0; u <= t; ++u) keys.push_back(k[u].f.data() + h * d), values.push_back(v[u].f.data() + h * d);
      for (int r = 0; r < g; ++r) {
        const int qh = h * g + r;
        const auto ref = kvtest::naive_attention(q[t].f.data() + qh * d, keys, values, d);
        for (int i = 0; i < d; ++i)  // half keeps 11 significant bits: 2^-11 relative, plus the fp32 attention
          REQUIRE(std::abs(kvtrim::to_float(out[qh * d + i]) - ref[i]) <= std::abs(ref[i]) * 0x1p-11 + 1e-5);
      }
    }
  }
}

TEST_CASE("16-bit activations: a refused call changes nothing, its output included", "[dtype][api][errors]") {
  const auto cfg = shape();
  kvtrim::KVCache<kvtrim::H2O> cache(cfg);
  Tokens tok(cfg, 40, 4);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  for (int t = 0; t < 30; ++t) {
    std::vector<kvtrim::bfloat16> out(qw);
    const Rounded<kvtrim::bfloat16> q(tok.q[t]), k(tok.k[t]), v(tok.v[t]);
    cache.decode(0, q.rows(), k.rows(), v.rows(), std::span<kvtrim::bfloat16>(out));
  }
  const auto positions = cache.positions(0, 1);
  const auto evictions = cache.evictions();
  Rounded<kvtrim::bfloat16> q(tok.q[30]), k(tok.k[30]), v(tok.v[30]);
  const kvtrim::bfloat16 sentinel(7.0f);
  std::vector<kvtrim::bfloat16> out(qw, sentinel);
  k.a[5] = kvtrim::bfloat16(NAN);
  REQUIRE_THROWS_WITH(cache.decode(0, q.rows(), k.rows(), v.rows(), std::span<kvtrim::bfloat16>(out)),
                      Catch::Contains("decode: k[5] is nan"));
  k.a[5] = kvtrim::bfloat16(0.5f);
  std::vector<kvtrim::bfloat16> small(qw - 1, sentinel);
  REQUIRE_THROWS_WITH(cache.decode(0, q.rows(), k.rows(), v.rows(), std::span<kvtrim::bfloat16>(small)),
                      Catch::Contains("decode: out has 63 floats; expected n_q_heads*head_dim = 64"));
  std::vector<kvtrim::bfloat16> prompt_out(2 * qw, sentinel);
  const Rounded<kvtrim::bfloat16> Q(Tokens::rows(tok.q, 0, 2)), K(Tokens::rows(tok.k, 0, 2)), V(Tokens::rows(tok.v, 0, 2));
  REQUIRE_THROWS_WITH(cache.prefill(0, Q.rows(), K.rows(), V.rows(), std::span<kvtrim::bfloat16>(prompt_out)),
                      Catch::Contains("prefill: layer 0 already holds 30 tokens"));
  REQUIRE(cache.positions(0, 1) == positions);
  REQUIRE(cache.evictions() == evictions);
  REQUIRE(cache.next_position(0) == 30);
  for (auto x : out) REQUIRE(x == sentinel);
  for (auto x : small) REQUIRE(x == sentinel);
  for (auto x : prompt_out) REQUIRE(x == sentinel);
}

TEST_CASE("16-bit activations: KVBatch::decode equals the float step on the widened rows", "[dtype][batch]") {
  const auto cfg = shape();
  kvtrim::KVBatch<kvtrim::H2O> b16(cfg, {}, {.threads = 2}), b32(cfg, {}, {.threads = 2});
  const std::vector<int> ids = {b16.add(), b16.add(), b16.add()};
  for (int i = 0; i < 3; ++i) REQUIRE(b32.add() == ids[static_cast<std::size_t>(i)]);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  kvtest::Rng rng(21);
  for (int t = 0; t < 50; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      const Rounded<kvtrim::half> Q(rng.normal(3 * qw)), K(rng.normal(3 * qw / 2)), V(rng.normal(3 * qw / 2));
      std::vector<kvtrim::half> o16(3 * qw);
      std::vector<float> o32(3 * qw);
      b16.decode(l, ids, Q.rows(), K.rows(), V.rows(), std::span<kvtrim::half>(o16));
      b32.decode(l, ids, Q.f, K.f, V.f, o32);
      REQUIRE(o16 == narrowed<kvtrim::half>(o32));
    }
  for (int id : ids) require_same_state(b16.sequence(id), b32.sequence(id));
}
