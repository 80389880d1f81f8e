// CUDA backend, the parts that need no GPU: the arithmetic the kernels share with the host (kernel_math.hpp),
// the device selection algorithm replayed on the host with the DevicePolicy hooks against the CPU backend,
// and the no-device error. Compiled by the host compiler.
#include <kvtrim/cuda/check.hpp>
#include <kvtrim/cuda/device_policies.hpp>
#include <kvtrim/cuda/kernel_math.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "policies.hpp"
#include "testing.hpp"

using kvtrim::gpu::SoftmaxPartial;
using kvtrim::gpu::VictimKey;

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

TEST_CASE("A tree reduction with better_victim finds select.hpp's victim", "[cuda][math]") {
  kvtest::Rng rng(12);
  struct Meta {
    float score;
  };
  for (int trial = 0; trial < 300; ++trial) {
    const int n = rng.uniform_int(1, 120);
    kvtrim::HeadStore<Meta> h(1, 1, n);
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
    const int want = kvtrim::lowest_unprotected(h, pr, [&](int i) { return h.meta(i).score; });
    // the kernel's shape: strided per-thread scans, then a pairwise tree over the thread results
    const int threads = 1 << rng.uniform_int(0, 6);
    std::vector<VictimKey> acc(static_cast<std::size_t>(threads));
    for (int i = 0; i < n; ++i) {
      if (pr.protects(h.pos(i), h.newest_pos())) continue;
      auto& a = acc[static_cast<std::size_t>(i % threads)];
      a = kvtrim::gpu::better_victim(a, VictimKey{h.meta(i).score, h.pos(i), i});
    }
    for (int stride = threads / 2; stride > 0; stride /= 2)
      for (int t = 0; t < stride; ++t) acc[t] = kvtrim::gpu::better_victim(acc[t], acc[t + stride]);
    REQUIRE(acc[0].slot == want);
  }
}

TEST_CASE("Prompt sort keys order tokens as evicts_before does", "[cuda][math]") {
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
    REQUIRE((kvtrim::gpu::prompt_sort_key(a, ta) < kvtrim::gpu::prompt_sort_key(b, tb)) == want);
  }
  REQUIRE(kvtrim::gpu::sort_key_token(kvtrim::gpu::prompt_sort_key(-2.5f, 123456)) == 123456);
  REQUIRE(kvtrim::gpu::sort_key_protected(kvtrim::gpu::prompt_sort_key(INFINITY, 7)));
  REQUIRE_FALSE(kvtrim::gpu::sort_key_protected(kvtrim::gpu::prompt_sort_key(3e38f, 7)));
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

namespace {

// Softmax of the scaled dot products of q with keys[0..n) (double; the kernels use fp32, so scores that
// depend on attention agree with them up to rounding).
std::vector<double> probabilities(const float* q, const std::vector<const float*>& keys, int d) {
  std::vector<double> p(keys.size());
  double m = -INFINITY, z = 0;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    double dot = 0;
    for (int e = 0; e < d; ++e) dot += double(q[e]) * keys[j][e];
    p[j] = dot / std::sqrt(double(d));
    m = std::max(m, p[j]);
  }
  for (double& x : p) z += (x = std::exp(x - m));
  for (double& x : p) x /= z;
  return p;
}

// The device algorithm of cuda_backend.cuh for one layer with one KV head (group = every query head), step by
// step on the host with the same DevicePolicy hooks, the same SimHash codes, the same prompt sums (col, win,
// vote) and the same selection arithmetic (prompt sort keys, better_victim). Attention is recomputed here in
// double from the original keys.
template <class P>
struct EmulatedHead {
  using DP = kvtrim::gpu::DevicePolicy<P>;
  typename DP::State state;
  int budget = 0, limit = 0, prompt_limit = 0, window = 0, vote_window = 0, group = 1, d = 0;
  std::vector<std::int64_t> pos;
  std::vector<typename P::SlotMeta> meta;
  std::vector<std::vector<float>> krow, vrow;  // the slots' rows (merges change them)
  std::int64_t newest = -1;
  const kvtest::Tokens* tok = nullptr;  // token t's key is tok->k[t], its g queries tok->q[t]
  const P* policy = nullptr;  // the CPU policy (kHostPrompt runs its on_prompt, as the backend does)
  std::vector<float> proj;              // kSimHash: the layer's projection
  int bits = 0;
  int merges = 0;

