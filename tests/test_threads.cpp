// Concurrency: what kvtrim promises about threads (see docs/GUARANTEES.md), checked here and run under
// ThreadSanitizer by `./test.sh --tsan` (CI):
//  - independent KVCache objects used on different threads at the same time (same or different policies,
//    sharing read-only input buffers) behave exactly as when run one after the other: bit-identical outputs,
//    kept positions and counters;
//  - one cache may be read (const introspection: size, positions, bytes, counters) by many threads at once
//    while nobody writes to it;
//  - CacheConfig::threads > 1 (the backend's own worker pool for the KV heads of a call) gives results
//    bit-identical to threads = 1;
//  - a cache may move from one thread to another between calls (ownership handed over through a join).
// Not promised (and so not tested): concurrent calls on the same cache, including decode of different layers.
#include <functional>
#include <thread>

#include "testing.hpp"


using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::KVCache;

namespace {

CacheConfig shape(int threads = 1) {
  CacheConfig c{.n_layers = 2, .n_kv_heads = 4, .n_q_heads = 8, .head_dim = 16, .budget = 12};
  c.threads = threads;
  return c;
}

// Everything a run produces: all outputs, then the kept positions and counters at the end.
struct Trace {
  std::vector<float> out;
  std::vector<std::int64_t> kept;
  std::uint64_t evictions = 0, merges = 0;
  bool operator==(const Trace&) const = default;
};

// A prompt of 20 tokens then `steps` decode steps on every layer, from shared (read-only) token buffers.
template <class Cache>
Trace drive(Cache& cache, const Tokens& tok, int steps) {
  Trace tr;
  const auto& c = cache.config();
  const int prompt = 20;
  const std::size_t qw = static_cast<std::size_t>(c.n_q_heads) * c.head_dim;
  std::vector<float> pout(prompt * qw), out(qw);
  for (int l = 0; l < c.n_layers; ++l) {
    cache.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt),
                  pout);
    tr.out.insert(tr.out.end(), pout.begin(), pout.end());
  }
  for (int t = prompt; t < prompt + steps; ++t)
    for (int l = 0; l < c.n_layers; ++l) {
      cache.decode(l, tok.q[t], tok.k[t], tok.v[t], out);
      tr.out.insert(tr.out.end(), out.begin(), out.end());
    }
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const auto p = cache.positions(l, h);
      tr.kept.insert(tr.kept.end(), p.begin(), p.end());
      tr.kept.push_back(-1);
    }
  tr.evictions = cache.evictions();
  tr.merges = cache.merges();
  return tr;
}

// One job = one policy on one token stream; run() builds its own cache.
struct Job {
  std::function<Trace()> run;
};

// Every registered policy on every stream, with the registry's parameters (one read-only identity basis shared
// by every low-rank cache on every thread); budget 40, or 400 for policies that never evict.
std::vector<Job> jobs(const std::vector<Tokens>& streams, int steps) {
  std::vector<Job> js;
  auto basis = std::make_shared<const kvtrim::EigenBasis>(2, 4, 16);
  for (std::size_t s = 0; s < streams.size(); ++s) {
    const Tokens& tok = streams[s];
    kvtrim::for_each_policy([&](const auto& entry) {
      using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
      auto params = entry.params();
      if constexpr (kvtrim::Entry<P>::kNeedsBasis) params.basis = basis;
      CacheConfig cfg = shape();
      cfg.budget = kvtrim::never_evicts_in_decode<P>() ? 400 : 40;
      js.push_back({[&tok, steps, params, cfg] {
        KVCache<P> c(cfg, params);
        return drive(c, tok, steps);
      }});
    });
  }
  return js;
}

}  // namespace

TEST_CASE("independent caches on different threads give the same results as run one by one", "[threads]") {
  const int steps = 60;
  std::vector<Tokens> streams;
  for (std::uint64_t s = 0; s < 3; ++s) streams.emplace_back(shape(), 20 + steps, 100 + s);
  const auto js = jobs(streams, steps);
  std::vector<Trace> serial;
  for (const auto& j : js) serial.push_back(j.run());
  // Every job at once, twice over (two threads run each job: same policy type, same inputs, separate caches).
  std::vector<Trace> a(js.size()), b(js.size());
  {
    std::vector<std::thread> pool;
    for (std::size_t i = 0; i < js.size(); ++i) {
      pool.emplace_back([&, i] { a[i] = js[i].run(); });
      pool.emplace_back([&, i] { b[i] = js[i].run(); });
    }
    for (auto& t : pool) t.join();
  }
  for (std::size_t i = 0; i < js.size(); ++i) {
    INFO("job " << i);
    REQUIRE(!serial[i].out.empty());
    REQUIRE(a[i] == serial[i]);
    REQUIRE(b[i] == serial[i]);
  }
}

