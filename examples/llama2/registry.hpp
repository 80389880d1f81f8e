// The policies the examples run (compare_policies, visualize_kept). Adding a policy is one line in
// for_each_policy(): its type, a display name, its parameters for a given budget, and two flags.
#pragma once

#include <kvtrim/kvtrim.hpp>
#include <kvtrim/policies/buzz.hpp>
#include <kvtrim/policies/eigen_attention.hpp>
#include <kvtrim/policies/ems.hpp>
#include <kvtrim/policies/h2o.hpp>
#include <kvtrim/policies/hash_evict.hpp>
#include <kvtrim/policies/l2_norm.hpp>
#include <kvtrim/policies/snapkv.hpp>
#include <kvtrim/policies/tova.hpp>

#include <algorithm>
#include <memory>
#include <type_traits>

namespace llama2 {

// What some policies need from outside: Eigen Attention's basis, calibrated on model activations.
struct RegistryInputs {
  std::shared_ptr<const kvtrim::EigenBasis> eigen;
};

struct EntryFlags {
  bool fixed_budget = false;  // never evicts: runs once with a budget that holds the whole window
  bool calibrated = false;    // needs RegistryInputs::eigen
};

template <class P>
inline constexpr std::type_identity<P> policy{};

// Parameters that do not depend on the budget.
template <class P>
auto same(typename P::Params params) {
  return [params](int) { return params; };
}

// Calls visit(policy<P>, name, make_params(budget) -> P::Params, EntryFlags) once per registered policy.
// FullCache is not listed: it is the reference every example runs anyway.
template <class Visit>
void for_each_policy(const RegistryInputs& in, Visit&& visit) {
  using namespace kvtrim;
  const EntryFlags budgeted{}, calibrated{.calibrated = true}, calibrated_fixed{true, true};
  visit(policy<StreamingLLM>, "StreamingLLM", same<StreamingLLM>({.sinks = 4}), budgeted);
  visit(policy<H2O>, "H2O", same<H2O>({}), budgeted);
  visit(policy<TOVA>, "TOVA", same<TOVA>({}), budgeted);
  visit(policy<L2Norm>, "L2", same<L2Norm>({}), budgeted);
  visit(policy<L2Norm>, "L2+sinks4+recent10", same<L2Norm>({.sinks = 4, .recent = 10}), budgeted);
  visit(policy<HashEvict>, "HashEvict-q", same<HashEvict>({.probe = HashProbe::kQuery}), budgeted);
  visit(policy<HashEvict>, "HashEvict-k", same<HashEvict>({.probe = HashProbe::kKey}), budgeted);
  visit(policy<SnapKV<H2O>>, "SnapKV+H2O",  // observation window 32, at most a quarter of the budget
        [](int b) { return SnapKV<H2O>::Params{.window = std::min(32, std::max(1, b / 4))}; }, budgeted);
  visit(policy<Buzz<>>, "BUZZ", same<Buzz<>>({.window = 0, .threshold = 0}), budgeted);
  visit(policy<Buzz<HashScorer>>, "BUZZ-hash", same<Buzz<HashScorer>>({.window = 0, .threshold = 0}), budgeted);
  visit(policy<Ems>, "EMS", same<Ems>({}), budgeted);
  visit(policy<EigenAttention<>>, "Eigen", same<EigenAttention<>>({.basis = in.eigen}), calibrated_fixed);
  visit(policy<EigenAttention<H2O>>, "Eigen+H2O", same<EigenAttention<H2O>>({.basis = in.eigen}), calibrated);
}

}  // namespace llama2
