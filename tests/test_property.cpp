// Every registered policy through the property harness (property.hpp) with the parameters the registry gives
// it: outputs equal naive attention over what the policy attends to, budgets hold, kept positions are unique and
// hold their own K/V rows (unless the policy merges), evictions + merges + kept = tokens sent, refused calls change
// nothing. Each policy's own test file runs the harness again with random parameters and the policy's promises
// (kept sets, protected tokens); this file makes sure no registered policy escapes the common invariants.
#include "property.hpp"

namespace {

// Budgets of 36..48 tokens so that every registry default fits (a 32-token prompt window, for instance).
template <class P>
struct RegistrySpec : kvtest::prop::SpecBase<P> {
  static constexpr const char* kLabel = P::kName.data();
  static constexpr int kMinBudget = 36;
  static constexpr int kMaxBudget = 48;
  static typename P::Params params(kvtest::Rng&, const kvtrim::CacheConfig& c, int) {
    return kvtest::registry_params<P>(c);  // identity bases for low-rank storage
  }
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr long kRegistrySteps = 4000;
#else
constexpr long kRegistrySteps = 20000;
#endif

}  // namespace

TEMPLATE_LIST_TEST_CASE("every registered policy keeps the common invariants against the reference model",
                        "[property][registry]", kvtrim::RegisteredPolicies) {
  using Spec = RegistrySpec<TestType>;
  REQUIRE(kvtest::prop::run_many<Spec>(7, kRegistrySteps, false) >= kRegistrySteps);
  REQUIRE(kvtest::prop::run_many<Spec>(8, kRegistrySteps / 5, true) >= kRegistrySteps / 5);
}
