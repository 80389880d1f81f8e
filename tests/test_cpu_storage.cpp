// CpuBackend<T>: keys and values stored as kvtrim::half or kvtrim::bfloat16 on the CPU.
//  - rows already representable in T lose nothing when stored, so a T cache and a float cache fed the same values
//    stay identical through prefill, decode, append and verify (kept positions, counters, outputs bit for bit at
//    head_dim 16, where both read the same attention tiles), for every registered policy that does not merge;
//  - on arbitrary fp32 rows, decode outputs equal a double-precision naive attention over the kept tokens' rows
//    rounded to T, and policies whose decisions read no attention (positions, norms and SimHash codes of the fp32
//    inputs, as on the CUDA backend) keep the same positions as the float cache;
//  - the stored rows are the inputs rounded to nearest even, bit for bit (view()), and 16-bit activations are
//    stored as given;
//  - a merging policy's prompt stage runs on the fp32 rows and stores its result rounded (the merging policy's
//    own test has a hand-worked merge in half);
//  - a KVBatch of T caches equals its caches decoded one by one; memory is 2 * sizeof(T) * head_dim per slot.
#include <kvtrim/batch.hpp>

#include "testing.hpp"

namespace {

using kvtest::Tokens;
using kvtrim::bfloat16;
using kvtrim::CacheConfig;
using kvtrim::CpuBackend;
using kvtrim::half;
using kvtrim::KVCache;

CacheConfig shape() { return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 16, .budget = 40}; }

// Every row of the stream rounded to A (as floats): storing these loses nothing.
template <class A>
Tokens rounded_tokens(Tokens tok) {
  for (auto* rows : {&tok.q, &tok.k, &tok.v})
    for (auto& r : *rows) r = kvtest::Rounded<A>(r).f;
  return tok;
}

template <class C16, class C32>
void require_same_state(const C16& a, const C32& b) {
  for (int l = 0; l < a.config().n_layers; ++l)
    for (int h = 0; h < a.config().n_kv_heads; ++h) REQUIRE(a.positions(l, h) == b.positions(l, h));
  REQUIRE(a.evictions() == b.evictions());
  REQUIRE(a.merges() == b.merges());
}

// Prompt of 50 (over the budget), then decode / append 3 / verify 3 and append 1, in turns; `each(a, b)` after
// every call with both caches' outputs.
template <class C16, class C32, class Each>
void run_both(C16& c16, C32& c32, const Tokens& tok, Each each) {
  const CacheConfig& cfg = c32.config();
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  const int prompt = 50, total = tok.size();
  for (int l = 0; l < cfg.n_layers; ++l) {
    const auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
    std::vector<float> a(Q.size()), b(Q.size());
    c16.prefill(l, Q, K, V, a);
    c32.prefill(l, Q, K, V, b);
    each(a, b);
  }
  for (int t = prompt, step = 0; t < total; ++step) {
    const int n = step % 3 == 0 ? 1 : std::min(3, total - t);
    const auto rows = [&](const std::vector<std::vector<float>>& x, int m) { return Tokens::rows(x, t, t + m); };
    for (int l = 0; l < cfg.n_layers; ++l) {
      std::vector<float> a(n * qw), b(n * qw);
      if (step % 3 == 0) {
        c16.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
        c32.decode(l, tok.q[t], tok.k[t], tok.v[t], b);
      } else if (step % 3 == 1) {
        c16.append(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), a);
        c32.append(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), b);
      } else {
        c16.verify(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), a);
        c32.verify(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), b);
        each(a, b);
        a.resize(qw), b.resize(qw);
        c16.append(l, rows(tok.q, 1), rows(tok.k, 1), rows(tok.v, 1), a);
        c32.append(l, rows(tok.q, 1), rows(tok.k, 1), rows(tok.v, 1), b);
      }
      each(a, b);
    }
    require_same_state(c16, c32);
    t += step % 3 == 0 ? 1 : step % 3 == 1 ? n : 1;
  }
}

// A T cache and a float cache of P, fed the same stream through run_both. exact: the rows are representable in A,
// and every output must be equal; otherwise the outputs' NMSE stays within A's rounding (11 / 8 significant bits).
template <class P, class A>
void against_float(bool exact) {
  auto cfg = shape();
  if (kvtrim::never_evicts_in_decode<P>()) cfg.budget = 160;
  const auto params = kvtest::registry_params<P>(cfg);
  KVCache<P, CpuBackend<A>> c16(cfg, params);
  KVCache<P> c32(cfg, params);
  const Tokens tok = exact ? rounded_tokens<A>(Tokens(cfg, 120, 5)) : Tokens(cfg, 120, 6);
  double err = 0, ref = 0;
  run_both(c16, c32, tok, [&](const std::vector<float>& a, const std::vector<float>& b) {
    if (exact) REQUIRE(a == b);
    for (std::size_t i = 0; i < a.size(); ++i) err += double(a[i] - b[i]) * (a[i] - b[i]), ref += double(b[i]) * b[i];
  });
  REQUIRE(err / ref < (std::is_same_v<A, half> ? 1e-5 : 2e-4));
  REQUIRE(c16.bytes_used() < c32.bytes_used());
}

