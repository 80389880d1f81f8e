// Exact attention: the cache's prefill and decode outputs against a naive double-precision reference.
#include <kvtrim/cpu_attention.hpp>
#include <kvtrim/dtype.hpp>

#include "testing.hpp"

using kvtest::naive_attention;
using kvtest::Tokens;

namespace {

// Reference output of query head h at token t (causal over tokens 0..t), for every query head.
std::vector<double> reference_row(const Tokens& tok, int t, int qh, int group) {
  const int kv = qh / group, d = tok.d;
  std::vector<const float*> keys, values;
  for (int j = 0; j <= t; ++j) {
    keys.push_back(tok.k[j].data() + kv * d);
    values.push_back(tok.v[j].data() + kv * d);
  }
  return naive_attention(tok.q[t].data() + qh * d, keys, values, d);
}

// fp32 accumulation over up to a few hundred tokens: absolute error well under 1e-4 for unit-scale data.
constexpr double kTol = 2e-5;

}  // namespace

TEST_CASE("prefill and decode match naive attention (MHA and GQA, several head dims)", "[attention]") {
  struct Shape {
    int n_q, n_kv, d;
  };
  const Shape shapes[] = {{2, 2, 8}, {4, 1, 8}, {4, 4, 64}, {8, 2, 64}, {2, 2, 128}, {8, 4, 128}};
  for (auto s : shapes) {
    CAPTURE(s.n_q, s.n_kv, s.d);
    kvtrim::CacheConfig cfg{.n_layers = 2, .n_kv_heads = s.n_kv, .n_q_heads = s.n_q, .head_dim = s.d, .budget = 300};
    const int prompt = 150, total = 170;  // 150 spans two prefill row blocks of 128
    Tokens tok(cfg, total, 1000u + static_cast<unsigned>(s.d));
    kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
    const int group = s.n_q / s.n_kv;
    const std::size_t qw = static_cast<std::size_t>(s.n_q) * s.d;
    for (int layer = 0; layer < cfg.n_layers; ++layer) {
      auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
      std::vector<float> out(Q.size());
      cache.prefill(layer, Q, K, V, out);
      for (int t : {0, 1, 63, 127, 128, 149})
        for (int qh = 0; qh < s.n_q; ++qh) {
          const auto ref = reference_row(tok, t, qh, group);
          for (int i = 0; i < s.d; ++i) REQUIRE(std::abs(out[t * qw + qh * s.d + i] - ref[i]) < kTol);
        }
    }
    std::vector<float> out(qw);
    for (int t = prompt; t < total; ++t)
      for (int layer = 0; layer < cfg.n_layers; ++layer) {
        cache.decode(layer, tok.q[t], tok.k[t], tok.v[t], out);
        for (int qh = 0; qh < s.n_q; ++qh) {
          const auto ref = reference_row(tok, t, qh, group);
          for (int i = 0; i < s.d; ++i) REQUIRE(std::abs(out[qh * s.d + i] - ref[i]) < kTol);
        }
      }
  }
}

TEST_CASE("decode from an empty cache matches naive attention token by token", "[attention]") {
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 6, .head_dim = 16, .budget = 64};
  Tokens tok(cfg, 64, 5);
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  std::vector<float> out(6 * 16);
  for (int t = 0; t < 64; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    for (int qh = 0; qh < 6; ++qh) {
      const auto ref = reference_row(tok, t, qh, 3);
      for (int i = 0; i < 16; ++i) REQUIRE(std::abs(out[qh * 16 + i] - ref[i]) < kTol);
    }
  }
}

TEST_CASE("softmax is stable for large logits", "[attention]") {
  // Logits around 1e4 overflow exp() without max subtraction; the reference subtracts the max in double.
  kvtrim::CacheConfig cfg{.n_layers = 1, .n_kv_heads = 1, .n_q_heads = 1, .head_dim = 8, .budget = 16};
  Tokens tok(cfg, 16, 11, 40.0f);
  kvtrim::KVCache<kvtrim::FullCache> cache(cfg);
  std::vector<float> out(8);
  for (int t = 0; t < 16; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    const auto ref = reference_row(tok, t, 0, 1);
    for (int i = 0; i < 8; ++i) {
      REQUIRE(std::isfinite(out[i]));
      REQUIRE(std::abs(out[i] - ref[i]) < 1e-4);
    }
  }
}

