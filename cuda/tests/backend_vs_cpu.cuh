// CudaBackend against the CPU backend on the same inputs (llama.cpp's test-backend-ops pattern): every policy x
// every storage type, one translation unit per storage type (test_cuda_backend.cu: float, test_cuda_half.cu,
// test_cuda_bf16.cu), all linked into test_cuda_backend, which also checks that the headers link from several
// .cu files. Without a GPU each case WARNs and returns (the no-device error is checked instead).
//
// Stated bounds (outputs, NMSE = sum (gpu - cpu)^2 / sum cpu^2 over every output of the run):
//   float: 1e-9 (fp32 everywhere; only summation order differs), and the same kept positions as the CPU.
//   __half: 1e-5, __nv_bfloat16: 2e-4 (keys and values rounded to 11 / 8 significant bits; inputs ~N(0,1)).
//   Policies whose decisions do not read attention (FullCache, StreamingLLM, L2Norm: norms of the fp32 input
//   keys; HashEvict and BUZZ's hash scorer: SimHash codes of the fp32 inputs; SnapKV's prompt cut: votes of the fp32 prompt attention)
//   keep the same positions in every type; attention-scored ones (H2O, TOVA, the test policy) report
//   their decision agreement (mean Jaccard of kept sets) in half/bf16 and must stay above 0.75 (a rounding
//   flip between two near-least tokens persists until one of them leaves, so some divergence is expected).
#pragma once

#include <kvtrim/cuda/cuda_backend.cuh>

#include <cstdio>
#include <set>
#include <string>

#include "policies.hpp"
#include "testing.hpp"

