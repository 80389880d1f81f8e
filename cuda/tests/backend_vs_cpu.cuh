// CudaBackend against the CPU backend on the same inputs (llama.cpp's test-backend-ops pattern): every policy x
// every storage type, one translation unit per storage type (test_cuda_backend.cu: float, test_cuda_half.cu,
// test_cuda_bf16.cu), all linked into test_cuda_backend, which also checks that the headers link from several
// .cu files. Without a GPU each case that needs one reports *skipped* (the no-device error is checked instead).
//
// The policies come from the registry: every registered policy runs with the registry's parameters on a default
// shape, and kCases adds parameter variants and shapes (policy names and settings as text, params.hpp), so a new
// policy is covered without touching this file.
//
// Stated bounds (outputs, NMSE = sum (gpu - cpu)^2 / sum cpu^2 over every output of the run):
//   float: 1e-9 (fp32 everywhere; only summation order differs), and the same kept positions as the CPU.
//   __half: 1e-5, __nv_bfloat16: 2e-4 (keys and values rounded to 11 / 8 significant bits; inputs ~N(0,1)).
//   Policies whose decisions do not read attention probabilities (norms and SimHash codes are of the fp32
//   inputs; prompt votes of the fp32 prompt attention) keep the same positions in every type; attention-scored
//   ones report their decision agreement (mean Jaccard of kept sets) in half/bf16 and must stay above 0.75 (a
//   rounding flip between two near-least tokens persists until one of them leaves, so some divergence is
//   expected).
#pragma once

#include <kvtrim/cuda/cuda_backend.cuh>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include "testing.hpp"

namespace kvtest {

// Without a device, a test case that needs one ends the process with status 77, which ctest reports as
// *skipped* (SKIP_RETURN_CODE in cuda/tests/CMakeLists.txt; ctest runs every test case in a process of its own).
inline constexpr int kSkipped = 77;
inline bool have_gpu() {
  if (kvtrim::gpu::device_count() > 0) return true;
  std::fprintf(stderr, "no CUDA device (cudaGetDeviceCount reports none): GPU test skipped\n");
  std::exit(kSkipped);
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, __half>) return "half";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
}

template <class T>
double nmse_bound() {
  if constexpr (std::is_same_v<T, float>) return 1e-9;
  if constexpr (std::is_same_v<T, __half>) return 1e-5;
  return 2e-4;
}

struct Nmse {
  double err = 0, ref = 0;
  void add(const std::vector<float>& gpu, const std::vector<float>& cpu) {
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      err += (double(gpu[i]) - cpu[i]) * (double(gpu[i]) - cpu[i]);
      ref += double(cpu[i]) * cpu[i];
    }
  }
  double value() const { return ref > 0 ? err / ref : err; }
};

inline double jaccard(const std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b) {
  std::set<std::int64_t> sa(a.begin(), a.end()), sb(b.begin(), b.end()), u = sa;
  u.insert(sb.begin(), sb.end());
  std::size_t inter = 0;
  for (auto x : sa) inter += sb.count(x);
  return u.empty() ? 1.0 : double(inter) / double(u.size());
}

