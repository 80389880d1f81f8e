// Eigen Attention: what low-rank storage saves, and what the paper's RoPE path would cost.
//
// Printed first (figures, not timings):
//  - memory per token at the calibrated rank versus full, per (layer, KV head) slot as HeadStore counts it
//    (keys + values + position + policy metadata), on synthetic keys/values whose spectra decay;
//  - the same on a real model's post-RoPE K/V (llama2.c stories260K from ../shared/models, or the folder in
//    $KVTRIM_MODELS_DIR), calibrated on the first windows of the TinyStories text and checked on later ones:
//    next-token (top-1) agreement and mean |logit difference| against FullCache. Skipped when absent.
// Benchmarks (one KV head, g = 4 query heads, head dim d = 128, n cached tokens, CPU time):
//   BM_FullStep/n           KVCache<FullCache> decode step at full width (the reference)
//   BM_LowRankStep/n/r      KVCache<PolicyNamed<"eigen+full">> decode step with rank-r keys and values: this library's
//                           path (post-RoPE basis, queries projected, attention entirely in rank r)
//   BM_RopeUpproject/n/r    the paper's Llama path overhead alone: K = K~ U_kᵀ for all n cached pre-RoPE
//                           low-rank keys (n x r x d multiply-adds) and the RoPE rotation of the n keys at
//                           their positions (cos/sin tables precomputed)
//   BM_PaperLlamaStep/n/r   the paper's whole step: the above + full-width scores + softmax + rank-r values
// The cache is filled directly (HeadStore::append) and the step's new token is removed after the step, so every
// step attends over n + 1 tokens.
#include <benchmark/benchmark.h>

#include <kvtrim/kvtrim.hpp>
#include <kvtrim/policies/eigen_attention.hpp>

#include <Eigen/QR>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../examples/llama2/model.hpp"

namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr int kD = 128, kGroup = 4;

Eigen::MatrixXf random_orthonormal(int d, int r, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd;
  Eigen::MatrixXd g(d, r);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < r; ++j) g(i, j) = nd(gen);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  return (qr.householderQ() * Eigen::MatrixXd::Identity(d, r)).cast<float>();
}

std::vector<float> normal(std::size_t n, std::mt19937_64& gen) {
  std::normal_distribution<float> nd;
  std::vector<float> x(n);
  for (auto& e : x) e = nd(gen);
  return x;
}

// n random tokens appended straight into (layer 0, KV head 0), projected to the head's widths.
template <class Cache>
void fill(Cache& cache, int n, std::mt19937_64& gen, const Eigen::MatrixXf* Uk, const Eigen::MatrixXf* Uv) {
  auto& head = cache.backend().head(0, 0);
  for (int t = 0; t < n; ++t) {
    auto k = normal(kD, gen), v = normal(kD, gen);
    if (Uk != nullptr) {
      Eigen::VectorXf kl = Uk->transpose() * Eigen::Map<Eigen::VectorXf>(k.data(), kD);
      Eigen::VectorXf vl = Uv->transpose() * Eigen::Map<Eigen::VectorXf>(v.data(), kD);
      head.append(kl.data(), vl.data(), t);
    } else {
      head.append(k.data(), v.data(), t);
    }
  }
}

kvtrim::CacheConfig one_head(int n) {
  return {.n_layers = 1, .n_kv_heads = 1, .n_q_heads = kGroup, .head_dim = kD, .budget = n + 1};
}

void BM_FullStep(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  kvtrim::KVCache<kvtrim::FullCache> cache(one_head(n));
  std::mt19937_64 gen(1);
  fill(cache, n, gen, nullptr, nullptr);
  auto q = normal(kGroup * kD, gen), k = normal(kD, gen), v = normal(kD, gen);
  std::vector<float> out(kGroup * kD);
  auto& head = cache.backend().head(0, 0);
  for (auto _ : state) {
    cache.decode(0, q, k, v, out);
    head.remove(head.size() - 1);
  }
  benchmark::DoNotOptimize(out.data());
  state.counters["bytes_per_token"] = static_cast<double>(head.bytes_per_slot());
}
BENCHMARK(BM_FullStep)->ArgName("n")->Arg(1024)->Arg(4096)->Arg(16384)->Unit(benchmark::kMicrosecond);