// ---- the decode kernel itself: every path x storage type x shape ----------------------------------------------

namespace {

using kvtrim::detail::AttendPath;

// Softmax probabilities [g x n] and outputs [g x dv] in double, from the values as stored (rounded to T).
struct Reference {
  std::vector<double> P, O;
};
template <class T>
Reference reference_attention(const std::vector<T>& K, const std::vector<T>& V, int n, int dk, int dv,
                              const std::vector<float>& Q, int g, float scale) {
  Reference r{std::vector<double>(static_cast<std::size_t>(g) * n), std::vector<double>(static_cast<std::size_t>(g) * dv)};
  for (int a = 0; a < g; ++a) {
    double* p = r.P.data() + static_cast<std::size_t>(a) * n;
    double m = -INFINITY;
    for (int i = 0; i < n; ++i) {
      double s = 0;
      for (int c = 0; c < dk; ++c)
        s += double(Q[static_cast<std::size_t>(a) * dk + c]) * double(kvtrim::to_float(K[static_cast<std::size_t>(i) * dk + c]));
      p[i] = s * double(scale);
      m = std::max(m, p[i]);
    }
    double z = 0;
    for (int i = 0; i < n; ++i) z += (p[i] = std::exp(p[i] - m));
    for (int i = 0; i < n; ++i) p[i] /= z;
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < dv; ++c)
        r.O[static_cast<std::size_t>(a) * dv + c] += p[i] * double(kvtrim::to_float(V[static_cast<std::size_t>(i) * dv + c]));
  }
  return r;
}

template <class T>
std::vector<T> stored(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  kvtrim::from_float(x.data(), out.data(), x.size());
  return out;
}

const char* path_name(AttendPath p) {
  return p == AttendPath::kAvx512 ? "avx512" : p == AttendPath::kAvx2 ? "avx2" : "portable";
}
constexpr AttendPath kPaths[] = {AttendPath::kPortable, AttendPath::kAvx2, AttendPath::kAvx512};

struct KernelRun {
  std::vector<float> P, O;
};

// Runs one path on (K, V) with P and O pre-filled with garbage (the kernel must overwrite all of it).
template <class T>
KernelRun run_kernel(AttendPath path, const std::vector<T>& K, const std::vector<T>& V, int n, int dk, int dv,
                     const std::vector<float>& Q, int g, float scale) {
  KernelRun r{std::vector<float>(static_cast<std::size_t>(g) * n, 7.0f), std::vector<float>(static_cast<std::size_t>(g) * dv, NAN)};
  kvtrim::detail::attend(path, K.data(), V.data(), n, dk, dv, Q.data(), g, scale, r.P.data(), r.O.data());
  return r;
}

// Checks one path against the double reference: |P - ref| <= 1e-6 + 1e-5 ref, |O - ref| <= otol, and every
// row of P sums to 1 (worst cases, so that a failure names the element).
void require_matches(const KernelRun& got, const Reference& ref, int n, int g, double otol) {
  std::size_t worst_p = 0, worst_o = 0;
  double excess_p = -1, err_o = 0, err_sum = 0;
  for (std::size_t i = 0; i < ref.P.size(); ++i) {
    const double e = std::abs(double(got.P[i]) - ref.P[i]) - (1e-6 + 1e-5 * ref.P[i]);
    if (!(e <= excess_p)) excess_p = e, worst_p = i;  // NaN counts as worst
  }
  for (int a = 0; a < g && n > 0; ++a) {
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += got.P[static_cast<std::size_t>(a) * n + i];
    err_sum = std::max(err_sum, std::abs(sum - 1.0));
  }
  for (std::size_t i = 0; i < ref.O.size(); ++i) {
    const double e = std::abs(double(got.O[i]) - ref.O[i]);
    if (!(e <= err_o)) err_o = e, worst_o = i;
  }
  CAPTURE(worst_p, excess_p, worst_o, err_o, err_sum);
  REQUIRE(excess_p <= 0);
  REQUIRE(err_o <= otol);
  REQUIRE(err_sum < 1e-5);
}

