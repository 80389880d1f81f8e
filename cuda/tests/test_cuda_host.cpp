// CUDA backend, the parts that need no GPU: the arithmetic the kernels share with the host (kernel_math.hpp),
// the device selection algorithm replayed on the host with the DevicePolicy hooks against the CPU backend,
// and the no-device error. Compiled by the host compiler.
#include <kvtrim/cuda/check.hpp>
#include <kvtrim/cuda/device_policy.hpp>
#include <kvtrim/cuda/kernel_math.hpp>

#include <algorithm>
#include <numeric>

#include "policies.hpp"
#include "testing.hpp"

using kvtrim::gpu::SoftmaxPartial;
using kvtrim::gpu::VictimKey;

TEST_CASE("Split softmax partials merge to the statistics of the whole row", "[cuda][math]") {
  kvtest::Rng rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = rng.uniform_int(1, 300);
    const auto x = rng.normal(static_cast<std::size_t>(n), 4.0f);
    // reference in double, plain loops
    double m = -INFINITY, l = 0;
    for (float v : x) m = std::max(m, double(v));
    for (float v : x) l += std::exp(double(v) - m);
    // random contiguous splits (some empty), merged in a random order
    std::vector<int> cuts{0, n};
    for (int c = rng.uniform_int(0, 6); c > 0; --c) cuts.push_back(rng.uniform_int(0, n));
    std::sort(cuts.begin(), cuts.end());
    std::vector<SoftmaxPartial> parts;
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
      SoftmaxPartial p;
      for (int i = cuts[c]; i < cuts[c + 1]; ++i) p.m = std::max(p.m, x[i]);
      for (int i = cuts[c]; i < cuts[c + 1]; ++i) p.l += std::exp(x[i] - p.m);
      parts.push_back(p);
    }
    std::shuffle(parts.begin(), parts.end(), rng.gen);
    SoftmaxPartial tot;
    for (const auto& p : parts) tot = kvtrim::gpu::merge(tot, p);
    REQUIRE(tot.m == static_cast<float>(m));
    REQUIRE(tot.l == Approx(l).epsilon(1e-5));
  }
  SECTION("empty partials are neutral and weigh nothing") {
    const SoftmaxPartial e;
    const SoftmaxPartial a{1.5f, 2.0f};
    REQUIRE(kvtrim::gpu::merge(e, e).l == 0.0f);
    REQUIRE(kvtrim::gpu::merge(e, e).m == -INFINITY);
    REQUIRE(kvtrim::gpu::merge(e, a).m == 1.5f);
    REQUIRE(kvtrim::gpu::merge(a, e).l == 2.0f);
    REQUIRE(kvtrim::gpu::rescale_weight(-INFINITY, 3.0f) == 0.0f);
  }
}

TEST_CASE("A tree reduction with better_victim finds select.hpp's victim", "[cuda][math]") {
  kvtest::Rng rng(12);
  struct Meta {
    float score;
  };
  for (int trial = 0; trial < 300; ++trial) {
    const int n = rng.uniform_int(1, 120);
    kvtrim::HeadStore<Meta> h(1, 1, n);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), std::int64_t{0});
    std::shuffle(pos.begin(), pos.end(), rng.gen);  // slots unordered
    const float zero = 0.0f;
    for (int i = 0; i < n; ++i) {
      h.append(&zero, &zero, pos[i] * 3);
      h.meta(i).score = static_cast<float>(rng.uniform_int(0, 4)) * 0.5f;  // many ties
      if (rng.uniform_int(0, 9) == 0) h.meta(i).score = rng.uniform_int(0, 1) ? 0.0f : -0.0f;
    }
    const kvtrim::Protection pr{rng.uniform_int(0, 5), rng.uniform_int(0, 5)};
    const int want = kvtrim::lowest_unprotected(h, pr, [&](int i) { return h.meta(i).score; });
    // the kernel's shape: strided per-thread scans, then a pairwise tree over the thread results
    const int threads = 1 << rng.uniform_int(0, 6);
    std::vector<VictimKey> acc(static_cast<std::size_t>(threads));
    for (int i = 0; i < n; ++i) {
      if (pr.protects(h.pos(i), h.newest_pos())) continue;
      auto& a = acc[static_cast<std::size_t>(i % threads)];
      a = kvtrim::gpu::better_victim(a, VictimKey{h.meta(i).score, h.pos(i), i});
    }
    for (int stride = threads / 2; stride > 0; stride /= 2)
      for (int t = 0; t < stride; ++t) acc[t] = kvtrim::gpu::better_victim(acc[t], acc[t + stride]);
    REQUIRE(acc[0].slot == want);
  }
}