void BM_LowRankStep(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0)), r = static_cast<int>(state.range(1));
  auto basis = std::make_shared<kvtrim::EigenBasis>(1, 1, kD);
  basis->set(0, 0, random_orthonormal(kD, r, 2), random_orthonormal(kD, r, 3));
  kvtrim::KVCache<kvtrim::PolicyNamed<"eigen+full">> cache(one_head(n), {.basis = basis});
  std::mt19937_64 gen(1);
  fill(cache, n, gen, &basis->key(0, 0), &basis->value(0, 0));
  auto q = normal(kGroup * kD, gen), k = normal(kD, gen), v = normal(kD, gen);
  std::vector<float> out(kGroup * kD);
  auto& head = cache.backend().head(0, 0);
  for (auto _ : state) {
    cache.decode(0, q, k, v, out);
    head.remove(head.size() - 1);
  }
  benchmark::DoNotOptimize(out.data());
  state.counters["bytes_per_token"] = static_cast<double>(head.bytes_per_slot());
}
BENCHMARK(BM_LowRankStep)
    ->ArgNames({"n", "r"})
    ->ArgsProduct({{1024, 4096, 16384}, {32, 64}})
    ->Unit(benchmark::kMicrosecond);

// The paper's per-step work for RoPE models, on its own buffers.
struct PaperPath {
  int n, r;
  RowMajor Klow, Ut, K, Vlow, Uvt, Q, S, Olow, O;
  std::vector<float> cos, sin;  // [n x d/2] rotation tables of the cached positions
  PaperPath(int n_, int r_) : n(n_), r(r_) {
    std::mt19937_64 gen(5);
    auto fillm = [&](RowMajor& m, int rows, int cols) {
      m.resize(rows, cols);
      auto x = normal(static_cast<std::size_t>(rows) * cols, gen);
      std::copy(x.begin(), x.end(), m.data());
    };
    fillm(Klow, n, r);
    fillm(Vlow, n, r);
    fillm(Q, kGroup, kD);
    Ut = random_orthonormal(kD, r, 6).transpose();
    Uvt = random_orthonormal(kD, r, 7).transpose();
    K.resize(n, kD);
    S.resize(kGroup, n);
    Olow.resize(kGroup, r);
    O.resize(kGroup, kD);
    cos.resize(static_cast<std::size_t>(n) * kD / 2);
    sin.resize(cos.size());
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < kD / 2; ++i) {
        const double a = t * std::pow(10000.0, -2.0 * i / kD);
        cos[static_cast<std::size_t>(t) * kD / 2 + i] = static_cast<float>(std::cos(a));
        sin[static_cast<std::size_t>(t) * kD / 2 + i] = static_cast<float>(std::sin(a));
      }
  }
  void upproject_and_rotate() {
    K.noalias() = Klow * Ut;
    for (int t = 0; t < n; ++t) {
      float* k = K.row(t).data();
      const float* c = cos.data() + static_cast<std::size_t>(t) * kD / 2;
      const float* s = sin.data() + static_cast<std::size_t>(t) * kD / 2;
      for (int i = 0; i < kD / 2; ++i) {
        const float a = k[2 * i], b = k[2 * i + 1];
        k[2 * i] = a * c[i] - b * s[i];
        k[2 * i + 1] = a * s[i] + b * c[i];
      }
    }
  }
  void attend() {
    S.noalias() = (Q * K.transpose()) * (1.0f / std::sqrt(static_cast<float>(kD)));
    for (int g = 0; g < kGroup; ++g) {
      auto row = S.row(g).array();
      row = (row - row.maxCoeff()).exp();
      row /= row.sum();
    }
    Olow.noalias() = S * Vlow;
    O.noalias() = Olow * Uvt;
  }
};

void BM_RopeUpproject(benchmark::State& state) {
  PaperPath p(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)));
  for (auto _ : state) {
    p.upproject_and_rotate();
    benchmark::DoNotOptimize(p.K.data());
  }
  state.counters["GFLOPs"] = benchmark::Counter(2.0 * p.n * p.r * kD * 1e-9 * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_RopeUpproject)
    ->ArgNames({"n", "r"})
    ->ArgsProduct({{1024, 4096, 16384}, {32, 64}})
    ->Unit(benchmark::kMicrosecond);

void BM_PaperLlamaStep(benchmark::State& state) {
  PaperPath p(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)));
  for (auto _ : state) {
    p.upproject_and_rotate();
    p.attend();
    benchmark::DoNotOptimize(p.O.data());
  }
}
BENCHMARK(BM_PaperLlamaStep)
    ->ArgNames({"n", "r"})
    ->ArgsProduct({{1024, 4096, 16384}, {64}})
    ->Unit(benchmark::kMicrosecond);