// Largest |a - b| over two arrays (NaN gives NaN).
double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(double(a[i]) - double(b[i]));
    if (!(e <= m)) m = e;
  }
  return m;
}

template <class T>
void check_kernel_shapes() {
  kvtest::Rng rng(2024);
  struct Dims {
    int dk, dv;
  };
  // 64 and 128 have compile-time kernels; the rest run the generic ones: dk != dv, dims that are not a
  // multiple of 8 (tails), tiny dims.
  const Dims dims[] = {{64, 64}, {128, 128}, {8, 8}, {16, 24}, {20, 12}, {3, 5}, {80, 80}};
  // n: empty, single, odd tails, exactly a tile (16/32 rows), a tile plus one, several tiles with a tail.
  const int ns[] = {0, 1, 2, 7, 16, 17, 32, 33, 100};
  for (auto dm : dims)
    for (int n : ns)
      for (int g = 1; g <= 8; ++g) {
        const auto Kf = rng.normal(static_cast<std::size_t>(n) * dm.dk), Vf = rng.normal(static_cast<std::size_t>(n) * dm.dv);
        const auto Q = rng.normal(static_cast<std::size_t>(g) * dm.dk);
        const auto K = stored<T>(Kf), V = stored<T>(Vf);
        const float scale = 1.0f / std::sqrt(static_cast<float>(dm.dk));
        const Reference ref = reference_attention(K, V, n, dm.dk, dm.dv, Q, g, scale);
        std::vector<std::pair<AttendPath, KernelRun>> runs;
        for (AttendPath path : kPaths) {
          if (!kvtrim::detail::attend_available<T>(path)) continue;
          CAPTURE(kvtrim::storage_traits<T>::kName, path_name(path), dm.dk, dm.dv, n, g);
          runs.emplace_back(path, run_kernel(path, K, V, n, dm.dk, dm.dv, Q, g, scale));
          const KernelRun& got = runs.back().second;
          if (n == 0) {
            REQUIRE(std::all_of(got.O.begin(), got.O.end(), [](float o) { return o == 0.0f; }));
            continue;
          }
          require_matches(got, ref, n, g, 2e-5);
        }
        CAPTURE(kvtrim::storage_traits<T>::kName, dm.dk, dm.dv, n, g);
        for (std::size_t i = 1; i < runs.size(); ++i) {  // every path against the portable one, within rounding
          CAPTURE(path_name(runs[i].first));
          REQUIRE(max_diff(runs[0].second.P, runs[i].second.P) <= 1e-6);
          REQUIRE(max_diff(runs[0].second.O, runs[i].second.O) <= 2e-5);
        }
        if (runs.size() == 3) {  // the two x86 builds of one kernel: the same bits
          REQUIRE(runs[1].second.P == runs[2].second.P);
          REQUIRE(runs[1].second.O == runs[2].second.O);
        }
      }
}

