// KVBatch: many sequences decoded together. For every registered policy, a batch whose sequences join and leave
// between steps gives, with 1 and 3 threads, bit for bit what a standalone KVCache per sequence gives (outputs,
// kept positions, counters), and FullCache's batched outputs equal a naive double-precision attention over each
// sequence's own tokens. Refused calls change no sequence. make_batch (any_batch.hpp, a policy chosen by name)
// equals the typed batch.
#include <kvtrim/any_batch.hpp>
#include <kvtrim/batch.hpp>

#include "testing.hpp"

namespace {

using kvtest::Tokens;

kvtrim::CacheConfig shape() { return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 40}; }


}  // namespace

TEMPLATE_LIST_TEST_CASE("KVBatch equals one KVCache per sequence, sequences joining and leaving", "[batch]",
                        kvtest::ApiPolicies) {
  using P = TestType;
  auto cfg = shape();
  if constexpr (kvtrim::never_evicts_in_decode<P>()) cfg.budget = 300;
  auto own = cfg;  // one sequence with budgets of its own
  own.head_budgets = {cfg.budget, cfg.budget - 3, cfg.budget - 6, cfg.budget};  // above SnapKV's window of 32
  const auto params = kvtest::registry_params<P>(cfg);
  for (int threads : {1, 3}) {
    kvtrim::KVBatch<P> batch(cfg, params, {.threads = threads});
    std::vector<std::unique_ptr<kvtrim::KVCache<P>>> solo(4);
    std::vector<Tokens> tok;
    for (int s = 0; s < 4; ++s) tok.emplace_back(cfg, 260, 100 + static_cast<std::uint64_t>(s));
    std::vector<int> step(4, 0);  // next token of each stream
    auto join = [&](int s, const kvtrim::CacheConfig& c) {
      const int id = batch.add(c);
      REQUIRE(id == s);
      solo[static_cast<std::size_t>(s)] = std::make_unique<kvtrim::KVCache<P>>(c, params);
      const int T = 20 + 5 * s;  // a prompt each
      std::vector<float> a(static_cast<std::size_t>(T) * 32), b(a.size());
      for (int l = 0; l < cfg.n_layers; ++l) {
        const auto Q = Tokens::rows(tok[s].q, 0, T), K = Tokens::rows(tok[s].k, 0, T), V = Tokens::rows(tok[s].v, 0, T);
        batch.sequence(id).prefill(l, Q, K, V, a);
        solo[static_cast<std::size_t>(s)]->prefill(l, Q, K, V, b);
        REQUIRE(a == b);
      }
      step[static_cast<std::size_t>(s)] = T;
    };
    join(0, cfg);
    join(1, own);
    join(2, cfg);
    for (int round = 0; round < 200; ++round) {
      if (round == 60) batch.remove(1), solo[1].reset();  // leaves; its id is reused below
      if (round == 90) join(1, cfg);
      if (round == 120) join(3, cfg);
      std::vector<int> ids = batch.ids();
      std::reverse(ids.begin(), ids.end());  // rows in any order
      std::vector<float> Q, K, V;
      for (int id : ids) {
        const int t = step[static_cast<std::size_t>(id)];
        Q.insert(Q.end(), tok[id].q[t].begin(), tok[id].q[t].end());
        K.insert(K.end(), tok[id].k[t].begin(), tok[id].k[t].end());
        V.insert(V.end(), tok[id].v[t].begin(), tok[id].v[t].end());
      }
      if constexpr (kvtrim::never_evicts_in_decode<P>())
        if (round >= 150) break;  // stay within the budget
      for (int l = 0; l < cfg.n_layers; ++l) {
        std::vector<float> out(Q.size()), want(32);
        batch.decode(l, ids, Q, K, V, out);
        for (std::size_t r = 0; r < ids.size(); ++r) {
          const int id = ids[r], t = step[static_cast<std::size_t>(id)];
          solo[static_cast<std::size_t>(id)]->decode(l, tok[id].q[t], tok[id].k[t], tok[id].v[t], want);
          REQUIRE(std::equal(want.begin(), want.end(), out.begin() + static_cast<std::ptrdiff_t>(r * 32)));
        }
      }
      for (int id : ids) ++step[static_cast<std::size_t>(id)];
    }
    for (int id : batch.ids())
      for (int l = 0; l < cfg.n_layers; ++l)
        for (int h = 0; h < cfg.n_kv_heads; ++h)
          REQUIRE(batch.sequence(id).positions(l, h) == solo[static_cast<std::size_t>(id)]->positions(l, h));
  }
}

TEST_CASE("KVBatch with FullCache: each row is naive attention over its own sequence", "[batch]") {
  auto cfg = shape();
  cfg.budget = 100;
  kvtrim::KVBatch<kvtrim::FullCache> batch(cfg, {}, {.threads = 2});
  const int a = batch.add(), b = batch.add();
  Tokens ta(cfg, 50, 1), tb(cfg, 50, 2);
  const int d = cfg.head_dim, g = cfg.group_size();
  for (int t = 0; t < 50; ++t) {
    std::vector<float> Q = tb.q[t], K = tb.k[t], V = tb.v[t], out(64);
    Q.insert(Q.end(), ta.q[t].begin(), ta.q[t].end());
    K.insert(K.end(), ta.k[t].begin(), ta.k[t].end());
    V.insert(V.end(), ta.v[t].begin(), ta.v[t].end());
    const std::vector<int> ids{b, a};
    batch.decode(0, ids, Q, K, V, out);
    for (int r = 0; r < 2; ++r) {
      const Tokens& tk = r == 0 ? tb : ta;
      for (int h = 0; h < cfg.n_kv_heads; ++h) {
        std::vector<const float*> keys, values;
        for (int j = 0; j <= t; ++j) keys.push_back(tk.k[j].data() + h * d), values.push_back(tk.v[j].data() + h * d);
        for (int gi = 0; gi < g; ++gi) {
          const int qh = h * g + gi;
          const auto want = kvtest::naive_attention(tk.q[t].data() + qh * d, keys, values, d);
          for (int e = 0; e < d; ++e)
            REQUIRE(std::abs(out[static_cast<std::size_t>(r * 32 + qh * d + e)] - want[e]) < 2e-5);
        }
      }
    }
  }
}

