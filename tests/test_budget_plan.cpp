// Per-head budgets under one total (budget_plan.hpp) and their calibration (budget_calibration.hpp):
// allocations against an exhaustive search, totals and per-head bounds, memory bounded by the plan in a real
// cache for every registered policy, the plan file's round trip and its refusal of damaged files, and the
// calibrator's curves against a naive recomputation written here.
#include <kvtrim/any_cache.hpp>
#include <kvtrim/budget_calibration.hpp>
#include <kvtrim/budget_plan.hpp>

#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "testing.hpp"

namespace {

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const kvtrim::Error& e) {
    return e.what();
  }
  return "";
}

// Random convex non-increasing curves: cost(b) = sum of positive decreasing increments.
kvtrim::BudgetCurves convex_curves(kvtest::Rng& rng, int L, int H, int max_b) {
  kvtrim::BudgetCurves c(L, H, max_b);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      std::vector<double> drop(static_cast<std::size_t>(max_b));
      for (auto& d : drop) d = std::abs(double(rng.normal(1)[0])) + 1e-3;
      std::sort(drop.begin(), drop.end(), std::greater<>());
      double v = std::accumulate(drop.begin(), drop.end(), 0.0) + 0.5;
      c.at(l, h, 0) = v;
      for (int b = 1; b <= max_b; ++b) c.at(l, h, b) = v -= drop[static_cast<std::size_t>(b - 1)];
    }
  return c;
}

double plan_cost(const kvtrim::BudgetCurves& c, const std::vector<int>& budgets) {
  double s = 0;
  for (int i = 0; i < c.n_layers() * c.n_kv_heads(); ++i)
    s += c.at(i / c.n_kv_heads(), i % c.n_kv_heads(), budgets[static_cast<std::size_t>(i)]);
  return s;
}

// The cheapest assignment by exhaustive search over every split (small instances only).
double brute_force_min(const kvtrim::BudgetCurves& c, std::vector<int> heads, int lo, int hi, std::int64_t total) {
  if (heads.empty()) return total == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  const int flat = heads.back();
  heads.pop_back();
  double best = std::numeric_limits<double>::infinity();
  for (int b = lo; b <= hi && b <= total; ++b)
    best = std::min(best, c.at(flat / c.n_kv_heads(), flat % c.n_kv_heads(), b) + brute_force_min(c, heads, lo, hi, total - b));
  return best;
}

std::vector<unsigned char> with_hash(std::vector<unsigned char> b) {
  // FNV-1a 64 over everything but the last 8 bytes, written here independently of the header.
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < b.size() - 8; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  for (int i = 0; i < 8; ++i) b[b.size() - 8 + static_cast<std::size_t>(i)] = static_cast<unsigned char>(h >> (8 * i));
  return b;
}

}  // namespace

TEST_CASE("allocate_budgets: the total is met exactly and every head stays within its bounds", "[budget_plan]") {
  kvtest::Rng rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const int L = rng.uniform_int(1, 4), H = rng.uniform_int(1, 4), max_b = rng.uniform_int(8, 40);
    kvtrim::BudgetCurves c(L, H, max_b);
    for (int l = 0; l < L; ++l)  // arbitrary, even increasing, curves: only the constraints are checked here
      for (int h = 0; h < H; ++h)
        for (int b = 0; b <= max_b; ++b) c.at(l, h, b) = double(rng.normal(1)[0]);
    const int lo = rng.uniform_int(1, 4), hi = rng.uniform_int(lo, max_b);
    const std::int64_t total = rng.uniform_int(L * H * lo, L * H * hi);
    const auto plan = kvtrim::allocate_budgets(c, {.total = total, .min_budget = lo, .max_budget = hi});
    REQUIRE(plan.total() == total);
    for (int b : plan.budgets()) REQUIRE((b >= lo && b <= hi));
    // Per layer: every layer gets total / L (the first ones one more), split among its heads.
    const std::int64_t per_layer_total = rng.uniform_int(L * H * lo, L * H * hi);
    if (per_layer_total / L >= H * lo && per_layer_total / L + 1 <= H * hi) {
      const auto pl = kvtrim::allocate_budgets(
          c, {.total = per_layer_total, .min_budget = lo, .max_budget = hi, .scope = kvtrim::BudgetScope::kPerLayer});
      REQUIRE(pl.total() == per_layer_total);
      for (int l = 0; l < L; ++l)
        REQUIRE(pl.layer_total(l) == per_layer_total / L + (l < per_layer_total % L ? 1 : 0));
    }
  }
}