  EmulatedHead(const P& pol, const typename P::Params& params, int head_budget, int g, int dim,
               const kvtest::Tokens& t)
      : state(DP::initial(pol, params, head_budget, g)),
        budget(head_budget),
        limit(DP::keep_limit(pol, head_budget)),
        prompt_limit(kvtrim::gpu::traits::prompt_limit<DP>(pol, head_budget)),
        window(pol.prompt_window()),
        vote_window(kvtrim::gpu::traits::vote_window<DP>(pol)),
        group(g),
        d(dim),
        tok(&t),
        policy(&pol) {
    if constexpr (kvtrim::gpu::traits::simhash<DP>()) {
      const auto pr = DP::projection(pol, dim);
      proj.assign(pr.data(), pr.data() + static_cast<std::size_t>(pr.bits()) * pr.dim());
      bits = pr.bits();
    }
  }
  const float* key(std::int64_t t) const { return tok->k[static_cast<std::size_t>(t)].data(); }
  void add(std::int64_t t, const typename P::SlotMeta& m) {
    pos.push_back(t), meta.push_back(m);
    krow.emplace_back(key(t), key(t) + d);
    vrow.emplace_back(tok->v[static_cast<std::size_t>(t)].begin(), tok->v[static_cast<std::size_t>(t)].begin() + d);
  }
  void remove_at(std::size_t i) {  // the last slot moves into the hole, as on the device
    pos[i] = pos.back(), meta[i] = meta.back(), krow[i] = krow.back(), vrow[i] = vrow.back();
    pos.pop_back(), meta.pop_back(), krow.pop_back(), vrow.pop_back();
  }
  void keep_flagged(const std::vector<char>& keep, const std::vector<typename P::SlotMeta>& new_meta) {
    std::size_t w = 0;
    for (std::size_t i = 0; i < pos.size(); ++i) {
      if (!keep[i]) continue;
      pos[w] = pos[i], meta[w] = new_meta[i], krow[w] = krow[i], vrow[w] = vrow[i];
      ++w;
    }
    pos.resize(w), meta.resize(w), krow.resize(w), vrow.resize(w);
  }
  const float* query(std::int64_t t) const { return tok->q[static_cast<std::size_t>(t)].data(); }
  std::uint64_t code(const float* x) const {
    return bits > 0 ? kvtrim::simhash_code(proj.data(), d, bits, x) : 0;
  }
  void insert(typename P::SlotMeta& m, std::int64_t t, bool prefill, bool with_queries) {
    kvtrim::gpu::TokenInputs in;
    in.key = key(t);
    in.d = d;
    in.group = group;
    in.prefill = prefill;
    std::vector<std::uint64_t> qc;
    if (bits > 0) {
      in.key_code = code(key(t));
      if (with_queries) {
        for (int g = 0; g < group; ++g) qc.push_back(code(query(t) + static_cast<std::size_t>(g) * d));
        in.q_codes = qc.data();
      }
    }
    DP::on_insert(state, m, t, in);
  }

