// kvtrim: HashEvict (arXiv 2412.16187, Liu et al.) — evict the key whose SimHash code is farthest from the
// probe's, before attention.
//
// Every cached key stores the packed sign code of a fixed Gaussian projection (simhash.hpp). At each decode
// step the probe (the current query, or the current key) is hashed the same way; the unprotected key whose
// code has the largest Hamming distance to the probe's code (the smallest estimated cosine, hence the
// lowest predicted attention) leaves, and the new token takes its place. No attention probabilities are
// needed (kSignals has no kAttention) and the eviction happens before attention (kBeforeAttention), so the
// step attends to exactly the kept tokens.
//
// Parameters (defaults):
//  - bits (16): code length, 1..64 (official `lsh_dim` 16; the ablation sweeps 4..64).
//  - sinks (4): tokens at positions < sinks are never evicted (official `global_tokens` 4).
//  - recent (10): the `recent` tokens before the new one are never evicted (official `recent_window` 10:
//    positions >= t - 10 at step t); the new token itself is always kept (it overwrites the victim, as in the
//    paper and the official code), so the newest recent + 1 tokens are protected.
//  - probe (Query): HashProbe::kQuery hashes the current query (the paper); HashProbe::kKey hashes the current
//    key (the official Cold-Compress code, which never sees the query; the published runs used it).
//  - prompt (RecentGlobal): how a prompt longer than the budget is cut. kRecentGlobal keeps the sinks and the
//    newest tokens (Cold-Compress's default `recent_global`, which the official lsh config uses); kHash keeps
//    the protected tokens plus the keys closest (Hamming) to the probe of the last prompt token.
//  - seed (0): the projection of layer l is drawn from simhash_stream_seed(seed, l) (splitmix64 + Box-Muller,
//    see simhash.hpp), so runs are reproducible. The official code draws it unseeded with torch.randn.
//  Constraint, per (layer, KV head): sinks + recent < budget.
//
// Choices where the paper and the official code are silent or ambiguous:
//  - One projection per layer, shared by its KV heads (as in the official code), width = head_dim.
//  - GQA with the query probe: each of the g query heads of a group is hashed, and a key's distance is the
//    sum of its Hamming distances to the g query codes (a proxy for the mean angle). With the key probe there
//    is one code per KV head and no aggregation.
//  - Ties (common: distances are integers 0..bits*g): the oldest position leaves first. The official code
//    takes the lowest slot index, which depends on slot reuse.
//  - Sinks are protected by position (< sinks), not by slot index as in the official code.
//  - Codes are of the post-RoPE keys as stored; bit = [x . r >= 0], so an exact 0 gives bit 1 (official).
//  - Distances are recomputed every step from the current probe only; nothing accumulates across steps.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "../policy.hpp"
#include "../select.hpp"
#include "../simhash.hpp"

namespace kvtrim {

enum class HashProbe { kQuery, kKey };
enum class HashPromptMode { kRecentGlobal, kHash };
constexpr auto enum_names(HashProbe) {
  return std::array{EnumName<HashProbe>{HashProbe::kQuery, "query"}, EnumName<HashProbe>{HashProbe::kKey, "key"}};
}
constexpr auto enum_names(HashPromptMode) {
  return std::array{EnumName<HashPromptMode>{HashPromptMode::kRecentGlobal, "recent_global"},
                    EnumName<HashPromptMode>{HashPromptMode::kHash, "hash"}};
}

// Distance of a stored code to the probe codes of one step: the sum of Hamming distances over n probes.
KVTRIM_HOST_DEVICE inline int hash_probe_distance(const std::uint64_t* probes, int n, std::uint64_t code) {
  int d = 0;
  for (int g = 0; g < n; ++g) d += hamming(probes[g], code);
  return d;
}

struct HashEvict {
  struct Params {
    int bits = 16;
    int sinks = 4;
    int recent = 10;
    HashProbe probe = HashProbe::kQuery;
    HashPromptMode prompt = HashPromptMode::kRecentGlobal;
    std::uint64_t seed = 0;
    static constexpr auto fields() {
      return std::tuple{field("bits", &Params::bits),   field("sinks", &Params::sinks), field("recent", &Params::recent),
                        field("probe", &Params::probe), field("prompt", &Params::prompt), field("seed", &Params::seed)};
    }
  };
  struct SlotMeta {
    std::uint64_t code = 0;  // SimHash code of the stored key
  };
  struct HeadState {
    std::vector<std::uint64_t> probe;  // probe codes of the current step (g for kQuery, 1 for kKey)
    std::vector<int> keep;             // prompt scratch
  };
  static constexpr std::string_view kName = "hashevict";
  static constexpr Signals kSignals = Signals::kQuery;
  static constexpr EvictTiming kTiming = EvictTiming::kBeforeAttention;

