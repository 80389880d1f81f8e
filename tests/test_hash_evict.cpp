// SimHash (simhash.hpp) and HashEvict: the generator against published splitmix64 vectors, codes against
// sign-of-projection, hand-built victims for both probes and GQA, a differential test against a plain-loop
// reference, protection, determinism, the FullCache equivalence, parameter errors, and how often the query
// probe's victim is the lowest-cosine key as bits grow.
#include <kvtrim/policies/hash_evict.hpp>
#include <kvtrim/simhash.hpp>

#include <cstdio>

#include "property.hpp"
#include "testing.hpp"

using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::HashEvict;
using kvtrim::HashProbe;
using kvtrim::HashPromptMode;
using kvtrim::KVCache;
using kvtrim::SimHashProjection;

namespace {

// Bit count with a plain loop (independent of std::popcount).
int count_bits(std::uint64_t x) {
  int n = 0;
  for (int b = 0; b < 64; ++b) n += static_cast<int>((x >> b) & 1u);
  return n;
}

// The code of x written out with plain loops over the projection entries: bit j set unless x . row_j < 0.
std::uint64_t ref_code(const SimHashProjection& P, const float* x) {
  std::uint64_t c = 0;
  for (int j = 0; j < P.bits(); ++j) {
    float acc = 0.0f;
    for (int i = 0; i < P.dim(); ++i) acc += P.at(j, i) * x[i];
    if (!(acc < 0.0f)) c |= std::uint64_t{1} << j;
  }
  return c;
}

std::vector<std::int64_t> sorted(std::vector<std::int64_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

// ---- simhash.hpp ------------------------------------------------------------------------------------------

TEST_CASE("splitmix64 reproduces the published reference outputs", "[simhash]") {
  std::uint64_t state = 0;
  REQUIRE(kvtrim::splitmix64_next(state) == 0xE220A8397B1DCDAFull);
  REQUIRE(kvtrim::splitmix64_next(state) == 0x6E789E6AA1B965F4ull);
  REQUIRE(kvtrim::splitmix64_next(state) == 0x06C45D188009454Full);
  // Streams derived from (seed, stream) differ where a plain `seed + stream` would collide.
  REQUIRE(kvtrim::simhash_stream_seed(0, 1) != kvtrim::simhash_stream_seed(1, 0));
  REQUIRE(kvtrim::simhash_stream_seed(5, 3) == kvtrim::simhash_stream_seed(5, 3));
}

TEST_CASE("SimHashProjection is a reproducible standard Gaussian matrix", "[simhash]") {
  const SimHashProjection a(1000, 64, 42), b(1000, 64, 42), c(1000, 64, 43);
  REQUIRE(a.dim() == 1000);
  REQUIRE(a.bits() == 64);
  int same_as_c = 0;
  double sum = 0, sum2 = 0, sum4 = 0;
  for (int j = 0; j < 64; ++j)
    for (int i = 0; i < 1000; ++i) {
      REQUIRE(a.at(j, i) == b.at(j, i));
      same_as_c += a.at(j, i) == c.at(j, i) ? 1 : 0;
      const double x = a.at(j, i);
      sum += x;
      sum2 += x * x;
      sum4 += x * x * x * x;
    }
  REQUIRE(same_as_c < 10);
  const double n = 64000.0;
  // 64000 draws: the standard error of the mean is 0.004, of the variance 0.0056, of the 4th moment ~0.04.
  REQUIRE(std::abs(sum / n) < 0.03);
  REQUIRE(std::abs(sum2 / n - 1.0) < 0.04);
  REQUIRE(std::abs(sum4 / n - 3.0) < 0.3);
  // The first entries follow the documented recipe: Box-Muller on two splitmix64 draws.
  std::uint64_t st = 42;
  const double u1 = (static_cast<double>(kvtrim::splitmix64_next(st) >> 11) + 1.0) / 9007199254740992.0;
  const double u2 = static_cast<double>(kvtrim::splitmix64_next(st) >> 11) / 9007199254740992.0;
  const double r = std::sqrt(-2.0 * std::log(u1)), th = 2.0 * 3.14159265358979323846 * u2;
  REQUIRE(a.at(0, 0) == static_cast<float>(r * std::cos(th)));
  REQUIRE(a.at(0, 1) == static_cast<float>(r * std::sin(th)));
}

TEST_CASE("simhash codes are the signs of the projections, packed; hamming counts differing bits", "[simhash]") {
  kvtest::Rng rng(3);
  for (int bits : {1, 7, 16, 33, 64}) {
    const SimHashProjection P(24, bits, static_cast<std::uint64_t>(bits));
    const std::uint64_t mask = bits == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << bits) - 1;
    for (int trial = 0; trial < 200; ++trial) {
      const auto x = rng.normal(24);
      const std::uint64_t code = P.code(x.data());
      REQUIRE((code & ~mask) == 0);
      std::vector<float> neg(x);
      for (auto& e : neg) e = -e;
      for (int j = 0; j < bits; ++j) {
        double dot = 0;
        for (int i = 0; i < 24; ++i) dot += double(P.at(j, i)) * x[i];
        if (std::abs(dot) > 1e-4) {
          REQUIRE(((code >> j) & 1u) == (dot >= 0 ? 1u : 0u));
          REQUIRE(((P.code(neg.data()) >> j) & 1u) == (dot >= 0 ? 0u : 1u));
        }
      }
      // The free function a kernel would call gives the same code.
      REQUIRE(kvtrim::simhash_code(P.data(), 24, bits, x.data()) == code);
    }
    // An exact zero projection maps to bit 1 (the official code's sign(x) >= 0).
    const std::vector<float> zero(24, 0.0f);
    REQUIRE(P.code(zero.data()) == mask);
  }
  for (int trial = 0; trial < 1000; ++trial) {
    const std::uint64_t a = kvtrim::splitmix64_mix(static_cast<std::uint64_t>(trial));
    const std::uint64_t b = kvtrim::splitmix64_mix(static_cast<std::uint64_t>(trial) + 5000);
    REQUIRE(kvtrim::hamming(a, b) == count_bits(a ^ b));
  }
  REQUIRE(kvtrim::hamming(0, ~std::uint64_t{0}) == 64);
  REQUIRE(kvtrim::hamming(0x5, 0x5) == 0);
}

TEST_CASE("code_by_columns gives code()'s bits for every width", "[simhash]") {
  // 8, 16, 32 and 64 bits take the vectorised path, the others the portable loop; both must be code() exactly.
  kvtest::Rng rng(41);
  for (int bits : {1, 5, 8, 12, 16, 20, 32, 33, 63, 64})
    for (int dim : {1, 7, 24, 64, 128}) {
      const SimHashProjection P(dim, bits, static_cast<std::uint64_t>(bits * 1000 + dim));
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> x = rng.normal(static_cast<std::size_t>(dim));
        if (trial == 0) std::fill(x.begin(), x.end(), 0.0f);  // every projection an exact 0: all bits 1
        INFO("bits " << bits << ", dim " << dim << ", trial " << trial);
        REQUIRE(P.code_by_columns(x.data()) == P.code(x.data()));
      }
    }
}