TEST_CASE("allocate_budgets: on convex curves the plan is as cheap as the best split found by exhaustive search",
          "[budget_plan]") {
  kvtest::Rng rng(11);
  for (int trial = 0; trial < 30; ++trial) {
    const int L = rng.uniform_int(1, 2), H = rng.uniform_int(1, 3), max_b = rng.uniform_int(4, 9);
    const auto c = convex_curves(rng, L, H, max_b);
    const int lo = rng.uniform_int(1, 2);
    const std::int64_t total = rng.uniform_int(L * H * lo, L * H * max_b);
    const auto plan = kvtrim::allocate_budgets(c, {.total = total, .min_budget = lo});
    std::vector<int> all(static_cast<std::size_t>(L * H));
    std::iota(all.begin(), all.end(), 0);
    INFO("trial " << trial << " total " << total);
    REQUIRE(plan_cost(c, plan.budgets()) == Approx(brute_force_min(c, all, lo, max_b, total)).epsilon(1e-12));
  }
}

TEST_CASE("allocate_budgets: a head whose cost falls steeply gets the tokens; ties are deterministic", "[budget_plan]") {
  kvtrim::BudgetCurves c(1, 2, 10);
  for (int b = 0; b <= 10; ++b) {
    c.at(0, 0, b) = 10.0 - b;        // every token saves 1
    c.at(0, 1, b) = 0.1 * (10 - b);  // every token saves 0.1
  }
  auto plan = kvtrim::allocate_budgets(c, {.total = 12, .min_budget = 1});
  REQUIRE(plan.budgets() == std::vector<int>{10, 2});
  // Equal curves: the lower index takes the odd token, and the result never depends on anything else.
  kvtrim::BudgetCurves e(2, 1, 6);
  for (int l = 0; l < 2; ++l)
    for (int b = 0; b <= 6; ++b) e.at(l, 0, b) = 6.0 - b;
  REQUIRE(kvtrim::allocate_budgets(e, {.total = 7, .min_budget = 1}).budgets() == std::vector<int>{6, 1});
}

TEST_CASE("allocate_budgets: impossible requests are refused with the numbers", "[budget_plan]") {
  kvtrim::BudgetCurves c(2, 2, 8);
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(c, {.total = 3, .min_budget = 1}); }).find("cannot be split") !=
          std::string::npos);
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(c, {.total = 33, .min_budget = 1}); }).find("1..8") !=
          std::string::npos);
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(c, {.total = 16, .min_budget = 0}); }).find("min_budget") !=
          std::string::npos);
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(c, {.total = 16, .min_budget = 4, .max_budget = 3}); })
              .find("max_budget") != std::string::npos);
  c.at(1, 1, 5) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(c, {.total = 16}); }).find("layer 1 KV head 1 at budget 5") !=
          std::string::npos);
  REQUIRE(error_of([&] { kvtrim::allocate_budgets(kvtrim::BudgetCurves{}, {.total = 16}); }).find("empty") !=
          std::string::npos);
}

