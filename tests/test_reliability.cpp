// API misuse: every public entry point of KVCache (and the policies' parameters) rejects bad input with a
// kvtrim::Error whose message names the argument, the value and what was expected, and a rejected call leaves
// the cache exactly as it was (every slot's position and K/V bytes, the counters, next_position, memory).
// Also: non-finite inputs are rejected by default for every policy, and a type that is not a policy is
// refused at compile time with a readable message (checked by running the compiler on small snippets).
//
// Audit of the public entry points (kv_cache.hpp, config.hpp, policies/) and where each check is tested:
//   KVCache(cfg, params)      CacheConfig fields one by one; StreamingLLM sinks/window   "configuration"
//   prefill(layer, Q,K,V,out) layer range, Q size (empty / not a multiple), K, V, out sizes, layer already
//                             holding tokens, FullCache capacity, NaN/Inf in Q, K, V     "prefill"
//   decode(layer,q,k,v,out,p) layer range, q/k/v/out sizes, position backwards (also < -1), FullCache
//                             capacity, NaN/Inf in q, k, v                               "decode"
//   size/budget/positions     layer and KV head range; next_position, policy: layer range "introspection"
//   reset()                   takes no input; state after reset is covered by test_property
// Two former gaps are guarded below (skipped under sanitizers, where a regression would abort the whole run
// instead of failing one test): decode(position = INT64_MAX) must not overflow next_position, and absurd
// sizes (budget = INT_MAX, 4 TiB heads) must end in kvtrim::Error, not std::bad_alloc / std::length_error.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "testing.hpp"

using Catch::Contains;
using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::KVCache;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

CacheConfig small(int budget = 8) {
  return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = budget};
}

// Everything observable about a cache, bit for bit.
struct Snapshot {
  std::vector<std::int64_t> pos;
  std::vector<float> rows;
  std::vector<std::int64_t> next;
  std::size_t used = 0, reserved = 0;
  std::uint64_t evictions = 0, merges = 0;
  bool operator==(const Snapshot& o) const {
    return pos == o.pos && next == o.next && used == o.used && reserved == o.reserved && evictions == o.evictions &&
           merges == o.merges && rows.size() == o.rows.size() &&
           (rows.empty() || std::memcmp(rows.data(), o.rows.data(), rows.size() * sizeof(float)) == 0);
  }
};

template <class Cache>
Snapshot snapshot(const Cache& c) {
  Snapshot s;
  const auto& cfg = c.config();
  for (int l = 0; l < cfg.n_layers; ++l) {
    s.next.push_back(c.next_position(l));
    for (int h = 0; h < cfg.n_kv_heads; ++h) {
      const auto& head = c.backend().head(l, h);
      s.pos.push_back(-1000 - head.size());  // separator with the size
      for (int i = 0; i < head.size(); ++i) {
        s.pos.push_back(head.pos(i));
        s.rows.insert(s.rows.end(), head.key_ptr(i), head.key_ptr(i) + head.key_dim());
        s.rows.insert(s.rows.end(), head.value_ptr(i), head.value_ptr(i) + head.value_dim());
      }
    }
  }
  s.used = c.bytes_used();
  s.reserved = c.bytes_reserved();
  s.evictions = c.evictions();
  s.merges = c.merges();
  return s;
}

// A cache of policy P with a few tokens in it (prefill on layer 0, decode on layer 1).
template <class P>
KVCache<P> filled(const typename P::Params& params = {}) {
  KVCache<P> cache(small(8), params);
  Tokens tok(cache.config(), 3, 5);
  std::vector<float> out(3 * 32);
  cache.prefill(0, Tokens::rows(tok.q, 0, 3), Tokens::rows(tok.k, 0, 3), Tokens::rows(tok.v, 0, 3), out);
  std::vector<float> o(32);
  for (int t = 0; t < 3; ++t) cache.decode(1, tok.q[t], tok.k[t], tok.v[t], o);
  return cache;
}

// Runs f, which must throw kvtrim::Error whose message contains every part; the cache must not change.
template <class Cache, class F>
void rejects(Cache& cache, F&& f, std::initializer_list<const char*> parts) {
  const Snapshot before = snapshot(cache);
  std::string msg;
  try {
    f();
  } catch (const kvtrim::Error& e) {
    msg = e.what();
  }
  INFO("message: " << msg);
  REQUIRE(!msg.empty());
  REQUIRE(msg.rfind("kvtrim: ", 0) == 0);
  for (const char* p : parts) {
    INFO("expected in the message: " << p);
    CHECK(msg.find(p) != std::string::npos);
  }
  REQUIRE(snapshot(cache) == before);
}

