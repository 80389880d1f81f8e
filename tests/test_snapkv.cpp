// SnapKV-style prompt compression in front of a decode policy: pooling by hand, hand-built prompts where the
// kept tokens are known, a slow independent reference over hundreds of random prompts (MHA and GQA), the
// composition with the registry's decode policies (accumulated attention, last-step attention) over thousands of
// decode steps, budgets, determinism, FullCache equality, errors.
#include <kvtrim/registry.hpp>
#include <kvtrim/policies/snapkv.hpp>

#include "property.hpp"
#include "testing.hpp"

using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::GroupReduce;
using kvtrim::KVCache;
using kvtrim::SnapKV;
using kvtrim::SnapPooling;

// The registry's compositions: SnapKV over accumulated attention ("h2o") and over last-step attention ("tova").
using SnapAcc = kvtrim::PolicyNamed<"snapkv+h2o">;
using SnapLast = kvtrim::PolicyNamed<"snapkv+tova">;
using Acc = SnapAcc::DecodePolicy;
using Last = SnapLast::DecodePolicy;

static_assert(std::is_same_v<SnapAcc::SlotMeta, Acc::SlotMeta>);
static_assert(std::is_same_v<SnapKV<>::SlotMeta, kvtrim::FullCache::SlotMeta>);
static_assert(SnapKV<>::kName == "snapkv");
static_assert(SnapLast::kSignals == kvtrim::Signals::kAttention && SnapKV<>::kSignals == kvtrim::Signals::kNone);

namespace {

// ---- independent reference ---------------------------------------------------------------------------------
// Causal attention probabilities (double) of query q (d floats) over keys[0..n).
std::vector<double> probs(const float* q, const std::vector<const float*>& keys, std::size_t n, int d) {
  std::vector<double> s(n);
  double m = -1e300, z = 0;
  for (std::size_t j = 0; j < n; ++j) {
    double dot = 0;
    for (int i = 0; i < d; ++i) dot += double(q[i]) * double(keys[j][i]);
    s[j] = dot / std::sqrt(double(d));
    m = std::max(m, s[j]);
  }
  for (auto& e : s) z += (e = std::exp(e - m));
  for (auto& e : s) e /= z;
  return s;
}

double reduce(const std::vector<double>& per_head, GroupReduce how) {
  double acc = 0;
  for (std::size_t i = 0; i < per_head.size(); ++i)
    acc = i == 0 ? per_head[0] : how == GroupReduce::kMax ? std::max(acc, per_head[i]) : acc + per_head[i];
  return how == GroupReduce::kMean ? acc / double(per_head.size()) : acc;
}

// SnapKV scores of the earlier prompt tokens (positions 0..T-w-1) of KV head h.
template <class P>
std::vector<double> ref_snap_scores(const Tokens& tok, int T, int h, int g, int d, const P& p) {
  const int w = p.window, P0 = T - w, r = p.kernel / 2;
  std::vector<const float*> keys;
  for (int t = 0; t < T; ++t) keys.push_back(tok.k[t].data() + h * d);
  std::vector<std::vector<double>> pooled(g, std::vector<double>(P0));
  for (int gi = 0; gi < g; ++gi) {
    std::vector<double> votes(P0, 0.0);
    for (int t = P0; t < T; ++t) {
      const auto pr = probs(tok.q[t].data() + (h * g + gi) * d, keys, t + 1, d);
      for (int j = 0; j < P0; ++j) votes[j] += pr[j];
    }
    for (int j = 0; j < P0; ++j) {
      double acc = p.pooling == SnapPooling::kMax ? 0.0 : 0.0;
      for (int i = std::max(0, j - r); i <= std::min(P0 - 1, j + r); ++i)
        acc = p.pooling == SnapPooling::kMax ? std::max(acc, votes[i]) : acc + votes[i];
      pooled[gi][j] = p.pooling == SnapPooling::kAvg ? acc / p.kernel : acc;
    }
  }
  std::vector<double> scores(P0);
  for (int j = 0; j < P0; ++j) {
    std::vector<double> per(g);
    for (int gi = 0; gi < g; ++gi) per[gi] = pooled[gi][j];
    scores[j] = reduce(per, p.group_reduce);
  }
  return scores;
}

// The positions SnapKV keeps given the scores: top (cap - w) earlier tokens (newest on ties) plus the window.
// Where the cache's set differs only by near-ties at the cut, returns the cache's set (and counts it).
std::vector<std::int64_t> ref_snap_keep(const std::vector<double>& scores, int T, int w, int cap,
                                        const std::vector<std::int64_t>& cache_kept, int& near_ties) {
  const int P0 = T - w;
  std::vector<int> order(P0);
  for (int j = 0; j < P0; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a > b);
  });
  const int room = cap - w;
  std::vector<std::int64_t> kept;
  for (int i = 0; i < room; ++i) kept.push_back(order[i]);
  for (int t = P0; t < T; ++t) kept.push_back(t);
  std::sort(kept.begin(), kept.end());
  if (kept == cache_kept) return kept;
  const double cut = scores[order[room - 1]];
  for (int j = 0; j < P0; ++j) {
    const bool a = std::binary_search(kept.begin(), kept.end(), j);
    const bool b = std::binary_search(cache_kept.begin(), cache_kept.end(), std::int64_t{j});
    if (a != b) {
      INFO("prompt token " << j << " score " << scores[j] << " cut " << cut);
      REQUIRE(std::abs(scores[j] - cut) <= 1e-6 + 1e-4 * std::abs(cut));
    }
  }
  for (int t = P0; t < T; ++t) REQUIRE(std::binary_search(cache_kept.begin(), cache_kept.end(), std::int64_t{t}));
  ++near_ties;
  return cache_kept;
}