TEST_CASE("BudgetPlan: a cache built from a plan keeps every head within its budget and reserves memory by the plan",
          "[budget_plan]") {
  const kvtrim::CacheConfig shape{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 52};
  const kvtrim::BudgetPlan plan(2, 2, {80, 36, 56, 36});  // total 208 = 4 heads x 52 (SnapKV's window is 32)
  const kvtrim::CacheConfig cfg = plan.apply(shape);
  REQUIRE(cfg.head_budgets == plan.budgets());
  const auto basis = std::make_shared<const kvtrim::EigenBasis>(2, 2, 8);
  for (std::string_view name : kvtrim::policy_names()) {
    INFO(name);
    auto cache = kvtrim::make_cache(name, cfg, {.params = {}, .basis = basis});
    auto uniform = kvtrim::make_cache(name, shape, {.params = {}, .basis = basis});
    // Slots are reserved per head (budget + 1 each), so a plan with the same total reserves the same memory.
    REQUIRE(cache->bytes_reserved() == uniform->bytes_reserved());
    kvtest::Rng rng(3);
    bool refused = false;  // policies that never evict (full, snapkv) refuse a token beyond the budget instead
    for (int step = 0; step < 120 && !refused; ++step)
      for (int l = 0; l < 2; ++l) {
        const auto q = rng.normal(32), k = rng.normal(16), v = rng.normal(16);
        std::vector<float> out(32);
        const std::string err = error_of([&] { cache->decode(l, q, k, v, out); });
        if (!err.empty()) {
          REQUIRE(err.find("never evicts") != std::string::npos);
          REQUIRE(step >= 36);  // the smallest budget is full
          refused = true;
        }
        std::int64_t kept = 0;
        for (int h = 0; h < 2; ++h) {
          REQUIRE(cache->size(l, h) <= plan.budget(l, h));
          kept += cache->size(l, h);
        }
        REQUIRE(kept <= plan.layer_total(l));
      }
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) REQUIRE(cache->budget(l, h) == plan.budget(l, h));
  }
  REQUIRE(error_of([&] {
            plan.apply({.n_layers = 3, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8, .budget = 52});
          }).find("2 layers x 2 KV heads but the cache has 3 x 2") != std::string::npos);
  REQUIRE(plan.shifted(1).budgets() == std::vector<int>{81, 37, 57, 37});
  REQUIRE(error_of([&] { plan.shifted(-36); }).find("layer 0 KV head 1 is 0") != std::string::npos);
}

TEST_CASE("BudgetPlan: save/load round trip, and damaged files are refused naming the problem", "[budget_plan]") {
  const kvtrim::BudgetPlan plan(3, 2, {5, 70, 12, 9, 33, 1});
  const auto bytes = plan.to_bytes();
  REQUIRE(bytes.size() == 8 + 12 + 6 * 4 + 8);
  REQUIRE(kvtrim::BudgetPlan::from_bytes(bytes) == plan);
  const auto path = (std::filesystem::temp_directory_path() / "kvtrim_test_budget_plan.kvb").string();
  plan.save(path);
  REQUIRE(kvtrim::BudgetPlan::load(path) == plan);

  auto refused = [](std::vector<unsigned char> b) { return error_of([&] { kvtrim::BudgetPlan::from_bytes(b); }); };
  auto b = bytes;
  b[0] = 'X';
  REQUIRE(refused(b).find("bad magic") != std::string::npos);
  b = bytes;
  b[8] = 2;
  REQUIRE(refused(with_hash(b)).find("version 2 is not supported") != std::string::npos);
  b.assign(bytes.begin(), bytes.end() - 5);  // assign, not resize(size() - 5): GCC 12 -O1 sees a possible wrap
  REQUIRE(refused(b).find("truncated") != std::string::npos);
  b = bytes;
  b.push_back(0);
  REQUIRE(refused(b).find("trailing bytes") != std::string::npos);
  REQUIRE(refused({bytes.begin(), bytes.begin() + 10}).find("too short") != std::string::npos);
  b = bytes;
  b[20] ^= 1;  // the first budget, 5 -> 4: a valid value, caught only by the checksum
  REQUIRE(refused(b).find("checksum mismatch") != std::string::npos);
  b = bytes;
  b[20] = 0;  // budget 0, with a matching checksum
  REQUIRE(refused(with_hash(b)).find("layer 0 KV head 0 is 0") != std::string::npos);
  b = bytes;
  b[12] = 0;  // n_layers 0
  REQUIRE(refused(with_hash(b)).find("n_layers 0") != std::string::npos);
  REQUIRE(error_of([] { kvtrim::BudgetPlan::load("/nonexistent/kvtrim.kvb"); }).find("cannot open") != std::string::npos);
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << "not a plan at all, but long enough to have a header";
  }
  REQUIRE(error_of([&] { kvtrim::BudgetPlan::load(path); }).find(path) != std::string::npos);
  std::filesystem::remove(path);
  REQUIRE(error_of([] { kvtrim::BudgetPlan(2, 2, {1, 2, 3}); }).find("expected n_layers * n_kv_heads = 4") !=
          std::string::npos);
}