std::string config_error(const CacheConfig& c) {
  try {
    KVCache<kvtrim::FullCache> cache(c);
  } catch (const kvtrim::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("configuration: every CacheConfig field is checked, the message names field, value and expectation",
          "[reliability][configuration]") {
  const CacheConfig ok{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 4};
  REQUIRE(config_error(ok).empty());
  struct Case {
    CacheConfig c;
    std::vector<const char*> parts;
  };
  auto with = [&](auto edit) {
    CacheConfig c = ok;
    edit(c);
    return c;
  };
  const Case cases[] = {
      {with([](CacheConfig& c) { c.n_layers = 0; }), {"n_layers", "> 0", "got 0"}},
      {with([](CacheConfig& c) { c.n_layers = -3; }), {"n_layers", "> 0", "got -3"}},
      {with([](CacheConfig& c) { c.n_kv_heads = 0; }), {"n_kv_heads", "> 0", "got 0"}},
      {with([](CacheConfig& c) { c.n_q_heads = -1; }), {"n_q_heads", "> 0", "got -1"}},
      {with([](CacheConfig& c) { c.n_q_heads = 5; }), {"n_q_heads (5)", "multiple of n_kv_heads (2)"}},
      {with([](CacheConfig& c) { c.head_dim = 0; }), {"head_dim", "> 0", "got 0"}},
      {with([](CacheConfig& c) { c.budget = 0; }), {"budget", "got 0"}},
      {with([](CacheConfig& c) { c.budget = -8; }), {"budget", "got -8"}},
      {with([](CacheConfig& c) { c.head_budgets = {1, 2, 3}; }), {"head_budgets", "= 4 entries", "got 3"}},
      {with([](CacheConfig& c) { c.head_budgets = {1, 2, 0, 3}; }),
       {"head_budgets[2]", "layer 1", "KV head 0", "got 0"}},
  };
  for (const auto& tc : cases) {
    const std::string msg = config_error(tc.c);
    INFO("message: " << msg);
    REQUIRE(!msg.empty());
    for (const char* p : tc.parts) {
      INFO("expected: " << p);
      CHECK(msg.find(p) != std::string::npos);
    }
  }
  // head_budgets set: `budget` is not used, so 0 there is fine.
  REQUIRE(config_error(with([](CacheConfig& c) { c.budget = 0, c.head_budgets = {1, 2, 3, 4}; })).empty());
}

TEST_CASE("configuration: StreamingLLM parameters name the value and the head whose budget they exceed",
          "[reliability][configuration]") {
  auto error = [](CacheConfig c, kvtrim::StreamingLLM::Params p) -> std::string {
    try {
      KVCache<kvtrim::StreamingLLM> cache(c, p);
    } catch (const kvtrim::Error& e) {
      return e.what();
    }
    return "";
  };
  REQUIRE(error(small(8), {.sinks = 7}).empty());
  REQUIRE(error(small(8), {.sinks = 3, .window = 5}).empty());
  CHECK_THAT(error(small(8), {.sinks = -1}), Contains("sinks must be >= 0, got -1"));
  CHECK_THAT(error(small(8), {.sinks = 1, .window = -2}), Contains("window must be >= 0") && Contains("got -2"));
  CHECK_THAT(error(small(8), {.sinks = 8}), Contains("sinks (8)") && Contains("budget 8"));
  CHECK_THAT(error(small(8), {.sinks = 4, .window = 5}), Contains("sinks (4) + window (5) = 9") &&
                                                             Contains("exceeds the budget 8"));
  CacheConfig per_head = small(0);
  per_head.head_budgets = {8, 8, 8, 3};
  CHECK_THAT(error(per_head, {.sinks = 2, .window = 2}),
             Contains("exceeds the budget 3") && Contains("layer 1") && Contains("KV head 1"));
}

TEMPLATE_TEST_CASE("prefill: every bad argument throws with name, value and expectation, cache unchanged",
                   "[reliability][prefill]", kvtrim::FullCache, kvtrim::StreamingLLM) {
  auto cache = filled<TestType>();
  Tokens tok(cache.config(), 4, 6);
  auto Q = Tokens::rows(tok.q, 0, 2), K = Tokens::rows(tok.k, 0, 2), V = Tokens::rows(tok.v, 0, 2);
  std::vector<float> out(2 * 32);
  cache.reset();
  std::vector<float> o1(32), small_out(32);
  cache.decode(1, tok.q[3], tok.k[3], tok.v[3], o1);  // layer 1 holds a token, layer 0 is empty
  rejects(cache, [&] { cache.prefill(-1, Q, K, V, out); }, {"prefill", "layer -1", "out of range 0..1"});
  rejects(cache, [&] { cache.prefill(2, Q, K, V, out); }, {"prefill", "layer 2", "out of range 0..1"});
  rejects(cache, [&] { cache.prefill(0, std::vector<float>{}, K, V, out); },
          {"Q has 0 floats", "positive multiple of n_q_heads*head_dim = 32"});
  rejects(cache, [&] { cache.prefill(0, std::vector<float>(33), K, V, out); },
          {"Q has 33 floats", "positive multiple of n_q_heads*head_dim = 32"});
  rejects(cache, [&] { cache.prefill(0, Q, std::vector<float>(31), V, out); },
          {"K has 31 floats", "T*n_kv_heads*head_dim = 2*16 = 32"});
  rejects(cache, [&] { cache.prefill(0, Q, K, std::vector<float>(48), out); }, {"V has 48 floats", "= 32"});
  rejects(cache, [&] { cache.prefill(0, Q, K, V, small_out); }, {"out has 32 floats", "= 64"});
  rejects(cache, [&] { cache.prefill(1, Q, K, V, out); }, {"layer 1 already holds 1 tokens", "reset()"});
  for (auto* x : {&Q, &K, &V}) {
    const char* name = x == &Q ? "Q[" : x == &K ? "K[" : "V[";
    const float saved = (*x)[17];
    (*x)[17] = std::numeric_limits<float>::quiet_NaN();
    rejects(cache, [&] { cache.prefill(0, Q, K, V, out); }, {"prefill", name, "17] is nan", "must be finite"});
    (*x)[17] = -std::numeric_limits<float>::infinity();
    rejects(cache, [&] { cache.prefill(0, Q, K, V, out); }, {name, "17] is -inf"});
    (*x)[17] = saved;
  }
  if constexpr (std::is_same_v<TestType, kvtrim::FullCache>) {
    Tokens many(cache.config(), 9, 8);
    std::vector<float> big(9 * 32);
    rejects(cache,
            [&] {
              cache.prefill(0, Tokens::rows(many.q, 0, 9), Tokens::rows(many.k, 0, 9), Tokens::rows(many.v, 0, 9),
                            big);
            },
            {"prefill", "never evicts", "holds 0 of its 8 tokens", "9 more do not fit"});
  }
  // After all that, the same call with good arguments works.
  cache.prefill(0, Q, K, V, out);
  REQUIRE(cache.positions(0, 0) == std::vector<std::int64_t>{0, 1});
}

TEMPLATE_TEST_CASE("decode: every bad argument throws with name, value and expectation, cache unchanged",
                   "[reliability][decode]", kvtrim::FullCache, kvtrim::StreamingLLM) {
  auto cache = filled<TestType>();
  Tokens tok(cache.config(), 1, 7);
  auto q = tok.q[0], k = tok.k[0], v = tok.v[0];
  std::vector<float> out(32), short_out(16);
  rejects(cache, [&] { cache.decode(-1, q, k, v, out); }, {"decode", "layer -1", "out of range 0..1"});
  rejects(cache, [&] { cache.decode(7, q, k, v, out); }, {"decode", "layer 7", "out of range 0..1"});
  rejects(cache, [&] { cache.decode(0, std::vector<float>(31), k, v, out); },
          {"q has 31 floats", "expected n_q_heads*head_dim = 32"});
  rejects(cache, [&] { cache.decode(0, q, std::vector<float>(), v, out); },
          {"k has 0 floats", "expected n_kv_heads*head_dim = 16"});
  rejects(cache, [&] { cache.decode(0, q, k, std::vector<float>(32), out); }, {"v has 32 floats", "= 16"});
  rejects(cache, [&] { cache.decode(0, q, k, v, short_out); }, {"out has 16 floats", "= 32"});
  // Layer 0 holds positions 0..2 from the prompt: the next one must be >= 3.
  rejects(cache, [&] { cache.decode(0, q, k, v, out, 2); },
          {"position 2 goes backwards", "layer 0", "expects a position >= 3"});
  rejects(cache, [&] { cache.decode(0, q, k, v, out, -5); }, {"position -5", "expects a position >= 3"});
  for (auto* x : {&q, &k, &v}) {
    const char* name = x == &q ? "q[" : x == &k ? "k[" : "v[";
    const float saved = (*x)[5];
    (*x)[5] = std::numeric_limits<float>::quiet_NaN();
    rejects(cache, [&] { cache.decode(0, q, k, v, out); }, {"decode", name, "5] is nan", "must be finite"});
    (*x)[5] = std::numeric_limits<float>::infinity();
    rejects(cache, [&] { cache.decode(0, q, k, v, out); }, {name, "5] is inf"});
    (*x)[5] = saved;
  }
  if constexpr (std::is_same_v<TestType, kvtrim::FullCache>) {
    std::vector<float> o(32);
    for (int t = 3; t < 8; ++t) cache.decode(0, q, k, v, o);  // fill layer 0 to its budget of 8
    rejects(cache, [&] { cache.decode(0, q, k, v, out); },
            {"decode", "never evicts", "layer 0", "holds 8 of its 8 tokens", "raise the budget"});
  }
  // Good arguments still work after the rejected calls, at the position the cache expects.
  const std::int64_t next = cache.next_position(1);
  cache.decode(1, q, k, v, out);
  REQUIRE(cache.positions(1, 0).back() == next);
}

TEST_CASE("introspection: layer and KV head indices are range-checked", "[reliability][introspection]") {
  auto cache = filled<kvtrim::StreamingLLM>({.sinks = 1});
  auto msg = [](auto f) -> std::string {
    try {
      f();
    } catch (const kvtrim::Error& e) {
      return e.what();
    }
    return "";
  };
  CHECK_THAT(msg([&] { (void)cache.size(2, 0); }), Contains("layer 2 out of range 0..1"));
  CHECK_THAT(msg([&] { (void)cache.size(0, -1); }), Contains("KV head -1 out of range 0..1"));
  CHECK_THAT(msg([&] { (void)cache.budget(0, 2); }), Contains("KV head 2 out of range 0..1"));
  CHECK_THAT(msg([&] { (void)cache.positions(-1, 0); }), Contains("layer -1 out of range"));
  CHECK_THAT(msg([&] { (void)cache.next_position(5); }), Contains("next_position: layer 5 out of range 0..1"));
  CHECK_THAT(msg([&] { (void)cache.policy(2); }), Contains("policy: layer 2 out of range 0..1"));
  REQUIRE(cache.size(1, 1) == 3);
}

TEST_CASE("positions near the int64 limit are refused instead of overflowing", "[reliability][decode]") {
  if (kSanitized) {
    WARN("skipped under sanitizers: the signed overflow it reproduces aborts the run");
    return;
  }
  KVCache<kvtrim::StreamingLLM> cache(small(8), {.sinks = 1});
  Tokens tok(cache.config(), 2, 9);
  std::vector<float> out(32);
  const std::int64_t max = std::numeric_limits<std::int64_t>::max();
  // Either the position is refused, or the following default position is still after it: never wraps.
  bool refused = false;
  try {
    cache.decode(0, tok.q[0], tok.k[0], tok.v[0], out, max);
  } catch (const kvtrim::Error&) {
    refused = true;
  }
  if (!refused) {
    INFO("next_position after a token at INT64_MAX: " << cache.next_position(0));
    CHECK(cache.next_position(0) > 0);
    CHECK_THROWS_AS(cache.decode(0, tok.q[1], tok.k[1], tok.v[1], out), kvtrim::Error);
  }
}

TEST_CASE("absurd cache sizes are refused with kvtrim::Error naming the field", "[reliability][configuration]") {
  if (kSanitized) {
    WARN("skipped under sanitizers: the overflow / huge allocation it reproduces aborts the run");
    return;
  }
  auto kind = [](CacheConfig c) -> std::string {
    try {
      KVCache<kvtrim::StreamingLLM> cache(c, {.sinks = 1});
    } catch (const kvtrim::Error& e) {
      return std::string("kvtrim::Error: ") + e.what();
    } catch (const std::exception& e) {
      return std::string("other exception: ") + e.what();
    }
    return "accepted";
  };
  const std::string a = kind({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4,
                              .budget = std::numeric_limits<int>::max()});
  INFO("budget = INT_MAX: " << a);
  CHECK(a.rfind("kvtrim::Error", 0) == 0);
  const std::string b = kind({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 1 << 20,
                              .budget = 1 << 20});
  INFO("4 TiB per head: " << b);
  CHECK(b.rfind("kvtrim::Error", 0) == 0);
}

TEST_CASE("finite inputs never give non-finite outputs [known limit: fp32 overflow]",
          "[reliability][nonfinite][!mayfail]") {
  // check_finite accepts these (they are finite) but q.k = 4e40 overflows fp32: the scores become Inf and the
  // softmax NaN. Either the cache refuses such inputs or it must still produce finite outputs.
  KVCache<kvtrim::StreamingLLM> cache({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4, .budget = 4},
                                      {.sinks = 1});
  std::vector<float> q(4, 1e20f), k(4, 1e20f), v(4, 1.0f), out(4);
  bool refused = false;
  try {
    cache.decode(0, q, k, v, out);
  } catch (const kvtrim::Error&) {
    refused = true;
  }
  if (!refused)
    for (float x : out) CHECK(std::isfinite(x));
}

#if __has_include("../examples/llama2/tokenizer.hpp")
#include "../examples/llama2/tokenizer.hpp"

// Regression, found by tests/fuzz/fuzz_llama2_loader: a tokenizer whose vocabulary had fewer than 259 entries
// loaded, and encode()'s byte fallback (ids 3..258, llama2.c's <0x00>..<0xFF>) then read past the vocabulary
// (heap overflow under ASan). Loading such a tokenizer must fail instead.
TEST_CASE("llama2 tokenizer: a vocabulary without the 256 byte tokens is refused at load",
          "[reliability][llama2]") {
  const auto file = std::filesystem::temp_directory_path() / ("kvtrim_tok_" + std::to_string(::getpid()) + ".bin");
  {
    std::ofstream f(file, std::ios::binary);
    const std::int32_t max_len = 4;
    f.write(reinterpret_cast<const char*>(&max_len), 4);
    for (int i = 0; i < 5; ++i) {
      const float score = static_cast<float>(i);
      const std::int32_t len = 1;
      const char c = static_cast<char>('a' + i);
      f.write(reinterpret_cast<const char*>(&score), 4);
      f.write(reinterpret_cast<const char*>(&len), 4);
      f.write(&c, 1);
    }
  }
  bool refused = false;
  try {
    (void)llama2::Tokenizer::load(file.string(), 5);
  } catch (const kvtrim::Error& e) {
    refused = true;
    CHECK_THAT(std::string(e.what()), Contains("259") || Contains("byte"));
  }
  std::filesystem::remove(file);
  CHECK(refused);
}
#endif

// ---- compile-time misuse -----------------------------------------------------------------------------------

#if defined(__unix__) && defined(KVTRIM_SOURCE_DIR)
namespace {

struct Compiled {
  int status = -1;
  std::string output;
};

// Starts a syntax-only compile of `source` with the compiler family that built this test; finish() waits for
// it. Several run at once. Not started (nullopt) when the compiler or the Eigen headers are missing.
class Compile {
 public:
  static std::optional<Compile> start(const std::string& name, const std::string& source) {
#if defined(__clang__)
    const std::string cxx = "clang++";
#else
    const std::string cxx = "g++";
#endif
    std::string eigen;
    for (const char* dir : {"/usr/include/eigen3", "/usr/local/include/eigen3"})
      if (std::filesystem::exists(std::filesystem::path(dir) / "Eigen" / "Core")) eigen = dir;
    if (eigen.empty() || std::system(("command -v " + cxx + " >/dev/null 2>&1").c_str()) != 0) return std::nullopt;
    Compile c;
    c.file_ = std::filesystem::temp_directory_path() / ("kvtrim_" + name + "_" + std::to_string(::getpid()) + ".cpp");
    std::ofstream(c.file_) << source;
    const std::string cmd = cxx + " -std=c++20 -fsyntax-only -I" KVTRIM_SOURCE_DIR "/include -I" + eigen + " " +
                            c.file_.string() + " 2>&1";
    c.pipe_ = ::popen(cmd.c_str(), "r");
    return c;
  }
  Compiled finish() {
    Compiled c;
    if (pipe_) {
      char buf[4096];
      std::size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, pipe_)) > 0) c.output.append(buf, n);
      c.status = ::pclose(pipe_);
      pipe_ = nullptr;
    }
    std::filesystem::remove(file_);
    return c;
  }

 private:
  std::filesystem::path file_;
  FILE* pipe_ = nullptr;
};