TEST_CASE("HashEvict's packed probes give the sum of Hamming distances", "[hash]") {
  // distance() packs 64 / bits probes to a word; against the plain sum over the probes, for widths where the
  // probes fill one word, part of one, several words with a partial last one, or one word each.
  kvtest::Rng rng(43);
  for (int bits : {1, 5, 8, 12, 16, 20, 21, 32, 33, 64})
    for (int group : {1, 2, 3, 4, 7, 8, 13, 64}) {
      const HashEvict pol({.bits = bits}, kvtrim::LayerContext{0, 1, 1, group, 8, {32}});
      HashEvict::State s = pol.initial(0, 32);
      const std::uint64_t mask = bits == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << bits) - 1;
      std::vector<std::uint64_t> probes(static_cast<std::size_t>(group));
      for (auto& q : probes) q = rng.gen() & mask;
      HashEvict::SlotMeta m;
      kvtrim::TokenInputs in{nullptr, 8, group, false, probes[0], probes.data()};
      HashEvict::on_insert(s, m, 0, in);
      for (int trial = 0; trial < 50; ++trial) {
        const std::uint64_t code = trial == 0 ? mask : rng.gen() & mask;
        int want = 0;
        for (auto q : probes) want += count_bits(q ^ code);
        INFO("bits " << bits << ", group " << group << ", code " << code);
        REQUIRE(HashEvict::distance(s, code) == want);
      }
    }
}

