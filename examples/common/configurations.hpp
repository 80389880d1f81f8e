// The configurations the examples run: a display name, a registry policy name (kvtrim/registry.hpp) and
// parameter settings, plus how the budget is shared. Everything about a policy comes from the registry
// through kvtrim::with_policy / kvtrim::make_cache; no policy type is named here.
//
// Settings are "key=value" items separated by commas, applied over the registry entry's defaults (the keys
// are the policy's Params fields, params.hpp). An item without '=' continues the previous value, so list
// values read naturally: "sinks=4,skip_layers=0,1". A value in braces is an integer expression of `budget`
// (the configuration's nominal tokens per head): integers, budget, + - * / (integer division), min(a,b),
// max(a,b) and parentheses, e.g. "window={min(32,max(1,budget/4))}".
#pragma once

#include <kvtrim/any_cache.hpp>
#include <kvtrim/budget_plan.hpp>

#include <algorithm>
#include <cctype>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cli.hpp"

namespace examples {

// How a configuration's budget is shared between (layer, KV head)s.
enum class PlanKind {
  kUniform,   // every head the same budget
  kGlobal,    // a calibrated plan: one total over all layers and heads
  kPerLayer,  // a calibrated plan: each layer the same total, moved between its heads
  kOracle,    // a plan calibrated on the evaluated window itself (hindsight: an analysis, not a policy)
};

inline std::string_view plan_name(PlanKind k) {
  switch (k) {
    case PlanKind::kUniform: return "uniform";
    case PlanKind::kGlobal: return "global";
    case PlanKind::kPerLayer: return "per-layer";
    case PlanKind::kOracle: return "oracle";
  }
  return "?";
}

struct Configuration {
  std::string name;      // display name, unique
  std::string policy;    // registry name
  std::string settings;  // over the registry defaults (see the header comment)
  PlanKind plan = PlanKind::kUniform;
  bool fixed = false;  // never evicts: runs once with a budget that holds the whole window
};

using Settings = std::vector<std::pair<std::string, std::string>>;

// ---- settings text ---------------------------------------------------------------------------------------

// "a=1,b=2,3" -> {{"a","1"},{"b","2,3"}}; what = where the text came from (for messages).
inline Settings parse_settings(std::string_view text, std::string_view what) {
  Settings out;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    const std::size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      if (out.empty() || item.empty())
        throw cli::UsageError(std::string(what) + ": setting '" + std::string(item) + "' is not of the form key=value");
      out.back().second += "," + std::string(item);  // a list value continues
    } else {
      if (eq == 0) throw cli::UsageError(std::string(what) + ": setting '" + std::string(item) + "' has no key");
      out.emplace_back(std::string(item.substr(0, eq)), std::string(item.substr(eq + 1)));
    }
    start = comma + 1;
  }
  return out;
}

// Integer expression of `budget` (grammar in the header comment).
class BudgetExpr {
 public:
  static long long eval(std::string_view text, long long budget) {
    BudgetExpr e(text, budget);
    const long long v = e.sum();
    e.skip();
    if (e.at_ != text.size()) e.fail("unexpected '" + std::string(text.substr(e.at_)) + "'");
    return v;
  }

 private:
  BudgetExpr(std::string_view s, long long budget) : s_(s), budget_(budget) {}

  std::string_view s_;
  std::size_t at_ = 0;
  long long budget_;

  [[noreturn]] void fail(const std::string& why) const {
    throw cli::UsageError("budget expression {" + std::string(s_) + "}: " + why +
                          " (integers, budget, + - * /, min(a,b), max(a,b), parentheses)");
  }
  void skip() {
    while (at_ < s_.size() && s_[at_] == ' ') ++at_;
  }
  bool eat(char c) {
    skip();
    if (at_ < s_.size() && s_[at_] == c) return ++at_, true;
    return false;
  }
  static long long checked(long long v) {
    if (v > (1LL << 40) || v < -(1LL << 40)) throw cli::UsageError("budget expression: value out of range");
    return v;
  }
  long long sum() {
    long long v = product();
    for (;;) {
      if (eat('+')) v = checked(v + product());
      else if (eat('-')) v = checked(v - product());
      else return v;
    }
  }
  long long product() {
    long long v = factor();
    for (;;) {
      if (eat('*')) {
        v = checked(v * factor());
      } else if (eat('/')) {
        const long long d = factor();
        if (d == 0) fail("division by zero");
        v /= d;
      } else {
        return v;
      }
    }
  }
  long long factor() {
    skip();
    if (eat('(')) {
      const long long v = sum();
      if (!eat(')')) fail("missing ')'");
      return v;
    }
    if (at_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_]))) {
      long long v = 0;
      while (at_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[at_]))) v = checked(v * 10 + (s_[at_++] - '0'));
      return v;
    }
    std::string word;
    while (at_ < s_.size() && std::isalpha(static_cast<unsigned char>(s_[at_]))) word += s_[at_++];
    if (word == "budget") return budget_;
    if (word == "min" || word == "max") {
      if (!eat('(')) fail("expected '(' after " + word);
      const long long a = sum();
      if (!eat(',')) fail("expected ',' in " + word + "(a,b)");
      const long long b = sum();
      if (!eat(')')) fail("missing ')' after " + word + "(a,b)");
      return word == "min" ? std::min(a, b) : std::max(a, b);
    }
    fail(word.empty() ? "expected a number, budget, min or max" : "unknown name '" + word + "'");
  }
};

