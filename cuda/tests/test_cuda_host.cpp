// CUDA backend, the parts that need no GPU and that the CPU backend does not already run: the arithmetic only
// the kernels use (kernel_math.hpp: split-softmax partials, launch planning), the device status strings and the
// no-device error. The selection itself is the library's (select.hpp, cpu_selection.hpp), the same on both
// backends and tested with the CPU backend (tests/test_select.cpp and every policy's tests). Compiled by the
// host compiler.
#include <kvtrim/cuda/check.hpp>
#include <kvtrim/cuda/kernel_math.hpp>
#include <kvtrim/cuda/status.hpp>

#include <algorithm>
#include <cmath>
#include <string>

#include "testing.hpp"

using kvtrim::gpu::SoftmaxPartial;

TEST_CASE("Split softmax partials merge to the statistics of the whole row", "[cuda][math]") {
  kvtest::Rng rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = rng.uniform_int(1, 300);
    const auto x = rng.normal(static_cast<std::size_t>(n), 4.0f);
    // reference in double, plain loops
    double m = -INFINITY, l = 0;
    for (float v : x) m = std::max(m, double(v));
    for (float v : x) l += std::exp(double(v) - m);
    // random contiguous splits (some empty), merged in a random order
    std::vector<int> cuts{0, n};
    for (int c = rng.uniform_int(0, 6); c > 0; --c) cuts.push_back(rng.uniform_int(0, n));
    std::sort(cuts.begin(), cuts.end());
    std::vector<SoftmaxPartial> parts;
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
      SoftmaxPartial p;
      for (int i = cuts[c]; i < cuts[c + 1]; ++i) p.m = std::max(p.m, x[i]);
      for (int i = cuts[c]; i < cuts[c + 1]; ++i) p.l += std::exp(x[i] - p.m);
      parts.push_back(p);
    }
    std::shuffle(parts.begin(), parts.end(), rng.gen);
    SoftmaxPartial tot;
    for (const auto& p : parts) tot = kvtrim::gpu::merge(tot, p);
    REQUIRE(tot.m == static_cast<float>(m));
    REQUIRE(tot.l == Approx(l).epsilon(1e-5));
  }
  SECTION("empty partials are neutral and weigh nothing") {
    const SoftmaxPartial e;
    const SoftmaxPartial a{1.5f, 2.0f};
    REQUIRE(kvtrim::gpu::merge(e, e).l == 0.0f);
    REQUIRE(kvtrim::gpu::merge(e, e).m == -INFINITY);
    REQUIRE(kvtrim::gpu::merge(e, a).m == 1.5f);
    REQUIRE(kvtrim::gpu::merge(a, e).l == 2.0f);
    REQUIRE(kvtrim::gpu::rescale_weight(-INFINITY, 3.0f) == 0.0f);
  }
}

TEST_CASE("Decode launch planning", "[cuda][math]") {
  // hand-worked: 256 slots per split; the query tile is the largest of 8, 4, 2, 1 dividing the group
  REQUIRE(kvtrim::gpu::plan_splits(1) == 1);
  REQUIRE(kvtrim::gpu::plan_splits(256) == 1);
  REQUIRE(kvtrim::gpu::plan_splits(257) == 2);
  REQUIRE(kvtrim::gpu::plan_splits(131073) == 513);
  REQUIRE(kvtrim::gpu::group_tile(1) == 1);
  REQUIRE(kvtrim::gpu::group_tile(6) == 2);
  REQUIRE(kvtrim::gpu::group_tile(7) == 1);
  REQUIRE(kvtrim::gpu::group_tile(12) == 4);
  REQUIRE(kvtrim::gpu::group_tile(16) == 8);
}

TEST_CASE("Device statuses read as sentences", "[cuda][errors]") {
  using kvtrim::gpu::Status;
  REQUIRE(std::string(to_string(Status::kOk)) == "ok");
  for (Status s : {Status::kHeadFull, Status::kAllProtected, Status::kNoProgress})
    REQUIRE(std::string(to_string(s)).find(' ') != std::string::npos);
  REQUIRE(std::string(to_string(static_cast<Status>(42))) == "unknown device status");
}

TEST_CASE("require_device reports a missing GPU as kvtrim::Error", "[cuda][errors]") {
  if (kvtrim::gpu::device_count() == 0) {
    REQUIRE_THROWS_WITH(kvtrim::gpu::require_device("CudaBackend"),
                           Catch::Matchers::Contains("no CUDA device available"));
  } else {
    REQUIRE_NOTHROW(kvtrim::gpu::require_device("CudaBackend"));
  }
  // a failing runtime call becomes kvtrim::Error naming the call
  REQUIRE_THROWS_WITH(KVTRIM_CUDA_CHECK(cudaErrorInvalidValue),
                         Catch::Matchers::Contains("CUDA error cudaErrorInvalidValue"));
  REQUIRE_THROWS_WITH(KVTRIM_CUBLAS_CHECK(CUBLAS_STATUS_NOT_INITIALIZED),
                         Catch::Matchers::Contains("CUBLAS_STATUS_NOT_INITIALIZED"));
}