TEST_CASE("SimHashProjection rejects bad shapes", "[simhash][errors]") {
  using Catch::Contains;
  REQUIRE_THROWS_WITH(SimHashProjection(8, 0, 1), Contains("bits must be in 1..64") && Contains("got 0"));
  REQUIRE_THROWS_WITH(SimHashProjection(8, 65, 1), Contains("got 65"));
  REQUIRE_THROWS_WITH(SimHashProjection(0, 8, 1), Contains("dim (key width) must be > 0, got 0"));
}

// ---- HashEvict: hand-built cases ---------------------------------------------------------------------------

namespace {

// One KV head with a group of two query heads that both ask the direction u; keys are multiples of u.
struct Hand {
  static constexpr int d = 8;
  std::vector<float> u{1.0f, 2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f, 1.5f};
  KVCache<HashEvict> cache;
  std::vector<float> q, v, out;
  Hand(int budget, HashEvict::Params p)
      : cache(CacheConfig{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = d, .budget = budget}, p),
        q(2 * d), v(d, 1.0f), out(2 * d) {
    for (int i = 0; i < d; ++i) q[i] = q[d + i] = u[i];
  }
  void push(float scale) {  // key = scale * u (negative: the opposite direction, all bits flipped)
    std::vector<float> k(d);
    for (int i = 0; i < d; ++i) k[i] = scale * u[i];
    cache.decode(0, q, k, v, out);
  }
  std::vector<std::int64_t> pos() { return cache.positions(0, 0); }
};

}  // namespace

