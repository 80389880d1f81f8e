// Eigen Attention: calibration (rank rule, energy measures), basis files, low-rank storage, and its
// composition with eviction policies (FullCache, StreamingLLM, the registry's eigen+h2o).
#include <kvtrim/policies/eigen_attention.hpp>
#include <kvtrim/registry.hpp>

#include <Eigen/QR>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>

#include "property.hpp"
#include "testing.hpp"


using kvtest::Tokens;
using kvtrim::CacheConfig;
using kvtrim::EigenAttention;
using kvtrim::EigenBasis;
using kvtrim::EigenCalibration;
using kvtrim::EigenCalibrator;
using kvtrim::KVCache;
using Catch::Contains;

namespace {

using MatD = Eigen::MatrixXd;

MatD gaussian(int rows, int cols, kvtest::Rng& rng) {
  MatD m(rows, cols);
  const auto x = rng.normal(static_cast<std::size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m(r, c) = x[static_cast<std::size_t>(r) * cols + c];
  return m;
}

// rows x cols (rows >= cols) with orthonormal columns.
MatD orthonormal_columns(int rows, int cols, kvtest::Rng& rng) {
  Eigen::HouseholderQR<MatD> qr(gaussian(rows, cols, rng));
  return qr.householderQ() * MatD::Identity(rows, cols);
}

// N x d rows whose singular values are exactly `sigma` (descending) and right singular vectors the columns of U:
// X = Z diag(sigma) Uᵀ with Z having orthonormal columns.
MatD structured_rows(int N, const std::vector<double>& sigma, const MatD& U, kvtest::Rng& rng) {
  const int d = static_cast<int>(sigma.size());
  MatD Z = orthonormal_columns(N, d, rng);
  MatD S = MatD::Zero(d, d);
  for (int j = 0; j < d; ++j) S(j, j) = sigma[j];
  return Z * S * U.transpose();
}

// Packs per-head N x d blocks side by side into row-major [N x heads*d] floats (the prefill layout).
std::vector<float> interleave(const std::vector<MatD>& heads) {
  const auto N = heads[0].rows(), d = heads[0].cols();
  const auto H = static_cast<Eigen::Index>(heads.size());
  std::vector<float> out(static_cast<std::size_t>(N * H * d));
  for (Eigen::Index t = 0; t < N; ++t)
    for (Eigen::Index h = 0; h < H; ++h)
      for (Eigen::Index i = 0; i < d; ++i) out[static_cast<std::size_t>((t * H + h) * d + i)] = float(heads[h](t, i));
  return out;
}

// Cumulative energy fraction of the first r values (measure applied to singular values), plain loops.
double cumulative(const std::vector<double>& sigma, int r, bool squared) {
  double total = 0, part = 0;
  for (std::size_t j = 0; j < sigma.size(); ++j) {
    const double e = squared ? sigma[j] * sigma[j] : sigma[j];
    total += e;
    if (static_cast<int>(j) < r) part += e;
  }
  return part / total;
}

// Random calibration data shaped like a cache's inputs (Gaussian keys/values/queries).
EigenBasis calibrate_random(const CacheConfig& cfg, int N, const EigenCalibration& opt, std::uint64_t seed) {
  Tokens tok(cfg, N, seed);
  EigenCalibrator cal(cfg);
  for (int l = 0; l < cfg.n_layers; ++l)
    cal.add(l, Tokens::rows(tok.k, 0, N), Tokens::rows(tok.v, 0, N), Tokens::rows(tok.q, 0, N));
  return cal.basis(opt);
}

// A low-rank projection of a d-vector back into d dims: U Uᵀ x (float in, float out, double inside).
std::vector<float> reproject(const Eigen::MatrixXf& U, const float* x, int d) {
  const MatD Ud = U.cast<double>();
  Eigen::VectorXd v(d);
  for (int i = 0; i < d; ++i) v(i) = x[i];
  const Eigen::VectorXd y = Ud * (Ud.transpose() * v);
  std::vector<float> out(static_cast<std::size_t>(d));
  for (int i = 0; i < d; ++i) out[i] = float(y(i));
  return out;
}

// Feeds every token of `tok` through `reproject` per KV head (keys and queries with U_k, values with U_v).
struct Reprojected {
  std::vector<std::vector<float>> q, k, v;
};
Reprojected reproject_tokens(const Tokens& tok, const EigenBasis& b, int layer, int group) {
  Reprojected r;
  const int d = tok.d;
  for (int t = 0; t < tok.size(); ++t) {
    std::vector<float> q, k, v;
    for (int h = 0; h < tok.n_kv; ++h) {
      auto kh = reproject(b.key(layer, h), tok.k[t].data() + h * d, d);
      auto vh = reproject(b.value(layer, h), tok.v[t].data() + h * d, d);
      k.insert(k.end(), kh.begin(), kh.end());
      v.insert(v.end(), vh.begin(), vh.end());
      for (int g = 0; g < group; ++g) {
        auto qh = reproject(b.key(layer, h), tok.q[t].data() + (h * group + g) * d, d);
        q.insert(q.end(), qh.begin(), qh.end());
      }
    }
    r.q.push_back(q);
    r.k.push_back(k);
    r.v.push_back(v);
  }
  return r;
}

// Reference attention in the stored space, in double with plain loops: q~ = U_kᵀ q, k~_j = U_kᵀ k_j,
// v~_j = U_vᵀ v_j, p = softmax(q~·k~_j / sqrt(head_dim)), output U_v Σ p_j v~_j.
std::vector<double> lowrank_attention(const Eigen::MatrixXf& Uk, const Eigen::MatrixXf& Uv, const float* q,
                                      const std::vector<const float*>& keys, const std::vector<const float*>& values,
                                      int d) {
  const auto rk = static_cast<int>(Uk.cols()), rv = static_cast<int>(Uv.cols());
  auto project = [d](const Eigen::MatrixXf& U, int r, const float* x) {
    std::vector<double> y(static_cast<std::size_t>(r), 0.0);
    for (int j = 0; j < r; ++j)
      for (int i = 0; i < d; ++i) y[j] += double(U(i, j)) * double(x[i]);
    return y;
  };
  const auto qt = project(Uk, rk, q);
  std::vector<double> s(keys.size());
  double m = -INFINITY;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    const auto kt = project(Uk, rk, keys[j]);
    double dot = 0;
    for (int i = 0; i < rk; ++i) dot += qt[i] * kt[i];
    s[j] = dot / std::sqrt(double(d));
    m = std::max(m, s[j]);
  }
  double z = 0;
  for (auto& e : s) z += (e = std::exp(e - m));
  std::vector<double> low(static_cast<std::size_t>(rv), 0.0);
  for (std::size_t j = 0; j < values.size(); ++j) {
    const auto vt = project(Uv, rv, values[j]);
    for (int i = 0; i < rv; ++i) low[i] += s[j] / z * vt[i];
  }
  std::vector<double> out(static_cast<std::size_t>(d), 0.0);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < rv; ++j) out[i] += double(Uv(i, j)) * low[j];
  return out;
}