namespace {

// Naive cost of one KV head at budget b for query t, from scratch: softmax over 0..t, the kept set listed
// explicitly, the renormalised output over it.
double naive_cost(const std::vector<float>& Q, const std::vector<float>& K, const std::vector<float>& V,
                  const kvtrim::CacheConfig& c, const kvtrim::BudgetCalibration& opt, const std::vector<double>* W,
                  int out_dim, int h, int t, int b) {
  const int d = c.head_dim, g = c.group_size(), nq = c.n_q_heads, nkv = c.n_kv_heads;
  std::vector<std::vector<double>> p(static_cast<std::size_t>(g), std::vector<double>(static_cast<std::size_t>(t + 1)));
  std::vector<double> pbar(static_cast<std::size_t>(t + 1), 0.0);
  for (int j = 0; j < g; ++j) {
    double z = 0;
    for (int s = 0; s <= t; ++s) {
      double dot = 0;
      for (int x = 0; x < d; ++x)
        dot += double(Q[static_cast<std::size_t>(t * nq * d + (h * g + j) * d + x)]) *
               double(K[static_cast<std::size_t>(s * nkv * d + h * d + x)]);
      z += p[j][s] = std::exp(dot / std::sqrt(double(d)));
    }
    for (int s = 0; s <= t; ++s) {
      p[j][s] /= z;
      pbar[s] += p[j][s] / g;
    }
  }
  std::vector<char> kept(static_cast<std::size_t>(t + 1), 0);
  if (b > t) {
    std::fill(kept.begin(), kept.end(), 1);
  } else if (opt.keep == kvtrim::KeepModel::kSinksAndRecent) {
    const int se = std::min(opt.sinks, b - 1), r = b - se;
    for (int s = 0; s <= t; ++s) kept[s] = (s < se || s > t - r) && b > 0;
  } else {
    std::vector<int> idx(static_cast<std::size_t>(t + 1));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int z) { return pbar[a] != pbar[z] ? pbar[a] > pbar[z] : a > z; });
    for (int i = 0; i < b; ++i) kept[idx[static_cast<std::size_t>(i)]] = 1;
  }
  double cost = 0;
  for (int j = 0; j < g; ++j) {
    double m = 0;
    std::vector<double> full(static_cast<std::size_t>(d), 0.0), part(static_cast<std::size_t>(d), 0.0);
    for (int s = 0; s <= t; ++s)
      for (int x = 0; x < d; ++x) {
        const double v = V[static_cast<std::size_t>(s * nkv * d + h * d + x)];
        full[x] += p[j][s] * v;
        if (kept[s]) part[x] += p[j][s] * v;
      }
    for (int s = 0; s <= t; ++s) m += kept[s] ? p[j][s] : 0.0;
    if (opt.measure == kvtrim::CostMeasure::kLostMass) {
      cost += (1.0 - m) / g;
      continue;
    }
    std::vector<double> e(static_cast<std::size_t>(d));
    for (int x = 0; x < d; ++x) e[x] = full[x] - (m > 0 ? part[x] / m : 0.0);
    if (W == nullptr) {
      for (double x : e) cost += x * x;
    } else {  // |W_h e|^2 with W_h the columns of W_o for query head h*g+j
      for (int r = 0; r < out_dim; ++r) {
        double y = 0;
        for (int x = 0; x < d; ++x) y += (*W)[static_cast<std::size_t>(r * nq * d + (h * g + j) * d + x)] * e[x];
        cost += y * y;
      }
    }
  }
  return cost;
}

}  // namespace

