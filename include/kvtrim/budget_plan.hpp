// kvtrim: one memory budget shared by every (layer, KV head) — per-head budgets under one total.
//
// Heads differ: some attend to the last few tokens, some far back. A BudgetPlan gives each (layer, KV head)
// its own budget; CacheConfig::head_budgets carries it into any KVCache (every policy), and each head then
// reserves only its own budget + 1 slots, so the memory bound is the plan's total, not a mask over a
// uniform cache.
//
//   BudgetCurves curves = calibrator.curves();                      // budget_calibration.hpp, or your own
//   BudgetPlan plan = allocate_budgets(curves, {.total = 20 * 32, .min_budget = 8});
//   plan.save("plan.kvb");                                           // later: BudgetPlan::load("plan.kvb")
//   auto cache = make_cache("streaming", plan.apply(cfg));        // any policy; or KVCache<P>(plan.apply(cfg))
//
// allocate_budgets() minimises sum_h cost_h(b_h) subject to sum_h b_h = total and min <= b_h <= max, where
// cost_h(b) is what head h loses when it keeps b tokens (BudgetCurves, measured on calibration text). It works
// on each curve's lower convex hull, taking tokens where they reduce the cost most (the greedy order is exact
// for convex curves; a non-convex stretch is bridged by its hull). Scope kGlobal shares one total across all
// layers and heads; kPerLayer gives every layer the same share (total / n_layers) and moves tokens only
// between the heads of a layer (AdaKV's rule; PyramidKV-like schedules are plans you build by hand).
//
// Plan file format (all integers little-endian):
//   8 bytes  magic "KVTPLAN\0"
//   u32      version (1)
//   i32      n_layers, n_kv_heads            (each in 1..65536)
//   i32      budget per (layer, KV head), layer-major   (each in 1..2^28)
//   u64      FNV-1a 64-bit hash of every byte before it
// load()/from_bytes() reject (kvtrim::Error) a wrong magic or version, out-of-range sizes or budgets, a file
// shorter or longer than its header implies, and a hash mismatch, naming what is wrong.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "checked_file.hpp"
#include "config.hpp"
#include "error.hpp"

namespace kvtrim {

// cost(layer, head, b) for b = 0..max_budget: what a head loses when it keeps b tokens (any unit, the same
// for every head; lower is better). Filled by a calibrator or by hand.
class BudgetCurves {
 public:
  BudgetCurves() = default;
  BudgetCurves(int n_layers, int n_kv_heads, int max_budget) : L_(n_layers), H_(n_kv_heads), max_(max_budget) {
    KVTRIM_CHECK(n_layers >= 1 && n_layers <= 1 << 16, "BudgetCurves: n_layers ", n_layers, " out of range 1..65536");
    KVTRIM_CHECK(n_kv_heads >= 1 && n_kv_heads <= 1 << 16, "BudgetCurves: n_kv_heads ", n_kv_heads,
                 " out of range 1..65536");
    KVTRIM_CHECK(max_budget >= 1 && max_budget <= 1 << 20, "BudgetCurves: max_budget ", max_budget,
                 " out of range 1..1048576");
    cost_.assign(static_cast<std::size_t>(L_) * H_ * (max_ + 1), 0.0);
  }

  int n_layers() const { return L_; }
  int n_kv_heads() const { return H_; }
  int max_budget() const { return max_; }

  double& at(int layer, int kv_head, int budget) { return cost_[index(layer, kv_head, budget)]; }
  double at(int layer, int kv_head, int budget) const { return cost_[index(layer, kv_head, budget)]; }

 private:
  std::size_t index(int layer, int kv_head, int budget) const {
    KVTRIM_CHECK(layer >= 0 && layer < L_, "BudgetCurves: layer ", layer, " out of range 0..", L_ - 1);
    KVTRIM_CHECK(kv_head >= 0 && kv_head < H_, "BudgetCurves: KV head ", kv_head, " out of range 0..", H_ - 1);
    KVTRIM_CHECK(budget >= 0 && budget <= max_, "BudgetCurves: budget ", budget, " out of range 0..", max_);
    return (static_cast<std::size_t>(layer) * H_ + kv_head) * (max_ + 1) + budget;
  }

  int L_ = 0, H_ = 0, max_ = 0;
  std::vector<double> cost_;
};

// Per-(layer, KV head) budgets, layer-major.
class BudgetPlan {
 public:
  static constexpr int kMaxBudget = 1 << 28;  // CacheConfig's own limit