// FNV-1a 64 written independently of the header, to build deliberately wrong files with a valid checksum.
std::uint64_t fnv1a(const std::vector<unsigned char>& b, std::size_t n) {
  std::uint64_t h = 14695981039346656037ULL;
  for (std::size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 1099511628211ULL;
  }
  return h;
}
void reseal(std::vector<unsigned char>& b) {
  const std::uint64_t h = fnv1a(b, b.size() - 8);
  for (int i = 0; i < 8; ++i) b[b.size() - 8 + i] = static_cast<unsigned char>(h >> (8 * i));
}
void put_le32(std::vector<unsigned char>& b, std::size_t at, std::uint32_t x) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<unsigned char>(x >> (8 * i));
}

bool same_basis(const EigenBasis& a, const EigenBasis& b) {
  if (a.n_layers() != b.n_layers() || a.n_kv_heads() != b.n_kv_heads() || a.head_dim() != b.head_dim()) return false;
  for (int l = 0; l < a.n_layers(); ++l)
    for (int h = 0; h < a.n_kv_heads(); ++h)
      if (a.key(l, h) != b.key(l, h) || a.value(l, h) != b.value(l, h)) return false;
  return true;
}

CacheConfig shape(int L, int H, int Hq, int d, int budget = 64) {
  return {.n_layers = L, .n_kv_heads = H, .n_q_heads = Hq, .head_dim = d, .budget = budget};
}

}  // namespace

// ---- rank rule and calibration on known spectra ------------------------------------------------------------

TEST_CASE("rank_for_energy on hand-worked spectra", "[eigen][calibration]") {
  using kvtrim::EnergyMeasure;
  using kvtrim::RankRule;
  // Singular values 4, 3, 2, 1 (eigenvalues of XᵀX 16, 9, 4, 1). Sums: sigma 10 -> 0.4, 0.7, 0.9, 1;
  // sigma^2 30 -> 16/30 = .533, 25/30 = .833, 29/30 = .967, 1.
  const std::vector<double> ev{16, 9, 4, 1};
  auto rank = [&](double e, EnergyMeasure m, RankRule r) { return kvtrim::rank_for_energy(ev, e, m, r); };
  const auto S = EnergyMeasure::kSingularValues, S2 = EnergyMeasure::kSquaredSingularValues;
  const auto reach = RankRule::kSmallestReaching, below = RankRule::kOfficialBelow;
  CHECK(rank(0.4, S, reach) == 1);
  CHECK(rank(0.41, S, reach) == 2);
  CHECK(rank(0.7, S, reach) == 2);
  CHECK(rank(0.8, S, reach) == 3);
  CHECK(rank(0.95, S, reach) == 4);
  CHECK(rank(1.0, S, reach) == 4);
  CHECK(rank(0.5, S2, reach) == 1);
  CHECK(rank(0.6, S2, reach) == 2);
  CHECK(rank(0.9, S2, reach) == 3);
  CHECK(rank(0.97, S2, reach) == 4);
  // Official: #{ j : cumsum_j < energy }: 0.8 -> {0.4, 0.7} = 2; 0.95 -> 3; 1.0 -> 3; 0.3 -> 0 -> clamped to 1.
  CHECK(rank(0.8, S, below) == 2);
  CHECK(rank(0.95, S, below) == 3);
  CHECK(rank(1.0, S, below) == 3);
  CHECK(rank(0.3, S, below) == 1);
  CHECK(rank(0.9, S2, below) == 2);
  // Negative round-off eigenvalues count as zero: the rank stops at the real ones.
  const std::vector<double> ev_neg{4, 1, -1e-18, -1e-17};
  CHECK(kvtrim::rank_for_energy(ev_neg, 1.0, S, reach) == 2);
  CHECK_THROWS_WITH(kvtrim::rank_for_energy(std::vector<double>{0, 0}, 0.5, S, reach), Contains("no energy"));
}