// The configuration's settings for a nominal budget, braces evaluated.
inline Settings resolve(const Configuration& c, long long budget) {
  Settings s = parse_settings(c.settings, "configuration " + c.name);
  for (auto& [key, value] : s)
    if (value.size() >= 2 && value.front() == '{' && value.back() == '}')
      value = std::to_string(BudgetExpr::eval(std::string_view(value).substr(1, value.size() - 2), budget));
  return s;
}

// ---- what the registry says about a policy ----------------------------------------------------------------

inline bool known_policy(std::string_view policy) {
  for (std::string_view n : kvtrim::policy_names())
    if (n == policy) return true;
  return false;
}

inline std::string policy_list() {
  std::string s;
  for (std::string_view n : kvtrim::policy_names()) s += (s.empty() ? "" : ", ") + std::string(n);
  return s;
}

// Whether the policy evicts before attention (the step attends to the budget) or after (budget + 1).
inline bool evicts_before_attention(std::string_view policy) {
  bool before = false;
  kvtrim::with_policy(policy, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    before = P::kTiming == kvtrim::EvictTiming::kBeforeAttention;
  });
  return before;
}

// Whether the policy needs a calibrated Eigen Attention basis.
inline bool needs_basis(std::string_view policy) {
  bool needs = false;
  kvtrim::with_policy(policy, [&](const auto& entry) { needs = std::remove_cvref_t<decltype(entry)>::kNeedsBasis; });
  return needs;
}

// The cache of configuration `c`, its settings resolved for `nominal_budget`, on shape `cfg` (which carries
// the real per-head budgets).
inline std::unique_ptr<kvtrim::AnyCache> build_cache(const Configuration& c, long long nominal_budget,
                                                     const kvtrim::CacheConfig& cfg,
                                                     std::shared_ptr<const kvtrim::EigenBasis> basis = nullptr) {
  return kvtrim::make_cache(c.policy, cfg, {.params = resolve(c, nominal_budget), .basis = std::move(basis)});
}

// Checks that the settings name real parameters with valid values, and that the policy accepts them (built
// once on a generic shape with a large budget, so only checks that depend on the budget are left for later).
inline void check_settings(const Configuration& c, long long nominal_budget) {
  if (!known_policy(c.policy))
    throw cli::UsageError("configuration " + c.name + ": unknown policy '" + c.policy + "'; the registered policies are " +
                          policy_list());
  const Settings s = resolve(c, nominal_budget);
  try {
    const kvtrim::CacheConfig generic{.n_layers = 8, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 4096};
    kvtrim::make_cache(c.policy, generic,
                       {.params = s, .basis = std::make_shared<const kvtrim::EigenBasis>(8, 2, 8)});
  } catch (const kvtrim::Error& e) {
    throw cli::UsageError("configuration " + c.name + ": " + std::string(e.what()).substr(8));
  }
}

// The smallest uniform budget the configuration's policy accepts on this shape (its protected tokens + what
// it needs to decide), found by trying; plans never go below it.
inline int min_budget(const Configuration& c, long long nominal_budget, kvtrim::CacheConfig cfg,
                      std::shared_ptr<const kvtrim::EigenBasis> basis = nullptr) {
  cfg.head_budgets.clear();
  for (int b = 1; b <= 1 << 16; ++b) {
    cfg.budget = b;
    try {
      build_cache(c, nominal_budget, cfg, basis);
      return b;
    } catch (const kvtrim::Error&) {
    }
  }
  throw cli::UsageError("configuration " + c.name + ": no budget up to 65536 satisfies the policy");
}

// ---- the default list -----------------------------------------------------------------------------------

