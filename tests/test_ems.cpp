// EMS: hand-worked evict-vs-merge cases, mass conservation, FullCache equivalence, head-wise adaptation,
// invariants, determinism and bad parameters.
#include <kvtrim/policies/ems.hpp>

#include <string>

#include "property.hpp"
#include "testing.hpp"

namespace {

using kvtrim::CacheConfig;
using kvtrim::Ems;
using kvtrim::KVCache;

// Kept slot (in the store) that holds position p.
template <class Cache>
int slot_of(const Cache& c, std::int64_t p) {
  const auto& h = c.backend().head(0, 0);
  for (int i = 0; i < h.size(); ++i)
    if (h.pos(i) == p) return i;
  return -1;
}

// Four tokens with zero queries (uniform attention) into one head with budget 3, recent 1:
// after step 3 the normalised global scores G/n are 25/48 (pos 0), 13/36 (pos 1), 7/24 (pos 2), 1/4 (pos 3,
// protected), so position 2 is the one to go. Its key decides evict vs merge.
struct HandCase {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4, .budget = 3};
  std::vector<std::vector<float>> keys{{0, 1, 0, 0}, {1, 0, 0, 0}, {2, 0, 0, 0}, {0, 0, 1, 0}};
  std::vector<std::vector<float>> values{{1, 2, 3, 4}, {10, 0, 0, 0}, {0, 10, 0, 0}, {5, 5, 5, 5}};
  template <class Cache>
  void run(Cache& c) {
    std::vector<float> q(4, 0.0f), out(4);
    for (int t = 0; t < 4; ++t) c.decode(0, q, keys[t], values[t], out);
  }
};

}  // namespace

TEST_CASE("EMS hand case: a redundant victim is merged into its most similar kept token") {
  HandCase hc;  // key of pos 2 = 2 x key of pos 1: cosine 1
  KVCache<Ems> c(hc.cfg, {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal});
  hc.run(c);
  REQUIRE(c.positions(0, 0) == std::vector<std::int64_t>{0, 1, 3});
  REQUIRE(c.merges() == 1);
  REQUIRE(c.evictions() == 0);
  const auto& h = c.backend().head(0, 0);
  const int s1 = slot_of(c, 1);
  // weights = masses: pos 1 got 1/2 + 1/3 + 1/4 = 13/12, pos 2 got 1/3 + 1/4 = 7/12.
  const double w1 = 13.0 / 12, w2 = 7.0 / 12;
  REQUIRE(h.key(s1)[0] == Approx((w1 * 1 + w2 * 2) / (w1 + w2)));
  REQUIRE(h.key(s1)[1] == 0.0f);
  REQUIRE(h.value(s1)[0] == Approx(w1 * 10 / (w1 + w2)));
  REQUIRE(h.value(s1)[1] == Approx(w2 * 10 / (w1 + w2)));
  REQUIRE(h.meta(s1).mass == Approx(w1 + w2));
  REQUIRE(h.meta(s1).count == 2);
  REQUIRE(h.meta(s1).seen == 3);
  // untouched tokens keep their rows
  const int s0 = slot_of(c, 0);
  REQUIRE(std::vector<float>(h.value_ptr(s0), h.value_ptr(s0) + 4) == hc.values[0]);
}

TEST_CASE("EMS hand case with half storage: the merge is computed in fp32 and stored rounded to half") {
  HandCase hc;
  KVCache<Ems, kvtrim::CpuBackend<kvtrim::half>> c(hc.cfg,
                                                   {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal});
  hc.run(c);  // every row of the hand case is exact in half
  REQUIRE(c.positions(0, 0) == std::vector<std::int64_t>{0, 1, 3});
  REQUIRE(c.merges() == 1);
  const auto& h = c.backend().head(0, 0);
  const int s1 = slot_of(c, 1);
  const double w1 = 13.0 / 12, w2 = 7.0 / 12;
  const kvtrim::half key(static_cast<float>((w1 * 1 + w2 * 2) / (w1 + w2)));  // 1.35 rounds to 1.349609375
  REQUIRE(h.key_ptr(s1)[0] == key);
  REQUIRE(static_cast<float>(key) != 1.35f);
  REQUIRE(static_cast<float>(h.value_ptr(s1)[0]) == 6.5f);  // 10 * 13/20 and 10 * 7/20: exact in half
  REQUIRE(static_cast<float>(h.value_ptr(s1)[1]) == 3.5f);
  REQUIRE(h.key_norm(s1) == static_cast<float>(key));  // later merges use the stored key's norm
}

