// The decide-only path (KVCache::insert / view / observe): the engine runs attention itself over the kept rows
// and hands the probabilities back. For every registered policy with full-width storage, a cache driven that
// way by an engine that attends in double precision keeps exactly the tokens that decode() keeps, and the
// engine's outputs over view() equal decode()'s outputs. Misuse is refused and changes nothing.
#include <kvtrim/kvtrim.hpp>

#include "testing.hpp"

namespace {

using kvtest::Tokens;

kvtrim::CacheConfig shape() { return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 40}; }

// The engine's side of one step for KV head h: attention of its query group over view(), in double precision.
// Writes the probabilities at probs[qh * stride + slot] and returns the outputs [group x d].
template <class View>
std::vector<double> engine_attention(const View& v, const float* q, int group,
                                     int first_q_head, int stride, std::vector<float>& probs) {
  const int d = v.key_dim;
  const auto* keys = static_cast<const float*>(v.keys);
  const auto* values = static_cast<const float*>(v.values);
  std::vector<double> out(static_cast<std::size_t>(group) * d, 0.0), s(static_cast<std::size_t>(v.size));
  for (int r = 0; r < group; ++r) {
    const float* qr = q + static_cast<std::size_t>(r) * d;
    double m = -INFINITY, z = 0.0;
    for (int j = 0; j < v.size; ++j) {
      double dot = 0.0;
      for (int e = 0; e < d; ++e) dot += double(qr[e]) * double(keys[static_cast<std::size_t>(j) * d + e]);
      s[static_cast<std::size_t>(j)] = dot / std::sqrt(double(d));
      m = std::max(m, s[static_cast<std::size_t>(j)]);
    }
    for (auto& e : s) z += (e = std::exp(e - m));
    for (int j = 0; j < v.size; ++j) {
      const double p = s[static_cast<std::size_t>(j)] / z;
      probs[static_cast<std::size_t>(first_q_head + r) * stride + j] = static_cast<float>(p);
      for (int e = 0; e < d; ++e)
        out[static_cast<std::size_t>(r) * d + e] += p * double(values[static_cast<std::size_t>(j) * v.value_dim + e]);
    }
  }
  return out;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("insert + the engine's own attention over view() + observe() decides what decode() decides",
                        "[decide-only]", kvtest::ApiPolicies) {
  using P = TestType;
  if constexpr (!kvtrim::Entry<P>::kNeedsBasis) {  // low-rank storage has no decide-only path (static_assert)
    auto cfg = shape();
    int steps = 200;
    if constexpr (kvtrim::never_evicts_in_decode<P>()) cfg.budget = 300;
    const auto params = kvtrim::entry_of<P>().params();
    kvtrim::KVCache<P> plain(cfg, params), engine(cfg, params);
    const int d = cfg.head_dim, g = cfg.group_size(), Hq = cfg.n_q_heads;
    Tokens tok(cfg, 30 + steps, 77);
    std::vector<float> out(30 * static_cast<std::size_t>(Hq) * d);
    for (int l = 0; l < cfg.n_layers; ++l) {
      const auto Q = Tokens::rows(tok.q, 0, 30), K = Tokens::rows(tok.k, 0, 30), V = Tokens::rows(tok.v, 0, 30);
      plain.prefill(l, Q, K, V, out);
      engine.prefill(l, Q, K, V, out);
    }
    std::vector<float> want(static_cast<std::size_t>(Hq) * d);
    for (int t = 30; t < 30 + steps; ++t)
      for (int l = 0; l < cfg.n_layers; ++l) {
        plain.decode(l, tok.q[t], tok.k[t], tok.v[t], want);
        engine.insert(l, tok.q[t], tok.k[t], tok.v[t]);
        const int stride = engine.max_slots(l);
        std::vector<float> probs(static_cast<std::size_t>(Hq) * stride, -1.0f);
        for (int h = 0; h < cfg.n_kv_heads; ++h) {
          const auto view = engine.view(l, h);
          REQUIRE(view.size == engine.size(l, h));
          const auto got = engine_attention(view, tok.q[t].data() + static_cast<std::size_t>(h) * g * d, g, h * g,
                                            stride, probs);
          for (int e = 0; e < g * d; ++e) {
            const double w = want[static_cast<std::size_t>(h) * g * d + e];
            REQUIRE(std::abs(got[static_cast<std::size_t>(e)] - w) <= 2e-5 * (1.0 + std::abs(w)));
          }
        }
        if constexpr (has(P::kSignals, kvtrim::Signals::kAttention))
          engine.observe(l, probs, stride);
        else
          engine.observe(l, {}, 0);  // nothing to hand back: the policy reads no attention
        for (int h = 0; h < cfg.n_kv_heads; ++h) REQUIRE(engine.positions(l, h) == plain.positions(l, h));
        REQUIRE(engine.evictions() == plain.evictions());
      }
  }
}

TEST_CASE("decide-only misuse is refused and changes nothing", "[decide-only][errors]") {
  const auto cfg = shape();
  kvtrim::KVCache<kvtrim::PolicyNamed<"h2o">> cache(cfg);
  Tokens tok(cfg, 40, 5);
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim);
  cache.decode(0, tok.q[0], tok.k[0], tok.v[0], out);
  REQUIRE_THROWS_WITH(cache.observe(0, {}, 0), Catch::Contains("has no insert() to finish"));
  cache.insert(0, tok.q[1], tok.k[1], tok.v[1]);
  REQUIRE_THROWS_WITH(cache.decode(0, tok.q[2], tok.k[2], tok.v[2], out),
                      Catch::Contains("has an insert() waiting for its observe()"));
  REQUIRE_THROWS_WITH(cache.insert(0, tok.q[2], tok.k[2], tok.v[2]), Catch::Contains("waiting for its observe()"));
  const int stride = cache.max_slots(0);
  REQUIRE(stride == cfg.budget + 1);
  std::vector<float> probs(static_cast<std::size_t>(cfg.n_q_heads) * stride, 0.5f);
  REQUIRE_THROWS_WITH(cache.observe(0, probs, stride - 1), Catch::Contains("is below max_slots(0)"));
  REQUIRE_THROWS_WITH(cache.observe(0, std::span<const float>(probs).first(probs.size() - 1), stride),
                      Catch::Contains("expected n_q_heads * stride"));
  probs[3] = NAN;
  REQUIRE_THROWS_WITH(cache.observe(0, probs, stride), Catch::Contains("probs"));
  REQUIRE(cache.size(0, 0) == 2);
  REQUIRE(cache.next_position(0) == 2);
  probs[3] = 0.5f;
  cache.observe(0, probs, stride);  // the step finishes after the refusals
  cache.decode(0, tok.q[2], tok.k[2], tok.v[2], out);
  REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{0, 1, 2});
  // layer 1 is independent of layer 0's pending step
  kvtrim::KVCache<kvtrim::PolicyNamed<"h2o">> other(cfg);
  other.insert(0, tok.q[0], tok.k[0], tok.v[0]);
  other.decode(1, tok.q[0], tok.k[0], tok.v[0], out);
  REQUIRE(other.size(1, 0) == 1);
}