TEST_CASE("many threads may read one cache at once while nobody writes", "[threads]") {
  KVCache<kvtrim::StreamingLLM> cache(shape(), {.sinks = 3});
  Tokens tok(shape(), 60, 5);
  (void)drive(cache, tok, 40);
  const auto& cref = cache;
  std::vector<std::int64_t> want;
  for (int h = 0; h < 4; ++h) {
    const auto p = cref.positions(1, h);
    want.insert(want.end(), p.begin(), p.end());
  }
  std::vector<int> ok(6, 0);
  std::vector<std::thread> readers;
  for (int r = 0; r < 6; ++r)
    readers.emplace_back([&, r] {
      bool same = true;
      for (int it = 0; it < 200; ++it) {
        std::vector<std::int64_t> got;
        for (int h = 0; h < 4; ++h) {
          const auto p = cref.positions(1, h);
          got.insert(got.end(), p.begin(), p.end());
          same = same && cref.size(1, h) == 12 && cref.budget(1, h) == 12;
        }
        same = same && got == want && cref.bytes_used() <= cref.bytes_reserved() && cref.next_position(0) == 60;
        same = same && cref.evictions() == 8u * (60 - 12);
      }
      ok[r] = same;
    });
  for (auto& t : readers) t.join();
  for (int r = 0; r < 6; ++r) REQUIRE(ok[r] == 1);
}

TEST_CASE("a cache handed from one thread to another keeps working", "[threads]") {
  Tokens tok(shape(), 80, 9);
  KVCache<kvtrim::StreamingLLM> moved(shape(), {.sinks = 2}), ref(shape(), {.sinks = 2});
  const Trace want = drive(ref, tok, 30);
  Trace got;
  std::thread([&] { got = drive(moved, tok, 30); }).join();
  REQUIRE(got == want);
  // Continue on yet another thread; compare with the reference continuing here.
  std::vector<float> o1(128), o2(128);
  std::thread([&] {
    for (int t = 50; t < 80; ++t) moved.decode(0, tok.q[t], tok.k[t], tok.v[t], o1);
  }).join();
  for (int t = 50; t < 80; ++t) ref.decode(0, tok.q[t], tok.k[t], tok.v[t], o2);
  REQUIRE(o1 == o2);
  REQUIRE(moved.positions(0, 3) == ref.positions(0, 3));
}

TEST_CASE("CacheConfig::threads > 1 gives bit-identical results to one thread", "[threads][pool]") {
  {
    Tokens tok(shape(), 80, 21);
    auto compare = [&](auto make) {
      auto one = make(1);
      auto many = make(3);
      REQUIRE(drive(many, tok, 60) == drive(one, tok, 60));
    };
    compare([](int th) { return KVCache<kvtrim::StreamingLLM>(shape(th), {.sinks = 2}); });
    auto basis = std::make_shared<const kvtrim::EigenBasis>(2, 4, 16);
    kvtrim::for_each_policy([&](const auto& entry) {  // every registered policy's pool, under TSan too
      using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
      auto params = entry.params();
      if constexpr (kvtrim::Entry<P>::kNeedsBasis) params.basis = basis;
      compare([&](int th) {
        CacheConfig cfg = shape(th);
        cfg.budget = kvtrim::never_evicts_in_decode<P>() ? 400 : 40;
        return KVCache<P>(cfg, params);
      });
    });
    // Several caches with their own pools, used from several threads at once.
    std::vector<Trace> got(3);
    std::vector<std::thread> ts;
    for (int i = 0; i < 3; ++i)
      ts.emplace_back([&, i] {
        KVCache<kvtrim::StreamingLLM> c(shape(2), {.sinks = 2});
        got[i] = drive(c, tok, 40);
      });
    for (auto& t : ts) t.join();
    KVCache<kvtrim::StreamingLLM> solo(shape(1), {.sinks = 2});
    const Trace want = drive(solo, tok, 40);
    for (const auto& g : got) REQUIRE(g == want);
  }
}