// Scores that grow (or shrink) along the sequence, so the running maximum changes tile after tile (the
// output is rescaled many times), and logits large enough that most probabilities underflow.
template <class T>
void check_kernel_running_max() {
  kvtest::Rng rng(99);
  const int d = 64, g = 4;
  for (int n : {40, 300, 1000})
    for (double slope : {8.0, -8.0, 0.05})
      for (AttendPath path : kPaths) {
        if (!kvtrim::detail::attend_available<T>(path)) continue;
        CAPTURE(kvtrim::storage_traits<T>::kName, path_name(path), n, slope);
        const auto Q = rng.normal(static_cast<std::size_t>(g) * d);
        std::vector<float> Kf(static_cast<std::size_t>(n) * d);
        for (int i = 0; i < n; ++i)  // key i = (slope * i / n) * query 0 + noise: score grows with i when slope > 0
          for (int c = 0; c < d; ++c)
            Kf[static_cast<std::size_t>(i) * d + c] =
                static_cast<float>(slope * i / n) * Q[static_cast<std::size_t>(c)] + 0.1f * rng.normal(1)[0];
        const auto Vf = rng.normal(static_cast<std::size_t>(n) * d);
        const auto K = stored<T>(Kf), V = stored<T>(Vf);
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
        const Reference ref = reference_attention(K, V, n, d, d, Q, g, scale);
        const KernelRun got = run_kernel(path, K, V, n, d, d, Q, g, scale);
        REQUIRE(std::all_of(got.P.begin(), got.P.end(), [](float p) { return std::isfinite(p); }));
        require_matches(got, ref, n, g, 5e-5);
      }
}

}  // namespace

TEST_CASE("decode kernel, float storage: every path and shape against a double reference", "[attention][kernel]") {
  check_kernel_shapes<float>();
}
TEST_CASE("decode kernel, half storage: every path and shape against a double reference", "[attention][kernel]") {
  check_kernel_shapes<kvtrim::half>();
}
TEST_CASE("decode kernel, bf16 storage: every path and shape against a double reference", "[attention][kernel]") {
  check_kernel_shapes<kvtrim::bfloat16>();
}
TEST_CASE("decode kernel: a maximum that keeps moving, every path and storage type", "[attention][kernel]") {
  check_kernel_running_max<float>();
  check_kernel_running_max<kvtrim::half>();
  check_kernel_running_max<kvtrim::bfloat16>();
}

namespace {
// Many tiles, with scores that drift along the sequence (the running maximum moves) and a group that is not a
// multiple of 4: the AVX2 and AVX-512 builds must agree bit for bit.
template <class T>
void check_x86_builds_agree() {
  kvtest::Rng rng(7);
  for (int d : {64, 128, 40})
    for (int g : {4, 8, 6})
      for (int n : {1000, 4099}) {
        CAPTURE(kvtrim::storage_traits<T>::kName, d, g, n);
        const auto Q = rng.normal(static_cast<std::size_t>(g) * d);
        auto Kf = rng.normal(static_cast<std::size_t>(n) * d);
        for (int i = 0; i < n; ++i) {  // key i leans towards query 0 by 3 i / n: later scores grow
          const float lean = 3.0f * static_cast<float>(i) / static_cast<float>(n);
          for (int c = 0; c < d; ++c) Kf[static_cast<std::size_t>(i) * d + c] += lean * Q[static_cast<std::size_t>(c)];
        }
        const auto K = stored<T>(Kf), V = stored<T>(rng.normal(static_cast<std::size_t>(n) * d));
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
        const KernelRun a = run_kernel(AttendPath::kAvx2, K, V, n, d, d, Q, g, scale);
        const KernelRun b = run_kernel(AttendPath::kAvx512, K, V, n, d, d, Q, g, scale);
        REQUIRE(a.P == b.P);
        REQUIRE(a.O == b.O);
      }
}
}  // namespace

TEST_CASE("decode kernel: the AVX-512 build gives the AVX2 build's bits on long sequences", "[attention][kernel]") {
  if (!kvtrim::detail::attend_available<kvtrim::half>(AttendPath::kAvx512)) {
    WARN("this CPU cannot run the AVX-512 path: the two x86 builds were not compared");
    return;
  }
  check_x86_builds_agree<float>();
  check_x86_builds_agree<kvtrim::half>();
  check_x86_builds_agree<kvtrim::bfloat16>();
}

