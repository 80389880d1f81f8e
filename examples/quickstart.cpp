#include <kvtrim/kvtrim.hpp>

#include <cstdio>
#include <vector>

int main() {
  // 2 layers, 8 query heads sharing 4 KV heads (GQA), head dim 64; keep at most 128 tokens per KV head.
  kvtrim::CacheConfig cfg{.n_layers = 2, .n_kv_heads = 4, .n_q_heads = 8, .head_dim = 64, .budget = 128};
  kvtrim::KVCache<kvtrim::StreamingLLM> cache(cfg, {.sinks = 4});

  std::vector<float> q(8 * 64), k(4 * 64), v(4 * 64), out(8 * 64);
  for (int step = 0; step < 1000; ++step) {
    for (int layer = 0; layer < cfg.n_layers; ++layer) {
      for (std::size_t i = 0; i < q.size(); ++i) q[i] = 0.01f * float((i * 7 + step) % 13);
      for (std::size_t i = 0; i < k.size(); ++i) k[i] = 0.02f * float((i * 5 + step) % 11), v[i] = float(step);
      cache.decode(layer, q, k, v, out);  // attention over the kept tokens, then eviction
    }
  }
  std::printf("kept %d tokens per head, %zu bytes, %llu evictions, oldest kept positions %lld..%lld\n",
              cache.size(0, 0), cache.bytes_used(), (unsigned long long)cache.evictions(),
              (long long)cache.positions(0, 0)[0], (long long)cache.positions(0, 0)[4]);
}
