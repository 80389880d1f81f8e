// Soak: streams 10^6 decode steps through every registered policy (small shapes) and reports the peak
// resident memory of the process (VmHWM) and its current size (VmRSS) after 10^4 and after 10^6 steps: if memory
// stays flat, the two lines of each policy agree. Each policy runs in a child process of its own, so one
// policy's peak does not hide another's. Inputs are deterministic pseudo-random numbers; outputs are checked to
// be finite. Every registered policy runs with the registry's parameters (plus a few variants), so a new
// policy cannot go unsoaked.
//
//   soak [steps (default 1000000)] [substring of the entries to run]
//
// Policies that never evict in decode are soaked as a stream of sequences of `budget` tokens each (reset() when
// full), which exercises reset() a few ten thousand times instead.
#include <kvtrim/any_cache.hpp>

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

#include "common/cli.hpp"
#include "common/configurations.hpp"

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

// One soak entry: a registry policy with settings; `refills` for the policies that never evict.
struct Entry {
  std::string policy, settings;
  bool refills = false;
  std::string label() const { return settings.empty() ? policy : policy + " " + settings; }
};

// Runs `steps` decode steps (each step = one token through every layer) after a prompt; prints the memory.
int soak(const Entry& e, long steps) {
  const examples::Configuration conf{e.label(), e.policy, e.settings};
  auto cache = examples::build_cache(conf, kBudget, config(),
                                     std::make_shared<const kvtrim::EigenBasis>(kLayers, kKv, kDim));
  Noise rng{0x9E3779B97F4A7C15ull};
  std::vector<float> q(kQ * kDim), k(kKv * kDim), v(kKv * kDim), o(q.size());
  auto start = [&](int prompt) {
    const std::size_t t = static_cast<std::size_t>(prompt);
    std::vector<float> q0(t * kQ * kDim), k0(t * kKv * kDim), v0(t * kKv * kDim), o0(q0.size());
    rng.fill(q0), rng.fill(k0), rng.fill(v0);
    for (int l = 0; l < kLayers; ++l) cache->prefill(l, q0, k0, v0, o0);
  };
  start(e.refills ? kBudget / 2 : kPrompt);
  long bad = 0, resets = 0, rss_1e4 = 0, hwm_1e4 = 0;
  for (long step = 1; step <= steps; ++step) {
    if (e.refills && cache->size(0, 0) == kBudget) {
      cache->reset();
      ++resets;
      start(kBudget / 2);
    }
    for (int l = 0; l < kLayers; ++l) {
      rng.fill(q), rng.fill(k), rng.fill(v);
      cache->decode(l, q, k, v, o);
      for (float x : o) bad += std::isfinite(x) ? 0 : 1;
    }
    if (step == 10000) {
      rss_1e4 = status_kb("VmRSS");
      hwm_1e4 = status_kb("VmHWM");
    }
  }
  const long rss = status_kb("VmRSS"), hwm = status_kb("VmHWM");
  std::printf("%-26s steps %8ld  at 1e4: VmHWM %6ld kB VmRSS %6ld kB   at end: VmHWM %6ld kB VmRSS %6ld kB  "
              "(growth %+ld kB)  kept/head %3d  bytes_reserved %zu  evictions %llu merges %llu resets %ld "
              "non-finite outputs %ld\n",
              e.label().c_str(), steps, hwm_1e4, rss_1e4, hwm, rss, hwm - hwm_1e4, cache->size(0, 0),
              cache->bytes_reserved(), static_cast<unsigned long long>(cache->evictions()),
              static_cast<unsigned long long>(cache->merges()), resets, bad);
  std::fflush(stdout);
  return bad == 0 ? 0 : 1;
}

int run(int argc, char** argv) {
  cli::Parser p("soak", {}, /*positional=*/true);
  long steps = 1000000;
  std::string only;
  int positional = 0;
  p.start(argc, argv);
  while (p.next()) {
    if (p.is("--help")) {
      std::puts("soak [steps (1..1000000000, default 1000000)] [substring of the entries to run]");
      return 0;
    }
    if (positional == 0) steps = static_cast<long>(cli::Parser::parse_integer("steps", p.current(), 1, 1000000000));
    else if (positional == 1) only = p.current();
    else throw cli::UsageError("unexpected argument '" + p.current() + "' (soak [steps] [substring])");
    ++positional;
  }
  // Every registered policy with its registry parameters (the never-evicting ones refill), plus variants.
  std::vector<Entry> entries;
  kvtrim::for_each_policy([&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    entries.push_back({std::string(entry.name()), "", kvtrim::never_evicts_in_decode<P>()});
  });
  entries.push_back({"l2norm", "sinks=4,recent=8"});
  entries.push_back({"ems", "coverage=0.9"});
  std::printf("soak: %ld decode steps per policy (%d layers, %d KV heads, %d query heads, head_dim %d, budget %d)\n",
              steps, kLayers, kKv, kQ, kDim, kBudget);
  std::fflush(stdout);
  int failures = 0;
  for (const auto& e : entries) {
    if (!only.empty() && e.label().find(only) == std::string::npos) continue;
    const pid_t pid = fork();
    if (pid == 0) {
      int rc = 1;
      try {
        rc = soak(e, steps);
      } catch (const std::exception& ex) {
        std::printf("%-26s FAILED: %s\n", e.label().c_str(), ex.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failures;
      std::printf("%-26s child failed (status %d)\n", e.label().c_str(), status);
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("soak", [&] { return run(argc, argv); });
}