std::vector<float> prefill_all(auto& cache, const Tokens& tok, int T) {
  const auto& cfg = cache.config();
  std::vector<float> out(static_cast<std::size_t>(T) * cfg.n_q_heads * cfg.head_dim);
  for (int l = 0; l < cfg.n_layers; ++l)
    cache.prefill(l, Tokens::rows(tok.q, 0, T), Tokens::rows(tok.k, 0, T), Tokens::rows(tok.v, 0, T), out);
  return out;
}

}  // namespace

TEST_CASE("SnapKV pooling by hand", "[snapkv]") {
  const std::vector<float> v{0, 0, 1, 0, 0, 0, 5};
  std::vector<float> avg3, max3, avg5, one;
  for (int j = 0; j < 7; ++j) {
    avg3.push_back(SnapKV<>::pool_at(v.data(), 7, j, 3, SnapPooling::kAvg));
    max3.push_back(SnapKV<>::pool_at(v.data(), 7, j, 3, SnapPooling::kMax));
    avg5.push_back(SnapKV<>::pool_at(v.data(), 7, j, 5, SnapPooling::kAvg));
    one.push_back(SnapKV<>::pool_at(v.data(), 7, j, 1, SnapPooling::kAvg));
  }
  const float t = 1.0f / 3, f = 5.0f / 3;
  REQUIRE(avg3 == std::vector<float>{0, t, t, t, 0, f, f});  // zero padding: edges still divide by 3
  REQUIRE(max3 == std::vector<float>{0, 1, 1, 1, 0, 5, 5});
  REQUIRE(avg5 == std::vector<float>{0.2f, 0.2f, 0.2f, 0.2f, 1.2f, 1.0f, 1.0f});
  REQUIRE(one == v);
}