  BudgetPlan() = default;
  BudgetPlan(int n_layers, int n_kv_heads, std::vector<int> budgets)
      : L_(n_layers), H_(n_kv_heads), budgets_(std::move(budgets)) {
    KVTRIM_CHECK(n_layers >= 1 && n_layers <= 1 << 16, "BudgetPlan: n_layers ", n_layers, " out of range 1..65536");
    KVTRIM_CHECK(n_kv_heads >= 1 && n_kv_heads <= 1 << 16, "BudgetPlan: n_kv_heads ", n_kv_heads,
                 " out of range 1..65536");
    const std::size_t want = static_cast<std::size_t>(L_) * H_;
    KVTRIM_CHECK(budgets_.size() == want, "BudgetPlan: ", budgets_.size(), " budgets; expected n_layers * n_kv_heads = ",
                 want, " (layer-major)");
    for (std::size_t i = 0; i < want; ++i)
      KVTRIM_CHECK(budgets_[i] >= 1 && budgets_[i] <= kMaxBudget, "BudgetPlan: budget of layer ", i / H_, " KV head ",
                   i % H_, " is ", budgets_[i], "; expected 1..", kMaxBudget);
  }

  // Every head gets `budget`.
  static BudgetPlan uniform(int n_layers, int n_kv_heads, int budget) {
    KVTRIM_CHECK(n_layers >= 1 && n_kv_heads >= 1 && n_layers <= 1 << 16 && n_kv_heads <= 1 << 16,
                 "BudgetPlan::uniform: n_layers (", n_layers, ") and n_kv_heads (", n_kv_heads,
                 ") must be in 1..65536");
    return BudgetPlan(n_layers, n_kv_heads,
                      std::vector<int>(static_cast<std::size_t>(n_layers) * n_kv_heads, budget));
  }

  int n_layers() const { return L_; }
  int n_kv_heads() const { return H_; }
  bool empty() const { return budgets_.empty(); }
  const std::vector<int>& budgets() const { return budgets_; }
  int budget(int layer, int kv_head) const {
    KVTRIM_CHECK(layer >= 0 && layer < L_, "BudgetPlan: layer ", layer, " out of range 0..", L_ - 1);
    KVTRIM_CHECK(kv_head >= 0 && kv_head < H_, "BudgetPlan: KV head ", kv_head, " out of range 0..", H_ - 1);
    return budgets_[static_cast<std::size_t>(layer) * H_ + kv_head];
  }
  // Tokens the plan lets all heads keep together.
  std::int64_t total() const {
    std::int64_t s = 0;
    for (int b : budgets_) s += b;
    return s;
  }
  std::int64_t layer_total(int layer) const {
    std::int64_t s = 0;
    for (int h = 0; h < H_; ++h) s += budget(layer, h);
    return s;
  }

  // `cfg` with head_budgets set to this plan; the shape must match.
  CacheConfig apply(CacheConfig cfg) const {
    KVTRIM_CHECK(!budgets_.empty(), "BudgetPlan::apply: the plan is empty (default-constructed)");
    KVTRIM_CHECK(cfg.n_layers == L_ && cfg.n_kv_heads == H_, "BudgetPlan::apply: the plan is for ", L_, " layers x ",
                 H_, " KV heads but the cache has ", cfg.n_layers, " x ", cfg.n_kv_heads);
    cfg.head_budgets = budgets_;
    return cfg;
  }

  // The same plan with every budget changed by `delta` tokens (e.g. +1 to give a policy that evicts before
  // attention as many attended tokens per step as one that evicts after).
  BudgetPlan shifted(int delta) const {
    std::vector<int> b = budgets_;
    for (int& x : b) x += delta;
    return BudgetPlan(L_, H_, std::move(b));
  }

  friend bool operator==(const BudgetPlan&, const BudgetPlan&) = default;

  // ---- serialisation (format in the header comment) ----
  std::vector<unsigned char> to_bytes() const {
    KVTRIM_CHECK(!budgets_.empty(), "BudgetPlan::to_bytes: the plan is empty (default-constructed)");
    std::vector<unsigned char> b(kHeader + 4 * budgets_.size() + 8);
    std::size_t at = 0;
    for (unsigned char c : kMagic) b[at++] = c;
    bytes::put_u32(b, at, kVersion);
    bytes::put_u32(b, at, static_cast<std::uint32_t>(L_));
    bytes::put_u32(b, at, static_cast<std::uint32_t>(H_));
    for (int x : budgets_) bytes::put_u32(b, at, static_cast<std::uint32_t>(x));
    const std::uint64_t hash = bytes::fnv1a64(b.data(), at);
    bytes::put_u64(b, at, hash);
    return b;
  }

