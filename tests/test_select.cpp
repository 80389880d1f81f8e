// The selection rule every backend applies (select.hpp): the victim reduction gives the sequential scan's
// answer in any order, and prompt sort keys order tokens exactly as evicts_before does.
#include <kvtrim/select.hpp>

#include <algorithm>
#include <numeric>

#include "testing.hpp"

using kvtrim::VictimKey;

TEST_CASE("A tree reduction with better_victim finds select.hpp's victim", "[select]") {
  kvtest::Rng rng(12);
  struct Meta {
    float score;
  };
  for (int trial = 0; trial < 300; ++trial) {
    const int n = rng.uniform_int(1, 120);
    kvtrim::HeadStore<Meta> h(1, 1, n);  // slots as a backend holds them
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), std::int64_t{0});
    std::shuffle(pos.begin(), pos.end(), rng.gen);  // slots unordered
    const float zero = 0.0f;
    for (int i = 0; i < n; ++i) {
      h.append(&zero, &zero, pos[i] * 3);
      h.meta(i).score = static_cast<float>(rng.uniform_int(0, 4)) * 0.5f;  // many ties
      if (rng.uniform_int(0, 9) == 0) h.meta(i).score = rng.uniform_int(0, 1) ? 0.0f : -0.0f;
    }
    const kvtrim::Protection pr{rng.uniform_int(0, 5), rng.uniform_int(0, 5)};
    // the reference: a plain sequential scan with evicts_before
    int want = -1;
    for (int i = 0; i < n; ++i)
      if (!pr.protects(h.pos(i), h.newest_pos()) &&
          (want < 0 || kvtrim::evicts_before(h.meta(i).score, h.pos(i), h.meta(want).score, h.pos(want))))
        want = i;
    // a GPU block's shape: strided per-thread scans, then a pairwise tree over the thread results
    const int threads = 1 << rng.uniform_int(0, 6);
    std::vector<VictimKey> acc(static_cast<std::size_t>(threads));
    for (int i = 0; i < n; ++i) {
      if (pr.protects(h.pos(i), h.newest_pos())) continue;
      auto& a = acc[static_cast<std::size_t>(i % threads)];
      a = kvtrim::better_victim(a, VictimKey{h.meta(i).score, h.pos(i), i});
    }
    for (int stride = threads / 2; stride > 0; stride /= 2)
      for (int t = 0; t < stride; ++t) acc[t] = kvtrim::better_victim(acc[t], acc[t + stride]);
    REQUIRE(acc[0].slot == want);
  }
}

TEST_CASE("Prompt sort keys order tokens as evicts_before does", "[select]") {
  kvtest::Rng rng(13);
  const std::vector<float> special{0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 3e38f, -3e38f, INFINITY, -INFINITY};
  auto pick = [&] {
    return rng.uniform_int(0, 1) ? special[static_cast<std::size_t>(rng.uniform_int(0, 9))]
                                 : rng.normal(1, 10.0f)[0];
  };
  for (int trial = 0; trial < 20000; ++trial) {
    const float a = pick(), b = pick();
    const int ta = rng.uniform_int(0, 1000), tb = rng.uniform_int(0, 1000);
    if (ta == tb) continue;
    const bool want = kvtrim::evicts_before(a, ta, b, tb);
    REQUIRE((kvtrim::prompt_sort_key(a, ta) < kvtrim::prompt_sort_key(b, tb)) == want);
  }
  REQUIRE(kvtrim::sort_key_token(kvtrim::prompt_sort_key(-2.5f, 123456)) == 123456);
  REQUIRE(kvtrim::sort_key_protected(kvtrim::prompt_sort_key(INFINITY, 7)));
  REQUIRE_FALSE(kvtrim::sort_key_protected(kvtrim::prompt_sort_key(3e38f, 7)));
}
