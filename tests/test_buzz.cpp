// BUZZ: the beehive structure step by step, a slow independent reference (plain loops, double-precision
// attention, its own SimHash loop), the bound on the size, FullCache equivalence, bad parameters.
#include <kvtrim/policies/buzz.hpp>

#include <bit>
#include <string>
#include <type_traits>

#include "property.hpp"
#include "testing.hpp"

namespace {

using kvtrim::Buzz;
using kvtrim::CacheConfig;
using kvtrim::KVCache;

// A test scorer whose score is a fixed function of the position, with many ties (values 0..4), so the
// expected survivor of a chunk is known without any attention.
struct PositionScorer {
  struct Params {};
  struct SlotMeta {
    float s = 0.0f;
  };
  struct State {};
  static constexpr std::string_view kBuzzName = "buzz-test";
  static constexpr kvtrim::Signals kSignals = kvtrim::Signals::kNone;
  PositionScorer(const Params&, const kvtrim::LayerContext&) {}
  State initial() const { return {}; }
  static float value(std::int64_t pos) {
    return static_cast<float>(kvtrim::splitmix64_mix(static_cast<std::uint64_t>(pos) * 7919u) % 5u);
  }
  static void on_insert(State&, SlotMeta& m, std::int64_t pos, const kvtrim::TokenInputs&) { m.s = value(pos); }
  static void on_prompt(const State&, SlotMeta&, int, const kvtrim::PromptSums&) {}
  static float score(const State&, const SlotMeta& m) { return m.s; }
};

// ---- the slow reference: tokens in a position-ordered list, re-segmented with plain loops --------------
struct RefTok {
  std::int64_t pos = 0;
  std::vector<float> k, v;
  double score = 0.0;
  std::uint64_t code = 0;
  bool sink = false, sampled = false;
};

struct RefBuzz {
  int S, W, T, chunk, thin;
  bool oldest_on_tie;
  std::vector<RefTok> toks;  // ascending positions
  int seen = 0;
  int resegmentations = 0;

  void add(RefTok t) {
    t.sink = seen < S;
    ++seen;
    toks.push_back(std::move(t));
  }
  int middle() const {
    int sinks = 0;
    for (const auto& t : toks) sinks += t.sink ? 1 : 0;
    return static_cast<int>(toks.size()) - sinks - W;
  }
  // score(tok) -> double; higher survives.
  template <class ScoreFn>
  void fit(ScoreFn score) {
    while (middle() > T) {
      std::vector<std::size_t> rest;
      for (std::size_t i = 0; i < toks.size(); ++i)
        if (!toks[i].sink) rest.push_back(i);
      const std::size_t n_mid = rest.size() - static_cast<std::size_t>(W);
      std::vector<bool> keep(toks.size(), false);
      for (std::size_t i = 0; i < toks.size(); ++i)
        if (toks[i].sink) keep[i] = true;
      for (std::size_t j = n_mid; j < rest.size(); ++j) keep[rest[j]] = true;
      std::vector<std::size_t> old, fresh;
      for (std::size_t j = 0; j < n_mid; ++j) (toks[rest[j]].sampled ? old : fresh).push_back(rest[j]);
      for (std::size_t j = 0; j < old.size(); j += static_cast<std::size_t>(thin)) keep[old[j]] = true;
      for (std::size_t c0 = 0; c0 < fresh.size(); c0 += static_cast<std::size_t>(chunk)) {
        const std::size_t c1 = std::min(fresh.size(), c0 + static_cast<std::size_t>(chunk));
        std::size_t best = fresh[c0];
        for (std::size_t j = c0 + 1; j < c1; ++j) {
          const double a = score(toks[fresh[j]]), b = score(toks[best]);
          if (a > b || (!oldest_on_tie && a == b)) best = fresh[j];
        }
        keep[best] = true;
      }
      for (std::size_t j = 0; j < n_mid; ++j) toks[rest[j]].sampled = true;
      std::vector<RefTok> next;
      for (std::size_t i = 0; i < toks.size(); ++i)
        if (keep[i]) next.push_back(toks[i]);
      toks = std::move(next);
      ++resegmentations;
    }
  }
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> p;
    for (const auto& t : toks) p.push_back(t.pos);
    return p;
  }
};