TEST_CASE("calibration on data with a known spectrum picks the energy rank and its reconstruction error",
          "[eigen][calibration]") {
  const int d = 16, N = 300;
  kvtest::Rng rng(11);
  // Two KV heads with different decaying spectra for keys, and another for values.
  std::vector<std::vector<double>> sk(2), sv(2);
  for (int j = 0; j < d; ++j) {
    sk[0].push_back(10.0 * std::pow(0.7, j));
    sk[1].push_back(8.0 * std::pow(0.5, j) + 0.01 * (d - j));
    sv[0].push_back(5.0 / (1.0 + j));
    sv[1].push_back(3.0 * std::pow(0.8, j));
  }
  std::vector<MatD> Uk, Uv, K, V;
  for (int h = 0; h < 2; ++h) {
    Uk.push_back(orthonormal_columns(d, d, rng));
    Uv.push_back(orthonormal_columns(d, d, rng));
    K.push_back(structured_rows(N, sk[h], Uk[h], rng));
    V.push_back(structured_rows(N, sv[h], Uv[h], rng));
  }
  const auto cfg = shape(1, 2, 2, d);
  EigenCalibrator cal(cfg);
  const auto Kf = interleave(K), Vf = interleave(V);
  cal.add(0, std::span<const float>(Kf).first(Kf.size() / 2), std::span<const float>(Vf).first(Vf.size() / 2));
  cal.add(0, std::span<const float>(Kf).last(Kf.size() / 2), std::span<const float>(Vf).last(Vf.size() / 2));
  REQUIRE(cal.key_rows(0, 1) == N);

  for (bool squared : {false, true}) {
    for (int target = 1; target < d; ++target) {
      // An energy strictly between the cumulative fractions of rank target-1 and target of head 0's keys.
      const double e = 0.5 * (cumulative(sk[0], target - 1, squared) + cumulative(sk[0], target, squared));
      CAPTURE(squared, target, e);
      EigenCalibration opt{.energy = e,
                           .measure = squared ? kvtrim::EnergyMeasure::kSquaredSingularValues
                                              : kvtrim::EnergyMeasure::kSingularValues,
                           .uniform_layer_rank = false};
      const EigenBasis b = cal.basis(opt);
      // Expected ranks, per head, straight from the spectra.
      std::vector<int> want_k(2), want_v(2);
      for (int h = 0; h < 2; ++h) {
        while (cumulative(sk[h], want_k[h], squared) < e) ++want_k[h];
        while (cumulative(sv[h], want_v[h], squared) < e) ++want_v[h];
      }
      REQUIRE(want_k[0] == target);
      for (int h = 0; h < 2; ++h) {
        REQUIRE(b.key_rank(0, h) == want_k[h]);
        REQUIRE(b.value_rank(0, h) == want_v[h]);
        // Reconstruction error of the calibration rows = the energy left out (squared singular values).
        const MatD Ub = b.key(0, h).cast<double>();
        const double err = (K[h] - K[h] * Ub * Ub.transpose()).squaredNorm() / K[h].squaredNorm();
        const double tail = 1.0 - cumulative(sk[h], want_k[h], true);
        REQUIRE(std::abs(err - tail) < 1e-5);
        if (squared) REQUIRE(err <= 1.0 - e + 1e-6);
        // The basis spans the top singular directions: its projection keeps each of them whole.
        for (int j = 0; j < want_k[h]; ++j) REQUIRE((Ub.transpose() * Uk[h].col(j)).norm() == Approx(1.0).margin(1e-4));
      }
      // The official rule keeps one direction fewer when the energy falls strictly between two cumulative values.
      opt.rule = kvtrim::RankRule::kOfficialBelow;
      REQUIRE(cal.basis(opt).key_rank(0, 0) == std::max(target - 1, 1));
      // Uniform rank per layer (official): every head takes the largest rank.
      opt.rule = kvtrim::RankRule::kSmallestReaching;
      opt.uniform_layer_rank = true;
      const EigenBasis u = cal.basis(opt);
      for (int h = 0; h < 2; ++h) {
        REQUIRE(u.key_rank(0, h) == std::max(want_k[0], want_k[1]));
        REQUIRE(u.value_rank(0, h) == std::max(want_v[0], want_v[1]));
      }
    }
  }
  SECTION("fixed ranks override the energy rule") {
    const EigenBasis b = cal.basis({.key_rank = 5, .value_rank = 3});
    REQUIRE(b.key_rank(0, 0) == 5);
    REQUIRE(b.key_rank(0, 1) == 5);
    REQUIRE(b.value_rank(0, 1) == 3);
    REQUIRE(b.floats_per_token() == 2 * (5 + 3));
    REQUIRE(b.full_floats_per_token() == 2 * 2 * d);
  }
}