  void prefill(int T) {
    std::vector<typename P::SlotMeta> m(static_cast<std::size_t>(T));
    for (int t = 0; t < T; ++t) insert(m[t], t, true, t == T - 1);
    newest = T - 1;
    // prompt sums [group x T]: every query, the last `window` ones, the last `vote_window` ones
    std::vector<float> col(static_cast<std::size_t>(group) * T), win(col.size()), vote(col.size());
    std::vector<const float*> keys;
    for (int t = 0; t < T; ++t) {
      keys.push_back(key(t));
      for (int g = 0; g < group; ++g) {
        const auto pr = probabilities(query(t) + static_cast<std::size_t>(g) * d, keys, d);
        for (int j = 0; j <= t; ++j) {
          const std::size_t at = static_cast<std::size_t>(g) * T + j;
          col[at] += static_cast<float>(pr[j]);
          if (t >= T - window) win[at] += static_cast<float>(pr[j]);
          if (t >= T - vote_window) vote[at] += static_cast<float>(pr[j]);
        }
      }
    }
    const kvtrim::gpu::PromptSums sums{
        {col.data(), T, group, T}, {win.data(), T, group, T}, {vote.data(), T, group, T}};
    if constexpr (kvtrim::gpu::traits::host_prompt<DP>()) {
      // the backend's host path: the CPU policy's hooks on a host copy of the prompt, with these sums
      kvtrim::HeadStore<typename P::SlotMeta> hs(d, d, budget);
      hs.reserve(T + 1);
      typename P::HeadState hst;
      P pol = *policy;
      for (int t = 0; t < T; ++t) {
        kvtrim::StepContext step{0, 0, group, d, t, -1, query(t), true};
        step.slot = hs.append(key(t), tok->v[static_cast<std::size_t>(t)].data(), t);
        pol.on_insert(hst, hs, step);
      }
      pol.on_prompt(hst, hs,
                    kvtrim::PromptContext{0, 0, group, T, col.data(), window > 0 ? win.data() : nullptr, window});
      for (int i = 0; i < hs.size(); ++i) {
        add(hs.pos(i), hs.meta(i));
        krow.back().assign(hs.key_ptr(i), hs.key_ptr(i) + d);
        vrow.back().assign(hs.value_ptr(i), hs.value_ptr(i) + d);
      }
      state = DP::after_host_prompt(state, hst, budget, limit);
      return;
    } else if constexpr (kvtrim::gpu::traits::structured<DP>()) {
      for (int t = 0; t < T; ++t) {
        (void)DP::prompt_score(state, m[t], t, sums);
        add(t, m[t]);
      }
      fit();
      return;
    } else {
    std::vector<std::uint64_t> keys_sorted;
    for (int t = 0; t < T; ++t) {
      const float sc = DP::prompt_score(state, m[t], t, sums);
      const bool prot = kvtrim::gpu::traits::prompt_protects<DP>(state, m[t], t, newest);
      keys_sorted.push_back(kvtrim::gpu::prompt_sort_key(prot ? INFINITY : sc, t));
    }
    std::sort(keys_sorted.begin(), keys_sorted.end());
    std::vector<char> keep(static_cast<std::size_t>(T), 1);
    for (int i = 0; i < T - std::min(T, prompt_limit); ++i) {
      REQUIRE_FALSE(kvtrim::gpu::sort_key_protected(keys_sorted[i]));
      keep[kvtrim::gpu::sort_key_token(keys_sorted[i])] = 0;
    }
    for (int t = 0; t < T; ++t)
      if (keep[t]) add(t, m[t]);
    }
  }
  // Structured eviction: passes of fit_key then fit_slot over every slot, survivors kept, while needs_fit.
  void fit() {
    if constexpr (kvtrim::gpu::traits::structured<DP>()) {
      while (DP::needs_fit(state, static_cast<int>(pos.size()))) {
        const int n = static_cast<int>(pos.size());
        std::vector<int> keys(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) keys[i] = DP::fit_key(state, pos.data(), meta.data(), n, i);
        std::vector<char> keep(static_cast<std::size_t>(n));
        std::vector<typename P::SlotMeta> out(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) keep[i] = DP::fit_slot(state, meta.data(), keys.data(), n, i, out[i]) ? 1 : 0;
        keep_flagged(keep, out);
        REQUIRE(static_cast<int>(pos.size()) < n);
      }
    }
  }
  // kMerges: statistics, the lowest merge_score victim, its most similar absorbing slot (fp32 cosine of the
  // rows), a weighted merge when the cosine reaches the threshold, then removal (merge_evict_kernel's steps).
  void merge_evict() {
    if constexpr (kvtrim::gpu::traits::merges<DP>()) {
      while (static_cast<int>(pos.size()) > limit) {
        typename DP::Stats st{};
        for (const auto& m : meta) st = DP::combine(st, DP::stats_of(m));
        VictimKey best;
        for (std::size_t i = 0; i < pos.size(); ++i)
          if (!DP::protects(state, meta[i], pos[i], newest))
            best = kvtrim::gpu::better_victim(
                best, VictimKey{DP::merge_score(state, st, meta[i]), pos[i], static_cast<int>(i)});
        REQUIRE(best.slot >= 0);
        const std::size_t v = static_cast<std::size_t>(best.slot);
        int target = -1;
        if (DP::may_merge(state, st, meta[v])) {
          auto norm = [&](const std::vector<float>& x) {
            float sq = 0.0f;
            for (float e : x) sq += e * e;
            return std::sqrt(sq);
          };
          float best_cos = 0.0f;
          for (std::size_t c = 0; c < pos.size(); ++c) {
            if (c == v || !DP::absorbs(state, meta[c], pos[c])) continue;
            float dot = 0.0f;
            for (int e = 0; e < d; ++e) dot += krow[c][e] * krow[v][e];
            const float cs = kvtrim::ems_cosine_from(dot, norm(krow[c]), norm(krow[v]));
            if (target < 0 || cs > best_cos || (cs == best_cos && pos[c] < pos[static_cast<std::size_t>(target)]))
              target = static_cast<int>(c), best_cos = cs;
          }
          if (target >= 0 && !(best_cos >= DP::merge_threshold(state))) target = -1;
        }
        if (target >= 0) {
          const std::size_t t = static_cast<std::size_t>(target);
          const auto mix = kvtrim::ems_mix_weights(DP::merge_weight(state, meta[t]), DP::merge_weight(state, meta[v]));
          for (int e = 0; e < d; ++e) {
            if (DP::merges_keys(state)) krow[t][e] = kvtrim::ems_mix(mix, krow[t][e], krow[v][e]);
            vrow[t][e] = kvtrim::ems_mix(mix, vrow[t][e], vrow[v][e]);
          }
          DP::merge_meta(meta[t], meta[v]);
          ++merges;
        }
        remove_at(v);
      }
    }
  }
  void evict() {
    if constexpr (kvtrim::gpu::traits::merges<DP>()) {
      merge_evict();
    } else if constexpr (kvtrim::gpu::traits::structured<DP>()) {
      fit();
    } else {
      while (static_cast<int>(pos.size()) > limit) {
        VictimKey best;
        for (std::size_t i = 0; i < pos.size(); ++i)
          if (!DP::protects(state, meta[i], pos[i], newest))
            best = kvtrim::gpu::better_victim(
                best, VictimKey{DP::score(state, meta[i], pos[i], newest), pos[i], static_cast<int>(i)});
        REQUIRE(best.slot >= 0);
        remove_at(static_cast<std::size_t>(best.slot));
      }
    }
  }
  void decode(std::int64_t p) {
    add(p, {});
    newest = std::max(newest, p);
    insert(meta.back(), p, false, true);
    if constexpr (P::kTiming == kvtrim::EvictTiming::kBeforeAttention) evict();
    if constexpr (has(P::kSignals, kvtrim::Signals::kAttention)) {
      const int n = static_cast<int>(pos.size());
      std::vector<const float*> keys;
      for (const auto& row : krow) keys.push_back(row.data());
      std::vector<float> rows(static_cast<std::size_t>(group) * n);
      for (int g = 0; g < group; ++g) {
        const auto pr = probabilities(query(p) + static_cast<std::size_t>(g) * d, keys, d);
        for (int j = 0; j < n; ++j) rows[static_cast<std::size_t>(g) * n + j] = static_cast<float>(pr[j]);
      }
      const kvtrim::AttentionRows r{rows.data(), n, group, n};
      for (int i = 0; i < n; ++i) DP::on_attention(state, meta[i], i, r);
    }
    if constexpr (P::kTiming == kvtrim::EvictTiming::kAfterAttention) evict();
  }
  std::vector<std::int64_t> sorted() const {
    auto p = pos;
    std::sort(p.begin(), p.end());
    return p;
  }
};

