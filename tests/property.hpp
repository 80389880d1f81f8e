// The property harness: random sequences of prefill, decode and reset (valid and invalid calls mixed) drive a
// policy side by side with an independent reference model of the cache: a plain std::vector per layer of every
// token the engine sent since the last reset (position, original K and V rows). After every call the cache must
// agree with the model:
//  - outputs: decode equals naive attention over exactly the tokens the policy attends to, worked out from
//    policy.hpp's call order (kBeforeAttention: the tokens kept after the step; kAfterAttention: the tokens
//    kept before the step plus the new one, i.e. the kept ones plus the one evicted this step); prefill equals
//    naive causal attention over the whole prompt;
//  - invariants: size <= budget per head, positions unique and among the tokens sent, every slot's K/V row is
//    the original row of the token at that slot's position (no slot aliasing), evictions + merges = tokens in
//    - tokens kept, bytes reserved never grow, next_position follows the model;
//  - per policy (a Spec, in the policy's own test file): the exact kept set where the rule is score-free,
//    otherwise the protected tokens (sinks / recent window) are kept;
//  - rejected calls (positions going backwards, prefill of a layer that holds tokens, a never-evicting policy
//    over capacity) throw kvtrim::Error and leave the layer bit-for-bit unchanged.
// Shapes are tiny (head_dim 1..8, budgets up to 12) so that >= 10^5 random steps per policy run in CI time.
// A second family of cases turns check_finite off and sprinkles NaN/Inf into q/k/v: selection must still stay
// in bounds and keep every invariant (documented per policy in docs/GUARANTEES.md).
#pragma once

#include <cstring>
#include <optional>
#include <sstream>
#include <string>

#include "testing.hpp"

