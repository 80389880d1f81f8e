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
//  - The backend computes the SimHash codes (kSimHash) with the layer's projection and hands them to
//    on_insert; the probe codes of the step live in State (at most kMaxProbes query heads per KV head).
#pragma once

#include <cstdint>
#include <string_view>
#include <tuple>

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

struct HashEvict {
  static constexpr int kMaxProbes = 64;  // query heads per KV head (the query probe keeps one code each)

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
  // The step's probe codes (g queries, or the new key), packed 64 / bits to a word: lane k of a word holds bits
  // [k * bits, (k + 1) * bits). A key's code repeated once per lane (code * spread) then meets every probe of a
  // word in one XOR and one popcount: 16-bit codes against 4 query probes cost one popcount per key, not four.
  struct State {
    Protection protect;
    bool key_probe = false;
    bool hash_prompt = false;
    int bits = 1;
    int n_words = 0;                        // words holding the probes (0: no probe yet)
    std::uint64_t spread = 1;               // sum of 1 << (k * bits) over the lanes of a word
    std::uint64_t last_mask = 0;            // the lanes of the last word in use
    std::uint64_t probes[kMaxProbes] = {};  // packed probe codes
  };
  static constexpr std::string_view kName = "hashevict";
  static constexpr Signals kSignals = Signals::kQuery;
  static constexpr EvictTiming kTiming = EvictTiming::kBeforeAttention;
  static constexpr bool kSimHash = true;

  HashEvict(const Params& p, const LayerContext& ctx) : p_(p) {
    KVTRIM_CHECK(p.bits >= 1 && p.bits <= kSimHashMaxBits, "HashEvict: bits must be in 1..", kSimHashMaxBits,
                 ", got ", p.bits);
    KVTRIM_CHECK(p.sinks >= 0, "HashEvict: sinks must be >= 0, got ", p.sinks);
    KVTRIM_CHECK(p.recent >= 0, "HashEvict: recent must be >= 0, got ", p.recent);
    KVTRIM_CHECK(p.probe == HashProbe::kQuery || p.probe == HashProbe::kKey,
                 "HashEvict: probe must be HashProbe::kQuery or HashProbe::kKey, got ", static_cast<int>(p.probe));
    KVTRIM_CHECK(p.prompt == HashPromptMode::kRecentGlobal || p.prompt == HashPromptMode::kHash,
                 "HashEvict: prompt must be HashPromptMode::kRecentGlobal or kHash, got ", static_cast<int>(p.prompt));
    KVTRIM_CHECK(p.probe == HashProbe::kKey || ctx.group <= kMaxProbes, "HashEvict: the query probe supports up to ",
                 kMaxProbes, " query heads per KV head, got ", ctx.group, " (use probe = key)");
    for (std::size_t h = 0; h < ctx.budgets.size(); ++h)
      KVTRIM_CHECK(p.sinks + p.recent < ctx.budgets[h], "HashEvict: sinks (", p.sinks, ") + recent (", p.recent,
                   ") = ", p.sinks + p.recent, " must be smaller than the budget ", ctx.budgets[h], " of layer ",
                   ctx.layer, " KV head ", h, " (the new token and the protected ones must leave a victim)");
    proj_ = SimHashProjection(ctx.head_dim, p.bits, simhash_stream_seed(p.seed, static_cast<std::uint64_t>(ctx.layer)));
  }

  // The layer's projection (one per layer, shared by its KV heads), drawn at head_dim.
  const SimHashProjection& projection() const { return proj_; }
  SimHashProjection projection(int head_dim) const {
    KVTRIM_CHECK(head_dim == proj_.dim(), "HashEvict: keys are ", head_dim, " wide but the projection is ",
                 proj_.dim(), " wide (SimHash of low-rank keys is not supported)");
    return proj_;
  }
  State initial(int, int) const {
    State s;
    s.protect = Protection{p_.sinks, p_.recent + 1};  // the new token is always kept
    s.key_probe = p_.probe == HashProbe::kKey;
    s.hash_prompt = p_.prompt == HashPromptMode::kHash;
    s.bits = p_.bits;
    s.spread = 0;
    for (int lane = 0; lane < lanes(s); ++lane) s.spread |= std::uint64_t{1} << (lane * p_.bits);
    return s;
  }

  // Probe codes that share one 64-bit word.
  KVTRIM_HOST_DEVICE static int lanes(const State& s) { return 64 / s.bits; }

  // Distance of a stored code to the probe codes of one step: the sum of Hamming distances over the probes
  // (lanes past the last probe are masked off).
  KVTRIM_HOST_DEVICE static int distance(const State& s, std::uint64_t code) {
    const std::uint64_t repeated = code * s.spread;  // code < 2^bits: the lanes never carry into each other
    if (s.n_words == 1)  // the usual case (e.g. 16 bits, up to 4 probes), apart: half the time of the loop
      return hamming(s.probes[0] & s.last_mask, repeated & s.last_mask);
    if (s.n_words == 0) return 0;
    int d = 0;
    for (int w = 0; w + 1 < s.n_words; ++w) d += hamming(s.probes[w], repeated);
    return d + hamming(s.probes[s.n_words - 1] & s.last_mask, repeated & s.last_mask);
  }
  // The step's probes replace the last ones.
  KVTRIM_HOST_DEVICE static void set_probes(State& s, const std::uint64_t* codes, int n) {
    const int per_word = lanes(s);
    s.n_words = (n + per_word - 1) / per_word;
    for (int w = 0; w < s.n_words; ++w) s.probes[w] = 0;
    for (int g = 0; g < n; ++g) s.probes[g / per_word] |= codes[g] << ((g % per_word) * s.bits);
    const int used = (n - (s.n_words - 1) * per_word) * s.bits;  // bits of the last word in use
    s.last_mask = used >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << used) - 1;
  }

  KVTRIM_HOST_DEVICE static void on_insert(State& s, SlotMeta& m, std::int64_t, const TokenInputs& in) {
    m.code = in.key_code;
    if (in.prefill && !s.hash_prompt) return;  // only the kHash prompt mode needs a probe during prefill
    if (s.key_probe)
      set_probes(s, &in.key_code, 1);
    else if (in.q_codes != nullptr)
      set_probes(s, in.q_codes, in.group);
  }
  KVTRIM_HOST_DEVICE static bool protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.protect.protects(pos, newest);
  }
  // recent_global prompts keep the sinks and the newest tokens (everything else scores 0, oldest out first)
  KVTRIM_HOST_DEVICE static bool prompt_protects(const State& s, const SlotMeta&, std::int64_t pos, std::int64_t newest) {
    return s.hash_prompt ? s.protect.protects(pos, newest) : pos < s.protect.sinks;
  }
  KVTRIM_HOST_DEVICE static float score(const State& s, const SlotMeta& m, std::int64_t, std::int64_t) {
    return -static_cast<float>(distance(s, m.code));
  }
  KVTRIM_HOST_DEVICE static float prompt_score(const State& s, SlotMeta& m, int, const PromptSums&) {
    return s.hash_prompt ? score(s, m, 0, 0) : 0.0f;
  }

 private:
  Params p_;
  SimHashProjection proj_;
};

}  // namespace kvtrim