TEST_CASE("HashEvict evicts the key with the largest Hamming distance (hand-built)", "[hash]") {
  STATIC_REQUIRE_FALSE(kvtrim::has(HashEvict::kSignals, kvtrim::Signals::kAttention));
  STATIC_REQUIRE(HashEvict::kTiming == kvtrim::EvictTiming::kBeforeAttention);
  SECTION("query probe: the key opposite to the queries leaves") {
    Hand h(4, {.sinks = 0, .recent = 0});
    const std::uint64_t cu = h.cache.policy(0).projection().code(h.u.data());
    const std::uint64_t all = (std::uint64_t{1} << 16) - 1;
    h.push(1.0f);   // pos 0
    h.push(2.0f);   // pos 1
    h.push(-1.0f);  // pos 2: code = ~code(u), distance 16 to each query
    h.push(0.5f);   // pos 3
    const auto& head = h.cache.backend().head(0, 0);
    for (int i = 0; i < head.size(); ++i) REQUIRE(head.meta(i).code == (head.pos(i) == 2 ? (~cu & all) : cu));
    h.push(1.5f);  // pos 4
    REQUIRE(h.pos() == std::vector<std::int64_t>{0, 1, 3, 4});
  }
  SECTION("key probe (official code) picks differently: the keys far from the new key leave") {
    Hand qp(4, {.sinks = 0, .recent = 0, .probe = HashProbe::kQuery});
    Hand kp(4, {.sinks = 0, .recent = 0, .probe = HashProbe::kKey});
    for (Hand* h : {&qp, &kp}) {
      h->push(1.0f);   // 0
      h->push(2.0f);   // 1
      h->push(-1.0f);  // 2
      h->push(0.5f);   // 3
      h->push(-3.0f);  // 4: the new key points away from u
    }
    REQUIRE(qp.pos() == std::vector<std::int64_t>{0, 1, 3, 4});  // the query still asks for u: pos 2 leaves
    REQUIRE(kp.pos() == std::vector<std::int64_t>{1, 2, 3, 4});  // probe -u: the oldest u-key (pos 0) leaves
  }
  SECTION("ties: the oldest position leaves") {
    Hand h(4, {.sinks = 0, .recent = 0});
    h.push(-1.0f);  // 0
    h.push(-2.0f);  // 1
    h.push(1.0f);   // 2
    h.push(1.0f);   // 3
    h.push(1.0f);   // 4: pos 0 and 1 tie at the largest distance; pos 0 leaves
    REQUIRE(h.pos() == std::vector<std::int64_t>{1, 2, 3, 4});
    h.push(1.0f);  // 5: pos 1 leaves
    REQUIRE(h.pos() == std::vector<std::int64_t>{2, 3, 4, 5});
    h.push(1.0f);  // 6: all at distance 0: the oldest (pos 2) leaves
    REQUIRE(h.pos() == std::vector<std::int64_t>{3, 4, 5, 6});
  }
  SECTION("sinks and the recent window are never evicted, the new token always stays") {
    Hand h(4, {.sinks = 1, .recent = 1});
    h.push(-1.0f);  // 0: sink
    h.push(1.0f);   // 1
    h.push(1.0f);   // 2
    h.push(-1.0f);  // 3
    h.push(-1.0f);  // 4: pos 3 is recent, pos 0 a sink, the new token stays: the tie 1 vs 2 drops pos 1
    REQUIRE(h.pos() == std::vector<std::int64_t>{0, 2, 3, 4});
    h.push(1.0f);  // 5: pos 3 is no longer recent and is the farthest unprotected
    REQUIRE(h.pos() == std::vector<std::int64_t>{0, 2, 4, 5});
  }
}

TEST_CASE("HashEvict with GQA sums the Hamming distances over the query group", "[hash][gqa]") {
  // Two query heads ask opposite directions u and -u: every key is at distance exactly `bits` in sum (no tie
  // break by distance), whereas the first query alone would single out the -u keys. So the oldest leaves.
  Hand h(3, {.sinks = 0, .recent = 0});
  for (int i = 0; i < Hand::d; ++i) h.q[Hand::d + i] = -h.u[i];
  h.push(1.0f);   // 0
  h.push(-1.0f);  // 1
  h.push(2.0f);   // 2
  h.push(1.0f);   // 3: sums tie: pos 0 leaves (a first-query rule would drop pos 1)
  REQUIRE(h.pos() == std::vector<std::int64_t>{1, 2, 3});
  // Now the second query turns to u as well: pos 1 (opposite to both) leaves.
  for (int i = 0; i < Hand::d; ++i) h.q[Hand::d + i] = h.u[i];
  h.push(1.0f);  // 4
  REQUIRE(h.pos() == std::vector<std::int64_t>{2, 3, 4});
}

// ---- HashEvict: differential test against a plain-loop reference ----------------------------------------

namespace {

struct RefHash {
  const SimHashProjection* P = nullptr;
  int budget = 0, sinks = 0, recent = 0;
  struct Tok {
    std::int64_t pos;
    std::uint64_t code;
  };
  std::vector<Tok> held;