TEST_CASE("queries join the key basis; a per-layer key basis is shared by all heads", "[eigen][calibration]") {
  const int d = 12, N = 200;
  kvtest::Rng rng(5);
  const MatD U = orthonormal_columns(d, d, rng);
  // Keys of both heads live in span(U[:, 0..3)); queries in span(U[:, 3..5)) (head 0) and U[:, 5..7) (head 1).
  auto rows_in = [&](int first, int count) {
    MatD X = gaussian(N, count, rng) * U.middleCols(first, count).transpose();
    return X;
  };
  std::vector<MatD> K{rows_in(0, 3), rows_in(0, 3)}, V{gaussian(N, d, rng), gaussian(N, d, rng)};
  std::vector<MatD> Q{rows_in(3, 2), rows_in(3, 2), rows_in(5, 2), rows_in(5, 2)};  // 2 query heads per KV head
  const auto cfg = shape(1, 2, 4, d);
  EigenCalibrator cal(cfg);
  const auto Kf = interleave(K), Vf = interleave(V), Qf = interleave(Q);
  cal.add(0, Kf, Vf, Qf);
  REQUIRE(cal.query_rows(0, 0) == 2 * N);
  const double e = 0.999;  // float round-off of exactly low-rank rows stays far below 0.1 %
  EigenCalibration opt{.energy = e, .uniform_layer_rank = false, .use_queries = false};
  EigenBasis b = cal.basis(opt);
  REQUIRE(b.key_rank(0, 0) == 3);
  REQUIRE(b.key_rank(0, 1) == 3);
  opt.use_queries = true;
  b = cal.basis(opt);
  REQUIRE(b.key_rank(0, 0) == 5);
  REQUIRE(b.key_rank(0, 1) == 5);
  // Projecting a head-0 query with head 0's basis keeps it whole; head 1's basis does not see it.
  const MatD U0 = b.key(0, 0).cast<double>(), U1 = b.key(0, 1).cast<double>();
  REQUIRE((U0.transpose() * U.col(3)).norm() == Approx(1.0).margin(1e-4));
  REQUIRE((U1.transpose() * U.col(3)).norm() < 1e-3);
  opt.key_scope = kvtrim::KeyBasisScope::kPerLayer;
  b = cal.basis(opt);
  REQUIRE(b.key_rank(0, 0) == 7);  // keys (3) + both heads' queries (2 + 2)
  REQUIRE(b.key(0, 0) == b.key(0, 1));
}

// ---- exactness at full rank --------------------------------------------------------------------------------

TEST_CASE("an identity basis is FullCache bit for bit (prefill and decode, GQA)", "[eigen][composition]") {
  const auto cfg = shape(2, 2, 4, 8);
  auto basis = std::make_shared<const EigenBasis>(2, 2, 8);
  kvtest::check_equals_full_cache<EigenAttention<>>({.basis = basis}, cfg, 20, 50);
  kvtest::check_equals_full_cache<EigenAttention<kvtrim::StreamingLLM>>({basis, {.sinks = 2}}, cfg, 0, 30);
}

