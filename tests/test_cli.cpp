// The example programs' command-line helpers (examples/common/cli.hpp, configurations.hpp): numbers parsed
// whole and range-checked, options and lists validated, configuration settings with list values and budget
// expressions, --param and --add resolved against the registry. (The programs themselves are run with bad
// arguments by the examples.cli.* tests.)
#include <string>
#include <vector>

#include "../examples/common/cli.hpp"
#include "../examples/common/configurations.hpp"
#include "testing.hpp"

namespace {

template <class F>
std::string usage_error(F&& f) {
  try {
    f();
  } catch (const cli::UsageError& e) {
    return e.what();
  }
  return "";
}

struct Argv {
  std::vector<std::string> s;
  std::vector<char*> p;
  explicit Argv(std::vector<std::string> args) : s(std::move(args)) {
    s.insert(s.begin(), "prog");
    for (auto& x : s) p.push_back(x.data());
  }
  int argc() { return static_cast<int>(p.size()); }
  char** argv() { return p.data(); }
};

}  // namespace

TEST_CASE("cli: integers are parsed whole and range-checked", "[cli]") {
  REQUIRE(cli::Parser::parse_integer("--steps", "200", 1, 512) == 200);
  REQUIRE(cli::Parser::parse_integer("--n", "-3", -5, 5) == -3);
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "abc", 1, 512); }) ==
          "--steps: 'abc' is not an integer (expected 1..512)");
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "12abc", 1, 512); }).find("not an integer") !=
          std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "", 1, 512); }).find("not an integer") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", " 5", 1, 512); }).find("not an integer") !=
          std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "99999999999", 1, 512); }) ==
          "--steps: 99999999999 is out of range 1..512");
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "99999999999999999999999", 1, 512); })
              .find("out of range") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_integer("--steps", "0", 1, 512); }).find("out of range") != std::string::npos);
}

TEST_CASE("cli: numbers and lists", "[cli]") {
  REQUIRE(cli::Parser::parse_number("--e", "0.9", 0, 1) == 0.9);
  REQUIRE(usage_error([] { cli::Parser::parse_number("--e", "nan", 0, 1); }).find("not a number") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_number("--e", "0.9x", 0, 1); }).find("not a number") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_number("--e", "1.5", 0, 1); }) == "--e: 1.5 is out of range [0, 1]");
  REQUIRE(cli::Parser::parse_list("--b", "a,b,c") == std::vector<std::string>{"a", "b", "c"});
  REQUIRE(usage_error([] { cli::Parser::parse_list("--b", "a,,c"); }).find("empty item") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_list("--b", ""); }).find("empty item") != std::string::npos);
  REQUIRE(usage_error([] { cli::Parser::parse_list("--b", "a,"); }).find("empty item") != std::string::npos);
}

TEST_CASE("cli: options, values, flags and positionals", "[cli]") {
  cli::Parser p("prog", {{"--steps", "N", "steps"}, {"--quick", "", "fast"}}, /*positional=*/true);
  Argv a({"--steps=12", "--quick", "hello", "--steps", "7"});
  p.start(a.argc(), a.argv());
  std::vector<std::string> seen;
  while (p.next()) {
    if (p.is("--steps")) seen.push_back("steps " + std::to_string(p.integer(1, 100)));
    else if (p.is("--quick")) seen.push_back("quick");
    else if (p.positional()) seen.push_back("text " + p.current());
  }
  REQUIRE(seen == std::vector<std::string>{"steps 12", "quick", "text hello", "steps 7"});
  for (const char* help : {"--help", "-h"}) {
    Argv h({"--quick", help});
    p.start(h.argc(), h.argv());
    REQUIRE(p.next());
    REQUIRE(p.next());
    REQUIRE(p.is("--help"));
    REQUIRE_FALSE(p.next());
  }

  auto parse_all = [&](std::vector<std::string> args, bool positional) {
    cli::Parser q("prog", {{"--steps", "N", "steps"}, {"--quick", "", "fast"}}, positional);
    Argv v(std::move(args));
    q.start(v.argc(), v.argv());
    while (q.next())
      if (q.is("--steps")) q.integer(1, 100);
  };
  REQUIRE(usage_error([&] { parse_all({"--stpes", "3"}, false); }) ==
          "unknown option '--stpes'; the options are --steps, --quick, --help");
  REQUIRE(usage_error([&] { parse_all({"--steps"}, false); }) == "option --steps needs a value");
  REQUIRE(usage_error([&] { parse_all({"--quick=1"}, false); }) == "option --quick takes no value, got '1'");
  REQUIRE(usage_error([&] { parse_all({"word"}, false); }).find("unexpected argument 'word'") != std::string::npos);
  REQUIRE(usage_error([&] { parse_all({"-x"}, true); }).find("unexpected argument '-x'") != std::string::npos);
  REQUIRE(usage_error([&] { parse_all({"--steps", "200"}, false); }) == "--steps: 200 is out of range 1..100");
}

TEST_CASE("cli: run() maps failures to exit codes", "[cli]") {
  REQUIRE(cli::run("t", [] { return 0; }) == 0);
  REQUIRE(cli::run("t", []() -> int { throw cli::UsageError("bad"); }) == cli::kUsageExit);
  REQUIRE(cli::run("t", []() -> int { throw cli::MissingInput("gone"); }) == cli::kMissingInputExit);
  REQUIRE(cli::run("t", []() -> int { throw kvtrim::Error("broken"); }) == 1);
  REQUIRE(cli::one_line("a\nb\nc") == "a; b; c");
}