  int distance(const std::vector<std::uint64_t>& probes, std::uint64_t code) const {
    int s = 0;
    for (auto p : probes) s += count_bits(p ^ code);
    return s;
  }
  // Prompt: T keys with their codes; probes of the last prompt token (kHash only).
  void prompt(const std::vector<std::uint64_t>& codes, HashPromptMode mode, const std::vector<std::uint64_t>& probes) {
    const int T = static_cast<int>(codes.size());
    held.clear();
    std::vector<Tok> others;
    for (int t = 0; t < T; ++t) {
      const bool prot = T <= budget || t < sinks || (mode == HashPromptMode::kHash && t >= T - 1 - recent);
      (prot ? held : others).push_back({t, codes[t]});
    }
    if (T <= budget) return;
    const std::size_t room = static_cast<std::size_t>(budget) - held.size();
    if (mode == HashPromptMode::kRecentGlobal) {
      for (std::size_t j = others.size() - room; j < others.size(); ++j) held.push_back(others[j]);
      return;
    }
    std::stable_sort(others.begin(), others.end(), [&](const Tok& a, const Tok& b) {
      const int da = distance(probes, a.code), db = distance(probes, b.code);
      return da != db ? da < db : a.pos > b.pos;
    });
    for (std::size_t j = 0; j < room; ++j) held.push_back(others[j]);
  }
  // Step t: the new token is always kept; the victim is the farthest among the others that are neither sinks
  // nor within `recent` positions before t (oldest on ties).
  void step(std::int64_t t, std::uint64_t code, const std::vector<std::uint64_t>& probes) {
    if (static_cast<int>(held.size()) + 1 > budget) {
      int victim = -1, best = -1;
      for (int i = 0; i < static_cast<int>(held.size()); ++i) {
        if (held[i].pos < sinks || held[i].pos >= t - recent) continue;
        const int dist = distance(probes, held[i].code);
        if (dist > best || (dist == best && held[i].pos < held[victim].pos)) {
          best = dist;
          victim = i;
        }
      }
      REQUIRE(victim >= 0);
      held.erase(held.begin() + victim);
    }
    held.push_back({t, code});
  }
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> p;
    for (auto& e : held) p.push_back(e.pos);
    return sorted(p);
  }
};

void run_differential(CacheConfig cfg, const HashEvict::Params& params, int prompt, int total, std::uint64_t seed) {
  KVCache<HashEvict> cache(cfg, params);
  Tokens tok(cfg, total, seed);
  const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
  std::vector<RefHash> ref;
  for (int l = 0; l < L; ++l) {
    // The layer's projection is the documented one for (seed, layer).
    const SimHashProjection want(d, params.bits, kvtrim::simhash_stream_seed(params.seed, static_cast<std::uint64_t>(l)));
    const auto& P = cache.policy(l).projection();
    REQUIRE(P.bits() == params.bits);
    REQUIRE(std::equal(want.data(), want.data() + d * params.bits, P.data()));
    for (int h = 0; h < H; ++h) ref.push_back({&P, cfg.budget_of(l, h), params.sinks, params.recent, {}});
  }
  auto probes = [&](const SimHashProjection& P, int t, int h) {
    std::vector<std::uint64_t> pr;
    if (params.probe == HashProbe::kKey) {
      pr.push_back(ref_code(P, tok.k[t].data() + h * d));
    } else {
      for (int gi = 0; gi < g; ++gi) pr.push_back(ref_code(P, tok.q[t].data() + (h * g + gi) * d));
    }
    return pr;
  };
  if (prompt > 0) {
    std::vector<float> out(static_cast<std::size_t>(prompt) * cfg.n_q_heads * d);
    for (int l = 0; l < L; ++l) {
      cache.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt),
                    out);
      for (int h = 0; h < H; ++h) {
        auto& r = ref[static_cast<std::size_t>(l * H + h)];
        std::vector<std::uint64_t> codes;
        for (int t = 0; t < prompt; ++t) codes.push_back(ref_code(*r.P, tok.k[t].data() + h * d));
        r.prompt(codes, params.prompt, probes(*r.P, prompt - 1, h));
        REQUIRE(cache.positions(l, h) == r.positions());
      }
    }
    kvtest::check_invariants(cache);
  }
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
  for (int t = prompt; t < total; ++t) {
    for (int l = 0; l < L; ++l) {
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      for (int h = 0; h < H; ++h) {
        auto& r = ref[static_cast<std::size_t>(l * H + h)];
        r.step(t, ref_code(*r.P, tok.k[t].data() + h * d), probes(*r.P, t, h));
        const auto kept = cache.positions(l, h);
        REQUIRE(kept == r.positions());
        // Eviction came first: attention ran over exactly the tokens kept now.
        kvtest::require_group_attention(tok, t, kept, h, g, out);
      }
    }
    kvtest::check_invariants(cache);
  }
}

}  // namespace