TEST_CASE("a calibrated full-rank basis reproduces exact attention", "[eigen][composition]") {
  // Full rank but a general rotation: outputs equal FullCache's up to fp32 round-off of the two rotations.
  constexpr double kTol = 3e-5;
  for (int d : {8, 64}) {
    CAPTURE(d);
    const auto cfg = shape(2, 2, 4, d, 80);
    auto basis = std::make_shared<const EigenBasis>(calibrate_random(cfg, 4 * d, {.energy = 1.0}, 3));
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) {
        REQUIRE(basis->key_rank(l, h) == d);
        REQUIRE(basis->value_rank(l, h) == d);
      }
    KVCache<kvtrim::FullCache> full(cfg);
    KVCache<EigenAttention<>> eig(cfg, {.basis = basis});
    Tokens tok(cfg, 80, 21);
    const int prompt = 50;
    const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * d;
    double worst = 0;
    for (int l = 0; l < 2; ++l) {
      auto Q = Tokens::rows(tok.q, 0, prompt), K = Tokens::rows(tok.k, 0, prompt), V = Tokens::rows(tok.v, 0, prompt);
      std::vector<float> a(Q.size()), b(Q.size());
      full.prefill(l, Q, K, V, a);
      eig.prefill(l, Q, K, V, b);
      for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, double(std::abs(a[i] - b[i])));
    }
    std::vector<float> a(qw), b(qw);
    for (int t = prompt; t < 80; ++t)
      for (int l = 0; l < 2; ++l) {
        full.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
        eig.decode(l, tok.q[t], tok.k[t], tok.v[t], b);
        for (std::size_t i = 0; i < qw; ++i) worst = std::max(worst, double(std::abs(a[i] - b[i])));
        // And against the independent double reference over every token so far.
        const int qh = t % cfg.n_q_heads, kv = qh / 2;
        std::vector<const float*> keys, values;
        for (int j = 0; j <= t; ++j) {
          keys.push_back(tok.k[j].data() + kv * d);
          values.push_back(tok.v[j].data() + kv * d);
        }
        const auto ref = kvtest::naive_attention(tok.q[t].data() + qh * d, keys, values, d);
        for (int i = 0; i < d; ++i) REQUIRE(std::abs(b[qh * d + i] - ref[i]) < kTol);
      }
    CAPTURE(worst);
    REQUIRE(worst < kTol);
    kvtest::check_invariants(eig);
  }
}

// ---- low-rank storage and composition ---------------------------------------------------------------------

TEST_CASE("low-rank storage: widths, memory, and outputs equal attention over the projected tokens",
          "[eigen][composition]") {
  const int d = 32;
  const auto cfg = shape(1, 2, 4, d, 12);
  auto basis = std::make_shared<const EigenBasis>(
      calibrate_random(cfg, 200, {.energy = 0.6, .uniform_layer_rank = false}, 8));
  const int rk0 = basis->key_rank(0, 0), rv1 = basis->value_rank(0, 1);
  REQUIRE(rk0 < d);
  REQUIRE(rv1 < d);
  KVCache<EigenAttention<kvtrim::StreamingLLM>> cache(cfg, {basis, {.sinks = 2}});
  KVCache<kvtrim::StreamingLLM> plain(cfg, {.sinks = 2});
  REQUIRE(cache.policy_name() == "eigen+streaming");
  for (int h = 0; h < 2; ++h) {
    REQUIRE(cache.backend().head(0, h).key_dim() == basis->key_rank(0, h));
    REQUIRE(cache.backend().head(0, h).value_dim() == basis->value_rank(0, h));
  }
  Tokens tok(cfg, 60, 17);
  std::vector<float> out(4 * d), ref_out(4 * d);
  for (int t = 0; t < 60; ++t) {
    cache.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    plain.decode(0, tok.q[t], tok.k[t], tok.v[t], ref_out);
    for (int h = 0; h < 2; ++h) REQUIRE(cache.positions(0, h) == plain.positions(0, h));
    for (int qh = 0; qh < 4; ++qh) {
      const int kv = qh / 2;
      std::vector<const float*> keys, values;
      for (auto p : cache.positions(0, kv)) {
        keys.push_back(tok.k[p].data() + kv * d);
        values.push_back(tok.v[p].data() + kv * d);
      }
      const auto ref = lowrank_attention(basis->key(0, kv), basis->value(0, kv), tok.q[t].data() + qh * d, keys,
                                         values, d);
      for (int i = 0; i < d; ++i) REQUIRE(std::abs(out[qh * d + i] - ref[i]) < 2e-5);
    }
    kvtest::check_invariants(cache);
  }
  // Memory per token follows the ranks: 4 bytes per stored float + position + StreamingLLM's SlotMeta.
  std::size_t want = 0;
  for (int h = 0; h < 2; ++h)
    want += static_cast<std::size_t>(cache.size(0, h)) *
            (4u * static_cast<std::size_t>(basis->key_rank(0, h) + basis->value_rank(0, h)) + sizeof(std::int64_t) +
             sizeof(kvtrim::StreamingLLM::SlotMeta));
  REQUIRE(cache.bytes_used() == want);
  REQUIRE(cache.bytes_used() < plain.bytes_used());
}