// Softmax attention in double of each query of a group over the reference tokens; adds the group mean of
// the probabilities to each token's score and returns the outputs [group x d].
std::vector<double> ref_attend_and_score(RefBuzz& r, const float* qg, int group, int d) {
  std::vector<double> out(static_cast<std::size_t>(group) * d, 0.0);
  std::vector<double> add(r.toks.size(), 0.0);
  for (int g = 0; g < group; ++g) {
    std::vector<double> s(r.toks.size());
    double m = -INFINITY;
    for (std::size_t j = 0; j < r.toks.size(); ++j) {
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += double(qg[g * d + c]) * double(r.toks[j].k[c]);
      s[j] = dot / std::sqrt(double(d));
      m = std::max(m, s[j]);
    }
    double z = 0;
    for (auto& e : s) z += (e = std::exp(e - m));
    for (std::size_t j = 0; j < r.toks.size(); ++j) {
      const double p = s[j] / z;
      add[j] += p / group;
      for (int c = 0; c < d; ++c) out[static_cast<std::size_t>(g) * d + c] += p * double(r.toks[j].v[c]);
    }
  }
  for (std::size_t j = 0; j < r.toks.size(); ++j) r.toks[j].score += add[j];
  return out;
}

std::vector<float> slice(const std::vector<float>& x, int head, int width) {
  return {x.begin() + static_cast<std::ptrdiff_t>(head) * width,
          x.begin() + static_cast<std::ptrdiff_t>(head + 1) * width};
}

// ---- structure check used step by step -------------------------------------------------------------------
// Checks, from the kept positions alone plus what the test itself tracked: all sinks, the whole window, the
// middle within the threshold, and after a re-segmentation the new middle = every thin-th old sample plus
// the best-scored (oldest on ties) token of each chunk of the segment that was new.
struct StructureTracker {
  int S, W, T, chunk, thin;
  std::vector<std::int64_t> prev;         // kept positions after the previous step
  std::int64_t old_boundary = -1;         // middle positions <= this are old samples
  int resegmentations = 0;
  std::vector<int> middle_after_reseg;    // middle size right after each re-segmentation

  void step(const std::vector<std::int64_t>& kept, std::int64_t newest) {
    const std::int64_t n_seen = newest + 1;
    // sinks
    for (std::int64_t p = 0; p < std::min<std::int64_t>(S, n_seen); ++p)
      REQUIRE(std::binary_search(kept.begin(), kept.end(), p));
    // window
    for (std::int64_t p = std::max<std::int64_t>(S, newest - W + 1); p <= newest; ++p)
      REQUIRE(std::binary_search(kept.begin(), kept.end(), p));
    const int mid = static_cast<int>(kept.size()) - static_cast<int>(std::min<std::int64_t>(S, n_seen)) -
                    static_cast<int>(std::min<std::int64_t>(W, std::max<std::int64_t>(0, n_seen - S)));
    REQUIRE(mid >= 0);
    REQUIRE(mid <= T);
    REQUIRE(static_cast<int>(kept.size()) <= S + W + T);
    // candidate set before this step's eviction: prev + newest
    std::vector<std::int64_t> cand = prev;
    cand.push_back(newest);
    if (kept.size() == cand.size()) {
      REQUIRE(kept == cand);  // no eviction at all
    } else {
      ++resegmentations;
      std::vector<std::int64_t> old, fresh, expect_mid;
      for (std::int64_t p : cand)
        if (p >= S && p <= newest - W) (p <= old_boundary ? old : fresh).push_back(p);
      for (std::size_t j = 0; j < old.size(); j += static_cast<std::size_t>(thin)) expect_mid.push_back(old[j]);
      for (std::size_t c0 = 0; c0 < fresh.size(); c0 += static_cast<std::size_t>(chunk)) {
        const std::size_t c1 = std::min(fresh.size(), c0 + static_cast<std::size_t>(chunk));
        std::int64_t best = fresh[c0];
        for (std::size_t j = c0 + 1; j < c1; ++j)
          if (PositionScorer::value(fresh[j]) > PositionScorer::value(best)) best = fresh[j];
        expect_mid.push_back(best);
      }
      std::sort(expect_mid.begin(), expect_mid.end());
      std::vector<std::int64_t> got_mid;
      for (std::int64_t p : kept)
        if (p >= S && p <= newest - W) got_mid.push_back(p);
      REQUIRE(got_mid == expect_mid);
      middle_after_reseg.push_back(static_cast<int>(got_mid.size()));
      old_boundary = newest - W;
    }
    prev = kept;
  }
};

