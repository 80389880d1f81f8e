// The policy registry, parameters by name, and AnyCache: every registered policy builds by name, its
// parameters round-trip through text, bad settings are refused with a message, and AnyCache computes exactly
// what the typed KVCache computes.
#include <kvtrim/any_cache.hpp>

#include <set>
#include <string>

#include "testing.hpp"

namespace {

kvtrim::CacheConfig small_config() {
  return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 40};
}

kvtrim::PolicyOptions options_for(const kvtrim::CacheConfig& cfg) {
  return {.params = {}, .basis = std::make_shared<const kvtrim::EigenBasis>(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)};
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const kvtrim::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("registry: names are unique and every entry builds by name", "[registry]") {
  const auto names = kvtrim::policy_names();
  REQUIRE(names.size() == kvtrim::kPolicyCount);
  REQUIRE(std::set<std::string_view>(names.begin(), names.end()).size() == names.size());
  const auto cfg = small_config();
  for (std::string_view name : names) {
    auto cache = kvtrim::make_cache(std::string(name), cfg, options_for(cfg));
    REQUIRE(cache->policy_name() == name);
  }
}

TEST_CASE("registry: an unknown policy name lists the registered ones", "[registry]") {
  const std::string msg = error_of([] { kvtrim::make_cache("bogus", small_config()); });
  REQUIRE(msg.find("unknown policy 'bogus'") != std::string::npos);
  for (std::string_view name : kvtrim::policy_names()) REQUIRE(msg.find(std::string(name)) != std::string::npos);
}

TEST_CASE("params: every entry's parameters round-trip through their text form", "[registry][params]") {
  kvtrim::for_each_policy([](const auto& entry) {
    const auto p = entry.params();
    auto q = decltype(p){};
    for (const auto& [k, v] : kvtrim::list_params(p)) kvtrim::set_param(q, k, v);
    INFO(entry.name());
    REQUIRE(kvtrim::describe_params(q) == kvtrim::describe_params(p));
  });
}

TEST_CASE("params: values are parsed, validated and nested keys reach inner policies", "[registry][params]") {
  kvtrim::with_policy("snapkv+h2o", [](const auto& entry) {
    auto p = entry.params();
    kvtrim::set_param(p, "window", "12");
    kvtrim::set_param(p, "pooling", "max");
    kvtrim::set_param(p, "decode.heavy_ratio", "0.25");
    kvtrim::set_param(p, "decode.normalize", "true");
    kvtrim::set_param(p, "decode.group_reduce", "max");
    const std::string set = kvtrim::describe_params(p);
    for (const char* want : {"window=12 ", "pooling=max ", "decode.heavy_ratio=0.25 ", "decode.normalize=true",
                             "decode.group_reduce=max "})
      REQUIRE(set.find(want) != std::string::npos);

    const std::string unknown = error_of([&] { kvtrim::set_param(p, "decode.bogus", "1"); });
    REQUIRE(unknown.find("unknown parameter 'decode.bogus'") != std::string::npos);
    REQUIRE(unknown.find("decode.heavy_ratio") != std::string::npos);  // lists what exists
    REQUIRE(error_of([&] { kvtrim::set_param(p, "window", "abc"); }).find("'abc' is not an integer") !=
            std::string::npos);
    REQUIRE(error_of([&] { kvtrim::set_param(p, "window", "12x"); }).find("is not an integer") != std::string::npos);
    REQUIRE(error_of([&] { kvtrim::set_param(p, "window", "99999999999"); }).find("out of range") !=
            std::string::npos);
    REQUIRE(error_of([&] { kvtrim::set_param(p, "decode.heavy_ratio", "nan"); }).find("not a finite number") !=
            std::string::npos);
    REQUIRE(error_of([&] { kvtrim::set_param(p, "pooling", "median"); }).find("is not one of avg, max") !=
            std::string::npos);
    REQUIRE(error_of([&] { kvtrim::set_param(p, "decode.normalize", "yes"); }).find("not a boolean") !=
            std::string::npos);
    REQUIRE(kvtrim::describe_params(p) == set);  // refused settings leave every value as it was
  });
  kvtrim::with_policy("l2norm", [](const auto& entry) {
    auto p = entry.params();
    kvtrim::set_param(p, "skip_layers", "0,1");
    REQUIRE(kvtrim::describe_params(p).find("skip_layers=0,1") != std::string::npos);
    kvtrim::set_param(p, "skip_layers", "");
    REQUIRE(kvtrim::describe_params(p).find("skip_layers= ") == std::string::npos);
    REQUIRE(kvtrim::describe_params(p).ends_with("skip_layers="));
    REQUIRE(!error_of([&] { kvtrim::set_param(p, "skip_layers", "0,"); }).empty());
  });
  REQUIRE(error_of([] { kvtrim::make_cache("full", small_config(), {.params = {{"sinks", "4"}}}); })
              .find("this policy has no parameters") != std::string::npos);
  // The constructor still validates combinations the text parser cannot see.
  REQUIRE(error_of([] { kvtrim::make_cache("streaming", small_config(), {.params = {{"sinks", "40"}}}); })
              .find("StreamingLLM: sinks (40)") != std::string::npos);
  REQUIRE(error_of([] { kvtrim::make_cache("eigen+full", small_config()); }).find("needs a calibrated basis") !=
          std::string::npos);
}

TEST_CASE("AnyCache computes what the typed KVCache computes, for every registered policy", "[registry]") {
  const auto cfg = small_config();
  const auto opt = options_for(cfg);
  const int steps = 40;
  kvtest::Tokens prompt(cfg, 60, 11), stream(cfg, steps, 12);
  kvtrim::for_each_policy([&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    INFO(entry.name());
    auto any = kvtrim::make_cache(std::string(entry.name()), cfg, opt);
    kvtrim::KVCache<P> typed(cfg, kvtrim::policy_params(entry, opt));
    REQUIRE(any->params() == kvtrim::describe_params(kvtrim::policy_params(entry, opt)));
    const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
    const bool full = kvtrim::never_evicts_in_decode<P>();  // stays within the budget
    const int T = full ? 20 : 60;                             // the others compress a long prompt
    for (int l = 0; l < cfg.n_layers; ++l) {
      const auto Q = kvtest::Tokens::rows(prompt.q, 0, T), K = kvtest::Tokens::rows(prompt.k, 0, T),
                 V = kvtest::Tokens::rows(prompt.v, 0, T);
      std::vector<float> a(T * qw), b(T * qw);
      any->prefill(l, Q, K, V, a);
      typed.prefill(l, Q, K, V, b);
      REQUIRE(a == b);
    }
    for (int t = 0; t < (full ? cfg.budget - T : steps); ++t)
      for (int l = 0; l < cfg.n_layers; ++l) {
        std::vector<float> a(qw), b(qw);
        any->decode(l, stream.q[t], stream.k[t], stream.v[t], a);
        typed.decode(l, stream.q[t], stream.k[t], stream.v[t], b);
        REQUIRE(a == b);
      }
    for (int l = 0; l < cfg.n_layers; ++l)
      for (int h = 0; h < cfg.n_kv_heads; ++h) REQUIRE(any->positions(l, h) == typed.positions(l, h));
    REQUIRE(any->evictions() == typed.evictions());
    REQUIRE(any->merges() == typed.merges());
    REQUIRE(any->bytes_used() == typed.bytes_used());
  });
}

TEST_CASE("registry: settings text splits at commas but keeps a list value's own", "[registry][params]") {
  using Settings = std::vector<std::pair<std::string, std::string>>;
  const auto parse = [](std::string_view t) { return kvtrim::Entry<kvtrim::FullCache>::parse_settings(t); };
  REQUIRE(parse("skip_layers=0,1,sinks=4") == Settings{{"skip_layers", "0,1"}, {"sinks", "4"}});
  REQUIRE(parse("a=1,b=x") == Settings{{"a", "1"}, {"b", "x"}});
  REQUIRE(parse("").empty());
  REQUIRE(error_of([&] { parse("0,1"); }).find("is not of the form key=value") != std::string::npos);
  REQUIRE(error_of([&] { parse("=3"); }).find("is not of the form key=value") != std::string::npos);
}

TEST_CASE("bytes_required is known before allocating, and impossible sizes are refused by name", "[memory]") {
  const auto cfg = small_config();
  const auto opt = options_for(cfg);
  kvtrim::for_each_policy([&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    INFO(entry.name());
    const auto params = kvtrim::policy_params(entry, opt);
    const std::size_t need = kvtrim::KVCache<P>::bytes_required(cfg, params);
    kvtrim::KVCache<P> cache(cfg, params);
    // the slots are most of it; the rest is per-head state and per-thread scratch
    REQUIRE(need >= cache.bytes_reserved());
    REQUIRE(need <= cache.bytes_reserved() * 2 + 64 * 1024);
  });
  // 2^28 tokens x 64 floats x 2, and 2^32 heads: refused at once, naming the size, before any allocation
  const std::string big = error_of([] {
    kvtrim::KVCache<kvtrim::FullCache>({.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 64,
                                        .budget = 1 << 28});
  });
  const std::string many = error_of([] {
    kvtrim::KVCache<kvtrim::FullCache>({.n_layers = 65536, .n_kv_heads = 65536, .n_q_heads = 65536, .head_dim = 8,
                                        .budget = 1});
  });
  for (const std::string& msg : {big, many}) {
    INFO(msg);
    REQUIRE(msg.find(" needs ") != std::string::npos);
    REQUIRE(msg.find("GiB") != std::string::npos);
  }
  REQUIRE(kvtrim::KVCache<kvtrim::FullCache>::bytes_required(
              {.n_layers = 65536, .n_kv_heads = 65536, .n_q_heads = 65536, .head_dim = 8, .budget = 1}) >
          (std::size_t{1} << 40));
}