TEST_CASE("EMS hand case: merge_keys = false averages values only") {
  HandCase hc;
  KVCache<Ems> c(hc.cfg, {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal, .merge_keys = false});
  hc.run(c);
  REQUIRE(c.merges() == 1);
  const auto& h = c.backend().head(0, 0);
  const int s1 = slot_of(c, 1);
  REQUIRE(h.key(s1)[0] == 1.0f);
  REQUIRE(h.value(s1)[0] == Approx(13.0 / 20 * 10));
}

TEST_CASE("EMS hand case: merge weights by count give the plain average") {
  HandCase hc;
  KVCache<Ems> c(hc.cfg, {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal,
                          .merge_weight = kvtrim::EmsMergeWeight::kCount});
  hc.run(c);
  const auto& h = c.backend().head(0, 0);
  const int s1 = slot_of(c, 1);
  REQUIRE(h.key(s1)[0] == Approx(1.5));
  REQUIRE(h.value(s1)[0] == Approx(5.0));
  REQUIRE(h.value(s1)[1] == Approx(5.0));
}

TEST_CASE("EMS hand case: a victim unlike every kept token is evicted") {
  HandCase hc;
  hc.keys[2] = {0, 0, 0, 1};  // orthogonal to every other key
  KVCache<Ems> c(hc.cfg, {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal});
  hc.run(c);
  REQUIRE(c.positions(0, 0) == std::vector<std::int64_t>{0, 1, 3});
  REQUIRE(c.merges() == 0);
  REQUIRE(c.evictions() == 1);
  const auto& h = c.backend().head(0, 0);
  REQUIRE(h.key(slot_of(c, 1))[0] == 1.0f);
  REQUIRE(h.value(slot_of(c, 1))[0] == 10.0f);
  REQUIRE(h.meta(slot_of(c, 1)).count == 1);
}

TEST_CASE("EMS hand case: sinks receive merges only when merge_into_sinks") {
  HandCase hc;
  hc.keys[2] = {0, 3, 0, 0};  // parallel to the sink's key only
  // sinks 1 protects pos 0; unprotected are pos 1 (13/36) and pos 2 (7/24): pos 2 goes.
  KVCache<Ems> no(hc.cfg, {.sinks = 1, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal});
  hc.run(no);
  REQUIRE(no.positions(0, 0) == std::vector<std::int64_t>{0, 1, 3});
  REQUIRE(no.evictions() == 1);
  REQUIRE(no.merges() == 0);
  KVCache<Ems> yes(hc.cfg, {.sinks = 1, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal,
                            .merge_into_sinks = true});
  hc.run(yes);
  REQUIRE(yes.positions(0, 0) == std::vector<std::int64_t>{0, 1, 3});
  REQUIRE(yes.merges() == 1);
  const auto& h = yes.backend().head(0, 0);
  const double w0 = 25.0 / 12, w2 = 7.0 / 12;  // pos 0 saw all four queries: 1 + 1/2 + 1/3 + 1/4
  REQUIRE(h.key(slot_of(yes, 0))[1] == Approx((w0 * 1 + w2 * 3) / (w0 + w2)));
}

TEST_CASE("EMS hand case: evict_below sends unimportant victims to the zero class") {
  HandCase hc;  // mergeable victim, but its score 7/24 / (25/48) = 0.56 is below 0.6
  KVCache<Ems> c(hc.cfg, {.sinks = 0, .recent = 1, .combine = kvtrim::EmsCombine::kGlobal, .evict_below = 0.6f});
  hc.run(c);
  REQUIRE(c.evictions() == 1);
  REQUIRE(c.merges() == 0);
}

