// libFuzzer target: the public KVCache API driven by arbitrary bytes. The input picks a registered policy
// (registry.hpp) and overrides its parameters by name with fuzzed text (valid or not: params.hpp must refuse bad
// text, the policy bad combinations), a shape, budgets (shared or per head), check_finite on or off, a data mode (normal,
// ties, zeros, NaN/Inf sprinkled, huge finite values), then a sequence of operations: decode (default,
// explicit or backwards positions, wrong sizes, bad layers), prefill (right or wrong sizes, busy layers),
// reset and introspection with arbitrary indices. Any kvtrim::Error is fine if the cache is unchanged;
// everything else that goes wrong is a finding: a crash or sanitizer report, or one of these invariants
// broken (__builtin_trap):
//  - a rejected call changed the cache (positions, K/V bytes, counters, next positions, memory);
//  - a head holds more than its budget, a position twice, or a position that was never sent (since reset);
//  - a kept slot's K/V bytes differ from the token sent at that position (policies that store rows as sent);
//  - evictions + merges + kept != tokens sent, per head; bytes_reserved moved;
//  - check_finite on, inputs moderate (|x| <= 1e15): an output is not finite.
#include <fuzzer/FuzzedDataProvider.h>

#include <kvtrim/kvtrim.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <vector>

#define FUZZ_ASSERT(cond)                                                                      \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "kvtrim fuzz: invariant broken: %s (line %d)\n", #cond, __LINE__); \
      __builtin_trap();                                                                        \
    }                                                                                          \
  } while (0)

namespace {

using Pos = std::int64_t;

// Values for q/k/v: a cheap generator seeded by the input, in one of several modes.
struct Values {
  std::uint64_t s;
  int mode;  // 0 normal, 1 few distinct values (ties), 2 zeros, 3 NaN/Inf sprinkled, 4 huge finite sprinkled
  float next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const std::uint32_t r = static_cast<std::uint32_t>(s >> 32);
    const float u = static_cast<float>(r % 20001u) * 1e-4f - 1.0f;  // [-1, 1]
    switch (mode) {
      case 1:
        return static_cast<float>(r % 3u) - 1.0f;
      case 2:
        return 0.0f;
      case 3:
        if (r % 17u == 0) return std::numeric_limits<float>::quiet_NaN();
        if (r % 17u == 1) return (r & 64) ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
        return u;
      case 4:
        if (r % 13u == 0) return (r & 64) ? 3e37f : -1e30f;
        if (r % 13u == 1) return 1e-42f;  // denormal
        return u;
      default:
        return 3.0f * u;
    }
  }
  std::vector<float> vec(std::size_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = next();
    return x;
  }
};

bool moderate(const std::vector<float>& x) {
  for (float e : x)
    if (!(std::abs(e) <= 1e15f)) return false;
  return true;
}

template <class Cache>
struct Snapshot {
  std::vector<Pos> pos;
  std::vector<float> rows;
  std::vector<Pos> next;
  std::size_t used = 0, reserved = 0;
  std::uint64_t ev = 0, mg = 0;
  explicit Snapshot(const Cache& c) {
    const auto& cfg = c.config();
    for (int l = 0; l < cfg.n_layers; ++l) {
      next.push_back(c.next_position(l));
      for (int h = 0; h < cfg.n_kv_heads; ++h) {
        const auto& head = c.backend().head(l, h);
        pos.push_back(-1000 - head.size());
        for (int i = 0; i < head.size(); ++i) {
          pos.push_back(head.pos(i));
          rows.insert(rows.end(), head.key_ptr(i), head.key_ptr(i) + head.key_dim());
          rows.insert(rows.end(), head.value_ptr(i), head.value_ptr(i) + head.value_dim());
        }
      }
    }
    used = c.bytes_used();
    reserved = c.bytes_reserved();
    ev = c.evictions();
    mg = c.merges();
  }
  bool operator==(const Snapshot& o) const {
    return pos == o.pos && next == o.next && used == o.used && reserved == o.reserved && ev == o.ev && mg == o.mg &&
           rows.size() == o.rows.size() &&
           (rows.empty() || std::memcmp(rows.data(), o.rows.data(), rows.size() * sizeof(float)) == 0);
  }
};

struct Sent {
  std::vector<float> k, v;
};