// ---- memory figures -----------------------------------------------------------------------------------------

// Bytes per token per (layer, KV head) slot, as the cache counts them, for a given basis head.
std::size_t slot_bytes(const kvtrim::EigenBasis& b, int layer, int kv) {
  return 4u * static_cast<std::size_t>(b.key_rank(layer, kv) + b.value_rank(layer, kv)) + sizeof(std::int64_t) +
         sizeof(kvtrim::FullCache::SlotMeta);
}

void synthetic_report() {
  const int N = 4096;
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = kGroup, .head_dim = kD, .budget = 1};
  const std::size_t full = kvtrim::HeadStore<kvtrim::FullCache::SlotMeta>(kD, kD, 1).bytes_per_slot();
  struct Spectrum {
    const char* name;
    double (*sigma)(int);
  };
  const Spectrum spectra[] = {{"exp(-j/16)", [](int j) { return std::exp(-j / 16.0); }},
                              {"1/(j+1)", [](int j) { return 1.0 / (j + 1); }},
                              {"1/sqrt(j+1)", [](int j) { return 1.0 / std::sqrt(j + 1.0); }}};
  std::printf("Synthetic K and V (d = %d, %d calibration rows, rows = gaussian * diag(sigma_j) * random rotation),\n"
              "bytes per token per KV head (keys + values + position + metadata); full = %zu:\n",
              kD, N, full);
  std::printf("  %-12s %-8s %-10s %6s %6s %10s %8s\n", "sigma_j", "energy", "measure", "r_k", "r_v", "bytes/tok",
              "vs full");
  for (const auto& s : spectra) {
    std::mt19937_64 gen(9);
    const Eigen::MatrixXf U = random_orthonormal(kD, kD, 10);
    RowMajor X(N, kD), Y(N, kD);
    for (auto* M : {&X, &Y}) {
      auto g = normal(static_cast<std::size_t>(N) * kD, gen);
      for (int t = 0; t < N; ++t)
        for (int j = 0; j < kD; ++j) (*M)(t, j) = g[static_cast<std::size_t>(t) * kD + j] * static_cast<float>(s.sigma(j));
      *M = *M * U.transpose();
    }
    kvtrim::EigenCalibrator cal(cfg);
    cal.add(0, std::span<const float>(X.data(), X.size()), std::span<const float>(Y.data(), Y.size()));
    for (auto measure : {kvtrim::EnergyMeasure::kSingularValues, kvtrim::EnergyMeasure::kSquaredSingularValues})
      for (double e : {0.9, 0.95, 0.98}) {
        const auto b = cal.basis({.energy = e, .measure = measure});
        std::printf("  %-12s %-8.2f %-10s %6d %6d %10zu %7.1f%%\n", s.name, e,
                    measure == kvtrim::EnergyMeasure::kSingularValues ? "sigma" : "sigma^2", b.key_rank(0, 0),
                    b.value_rank(0, 0), slot_bytes(b, 0, 0), 100.0 * static_cast<double>(slot_bytes(b, 0, 0)) / static_cast<double>(full));
      }
  }
}