TEST_CASE("Prompt sort keys order tokens as evicts_before does", "[cuda][math]") {
  kvtest::Rng rng(13);
  const std::vector<float> special{0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 3e38f, -3e38f, INFINITY, -INFINITY};
  auto pick = [&] {
    return rng.uniform_int(0, 1) ? special[static_cast<std::size_t>(rng.uniform_int(0, 9))]
                                 : rng.normal(1, 10.0f)[0];
  };
  for (int trial = 0; trial < 20000; ++trial) {
    const float a = pick(), b = pick();
    const int ta = rng.uniform_int(0, 1000), tb = rng.uniform_int(0, 1000);
    if (ta == tb) continue;
    const bool want = kvtrim::evicts_before(a, ta, b, tb);
    REQUIRE((kvtrim::gpu::prompt_sort_key(a, ta) < kvtrim::gpu::prompt_sort_key(b, tb)) == want);
  }
  REQUIRE(kvtrim::gpu::sort_key_token(kvtrim::gpu::prompt_sort_key(-2.5f, 123456)) == 123456);
  REQUIRE(kvtrim::gpu::sort_key_protected(kvtrim::gpu::prompt_sort_key(INFINITY, 7)));
  REQUIRE_FALSE(kvtrim::gpu::sort_key_protected(kvtrim::gpu::prompt_sort_key(3e38f, 7)));
}

TEST_CASE("Decode launch planning", "[cuda][math]") {
  // hand-worked: 256 slots per split; the query tile is the largest of 8, 4, 2, 1 dividing the group
  REQUIRE(kvtrim::gpu::plan_splits(1) == 1);
  REQUIRE(kvtrim::gpu::plan_splits(256) == 1);
  REQUIRE(kvtrim::gpu::plan_splits(257) == 2);
  REQUIRE(kvtrim::gpu::plan_splits(131073) == 513);
  REQUIRE(kvtrim::gpu::group_tile(1) == 1);
  REQUIRE(kvtrim::gpu::group_tile(6) == 2);
  REQUIRE(kvtrim::gpu::group_tile(7) == 1);
  REQUIRE(kvtrim::gpu::group_tile(12) == 4);
  REQUIRE(kvtrim::gpu::group_tile(16) == 8);
}

namespace {

// The device algorithm of cuda_backend.cuh for one head, step by step on the host, with the same DevicePolicy
// hooks and the same selection arithmetic (prompt sort keys, better_victim); for policies without attention.
template <class P>
struct EmulatedHead {
  using DP = kvtrim::gpu::DevicePolicy<P>;
  typename DP::State state;
  int limit;
  std::vector<std::int64_t> pos;
  std::vector<typename P::SlotMeta> meta;
  std::int64_t newest = -1;
  const kvtest::Tokens* tok = nullptr;  // one layer, one KV head: token t's key is tok->k[t]
  int d = 0;
  const float* key(int t) const { return tok->k[static_cast<std::size_t>(t)].data(); }