TEST_CASE("SnapKV hand-built prompts: the window's favourite tokens survive, pooling keeps neighbours", "[snapkv]") {
  // d = 4, window 4, T = 40. Window queries are 2 e0, so logits are the keys' e0 component; all other keys 0.
  const int T = 40, w = 4;
  auto run = [&](std::vector<std::pair<int, float>> hot, int budget, int kernel, SnapPooling pooling) {
    CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4, .budget = budget};
    KVCache<SnapKV<>> cache(cfg, {.window = w, .kernel = kernel, .pooling = pooling});
    std::vector<float> Q(T * 4, 0.0f), K(T * 4, 0.0f), V(T * 4, 1.0f), out(T * 4);
    for (int t = T - w; t < T; ++t) Q[t * 4] = 2;
    for (auto [pos, logit] : hot) K[pos * 4] = logit;
    cache.prefill(0, Q, K, V, out);
    return cache.positions(0, 0);
  };
  using P = std::vector<std::int64_t>;
  // one hot token at 10: no pooling keeps it alone; a 3-wide average keeps its neighbours too
  REQUIRE(run({{10, 6}}, w + 1, 1, SnapPooling::kAvg) == P{10, 36, 37, 38, 39});
  REQUIRE(run({{10, 6}}, w + 3, 3, SnapPooling::kAvg) == P{9, 10, 11, 36, 37, 38, 39});
  // an isolated token 5 (logit 5) against an adjacent pair 20, 21 (logit 4.8 each): the average favours the
  // pair ((1 + 2*121.5)/3 > (148.4 + 2)/3), the max favours the single token's neighbourhood, where 4, 5, 6
  // tie exactly and the newest two are kept
  const std::vector<std::pair<int, float>> hot{{5, 5.0f}, {20, 4.8f}, {21, 4.8f}};
  REQUIRE(run(hot, w + 2, 3, SnapPooling::kAvg) == P{20, 21, 36, 37, 38, 39});
  REQUIRE(run(hot, w + 2, 3, SnapPooling::kMax) == P{5, 6, 36, 37, 38, 39});
  // without pooling 5 wins, then 20 and 21 tie exactly (same key): the newer one stays
  REQUIRE(run(hot, w + 2, 1, SnapPooling::kMax) == P{5, 21, 36, 37, 38, 39});
}

TEST_CASE("SnapKV (FullCache decode) matches a slow reference over hundreds of random prompts", "[snapkv][differential]") {
  kvtest::Rng rng(2024);
  int near_ties = 0, cases = 0, compressed = 0;
  for (int it = 0; it < 160; ++it) {
    const int g = it % 2 == 0 ? 1 : 4;  // MHA and GQA
    CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2 * g, .head_dim = 8,
                    .budget = rng.uniform_int(6, 40)};
    SnapKV<>::Params p;
    p.capacity = rng.uniform_int(0, 1) ? 0 : rng.uniform_int(2, cfg.budget);
    const int cap = p.capacity > 0 ? p.capacity : cfg.budget;
    p.window = rng.uniform_int(1, cap - 1);
    p.kernel = 2 * rng.uniform_int(0, 3) + 1;
    p.pooling = rng.uniform_int(0, 1) ? SnapPooling::kAvg : SnapPooling::kMax;
    p.group_reduce = static_cast<GroupReduce>(rng.uniform_int(0, 2));
    const int T = it % 10 == 9 ? rng.uniform_int(1, cap) : rng.uniform_int(cap + 1, 3 * cap + 10);
    const int extra = cfg.budget - std::min(T, cap);  // decode steps that still fit (FullCache never evicts)
    INFO("case " << it << ": budget " << cfg.budget << " capacity " << cap << " window " << p.window << " kernel "
                 << p.kernel << " T " << T);
    KVCache<SnapKV<>> cache(cfg, p);
    Tokens tok(cfg, T + extra + 1, 500 + it, 1.5f);
    prefill_all(cache, tok, T);
    for (int h = 0; h < cfg.n_kv_heads; ++h) {
      const auto kept = cache.positions(0, h);
      if (T <= cap) {
        REQUIRE(static_cast<int>(kept.size()) == T);
        continue;
      }
      ++compressed;
      const auto scores = ref_snap_scores(tok, T, h, g, cfg.head_dim, p);
      REQUIRE(kept == ref_snap_keep(scores, T, p.window, cap, kept, near_ties));
    }
    kvtest::check_invariants(cache);
    // decoding appends (no eviction) and attends exactly to the kept tokens plus the new ones
    std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim);
    const auto evictions = cache.evictions();
    for (int t = T; t < T + extra; ++t) {
      cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
      for (int kv = 0; kv < cfg.n_kv_heads; ++kv)
        kvtest::require_group_attention(tok, t, cache.positions(0, kv), kv, g, out);
      REQUIRE(cache.positions(0, 0).back() == t);
    }
    REQUIRE(cache.evictions() == evictions);
    REQUIRE(cache.size(0, 0) == cfg.budget);
    // FullCache never evicts: one more token is refused with a clear message
    REQUIRE_THROWS_WITH(cache.decode(0, tok.q[T + extra], tok.k[T + extra], tok.v[T + extra], out),
                        Catch::Contains("never evicts") && Catch::Contains("raise the budget"));
    ++cases;
  }
  WARN("SnapKV differential: " << cases << " prompts, " << compressed << " compressed heads, " << near_ties
                               << " float-vs-double near-ties at the cut");
  REQUIRE(near_ties * 50 <= compressed);
}