void model_report() {
  namespace fs = std::filesystem;
  const char* env = std::getenv("KVTRIM_MODELS_DIR");
  const fs::path dir = env != nullptr ? fs::path(env) : fs::path(__FILE__).parent_path().parent_path().parent_path() / "shared" / "models";
  const fs::path model = dir / "stories260K.bin", tok = dir / "tok512.bin", text = dir / "tinystories_valid_head.txt";
  if (!fs::exists(model) || !fs::exists(tok) || !fs::exists(text)) {
    std::printf("\nReal model: %s not found; skipped (set KVTRIM_MODELS_DIR)\n", model.string().c_str());
    return;
  }
  const auto ck = llama2::Checkpoint::load(model.string());
  const auto& c = ck.config();
  const auto tokenizer = llama2::Tokenizer::load(tok.string(), c.vocab_size);
  std::ifstream f(text);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  s.resize(std::min<std::size_t>(s.size(), 60000));
  const auto ids = tokenizer.encode(s, false, false);
  const int W = 256;  // window: BOS + 255 tokens
  std::vector<std::vector<int>> windows;
  for (std::size_t i = 0; i + W - 1 <= ids.size(); i += W - 1) {
    std::vector<int> w{llama2::Tokenizer::kBos};
    w.insert(w.end(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids.begin() + static_cast<std::ptrdiff_t>(i + W - 1));
    windows.push_back(std::move(w));
  }
  const std::size_t n_calib = windows.size() / 2;
  if (n_calib < 1 || windows.size() - n_calib < 1) return;
  const auto shape = llama2::cache_config(c, W);
  kvtrim::EigenCalibrator cal(shape);
  llama2::Transformer tf(ck);
  const std::size_t kvd = static_cast<std::size_t>(c.kv_dim()), dim = static_cast<std::size_t>(c.dim);
  tf.set_kv_tap([&](int layer, std::int64_t, const float* q, const float* k, const float* v) {
    cal.add(layer, {k, kvd}, {v, kvd}, {q, dim});
  });
  for (std::size_t w = 0; w < n_calib; ++w) {
    kvtrim::KVCache<kvtrim::FullCache> cache(shape);
    tf.prefill(cache, windows[w]);
  }
  tf.set_kv_tap(nullptr);
  // Reference logits of the held-out windows.
  const std::size_t V = static_cast<std::size_t>(c.vocab_size);
  std::vector<std::vector<float>> ref;
  for (std::size_t w = n_calib; w < windows.size(); ++w) {
    kvtrim::KVCache<kvtrim::FullCache> cache(shape);
    ref.emplace_back(windows[w].size() * V);
    tf.prefill(cache, windows[w], ref.back());
  }
  const std::size_t full = kvtrim::HeadStore<kvtrim::FullCache::SlotMeta>(c.head_size(), c.head_size(), 1).bytes_per_slot();
  std::printf("\nReal model %s (d = %d, %d layers x %d KV heads): calibrated on %zu windows of %d tokens, checked on %zu\n"
              "held-out windows (prefill, every position) against FullCache; bytes per token per KV head, full = %zu:\n",
              model.filename().string().c_str(), c.head_size(), c.n_layers, c.n_kv_heads, n_calib, W,
              windows.size() - n_calib, full);
  std::printf("  %-8s %-10s %-22s %10s %8s %8s %12s\n", "energy", "measure", "ranks r_k/r_v per layer", "bytes/tok",
              "vs full", "top-1", "mean|dlogit|");
  for (auto measure : {kvtrim::EnergyMeasure::kSingularValues, kvtrim::EnergyMeasure::kSquaredSingularValues})
    for (double e : {0.8, 0.9, 0.95, 0.98, 0.999}) {
      auto basis = std::make_shared<const kvtrim::EigenBasis>(cal.basis({.energy = e, .measure = measure}));
      std::string ranks;
      double bytes = 0;
      for (int l = 0; l < c.n_layers; ++l) {
        ranks += std::to_string(basis->key_rank(l, 0)) + "/" + std::to_string(basis->value_rank(l, 0)) + " ";
        for (int h = 0; h < c.n_kv_heads; ++h) bytes += static_cast<double>(slot_bytes(*basis, l, h));
      }
      bytes /= c.n_layers * c.n_kv_heads;
      std::size_t agree = 0, total = 0;
      double dlogit = 0;
      for (std::size_t w = n_calib; w < windows.size(); ++w) {
        kvtrim::KVCache<kvtrim::PolicyNamed<"eigen+full">> cache(shape, {.basis = basis});
        std::vector<float> logits(windows[w].size() * V);
        tf.prefill(cache, windows[w], logits);
        const auto& r = ref[w - n_calib];
        for (std::size_t t = 0; t < windows[w].size(); ++t) {
          const float* a = logits.data() + t * V;
          const float* b = r.data() + t * V;
          agree += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
          for (std::size_t i = 0; i < V; ++i) dlogit += std::abs(a[i] - b[i]);
          ++total;
        }
      }
      std::printf("  %-8.3f %-10s %-22s %10.1f %7.1f%% %7.1f%% %12.4f\n", e,
                  measure == kvtrim::EnergyMeasure::kSingularValues ? "sigma" : "sigma^2", ranks.c_str(), bytes,
                  100.0 * bytes / static_cast<double>(full), 100.0 * static_cast<double>(agree) / static_cast<double>(total),
                  dlogit / static_cast<double>(total * V));
    }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  synthetic_report();
  model_report();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
