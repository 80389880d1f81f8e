// Shared test utilities: seeded random data, an independent double-precision attention reference written
// with plain loops, and checks every policy's tests can call.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <tuple>
#include <vector>

namespace kvtest {

// The registry's parameters for P on a cache shape; a low-rank policy gets the identity basis (storage exact).
template <class P>
typename P::Params registry_params(const kvtrim::CacheConfig& cfg) {
  auto p = kvtrim::entry_of<P>().params();
  if constexpr (kvtrim::Entry<P>::kNeedsBasis)
    p.basis = std::make_shared<const kvtrim::EigenBasis>(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim);
  return p;
}

// The policies the registry-wide API tests (append, verify, batches, decide-only) run. Every registered one in
// the Release build; under the sanitizers, where such a file takes ~8 minutes to compile per 14 policies, one
// policy of each kind of rule: none, position-only, attention scores, SimHash, structured, merging, low-rank.
#ifdef KVTRIM_SANITIZED_BUILD
using ApiPolicies = std::tuple<kvtrim::PolicyNamed<"full">, kvtrim::PolicyNamed<"streaming">, kvtrim::PolicyNamed<"h2o">,
                               kvtrim::PolicyNamed<"hashevict">, kvtrim::PolicyNamed<"buzz">, kvtrim::PolicyNamed<"ems">,
                               kvtrim::PolicyNamed<"eigen+h2o">>;
#else
using ApiPolicies = kvtrim::RegisteredPolicies;
#endif

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(std::uint64_t seed) : gen(seed) {}
  std::vector<float> normal(std::size_t n, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> x(n);
    for (auto& e : x) e = dist(gen);
    return x;
  }
  int uniform_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
};

// softmax(q·k_j / sqrt(d)) weighted sum of v_j, in double, over the given key/value rows.
inline std::vector<double> naive_attention(const float* q, const std::vector<const float*>& keys,
                                           const std::vector<const float*>& values, int d) {
  std::vector<double> s(keys.size());
  double m = -INFINITY;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    double dot = 0;
    for (int i = 0; i < d; ++i) dot += double(q[i]) * double(keys[j][i]);
    s[j] = dot / std::sqrt(double(d));
    m = std::max(m, s[j]);
  }
  double z = 0;
  for (auto& e : s) z += (e = std::exp(e - m));
  std::vector<double> out(static_cast<std::size_t>(d), 0.0);
  for (std::size_t j = 0; j < keys.size(); ++j)
    for (int i = 0; i < d; ++i) out[i] += s[j] / z * double(values[j][i]);
  return out;
}

// Rows stored as 16-bit values: x rounded to A (to nearest even), and those values back as floats (exact).
template <class A>
struct Rounded {
  std::vector<A> a;
  std::vector<float> f;
  explicit Rounded(const std::vector<float>& x) : a(x.size()), f(x.size()) {
    kvtrim::from_float(x.data(), a.data(), x.size());
    kvtrim::to_float(a.data(), f.data(), x.size());
  }
  std::span<const A> rows() const { return a; }
};
template <class A>
std::vector<A> narrowed(const std::vector<float>& x) {
  return Rounded<A>(x).a;
}

// A stream of random tokens for a cache shape: q [n_q*d], k and v [n_kv*d] per token.
struct Tokens {
  int n_q, n_kv, d;
  std::vector<std::vector<float>> q, k, v;
  Tokens(const kvtrim::CacheConfig& c, int T, std::uint64_t seed, float scale = 1.0f)
      : n_q(c.n_q_heads), n_kv(c.n_kv_heads), d(c.head_dim) {
    Rng rng(seed);
    for (int t = 0; t < T; ++t) {
      q.push_back(rng.normal(static_cast<std::size_t>(n_q) * d, scale));
      k.push_back(rng.normal(static_cast<std::size_t>(n_kv) * d, scale));
      v.push_back(rng.normal(static_cast<std::size_t>(n_kv) * d));
    }
  }
  int size() const { return static_cast<int>(q.size()); }
  // Rows [t0, t1) flattened for prefill.
  static std::vector<float> rows(const std::vector<std::vector<float>>& x, int t0, int t1) {
    std::vector<float> out;
    for (int t = t0; t < t1; ++t) out.insert(out.end(), x[t].begin(), x[t].end());
    return out;
  }
};