namespace {

// Reference decode policies for the composition test: accumulated attention or the current step's only.
struct RefDecode {
  bool accumulate = true, normalize = false;
  int sinks = 0, recent = 0;
  GroupReduce how = GroupReduce::kMean;
  int budget = 0, g = 1, d = 0;
  struct Tok {
    std::int64_t pos;
    const float* k;
    double score = 0;
    int seen = 0;
  };
  std::vector<Tok> toks;
  std::int64_t newest = -1;

  bool prot(std::int64_t pos) const { return pos < sinks || pos > newest - recent; }
  double rank(const Tok& t) const { return normalize ? t.score / t.seen : t.score; }
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> p;
    for (const auto& t : toks) p.push_back(t.pos);
    std::sort(p.begin(), p.end());
    return p;
  }
  void step(const float* qg, std::int64_t pos, const float* k) {
    toks.push_back({pos, k});
    newest = std::max(newest, pos);
    std::vector<const float*> keys;
    for (const auto& t : toks) keys.push_back(t.k);
    std::vector<std::vector<double>> pr(g);
    for (int gi = 0; gi < g; ++gi) pr[gi] = probs(qg + gi * d, keys, toks.size(), d);
    for (std::size_t j = 0; j < toks.size(); ++j) {
      std::vector<double> per(g);
      for (int gi = 0; gi < g; ++gi) per[gi] = pr[gi][j];
      const double r = reduce(per, how);
      if (accumulate) {
        toks[j].score += r;
        ++toks[j].seen;
      } else {
        toks[j].score = r;
      }
    }
  }
  // evicts the lowest-ranked unprotected token (oldest on ties), then follows the cache on near-ties
  int evict_and_reconcile(const std::vector<std::int64_t>& cache_pos) {
    if (static_cast<int>(toks.size()) <= budget) return 0;
    int v = -1;
    for (int i = 0; i < static_cast<int>(toks.size()); ++i) {
      if (prot(toks[i].pos)) continue;
      if (v < 0 || rank(toks[i]) < rank(toks[v]) || (rank(toks[i]) == rank(toks[v]) && toks[i].pos < toks[v].pos))
        v = i;
    }
    REQUIRE(v >= 0);
    const Tok mine = toks[v];
    auto rest = toks;
    rest.erase(rest.begin() + v);
    std::vector<std::int64_t> p;
    for (const auto& t : rest) p.push_back(t.pos);
    std::sort(p.begin(), p.end());
    if (p == cache_pos) {
      toks = rest;
      return 0;
    }
    for (int i = 0; i < static_cast<int>(toks.size()); ++i)
      if (!std::binary_search(cache_pos.begin(), cache_pos.end(), toks[i].pos)) {
        INFO("cache evicted " << toks[i].pos << " rank " << rank(toks[i]) << ", reference " << mine.pos << " rank "
                              << rank(mine));
        REQUIRE(!prot(toks[i].pos));
        REQUIRE(std::abs(rank(toks[i]) - rank(mine)) <= 1e-5 + 1e-4 * std::abs(rank(mine)));
        toks.erase(toks.begin() + i);
        return 1;
      }
    FAIL("the cache kept a token the reference never had");
    return 0;
  }
};