// One layer, one KV head with `group` query heads of width d; the emulated device algorithm must keep exactly
// the CPU backend's positions after the prompt and after every decode step.
template <class P>
void check_emulation_matches_cpu(const typename P::Params& params, int budget, int prompt, int total,
                                 int group = 2, int d = 4) {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = group, .head_dim = d, .budget = budget};
  kvtrim::KVCache<P> cpu(cfg, params);
  kvtest::Tokens tok(cfg, total, 5);
  EmulatedHead<P> emu(cpu.policy(0), params, budget, group, d, tok);
  if (prompt > 0) {
    auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
         V = kvtest::Tokens::rows(tok.v, 0, prompt);
    std::vector<float> out(Q.size());
    cpu.prefill(0, Q, K, V, out);
    emu.prefill(prompt);
    REQUIRE(emu.sorted() == cpu.positions(0, 0));
  }
  const std::uint64_t prompt_merges = cpu.merges();
  std::vector<float> out(static_cast<std::size_t>(group) * d);
  for (int t = prompt; t < total; ++t) {
    cpu.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    emu.decode(t);
    REQUIRE(emu.sorted() == cpu.positions(0, 0));
  }
  REQUIRE(static_cast<std::uint64_t>(emu.merges) == cpu.merges() - prompt_merges);
}

}  // namespace