  static BudgetPlan from_bytes(std::span<const unsigned char> b) {
    KVTRIM_CHECK(b.size() >= kHeader + 8, "BudgetPlan: data of ", b.size(), " bytes is too short for a header (",
                 kHeader + 8, " bytes at least); truncated or not a plan file");
    KVTRIM_CHECK(std::equal(kMagic.begin(), kMagic.end(), b.begin()),
                 "BudgetPlan: bad magic; expected \"KVTPLAN\\0\" (not a kvtrim budget plan)");
    std::size_t at = kMagic.size();
    const std::uint32_t version = bytes::get_u32(b, at);
    KVTRIM_CHECK(version == kVersion, "BudgetPlan: format version ", version, " is not supported (expected ", kVersion,
                 ")");
    const auto L = static_cast<std::int32_t>(bytes::get_u32(b, at));
    const auto H = static_cast<std::int32_t>(bytes::get_u32(b, at));
    KVTRIM_CHECK(L >= 1 && L <= 1 << 16, "BudgetPlan: n_layers ", L, " out of range 1..65536");
    KVTRIM_CHECK(H >= 1 && H <= 1 << 16, "BudgetPlan: n_kv_heads ", H, " out of range 1..65536");
    const std::uint64_t heads = static_cast<std::uint64_t>(L) * static_cast<std::uint64_t>(H);
    const std::uint64_t want = kHeader + 4 * heads + 8;
    KVTRIM_CHECK(b.size() == want, "BudgetPlan: data has ", b.size(), " bytes but its header (", L, " layers x ", H,
                 " KV heads) implies ", want, b.size() < want ? " (truncated)" : " (trailing bytes)");
    std::size_t tail = b.size() - 8;
    const std::uint64_t stored = bytes::get_u64(b, tail);
    KVTRIM_CHECK(stored == bytes::fnv1a64(b.data(), b.size() - 8),
                 "BudgetPlan: checksum mismatch (the data is corrupt or was modified)");
    std::vector<int> budgets(static_cast<std::size_t>(heads));
    for (std::size_t i = 0; i < budgets.size(); ++i) {
      const auto x = static_cast<std::int32_t>(bytes::get_u32(b, at));
      KVTRIM_CHECK(x >= 1 && x <= kMaxBudget, "BudgetPlan: budget of layer ", i / static_cast<std::size_t>(H),
                   " KV head ", i % static_cast<std::size_t>(H), " is ", x, "; expected 1..", kMaxBudget);
      budgets[i] = x;
    }
    return BudgetPlan(L, H, std::move(budgets));
  }

  void save(const std::string& path) const { bytes::write_file(path, to_bytes(), "BudgetPlan::save"); }
  static BudgetPlan load(const std::string& path) {
    return bytes::read_file(path, "BudgetPlan::load", [](std::span<const unsigned char> b) { return from_bytes(b); });
  }

 private:
  static constexpr std::array<unsigned char, 8> kMagic{'K', 'V', 'T', 'P', 'L', 'A', 'N', '\0'};
  static constexpr std::uint32_t kVersion = 1;
  static constexpr std::size_t kHeader = 8 + 3 * 4;