CacheConfig small_cfg(int budget) {
  return CacheConfig{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 4, .budget = budget};
}

}  // namespace

TEST_CASE("BUZZ keeps the beehive structure at every step for 12,000 steps (official parameters)") {
  // sinks 4 + window 160 + threshold 400 = 564: the official defaults need this budget.
  CacheConfig cfg = small_cfg(564);
  KVCache<Buzz<PositionScorer>> cache(cfg, {});
  const auto& pol = cache.backend().policy(0);
  REQUIRE(pol.thin() == 3);
  kvtest::Rng rng(11);
  std::vector<float> out(4 * 4);
  std::vector<StructureTracker> tr(2, StructureTracker{4, 160, 400, 5, 3, {}, -1, 0, {}});
  const int steps = 12000;
  for (int t = 0; t < steps; ++t) {
    auto q = rng.normal(16), k = rng.normal(8), v = rng.normal(8);
    cache.decode(0, q, k, v, out);
    for (int h = 0; h < 2; ++h) tr[h].step(cache.positions(0, h), t);
    if (t % 97 == 0) kvtest::check_invariants(cache);
  }
  for (int h = 0; h < 2; ++h) {
    // The middle size right after each re-segmentation follows x' = ceil(x/h) + ceil((T + 1 - x)/s),
    // starting from x = 0, counted independently of the cache; it settles near T/(1 + s(1 - 1/h)) ≈ 92.
    int x = 0;
    REQUIRE(tr[h].resegmentations > 30);
    for (int got : tr[h].middle_after_reseg) {
      x = (x + 2) / 3 + (400 + 1 - x + 4) / 5;
      REQUIRE(got == x);
    }
    REQUIRE(std::abs(x - 92) <= 2);
  }
}

TEST_CASE("BUZZ in budget-derived mode keeps the structure with per-head budgets") {
  // Budgets 32 and 100: window = floor(2(B-4)/7), threshold = the rest.
  CacheConfig cfg = small_cfg(0);
  cfg.head_budgets = {32, 100};
  typename Buzz<PositionScorer>::Params p{.sinks = 4, .window = 0, .threshold = 0};
  KVCache<Buzz<PositionScorer>> cache(cfg, p);
  const auto& pol = cache.backend().policy(0);
  REQUIRE(pol.window_of(32) == 8);
  REQUIRE(pol.threshold_of(32) == 20);
  REQUIRE(pol.window_of(100) == 27);
  REQUIRE(pol.threshold_of(100) == 69);
  REQUIRE(pol.window_of(564) == 160);
  REQUIRE(pol.threshold_of(564) == 400);
  std::vector<StructureTracker> tr{{4, 8, 20, 5, 3, {}, -1, 0, {}}, {4, 27, 69, 5, 3, {}, -1, 0, {}}};
  kvtest::Rng rng(5);
  std::vector<float> out(16);
  for (int t = 0; t < 10000; ++t) {
    auto q = rng.normal(16), k = rng.normal(8), v = rng.normal(8);
    cache.decode(0, q, k, v, out);
    for (int h = 0; h < 2; ++h) tr[h].step(cache.positions(0, h), t);
    kvtest::check_invariants(cache);
  }
  REQUIRE(cache.size(0, 0) <= 32);
  REQUIRE(cache.size(0, 1) <= 100);
  REQUIRE(tr[0].resegmentations > 500);
}

