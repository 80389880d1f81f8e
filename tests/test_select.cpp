// The selection rule every backend applies (select.hpp): the victim reduction gives the sequential scan's
// answer in any order, the CPU's vectorised search (cpu_selection.hpp) gives it too, and prompt sort keys order
// tokens exactly as evicts_before does.
#include <kvtrim/cpu_selection.hpp>
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

TEST_CASE("The CPU's vectorised victim search finds the sequential scan's victim", "[select]") {
  kvtest::Rng rng(14);
  const std::vector<float> special{0.0f, -0.0f, 0.5f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN};
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = rng.uniform_int(1, 150);  // past and between blocks of 32
    // positions: distinct, shuffled; sometimes around 2^31 or ages beyond 2^32 (the 64-bit path)
    const int spread = rng.uniform_int(0, 3);
    const std::int64_t base = spread == 1 ? (std::int64_t{1} << 31) - 40 : 0;
    const std::int64_t step = spread == 2 ? (std::int64_t{1} << 27) + 1 : 3;
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) pos[i] = base + step * i;
    std::shuffle(pos.begin(), pos.end(), rng.gen);
    const std::int64_t newest = *std::max_element(pos.begin(), pos.end()) + rng.uniform_int(0, 2);
    const int kind = rng.uniform_int(0, 2);  // 0: few values (ties), 1: also specials, 2: all alike
    std::vector<float> value(static_cast<std::size_t>(n));
    std::vector<int> excluded(static_cast<std::size_t>(n));
    const int exclude_one_in = rng.uniform_int(1, 6);  // 1: none excluded
    for (int i = 0; i < n; ++i) {
      value[i] = kind == 2   ? 1.0f
                 : kind == 1 && rng.uniform_int(0, 4) == 0 ? special[static_cast<std::size_t>(rng.uniform_int(0, 7))]
                                                            : static_cast<float>(rng.uniform_int(0, 3)) * 0.25f;
      excluded[i] = exclude_one_in > 1 && (exclude_one_in == 6 || rng.uniform_int(1, exclude_one_in) == 1);  // 6: all
    }
    // the reference: the sequential scan with evicts_before
    int want = -1;
    for (int i = 0; i < n; ++i)
      if (!excluded[i] && (want < 0 || kvtrim::evicts_before(value[i], pos[i], value[want], pos[want]))) want = i;
    const bool any_nan = std::any_of(value.begin(), value.end(), [](float v) { return std::isnan(v); });
    std::vector<float> score(static_cast<std::size_t>(n));
    std::vector<std::uint32_t> key(static_cast<std::size_t>(n));
    const int got = kvtrim::cpu::lowest_key(
        n, pos.data(), newest, score.data(), key.data(), [&](int i) { return value[i]; },
        [&](int i) { return excluded[i] != 0; });
    INFO("n " << n << " base " << base << " kind " << kind);
    if (any_nan || (want >= 0 && value[want] == INFINITY))
      REQUIRE(got == -2);  // no ordering to vectorise: the caller's sequential scan decides
    else
      REQUIRE(got == want);  // -1 when every slot is excluded
  }
}

TEST_CASE("Metadata made of 4-byte fields moves as words; other metadata is updated in place", "[select]") {
  struct Two {
    float score;
    std::int32_t seen;
  };
  struct Padded {
    float score;
    bool flag;
  };
  struct Bytes {
    std::uint8_t a, b, c, d;
  };
  struct Wide {
    std::uint64_t code;
  };
  struct Four {
    float a, b;
    int c, d;
  };
  STATIC_REQUIRE(kvtrim::cpu::made_of_words<Two>());
  STATIC_REQUIRE(kvtrim::cpu::made_of_words<Four>());
  STATIC_REQUIRE_FALSE(kvtrim::cpu::made_of_words<Padded>());
  STATIC_REQUIRE_FALSE(kvtrim::cpu::made_of_words<Bytes>());
  STATIC_REQUIRE_FALSE(kvtrim::cpu::made_of_words<Wide>());
  // either way the rule sees and updates every field
  std::vector<Two> two{{1.0f, 2}, {3.0f, 4}};
  std::vector<Padded> padded{{1.0f, false}, {3.0f, true}};
  for (int i = 0; i < 2; ++i) {
    kvtrim::cpu::update_slot(two.data(), i, [](Two& m) { m.score += 0.5f, m.seen += 10; });
    kvtrim::cpu::update_slot(padded.data(), i, [](Padded& m) { m.score += 0.5f, m.flag = !m.flag; });
  }
  REQUIRE((two[0].score == 1.5f && two[0].seen == 12 && two[1].score == 3.5f && two[1].seen == 14));
  REQUIRE((padded[0].score == 1.5f && padded[0].flag && padded[1].score == 3.5f && !padded[1].flag));
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
