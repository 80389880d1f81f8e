// A downstream program: one layer, StreamingLLM, a few decode steps; exits non-zero if the cache misbehaves.
#include <kvtrim/kvtrim.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  kvtrim::KVCache<kvtrim::StreamingLLM> cache({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 4,
                                               .budget = 4},
                                              {.sinks = 1});
  std::vector<float> q(8, 0.5f), k(4, 0.25f), v(4, 1.0f), out(8);
  for (int t = 0; t < 10; ++t) cache.decode(0, q, k, v, out);
  const auto kept = cache.positions(0, 0);
  const bool ok = kept == std::vector<std::int64_t>{0, 7, 8, 9} && std::abs(out[0] - 1.0f) < 1e-6f;
  std::printf("consumer: kept %zu tokens, out[0] = %g -> %s\n", kept.size(), out[0], ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