// FullCache is not listed: every example runs it as the reference.
inline std::vector<Configuration> default_configurations() {
  using P = PlanKind;
  return {
      {"StreamingLLM", "streaming", "sinks=4"},
      {"H2O", "h2o", ""},
      {"TOVA", "tova", ""},
      {"L2", "l2norm", "skip_layers=0,1"},  // the paper's layer skipping (see docs/RESULTS.md)
      {"L2+sinks4+recent10", "l2norm", "sinks=4,recent=10"},  // Cold-Compress's protection, no skipping
      {"HashEvict-q", "hashevict", "probe=query"},
      {"HashEvict-k", "hashevict", "probe=key"},
      // Observation window of at most a quarter of the budget, 32 at most (the official default).
      {"SnapKV+H2O", "snapkv+h2o", "window={min(32,max(1,budget/4))}"},
      {"BUZZ", "buzz", ""},
      {"BUZZ-hash", "buzz-hash", ""},
      {"EMS", "ems", ""},
      {"Eigen", "eigen+full", "", P::kUniform, true},
      {"Eigen+H2O", "eigen+h2o", ""},
      // One memory budget shared by all heads and layers (budget_plan.hpp), calibrated on separate text.
      {"StreamingLLM+global", "streaming", "sinks=4", P::kGlobal},
      {"H2O+global", "h2o", "", P::kGlobal},
      {"TOVA+global", "tova", "", P::kGlobal},
      {"HashEvict-q+global", "hashevict", "probe=query", P::kGlobal},
      {"SnapKV+H2O+global", "snapkv+h2o", "window={min(32,max(1,budget/4))}", P::kGlobal},
      {"EMS+global", "ems", "", P::kGlobal},
      {"StreamingLLM+layer", "streaming", "sinks=4", P::kPerLayer},
      {"StreamingLLM+oracle", "streaming", "sinks=4", P::kOracle},
  };
}

// Lower-case copy (configuration names match case-insensitively on the command line).
inline std::string lower(std::string_view s) {
  std::string o(s);
  for (char& ch : o) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return o;
}

inline const Configuration* find_configuration(const std::vector<Configuration>& list, std::string_view name) {
  for (const Configuration& c : list)
    if (lower(c.name) == lower(name)) return &c;
  return nullptr;
}

inline std::string configuration_list(const std::vector<Configuration>& list) {
  std::string s;
  for (const Configuration& c : list) s += (s.empty() ? "" : ", ") + c.name;
  return s;
}

// --param NAME.key=value: NAME is a registry policy name (every configuration of that policy, e.g. h2o) or
// else a configuration's name in any case (that one, e.g. H2O+global). Appends the setting; the value may
// contain commas.
inline void apply_param(std::vector<Configuration>& list, std::string_view text) {
  const std::size_t eq = text.find('=');
  const std::size_t dot = text.substr(0, eq).find('.');
  if (eq == std::string_view::npos || dot == std::string_view::npos || dot == 0 || dot + 1 == eq)
    throw cli::UsageError("--param '" + std::string(text) + "': expected NAME.key=value (NAME: a configuration or policy)");
  const std::string name(text.substr(0, dot)), key(text.substr(dot + 1, eq - dot - 1)), value(text.substr(eq + 1));
  std::vector<Configuration*> targets;
  for (Configuration& c : list)
    if (c.policy == name) targets.push_back(&c);
  if (targets.empty())
    for (Configuration& c : list)
      if (lower(c.name) == lower(name)) targets = {&c};
  if (targets.empty())
    throw cli::UsageError("--param '" + std::string(text) + "': no configuration or policy named '" + name +
                          "'; configurations: " + configuration_list(list) + "; policies: " + policy_list());
  for (Configuration* c : targets) {  // checked on a copy, so a refused setting leaves the list unchanged
    Configuration changed = *c;
    changed.settings += (changed.settings.empty() ? "" : ",") + key + "=" + value;
    check_settings(changed, 64);  // names and values now; budget expressions once the budgets are known
  }
  for (Configuration* c : targets) c->settings += (c->settings.empty() ? "" : ",") + key + "=" + value;
}

// --add NAME=POLICY[:settings] (a uniform budget) or NAME=POLICY@global|per-layer[:settings].
inline Configuration parse_added(std::string_view text) {
  const std::size_t eq = text.find('=');
  if (eq == std::string_view::npos || eq == 0)
    throw cli::UsageError("--add '" + std::string(text) + "': expected NAME=POLICY[@global|@per-layer][:key=value,...]");
  Configuration c;
  c.name = std::string(text.substr(0, eq));
  std::string_view rest = text.substr(eq + 1);
  const std::size_t colon = rest.find(':');
  if (colon != std::string_view::npos) c.settings = std::string(rest.substr(colon + 1));
  rest = rest.substr(0, colon);
  const std::size_t at = rest.find('@');
  if (at != std::string_view::npos) {
    const std::string_view plan = rest.substr(at + 1);
    if (plan == "global") c.plan = PlanKind::kGlobal;
    else if (plan == "per-layer") c.plan = PlanKind::kPerLayer;
    else throw cli::UsageError("--add '" + std::string(text) + "': plan '" + std::string(plan) + "' is not global or per-layer");
    rest = rest.substr(0, at);
  }
  c.policy = std::string(rest);
  if (c.policy == "full") throw cli::UsageError("--add: the full cache always runs as the reference");
  check_settings(c, 64);
  return c;
}

}  // namespace examples