TEST_CASE("BUZZ with accumulated attention matches a slow double-precision reference") {
  const bool oldest = GENERATE(true, false);
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 40};
  // window 8 + threshold 24 + sinks 4 = 36 < 40: explicit values that leave part of the budget unused.
  Buzz<>::Params p{.sinks = 4, .window = 8, .threshold = 24, .chunk = 4, .thin_stride = 2,
                   .keep_oldest_on_tie = oldest};
  KVCache<Buzz<>> cache(cfg, p);
  const int prompt = 140, total = 3000, d = 8, g = 2;
  kvtest::Tokens tok(cfg, total, 99, 1.5f);
  std::vector<std::vector<RefBuzz>> ref(2, std::vector<RefBuzz>(2, RefBuzz{4, 8, 24, 4, 2, oldest, {}, 0, 0}));
  auto score = [](const RefTok& t) { return t.score; };
  // Prefill: reference column sums with its own causal attention in double.
  for (int l = 0; l < 2; ++l) {
    auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
         V = kvtest::Tokens::rows(tok.v, 0, prompt);
    std::vector<float> out(Q.size());
    cache.prefill(l, Q, K, V, out);
    for (int h = 0; h < 2; ++h) {
      RefBuzz& r = ref[l][h];
      for (int t = 0; t < prompt; ++t) {
        RefTok rt;
        rt.pos = t;
        rt.k = slice(tok.k[t], h, d);
        rt.v = slice(tok.v[t], h, d);
        r.add(rt);
        // query t attends causally to tokens 0..t (all of them are in r.toks right now)
        ref_attend_and_score(r, tok.q[t].data() + static_cast<std::size_t>(h) * g * d, g, d);
      }
      r.fit(score);
      REQUIRE(cache.positions(l, h) == r.positions());
      REQUIRE(r.resegmentations >= 2);  // the prompt's middle needed a second, position-only pass
    }
  }
  std::vector<float> out(static_cast<std::size_t>(4) * d);
  int max_reseg = 0;
  for (int t = prompt; t < total; ++t)
    for (int l = 0; l < 2; ++l) {
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      for (int h = 0; h < 2; ++h) {
        RefBuzz& r = ref[l][h];
        RefTok rt;
        rt.pos = t;
        rt.k = slice(tok.k[t], h, d);
        rt.v = slice(tok.v[t], h, d);
        r.add(rt);
        const auto o = ref_attend_and_score(r, tok.q[t].data() + static_cast<std::size_t>(h) * g * d, g, d);
        for (int c = 0; c < g * d; ++c)
          REQUIRE(std::abs(o[c] - out[static_cast<std::size_t>(h) * g * d + c]) < 1e-4);
        r.fit(score);
        REQUIRE(cache.positions(l, h) == r.positions());
        max_reseg = std::max(max_reseg, r.resegmentations);
      }
      kvtest::check_invariants(cache);
    }
  REQUIRE(max_reseg > 100);
  REQUIRE(cache.size(0, 0) <= 36);
}