  HashEvict(const Params& p, const LayerContext& ctx) : p_(p), pr_{p.sinks, p.recent + 1} {
    KVTRIM_CHECK(p.bits >= 1 && p.bits <= kSimHashMaxBits, "HashEvict: bits must be in 1..", kSimHashMaxBits,
                 ", got ", p.bits);
    KVTRIM_CHECK(p.sinks >= 0, "HashEvict: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.recent >= 0, "HashEvict: recent must be >= 0, got ", p.recent);
    KVTRIM_CHECK(p.probe == HashProbe::kQuery || p.probe == HashProbe::kKey,
                 "HashEvict: probe must be HashProbe::kQuery or HashProbe::kKey, got ", static_cast<int>(p.probe));
    KVTRIM_CHECK(p.prompt == HashPromptMode::kRecentGlobal || p.prompt == HashPromptMode::kHash,
                 "HashEvict: prompt must be HashPromptMode::kRecentGlobal or kHash, got ", static_cast<int>(p.prompt));
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks + p.recent < ctx.budgets[h], "HashEvict: sinks (", p.sinks, ") + recent (", p.recent,
                   ") = ", p.sinks + p.recent, " must be smaller than the budget ", ctx.budgets[h], " of layer ",
                   ctx.layer, " KV head ", h, " (the new token and the protected ones must leave a victim)");
    proj_ = SimHashProjection(ctx.head_dim, p.bits, simhash_stream_seed(p.seed, static_cast<std::uint64_t>(ctx.layer)));
  }

  const SimHashProjection& projection() const { return proj_; }
  int prompt_window() const { return 0; }

  void on_insert(HeadState& s, HeadOf<HashEvict>& h, const StepContext& step) {
    KVTRIM_CHECK(h.key_dim() == proj_.dim(), "HashEvict: stored key width ", h.key_dim(),
                 " differs from the projection width ", proj_.dim());
    const std::uint64_t code = proj_.code(h.key_ptr(step.slot));
    h.meta(step.slot).code = code;
    // During prefill only the kHash prompt mode needs a probe (the last prompt token's).
    if (step.prefill && p_.prompt != HashPromptMode::kHash) return;
    if (p_.probe == HashProbe::kKey) {
      s.probe.assign(1, code);  // capacity stays after the first step: no allocation later
    } else {
      s.probe.resize(static_cast<std::size_t>(step.group));
      for (int g = 0; g < step.group; ++g)
        s.probe[g] = proj_.code(step.q + static_cast<std::size_t>(g) * static_cast<std::size_t>(step.head_dim));
    }
  }
  void on_attention(HeadState&, HeadOf<HashEvict>&, const StepContext&, const AttentionRows&) {}

  void evict(HeadState& s, HeadOf<HashEvict>& h, const StepContext&) {
    const std::uint64_t* probes = s.probe.data();
    const int n = static_cast<int>(s.probe.size());
    evict_lowest_until_budget(
        h, pr_, [&](int i) { return -static_cast<float>(hash_probe_distance(probes, n, h.meta(i).code)); },
        "HashEvict");
  }

  void on_prompt(HeadState& s, HeadOf<HashEvict>& h, const PromptContext&) {
    if (h.size() <= h.budget()) return;
    if (p_.prompt == HashPromptMode::kHash) {
      const std::uint64_t* probes = s.probe.data();
      const int n = static_cast<int>(s.probe.size());
      keep_top_scored(
          h, pr_, [&](int i) { return -static_cast<float>(hash_probe_distance(probes, n, h.meta(i).code)); },
          s.keep, "HashEvict");
      return;
    }
    keep_sinks_and_newest(h, pr_.sinks, s.keep);  // recent_global
  }

 private:
  Params p_;
  Protection pr_;
  SimHashProjection proj_;
};

}  // namespace kvtrim