TEST_CASE("EMS combine rules score as written") {
  using kvtrim::EmsCombine;
  // global average 0.2 of max 0.4 -> 0.5; local 0.3 of max 1.2 -> 0.25
  REQUIRE(kvtrim::Ems::gl_score(0.2f, 0.3f, 0.4f, 1.2f, EmsCombine::kMax) == Approx(0.5));
  REQUIRE(kvtrim::Ems::gl_score(0.2f, 0.3f, 0.4f, 1.2f, EmsCombine::kMean) == Approx(0.375));
  REQUIRE(kvtrim::Ems::gl_score(0.2f, 0.3f, 0.4f, 1.2f, EmsCombine::kGlobal) == Approx(0.5));
  REQUIRE(kvtrim::Ems::gl_score(0.2f, 0.3f, 0.4f, 1.2f, EmsCombine::kLocal) == Approx(0.25));
  REQUIRE(kvtrim::Ems::gl_score(0.2f, 0.0f, 0.4f, 0.0f, EmsCombine::kLocal) == 0.0f);
}

TEST_CASE("EMS merging conserves the attention mass and the token count") {
  // merge_similarity -2: every removed token is merged, none evicted. Each query spreads probability 1 over
  // the kept tokens (group mean), so the masses held must add up to the number of queries so far, and the
  // counts to the number of tokens so far.
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 24};
  cfg.head_budgets = {24, 16, 20, 32};
  const int prompt = 60, total = 1500;
  kvtest::Tokens tok(cfg, total, 31);
  KVCache<Ems> c(cfg, {.merge_similarity = -2.0f});
  auto check = [&](int seen) {
    for (int l = 0; l < 2; ++l)
      for (int hh = 0; hh < 2; ++hh) {
        const auto& h = c.backend().head(l, hh);
        double mass = 0;
        long count = 0;
        for (int i = 0; i < h.size(); ++i) {
          mass += h.meta(i).mass;
          count += h.meta(i).count;
        }
        REQUIRE(mass == Approx(static_cast<double>(seen)).epsilon(1e-4));
        REQUIRE(count == seen);
        REQUIRE(h.evictions() == 0);
        REQUIRE(h.merges() == static_cast<std::uint64_t>(seen - h.size()));
      }
  };
  for (int l = 0; l < 2; ++l) {
    auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
         V = kvtest::Tokens::rows(tok.v, 0, prompt);
    std::vector<float> out(Q.size());
    c.prefill(l, Q, K, V, out);
  }
  check(prompt);
  std::vector<float> out(32);
  for (int t = prompt; t < total; ++t) {
    for (int l = 0; l < 2; ++l) c.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
    check(t + 1);
    kvtest::check_invariants(c);
  }
}

TEST_CASE("EMS with a budget that holds everything equals FullCache") {
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<Ems>({}, cfg, 30, 150);
  kvtest::check_equals_full_cache<Ems>({.merge_similarity = -2.0f}, cfg, 0, 80);
}

TEST_CASE("EMS keeps protected tokens and the invariants over thousands of steps") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  cfg.head_budgets = {32, 48};
  const auto sim = GENERATE(0.9f, 0.0f);
  KVCache<Ems> c(cfg, {.merge_similarity = sim});
  const int prompt = 100, total = 3000;
  kvtest::Tokens tok(cfg, total, 8);
  auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
       V = kvtest::Tokens::rows(tok.v, 0, prompt);
  std::vector<float> pout(Q.size()), out(32);
  c.prefill(0, Q, K, V, pout);
  kvtest::check_invariants(c);
  for (int t = prompt; t < total; ++t) {
    c.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    kvtest::check_invariants(c);
    for (int h = 0; h < 2; ++h) {
      const auto pos = c.positions(0, h);
      REQUIRE(static_cast<int>(pos.size()) == c.budget(0, h));
      for (std::int64_t p = 0; p < 4; ++p) REQUIRE(pos[static_cast<std::size_t>(p)] == p);  // sinks
      for (int r = 0; r < 8; ++r) REQUIRE(pos[pos.size() - 1 - r] == t - r);                   // recent
      const auto& hd = c.backend().head(0, h);
      REQUIRE(hd.evictions() + hd.merges() == static_cast<std::uint64_t>(t + 1 - hd.size()));
    }
  }
  if (sim == 0.0f)
    REQUIRE(c.merges() > c.evictions());  // random keys: about half the victims have a positive cosine
  else
    REQUIRE(c.evictions() > c.merges());
}