namespace kvtest::prop {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr long kSteps = 25000;  // sanitizers are ~5x slower: the Release run does the 10^5
#else
inline constexpr long kSteps = 100000;
#endif

using kvtrim::CacheConfig;
using Pos = std::int64_t;

// Fails the test with a message only when the condition is false (a plain Catch REQUIRE per element would
// dominate the run time).
#define PROP_CHECK(cond, msg)                   \
  do {                                          \
    if (!(cond)) {                              \
      std::ostringstream os_;                   \
      os_ << msg;                               \
      FAIL(os_.str() << "  [" #cond "]");       \
    }                                           \
  } while (0)

// ---- the reference model ---------------------------------------------------------------------------------

struct RefToken {
  Pos pos = 0;
  std::vector<float> k, v;  // [n_kv_heads * head_dim] as sent
};

struct RefLayer {
  std::vector<RefToken> tokens;  // every token since the last reset, in arrival order (positions increase)
  Pos next = 0;                  // next default position
  const RefToken* find(Pos p) const {
    auto it = std::lower_bound(tokens.begin(), tokens.end(), p, [](const RefToken& t, Pos x) { return t.pos < x; });
    return it != tokens.end() && it->pos == p ? &*it : nullptr;
  }
  std::vector<Pos> positions() const {
    std::vector<Pos> out;
    for (const auto& t : tokens) out.push_back(t.pos);
    return out;
  }
};

// ---- what each policy promises beyond the common invariants ----------------------------------------------
// A Spec gives, for one policy (`using Policy = ...; kLabel`): random valid parameters (the driver retries when
// the constructor still refuses them); expected(): the exact kept positions (ascending) given the positions sent
// since reset in arrival order, or nullopt for score-based rules; must_keep(): positions the rule protects
// (sinks / recent window); refuses(): whether the policy turns `incoming` tokens away from a head holding `size`
// of `budget`; row_exact(): whether slot i must hold the K/V rows exactly as sent (false once a merge rewrote
// them). SpecBase<P> derives the defaults from the policy's declarations.

using Seen = std::vector<Pos>;

template <class P>
struct SpecBase {
  using Policy = P;
  static constexpr int kMinBudget = 1;
  static constexpr int kMaxBudget = 12;
  static constexpr bool kStoresRowsAsSent = !kvtrim::rules::merges<P>();  // false: merges rewrite stored rows
  // a projection (low-rank storage) spreads one NaN over the whole row
  static constexpr bool kExactOnlyWhenFinite = requires(const P& p) { p.key_width(0); };
  // A policy that never evicts (in the prefill or the decode stage) refuses tokens beyond its budget.
  static bool refuses(int budget, int size, int incoming, bool prefill) {
    const bool never = prefill ? kvtrim::never_evicts_in_prefill<P>() : kvtrim::never_evicts_in_decode<P>();
    return never && size + incoming > budget;
  }
  template <class Params>
  static std::optional<Seen> expected(const Params&, int, const Seen&) {
    return std::nullopt;
  }
  template <class Params>
  static Seen must_keep(const Params&, int, const Seen&) {
    return {};
  }
  template <class Head>
  static bool row_exact(const Head&, int) {
    return true;
  }
};

// Positions p < sinks or p > newest - recent (select.hpp's Protection, counted in positions).
inline Seen protected_positions(const Seen& seen, int sinks, int recent) {
  Seen out;
  if (seen.empty()) return out;
  const Pos newest = seen.back();
  for (Pos p : seen)
    if (p < sinks || p > newest - recent) out.push_back(p);
  return out;
}

// ---- the driver --------------------------------------------------------------------------------------------

// The stored state of one layer: per head, every slot's (position, key row, value row) sorted by position,
// plus the counters. Two snapshots compare equal bit for bit.
struct HeadSnap {
  std::vector<Pos> pos;
  std::vector<std::vector<float>> k, v;
  std::uint64_t evictions = 0, merges = 0;
  bool operator==(const HeadSnap& o) const {
    if (pos != o.pos || evictions != o.evictions || merges != o.merges || k.size() != o.k.size()) return false;
    for (std::size_t i = 0; i < k.size(); ++i)
      if (k[i].size() != o.k[i].size() || v[i].size() != o.v[i].size() ||
          std::memcmp(k[i].data(), o.k[i].data(), k[i].size() * sizeof(float)) != 0 ||
          std::memcmp(v[i].data(), o.v[i].data(), v[i].size() * sizeof(float)) != 0)
        return false;
    return true;
  }
};

inline bool all_finite(const float* x, int n) {
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

template <class Spec>
class Driver {
  using P = typename Spec::Policy;
  using Cache = kvtrim::KVCache<P>;

 public:
  Driver(std::uint64_t seed, bool nonfinite) : rng_(seed), seed_(seed), nonfinite_(nonfinite) {
    cfg_.n_layers = rng_.uniform_int(1, 2);
    cfg_.n_kv_heads = rng_.uniform_int(1, 3);
    cfg_.n_q_heads = cfg_.n_kv_heads * rng_.uniform_int(1, 3);
    const int dims[] = {1, 2, 4, 8};
    cfg_.head_dim = dims[rng_.uniform_int(0, 3)];
    cfg_.check_finite = !nonfinite;
    const int max_b = rng_.uniform_int(Spec::kMinBudget, Spec::kMaxBudget);
    if (rng_.uniform_int(0, 1)) {
      cfg_.budget = max_b;
    } else {
      for (int i = 0; i < cfg_.n_layers * cfg_.n_kv_heads; ++i)
        cfg_.head_budgets.push_back(rng_.uniform_int(Spec::kMinBudget, max_b));
    }
    int min_b = max_b;
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (int h = 0; h < cfg_.n_kv_heads; ++h) min_b = std::min(min_b, cfg_.budget_of(l, h));
    for (int attempt = 0; attempt < 100 && !cache_; ++attempt) {
      params_ = Spec::params(rng_, cfg_, min_b);
      try {
        cache_.emplace(cfg_, params_);
      } catch (const kvtrim::Error&) {  // a combination the Spec's ranges do not rule out: draw again
      }
    }
    if (!cache_) FAIL(where() << ": no valid parameters found");
    ref_.resize(static_cast<std::size_t>(cfg_.n_layers));
    scale_ = rng_.uniform_int(0, 3) == 0 ? 4.0f : 1.0f;  // sometimes peaky softmax
    for (int l = 0; l < cfg_.n_layers; ++l)
      for (int h = 0; h < cfg_.n_kv_heads; ++h) {
        const auto& head = cache_->backend().head(l, h);
        reserved_ += static_cast<std::size_t>(head.budget() + 1) * head.bytes_per_slot();
      }
  }

  // Runs random operations until `steps` tokens went through the cache (decode calls + prompt tokens).
  long run(long steps) {
    while (steps_ < steps) {
      ++ops_;
      const int l = rng_.uniform_int(0, cfg_.n_layers - 1);
      const int r = rng_.uniform_int(0, 999);
      // A policy that refuses tokens when full (FullCache) would spend most calls on errors: start over often.
      if (r < 4 || (refused(l, 1, false) && r < 250)) {
        do_reset();
      } else if (r < 60) {
        do_prefill(l);
      } else if (r < 80) {
        do_decode(l, ref_[l].next - 1 - rng_.uniform_int(0, 3));  // backwards (or -1 = default when empty)
      } else if (r < 250) {
        do_decode(l, ref_[l].next + rng_.uniform_int(0, 5));  // explicit position, maybe with a gap
      } else {
        do_decode(l, std::nullopt);
      }
    }
    return steps_;
  }

 private:
  std::string where() const {
    std::ostringstream os;
    os << Spec::kLabel << " seed " << seed_ << " op " << ops_ << " (layers " << cfg_.n_layers << ", kv "
       << cfg_.n_kv_heads << ", q " << cfg_.n_q_heads << ", d " << cfg_.head_dim << ", budget " << cfg_.budget
       << ", head_budgets " << cfg_.head_budgets.size() << ")";
    return os.str();
  }

  std::vector<float> row(std::size_t n, float scale) {
    auto x = rng_.normal(n, scale);
    if (nonfinite_)
      for (auto& e : x) {
        const int r = rng_.uniform_int(0, 39);
        if (r == 0) e = std::numeric_limits<float>::quiet_NaN();
        if (r == 1) e = std::numeric_limits<float>::infinity();
        if (r == 2) e = -std::numeric_limits<float>::infinity();
      }
    return x;
  }

  HeadSnap snap(int l, int h) const {
    const auto& head = cache_->backend().head(l, h);
    std::vector<int> order(static_cast<std::size_t>(head.size()));
    for (int i = 0; i < head.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return head.pos(a) < head.pos(b); });
    HeadSnap s;
    for (int i : order) {
      s.pos.push_back(head.pos(i));
      s.k.emplace_back(head.key_ptr(i), head.key_ptr(i) + head.key_dim());
      s.v.emplace_back(head.value_ptr(i), head.value_ptr(i) + head.value_dim());
    }
    s.evictions = head.evictions();
    s.merges = head.merges();
    return s;
  }
  std::vector<HeadSnap> snap_layer(int l) const {
    std::vector<HeadSnap> s;
    for (int h = 0; h < cfg_.n_kv_heads; ++h) s.push_back(snap(l, h));
    return s;
  }

  void do_reset() {
    cache_->reset();
    for (auto& r : ref_) r = RefLayer{};
    for (int l = 0; l < cfg_.n_layers; ++l) check_layer(l);
  }

  bool refused(int l, int incoming, bool prefill) const {
    for (int h = 0; h < cfg_.n_kv_heads; ++h)
      if (Spec::refuses(cfg_.budget_of(l, h), cache_->size(l, h), incoming, prefill)) return true;
    return false;
  }

  void do_decode(int l, std::optional<Pos> explicit_pos) {
    RefLayer& ref = ref_[l];
    const int d = cfg_.head_dim, H = cfg_.n_kv_heads, Hq = cfg_.n_q_heads, g = cfg_.group_size();
    auto q = row(static_cast<std::size_t>(Hq) * d, scale_);
    auto k = row(static_cast<std::size_t>(H) * d, scale_);
    auto v = row(static_cast<std::size_t>(H) * d, 1.0f);
    std::vector<float> out(q.size(), -7.0f);
    if (explicit_pos && *explicit_pos == kvtrim::kNextPosition) explicit_pos.reset();
    const Pos pos = explicit_pos ? *explicit_pos : ref.next;
    const bool backwards = pos < ref.next, refuse = refused(l, 1, false);
    // The positions before the step (for kAfterAttention), and the stored rows when the policy rewrites them.
    std::vector<HeadSnap> before;
    if (backwards || refuse || !Spec::kStoresRowsAsSent) {
      before = snap_layer(l);
    } else {
      for (int h = 0; h < H; ++h) before.push_back(HeadSnap{cache_->positions(l, h), {}, {}, 0, 0});
    }
    if (backwards || refuse) {
      try {
        cache_->decode(l, q, k, v, out, explicit_pos ? *explicit_pos : kvtrim::kNextPosition);
        FAIL(where() << ": decode at position " << pos << " was accepted (expected: "
                     << (backwards ? "backwards error" : "capacity error") << ")");
      } catch (const kvtrim::Error& e) {
        const std::string msg = e.what();
        PROP_CHECK(msg.find(backwards ? "goes backwards" : "never evicts") != std::string::npos,
                   where() << ": unexpected message " << msg);
      }
      PROP_CHECK(snap_layer(l) == before, where() << ": rejected decode changed the layer");
      PROP_CHECK(cache_->next_position(l) == ref.next, where() << ": rejected decode moved next_position");
      return;
    }
    cache_->decode(l, q, k, v, out, explicit_pos ? *explicit_pos : kvtrim::kNextPosition);
    ref.tokens.push_back({pos, k, v});
    ref.next = pos + 1;
    ++steps_;
    check_layer(l);
    // Which tokens this step attended to, per the declared timing.
    for (int h = 0; h < H; ++h) {
      std::vector<Pos> att;
      if constexpr (P::kTiming == kvtrim::EvictTiming::kBeforeAttention) {
        att = cache_->positions(l, h);
      } else {
        att = before[h].pos;
        att.push_back(pos);
      }
      std::vector<const float*> keys, values;
      bool finite = true;
      for (std::size_t j = 0; j < att.size(); ++j) {
        const Pos p = att[j];
        const RefToken* t = ref.find(p);
        PROP_CHECK(t != nullptr, where() << ": attended position " << p << " was never sent");
        if (!Spec::kStoresRowsAsSent && P::kTiming == kvtrim::EvictTiming::kAfterAttention && p != pos) {
          keys.push_back(before[h].k[j].data());  // the rows as stored before the step (merges rewrite them)
          values.push_back(before[h].v[j].data());
        } else {
          keys.push_back(t->k.data() + static_cast<std::size_t>(h) * d);
          values.push_back(t->v.data() + static_cast<std::size_t>(h) * d);
        }
        finite = finite && all_finite(keys.back(), d) && all_finite(values.back(), d);
      }
      for (int gi = 0; gi < g; ++gi) {
        const int qh = h * g + gi;
        const float* qp = q.data() + static_cast<std::size_t>(qh) * d;
        if (!finite || !all_finite(qp, d)) continue;  // NaN/Inf in play: only the invariants apply
        const auto want = naive_attention(qp, keys, values, d);
        for (int i = 0; i < d; ++i)
          PROP_CHECK(std::abs(out[static_cast<std::size_t>(qh) * d + i] - want[i]) <= 5e-5 * (1.0 + std::abs(want[i])),
                     where() << ": decode output of query head " << qh << " [" << i << "] = "
                             << out[static_cast<std::size_t>(qh) * d + i] << ", naive attention over "
                             << att.size() << " tokens gives " << want[i]);
      }
    }
  }

  void do_prefill(int l) {
    RefLayer& ref = ref_[l];
    const int d = cfg_.head_dim, H = cfg_.n_kv_heads, Hq = cfg_.n_q_heads, g = cfg_.group_size();
    int max_b = 0;
    for (int h = 0; h < H; ++h) max_b = std::max(max_b, cfg_.budget_of(l, h));
    const int T = rng_.uniform_int(1, 3 * max_b + 2);
    std::vector<std::vector<float>> qs, ks, vs;
    for (int t = 0; t < T; ++t) {
      qs.push_back(row(static_cast<std::size_t>(Hq) * d, scale_));
      ks.push_back(row(static_cast<std::size_t>(H) * d, scale_));
      vs.push_back(row(static_cast<std::size_t>(H) * d, 1.0f));
    }
    const auto Q = Tokens::rows(qs, 0, T), K = Tokens::rows(ks, 0, T), V = Tokens::rows(vs, 0, T);
    std::vector<float> out(Q.size(), -7.0f);
    const bool busy = ref.next != 0, refuse = refused(l, T, true);
    if (busy || refuse) {
      const auto before = snap_layer(l);
      try {
        cache_->prefill(l, Q, K, V, out);
        FAIL(where() << ": prefill of " << T << " tokens was accepted (expected an error)");
      } catch (const kvtrim::Error& e) {
        const std::string msg = e.what();
        PROP_CHECK(msg.find(busy ? "already holds" : "never evicts") != std::string::npos,
                   where() << ": unexpected message " << msg);
      }
      PROP_CHECK(snap_layer(l) == before, where() << ": rejected prefill changed the layer");
      return;
    }
    cache_->prefill(l, Q, K, V, out);
    for (int t = 0; t < T; ++t) ref.tokens.push_back({t, ks[t], vs[t]});
    ref.next = T;
    steps_ += T;
    check_layer(l);
    // Exact causal attention over the whole prompt, for every prompt token.
    for (int h = 0; h < H; ++h) {
      std::vector<const float*> keys, values;
      // A non-finite value row anywhere in the prompt may reach earlier rows' outputs too: the CPU backend
      // multiplies masked (zero) probabilities by it, and 0 * NaN = NaN (documented in GUARANTEES.md).
      bool finite = true;
      for (int t = 0; t < T; ++t) finite = finite && all_finite(vs[t].data() + static_cast<std::size_t>(h) * d, d);
      for (int t = 0; t < T; ++t) {
        keys.push_back(ks[t].data() + static_cast<std::size_t>(h) * d);
        values.push_back(vs[t].data() + static_cast<std::size_t>(h) * d);
        finite = finite && all_finite(keys.back(), d) && all_finite(values.back(), d);
        if (!finite) break;  // later rows see this token too
        for (int gi = 0; gi < g; ++gi) {
          const int qh = h * g + gi;
          const float* qp = qs[t].data() + static_cast<std::size_t>(qh) * d;
          if (!all_finite(qp, d)) continue;
          const auto want = naive_attention(qp, keys, values, d);
          const float* got = out.data() + static_cast<std::size_t>(t) * Hq * d + static_cast<std::size_t>(qh) * d;
          for (int i = 0; i < d; ++i)
            PROP_CHECK(std::abs(got[i] - want[i]) <= 5e-5 * (1.0 + std::abs(want[i])),
                       where() << ": prefill output of token " << t << " query head " << qh << " [" << i
                               << "] = " << got[i] << ", naive gives " << want[i]);
        }
      }
    }
  }

  // Invariants of one layer against the model.
  void check_layer(int l) {
    const RefLayer& ref = ref_[l];
    const std::vector<Pos> seen = ref.positions();
    PROP_CHECK(cache_->next_position(l) == ref.next,
               where() << ": next_position " << cache_->next_position(l) << ", model says " << ref.next);
    for (int h = 0; h < cfg_.n_kv_heads; ++h) {
      const auto& head = cache_->backend().head(l, h);
      const int budget = cfg_.budget_of(l, h);
      PROP_CHECK(head.budget() == budget && cache_->budget(l, h) == budget, where() << ": budget changed");
      PROP_CHECK(head.size() <= budget, where() << ": layer " << l << " head " << h << " holds " << head.size()
                                                << " tokens over its budget " << budget);
      PROP_CHECK(cache_->size(l, h) == head.size(), where() << ": size() disagrees with the store");
      PROP_CHECK(head.key_dim() == cfg_.head_dim && head.value_dim() == cfg_.head_dim, where() << ": row width");
      std::vector<Pos> kept;
      for (int i = 0; i < head.size(); ++i) {
        const Pos p = head.pos(i);
        kept.push_back(p);
        const RefToken* t = ref.find(p);
        PROP_CHECK(t != nullptr, where() << ": layer " << l << " head " << h << " slot " << i << " has position "
                                         << p << ", which was never sent (since the last reset)");
        const std::size_t off = static_cast<std::size_t>(h) * cfg_.head_dim;
        if (!Spec::kStoresRowsAsSent || !Spec::row_exact(head, i) || (nonfinite_ && Spec::kExactOnlyWhenFinite))
          continue;
        PROP_CHECK(std::memcmp(head.key_ptr(i), t->k.data() + off, sizeof(float) * cfg_.head_dim) == 0 &&
                       std::memcmp(head.value_ptr(i), t->v.data() + off, sizeof(float) * cfg_.head_dim) == 0,
                   where() << ": layer " << l << " head " << h << " slot " << i << " (position " << p
                           << ") does not hold that token's own K/V rows");
      }
      std::sort(kept.begin(), kept.end());
      PROP_CHECK(std::adjacent_find(kept.begin(), kept.end()) == kept.end(), where() << ": a position is kept twice");
      PROP_CHECK(cache_->positions(l, h) == kept, where() << ": positions() disagrees with the slots");
      PROP_CHECK(head.evictions() + head.merges() + static_cast<std::uint64_t>(head.size()) == seen.size(),
                 where() << ": layer " << l << " head " << h << ": " << seen.size() << " tokens in, "
                         << head.size() << " kept, " << head.evictions() << " evicted, " << head.merges()
                         << " merged");
      if (const auto want = Spec::expected(params_, budget, seen)) {
        PROP_CHECK(kept == *want, where() << ": layer " << l << " head " << h << " keeps " << kept.size()
                                          << " tokens, the policy's rule keeps " << want->size()
                                          << " (first difference at "
                                          << (std::mismatch(kept.begin(), kept.end(), want->begin(), want->end())
                                                  .first - kept.begin())
                                          << ")");
      }
      for (Pos p : Spec::must_keep(params_, budget, seen))
        PROP_CHECK(std::binary_search(kept.begin(), kept.end(), p),
                   where() << ": protected position " << p << " was evicted from layer " << l << " head " << h);
    }
    PROP_CHECK(cache_->bytes_reserved() == reserved_,
               where() << ": bytes_reserved " << cache_->bytes_reserved() << " != budget-sized " << reserved_);
  }

  Rng rng_;
  std::uint64_t seed_;
  bool nonfinite_;
  CacheConfig cfg_;
  typename P::Params params_{};
  std::optional<Cache> cache_;
  std::vector<RefLayer> ref_;
  std::size_t reserved_ = 0;
  float scale_ = 1.0f;
  long steps_ = 0, ops_ = 0;
};

// Many short runs (fresh random shape, budgets and parameters each) until `total` tokens went through.
template <class Spec>
long run_many(std::uint64_t seed, long total, bool nonfinite) {
  long done = 0;
  for (std::uint64_t run = 0; done < total; ++run) {
    Driver<Spec> drv(seed * 1000003u + run, nonfinite);
    done += drv.run(std::min<long>(4000, total - done));
  }
  return done;
}


inline kvtrim::GroupReduce any_reduce(Rng& rng) { return static_cast<kvtrim::GroupReduce>(rng.uniform_int(0, 2)); }

// The two standard runs of a Spec: 10^5 random steps, then 2 * 10^4 with check_finite off and NaN/Inf inputs.
template <class Spec>
void require_properties(std::uint64_t seed) {
  REQUIRE(run_many<Spec>(seed, kSteps, false) >= kSteps);
  REQUIRE(run_many<Spec>(seed + 1, kSteps / 5, true) >= kSteps / 5);
}

}  // namespace kvtest::prop