  int L_ = 0, H_ = 0;
  std::vector<int> budgets_;
};

enum class BudgetScope {
  kGlobal,    // one total over all layers and heads
  kPerLayer,  // every layer gets total / n_layers (the first layers take the remainder), shared by its heads
};

struct AllocationOptions {
  std::int64_t total = 0;  // sum of the budgets
  int min_budget = 1;      // per head, e.g. what the policy needs for its protected tokens + 1
  int max_budget = 0;      // per head; 0 = the curves' max_budget
  BudgetScope scope = BudgetScope::kGlobal;
};

namespace detail {

// One step of a head's lower convex hull: `tokens` more tokens lower its cost by `gain` in total.
struct HullStep {
  int tokens;
  double gain;
};

// Lower convex hull of cost(b) for b in [lo, hi], as steps from lo upwards with non-increasing gain per token.
inline std::vector<HullStep> hull_steps(const BudgetCurves& c, int layer, int head, int lo, int hi) {
  std::vector<int> pts;  // budgets on the hull
  for (int b = lo; b <= hi; ++b) {
    // Drop the last hull point while it lies on or above the segment from its predecessor to b.
    while (pts.size() >= 2) {
      const int b0 = pts[pts.size() - 2], b1 = pts.back();
      const double c0 = c.at(layer, head, b0), c1 = c.at(layer, head, b1), c2 = c.at(layer, head, b);
      if ((c1 - c0) * double(b - b0) >= (c2 - c0) * double(b1 - b0)) pts.pop_back();
      else break;
    }
    pts.push_back(b);
  }
  std::vector<HullStep> steps;
  for (std::size_t i = 1; i < pts.size(); ++i)
    steps.push_back({pts[i] - pts[i - 1], c.at(layer, head, pts[i - 1]) - c.at(layer, head, pts[i])});
  return steps;
}

// Hands out `extra` tokens over `heads` (indices into the layer-major plan), each starting at `lo`.
inline void allocate_among(const BudgetCurves& c, const std::vector<int>& heads, int lo, int hi, std::int64_t extra,
                           std::vector<int>& budgets) {
  struct Head {
    std::vector<HullStep> steps;
    std::size_t next = 0;
  };
  std::vector<Head> hs(heads.size());
  // Max-heap on gain per token; ties go to the lower (layer, head) index so plans are deterministic.
  struct Item {
    double rate;
    int head;
  };
  auto cmp = [](const Item& a, const Item& b) { return a.rate != b.rate ? a.rate < b.rate : a.head > b.head; };
  std::priority_queue<Item, std::vector<Item>, decltype(cmp)> q(cmp);
  for (std::size_t i = 0; i < heads.size(); ++i) {
    const int flat = heads[i];
    hs[i].steps = hull_steps(c, flat / c.n_kv_heads(), flat % c.n_kv_heads(), lo, hi);
    budgets[static_cast<std::size_t>(flat)] = lo;
    if (!hs[i].steps.empty()) q.push({hs[i].steps[0].gain / hs[i].steps[0].tokens, static_cast<int>(i)});
  }
  while (extra > 0 && !q.empty()) {
    const Item top = q.top();
    q.pop();
    Head& h = hs[static_cast<std::size_t>(top.head)];
    const HullStep& s = h.steps[h.next++];
    const int take = static_cast<int>(std::min<std::int64_t>(s.tokens, extra));  // a partial last step is linear
    budgets[static_cast<std::size_t>(heads[static_cast<std::size_t>(top.head)])] += take;
    extra -= take;
    if (h.next < h.steps.size()) q.push({h.steps[h.next].gain / h.steps[h.next].tokens, top.head});
  }
}

}  // namespace detail

// Per-head budgets with sum == opt.total that minimise the summed cost (see the header comment).
inline BudgetPlan allocate_budgets(const BudgetCurves& curves, const AllocationOptions& opt) {
  const int L = curves.n_layers(), H = curves.n_kv_heads();
  KVTRIM_CHECK(L >= 1 && H >= 1, "allocate_budgets: the curves are empty (default-constructed)");
  const int hi = opt.max_budget == 0 ? curves.max_budget() : opt.max_budget;
  KVTRIM_CHECK(opt.min_budget >= 1, "allocate_budgets: min_budget must be >= 1, got ", opt.min_budget);
  KVTRIM_CHECK(hi >= opt.min_budget && hi <= curves.max_budget(), "allocate_budgets: max_budget ", hi,
               " must be in min_budget (", opt.min_budget, ")..the curves' max_budget (", curves.max_budget(), ")");
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h)
      for (int b = opt.min_budget; b <= hi; ++b)
        KVTRIM_CHECK(std::isfinite(curves.at(l, h, b)), "allocate_budgets: cost of layer ", l, " KV head ", h,
                     " at budget ", b, " is not finite");
  const std::int64_t heads = static_cast<std::int64_t>(L) * H;
  const std::int64_t layers_per_share = opt.scope == BudgetScope::kGlobal ? 1 : L;
  const std::int64_t share_heads = heads / layers_per_share;
  // Every share (all heads, or one layer's heads) must be able to hold its part of the total.
  const std::int64_t smallest_share = opt.total / layers_per_share;
  const std::int64_t largest_share = smallest_share + (opt.total % layers_per_share != 0);
  KVTRIM_CHECK(smallest_share >= share_heads * opt.min_budget && largest_share <= share_heads * hi,
               "allocate_budgets: total ", opt.total, " cannot be split ",
               opt.scope == BudgetScope::kGlobal ? "over " : "per layer over ", share_heads, " heads with ",
               opt.min_budget, "..", hi, " tokens each (",
               opt.scope == BudgetScope::kGlobal ? "" : "per layer: ", share_heads * opt.min_budget, "..",
               share_heads * hi, ")");
  std::vector<int> budgets(static_cast<std::size_t>(heads), opt.min_budget);
  if (opt.scope == BudgetScope::kGlobal) {
    std::vector<int> all(static_cast<std::size_t>(heads));
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
    detail::allocate_among(curves, all, opt.min_budget, hi, opt.total - heads * opt.min_budget, budgets);
  } else {
    for (int l = 0; l < L; ++l) {
      const std::int64_t share = opt.total / L + (l < opt.total % L ? 1 : 0);
      std::vector<int> layer_heads(static_cast<std::size_t>(H));
      for (int h = 0; h < H; ++h) layer_heads[static_cast<std::size_t>(h)] = l * H + h;
      detail::allocate_among(curves, layer_heads, opt.min_budget, hi, share - std::int64_t{H} * opt.min_budget,
                             budgets);
    }
  }
  return BudgetPlan(L, H, std::move(budgets));
}

}  // namespace kvtrim