const char* const kPolicyPrelude = R"(
#include <kvtrim/kvtrim.hpp>
// A minimal valid policy, and variants that each miss one part of the contract.
struct Good {
  struct Params {};
  struct SlotMeta {};
  struct State {};
  static constexpr std::string_view kName = "good";
  static constexpr kvtrim::Signals kSignals = kvtrim::Signals::kNone;
  static constexpr kvtrim::EvictTiming kTiming = kvtrim::EvictTiming::kBeforeAttention;
  Good(const Params&, const kvtrim::LayerContext&) {}
  State initial(int, int) const { return {}; }
  static void on_insert(State&, SlotMeta&, std::int64_t, const kvtrim::TokenInputs&) {}
  static bool protects(const State&, const SlotMeta&, std::int64_t, std::int64_t) { return false; }
  static float score(const State&, const SlotMeta&, std::int64_t pos, std::int64_t) { return float(pos); }
  static float prompt_score(const State&, SlotMeta&, int t, const kvtrim::PromptSums&) { return float(t); }
};
)";

}  // namespace

TEST_CASE("a type that is not a policy is refused at compile time with a readable message", "[reliability][compile]") {
  // Positive control: the same prelude and command compile a valid policy, so a failure below is the check.
  auto good_run = Compile::start("good", std::string(kPolicyPrelude) + R"(
int main() {
  kvtrim::KVCache<Good> cache({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 4, .budget = 2});
  return cache.size(0, 0);
}
)");
  if (!good_run) {
    WARN("no compiler or Eigen headers found at run time; compile-fail check skipped");
    return;
  }
  auto bad_run = Compile::start("bad", std::string(kPolicyPrelude) + R"(
struct NoParams { struct SlotMeta {}; struct State {}; };
struct NoName {
  struct Params {}; struct SlotMeta {}; struct State {};
  static constexpr kvtrim::Signals kSignals = kvtrim::Signals::kNone;
  static constexpr kvtrim::EvictTiming kTiming = kvtrim::EvictTiming::kAfterAttention;
};
struct WrongScore : Good {
  using Good::Good;
  static float score(int) { return 0.0f; }  // hides Good::score: wrong signature
};
struct NotTrivial : Good {
  using Good::Good;
  struct SlotMeta { std::vector<int> v; };
};
static_assert(sizeof(kvtrim::KVCache<NoParams>) > 0);
static_assert(sizeof(kvtrim::KVCache<NoName>) > 0);
static_assert(kvtrim::check_policy<WrongScore>());
static_assert(kvtrim::check_policy<NotTrivial>());
int main() { return 0; }
)");
  REQUIRE(bad_run);
  const Compiled good = good_run->finish(), bad = bad_run->finish();
  {
    INFO("valid policy, compiler output:\n" << good.output);
    REQUIRE(good.status == 0);
  }
  INFO("compiler output:\n" << bad.output.substr(0, 6000));
  REQUIRE(bad.status != 0);
  CHECK_THAT(bad.output, Contains("kvtrim: a Policy needs a nested `Params` struct"));
  CHECK_THAT(bad.output, Contains("kvtrim: a Policy needs `static constexpr std::string_view kName`"));
  CHECK_THAT(bad.output, Contains("kvtrim: this type does not satisfy kvtrim::Policy"));
  CHECK_THAT(bad.output, Contains("SlotMeta and State are trivially copyable"));
  // Each of the four types is named where its check fails.
  for (const char* t : {"NoParams", "NoName", "WrongScore", "NotTrivial"}) {
    INFO("type " << t);
    CHECK_THAT(bad.output, Contains(t));
  }
}
#endif