// Runs the same prompt + decode stream through KVCache<P, CpuBackend> and KVCache<P, CudaBackend<T>>.
// exact_positions: the kept positions must be identical after every call; otherwise the agreement is reported.
template <class P, class T>
void compare_with_cpu(const typename P::Params& params, const kvtrim::CacheConfig& cfg, int prompt, int total,
                      bool exact_positions) {
  if (!have_gpu()) return;
  kvtrim::KVCache<P> cpu(cfg, params);
  auto gcfg = cfg;
  gcfg.chunk_capacity = 2;  // chunks of 3: the CUDA backend allocates their slots up front
  kvtrim::KVCache<P, kvtrim::CudaBackend<T>> gpu(gcfg, params);
  kvtest::Tokens tok(cfg, total, 21);
  Nmse nmse;
  double agree = 0;
  int checks = 0;
  auto compare_positions = [&] {
    for (int l = 0; l < cfg.n_layers; ++l)
      for (int h = 0; h < cfg.n_kv_heads; ++h) {
        const auto a = gpu.positions(l, h), b = cpu.positions(l, h);
        REQUIRE(a.size() == b.size());
        if (exact_positions) REQUIRE(a == b);
        agree += jaccard(a, b);
        ++checks;
      }
    kvtest::check_invariants(gpu);
  };
  if (prompt > 0) {
    for (int l = 0; l < cfg.n_layers; ++l) {
      auto Q = kvtest::Tokens::rows(tok.q, 0, prompt), K = kvtest::Tokens::rows(tok.k, 0, prompt),
           V = kvtest::Tokens::rows(tok.v, 0, prompt);
      std::vector<float> a(Q.size()), b(Q.size());
      gpu.prefill(l, Q, K, V, a);
      cpu.prefill(l, Q, K, V, b);
      Nmse one;
      one.add(a, b);
      REQUIRE(one.value() < 1e-9);  // prefill attention is computed from the fp32 inputs in every type
    }
    compare_positions();
  }
  // After the prompt, the entries take turns: decode, a chunk of 3 (append), 3 speculative drafts (verify) of
  // which 1 is accepted, and a decide-only step (insert, attention over view(), observe).
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  const int g = cfg.group_size(), d = cfg.head_dim;
  constexpr bool kDecideOnly = !kvtrim::Entry<P>::kNeedsBasis;  // not with low-rank storage
  for (int t = prompt, step = 0; t < total; ++step) {
    const int kind = step % 4;
    const int n = kind == 1 || kind == 2 ? std::min(3, total - t) : 1;
    const auto rows = [&](const std::vector<std::vector<float>>& x, int n) { return kvtest::Tokens::rows(x, t, t + n); };
    std::vector<float> a(n * qw), b(n * qw);
    for (int l = 0; l < cfg.n_layers; ++l) {
      if (kind == 1) {
        gpu.append(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), a);
        cpu.append(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), b);
      } else if (kind == 2) {
        gpu.verify(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), a);
        cpu.verify(l, rows(tok.q, n), rows(tok.k, n), rows(tok.v, n), b);
        nmse.add(a, b);
        a.resize(qw), b.resize(qw);
        gpu.append(l, rows(tok.q, 1), rows(tok.k, 1), rows(tok.v, 1), a);
        cpu.append(l, rows(tok.q, 1), rows(tok.k, 1), rows(tok.v, 1), b);
      } else if (kind == 3 && kDecideOnly && exact_positions) {
        if constexpr (kDecideOnly) {
          gpu.insert(l, tok.q[t], tok.k[t], tok.v[t]);
          cpu.insert(l, tok.q[t], tok.k[t], tok.v[t]);
          // the engine's attention over the CPU view in double; the GPU gets the same numbers in its slot order
          const int stride = cpu.max_slots(l);
          REQUIRE(gpu.max_slots(l) == stride);
          std::vector<float> pc(static_cast<std::size_t>(cfg.n_q_heads) * stride), pg(pc.size());
          for (int h = 0; h < cfg.n_kv_heads; ++h) {
            const auto vc = cpu.view(l, h);
            const auto vg = gpu.view(l, h);
            REQUIRE(vc.size == vg.size);
            const auto* keys = static_cast<const float*>(vc.keys);
            for (int r = 0; r < g; ++r) {
              const float* q = tok.q[t].data() + static_cast<std::size_t>(h * g + r) * d;
              std::vector<double> s(static_cast<std::size_t>(vc.size));
              double m = -INFINITY, z = 0;
              for (int j = 0; j < vc.size; ++j) {
                double dot = 0;
                for (int e = 0; e < d; ++e) dot += double(q[e]) * keys[static_cast<std::size_t>(j) * vc.key_dim + e];
                m = std::max(m, s[static_cast<std::size_t>(j)] = dot / std::sqrt(double(d)));
              }
              for (auto& e : s) z += (e = std::exp(e - m));
              float* rc = pc.data() + static_cast<std::size_t>(h * g + r) * stride;
              for (int j = 0; j < vc.size; ++j) rc[j] = static_cast<float>(s[static_cast<std::size_t>(j)] / z);
              float* rg = pg.data() + static_cast<std::size_t>(h * g + r) * stride;
              for (int j = 0; j < vg.size; ++j) {
                const auto at = std::find(vc.positions, vc.positions + vc.size, vg.positions[j]);
                REQUIRE(at != vc.positions + vc.size);
                rg[j] = rc[at - vc.positions];
              }
            }
          }
          gpu.observe(l, pg, stride);
          cpu.observe(l, pc, stride);
          continue;  // the engine's outputs are its own
        }
      } else {
        a.resize(qw), b.resize(qw);
        gpu.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
        cpu.decode(l, tok.q[t], tok.k[t], tok.v[t], b);
      }
      nmse.add(a, b);
    }
    compare_positions();
    t += kind == 2 ? 1 : n;
  }
  if (exact_positions) {
    REQUIRE(gpu.evictions() == cpu.evictions());
    REQUIRE(gpu.merges() == cpu.merges());
  }
  const double agreement = checks > 0 ? agree / checks : 1.0;
  char line[256];
  std::snprintf(line, sizeof line, "%s/%s g=%d d=%d budget=%d: decode NMSE %.3g (bound %.1g), decision agreement %.4f",
                std::string(P::kName).c_str(), type_name<T>(), cfg.group_size(), cfg.head_dim, cfg.budget,
                nmse.value(), nmse_bound<T>(), agreement);
  WARN(line);
  REQUIRE(nmse.value() < nmse_bound<T>());
  REQUIRE(agreement > (exact_positions ? 0.999 : 0.75));
}