TEST_CASE("HashEvict matches a plain-loop reference over thousands of steps", "[hash][differential]") {
  SECTION("MHA, defaults (query probe, 16 bits, sinks 4, recent 10), decode only") {
    run_differential({.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 16, .budget = 32}, {}, 0, 3000, 1);
  }
  SECTION("GQA, query probe, 8 bits, long prompt with recent_global") {
    CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 8, .head_dim = 16, .budget = 0};
    cfg.head_budgets = {24, 40, 30, 20};
    run_differential(cfg, {.bits = 8, .sinks = 2, .recent = 5, .seed = 77}, 100, 3000, 2);
  }
  SECTION("GQA, key probe (official), 64 bits, no protection") {
    run_differential({.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 32, .budget = 20},
                     {.bits = 64, .sinks = 0, .recent = 0, .probe = HashProbe::kKey}, 30, 2500, 3);
  }
  SECTION("GQA, query probe, hash-based prompt compression") {
    run_differential({.n_layers = 2, .n_kv_heads = 1, .n_q_heads = 4, .head_dim = 16, .budget = 24},
                     {.bits = 12, .sinks = 3, .recent = 4, .prompt = HashPromptMode::kHash, .seed = 9}, 80, 2000, 4);
  }
  SECTION("GQA, 8 query heads, 20 bits: the probes span three words, the last one partly") {
    run_differential({.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 16, .head_dim = 16, .budget = 24},
                     {.bits = 20, .sinks = 2, .recent = 3, .seed = 11}, 40, 1500, 6);
  }
  SECTION("GQA, 4 query heads, 64 bits: one probe per word") {
    run_differential({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 4, .head_dim = 16, .budget = 20},
                     {.bits = 64, .sinks = 1, .recent = 2, .seed = 12}, 30, 1500, 7);
  }
  SECTION("MHA, key probe, hash-based prompt compression") {
    run_differential({.n_layers = 1, .n_kv_heads = 3, .n_q_heads = 3, .head_dim = 8, .budget = 16},
                     {.bits = 5, .sinks = 1, .recent = 2, .probe = HashProbe::kKey, .prompt = HashPromptMode::kHash},
                     50, 2000, 5);
  }
}

TEST_CASE("HashEvict never evicts protected tokens", "[hash][protection]") {
  // Sinks and recent tokens get keys opposite to every query (the largest distances); they must stay anyway.
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 16, .budget = 20};
  KVCache<HashEvict> cache(cfg, {.sinks = 4, .recent = 10});
  Tokens tok(cfg, 800, 6);
  std::vector<float> out(32);
  for (int t = 0; t < tok.size(); ++t) {
    if (t < 4)
      for (int i = 0; i < 16; ++i) tok.k[t][i] = -(tok.q[t][i] + tok.q[t][16 + i]);
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    kvtest::check_invariants(cache);
    const auto p = cache.positions(0, 0);
    for (std::int64_t s = std::max(0, t - 10); s <= t; ++s) REQUIRE(std::count(p.begin(), p.end(), s) == 1);
    for (std::int64_t s = 0; s <= std::min(t, 3); ++s) REQUIRE(std::count(p.begin(), p.end(), s) == 1);
  }
  REQUIRE(cache.evictions() == 800u - 20u);
}