TEST_CASE("KVBatch refuses bad calls without changing any sequence", "[batch][errors]") {
  const auto cfg = shape();
  kvtrim::KVBatch<kvtrim::StreamingLLM> batch(cfg, {.sinks = 2});
  const int a = batch.add(), b = batch.add();
  Tokens tok(cfg, 3, 7);
  std::vector<float> Q = tok.q[0], K = tok.k[0], V = tok.v[0], out(64);
  Q.insert(Q.end(), tok.q[1].begin(), tok.q[1].end());
  K.insert(K.end(), tok.k[1].begin(), tok.k[1].end());
  V.insert(V.end(), tok.v[1].begin(), tok.v[1].end());
  const std::vector<int> twice{a, a}, unknown{a, 7}, fine{a, b};
  REQUIRE_THROWS_WITH(batch.decode(0, twice, Q, K, V, out), Catch::Contains("appears twice"));
  REQUIRE_THROWS_WITH(batch.decode(0, unknown, Q, K, V, out), Catch::Contains("no sequence with id 7"));
  REQUIRE_THROWS_WITH(batch.decode(0, fine, Q, std::span<const float>(K).first(16), V, out),
                      Catch::Contains("expected 2 rows"));
  Q[40] = std::numeric_limits<float>::quiet_NaN();  // row 1
  REQUIRE_THROWS_WITH(batch.decode(0, fine, Q, K, V, out), Catch::Contains("decode: q[8] is nan"));
  REQUIRE(batch.sequence(a).next_position(0) == 0);  // row 0 was fine but nothing ran
  REQUIRE(batch.sequence(b).size(0, 0) == 0);
  auto other = cfg;
  other.head_dim = 16;
  REQUIRE_THROWS_WITH(batch.add(other), Catch::Contains("must have the batch's shape"));
  batch.remove(a);
  REQUIRE_THROWS_WITH(batch.sequence(a), Catch::Contains("no sequence with id 0"));
  REQUIRE(batch.ids() == std::vector<int>{b});
}

TEST_CASE("make_batch: a batch chosen by registry name equals the typed KVBatch, and views its sequences", "[batch]") {
  const auto cfg = shape();
  auto any = kvtrim::make_batch("streaming", cfg, {.params = {{"sinks", "3"}}}, {.threads = 2});
  kvtrim::KVBatch<kvtrim::StreamingLLM> typed(cfg, {.sinks = 3});
  REQUIRE(any->policy_name() == kvtrim::StreamingLLM::kName);
  const int a = any->add(), b = any->add();
  REQUIRE(typed.add() == a);
  REQUIRE(typed.add() == b);
  Tokens ta(cfg, 80, 3), tb(cfg, 80, 4);
  const std::size_t qw = 32;
  for (int l = 0; l < cfg.n_layers; ++l) {  // a prompt for sequence a through its view
    const auto Q = Tokens::rows(ta.q, 0, 20), K = Tokens::rows(ta.k, 0, 20), V = Tokens::rows(ta.v, 0, 20);
    std::vector<float> x(Q.size()), y(Q.size());
    any->sequence(a).prefill(l, Q, K, V, x);
    typed.sequence(a).prefill(l, Q, K, V, y);
    REQUIRE(x == y);
  }
  for (int t = 20; t < 80; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      std::vector<float> Q = ta.q[t], K = ta.k[t], V = ta.v[t], x(2 * qw), y(2 * qw);
      Q.insert(Q.end(), tb.q[t].begin(), tb.q[t].end());
      K.insert(K.end(), tb.k[t].begin(), tb.k[t].end());
      V.insert(V.end(), tb.v[t].begin(), tb.v[t].end());
      const std::vector<int> ids{a, b};
      any->decode(l, ids, Q, K, V, x);
      typed.decode(l, ids, Q, K, V, y);
      REQUIRE(x == y);
    }
  for (int id : {a, b})
    for (int h = 0; h < cfg.n_kv_heads; ++h) REQUIRE(any->sequence(id).positions(1, h) == typed.sequence(id).positions(1, h));
  REQUIRE(any->sequence(a).evictions() > 0);
  any->remove(a);
  REQUIRE(any->ids() == std::vector<int>{b});
  REQUIRE_THROWS_WITH(any->sequence(a), Catch::Contains("no sequence with id 0"));
  REQUIRE(any->add() == a);  // the id is reused, with a fresh cache behind its view
  REQUIRE(any->sequence(a).next_position(0) == 0);
  REQUIRE_THROWS_WITH(kvtrim::make_batch("nope", cfg), Catch::Contains("unknown policy 'nope'"));
}
