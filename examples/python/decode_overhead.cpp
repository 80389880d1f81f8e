// decode_overhead: microseconds per KVCache::decode call from C++, the figure the Python binding's per-call cost
// is measured against (examples/python/binding_overhead.py runs both on the same shape and policy).
//
//   kvtrim_decode_overhead POLICY N_Q_HEADS N_KV_HEADS HEAD_DIM BUDGET CALLS
//
// One layer; the cache is first filled to its budget, then CALLS decode calls are timed, through
// kvtrim::make_cache (AnyCache, what the Python module calls) and through the typed KVCache<P> of the same
// registered policy (any but the low-rank ones; typed_us -1 there), in thread CPU time, best of 5 runs. Inputs are fixed random vectors (finite; the finiteness check runs as in Python). Prints
// one JSON line: {"any_us": ..., "typed_us": ...}.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <time.h>

#include <kvtrim/any_cache.hpp>

namespace {

// CPU time of the calling thread: the figure stays meaningful on a machine shared with other work.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

template <class Cache>
double us_per_call(Cache& cache, int calls, const std::vector<float>& q, const std::vector<float>& k,
                   const std::vector<float>& v, std::vector<float>& out, int budget) {
  for (int i = 0; i < budget + 8; ++i) cache.decode(0, q, k, v, out);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {  // best of 5 runs: the machine is shared
    const double t0 = thread_seconds();
    for (int i = 0; i < calls; ++i) cache.decode(0, q, k, v, out);
    const double s = thread_seconds() - t0;
    best = std::min(best, 1e6 * s / calls);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s POLICY N_Q_HEADS N_KV_HEADS HEAD_DIM BUDGET CALLS\n", argv[0]);
    return 2;
  }
  try {
    const std::string policy = argv[1];
    kvtrim::CacheConfig cfg;
    cfg.n_layers = 1;
    cfg.n_q_heads = std::atoi(argv[2]);
    cfg.n_kv_heads = std::atoi(argv[3]);
    cfg.head_dim = std::atoi(argv[4]);
    cfg.budget = std::atoi(argv[5]);
    const int calls = std::atoi(argv[6]);
    std::mt19937 rng(1);
    std::normal_distribution<float> n01;
    const auto qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
    const auto kw = static_cast<std::size_t>(cfg.n_kv_heads) * cfg.head_dim;
    std::vector<float> q(qw), k(kw), v(kw), out(qw);
    for (float& x : q) x = n01(rng);
    for (float& x : k) x = n01(rng);
    for (float& x : v) x = n01(rng);
    auto any = kvtrim::make_cache(policy, cfg);
    const double any_us = us_per_call(*any, calls, q, k, v, out, cfg.budget);
    double typed_us = -1;
    kvtrim::with_policy(policy, [&](const auto& entry) {  // the same policy as a compile-time KVCache
      using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
      if constexpr (!kvtrim::Entry<P>::kNeedsBasis) {
        kvtrim::KVCache<P> typed(cfg, entry.params());
        typed_us = us_per_call(typed, calls, q, k, v, out, cfg.budget);
      }
    });
    std::printf("{\"any_us\": %.4f, \"typed_us\": %.4f}\n", any_us, typed_us);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "decode_overhead: %s\n", e.what());
    return 1;
  }
}
