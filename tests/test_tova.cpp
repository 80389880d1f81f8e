// TOVA: hand-worked victims (GQA reductions, no accumulation, protection), a slow independent reference over
// thousands of random steps (MHA and GQA), budgets, determinism, equality with FullCache, parameter errors.
#include <kvtrim/policies/tova.hpp>

#include "property.hpp"
#include "testing.hpp"

using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::GroupReduce;
using kvtrim::KVCache;
using kvtrim::TOVA;

namespace {

// ---- slow reference: a plain list of tokens per (layer, KV head), its own attention in double ----------
struct RefTok {
  std::int64_t pos;
  const float* k;
  double score = 0;
};

struct RefTOVA {
  TOVA::Params p;
  int budget = 0, group = 1, d = 0;
  std::vector<RefTok> toks;
  std::int64_t newest = -1;

  void push(std::int64_t pos, const float* k) {
    toks.push_back({pos, k});
    newest = std::max(newest, pos);
  }
  bool is_protected(std::int64_t pos) const { return pos < p.sinks || pos > newest - p.recent; }
  // Sets every token's score from the group's queries (q: group rows of d floats, consecutive).
  void score_from(const float* q) {
    std::vector<std::vector<double>> pr(group);
    for (int gi = 0; gi < group; ++gi) {
      std::vector<double> s(toks.size());
      double m = -1e300, z = 0;
      for (std::size_t j = 0; j < toks.size(); ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += double(q[gi * d + i]) * double(toks[j].k[i]);
        s[j] = dot / std::sqrt(double(d));
        m = std::max(m, s[j]);
      }
      for (auto& e : s) z += (e = std::exp(e - m));
      for (auto& e : s) e /= z;
      pr[gi] = s;
    }
    for (std::size_t j = 0; j < toks.size(); ++j) {
      double acc = pr[0][j];
      for (int gi = 1; gi < group; ++gi)
        acc = p.group_reduce == GroupReduce::kMax ? std::max(acc, pr[gi][j]) : acc + pr[gi][j];
      toks[j].score = p.group_reduce == GroupReduce::kMean ? acc / group : acc;
    }
  }
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> out;
    for (const auto& t : toks) out.push_back(t.pos);
    std::sort(out.begin(), out.end());
    return out;
  }
  bool has(std::int64_t pos) const {
    for (const auto& t : toks)
      if (t.pos == pos) return true;
    return false;
  }
};

// Follows the cache where the two differ only by a near-tie (float vs double); fails otherwise.
bool reconcile(RefTOVA& ref, const std::vector<std::int64_t>& cache_pos, const std::vector<RefTok>& before) {
  if (ref.positions() == cache_pos) return false;
  double boundary = 1e300;
  for (const auto& t : ref.toks)
    if (!ref.is_protected(t.pos)) boundary = std::min(boundary, t.score);
  std::vector<RefTok> adopted;
  for (const auto& t : before) {
    const bool in_cache = std::binary_search(cache_pos.begin(), cache_pos.end(), t.pos);
    if (in_cache != ref.has(t.pos)) {
      INFO("position " << t.pos << " score " << t.score << " boundary " << boundary);
      REQUIRE(!ref.is_protected(t.pos));
      REQUIRE(std::abs(t.score - boundary) <= 1e-5);
    }
    if (in_cache) adopted.push_back(t);
  }
  ref.toks = adopted;
  return true;
}

struct DiffCase {
  CacheConfig cfg;
  TOVA::Params p;
  int prompt = 0;
  int steps = 0;
  std::uint64_t seed = 1;
  float scale = 1.0f;
  bool gaps = false;
};