TEST_CASE("BUZZ with the SimHash scorer matches a reference with its own SimHash loop") {
  using HB = Buzz<kvtrim::HashScorer>;
  const auto reduce = GENERATE(kvtrim::GroupReduce::kSum, kvtrim::GroupReduce::kMax);
  const bool oldest = GENERATE(true, false);
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 6, .head_dim = 8, .budget = 48};
  HB::Params p{.sinks = 2, .window = 0, .threshold = 0, .chunk = 3, .keep_oldest_on_tie = oldest,
               .scorer = {.bits = 8, .seed = 1234, .reduce = reduce}};
  KVCache<HB> cache(cfg, p);
  const int d = 8, g = 3, W = (48 - 2) * 2 / 7, T = 48 - 2 - W, total = 2500;
  REQUIRE(cache.backend().policy(0).window_of(48) == W);
  kvtest::Tokens tok(cfg, total, 2024);
  // The reference's own sign code: bit j = [sum_c P[j][c] x[c] >= 0], summed in float in index order.
  auto code_of = [](const kvtrim::SimHashProjection& P, const float* x) {
    std::uint64_t c = 0;
    for (int j = 0; j < P.bits(); ++j) {
      float dot = 0.0f;
      for (int i = 0; i < P.dim(); ++i) dot += P.at(j, i) * x[i];
      if (dot >= 0.0f) c |= std::uint64_t{1} << j;
    }
    return c;
  };
  auto popcount = [](std::uint64_t x) {
    int n = 0;
    for (; x; x >>= 1) n += static_cast<int>(x & 1u);
    return n;
  };
  std::vector<kvtrim::SimHashProjection> proj;
  for (int l = 0; l < 2; ++l) proj.emplace_back(d, 8, kvtrim::simhash_stream_seed(1234, static_cast<std::uint64_t>(l)));
  std::vector<std::vector<RefBuzz>> ref(2, std::vector<RefBuzz>(2, RefBuzz{2, W, T, 3, 2, oldest, {}, 0, 0}));
  std::vector<float> out(static_cast<std::size_t>(6) * d);
  for (int t = 0; t < total; ++t)
    for (int l = 0; l < 2; ++l) {
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      for (int h = 0; h < 2; ++h) {
        RefBuzz& r = ref[l][h];
        RefTok rt;
        rt.pos = t;
        rt.k = slice(tok.k[t], h, d);
        rt.code = code_of(proj[l], rt.k.data());
        r.add(rt);
        std::vector<std::uint64_t> qc;
        for (int gi = 0; gi < g; ++gi)
          qc.push_back(code_of(proj[l], tok.q[t].data() + static_cast<std::size_t>(h * g + gi) * d));
        r.fit([&](const RefTok& x) {
          int acc = 0;
          for (auto c : qc) {
            const int dist = popcount(c ^ x.code);
            acc = reduce == kvtrim::GroupReduce::kMax ? std::max(acc, dist) : acc + dist;
          }
          return -double(acc);
        });
        REQUIRE(cache.positions(l, h) == r.positions());
      }
      kvtest::check_invariants(cache);
    }
  REQUIRE(ref[0][0].resegmentations > 100);
  REQUIRE(cache.size(1, 1) <= 48);
}

TEST_CASE("BUZZ with a budget that holds everything equals FullCache") {
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<Buzz<>>({.sinks = 4, .window = 0, .threshold = 0}, cfg, 20, 120);
  kvtest::check_equals_full_cache<Buzz<kvtrim::HashScorer>>({.sinks = 4, .window = 0, .threshold = 0}, cfg, 0, 90);
}

TEST_CASE("BUZZ is deterministic") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 32};
  kvtest::Tokens tok(cfg, 600, 3);
  auto run = [&](auto tag) {
    using P = typename decltype(tag)::type;
    KVCache<P> cache(cfg, {.sinks = 4, .window = 0, .threshold = 0});
    std::vector<float> out(32), all;
    for (int t = 0; t < tok.size(); ++t) {
      cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
      all.insert(all.end(), out.begin(), out.end());
    }
    auto p = cache.positions(0, 1);
    all.insert(all.end(), p.begin(), p.end());
    return all;
  };
  REQUIRE(run(std::type_identity<Buzz<>>{}) == run(std::type_identity<Buzz<>>{}));
  REQUIRE(run(std::type_identity<Buzz<kvtrim::HashScorer>>{}) == run(std::type_identity<Buzz<kvtrim::HashScorer>>{}));
}

