// Soak: streams 10^6 decode steps through every policy (small shapes) and reports the peak resident memory
// of the process (VmHWM) and its current size (VmRSS) after 10^4 and after 10^6 steps: if memory stays flat,
// the two lines of each policy agree. Each policy runs in a child process of its own, so one policy's peak
// does not hide another's. Inputs are deterministic pseudo-random numbers; outputs are checked to be finite.
//
//   soak [steps=1000000] [policy-name-substring]
//
// FullCache and SnapKV<FullCache> never evict: they are soaked as a stream of sequences of `budget` tokens
// each (reset() when full), which exercises reset() a few ten thousand times instead.
#include <kvtrim/kvtrim.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#if __has_include(<kvtrim/policies/h2o.hpp>)
#include <kvtrim/policies/h2o.hpp>
#define SOAK_H2O 1
#endif
#if __has_include(<kvtrim/policies/tova.hpp>)
#include <kvtrim/policies/tova.hpp>
#define SOAK_TOVA 1
#endif
#if __has_include(<kvtrim/policies/l2_norm.hpp>)
#include <kvtrim/policies/l2_norm.hpp>
#define SOAK_L2 1
#endif
#if __has_include(<kvtrim/policies/hash_evict.hpp>)
#include <kvtrim/policies/hash_evict.hpp>
#define SOAK_HASH 1
#endif
#if __has_include(<kvtrim/policies/snapkv.hpp>)
#include <kvtrim/policies/snapkv.hpp>
#define SOAK_SNAP 1
#endif
#if __has_include(<kvtrim/policies/buzz.hpp>)
#include <kvtrim/policies/buzz.hpp>
#define SOAK_BUZZ 1
#endif
#if __has_include(<kvtrim/policies/ems.hpp>)
#include <kvtrim/policies/ems.hpp>
#define SOAK_EMS 1
#endif
#if __has_include(<kvtrim/policies/eigen_attention.hpp>)
#include <kvtrim/policies/eigen_attention.hpp>
#define SOAK_EIGEN 1
#endif

namespace {

// kB value of a "Name:   123 kB" line of /proc/self/status, or -1.
long status_kb(const char* name) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::size_t n = std::strlen(name);
  while (std::getline(f, line))
    if (line.compare(0, n, name) == 0 && line.size() > n && line[n] == ':') return std::atol(line.c_str() + n + 1);
  return -1;
}

// Cheap deterministic noise in [-1, 1).
struct Noise {
  std::uint64_t s;
  float next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(static_cast<std::int64_t>(s >> 11) % 2000000) * 1e-6f - 1.0f;
  }
  void fill(std::vector<float>& x) {
    for (auto& e : x) e = next();
  }
};

constexpr int kLayers = 2, kKv = 2, kQ = 4, kDim = 16, kBudget = 64, kPrompt = 100;

kvtrim::CacheConfig config() {
  return {.n_layers = kLayers, .n_kv_heads = kKv, .n_q_heads = kQ, .head_dim = kDim, .budget = kBudget};
}

// Runs `steps` decode steps (each step = one token through every layer) after a prompt; prints the memory.
template <class P>
int soak(const char* label, const typename P::Params& params, long steps, bool refills) {
  kvtrim::KVCache<P> cache(config(), params);
  Noise rng{0x9E3779B97F4A7C15ull};
  std::vector<float> Q(kPrompt * kQ * kDim), K(kPrompt * kKv * kDim), V(kPrompt * kKv * kDim), O(Q.size());
  std::vector<float> q(kQ * kDim), k(kKv * kDim), v(kKv * kDim), o(q.size());
  auto start = [&](int prompt) {
    const std::size_t t = static_cast<std::size_t>(prompt);
    std::vector<float> q0(t * kQ * kDim), k0(t * kKv * kDim), v0(t * kKv * kDim), o0(q0.size());
    rng.fill(q0), rng.fill(k0), rng.fill(v0);
    for (int l = 0; l < kLayers; ++l) cache.prefill(l, q0, k0, v0, o0);
  };
  start(refills ? kBudget / 2 : kPrompt);
  long bad = 0, resets = 0, rss_1e4 = 0, hwm_1e4 = 0;
  for (long step = 1; step <= steps; ++step) {
    if (refills && cache.size(0, 0) == kBudget) {
      cache.reset();
      ++resets;
      start(kBudget / 2);
    }
    for (int l = 0; l < kLayers; ++l) {
      rng.fill(q), rng.fill(k), rng.fill(v);
      cache.decode(l, q, k, v, o);
      for (float x : o) bad += std::isfinite(x) ? 0 : 1;
    }
    if (step == 10000) {
      rss_1e4 = status_kb("VmRSS");
      hwm_1e4 = status_kb("VmHWM");
    }
  }
  const long rss = status_kb("VmRSS"), hwm = status_kb("VmHWM");
  std::printf("%-22s steps %8ld  at 1e4: VmHWM %6ld kB VmRSS %6ld kB   at end: VmHWM %6ld kB VmRSS %6ld kB  "
              "(growth %+ld kB)  kept/head %3d  bytes_reserved %zu  evictions %llu merges %llu resets %ld "
              "non-finite outputs %ld\n",
              label, steps, hwm_1e4, rss_1e4, hwm, rss, hwm - hwm_1e4, cache.size(0, 0), cache.bytes_reserved(),
              static_cast<unsigned long long>(cache.evictions()), static_cast<unsigned long long>(cache.merges()),
              resets, bad);
  std::fflush(stdout);
  return bad == 0 ? 0 : 1;
}