template <class Decode>
int run_composed(const CacheConfig& cfg, const typename SnapKV<Decode>::Params& p, RefDecode proto, int T,
                 int steps, std::uint64_t seed) {
  const int H = cfg.n_kv_heads, g = cfg.group_size(), d = cfg.head_dim;
  KVCache<SnapKV<Decode>> cache(cfg, p);
  Tokens tok(cfg, T + steps, seed, 1.5f);
  prefill_all(cache, tok, T);
  int near = 0;
  std::vector<RefDecode> ref(H, proto);
  for (int h = 0; h < H; ++h) {
    RefDecode& r = ref[h];
    r.budget = cfg.budget_of(0, h);
    const int cap = p.capacity > 0 ? p.capacity : r.budget;
    const auto kept = ref_snap_keep(ref_snap_scores(tok, T, h, g, d, p), T, p.window, cap, cache.positions(0, h), near);
    REQUIRE(kept == cache.positions(0, h));
    // the decode policy starts from the whole prompt's attention on the tokens that survived
    std::vector<const float*> keys;
    for (int t = 0; t < T; ++t) keys.push_back(tok.k[t].data() + h * d);
    std::vector<std::vector<double>> col(g, std::vector<double>(T, 0.0)), last(g);
    for (int gi = 0; gi < g; ++gi)
      for (int t = 0; t < T; ++t) {
        const auto pr = probs(tok.q[t].data() + (h * g + gi) * d, keys, t + 1, d);
        for (int j = 0; j <= t; ++j) col[gi][j] += pr[j];
        if (t == T - 1) last[gi] = pr;
      }
    for (auto pos : kept) {
      std::vector<double> per(g);
      for (int gi = 0; gi < g; ++gi) per[gi] = r.accumulate ? col[gi][pos] : last[gi][pos];
      r.toks.push_back({pos, keys[pos], reduce(per, r.how), static_cast<int>(T - pos)});
    }
    r.newest = T - 1;
    const auto& head = cache.backend().head(0, h);
    for (int i = 0; i < head.size(); ++i) {
      double want = 0;
      for (const auto& t : r.toks)
        if (t.pos == head.pos(i)) want = t.score;
      if constexpr (std::is_same_v<Decode, Acc>) {
        REQUIRE(head.meta(i).score == Approx(want).epsilon(1e-4).margin(1e-6));
        REQUIRE(head.meta(i).seen == T - head.pos(i));
      } else {
        REQUIRE(head.meta(i).attention == Approx(want).epsilon(1e-4).margin(1e-6));
      }
    }
  }
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
  for (int t = T; t < T + steps; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int h = 0; h < H; ++h) {
      ref[h].step(tok.q[t].data() + h * g * d, t, tok.k[t].data() + h * d);
      const auto kept = cache.positions(0, h);
      near += ref[h].evict_and_reconcile(kept);
      REQUIRE(ref[h].positions() == kept);
    }
    kvtest::check_invariants(cache);
  }
  return near;
}

}  // namespace

TEST_CASE("SnapKV over accumulated and last-step attention: SnapKV prefill, then the decode policy, against a reference",
          "[snapkv][differential]") {
  const CacheConfig mha{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 16, .budget = 24};
  const CacheConfig gqa{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 16, .budget = 20};
  int near = 0;
  SECTION("accumulated, MHA, capacity below the budget") {
    RefDecode h2o{.recent = 12, .d = 16};  // 50/50 of 24
    near += run_composed<Acc>(mha, {.window = 4, .capacity = 16, .decode = {}}, h2o, 90, 1500, 41);
  }
  SECTION("accumulated, GQA, max pooling, normalised, with sinks") {
    RefDecode h2o{.normalize = true, .sinks = 2, .recent = 9, .g = 4, .d = 16};  // heavy floor(.5*18) = 9
    near += run_composed<Acc>(
        gqa, {.window = 6, .kernel = 3, .pooling = SnapPooling::kMax, .decode = {.sinks = 2, .normalize = true}}, h2o,
        70, 1500, 42);
  }
  SECTION("last step, GQA") {
    RefDecode tova{.accumulate = false, .recent = 1, .g = 4, .d = 16};
    near += run_composed<Last>(gqa, {.window = 5, .capacity = 12, .decode = {.recent = 1}}, tova, 60, 1500, 43);
  }
  WARN("SnapKV composition: " << near << " float-vs-double near-ties reconciled over 1500 decode steps x 2 heads");
  REQUIRE(near <= 30);
}

TEST_CASE("SnapKV: the prompt goes down to the capacity, decode grows to the budget, then the decode policy evicts", "[snapkv]") {
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 16};
  KVCache<SnapAcc> cache(cfg, {.window = 3, .capacity = 10});
  Tokens tok(cfg, 80, 9);
  prefill_all(cache, tok, 50);
  REQUIRE(cache.size(1, 1) == 10);
  REQUIRE(cache.positions(0, 0).back() == 49);
  std::vector<float> out(32);
  for (int t = 50; t < 80; ++t) {
    for (int l = 0; l < 2; ++l) cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
    REQUIRE(cache.size(0, 1) == std::min(16, 10 + t - 49));
    kvtest::check_invariants(cache);
  }
}