// Runs the operation sequence against one policy. exact_rows: the policy stores K/V rows as sent.
template <class P>
void drive(FuzzedDataProvider& f, const kvtrim::CacheConfig& cfg, const typename P::Params& params, bool exact_rows,
           Values vals) {
  using Cache = kvtrim::KVCache<P>;
  std::unique_ptr<Cache> cache;
  try {
    cache = std::make_unique<Cache>(cfg, params);
  } catch (const kvtrim::Error&) {
    return;  // invalid configuration or parameters: rejected, fine
  }
  const int L = cfg.n_layers, H = cfg.n_kv_heads, Hq = cfg.n_q_heads, d = cfg.head_dim;
  const std::size_t qw = static_cast<std::size_t>(Hq) * d, kw = static_cast<std::size_t>(H) * d;
  const std::size_t reserved = cache->bytes_reserved();
  std::vector<std::map<Pos, Sent>> sent(static_cast<std::size_t>(L));

  auto check = [&](int l, bool outputs_finite, const std::vector<float>& out) {
    FUZZ_ASSERT(cache->bytes_reserved() == reserved);
    for (int h = 0; h < H; ++h) {
      const auto& head = cache->backend().head(l, h);
      FUZZ_ASSERT(head.size() <= head.budget());
      FUZZ_ASSERT(head.evictions() + head.merges() + static_cast<std::uint64_t>(head.size()) == sent[l].size());
      std::vector<Pos> kept;
      for (int i = 0; i < head.size(); ++i) {
        const auto it = sent[l].find(head.pos(i));
        FUZZ_ASSERT(it != sent[l].end());
        kept.push_back(head.pos(i));
        if (exact_rows) {
          FUZZ_ASSERT(std::memcmp(head.key_ptr(i), it->second.k.data() + static_cast<std::size_t>(h) * d,
                                  sizeof(float) * d) == 0);
          FUZZ_ASSERT(std::memcmp(head.value_ptr(i), it->second.v.data() + static_cast<std::size_t>(h) * d,
                                  sizeof(float) * d) == 0);
        }
      }
      std::sort(kept.begin(), kept.end());
      FUZZ_ASSERT(std::adjacent_find(kept.begin(), kept.end()) == kept.end());
      FUZZ_ASSERT(cache->positions(l, h) == kept);
      if (!kept.empty()) FUZZ_ASSERT(kept.back() < cache->next_position(l));
    }
    if (outputs_finite)
      for (float x : out) FUZZ_ASSERT(std::isfinite(x));
  };
  auto rejected = [&](const Snapshot<Cache>& before) { FUZZ_ASSERT(Snapshot<Cache>(*cache) == before); };

  for (int op = 0; op < 400 && f.remaining_bytes() > 0; ++op) {
    const int kind = f.ConsumeIntegralInRange<int>(0, 9);
    int l = f.ConsumeIntegralInRange<int>(0, L - 1);
    if (f.ConsumeIntegralInRange<int>(0, 31) == 0) l = f.ConsumeIntegralInRange<int>(-2, L + 2);  // maybe bad
    if (kind <= 5) {  // decode
      auto q = vals.vec(qw), k = vals.vec(kw), v = vals.vec(kw);
      std::vector<float> out(qw);
      Pos pos = kvtrim::kNextPosition;
      const int pk = f.ConsumeIntegralInRange<int>(0, 7);
      if (l >= 0 && l < L && pk >= 5) pos = cache->next_position(l) + f.ConsumeIntegralInRange<int>(-3, 40);
      if (pk == 7) q.resize(qw + 1);  // wrong size
      const bool ok_inputs = moderate(q) && moderate(k) && moderate(v);
      const Snapshot<Cache> before(*cache);
      try {
        cache->decode(l, q, k, v, out, pos);
      } catch (const kvtrim::Error&) {
        rejected(before);
        continue;
      }
      FUZZ_ASSERT(l >= 0 && l < L && q.size() == qw);
      const Pos p = cache->next_position(l) - 1;
      sent[l][p] = Sent{k, v};
      check(l, cfg.check_finite && ok_inputs, out);
    } else if (kind <= 7) {  // prefill
      const int T = f.ConsumeIntegralInRange<int>(0, 40);
      auto Q = vals.vec(static_cast<std::size_t>(T) * qw), K = vals.vec(static_cast<std::size_t>(T) * kw),
           V = vals.vec(static_cast<std::size_t>(T) * kw);
      if (f.ConsumeIntegralInRange<int>(0, 15) == 0 && !K.empty()) K.pop_back();
      std::vector<float> out(Q.size());
      const bool ok_inputs = moderate(Q) && moderate(K) && moderate(V);
      const Snapshot<Cache> before(*cache);
      try {
        cache->prefill(l, Q, K, V, out);
      } catch (const kvtrim::Error&) {
        rejected(before);
        continue;
      }
      FUZZ_ASSERT(T > 0 && l >= 0 && l < L);
      for (int t = 0; t < T; ++t)
        sent[l][t] = Sent{std::vector<float>(K.begin() + static_cast<std::ptrdiff_t>(t * kw),
                                             K.begin() + static_cast<std::ptrdiff_t>((t + 1) * kw)),
                          std::vector<float>(V.begin() + static_cast<std::ptrdiff_t>(t * kw),
                                             V.begin() + static_cast<std::ptrdiff_t>((t + 1) * kw))};
      check(l, cfg.check_finite && ok_inputs, out);
    } else if (kind == 8) {
      cache->reset();
      for (auto& s : sent) s.clear();
      for (int ll = 0; ll < L; ++ll) check(ll, false, {});
    } else {  // introspection with arbitrary indices
      const int h = f.ConsumeIntegralInRange<int>(-1, H);
      const Snapshot<Cache> before(*cache);
      try {
        (void)cache->size(l, h);
        (void)cache->positions(l, h);
        (void)cache->budget(l, h);
        (void)cache->next_position(l);
      } catch (const kvtrim::Error&) {
      }
      FUZZ_ASSERT(Snapshot<Cache>(*cache) == before);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider f(data, size);
  kvtrim::CacheConfig cfg;
  cfg.n_layers = f.ConsumeIntegralInRange<int>(1, 3);
  cfg.n_kv_heads = f.ConsumeIntegralInRange<int>(1, 3);
  cfg.n_q_heads = cfg.n_kv_heads * f.ConsumeIntegralInRange<int>(1, 3);
  cfg.head_dim = f.ConsumeIntegralInRange<int>(1, 9);
  const int max_b = f.ConsumeIntegralInRange<int>(0, 24);
  if (f.ConsumeBool()) {
    cfg.budget = max_b;
  } else {
    for (int i = 0; i < cfg.n_layers * cfg.n_kv_heads; ++i)
      cfg.head_budgets.push_back(f.ConsumeIntegralInRange<int>(0, std::max(1, max_b)));
  }
  cfg.check_finite = f.ConsumeIntegralInRange<int>(0, 3) != 0;
  Values vals{f.ConsumeIntegral<std::uint32_t>(), f.ConsumeIntegralInRange<int>(0, 4)};
  // A registered policy, its registry parameters, and some fields overridden with fuzzed text.
  static const char* const kTexts[] = {"-1", "0",   "1",    "2",     "3",     "4",   "5",   "8",     "13",
                                       "24", "65",  "0.25", "0.5",   "0.9",   "1.5", "-1",  "nan",   "1e40",
                                       "",   "abc", "true", "false", "mean",  "max", "sum", "key",   "hash",
                                       "avg", "0,1", "1,",  "mass",  "count", "local"};
  const auto names = kvtrim::policy_names();
  const std::string_view name = names[f.ConsumeIntegralInRange<std::size_t>(0, names.size() - 1)];
  kvtrim::with_policy(name, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    auto params = entry.params();
    for (const auto& [key, value] : kvtrim::list_params(params)) {
      if (!f.ConsumeBool()) continue;
      try {
        kvtrim::set_param(params, key, kTexts[f.ConsumeIntegralInRange<std::size_t>(0, std::size(kTexts) - 1)]);
      } catch (const kvtrim::Error&) {  // refused text: the field keeps its value
      }
    }
    if constexpr (kvtrim::Entry<P>::kNeedsBasis) {  // identity bases, sometimes of the wrong shape
      const int bl = f.ConsumeBool() ? cfg.n_layers : f.ConsumeIntegralInRange<int>(1, 3);
      const int bd = f.ConsumeBool() ? cfg.head_dim : f.ConsumeIntegralInRange<int>(1, 9);
      params.basis = std::make_shared<const kvtrim::EigenBasis>(bl, cfg.n_kv_heads, bd);
    }
    // merges rewrite kept rows; a projection (low-rank storage) is not the identity on NaN rows
    constexpr bool exact_rows = !kvtrim::rules::merges<P>() && !kvtrim::Entry<P>::kNeedsBasis;
    drive<P>(f, cfg, params, exact_rows, vals);
  });
  return 0;
}