  void prefill(int T) {
    std::vector<typename P::SlotMeta> m(static_cast<std::size_t>(T));
    for (int t = 0; t < T; ++t) DP::on_insert(state, m[t], t, key(t), d);
    newest = T - 1;
    const kvtrim::AttentionRows none{};
    std::vector<std::uint64_t> keys;
    for (int t = 0; t < T; ++t) {
      const float s = DP::prompt_score(state, m[t], t, none, none);
      keys.push_back(kvtrim::gpu::prompt_sort_key(DP::protects(state, m[t], t, newest) ? INFINITY : s, t));
    }
    std::sort(keys.begin(), keys.end());
    std::vector<char> keep(static_cast<std::size_t>(T), 1);
    for (int i = 0; i < T - std::min(T, limit); ++i) {
      REQUIRE_FALSE(kvtrim::gpu::sort_key_protected(keys[i]));
      keep[kvtrim::gpu::sort_key_token(keys[i])] = 0;
    }
    for (int t = 0; t < T; ++t)
      if (keep[t]) pos.push_back(t), meta.push_back(m[t]);
  }
  void decode(std::int64_t p, bool before) {
    pos.push_back(p);
    meta.push_back({});
    newest = std::max(newest, p);
    DP::on_insert(state, meta.back(), p, key(static_cast<int>(p)), d);
    (void)before;  // no attention here: eviction before or after it leaves the same set
    while (static_cast<int>(pos.size()) > limit) {
      VictimKey best;
      for (std::size_t i = 0; i < pos.size(); ++i)
        if (!DP::protects(state, meta[i], pos[i], newest))
          best = kvtrim::gpu::better_victim(
              best, VictimKey{DP::score(state, meta[i], pos[i], newest), pos[i], static_cast<int>(i)});
      REQUIRE(best.slot >= 0);
      pos[best.slot] = pos.back(), meta[best.slot] = meta.back();
      pos.pop_back(), meta.pop_back();
    }
  }
  std::vector<std::int64_t> sorted() const {
    auto p = pos;
    std::sort(p.begin(), p.end());
    return p;
  }
};

template <class P>
void check_emulation_matches_cpu(const typename P::Params& params, int budget, int prompt, int total) {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 4, .budget = budget};
  kvtrim::KVCache<P> cpu(cfg, params);
  kvtest::Tokens tok(cfg, total, 5);
  EmulatedHead<P> emu{kvtrim::gpu::DevicePolicy<P>::initial(cpu.policy(0), params, budget),
                      kvtrim::gpu::DevicePolicy<P>::keep_limit(cpu.policy(0), budget), {}, {}, -1, &tok,
                      cfg.head_dim};
  if (prompt > 0) {
    auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
         V = kvtest::Tokens::rows(tok.v, 0, prompt);
    std::vector<float> out(Q.size());
    cpu.prefill(0, Q, K, V, out);
    emu.prefill(prompt);
    REQUIRE(emu.sorted() == cpu.positions(0, 0));
  }
  std::vector<float> out(8);
  for (int t = prompt; t < total; ++t) {
    cpu.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    emu.decode(t, P::kTiming == kvtrim::EvictTiming::kBeforeAttention);
    REQUIRE(emu.sorted() == cpu.positions(0, 0));
  }
}

}  // namespace

TEST_CASE("The device selection algorithm keeps what the CPU backend keeps", "[cuda][emulation]") {
  SECTION("StreamingLLM, prompt longer than the budget, window = rest") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 4}, 16, 40, 120);
  }
  SECTION("StreamingLLM, explicit window smaller than the budget, decode only") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 2, .window = 5}, 12, 0, 60);
  }
  SECTION("StreamingLLM, no sinks, short prompt") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 0}, 8, 3, 50);
  }
  SECTION("FullCache") { check_emulation_matches_cpu<kvtrim::FullCache>({}, 64, 20, 64); }
  SECTION("L2Norm, prompt longer than the budget") {
    check_emulation_matches_cpu<kvtrim::L2Norm>({.sinks = 2, .recent = 3}, 16, 40, 120);
  }
  SECTION("L2Norm, no protection, decode only") { check_emulation_matches_cpu<kvtrim::L2Norm>({}, 10, 0, 80); }
  SECTION("L2Norm, skipped layer (oldest non-sink)") {
    check_emulation_matches_cpu<kvtrim::L2Norm>({.sinks = 3, .skip_layers = {0}}, 12, 30, 90);
  }
}

TEST_CASE("require_device reports a missing GPU as kvtrim::Error", "[cuda][errors]") {
  if (kvtrim::gpu::device_count() == 0) {
    REQUIRE_THROWS_WITH(kvtrim::gpu::require_device("CudaBackend"),
                           Catch::Matchers::Contains("no CUDA device available"));
  } else {
    REQUIRE_NOTHROW(kvtrim::gpu::require_device("CudaBackend"));
  }
  // a failing runtime call becomes kvtrim::Error naming the call
  REQUIRE_THROWS_WITH(KVTRIM_CUDA_CHECK(cudaErrorInvalidValue),
                         Catch::Matchers::Contains("CUDA error cudaErrorInvalidValue"));
  REQUIRE_THROWS_WITH(KVTRIM_CUBLAS_CHECK(CUBLAS_STATUS_NOT_INITIALIZED),
                         Catch::Matchers::Contains("CUBLAS_STATUS_NOT_INITIALIZED"));
}