TEST_CASE("EMS adapts each head to its sparsity at prefill by keeping fewer tokens") {
  // Head 0: every query points at token 0's key (a very sparse head); head 1: zero queries (flat attention).
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 8, .budget = 40};
  const int prompt = 200, total = 400;
  auto feed = [&](KVCache<Ems>& c) {
    kvtest::Rng r(4);
    std::vector<float> Q, K, V;
    for (int t = 0; t < total; ++t) {
      std::vector<float> q(16, 0.0f), k = r.normal(16, 0.01f), v = r.normal(16);
      q[0] = 6.0f;
      if (t == 0) k[0] = 6.0f;
      Q.insert(Q.end(), q.begin(), q.end());
      K.insert(K.end(), k.begin(), k.end());
      V.insert(V.end(), v.begin(), v.end());
    }
    std::vector<float> out(static_cast<std::size_t>(prompt) * 16);
    c.prefill(0, std::span<const float>(Q).first(prompt * 16), std::span<const float>(K).first(prompt * 16),
              std::span<const float>(V).first(prompt * 16), out);
    for (int t = prompt; t < total; ++t) {
      const std::size_t o = static_cast<std::size_t>(t) * 16;
      c.decode(0, std::span<const float>(Q).subspan(o, 16), std::span<const float>(K).subspan(o, 16),
               std::span<const float>(V).subspan(o, 16), std::span<float>(out).first(16));
      kvtest::check_invariants(c);
    }
  };
  KVCache<Ems> fixed(cfg, {});
  feed(fixed);
  REQUIRE(fixed.size(0, 0) == 40);
  REQUIRE(fixed.size(0, 1) == 40);
  KVCache<Ems> adapt(cfg, {.coverage = 0.9f, .min_keep = 0.25f});
  feed(adapt);
  // sparse head: k* = 1, floor = max(sinks + recent, ceil(0.25 * 40)) = 12
  REQUIRE(adapt.size(0, 0) == 12);
  REQUIRE(adapt.size(0, 1) == 40);
  REQUIRE(adapt.positions(0, 0).front() == 0);
  // decode-only: nothing to measure, the budget holds
  KVCache<Ems> dec(cfg, {.coverage = 0.5f});
  std::vector<float> q(16, 0.5f), k(16, 0.1f), v(16, 1.0f), out(16);
  for (int t = 0; t < 100; ++t) dec.decode(0, q, k, v, out);
  REQUIRE(dec.size(0, 0) == 40);
}

namespace {

// Slow reference for decode: a plain list of tokens, double-precision attention and scores, one victim per
// step chosen and merged/evicted with plain loops, written from the formulas in docs/EMS.md.
struct RefEms {
  struct Tok {
    std::int64_t pos;
    std::vector<double> k, v;
    double G = 0, L = 0;
    int n = 0, c = 1;
  };
  int S, R, B;
  double lambda, tau;
  std::vector<Tok> toks;
  int merges = 0, evictions = 0;

  std::vector<double> step(std::int64_t pos, const float* qg, int group, const float* k, const float* v, int d) {
    Tok t{pos, std::vector<double>(k, k + d), std::vector<double>(v, v + d)};
    toks.push_back(t);
    std::vector<double> out(static_cast<std::size_t>(group) * d, 0.0), p(toks.size(), 0.0);
    for (int g = 0; g < group; ++g) {
      std::vector<double> e(toks.size());
      double m = -INFINITY, z = 0;
      for (std::size_t j = 0; j < toks.size(); ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += double(qg[g * d + i]) * toks[j].k[i];
        e[j] = dot / std::sqrt(double(d));
        m = std::max(m, e[j]);
      }
      for (auto& x : e) z += (x = std::exp(x - m));
      for (std::size_t j = 0; j < toks.size(); ++j) {
        p[j] += e[j] / z / group;
        for (int i = 0; i < d; ++i) out[static_cast<std::size_t>(g) * d + i] += e[j] / z * toks[j].v[i];
      }
    }
    for (std::size_t j = 0; j < toks.size(); ++j) {
      toks[j].G += p[j];
      toks[j].L = lambda * toks[j].L + p[j];
      toks[j].n += 1;
    }
    while (static_cast<int>(toks.size()) > B) remove_one(pos, d);
    return out;
  }