TEST_CASE("The device selection algorithm keeps what the CPU backend keeps", "[cuda][emulation]") {
  SECTION("StreamingLLM, prompt longer than the budget, window = rest") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 4}, 16, 40, 120);
  }
  SECTION("StreamingLLM, explicit window smaller than the budget, decode only") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 2, .window = 5}, 12, 0, 60);
  }
  SECTION("StreamingLLM, no sinks, short prompt") {
    check_emulation_matches_cpu<kvtrim::StreamingLLM>({.sinks = 0}, 8, 3, 50);
  }
  SECTION("FullCache") { check_emulation_matches_cpu<kvtrim::FullCache>({}, 64, 20, 64); }
  SECTION("L2Norm, prompt longer than the budget") {
    check_emulation_matches_cpu<kvtrim::L2Norm>({.sinks = 2, .recent = 3}, 16, 40, 120);
  }
  SECTION("L2Norm, no protection, decode only") { check_emulation_matches_cpu<kvtrim::L2Norm>({}, 10, 0, 80); }
  SECTION("L2Norm, skipped layer (oldest non-sink)") {
    check_emulation_matches_cpu<kvtrim::L2Norm>({.sinks = 3, .skip_layers = {0}}, 12, 30, 90);
  }
  SECTION("H2O (accumulated attention, prompt column sums), group 4") {
    check_emulation_matches_cpu<kvtrim::H2O>({.heavy_ratio = 0.5, .sinks = 2}, 24, 50, 160, 4, 16);
  }
  SECTION("TOVA (last prompt row, then each step's attention)") {
    check_emulation_matches_cpu<kvtrim::TOVA>({.recent = 1}, 20, 45, 140, 2, 16);
  }
  SECTION("HashEvict, query probe, recent+global prompt") {
    check_emulation_matches_cpu<kvtrim::HashEvict>({.bits = 16, .sinks = 3, .recent = 4}, 20, 50, 200, 4, 16);
  }
  SECTION("HashEvict, key probe, hashed prompt, 64 bits") {
    check_emulation_matches_cpu<kvtrim::HashEvict>(
        {.bits = 64,
         .sinks = 2,
         .recent = 3,
         .probe = kvtrim::HashProbe::kKey,
         .prompt = kvtrim::HashPromptMode::kHash},
        18, 60, 180, 2, 32);
  }
  SECTION("HashEvict, query probe, hashed prompt, group 8") {
    check_emulation_matches_cpu<kvtrim::HashEvict>({.bits = 8, .sinks = 0, .recent = 2,
                                                    .prompt = kvtrim::HashPromptMode::kHash},
                                                   16, 40, 150, 8, 8);
  }
  SECTION("SnapKV (window votes, average pooling), then append only") {
    check_emulation_matches_cpu<kvtrim::SnapKV<>>({.window = 6, .kernel = 5}, 40, 90, 90, 4, 16);
  }
  SECTION("SnapKV with max pooling and capacity below the budget, then H2O") {
    check_emulation_matches_cpu<kvtrim::SnapKV<kvtrim::H2O>>(
        {.window = 4, .kernel = 3, .pooling = kvtrim::SnapPooling::kMax, .capacity = 20, .decode = {.sinks = 1}}, 28,
        70, 160, 2, 16);
  }
  SECTION("SnapKV then TOVA, group reduced by max, prompt shorter than the capacity") {
    check_emulation_matches_cpu<kvtrim::SnapKV<kvtrim::TOVA>>(
        {.window = 5, .group_reduce = kvtrim::GroupReduce::kMax, .decode = {.recent = 1}}, 30, 20, 120, 2, 16);
  }
  SECTION("BUZZ, accumulated attention, budget-derived window and threshold, long prompt") {
    check_emulation_matches_cpu<kvtrim::Buzz<>>({.sinks = 2, .window = 0, .threshold = 0}, 40, 150, 600, 2, 16);
  }
  SECTION("BUZZ, accumulated attention (max over the group), newest survives ties, thin stride 2") {
    check_emulation_matches_cpu<kvtrim::Buzz<>>({.sinks = 3,
                                                 .window = 6,
                                                 .threshold = 14,
                                                 .chunk = 3,
                                                 .thin_stride = 2,
                                                 .keep_oldest_on_tie = false,
                                                 .scorer = {.reduce = kvtrim::GroupReduce::kMax}},
                                                24, 30, 500, 4, 16);
  }
  SECTION("BUZZ with the hash scorer (integer scores: many ties), both tie rules") {
    for (bool oldest : {true, false})
      check_emulation_matches_cpu<kvtrim::Buzz<kvtrim::HashScorer>>(
          {.sinks = 4, .window = 0, .threshold = 0, .keep_oldest_on_tie = oldest, .scorer = {.bits = 8}}, 32, 100,
          500, 2, 16);
  }
  SECTION("EMS, decode merges into the most similar key (low threshold), prompt on the host") {
    check_emulation_matches_cpu<kvtrim::Ems>({.sinks = 2, .recent = 3, .local_window = 8, .merge_similarity = 0.2f},
                                             24, 60, 220, 2, 16);
  }
  SECTION("EMS, every victim merges (threshold -1), count weights, values only, merges into sinks") {
    check_emulation_matches_cpu<kvtrim::Ems>({.sinks = 3,
                                              .recent = 2,
                                              .combine = kvtrim::EmsCombine::kMean,
                                              .merge_similarity = -1.0f,
                                              .merge_keys = false,
                                              .merge_weight = kvtrim::EmsMergeWeight::kCount,
                                              .merge_into_sinks = true},
                                             20, 40, 200, 4, 8);
  }
  SECTION("EMS with head-wise adaptation (coverage 0.5: a smaller decode target), evict below 0.3") {
    check_emulation_matches_cpu<kvtrim::Ems>(
        {.sinks = 2, .recent = 2, .merge_similarity = 0.1f, .evict_below = 0.3f, .coverage = 0.5f, .min_keep = 0.4f},
        30, 80, 220, 2, 16);
  }
  SECTION("SnapKV then HashEvict (codes through the wrapper)") {
    check_emulation_matches_cpu<kvtrim::SnapKV<kvtrim::HashEvict>>(
        {.window = 4, .decode = {.bits = 16, .sinks = 2, .recent = 3}}, 24, 60, 150, 2, 16);
  }
}