namespace kvtest {

inline bool have_gpu() {
  if (kvtrim::gpu::device_count() > 0) return true;
  WARN("no CUDA device (cudaGetDeviceCount reports none): GPU comparison skipped");
  return false;
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
  kvtrim::KVCache<P, kvtrim::CudaBackend<T>> gpu(cfg, params);
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
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  std::vector<float> a(qw), b(qw);
  for (int t = prompt; t < total; ++t) {
    for (int l = 0; l < cfg.n_layers; ++l) {
      gpu.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
      cpu.decode(l, tok.q[t], tok.k[t], tok.v[t], b);
      nmse.add(a, b);
    }
    compare_positions();
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

template <class T>
void all_policies() {
  SECTION("FullCache: prompt, then decode to the budget") {
    compare_with_cpu<kvtrim::FullCache, T>({}, shape(4, 64, 120), 50, 120, true);
  }
  SECTION("StreamingLLM: prompt longer than the budget, several decode splits") {
    compare_with_cpu<kvtrim::StreamingLLM, T>({.sinks = 4}, shape(8, 128, 300), 400, 700, true);
  }
  SECTION("StreamingLLM: explicit window, decode only, group of 6 (query tiles of 2)") {
    compare_with_cpu<kvtrim::StreamingLLM, T>({.sinks = 2, .window = 20}, shape(6, 32, 40), 0, 120, true);
  }
  SECTION("Accumulated attention (probabilities from the decode kernel, prompt column sums)") {
    compare_with_cpu<kvtest::AccumAttention, T>({.recent = 4}, shape(4, 64, 48), 80, 200,
                                                std::is_same_v<T, float>);
  }
  SECTION("H2O (heavy hitters + recent window, sinks)") {
    compare_with_cpu<kvtrim::H2O, T>({.heavy_ratio = 0.5, .sinks = 2}, shape(4, 64, 48), 80, 200,
                                     std::is_same_v<T, float>);
  }
  SECTION("TOVA (last query's attention; prompt window of one row)") {
    compare_with_cpu<kvtrim::TOVA, T>({.recent = 1}, shape(2, 64, 40), 70, 160, std::is_same_v<T, float>);
  }
  SECTION("L2Norm (norms of the fp32 input keys: same decisions in every type)") {
    compare_with_cpu<kvtrim::L2Norm, T>({.sinks = 2, .recent = 4}, shape(4, 128, 48), 90, 200, true);
  }
  SECTION("HashEvict, query probe (SimHash codes of the fp32 inputs: same decisions in every type)") {
    compare_with_cpu<kvtrim::HashEvict, T>({.bits = 16, .sinks = 4, .recent = 6}, shape(4, 64, 48), 80, 200, true);
  }
  SECTION("HashEvict, key probe, hashed prompt, 64 bits, head_dim 128") {
    compare_with_cpu<kvtrim::HashEvict, T>({.bits = 64,
                                            .sinks = 2,
                                            .recent = 4,
                                            .probe = kvtrim::HashProbe::kKey,
                                            .prompt = kvtrim::HashPromptMode::kHash},
                                           shape(2, 128, 40), 90, 200, true);
  }
  SECTION("SnapKV (fp32 prompt votes: same prompt cut in every type), then append up to the budget") {
    compare_with_cpu<kvtrim::SnapKV<>, T>({.window = 8, .kernel = 5, .capacity = 40}, shape(4, 64, 64), 150, 174,
                                          true);
  }
  SECTION("SnapKV prompt cut, then H2O decode") {
    compare_with_cpu<kvtrim::SnapKV<kvtrim::H2O>, T>({.window = 6, .decode = {.sinks = 2}}, shape(4, 64, 48), 120,
                                                     220, std::is_same_v<T, float>);
  }
  SECTION("BUZZ (structured re-segmentation on the device), budget-derived window and threshold") {
    compare_with_cpu<kvtrim::Buzz<>, T>({.sinks = 2, .window = 0, .threshold = 0}, shape(4, 64, 48), 120, 500,
                                        std::is_same_v<T, float>);
  }
  SECTION("BUZZ with the hash scorer (codes of the fp32 inputs: same decisions in every type)") {
    compare_with_cpu<kvtrim::Buzz<kvtrim::HashScorer>, T>({.sinks = 4, .window = 0, .threshold = 0}, shape(2, 64, 40),
                                                          100, 400, true);
  }
  SECTION("EMS (decode merges on the device, prompt by the CPU policy on the host)") {
    compare_with_cpu<kvtrim::Ems, T>({.sinks = 2, .recent = 4, .local_window = 8, .merge_similarity = 0.1f},
                                     shape(4, 64, 48), 90, 220, std::is_same_v<T, float>);
  }
  SECTION("EMS, head-wise adaptation (a smaller decode target), values-only merges into any slot") {
    compare_with_cpu<kvtrim::Ems, T>({.sinks = 2,
                                      .recent = 2,
                                      .merge_similarity = -1.0f,
                                      .merge_keys = false,
                                      .merge_into_sinks = true,
                                      .coverage = 0.5f,
                                      .min_keep = 0.4f},
                                     shape(2, 64, 40), 100, 220, std::is_same_v<T, float>);
  }
  SECTION("Eigen Attention over FullCache (cuBLAS projections, ranks 13 and 10 padded to 16)") {
    const auto cfg = shape(4, 64, 160);
    compare_with_cpu<kvtrim::EigenAttention<>, T>({.basis = random_basis(cfg, 13, 10)}, cfg, 60, 160, true);
  }
  SECTION("Eigen Attention over H2O (decisions on the projected attention)") {
    const auto cfg = shape(2, 64, 48);
    compare_with_cpu<kvtrim::EigenAttention<kvtrim::H2O>, T>(
        {.basis = random_basis(cfg, 22, 30), .inner = {.sinks = 2}}, cfg, 80, 200, std::is_same_v<T, float>);
  }
  SECTION("Accumulated attention, head_dim 256 (shared memory above 48 KiB), group 8") {
    compare_with_cpu<kvtest::AccumAttention, T>({.recent = 8}, shape(8, 256, 300), 100, 360,
                                                std::is_same_v<T, float>);
  }
}

}  // namespace kvtest