// Differential check: EigenAttention<Inner> on raw inputs behaves like Inner on inputs already projected onto
// the basis subspaces (U Uᵀ x, kept at full width): same kept positions at every step, same outputs.
template <class Inner>
void check_matches_inner_on_subspace(const typename Inner::Params& inner, int prompt, int total, int budget,
                                     std::uint64_t seed) {
  const int d = 16, group = 2;
  const auto cfg = shape(2, 2, 4, d, budget);
  auto basis = std::make_shared<const EigenBasis>(calibrate_random(cfg, 150, {.energy = 0.75}, seed));
  KVCache<EigenAttention<Inner>> low(cfg, {basis, inner});
  KVCache<Inner> ref(cfg, inner);
  Tokens tok(cfg, total, seed + 1);
  std::vector<Reprojected> rp;
  for (int l = 0; l < 2; ++l) rp.push_back(reproject_tokens(tok, *basis, l, group));
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * d;
  constexpr double kTol = 3e-5;
  for (int l = 0; l < 2 && prompt > 0; ++l) {
    std::vector<float> a(qw * prompt), b(qw * prompt);
    low.prefill(l, Tokens::rows(tok.q, 0, prompt), Tokens::rows(tok.k, 0, prompt), Tokens::rows(tok.v, 0, prompt), a);
    ref.prefill(l, Tokens::rows(rp[l].q, 0, prompt), Tokens::rows(rp[l].k, 0, prompt),
                Tokens::rows(rp[l].v, 0, prompt), b);
    for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(std::abs(a[i] - b[i]) < kTol);
    for (int h = 0; h < 2; ++h) REQUIRE(low.positions(l, h) == ref.positions(l, h));
  }
  std::vector<float> a(qw), b(qw);
  for (int t = prompt; t < total; ++t)
    for (int l = 0; l < 2; ++l) {
      low.decode(l, tok.q[t], tok.k[t], tok.v[t], a);
      ref.decode(l, rp[l].q[t], rp[l].k[t], rp[l].v[t], b);
      for (std::size_t i = 0; i < qw; ++i) REQUIRE(std::abs(a[i] - b[i]) < kTol);
      for (int h = 0; h < 2; ++h) REQUIRE(low.positions(l, h) == ref.positions(l, h));
      kvtest::check_invariants(low);
    }
  REQUIRE(low.evictions() == ref.evictions());
  REQUIRE(low.evictions() > 0);
}

TEST_CASE("EigenAttention<StreamingLLM> keeps what StreamingLLM keeps on the projected inputs",
          "[eigen][composition]") {
  check_matches_inner_on_subspace<kvtrim::StreamingLLM>({.sinks = 3}, 30, 90, 20, 31);
}

TEST_CASE("the registry's eigen+h2o keeps what its inner policy keeps on the projected inputs", "[eigen][composition]") {
  using Composed = kvtrim::PolicyNamed<"eigen+h2o">;
  using Inner = Composed::InnerPolicy;
  static_assert(std::is_same_v<Composed::SlotMeta, Inner::SlotMeta>);
  STATIC_REQUIRE(Composed::kSignals == Inner::kSignals);
  Inner::Params p;
  p.heavy_ratio = 0.5;
  check_matches_inner_on_subspace<Inner>(p, 40, 110, 24, 41);
  p.sinks = 2;
  p.heavy_ratio = 0.75;
  check_matches_inner_on_subspace<Inner>(p, 0, 80, 16, 43);
}

TEST_CASE("EigenAttention<FullCache> refuses tokens beyond its capacity like FullCache", "[eigen][composition]") {
  STATIC_REQUIRE(EigenAttention<>::kNeverEvicts);
  const auto cfg = shape(1, 1, 1, 4, 3);
  KVCache<EigenAttention<>> cache(cfg, {.basis = std::make_shared<const EigenBasis>(1, 1, 4)});
  std::vector<float> x(4, 0.5f), out(4);
  for (int t = 0; t < 3; ++t) cache.decode(0, x, x, x, out);
  REQUIRE_THROWS_WITH(cache.decode(0, x, x, x, out), Contains("never evicts"));
  REQUIRE(cache.size(0, 0) == 3);
}

// ---- basis files ----------------------------------------------------------------------------------------------

TEST_CASE("a basis round-trips through bytes and files exactly", "[eigen][io]") {
  const auto cfg = shape(3, 2, 4, 16);
  const EigenBasis b = calibrate_random(cfg, 100, {.energy = 0.8, .uniform_layer_rank = false}, 4);
  const auto bytes = b.to_bytes();
  std::size_t floats = 0;
  for (int l = 0; l < 3; ++l)
    for (int h = 0; h < 2; ++h) floats += 16u * static_cast<std::size_t>(b.key_rank(l, h) + b.value_rank(l, h));
  REQUIRE(bytes.size() == 8 + 4 * 4 + 3 * 2 * 8 + 4 * floats + 8);  // the documented layout
  REQUIRE(same_basis(EigenBasis::from_bytes(bytes), b));

  const auto path = (std::filesystem::temp_directory_path() /
                     ("kvtrim_eigen_basis_" + std::to_string(reinterpret_cast<std::uintptr_t>(&b)) + ".bin"))
                        .string();
  b.save(path);
  const EigenBasis c = EigenBasis::load(path);
  std::filesystem::remove(path);
  REQUIRE(same_basis(c, b));
  REQUIRE_THROWS_WITH(EigenBasis::load(path), Contains("cannot open"));

  // A cache built from the loaded basis computes exactly what one from the original computes.
  KVCache<EigenAttention<>> x(cfg, {.basis = std::make_shared<const EigenBasis>(b)});
  KVCache<EigenAttention<>> y(cfg, {.basis = std::make_shared<const EigenBasis>(c)});
  Tokens tok(cfg, 10, 2);
  std::vector<float> o1(64), o2(64);
  for (int t = 0; t < 10; ++t) {
    x.decode(2, tok.q[t], tok.k[t], tok.v[t], o1);
    y.decode(2, tok.q[t], tok.k[t], tok.v[t], o2);
    REQUIRE(o1 == o2);
  }
}