TEST_CASE("configurations: settings with list values and budget expressions", "[cli][configurations]") {
  using examples::Settings;
  REQUIRE(examples::parse_settings("sinks=4,skip_layers=0,1,recent=2", "t") ==
          Settings{{"sinks", "4"}, {"skip_layers", "0,1"}, {"recent", "2"}});
  REQUIRE(examples::parse_settings("", "t").empty());
  REQUIRE(usage_error([] { examples::parse_settings("4,sinks=1", "t"); }).find("not of the form key=value") !=
          std::string::npos);
  REQUIRE(usage_error([] { examples::parse_settings("=4", "t"); }).find("has no key") != std::string::npos);
  using E = examples::BudgetExpr;
  REQUIRE(E::eval("min(32,max(1,budget/4))", 64) == 16);
  REQUIRE(E::eval("min(32,max(1,budget/4))", 256) == 32);
  REQUIRE(E::eval("min(32,max(1,budget/4))", 2) == 1);
  REQUIRE(E::eval("(budget + 2) * 3 - 1", 4) == 17);
  REQUIRE(usage_error([] { E::eval("budget/0", 4); }).find("division by zero") != std::string::npos);
  REQUIRE(usage_error([] { E::eval("bugdet", 4); }).find("unknown name 'bugdet'") != std::string::npos);
  REQUIRE(usage_error([] { E::eval("min(1,2", 4); }).find("missing ')'") != std::string::npos);
  REQUIRE(usage_error([] { E::eval("1 2", 4); }).find("unexpected '2'") != std::string::npos);
  const examples::Configuration snap{"S", "snapkv+h2o", "window={min(32,max(1,budget/4))},decode.sinks=1"};
  REQUIRE(examples::resolve(snap, 64) == Settings{{"window", "16"}, {"decode.sinks", "1"}});
}

TEST_CASE("configurations: the defaults build, and the registry decides timing and calibration", "[cli][configurations]") {
  const auto list = examples::default_configurations();
  for (const auto& c : list) {
    INFO(c.name);
    REQUIRE(examples::known_policy(c.policy));
    for (int b : {16, 32, 64, 256}) REQUIRE_NOTHROW(examples::check_settings(c, b));
    REQUIRE(examples::find_configuration(list, examples::lower(c.name)) != nullptr);
  }
  REQUIRE(examples::evicts_before_attention("streaming"));
  REQUIRE(examples::evicts_before_attention("hashevict"));
  REQUIRE_FALSE(examples::evicts_before_attention("h2o"));
  REQUIRE_FALSE(examples::evicts_before_attention("tova"));
  REQUIRE(examples::needs_basis("eigen+h2o"));
  REQUIRE_FALSE(examples::needs_basis("h2o"));
  // The smallest budget StreamingLLM with 4 sinks accepts is 5 (4 sinks + a window of 1).
  const kvtrim::CacheConfig shape{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 1};
  REQUIRE(examples::min_budget(*examples::find_configuration(list, "StreamingLLM"), 32, shape) == 5);
  REQUIRE(examples::min_budget(*examples::find_configuration(list, "HashEvict-q"), 32, shape) == 15);
}

TEST_CASE("configurations: --param and --add", "[cli][configurations]") {
  auto list = examples::default_configurations();
  examples::apply_param(list, "hashevict-Q.recent=3");  // one configuration, by name (any case)
  REQUIRE(examples::find_configuration(list, "hashevict-q")->settings == "probe=query,recent=3");
  REQUIRE(examples::find_configuration(list, "HashEvict-k")->settings == "probe=key");
  examples::apply_param(list, "h2o.heavy_ratio=0.25");  // every configuration of policy h2o
  REQUIRE(examples::find_configuration(list, "H2O")->settings == "heavy_ratio=0.25");
  REQUIRE(examples::find_configuration(list, "H2O+global")->settings == "heavy_ratio=0.25");
  examples::apply_param(list, "L2.skip_layers=1,2");  // a list value keeps its commas
  REQUIRE(examples::resolve(*examples::find_configuration(list, "L2"), 32).back() ==
          std::pair<std::string, std::string>{"skip_layers", "1,2"});
  REQUIRE(usage_error([&] { examples::apply_param(list, "h2o.recent=24"); })
              .find("unknown parameter 'recent'; this policy has the parameters heavy_ratio") != std::string::npos);
  REQUIRE(usage_error([&] { examples::apply_param(list, "bogus.x=1"); }).find("configurations: StreamingLLM, H2O") !=
          std::string::npos);
  REQUIRE(usage_error([&] { examples::apply_param(list, "h2o.heavy_ratio=2"); }).find("heavy_ratio must be in [0, 1]") !=
          std::string::npos);
  const auto added = examples::parse_added("Mine=tova@global:sinks=4,recent=1");
  REQUIRE(added.policy == "tova");
  REQUIRE(added.plan == examples::PlanKind::kGlobal);
  REQUIRE(added.settings == "sinks=4,recent=1");
  REQUIRE(usage_error([] { examples::parse_added("Mine=tova:nope=1"); }).find("unknown parameter 'nope'") !=
          std::string::npos);
  REQUIRE(usage_error([] { examples::parse_added("Mine=bogus"); }).find("unknown policy 'bogus'") != std::string::npos);
  REQUIRE(usage_error([] { examples::parse_added("=tova"); }).find("expected NAME=POLICY") != std::string::npos);
}