TEST_CASE("BUZZ rejects bad parameters with kvtrim::Error naming them") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 4, .budget = 64};
  using P = Buzz<>::Params;
  auto msg = [&](P p) {
    try {
      KVCache<Buzz<>> c(cfg, p);
    } catch (const kvtrim::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const P derived{.window = 0, .threshold = 0};
  auto with = [&](auto f) {
    P p = derived;
    f(p);
    return p;
  };
  CHECK(msg(with([](P& p) { p.chunk = 0; })).find("chunk") != std::string::npos);
  CHECK(msg(with([](P& p) { p.chunk = 1; })).find("chunk") != std::string::npos);
  CHECK(msg(with([](P& p) { p.chunk = 2; })).find("thin") != std::string::npos);   // (2+1)/2 = 1
  CHECK(msg(with([](P& p) { p.chunk = 2; p.thin_stride = 2; })).empty());
  CHECK(msg(with([](P& p) { p.sinks = -1; })).find("sinks") != std::string::npos);
  CHECK(msg(with([](P& p) { p.window = -3; })).find("window") != std::string::npos);
  CHECK(msg(with([](P& p) { p.threshold = -1; })).find("threshold") != std::string::npos);
  CHECK(msg(with([](P& p) { p.thin_stride = -1; })).find("thin_stride") != std::string::npos);
  CHECK(msg(P{}).find("budget 64") != std::string::npos);  // official 4 + 160 + 400 does not fit 64
  CHECK(msg(with([](P& p) { p.window = 50; })).empty());  // threshold derived: 64 - 4 - 50 = 10
  CHECK(msg(with([](P& p) { p.window = 59; })).find("threshold (1, derived)") != std::string::npos);
  CHECK(msg(with([](P& p) { p.sinks = 62; })).find("budget 64") != std::string::npos);
  CHECK(msg(derived).empty());
  CHECK_THROWS_AS((KVCache<Buzz<kvtrim::HashScorer>>(cfg, {.window = 0, .threshold = 0, .scorer = {.bits = 0}})),
                  kvtrim::Error);
  CHECK_THROWS_AS((KVCache<Buzz<kvtrim::HashScorer>>(cfg, {.window = 0, .threshold = 0, .scorer = {.bits = 65}})),
                  kvtrim::Error);
}

namespace {
template <class Scorer>
struct BuzzSpecT : kvtest::prop::SpecBase<kvtrim::Buzz<Scorer>> {
  using Policy = kvtrim::Buzz<Scorer>;
  static constexpr const char* kLabel = std::is_same_v<Scorer, kvtrim::HashScorer> ? "Buzz<HashScorer>" : "Buzz";
  static constexpr int kMinBudget = 3;
  static typename Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    typename Policy::Params p;
    p.sinks = rng.uniform_int(0, std::min(3, min_budget - 3));
    p.window = rng.uniform_int(1, std::min(4, min_budget - p.sinks - 2));
    p.threshold = rng.uniform_int(2, min_budget - p.sinks - p.window);
    p.chunk = rng.uniform_int(2, 4);
    p.thin_stride = p.chunk == 2 ? 2 : 0;
    p.keep_oldest_on_tie = rng.uniform_int(0, 1) == 1;
    if constexpr (std::is_same_v<Scorer, kvtrim::HashScorer>) {
      p.scorer.bits = rng.uniform_int(1, 64);
      p.scorer.reduce = kvtest::prop::any_reduce(rng);
    } else {
      p.scorer.reduce = kvtest::prop::any_reduce(rng);
    }
    return p;
  }
  // The first `sinks` tokens sent and the `window` newest.
  static kvtest::prop::Seen must_keep(const typename Policy::Params& p, int, const kvtest::prop::Seen& seen) {
    kvtest::prop::Seen out(seen.begin(),
                           seen.begin() + std::min<std::ptrdiff_t>(p.sinks, static_cast<std::ptrdiff_t>(seen.size())));
    for (std::size_t i = seen.size() > static_cast<std::size_t>(p.window) ? seen.size() - p.window : 0;
         i < seen.size(); ++i)
      if (i >= static_cast<std::size_t>(p.sinks)) out.push_back(seen[i]);
    return out;
  }
};
}  // namespace

TEMPLATE_TEST_CASE("BUZZ: random prefill/decode/reset sequences agree with the reference model", "[buzz][property]",
                   kvtrim::AccumulatedAttention, kvtrim::HashScorer) {
  kvtest::prop::require_properties<BuzzSpecT<TestType>>(1);
}