template <class A>
using FullCache16 = KVCache<kvtrim::FullCache, CpuBackend<A>>;

}  // namespace

TEMPLATE_LIST_TEST_CASE("CpuBackend<half>/<bf16> on rows representable in the type equals the float backend",
                        "[storage]", kvtest::ApiPolicies) {
  using P = TestType;
  if constexpr (kvtrim::rules::merges<P>()) {
    SUCCEED("merging policy: its mixed rows are rounded to the storage type (hand case below)");
  } else {
    against_float<P, half>(true);
    against_float<P, bfloat16>(true);
  }
}

TEMPLATE_LIST_TEST_CASE("CpuBackend<half>/<bf16>: a merging policy's prompt stage runs on the fp32 rows, then stores",
                        "[storage]", kvtest::ApiPolicies) {
  using P = TestType;
  if constexpr (!kvtrim::rules::merges<P>()) {
    SUCCEED("not a merging policy");
  } else {
    auto cfg = shape();
    const auto params = kvtest::registry_params<P>(cfg);
    KVCache<P, CpuBackend<half>> c16(cfg, params);
    KVCache<P> c32(cfg, params);
    Tokens similar(cfg, 100, 7);  // keys close to one direction, so that the prompt stage merges
    for (auto& k : similar.k)
      for (std::size_t e = 0; e < k.size(); ++e) k[e] = similar.k[0][e] + 0.1f * k[e];
    const Tokens tok = rounded_tokens<half>(similar);
    const auto Q = Tokens::rows(tok.q, 0, 100), K = Tokens::rows(tok.k, 0, 100), V = Tokens::rows(tok.v, 0, 100);
    std::vector<float> a(Q.size()), b(Q.size());
    for (int l = 0; l < cfg.n_layers; ++l) {
      c16.prefill(l, Q, K, V, a);
      c32.prefill(l, Q, K, V, b);
      REQUIRE(a == b);
    }
    require_same_state(c16, c32);
    REQUIRE(c32.merges() > 0);
    // every kept row is the float cache's row (merged ones included) rounded to half
    for (int l = 0; l < cfg.n_layers; ++l)
      for (int h = 0; h < cfg.n_kv_heads; ++h) {
        const auto& h16 = c16.backend().head(l, h);
        const auto& h32 = c32.backend().head(l, h);
        for (int i = 0; i < h16.size(); ++i) {
          int j = 0;
          while (h32.pos(j) != h16.pos(i)) ++j;
          for (int e = 0; e < cfg.head_dim; ++e) {
            REQUIRE(h16.key_ptr(i)[e] == half(h32.key_ptr(j)[e]));
            REQUIRE(h16.value_ptr(i)[e] == half(h32.value_ptr(j)[e]));
          }
        }
      }
  }
}

TEMPLATE_LIST_TEST_CASE("CpuBackend<half>/<bf16>: policies that read no attention keep the float backend's positions",
                        "[storage]", kvtest::ApiPolicies) {
  using P = TestType;
  if constexpr (kvtrim::has(P::kSignals, kvtrim::Signals::kAttention) || kvtrim::rules::merges<P>()) {
    SUCCEED("decisions read attention computed over rounded rows: covered by the naive-reference case");
  } else {
    against_float<P, half>(false);
    against_float<P, bfloat16>(false);
  }
}

TEMPLATE_TEST_CASE("CpuBackend<T> decode equals naive attention over the kept rows rounded to T", "[storage]", half,
                   bfloat16) {
  using A = TestType;
  auto cfg = shape();
  cfg.budget = 90;
  FullCache16<A> c(cfg);
  const Tokens tok(cfg, 90, 8), stored = rounded_tokens<A>(tok);
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim);
  for (int t = 0; t < tok.size(); ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      c.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      for (int h = 0; h < cfg.n_kv_heads; ++h) {
        Tokens ref = stored;  // the unrounded query: queries are not stored
        ref.q = tok.q;
        kvtest::require_group_attention(ref, t, c.positions(l, h), h, cfg.group_size(), out);
      }
    }
  REQUIRE(c.size(1, 1) == 90);
}