int run_differential(const DiffCase& c) {
  const CacheConfig& cfg = c.cfg;
  const int L = cfg.n_layers, H = cfg.n_kv_heads, g = cfg.group_size(), d = cfg.head_dim;
  KVCache<TOVA> cache(cfg, c.p);
  const int total = c.prompt + c.steps;
  Tokens tok(cfg, total, c.seed, c.scale);
  std::vector<std::vector<RefTOVA>> ref(L, std::vector<RefTOVA>(H));
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) ref[l][h] = RefTOVA{c.p, cfg.budget_of(l, h), g, d, {}, -1};
  int reconciled = 0;
  if (c.prompt > 0) {
    std::vector<float> out(static_cast<std::size_t>(c.prompt) * cfg.n_q_heads * d);
    for (int l = 0; l < L; ++l) {
      cache.prefill(l, Tokens::rows(tok.q, 0, c.prompt), Tokens::rows(tok.k, 0, c.prompt),
                    Tokens::rows(tok.v, 0, c.prompt), out);
      for (int h = 0; h < H; ++h) {
        RefTOVA& r = ref[l][h];
        for (int t = 0; t < c.prompt; ++t) r.push(t, tok.k[t].data() + h * d);
        r.score_from(tok.q[c.prompt - 1].data() + h * g * d);  // the last prompt query decides
        const auto before = r.toks;
        if (static_cast<int>(r.toks.size()) > r.budget) {
          std::vector<RefTok> keep, others;
          for (const auto& t : r.toks) (r.is_protected(t.pos) ? keep : others).push_back(t);
          std::sort(others.begin(), others.end(), [](const RefTok& a, const RefTok& b) {
            return a.score > b.score || (a.score == b.score && a.pos > b.pos);
          });
          others.resize(static_cast<std::size_t>(r.budget) - keep.size());
          keep.insert(keep.end(), others.begin(), others.end());
          r.toks = keep;
        }
        reconciled += reconcile(r, cache.positions(l, h), before);
      }
    }
  }
  kvtest::Rng gap_rng(c.seed + 5);
  std::int64_t pos = c.prompt;
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
  for (int t = c.prompt; t < total; ++t) {
    for (int l = 0; l < L; ++l) {
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out, pos);
      for (int h = 0; h < H; ++h) {
        RefTOVA& r = ref[l][h];
        r.push(pos, tok.k[t].data() + h * d);
        r.score_from(tok.q[t].data() + h * g * d);
        const auto before = r.toks;
        if (static_cast<int>(r.toks.size()) > r.budget) {
          int v = -1;
          for (int i = 0; i < static_cast<int>(r.toks.size()); ++i) {
            if (r.is_protected(r.toks[i].pos)) continue;
            if (v < 0 || r.toks[i].score < r.toks[v].score ||
                (r.toks[i].score == r.toks[v].score && r.toks[i].pos < r.toks[v].pos))
              v = i;
          }
          r.toks.erase(r.toks.begin() + v);
        }
        const auto kept = cache.positions(l, h);
        reconciled += reconcile(r, kept, before);
        for (const auto& b : before)
          if (r.is_protected(b.pos)) REQUIRE(std::binary_search(kept.begin(), kept.end(), b.pos));
      }
    }
    kvtest::check_invariants(cache);
    pos += c.gaps ? gap_rng.uniform_int(1, 4) : 1;
  }
  return reconciled;
}

}  // namespace

TEST_CASE("TOVA hand-worked: the current query decides, the new token can go, protection holds", "[tova]") {
  // d = 2, budget 2. Keys k0 = e0, k1 = e1, k2 = -e1. Steps 0-1 look hard at token 0 (irrelevant to TOVA:
  // no accumulation). Step 2's query is 4*sqrt(2)*e1: logits 0, 4, -4 for tokens 0, 1, 2.
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 2, .budget = 2};
  const std::vector<std::vector<float>> keys{{1, 0}, {0, 1}, {0, -1}};
  const float s2 = std::sqrt(2.0f);
  auto run = [&](TOVA::Params p) {
    KVCache<TOVA> cache(cfg, p);
    std::vector<float> v{1, 1}, out(2), q_old{10 * s2, 0}, q_new{0, 4 * s2};
    for (int t = 0; t < 3; ++t) cache.decode(0, t < 2 ? q_old : q_new, keys[t], v, out);
    return cache.positions(0, 0);
  };
  REQUIRE(run({}) == std::vector<std::int64_t>{0, 1});                         // paper: the new token goes
  REQUIRE(run({.recent = 1}) == std::vector<std::int64_t>{1, 2});              // kvpress: newest kept, 0 goes
  REQUIRE(run({.sinks = 1, .recent = 1}) == std::vector<std::int64_t>{0, 2});  // only token 1 is unprotected
}

TEST_CASE("TOVA hand-worked: exact ties evict the oldest position", "[tova]") {
  // Every key equal: each step's attention is uniform, so every slot ties and the oldest one goes.
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 4, .budget = 3};
  KVCache<TOVA> cache(cfg, {.sinks = 1});
  Tokens tok(cfg, 20, 8);
  std::vector<float> k{0.5f, -1, 2, 0}, out(8);
  for (int t = 0; t < 20; ++t) {
    cache.decode(0, tok.q[t], k, tok.v[t], out);
    if (t >= 3) REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{0, t - 1, t});  // sink 0 protected
  }
}

TEST_CASE("TOVA hand-worked: GQA mean and max pick different victims", "[tova]") {
  // One KV head, two query heads, d = 2. Keys a = e0, b = e1, c = 10 e1. Final-step queries
  // qA = sqrt2 (1, 0.3), qB = sqrt2 (-6, 0.3): logits A: a 1, b .3, c 3; B: a -6, b .3, c 3.
  // pA = (.1125, .0559, .8316), pB = (.0001, .0630, .9369):
  // mean: a .0563 < b .0595 -> a goes; max: b .0630 < a .1125 -> b goes; sum ranks like mean.
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 2, .budget = 2};
  const std::vector<std::vector<float>> keys{{1, 0}, {0, 1}, {0, 10}};
  const float s2 = std::sqrt(2.0f);
  auto run = [&](GroupReduce how) {
    KVCache<TOVA> cache(cfg, {.group_reduce = how});
    std::vector<float> v{1, 1}, out(4), q{s2, 0.3f * s2, -6 * s2, 0.3f * s2};
    for (int t = 0; t < 3; ++t) cache.decode(0, q, keys[t], v, out);
    return cache.positions(0, 0);
  };
  REQUIRE(run(GroupReduce::kMean) == std::vector<std::int64_t>{1, 2});
  REQUIRE(run(GroupReduce::kSum) == std::vector<std::int64_t>{1, 2});
  REQUIRE(run(GroupReduce::kMax) == std::vector<std::int64_t>{0, 2});
}

