// Exact attention: the cache's prefill and decode outputs against a naive double-precision reference.
#include "testing.hpp"

using kvtest::naive_attention;
using kvtest::Tokens;

namespace {

// Reference output of query head h at token t (causal over tokens 0..t), for every query head.
std::vector<double> reference_row(const Tokens& tok, int t, int qh, int group) {
  const int kv = qh / group, d = tok.d;
  std::vector<const float*> keys, values;
  for (int j = 0; j <= t; ++j) {
    keys.push_back(tok.k[j].data() + kv * d);
    values.push_back(tok.v[j].data() + kv * d);
  }
  return naive_attention(tok.q[t].data() + qh * d, keys, values, d);
}

// fp32 accumulation over up to a few hundred tokens: absolute error well under 1e-4 for unit-scale data.
constexpr double kTol = 2e-5;

}  // namespace

TEST_CASE("prefill and decode match naive attention (MHA and GQA, several head dims)", "[attention]") {
  struct Shape {
    int n_q, n_kv, d;
  };
  const Shape shapes[] = {{2, 2, 8}, {4, 1, 8}, {4, 4, 64}, {8, 2, 64}, {2, 2, 128}, {8, 4, 128}};
  for (auto s : shapes) {
    CAPTURE(s.n_q, s.n_kv, s.d);
    kvtrim::CacheConfig cfg{.n_layers = 2, .n_kv_heads = s.n_kv, .n_q_heads = s.n_q, .head_dim = s.d, .budget = 300};
    const int prompt = 150, total = 170;  // 150 spans two prefill row blocks of 128
    Tokens tok(cfg, total, 1000u + static_cast<unsigned>(s.d));
    kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
    const int group = s.n_q / s.n_kv;
    const std::size_t qw = static_cast<std::size_t>(s.n_q) * s.d;
    for (int layer = 0; layer < cfg.n_layers; ++layer) {
      auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
      std::vector<float> out(Q.size());
      cache.prefill(layer, Q, K, V, out);
      for (int t : {0, 1, 63, 127, 128, 149})
        for (int qh = 0; qh < s.n_q; ++qh) {
          const auto ref = reference_row(tok, t, qh, group);
          for (int i = 0; i < s.d; ++i) REQUIRE(std::abs(out[t * qw + qh * s.d + i] - ref[i]) < kTol);
        }
    }
    std::vector<float> out(qw);
    for (int t = prompt; t < total; ++t)
      for (int layer = 0; layer < cfg.n_layers; ++layer) {
        cache.decode(layer, tok.q[t], tok.k[t], tok.v[t], out);
        for (int qh = 0; qh < s.n_q; ++qh) {
          const auto ref = reference_row(tok, t, qh, group);
          for (int i = 0; i < s.d; ++i) REQUIRE(std::abs(out[qh * s.d + i] - ref[i]) < kTol);
        }
      }
  }
}

TEST_CASE("decode from an empty cache matches naive attention token by token", "[attention]") {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 6, .head_dim = 16, .budget = 64};
  Tokens tok(cfg, 64, 5);
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  std::vector<float> out(6 * 16);
  for (int t = 0; t < 64; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int qh = 0; qh < 6; ++qh) {
      const auto ref = reference_row(tok, t, qh, 3);
      for (int i = 0; i < 16; ++i) REQUIRE(std::abs(out[qh * 16 + i] - ref[i]) < kTol);
    }
  }
}

TEST_CASE("softmax is stable for large logits", "[attention]") {
  // Logits around 1e4 overflow exp() without max subtraction; the reference subtracts the max in double.
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 16};
  Tokens tok(cfg, 16, 11, 40.0f);
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  std::vector<float> out(8);
  for (int t = 0; t < 16; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    const auto ref = reference_row(tok, t, 0, 1);
    for (int i = 0; i < 8; ++i) {
      REQUIRE(std::isfinite(out[i]));
      REQUIRE(std::abs(out[i] - ref[i]) < 1e-4);
    }
  }
}