inline kvtrim::CacheConfig shape(int group, int d, int budget) {
  return {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 2 * group, .head_dim = d, .budget = budget};
}

// A low-rank basis calibrated on other random tokens of the same shape (ranks not multiples of 4, so the
// backend pads them).
inline std::shared_ptr<const kvtrim::EigenBasis> random_basis(const kvtrim::CacheConfig& cfg, int key_rank,
                                                              int value_rank) {
  kvtest::Tokens tok(cfg, 200, 77);
  kvtrim::EigenCalibrator cal(cfg);
  for (int l = 0; l < cfg.n_layers; ++l)
    cal.add(l, kvtest::Tokens::rows(tok.k, 0, 200), kvtest::Tokens::rows(tok.v, 0, 200),
            kvtest::Tokens::rows(tok.q, 0, 200));
  return std::make_shared<const kvtrim::EigenBasis>(cal.basis({.key_rank = key_rank, .value_rank = value_rank}));
}

// One comparison: a registered policy, parameter settings over its registry defaults, a shape, a prompt length
// and the total number of tokens.
struct Case {
  const char* policy;
  const char* settings;
  int group, head_dim, budget, prompt, total;
};

inline const Case kCases[] = {
    {"full", "", 4, 64, 120, 50, 120},
    {"streaming", "sinks=4", 8, 128, 300, 400, 700},            // several decode splits
    {"streaming", "sinks=2,window=20", 6, 32, 40, 0, 120},      // decode only, query tiles of 2
    {"h2o", "heavy_ratio=0.5,sinks=2", 4, 64, 48, 80, 200},
    {"h2o", "sinks=4", 8, 256, 300, 100, 360},                  // shared memory above 48 KiB
    {"tova", "recent=1", 2, 64, 40, 70, 160},
    {"l2norm", "sinks=2,recent=4", 4, 128, 48, 90, 200},
    {"hashevict", "bits=16,sinks=4,recent=6", 4, 64, 48, 80, 200},
    {"hashevict", "bits=64,sinks=2,recent=4,probe=key,prompt=hash", 2, 128, 40, 90, 200},
    {"snapkv", "window=8,kernel=5,capacity=40", 4, 64, 64, 150, 174},
    {"snapkv+h2o", "window=6,decode.sinks=2", 4, 64, 48, 120, 220},
    {"buzz", "sinks=2", 4, 64, 48, 120, 500},
    {"buzz-hash", "sinks=4", 2, 64, 40, 100, 400},
    {"ems", "sinks=2,recent=4,local_window=8,merge_similarity=0.1", 4, 64, 48, 90, 220},
    {"ems", "sinks=2,recent=2,merge_similarity=-1,merge_keys=false,merge_into_sinks=true,coverage=0.5,min_keep=0.4", 2,
     64, 40, 100, 220},
    {"eigen+full", "", 4, 64, 160, 60, 160},  // ranks 13 and 10 padded to 16
    {"eigen+h2o", "inner.sinks=2", 2, 64, 48, 80, 200},
};

// Runs one registered policy with `settings` over its registry defaults.
template <class T>
void compare_case(const Case& c) {
  const auto cfg = shape(c.group, c.head_dim, c.budget);
  kvtrim::with_policy(c.policy, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    auto params = entry.params();
    kvtrim::set_params(params, entry.parse_settings(c.settings));
    if constexpr (kvtrim::Entry<P>::kNeedsBasis) params.basis = random_basis(cfg, 13, 10);
    // decisions that read no attention probabilities are the same in every storage type
    constexpr bool exact = std::is_same_v<T, float> || !kvtrim::has(P::kSignals, kvtrim::Signals::kAttention);
    INFO(c.policy << " " << c.settings);
    compare_with_cpu<P, T>(params, cfg, c.prompt, c.total, exact);
  });
}

template <class T>
void all_policies() {
  SECTION("every registered policy with its registry parameters") {
    kvtrim::for_each_policy([&](const auto& entry) {
      using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
      const auto cfg = shape(4, 64, 48);
      auto params = entry.params();
      if constexpr (kvtrim::Entry<P>::kNeedsBasis) params.basis = random_basis(cfg, 22, 30);
      constexpr bool exact = std::is_same_v<T, float> || !kvtrim::has(P::kSignals, kvtrim::Signals::kAttention);
      const int prompt = kvtrim::never_evicts_in_decode<P>() ? 20 : 80;
      const int total = kvtrim::never_evicts_in_decode<P>() ? 48 : 200;
      INFO(entry.name());
      compare_with_cpu<P, T>(params, cfg, prompt, total, exact);
    });
  }
  SECTION("parameter variants and shapes") {
    for (const Case& c : kCases) compare_case<T>(c);
  }
}

}  // namespace kvtest