TEST_CASE("TOVA prefill keeps the tokens the last prompt query attends to most", "[tova]") {
  // The last prompt query is along e0; keys 2, 5 and 7 have a positive e0 component (3, 2, 1), the rest 0.
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 2, .budget = 4};
  KVCache<TOVA> cache(cfg, {.recent = 1});
  const int T = 10;
  std::vector<float> Q(T * 2, 0.0f), K(T * 2, 0.0f), V(T * 2, 1.0f), out(T * 2);
  Q[(T - 1) * 2] = 4;
  K[2 * 2] = 3;
  K[5 * 2] = 2;
  K[7 * 2] = 1;
  cache.prefill(0, Q, K, V, out);
  REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{2, 5, 7, 9});
}

TEST_CASE("TOVA matches a slow reference over thousands of random steps", "[tova][differential]") {
  int reconciled = 0, steps = 0;
  auto run = [&](const DiffCase& c) {
    reconciled += run_differential(c);
    steps += c.steps * c.cfg.n_layers * c.cfg.n_kv_heads;
  };
  const CacheConfig mha{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 16, .budget = 24};
  const CacheConfig gqa{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 16, .budget = 20};
  SECTION("MHA, paper (no protection), prompt then decode") { run({mha, {}, 50, 2000, 31, 1.5f}); }
  SECTION("MHA, sinks and recent, gaps in positions") { run({mha, {.sinks = 2, .recent = 3}, 30, 2000, 32, 1.5f, true}); }
  SECTION("GQA mean") { run({gqa, {.group_reduce = GroupReduce::kMean}, 40, 2000, 33, 1.5f}); }
  SECTION("GQA sum, per-head budgets") {
    CacheConfig c = gqa;
    c.head_budgets = {7, 15};
    run({c, {.group_reduce = GroupReduce::kSum, .recent = 1}, 25, 2000, 34, 1.5f});
  }
  SECTION("GQA max") { run({gqa, {.group_reduce = GroupReduce::kMax, .sinks = 1}, 40, 2000, 35, 1.5f}); }
  WARN("TOVA differential: " << steps << " head-steps, " << reconciled << " float-vs-double near-ties reconciled");
  REQUIRE(reconciled * 100 <= steps);
}

TEST_CASE("TOVA is deterministic and the same as FullCache when the budget holds everything", "[tova]") {
  const CacheConfig gqa{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<TOVA>({}, gqa, 20, 70);
  kvtest::check_equals_full_cache<TOVA>({.group_reduce = GroupReduce::kMax, .sinks = 2, .recent = 2}, gqa, 0, 50);
  CacheConfig cfg = gqa;
  cfg.budget = 9;
  kvtest::require_deterministic([&] { return KVCache<TOVA>(cfg, {.recent = 1}); }, 30, 300, 78);
}

TEST_CASE("TOVA rejects bad parameters with kvtrim::Error", "[tova][errors]") {
  using Catch::Contains;
  const CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 8};
  REQUIRE_THROWS_WITH((KVCache<TOVA>(cfg, {.sinks = -1})), Contains("TOVA: sinks must be >= 0, got -1"));
  REQUIRE_THROWS_WITH((KVCache<TOVA>(cfg, {.recent = -2})), Contains("TOVA: recent must be >= 0, got -2"));
  REQUIRE_THROWS_WITH((KVCache<TOVA>(cfg, {.sinks = 4, .recent = 5})),
                      Contains("sinks (4) + recent (5) = 9 exceeds the budget 8"));
  REQUIRE_NOTHROW((KVCache<TOVA>(cfg, {.sinks = 4, .recent = 4})));
}

namespace {
struct TovaSpec : kvtest::prop::SpecBase<TOVA> {
  static constexpr const char* kLabel = "TOVA";
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p{.group_reduce = kvtest::prop::any_reduce(rng)};
    p.sinks = rng.uniform_int(0, min_budget / 2);
    p.recent = rng.uniform_int(0, min_budget - p.sinks);
    return p;
  }
  static kvtest::prop::Seen must_keep(const Policy::Params& p, int, const kvtest::prop::Seen& seen) {
    return kvtest::prop::protected_positions(seen, p.sinks, p.recent);
  }
};
}  // namespace

TEST_CASE("TOVA: random prefill/decode/reset sequences agree with the reference model", "[tova][property]") {
  kvtest::prop::require_properties<TovaSpec>(1);
}