TEST_CASE("corrupt, truncated or inconsistent basis data is rejected", "[eigen][io]") {
  const EigenBasis b = calibrate_random(shape(2, 2, 2, 8), 60, {.key_rank = 3, .value_rank = 2}, 6);
  const auto good = b.to_bytes();
  REQUIRE(good.size() == 8 + 16 + 2 * 2 * 8 + 4 * 4 * 8 * 5 + 8);
  auto rejects = [](std::vector<unsigned char> bytes, const char* what) {
    REQUIRE_THROWS_WITH(EigenBasis::from_bytes(bytes), Contains(what));
  };
  for (std::size_t n : {std::size_t{0}, std::size_t{7}, std::size_t{8}, std::size_t{30}, std::size_t{40},
                        std::size_t{60}, good.size() / 2, good.size() - 9, good.size() - 1}) {
    CAPTURE(n);
    rejects(std::vector<unsigned char>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n)), "bytes");
  }
  auto longer = good;
  longer.push_back(0);
  rejects(longer, "trailing");
  auto flipped = good;
  flipped[100] ^= 0x10;
  rejects(flipped, "checksum");
  auto magic = good;
  magic[0] = 'X';
  rejects(magic, "magic");
  auto version = good;
  put_le32(version, 8, 2);
  reseal(version);
  rejects(version, "version 2");
  auto rank_big = good;
  put_le32(rank_big, 24, 9);  // key rank of layer 0 head 0 > head_dim 8
  reseal(rank_big);
  rejects(rank_big, "rank 9");
  auto rank_zero = good;
  put_le32(rank_zero, 28, 0);
  reseal(rank_zero);
  rejects(rank_zero, "rank 0");
  auto dims = good;
  put_le32(dims, 20, 0);  // head_dim 0
  reseal(dims);
  rejects(dims, "head_dim 0");
  auto skewed = good;  // a valid checksum over a basis that is no longer orthonormal
  const std::size_t first_float = 8 + 16 + 2 * 2 * 8;
  put_le32(skewed, first_float, std::bit_cast<std::uint32_t>(3.0f));
  reseal(skewed);
  rejects(skewed, "not orthonormal");
  auto nan = good;
  put_le32(nan, first_float + 4, std::bit_cast<std::uint32_t>(std::numeric_limits<float>::quiet_NaN()));
  reseal(nan);
  rejects(nan, "non-finite");
}

// ---- bad inputs -------------------------------------------------------------------------------------------------

