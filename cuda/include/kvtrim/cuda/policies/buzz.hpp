// kvtrim CUDA backend: the device side of kvtrim/policies/buzz.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include <kvtrim/error.hpp>
#include <kvtrim/policies/buzz.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// BUZZ: the sinks, the window and the re-segmented middle. Eviction is structured: when the middle exceeds the
// threshold, every slot decides at once whether it survives (fit_slot), by counting instead of sorting, so a
// block of threads runs one pass in O(n^2 / threads) with no ordered scratch:
//  - sinks stay; a non-sink whose rank by position among the non-sinks is >= n_mid (= non-sinks - window) is in
//    the window and stays;
//  - an old sample (sampled) stays when the number of old samples older than it is a multiple of the stride;
//  - any other middle token belongs to chunk (number of unsampled non-sinks older than it) / chunk and stays
//    when no member of its chunk beats it (higher score; equal score and older, or newer with
//    keep_oldest_on_tie = false), the CPU scan's "first (or last) maximum";
//  - every middle token that stays becomes an old sample.
// The CPU policy sorts and scans (buzz.hpp); the host tests check that both keep the same tokens. Scores are
// the accumulated attention (AccumulatedAttention) or minus the Hamming distance of the key's code to the
// step's query codes (HashScorer, codes from the backend's simhash_kernel).
template <class S>
struct DevicePolicy<Buzz<S>> {
  using Pol = Buzz<S>;
  static constexpr bool kHashScorer = std::is_same_v<S, HashScorer>;
  static constexpr bool kDefined = kHashScorer || std::is_same_v<S, AccumulatedAttention>;
  static constexpr bool kSimHash = kHashScorer;
  static constexpr bool kStructured = true;
  static constexpr int kMaxProbes = 16;
  using Meta = typename Pol::SlotMeta;
  struct State {
    int sinks = 0, sinks_seen = 0, window = 1, threshold = 2, chunk = 2, stride = 2;
    bool oldest_on_tie = true;
    GroupReduce reduce = GroupReduce::kMean;
    int n_probes = 0;
    std::uint64_t probes[kHashScorer ? kMaxProbes : 1] = {};
  };
  static State initial(const Pol& pol, const typename Pol::Params& p, int budget, int group) {
    State s;
    s.sinks = p.sinks;
    s.window = pol.window_of(budget);
    s.threshold = pol.threshold_of(budget);
    s.chunk = p.chunk;
    s.stride = pol.thin();
    s.oldest_on_tie = p.keep_oldest_on_tie;
    s.reduce = p.scorer.reduce;
    if constexpr (kHashScorer)
      KVTRIM_CHECK(group <= kMaxProbes, Pol::kName, " on the GPU supports up to ", kMaxProbes,
                   " query heads per KV head, got ", group, " (use CpuBackend)");
    return s;
  }
  static int keep_limit(const Pol& pol, int budget) { return pol.capacity(budget); }
  static SimHashProjection projection(const Pol& pol, int head_dim)
    requires kHashScorer
  {
    return pol.scorer().projection(head_dim);
  }
  KVTRIM_HOST_DEVICE static void on_insert(State& s, Meta& m, std::int64_t, const TokenInputs& in) {
    streaming_mark_sink(s.sinks_seen, s.sinks, m.sink);
    if constexpr (kHashScorer) {
      m.scorer.code = in.key_code;
      if (in.q_codes != nullptr) {
        for (int g = 0; g < in.group; ++g) s.probes[g] = in.q_codes[g];
        s.n_probes = in.group;
      }
    }
  }
  // Arg-min eviction is never used (kStructured); these keep the generic prompt kernel's interface.
  KVTRIM_HOST_DEVICE static bool protects(const State&, const Meta& m, std::int64_t, std::int64_t) { return m.sink; }
  KVTRIM_HOST_DEVICE static float score(const State&, const Meta&, std::int64_t, std::int64_t) { return 0.0f; }
  KVTRIM_HOST_DEVICE static void on_attention(const State& s, Meta& m, int slot, const AttentionRows& rows) {
    if constexpr (!kHashScorer) m.scorer.score = buzz_accumulate(m.scorer.score, rows.reduce(slot, s.reduce));
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, Meta& m, int t, const PromptSums& in) {
    if constexpr (!kHashScorer) m.scorer.score = in.col.reduce(t, s.reduce);
    return 0.0f;
  }
  KVTRIM_HOST_DEVICE static float chunk_score(const State& s, const Meta& m) {
    if constexpr (kHashScorer)
      return buzz_hash_affinity(m.scorer.code, s.probes, s.n_probes, s.reduce == GroupReduce::kMax);
    else
      return m.scorer.score;
  }
  KVTRIM_HOST_DEVICE static bool needs_fit(const State& s, int n) { return n - s.sinks_seen - s.window > s.threshold; }
  // Pass 1, per slot: -1 sink, -2 window, else the number of older old samples (sampled) or of older new-segment
  // tokens (the token's index in the new segment).
  static constexpr int kSink = -1, kWindow = -2;
  KVTRIM_HOST_DEVICE static int fit_key(const State& s, const std::int64_t* pos, const Meta* meta, int n, int i) {
    if (meta[i].sink) return kSink;
    const std::int64_t p = pos[i];
    int older = 0, older_samples = 0;
    for (int j = 0; j < n; ++j) {
      if (meta[j].sink || pos[j] >= p) continue;
      ++older;
      older_samples += meta[j].sampled ? 1 : 0;
    }
    if (older >= n - s.sinks_seen - s.window) return kWindow;  // every sink is still held: n - sinks_seen non-sinks
    return meta[i].sampled ? older_samples : older - older_samples;
  }
  // Pass 2, per slot, with every slot's key.
  KVTRIM_HOST_DEVICE static bool fit_slot(const State& s, const Meta* meta, const int* keys, int n, int i,
                                          Meta& out) {
    out = meta[i];
    if (keys[i] < 0) return true;  // sink or window
    bool stays = true;
    if (meta[i].sampled) {
      stays = keys[i] % s.stride == 0;
    } else {
      const int chunk = keys[i] / s.chunk;
      const float mine = chunk_score(s, meta[i]);
      for (int j = 0; j < n && stays; ++j) {
        if (j == i || keys[j] < 0 || meta[j].sampled || keys[j] / s.chunk != chunk) continue;
        const float theirs = chunk_score(s, meta[j]);
        // keys order the new segment by position: a smaller key is an older token
        stays = !(theirs > mine || (theirs == mine && (s.oldest_on_tie ? keys[j] < keys[i] : keys[j] > keys[i])));
      }
    }
    out.sampled = stays;
    return stays;
  }
};

}  // namespace kvtrim::gpu