  void remove_one(std::int64_t newest, int d) {
    double mg = 0, ml = 0;
    for (auto& t : toks) {
      mg = std::max(mg, t.G / t.n);
      ml = std::max(ml, t.L);
    }
    std::size_t victim = toks.size();
    double vgl = 0;
    for (std::size_t j = 0; j < toks.size(); ++j) {
      if (toks[j].pos < S || toks[j].pos > newest - R) continue;
      const double gl = std::max(mg > 0 ? toks[j].G / toks[j].n / mg : 0.0, ml > 0 ? toks[j].L / ml : 0.0);
      if (victim == toks.size() || gl < vgl || (gl == vgl && toks[j].pos < toks[victim].pos)) {
        victim = j;
        vgl = gl;
      }
    }
    REQUIRE(victim < toks.size());
    auto cosine = [&](const std::vector<double>& a, const std::vector<double>& b) {
      double ab = 0, aa = 0, bb = 0;
      for (int i = 0; i < d; ++i) ab += a[i] * b[i], aa += a[i] * a[i], bb += b[i] * b[i];
      return ab / std::sqrt(aa * bb);
    };
    std::size_t best = toks.size();
    double bc = 0;
    for (std::size_t j = 0; j < toks.size(); ++j) {
      if (j == victim || toks[j].pos < S) continue;
      const double cs = cosine(toks[victim].k, toks[j].k);
      if (best == toks.size() || cs > bc || (cs == bc && toks[j].pos < toks[best].pos)) best = j, bc = cs;
    }
    if (best < toks.size() && bc >= tau) {
      Tok& c = toks[best];
      const Tok& x = toks[victim];
      const double a = c.G / (c.G + x.G), b = x.G / (c.G + x.G);
      for (int i = 0; i < d; ++i) {
        c.k[i] = a * c.k[i] + b * x.k[i];
        c.v[i] = a * c.v[i] + b * x.v[i];
      }
      c.G += x.G;
      c.L += x.L;
      c.c += x.c;
      c.n = std::max(c.n, x.n);
      ++merges;
    } else {
      ++evictions;
    }
    toks.erase(toks.begin() + static_cast<std::ptrdiff_t>(victim));
  }
};

}  // namespace

TEST_CASE("EMS decode matches a slow double-precision reference") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 24};
  const float tau = GENERATE(0.5f, 0.7f);
  KVCache<Ems> c(cfg, {.sinks = 3, .recent = 5, .local_window = 16, .merge_similarity = tau});
  const int total = 2000, d = 8, g = 2;
  kvtest::Tokens tok(cfg, total, 515);
  std::vector<RefEms> ref(2, RefEms{3, 5, 24, 1.0 - 1.0 / 16, double(tau), {}, 0, 0});
  std::vector<float> out(32);
  for (int t = 0; t < total; ++t) {
    c.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int h = 0; h < 2; ++h) {
      const auto o = ref[h].step(t, tok.q[t].data() + h * g * d, g, tok.k[t].data() + h * d,
                                 tok.v[t].data() + h * d, d);
      for (int i = 0; i < g * d; ++i) REQUIRE(std::abs(o[i] - out[h * g * d + i]) < 1e-3);
      std::vector<std::int64_t> rp;
      for (const auto& x : ref[h].toks) rp.push_back(x.pos);
      REQUIRE(c.positions(0, h) == rp);
      const auto& hd = c.backend().head(0, h);
      REQUIRE(hd.merges() == static_cast<std::uint64_t>(ref[h].merges));
      REQUIRE(hd.evictions() == static_cast<std::uint64_t>(ref[h].evictions));
    }
  }
  for (int h = 0; h < 2; ++h) {
    INFO("merges " << ref[h].merges << " evictions " << ref[h].evictions);
    REQUIRE(ref[h].merges > 100);  // both kinds of removal are exercised
    REQUIRE(ref[h].evictions > 100);
    // merged keys and masses agree
    const auto& hd = c.backend().head(0, h);
    for (const auto& x : ref[h].toks) {
      int s = -1;
      for (int i = 0; i < hd.size(); ++i)
        if (hd.pos(i) == x.pos) s = i;
      REQUIRE(hd.meta(s).mass == Approx(x.G).epsilon(1e-3));
      REQUIRE(hd.meta(s).count == x.c);
      for (int i = 0; i < d; ++i) REQUIRE(hd.key(s)[i] == Approx(x.k[i]).margin(1e-3));
    }
  }
}