TEMPLATE_TEST_CASE("CpuBackend<T> stores each row rounded to nearest even, and 16-bit activations as given",
                   "[storage]", half, bfloat16) {
  using A = TestType;
  auto cfg = shape();
  cfg.budget = 60;
  const int d = cfg.head_dim;
  FullCache16<A> c(cfg), c16(cfg);
  const Tokens tok(cfg, 60, 9);
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * d);
  std::vector<A> out16(out.size());
  for (int t = 0; t < tok.size(); ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      c.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      using kvtest::narrowed;
      const auto q = narrowed<A>(tok.q[t]), k = narrowed<A>(tok.k[t]), v = narrowed<A>(tok.v[t]);
      c16.decode(l, std::span<const A>(q), std::span<const A>(k), std::span<const A>(v), std::span<A>(out16));
    }
  for (int l = 0; l < cfg.n_layers; ++l)
    for (int h = 0; h < cfg.n_kv_heads; ++h)
      for (const auto* cache : {&c, &c16}) {
        const auto view = cache->view(l, h);
        REQUIRE(view.size == cfg.budget);
        const A* keys = static_cast<const A*>(view.keys);
        const A* values = static_cast<const A*>(view.values);
        for (int i = 0; i < view.size; ++i) {
          const auto p = static_cast<std::size_t>(view.positions[i]);
          for (int e = 0; e < d; ++e) {
            const std::size_t at = static_cast<std::size_t>(i) * d + e, in = static_cast<std::size_t>(h) * d + e;
            REQUIRE(keys[at] == kvtrim::from_float<A>(tok.k[p][in]));
            REQUIRE(values[at] == kvtrim::from_float<A>(tok.v[p][in]));
          }
        }
      }
}

TEMPLATE_LIST_TEST_CASE("CpuBackend<half>: a KVBatch equals its caches decoded one by one", "[storage][batch]",
                        kvtest::ApiPolicies) {
  using P = TestType;
  using A = half;
  const auto cfg = shape();
  if constexpr (kvtrim::never_evicts_in_decode<P>()) return;  // 70 tokens do not fit
  const auto params = kvtest::registry_params<P>(cfg);
  kvtrim::KVBatch<P, CpuBackend<A>> batch(cfg, params, {.threads = 2});
  std::vector<std::unique_ptr<KVCache<P, CpuBackend<A>>>> one;
  std::vector<int> ids;
  for (int b = 0; b < 3; ++b) {
    ids.push_back(batch.add());
    one.push_back(std::make_unique<KVCache<P, CpuBackend<A>>>(cfg, params));
  }
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  std::vector<Tokens> toks;
  for (int b = 0; b < 3; ++b) toks.emplace_back(cfg, 70, 20 + b);
  for (int t = 0; t < 70; ++t)
    for (int l = 0; l < cfg.n_layers; ++l) {
      std::vector<float> Q, K, V, out(3 * qw), want(qw);
      for (int b = 0; b < 3; ++b) {
        Q.insert(Q.end(), toks[b].q[t].begin(), toks[b].q[t].end());
        K.insert(K.end(), toks[b].k[t].begin(), toks[b].k[t].end());
        V.insert(V.end(), toks[b].v[t].begin(), toks[b].v[t].end());
      }
      batch.decode(l, ids, Q, K, V, out);
      for (int b = 0; b < 3; ++b) {
        one[b]->decode(l, toks[b].q[t], toks[b].k[t], toks[b].v[t], want);
        REQUIRE(std::equal(want.begin(), want.end(), out.begin() + static_cast<std::ptrdiff_t>(b * qw)));
      }
    }
  for (int b = 0; b < 3; ++b) require_same_state(batch.sequence(ids[b]), *one[b]);
  REQUIRE(batch.sequence(ids[0]).evictions() + batch.sequence(ids[0]).merges() > 0);
}

TEMPLATE_TEST_CASE("CpuBackend<T> holds 2 * sizeof(T) * head_dim bytes of rows per slot", "[storage][memory]", half,
                   bfloat16) {
  using A = TestType;
  auto cfg = shape();
  cfg.head_budgets = {40, 24, 8, 64};  // layer-major
  const std::size_t slots = (40 + 1) + (24 + 1) + (8 + 1) + (64 + 1);
  const std::size_t saved = slots * 2 * cfg.head_dim * (sizeof(float) - sizeof(A));
  using P = kvtrim::FullCache;
  KVCache<P, CpuBackend<A>> c16(cfg);
  KVCache<P> c32(cfg);
  REQUIRE(c32.bytes_reserved() - c16.bytes_reserved() == saved);
  REQUIRE(KVCache<P>::bytes_required(cfg) - KVCache<P, CpuBackend<A>>::bytes_required(cfg) == saved);
  const auto& h = c16.backend().head(0, 0);
  REQUIRE(h.bytes_per_slot() == 2 * cfg.head_dim * sizeof(A) + sizeof(std::int64_t) + sizeof(P::SlotMeta));
}