TEST_CASE("BudgetCalibrator: curves equal a naive recomputation for every keep model and cost measure",
          "[budget_plan][calibration]") {
  const kvtrim::CacheConfig c{.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 4, .budget = 1};
  kvtest::Rng rng(5);
  const int T1 = 13, T2 = 9, out_dim = 3, max_b = 15;
  std::vector<std::vector<float>> seq;  // per sequence: Q, K, V
  for (int T : {T1, T2}) {
    seq.push_back(rng.normal(static_cast<std::size_t>(T * 16), 1.5f));
    seq.push_back(rng.normal(static_cast<std::size_t>(T * 8), 1.5f));
    seq.push_back(rng.normal(static_cast<std::size_t>(T * 8)));
  }
  const auto wo_f = rng.normal(static_cast<std::size_t>(out_dim * 16));
  const std::vector<double> wo(wo_f.begin(), wo_f.end());
  for (auto keep : {kvtrim::KeepModel::kSinksAndRecent, kvtrim::KeepModel::kTopAttention})
    for (auto measure : {kvtrim::CostMeasure::kLostMass, kvtrim::CostMeasure::kOutputError})
      for (bool projected : {false, true}) {
        if (projected && measure == kvtrim::CostMeasure::kLostMass) continue;
        const kvtrim::BudgetCalibration opt{.max_budget = max_b, .keep = keep, .sinks = 2, .measure = measure};
        kvtrim::BudgetCalibrator cal(c, opt);
        if (projected) cal.set_output_projection(1, wo_f, out_dim);  // layer 1 only; layer 0 stays in value space
        for (int s = 0; s < 2; ++s)
          for (int l = 0; l < 2; ++l) cal.add(l, seq[3 * s], seq[3 * s + 1], seq[3 * s + 2]);
        const auto curves = cal.curves();
        REQUIRE(cal.queries(0) == T1 + T2);
        for (int l = 0; l < 2; ++l)
          for (int h = 0; h < 2; ++h)
            for (int b = 0; b <= max_b; ++b) {
              double want = 0;
              for (int s = 0; s < 2; ++s) {
                const int T = s == 0 ? T1 : T2;
                for (int t = 0; t < T; ++t)
                  want += naive_cost(seq[3 * s], seq[3 * s + 1], seq[3 * s + 2], c, opt,
                                     projected && l == 1 ? &wo : nullptr, out_dim, h, t, b);
              }
              want /= T1 + T2;
              INFO("keep " << int(keep) << " measure " << int(measure) << " projected " << projected << " layer " << l
                           << " head " << h << " b " << b);
              REQUIRE(curves.at(l, h, b) == Approx(want).epsilon(1e-9).margin(1e-12));
            }
      }
}

TEST_CASE("BudgetCalibrator: plans from its curves favour the head that looks far back", "[budget_plan][calibration]") {
  // KV head 0 attends only to the newest token (its logit grows steeply with the position); KV head 1 spreads
  // its attention evenly over the whole past (zero keys). The local head needs nothing beyond the minimum.
  const kvtrim::CacheConfig c{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2, .head_dim = 2, .budget = 1};
  const int T = 40;
  std::vector<float> Q(T * 4, 0.0f), K(T * 4, 0.0f), V(T * 4);
  kvtest::Rng rng(9);
  for (int t = 0; t < T; ++t) {
    Q[t * 4 + 0] = 5000.0f;
    K[t * 4 + 0] = float(t) / T;
    for (int x = 0; x < 4; ++x) V[t * 4 + x] = rng.normal(1)[0];
  }
  kvtrim::BudgetCalibrator cal(c, {.max_budget = T, .sinks = 0});
  cal.add(0, Q, K, V);
  const auto plan = kvtrim::allocate_budgets(cal.curves(), {.total = 24, .min_budget = 2});
  REQUIRE(plan.budget(0, 0) == 2);
  REQUIRE(plan.budget(0, 1) == 22);
}

TEST_CASE("BudgetCalibrator: bad input is refused before anything changes", "[budget_plan][calibration]") {
  const kvtrim::CacheConfig c{.n_layers = 2, .n_kv_heads = 1, .n_q_heads = 2, .head_dim = 2, .budget = 1};
  kvtrim::BudgetCalibrator cal(c, {.max_budget = 8});
  std::vector<float> Q(3 * 4, 0.1f), K(3 * 2, 0.2f), V(3 * 2, 0.3f);
  REQUIRE(error_of([&] { cal.curves(); }).find("layer 0 has no samples") != std::string::npos);
  REQUIRE(error_of([&] { cal.add(2, Q, K, V); }).find("layer 2 out of range 0..1") != std::string::npos);
  REQUIRE(error_of([&] { cal.add(0, Q, std::vector<float>(5), V); }).find("K and V") != std::string::npos);
  auto bad = Q;
  bad[3] = std::numeric_limits<float>::infinity();
  REQUIRE(error_of([&] { cal.add(0, bad, K, V); }).find("non-finite") != std::string::npos);
  REQUIRE(cal.queries(0) == 0);
  cal.add(0, Q, K, V);
  REQUIRE(error_of([&] { cal.set_output_projection(0, std::vector<float>(4), 1); }).find("already has samples") !=
          std::string::npos);
  REQUIRE(error_of([&] { cal.set_output_projection(1, std::vector<float>(3), 1); }).find("expected out_dim") !=
          std::string::npos);
  REQUIRE(error_of([&] { kvtrim::BudgetCalibrator(c, {.max_budget = 0}); }).find("max_budget") != std::string::npos);
}
