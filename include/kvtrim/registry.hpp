// kvtrim: the one list of policies.
//
// Every policy kvtrim ships is one line below. Tests, fuzzers, benchmarks, the CPU-vs-GPU checks, the
// examples' command lines and the Python module all take their policy list from here, so a new policy is its
// header, its test file and one line in kPolicies.
//
// A line is `Entry<Policy>{defaults}`: `defaults` are "key=value" settings applied over Params{} where the
// policy's own defaults suit only large budgets (BUZZ's official 160 + 400 split needs 564 tokens per head);
// tools start from them, and users override any field by name (params.hpp). The entry's name is the
// policy's kName.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "error.hpp"
#include "params.hpp"
#include "policies/buzz.hpp"
#include "policies/eigen_attention.hpp"
#include "policies/ems.hpp"
#include "policies/full_cache.hpp"
#include "policies/h2o.hpp"
#include "policies/hash_evict.hpp"
#include "policies/l2_norm.hpp"
#include "policies/snapkv.hpp"
#include "policies/streaming_llm.hpp"
#include "policies/tova.hpp"

namespace kvtrim {

template <class P>
struct Entry {
  using Policy = P;
  std::string_view defaults = {};  // "key=value,key=value" over Params{}

  static constexpr std::string_view name() { return P::kName; }
  // Params{} with this entry's defaults applied.
  typename P::Params params() const {
    typename P::Params p{};
    set_params(p, parse_settings(defaults));
    return p;
  }
  // Whether the policy needs a calibrated basis (Params::basis) before it can be built.
  static constexpr bool kNeedsBasis = requires(typename P::Params p) { p.basis; };

  // "a=1,b=x" -> {{"a","1"},{"b","x"}}. A piece without '=' continues the previous value, so list values keep
  // their commas ("skip_layers=0,1,sinks=4"); a first piece without '=' is an error.
  static std::vector<std::pair<std::string, std::string>> parse_settings(std::string_view text) {
    std::vector<std::pair<std::string, std::string>> out;
    while (!text.empty()) {
      const std::size_t comma = std::min(text.find(','), text.size());
      const std::string_view item = text.substr(0, comma);
      const std::size_t eq = item.find('=');
      if (eq == std::string_view::npos && !out.empty()) {
        out.back().second.push_back(',');
        out.back().second.append(item);
      } else {
        KVTRIM_CHECK(eq != std::string_view::npos && eq > 0, "parameter setting '", item,
                     "' is not of the form key=value");
        out.emplace_back(std::string(item.substr(0, eq)), std::string(item.substr(eq + 1)));
      }
      text.remove_prefix(std::min(comma + 1, text.size()));
    }
    return out;
  }
};

// clang-format off
inline constexpr auto kPolicies = std::tuple{
    Entry<FullCache>{},
    Entry<StreamingLLM>{},
    Entry<H2O>{},
    Entry<TOVA>{},
    Entry<L2Norm>{},
    Entry<HashEvict>{},
    Entry<SnapKV<FullCache>>{},
    Entry<SnapKV<H2O>>{},
    Entry<SnapKV<TOVA>>{},
    Entry<Buzz<AccumulatedAttention>>{"window=0,threshold=0"},
    Entry<Buzz<HashScorer>>{"window=0,threshold=0"},
    Entry<Ems>{},
    Entry<EigenAttention<FullCache>>{},
    Entry<EigenAttention<H2O>>{},
};
// clang-format on

inline constexpr std::size_t kPolicyCount = std::tuple_size_v<std::remove_cvref_t<decltype(kPolicies)>>;

// f(entry) for every registered policy, in registry order.
template <class F>
constexpr void for_each_policy(F&& f) {
  std::apply([&](const auto&... e) { (f(e), ...); }, kPolicies);
}

// The registered names, in order.
inline std::vector<std::string_view> policy_names() {
  std::vector<std::string_view> names;
  for_each_policy([&](const auto& e) { names.push_back(e.name()); });
  return names;
}

// Calls f(entry) for the policy registered under `name`; kvtrim::Error listing the valid names otherwise.
template <class F>
void with_policy(std::string_view name, F&& f) {
  bool found = false;
  for_each_policy([&](const auto& e) {
    if (!found && e.name() == name) {
      found = true;
      f(e);
    }
  });
  if (found) return;
  std::string valid;
  for (std::string_view n : policy_names()) valid += (valid.empty() ? "" : ", ") + std::string(n);
  detail::throw_error("unknown policy '", name, "'; the registered policies are ", valid);
}

// The registry entry of policy P (a compile-time error when P is not registered).
template <class P>
constexpr Entry<P> entry_of() {
  Entry<P> out{};
  bool found = false;
  std::apply(
      [&](const auto&... e) {
        (
            [&] {
              if constexpr (std::is_same_v<typename std::remove_cvref_t<decltype(e)>::Policy, P>) {
                out = e;
                found = true;
              }
            }(),
            ...);
      },
      kPolicies);
  if (!found) throw Error("entry_of: the policy is not registered");  // at compile time: not a constant expression
  return out;
}

// The index of the policy registered as `name` (a compile-time error when there is none).
consteval std::size_t policy_index(std::string_view name) {
  std::size_t index = 0, found = kPolicyCount;
  for_each_policy([&](const auto& e) {
    if (e.name() == name) found = index;
    ++index;
  });
  if (found == kPolicyCount) throw Error("policy_index: no registered policy has this name");
  return found;
}
// The registered policy with index I, e.g. RegisteredPolicy<policy_index("snapkv+h2o")>: for code that must not
// spell a policy's type (tests of compositions, benchmarks).
template <std::size_t I>
using RegisteredPolicy = typename std::tuple_element_t<I, std::remove_cvref_t<decltype(kPolicies)>>::Policy;

// The same by name in host code: PolicyNamed<"snapkv+h2o"> (nvcc's kernel stubs cannot spell this alias's
// string argument; .cu files use RegisteredPolicy<policy_index(...)>).
template <std::size_t N>
struct PolicyName {
  char chars[N]{};
  constexpr PolicyName(const char (&s)[N]) {
    for (std::size_t i = 0; i < N; ++i) chars[i] = s[i];
  }
  constexpr std::string_view view() const { return {chars, N - 1}; }
};
template <PolicyName Name>
using PolicyNamed = RegisteredPolicy<policy_index(Name.view())>;

// A type list of the registered policies (for Catch2's TEMPLATE_LIST_TEST_CASE and similar).
template <class... P>
struct PolicyList {};
namespace detail {
template <class... E>
auto policy_list_of(const std::tuple<E...>&) -> PolicyList<typename E::Policy...>;
}  // namespace detail
using RegisteredPolicies = decltype(detail::policy_list_of(kPolicies));

}  // namespace kvtrim