struct Entry {
  const char* label;
  int (*run)(long steps);
};

// SOAK_ENTRY(label, refills, Policy, {params...})
#define SOAK_ENTRY(label, refills, P, ...) \
  Entry { label, [](long s) { return soak<P>(label, P::Params __VA_ARGS__, s, refills); } }

}  // namespace

int main(int argc, char** argv) {
  const long steps = argc > 1 ? std::atol(argv[1]) : 1000000;
  const std::string only = argc > 2 ? argv[2] : "";
  std::vector<Entry> entries = {
      SOAK_ENTRY("FullCache", true, kvtrim::FullCache, {}),
      SOAK_ENTRY("StreamingLLM", false, kvtrim::StreamingLLM, {.sinks = 4}),
#ifdef SOAK_H2O
      SOAK_ENTRY("H2O", false, kvtrim::H2O, {}),
#endif
#ifdef SOAK_TOVA
      SOAK_ENTRY("TOVA", false, kvtrim::TOVA, {}),
#endif
#ifdef SOAK_L2
      SOAK_ENTRY("L2Norm", false, kvtrim::L2Norm, {.sinks = 4, .recent = 8}),
#endif
#ifdef SOAK_HASH
      SOAK_ENTRY("HashEvict", false, kvtrim::HashEvict, {}),
#endif
#ifdef SOAK_SNAP
      SOAK_ENTRY("SnapKV<FullCache>", true, kvtrim::SnapKV<>, {.window = 8}),
#ifdef SOAK_H2O
      SOAK_ENTRY("SnapKV<H2O>", false, kvtrim::SnapKV<kvtrim::H2O>, {.window = 8}),
#endif
#endif
#ifdef SOAK_BUZZ
      SOAK_ENTRY("Buzz", false, kvtrim::Buzz<>, {.window = 0, .threshold = 0}),
      SOAK_ENTRY("Buzz<HashScorer>", false, kvtrim::Buzz<kvtrim::HashScorer>, {.window = 0, .threshold = 0}),
#endif
#ifdef SOAK_EMS
      SOAK_ENTRY("EMS", false, kvtrim::Ems, {}),
      SOAK_ENTRY("EMS (coverage 0.9)", false, kvtrim::Ems, {.coverage = 0.9f}),
#endif
#ifdef SOAK_EIGEN
      SOAK_ENTRY("EigenAttention<H2O>", false, kvtrim::EigenAttention<kvtrim::H2O>, {.basis = std::make_shared<const kvtrim::EigenBasis>(kLayers, kKv, kDim)}),
#endif
  };
  std::printf("soak: %ld decode steps per policy (%d layers, %d KV heads, %d query heads, head_dim %d, budget %d)\n",
              steps, kLayers, kKv, kQ, kDim, kBudget);
  std::fflush(stdout);
  int failures = 0;
  for (const auto& e : entries) {
    if (!only.empty() && std::string(e.label).find(only) == std::string::npos) continue;
    const pid_t pid = fork();
    if (pid == 0) {
      int rc = 1;
      try {
        rc = e.run(steps);
      } catch (const std::exception& ex) {
        std::printf("%-22s FAILED: %s\n", e.label, ex.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failures;
      std::printf("%-22s child failed (status %d)\n", e.label, status);
    }
  }
  return failures == 0 ? 0 : 1;
}