TEST_CASE("HashEvict is deterministic for a seed; the seed and the layer pick the projection", "[hash]") {
  CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 16, .budget = 24};
  KVCache<HashEvict> a(cfg, {.seed = 5}), b(cfg, {.seed = 5}), c(cfg, {.seed = 6});
  REQUIRE(a.policy(0).projection().data()[0] != a.policy(1).projection().data()[0]);
  Tokens tok(cfg, 600, 8);
  std::vector<float> oa(64), ob(64), oc(64);
  bool differs = false;
  for (int t = 0; t < tok.size(); ++t)
    for (int l = 0; l < 2; ++l) {
      a.decode(l, tok.q[t], tok.k[t], tok.v[t], oa);
      b.decode(l, tok.q[t], tok.k[t], tok.v[t], ob);
      c.decode(l, tok.q[t], tok.k[t], tok.v[t], oc);
      REQUIRE(oa == ob);
      for (int h = 0; h < 2; ++h) {
        REQUIRE(a.positions(l, h) == b.positions(l, h));
        differs = differs || a.positions(l, h) != c.positions(l, h);
      }
    }
  REQUIRE(differs);  // another seed, another projection, other decisions
}

TEST_CASE("HashEvict with a budget that holds everything equals FullCache", "[hash][full]") {
  const CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 0};
  kvtest::check_equals_full_cache<HashEvict>({}, cfg, 20, 60);
  kvtest::check_equals_full_cache<HashEvict>({.bits = 64, .probe = HashProbe::kKey, .prompt = HashPromptMode::kHash},
                                             cfg, 30, 50);
  kvtest::check_equals_full_cache<HashEvict>({.sinks = 0, .recent = 0}, cfg, 0, 40);
}