// Decode output of token t for the query group of KV head h equals naive attention over exactly the tokens
// at `positions` (original K/V rows from `tok`).
inline void require_group_attention(const Tokens& tok, int t, const std::vector<std::int64_t>& positions, int h,
                                    int group, const std::vector<float>& out, double tol = 2e-5) {
  const int d = tok.d;
  std::vector<const float*> keys, values;
  for (auto p : positions) {
    keys.push_back(tok.k[p].data() + h * d);
    values.push_back(tok.v[p].data() + h * d);
  }
  for (int gi = 0; gi < group; ++gi) {
    const int qh = h * group + gi;
    const auto want = naive_attention(tok.q[t].data() + qh * d, keys, values, d);
    for (int i = 0; i < d; ++i) REQUIRE(std::abs(out[qh * d + i] - want[i]) < tol);
  }
}

// Invariants that hold for every policy after every call: budgets respected, positions unique, within the
// tokens seen, and memory in use bounded by the budgets.
template <class Cache>
void check_invariants(const Cache& cache) {
  const auto& c = cache.config();
  std::size_t max_bytes = 0;
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const auto& head = cache.backend().head(l, h);
      REQUIRE(head.size() <= c.budget_of(l, h));
      const auto pos = cache.positions(l, h);
      REQUIRE(std::set<std::int64_t>(pos.begin(), pos.end()).size() == pos.size());
      if (!pos.empty()) {
        REQUIRE(pos.front() >= 0);
        REQUIRE(pos.back() < cache.next_position(l));
      }
      max_bytes += static_cast<std::size_t>(c.budget_of(l, h)) * head.bytes_per_slot();
    }
  REQUIRE(cache.bytes_used() <= max_bytes);
}

// With a budget that holds the whole sequence, a policy must behave exactly like FullCache: same
// outputs bit for bit, same kept positions. Prefill `prompt` tokens, then decode the rest.
template <class P>
void check_equals_full_cache(const typename P::Params& params, kvtrim::CacheConfig cfg, int prompt, int total,
                             std::uint64_t seed = 7) {
  cfg.budget = total;
  cfg.head_budgets.clear();
  kvtrim::KVCache<kvtrim::FullCache> full(cfg);
  kvtrim::KVCache<P> pol(cfg, params);
  Tokens tok(cfg, total, seed);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  for (int l = 0; l < cfg.n_layers; ++l) {
    if (prompt > 0) {
      auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
      std::vector<float> a(Q.size()), b(Q.size());
      full.prefill(l, Q, K, V, a);
      pol.prefill(l, Q, K, V, b);
      REQUIRE(a == b);
    }
  }
  std::vector<float> a(qw), b(qw);
  for (int t = prompt; t < total; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      full.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
      pol.decode(l, tok.q[t], tok.k[t], tok.v[t], b);
      REQUIRE(a == b);
    }
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int h = 0; h < cfg.n_kv_heads; ++h) REQUIRE(pol.positions(l, h) == full.positions(l, h));
  REQUIRE(pol.evictions() == 0);
}

// Two caches from `make` fed the same prompt (the first `prompt` tokens, every layer) and decode stream must
// keep the same positions and produce the same outputs, bit for bit, after every call: a policy's decisions
// depend on its inputs only.
template <class Make>
void require_deterministic(Make make, int prompt, int total, std::uint64_t seed) {
  auto run = [&] {
    auto cache = make();
    const kvtrim::CacheConfig& cfg = cache.config();
    Tokens tok(cfg, total, seed);
    const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
    std::vector<std::vector<std::int64_t>> trace;
    std::vector<float> outs, out(qw);
    for (int l = 0; l < cfg.n_layers && prompt > 0; ++l) {
      std::vector<float> pout(static_cast<std::size_t>(prompt) * qw);
      cache.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt),
                    pout);
      trace.push_back(cache.positions(l, l % cfg.n_kv_heads));
      outs.insert(outs.end(), pout.begin(), pout.end());
    }
    for (int t = prompt; t < total; ++t)
      for (int l = 0; l < cfg.n_layers; ++l) {
        cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
        trace.push_back(cache.positions(l, t % cfg.n_kv_heads));
        outs.insert(outs.end(), out.begin(), out.end());
      }
    return std::make_pair(trace, outs);
  };
  const auto a = run(), b = run();
  REQUIRE(a.first == b.first);
  REQUIRE(a.second == b.second);
}

}  // namespace kvtest