TEST_CASE("decode kernel: groups larger than one sweep (33 queries)", "[attention][kernel]") {
  kvtest::Rng rng(3);
  const int n = 70, d = 24, g = 33;
  const auto K = rng.normal(static_cast<std::size_t>(n) * d), V = rng.normal(K.size());
  const auto Q = rng.normal(static_cast<std::size_t>(g) * d);
  const float scale = 0.2f;
  const Reference ref = reference_attention(K, V, n, d, d, Q, g, scale);
  for (AttendPath path : kPaths) {
    if (!kvtrim::detail::attend_available<float>(path)) continue;
    CAPTURE(path_name(path));
    require_matches(run_kernel(path, K, V, n, d, d, Q, g, scale), ref, n, g, 2e-5);
  }
}

TEST_CASE("decode kernel: the default entry point runs the fastest available path", "[attention][kernel]") {
  kvtest::Rng rng(4);
  const int n = 50, d = 64, g = 4;
  const auto K = stored<kvtrim::half>(rng.normal(static_cast<std::size_t>(n) * d));
  const auto V = stored<kvtrim::half>(rng.normal(static_cast<std::size_t>(n) * d));
  const auto Q = rng.normal(static_cast<std::size_t>(g) * d);
  std::vector<float> P(static_cast<std::size_t>(g) * n), O(static_cast<std::size_t>(g) * d);
  kvtrim::detail::attend(K.data(), V.data(), n, d, d, Q.data(), g, 0.125f, P.data(), O.data());
  AttendPath best = AttendPath::kPortable;  // the last available in kPaths, which runs from slowest to fastest
  for (AttendPath path : kPaths)
    if (kvtrim::detail::attend_available<kvtrim::half>(path)) best = path;
  const KernelRun want = run_kernel(best, K, V, n, d, d, Q, g, 0.125f);
  REQUIRE(P == want.P);  // bit for bit: the same path
  REQUIRE(O == want.O);
}

namespace {

template <class T>
void check_row_dots() {
  kvtest::Rng rng(12);
  std::vector<float> tile;
  // With AVX2 every row's dot is the same fixed sequence of operations wherever the row sits in K.
  const bool fixed_order = kvtrim::detail::attend_available<T>(AttendPath::kAvx2);
  for (int d : {5, 8, 40, 64, 77, 128})
    for (int n : {1, 7, 8, 9, 33}) {
      const auto K = stored<T>(rng.normal(static_cast<std::size_t>(n) * d));
      const auto x = rng.normal(static_cast<std::size_t>(d));
      std::vector<float> out(static_cast<std::size_t>(n), NAN), portable(static_cast<std::size_t>(n), NAN);
      kvtrim::detail::row_dots(K.data(), n, d, x.data(), out.data(), tile);
      kvtrim::detail::row_dots_portable(K.data(), n, d, x.data(), portable.data(), tile);
      for (int i = 0; i < n; ++i) {
        double want = 0, size = 0;
        for (int e = 0; e < d; ++e) {
          const double p = double(x[static_cast<std::size_t>(e)]) *
                           double(kvtrim::to_float(K[static_cast<std::size_t>(i) * d + e]));
          want += p;
          size += std::abs(p);
        }
        INFO("d " << d << ", n " << n << ", row " << i);
        REQUIRE(std::abs(double(out[static_cast<std::size_t>(i)]) - want) <= 1e-6 * size + 1e-30);
        REQUIRE(std::abs(double(portable[static_cast<std::size_t>(i)]) - want) <= 1e-6 * size + 1e-30);
        if (fixed_order) {
          float alone = NAN;
          kvtrim::detail::row_dots(K.data() + static_cast<std::size_t>(i) * d, 1, d, x.data(), &alone, tile);
          REQUIRE(alone == out[static_cast<std::size_t>(i)]);
        }
      }
    }
}

}  // namespace

TEST_CASE("key row dots (merge similarities): both paths, every storage type and width, against a double reference",
          "[attention][kernel]") {
  check_row_dots<float>();
  check_row_dots<kvtrim::half>();
  check_row_dots<kvtrim::bfloat16>();
}