TEST_CASE("EMS is deterministic") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 24};
  kvtest::Tokens tok(cfg, 500, 77);
  auto run = [&] {
    KVCache<Ems> c(cfg, {.merge_similarity = 0.2f, .coverage = 0.95f});
    std::vector<float> out(32), all;
    for (int t = 0; t < tok.size(); ++t) {
      c.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
      all.insert(all.end(), out.begin(), out.end());
    }
    auto p = c.positions(0, 0);
    all.insert(all.end(), p.begin(), p.end());
    return all;
  };
  REQUIRE(run() == run());
}

TEST_CASE("EMS rejects bad parameters with kvtrim::Error naming them") {
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 4, .budget = 16};
  auto msg = [&](Ems::Params p) {
    try {
      KVCache<Ems> c(cfg, p);
    } catch (const kvtrim::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  auto has = [&](Ems::Params p, const char* what) { return msg(p).find(what) != std::string::npos; };
  CHECK(msg({}).empty());
  CHECK(has({.sinks = -1}, "sinks"));
  CHECK(has({.recent = -2}, "recent"));
  CHECK(has({.local_window = 0}, "local_window"));
  CHECK(has({.merge_similarity = NAN}, "merge_similarity"));
  CHECK(has({.evict_below = -0.5f}, "evict_below"));
  CHECK(has({.coverage = 0.0f}, "coverage"));
  CHECK(has({.coverage = 1.5f}, "coverage"));
  CHECK(has({.min_keep = 0.0f}, "min_keep"));
  CHECK(has({.sinks = 10, .recent = 7}, "budget 16"));
  CHECK(msg({.sinks = 8, .recent = 8}).empty());
}

namespace {
struct EmsSpec : kvtest::prop::SpecBase<kvtrim::Ems> {
  static constexpr const char* kLabel = "EMS";
  static Policy::Params params(kvtest::Rng& rng, const kvtrim::CacheConfig&, int min_budget) {
    Policy::Params p;
    p.sinks = rng.uniform_int(0, min_budget / 2);
    p.recent = rng.uniform_int(0, min_budget - p.sinks);
    p.local_window = rng.uniform_int(1, 8);
    p.combine = static_cast<kvtrim::EmsCombine>(rng.uniform_int(0, 3));
    p.reduce = kvtest::prop::any_reduce(rng);
    const float sims[] = {-1.0f, 0.0f, 0.5f, 0.9f, 1.1f};
    p.merge_similarity = sims[rng.uniform_int(0, 4)];
    p.evict_below = rng.uniform_int(0, 3) == 0 ? 0.2f : 0.0f;
    p.merge_keys = rng.uniform_int(0, 1) == 1;
    p.merge_weight = static_cast<kvtrim::EmsMergeWeight>(rng.uniform_int(0, 1));
    p.merge_into_sinks = rng.uniform_int(0, 1) == 1;
    p.coverage = rng.uniform_int(0, 1) ? 1.0f : 0.8f;
    p.min_keep = 0.25f;
    return p;
  }
  static kvtest::prop::Seen must_keep(const Policy::Params& p, int, const kvtest::prop::Seen& seen) {
    return kvtest::prop::protected_positions(seen, p.sinks, p.recent);
  }
  // A token that absorbed no other keeps its rows as sent.
  template <class Head>
  static bool row_exact(const Head& h, int i) {
    return h.meta(i).count == 1;
  }
};
}  // namespace

TEST_CASE("EMS: random prefill/decode/reset sequences agree with the reference model", "[ems][property]") {
  kvtest::prop::require_properties<EmsSpec>(1);
}