TEST_CASE("SnapKV equals FullCache when the budget holds everything, and is deterministic", "[snapkv]") {
  const CacheConfig gqa{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<SnapKV<>>({.window = 4}, gqa, 20, 60);
  kvtest::check_equals_full_cache<SnapAcc>({.window = 8, .kernel = 3}, gqa, 30, 70);
  kvtest::check_equals_full_cache<SnapLast>({.window = 2, .capacity = 40}, gqa, 40, 60);
  CacheConfig cfg = gqa;
  cfg.budget = 12;
  kvtest::require_deterministic([&] { return KVCache<SnapAcc>(cfg, {.window = 4, .kernel = 5}); }, 100, 200, 5);
}

TEST_CASE("SnapKV rejects bad parameters with kvtrim::Error", "[snapkv][errors]") {
  using Catch::Contains;
  const CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 8};
  using S = KVCache<SnapKV<>>;
  REQUIRE_THROWS_WITH((S(cfg, {.window = 8})), Contains("window (8) must be smaller than the prompt capacity 8"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 0})), Contains("window must be >= 1 prompt token, got 0"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 2, .kernel = 4})), Contains("kernel must be odd and >= 1, got 4"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 2, .kernel = 0})), Contains("kernel must be odd and >= 1, got 0"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 2, .kernel = -3})), Contains("kernel must be odd and >= 1, got -3"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 2, .capacity = 9})), Contains("capacity (9) exceeds the budget 8"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 4, .capacity = 4})), Contains("window (4) must be smaller"));
  REQUIRE_THROWS_WITH((S(cfg, {.window = 2, .capacity = -1})), Contains("capacity must be >= 0"));
  REQUIRE_THROWS_WITH((KVCache<SnapAcc>(cfg, {.window = 2, .decode = {.heavy_ratio = 2.0}})),
                      Contains("heavy_ratio must be in [0, 1], got 2"));
  REQUIRE_NOTHROW((S(cfg, {.window = 7, .kernel = 1, .capacity = 8})));
}

namespace {
struct SnapAccSpec : kvtest::prop::SpecBase<SnapAcc> {
  static constexpr const char* kLabel = "snapkv+h2o";
  static constexpr int kMinBudget = 2;
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p;
    p.capacity = rng.uniform_int(0, 1) ? 0 : rng.uniform_int(2, min_budget);
    const int cap = p.capacity > 0 ? p.capacity : min_budget;
    p.window = rng.uniform_int(1, cap - 1);
    p.kernel = 2 * rng.uniform_int(0, 2) + 1;
    p.pooling = static_cast<SnapPooling>(rng.uniform_int(0, 1));
    p.group_reduce = kvtest::prop::any_reduce(rng);
    p.decode = {.heavy_ratio = rng.uniform_int(0, 10) / 10.0, .sinks = rng.uniform_int(0, min_budget - 1),
                .group_reduce = kvtest::prop::any_reduce(rng), .normalize = rng.uniform_int(0, 1) == 1};
    return p;
  }
  // Decode keeps its protected tokens once the prompt's compression is behind (not checked right after).
};

// SnapKV<> decodes with FullCache: full heads refuse decode tokens (KVCache checks kNeverEvictsInDecode before
// anything changes; SpecBase derives that from the policy).
struct SnapFullSpec : kvtest::prop::SpecBase<SnapKV<>> {
  static constexpr const char* kLabel = "SnapKV<FullCache>";
  static constexpr int kMinBudget = 2;
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p;
    p.window = rng.uniform_int(1, min_budget - 1);
    p.kernel = 2 * rng.uniform_int(0, 2) + 1;
    return p;
  }
};
}  // namespace

TEMPLATE_TEST_CASE("SnapKV: random prefill/decode/reset sequences agree with the reference model",
                   "[snapkv][property]", SnapAccSpec, SnapFullSpec) {
  kvtest::prop::require_properties<TestType>(1);
}