TEST_CASE("HashEvict rejects bad parameters with a message", "[hash][errors]") {
  using Catch::Contains;
  const CacheConfig cfg{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 16};
  auto make = [&](HashEvict::Params p, CacheConfig c) { KVCache<HashEvict> cache(c, p); };
  REQUIRE_THROWS_WITH(make({.bits = 0}, cfg), Contains("bits must be in 1..64, got 0"));
  REQUIRE_THROWS_WITH(make({.bits = -3}, cfg), Contains("got -3"));
  REQUIRE_THROWS_WITH(make({.bits = 65}, cfg), Contains("got 65"));
  REQUIRE_THROWS_WITH(make({.sinks = -1}, cfg), Contains("sinks must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(make({.recent = -1}, cfg), Contains("recent must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(make({.sinks = 16, .recent = 0}, cfg), Contains("must be smaller than the budget 16"));
  REQUIRE_THROWS_WITH(make({.sinks = 0, .recent = 16}, cfg), Contains("recent (16)"));
  REQUIRE_THROWS_WITH(make({.sinks = 6, .recent = 10}, cfg), Contains("= 16 must be smaller than the budget 16"));
  REQUIRE_THROWS_WITH(make({.probe = static_cast<HashProbe>(7)}, cfg), Contains("probe must be"));
  REQUIRE_THROWS_WITH(make({.prompt = static_cast<HashPromptMode>(9)}, cfg), Contains("prompt must be"));
  CacheConfig per_head = cfg;
  per_head.head_budgets = {16, 16, 16, 14};  // the defaults need 4 + 10 < budget
  REQUIRE_THROWS_WITH(make({}, per_head), Contains("budget 14 of layer 1 KV head 1"));
  REQUIRE_NOTHROW(make({.sinks = 3}, per_head));
}

// ---- how well the hash predicts the lowest-cosine key --------------------------------------------------

TEST_CASE("HashEvict's query-probe victim approaches the lowest-cosine key as bits grow", "[hash][cosine]") {
  // One head, no protection: before each step, the candidate victims are the held keys (the new token always
  // stays). Count how often the evicted key is the one with the lowest cosine to the query.
  const int d = 64, budget = 32, steps = 2000;
  CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = d, .budget = budget};
  Tokens tok(cfg, budget + steps, 2024);
  std::vector<double> rate, mean_rank;
  for (int bits : {4, 8, 16, 32, 64}) {
    KVCache<HashEvict> cache(cfg, {.bits = bits, .sinks = 0, .recent = 0, .seed = 1});
    std::vector<float> out(d);
    int hits = 0;
    double rank_sum = 0;
    for (int t = 0; t < tok.size(); ++t) {
      const auto before = cache.positions(0, 0);
      std::int64_t lowest = -1;
      double lowest_cos = 2.0;
      std::vector<std::pair<double, std::int64_t>> by_cos;
      for (auto p : before) {
        double dot = 0, nq = 0, nk = 0;
        for (int i = 0; i < d; ++i) {
          dot += double(tok.q[t][i]) * tok.k[p][i];
          nq += double(tok.q[t][i]) * tok.q[t][i];
          nk += double(tok.k[p][i]) * tok.k[p][i];
        }
        const double cs = dot / std::sqrt(nq * nk);
        if (cs < lowest_cos) lowest_cos = cs, lowest = p;
        by_cos.push_back({cs, p});
      }
      std::sort(by_cos.begin(), by_cos.end());
      cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
      if (t < budget) continue;
      const auto after = cache.positions(0, 0);
      std::vector<std::int64_t> gone;
      std::set_difference(before.begin(), before.end(), after.begin(), after.end(), std::back_inserter(gone));
      REQUIRE(gone.size() == 1);
      hits += gone[0] == lowest ? 1 : 0;
      for (std::size_t r = 0; r < by_cos.size(); ++r)
        if (by_cos[r].second == gone[0]) rank_sum += double(r);
    }
    rate.push_back(double(hits) / steps);
    mean_rank.push_back(rank_sum / steps);
    std::printf("[hash_evict] bits %2d: victim == lowest-cosine key in %.1f%% of %d steps (chance %.1f%%); "
                "mean cosine rank of the victim %.2f of 0..%d (chance %.1f)\n",
                bits, 100.0 * rate.back(), steps, 100.0 / budget, mean_rank.back(), budget - 1, (budget - 1) / 2.0);
  }
  const double chance = 1.0 / budget;
  REQUIRE(rate[4] > rate[0]);    // 64 bits beat 4 bits
  REQUIRE(rate[4] > rate[1]);    // and 8 bits
  REQUIRE(rate[4] > 4 * chance);  // and chance by a wide margin
  REQUIRE(rate[0] > chance);      // even 4 bits carry information
  REQUIRE(mean_rank[4] < mean_rank[0]);  // victims rank lower in cosine with more bits
  REQUIRE(mean_rank[0] < (budget - 1) / 2.0);
}

namespace {
struct HashSpec : kvtest::prop::SpecBase<HashEvict> {
  static constexpr const char* kLabel = "HashEvict";
  static Policy::Params params(kvtest::Rng& rng, const CacheConfig&, int min_budget) {
    Policy::Params p;
    p.bits = rng.uniform_int(1, 64);
    p.sinks = rng.uniform_int(0, (min_budget - 1) / 2);
    p.recent = rng.uniform_int(0, min_budget - 1 - p.sinks);
    p.probe = static_cast<HashProbe>(rng.uniform_int(0, 1));
    p.prompt = static_cast<HashPromptMode>(rng.uniform_int(0, 1));
    p.seed = static_cast<std::uint64_t>(rng.uniform_int(0, 1000));
    return p;
  }
  // The `recent` tokens before the new one and the new one itself: positions > newest - (recent + 1).
  static kvtest::prop::Seen must_keep(const Policy::Params& p, int, const kvtest::prop::Seen& seen) {
    return kvtest::prop::protected_positions(seen, p.sinks, p.recent + 1);
  }
};
}  // namespace

TEST_CASE("HashEvict: random prefill/decode/reset sequences agree with the reference model", "[hash][property]") {
  kvtest::prop::require_properties<HashSpec>(1);
}