TEST_CASE("Every policy of the library has a device implementation", "[cuda]") {
  using kvtrim::gpu::DevicePolicy;
  STATIC_REQUIRE(DevicePolicy<kvtrim::FullCache>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::StreamingLLM>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::H2O>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::TOVA>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::L2Norm>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::HashEvict>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::SnapKV<>>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::SnapKV<kvtrim::H2O>>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::Buzz<>>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::Buzz<kvtrim::HashScorer>>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::Ems>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::EigenAttention<>>::kDefined);
  STATIC_REQUIRE(DevicePolicy<kvtrim::EigenAttention<kvtrim::Ems>>::kDefined);
  // the optional parts resolve to the wrapped policy's
  STATIC_REQUIRE(kvtrim::gpu::traits::merges<DevicePolicy<kvtrim::EigenAttention<kvtrim::Ems>>>());
  STATIC_REQUIRE(kvtrim::gpu::traits::structured<DevicePolicy<kvtrim::Buzz<>>>());
  STATIC_REQUIRE(kvtrim::gpu::traits::simhash<DevicePolicy<kvtrim::SnapKV<kvtrim::HashEvict>>>());
  STATIC_REQUIRE_FALSE(kvtrim::gpu::traits::simhash<DevicePolicy<kvtrim::H2O>>());
}

TEST_CASE("Device policy limits are refused at construction, as kvtrim::Error", "[cuda][errors]") {
  const kvtrim::LayerContext ctx{0, 1, 1, 32, 8, {64}};
  SECTION("HashEvict's query probe holds at most 16 query codes per KV head") {
    const kvtrim::HashEvict pol({}, ctx);
    using DP = kvtrim::gpu::DevicePolicy<kvtrim::HashEvict>;
    REQUIRE_THROWS_WITH(DP::initial(pol, {}, 64, 32), Catch::Matchers::Contains("up to 16 query heads"));
    REQUIRE_NOTHROW(DP::initial(pol, {.probe = kvtrim::HashProbe::kKey}, 64, 32));
  }
  SECTION("SnapKV over a decode policy that keeps fewer prompt tokens than SnapKV's capacity") {
    const kvtrim::SnapKV<kvtrim::StreamingLLM>::Params p{.window = 4, .decode = {.sinks = 2, .window = 10}};
    const kvtrim::SnapKV<kvtrim::StreamingLLM> pol(p, ctx);
    using DP = kvtrim::gpu::DevicePolicy<kvtrim::SnapKV<kvtrim::StreamingLLM>>;
    REQUIRE_THROWS_WITH(DP::initial(pol, p, 64, 1), Catch::Matchers::Contains("fewer than SnapKV's capacity 64"));
  }
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