TEST_CASE("bad calibration inputs and options throw kvtrim::Error naming the problem", "[eigen][errors]") {
  const int d = 8;
  const auto cfg = shape(2, 2, 4, d);
  Tokens tok(cfg, 20, 1);
  const auto K = Tokens::rows(tok.k, 0, 20), V = Tokens::rows(tok.v, 0, 20), Q = Tokens::rows(tok.q, 0, 20);
  EigenCalibrator cal(cfg);
  cal.add(0, K, V, Q);
  SECTION("options") {
    cal.add(1, K, V);
    for (double e : {0.0, -0.5, 1.01, std::numeric_limits<double>::quiet_NaN()})
      REQUIRE_THROWS_WITH(cal.basis({.energy = e}), Contains("energy must be in (0, 1]"));
    REQUIRE_THROWS_WITH(cal.basis({.key_rank = d + 1}), Contains("key_rank") && Contains("9"));
    REQUIRE_THROWS_WITH(cal.basis({.value_rank = -1}), Contains("value_rank"));
    REQUIRE_NOTHROW(cal.basis({.key_rank = d, .value_rank = 1}));
  }
  SECTION("too few samples for the requested rank") {
    EigenCalibrator few(cfg);
    few.add(0, std::span<const float>(K).first(5 * 2 * d), std::span<const float>(V).first(5 * 2 * d));
    few.add(1, std::span<const float>(K).first(5 * 2 * d), std::span<const float>(V).first(5 * 2 * d));
    REQUIRE_NOTHROW(few.basis({.key_rank = 5, .value_rank = 5}));
    REQUIRE_THROWS_WITH(few.basis({.key_rank = 6}), Contains("too few calibration samples") && Contains("got 5"));
    REQUIRE_THROWS_WITH(few.basis({.value_rank = 7}), Contains("too few calibration samples"));
  }
  SECTION("missing layers, zero data") {
    REQUIRE_THROWS_WITH(cal.basis(), Contains("no calibration samples for layer 1"));
    const std::vector<float> zeros(K.size(), 0.0f);
    cal.add(1, zeros, V);
    REQUIRE_THROWS_WITH(cal.basis(), Contains("all zero"));
  }
  SECTION("wrong shapes") {
    REQUIRE_THROWS_WITH(cal.add(2, K, V), Contains("layer 2 out of range"));
    REQUIRE_THROWS_WITH(cal.add(-1, K, V), Contains("layer -1"));
    REQUIRE_THROWS_WITH(cal.add(0, std::span<const float>(K).first(K.size() - 1), V), Contains("K has"));
    REQUIRE_THROWS_WITH(cal.add(0, std::span<const float>{}, V), Contains("K has 0"));
    REQUIRE_THROWS_WITH(cal.add(0, K, std::span<const float>(V).first(V.size() - 2 * d)), Contains("V has"));
    REQUIRE_THROWS_WITH(cal.add(0, K, V, std::span<const float>(Q).first(Q.size() / 2)), Contains("Q has"));
    auto bad = K;
    bad[3] = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(cal.add(0, bad, V), Contains("finite"));
    REQUIRE_THROWS_WITH(EigenCalibrator(shape(1, 2, 3, d)), Contains("n_q_heads (3)"));
    REQUIRE_THROWS_WITH(EigenCalibrator(shape(1, 2, 2, 0)), Contains("head_dim"));
    const std::vector<kvtrim::EigenSamples> one{{K, V, Q}};
    REQUIRE_THROWS_WITH(kvtrim::calibrate(cfg, one), Contains("samples for 1 layers"));
  }
  REQUIRE(cal.key_rows(0, 0) == 20);  // a rejected add() changed nothing
}

TEST_CASE("bad bases and mismatched caches throw kvtrim::Error", "[eigen][errors]") {
  EigenBasis b(2, 2, 8);
  Eigen::MatrixXf wide = Eigen::MatrixXf::Identity(8, 9);
  REQUIRE_THROWS_WITH(b.set(0, 0, wide, Eigen::MatrixXf::Identity(8, 8)), Contains("rank 9"));
  REQUIRE_THROWS_WITH(b.set(0, 0, Eigen::MatrixXf::Identity(7, 7), Eigen::MatrixXf::Identity(8, 8)),
                      Contains("7 rows"));
  Eigen::MatrixXf skew = Eigen::MatrixXf::Identity(8, 2);
  skew(0, 1) = 0.5f;
  REQUIRE_THROWS_WITH(b.set(1, 1, Eigen::MatrixXf::Identity(8, 8), skew), Contains("not orthonormal"));
  REQUIRE_THROWS_WITH(b.set(2, 0, Eigen::MatrixXf::Identity(8, 8), Eigen::MatrixXf::Identity(8, 8)),
                      Contains("layer 2 out of range"));
  REQUIRE_THROWS_WITH(EigenBasis(1, 1, 0), Contains("head_dim"));

  using EA = EigenAttention<kvtrim::StreamingLLM>;
  const auto cfg = shape(2, 2, 4, 8, 16);
  REQUIRE_THROWS_WITH(KVCache<EA>(cfg, {nullptr, {}}), Contains("basis is null"));
  for (auto bad : {std::make_shared<const EigenBasis>(2, 2, 16), std::make_shared<const EigenBasis>(3, 2, 8),
                   std::make_shared<const EigenBasis>(2, 1, 8)})
    REQUIRE_THROWS_WITH(KVCache<EA>(cfg, {bad, {}}), Contains("basis has shape"));
  // Inner's own parameters are still validated.
  REQUIRE_THROWS_WITH(KVCache<EA>(cfg, {std::make_shared<const EigenBasis>(2, 2, 8), {.sinks = 16}}),
                      Contains("sinks"));
}

namespace {
// Full-rank identity bases: storage is exact, so EigenAttention<FullCache> must keep everything it is sent.
struct EigenFullSpec : kvtest::prop::SpecBase<EigenAttention<>> {
  static constexpr const char* kLabel = "EigenAttention<FullCache> (identity basis)";
  static Policy::Params params(kvtest::Rng&, const kvtrim::CacheConfig& c, int) {
    return {.basis = std::make_shared<const kvtrim::EigenBasis>(c.n_layers, c.n_kv_heads, c.head_dim), .inner = {}};
  }
  static std::optional<kvtest::prop::Seen> expected(const Policy::Params&, int, const kvtest::prop::Seen& seen) {
    return seen;
  }
};
}  // namespace

TEST_CASE("EigenAttention: random prefill/decode/reset sequences agree with the reference model",
          "[eigen][property]") {
  kvtest::prop::require_properties<EigenFullSpec>(1);
}
