// kvtrim: Eigen Attention (arXiv 2408.05646) — low-rank K/V storage, composable with any eviction policy.
//
// What it does. An offline calibration finds, per layer and KV head, an orthonormal basis U_k (d x r_k) of the
// keys and U_v (d x r_v) of the values from sample activations. The cache then stores k~ = U_kᵀ k and
// v~ = U_vᵀ v (r_k + r_v floats per token instead of 2d), queries are projected with the same key basis
// (q~ = U_kᵀ q), attention runs in the stored space with the original 1/sqrt(head_dim) scale
// (q~ᵀk~ = qᵀ U_k U_kᵀ k ≈ qᵀk), and each output is mapped back with U_v. Low-rank storage is orthogonal to
// eviction: `EigenAttention<Inner>` stores projected tokens and leaves every eviction decision to `Inner`, so
// `KVCache<EigenAttention<P>>` is low-rank storage + P's evictions and `EigenAttention<>` (Inner = FullCache) is
// low rank only.
//
// Pieces:
//  - EigenCalibration: calibration options (below).
//  - EigenCalibrator: accumulates sample activations (uncentred Gram matrices XᵀX in double, so any number of
//    prompts can be streamed through `add`) and computes the basis with Eigen's SelfAdjointEigenSolver (the
//    eigenvectors of XᵀX are the left singular vectors of Xᵀ; eigenvalues are squared singular values).
//  - calibrate(shape, samples, options): the one-call form.
//  - EigenBasis: the result; save()/load() to a file, to_bytes()/from_bytes() in memory.
//  - EigenAttention<Inner>: the policy. Params = { shared_ptr<const EigenBasis> basis; Inner::Params inner; }.
//    It *is* Inner (derives from it: SlotMeta, State, kSignals, kTiming, kNeverEvicts and every rule are
//    Inner's, on the projected keys) plus the storage transform below, which the backends apply (the escape
//    hatch for what a per-token rule cannot express: projections of q, k, v and the output). SimHash-based
//    Inner policies are rejected at compile time (their codes are drawn at head_dim).
//
// Parameters (EigenCalibration, defaults in brackets):
//  - energy [0.98]: target fraction of the spectrum's energy, in (0, 1]. 0.98 is the official code's starting
//    threshold for OPT/MPT.
//  - measure [kSingularValues]: what "energy" sums. kSingularValues (official code: sigma_j / sum sigma) or
//    kSquaredSingularValues (sigma_j^2 / sum sigma^2, the explained variance; then 1 - energy bounds the
//    relative squared Frobenius reconstruction error of the calibration rows).
//  - rule [kSmallestReaching]: kSmallestReaching keeps the smallest r whose cumulative energy is >= energy
//    (what the issue asks). kOfficialBelow reproduces the official code, r = #{ j : cumsum_j < energy } with
//    cumsum_j inclusive of j, i.e. the largest r that explains strictly less than energy (one direction fewer
//    than kSmallestReaching whenever energy falls strictly between two cumulative values); at least 1.
//  - key_rank, value_rank [0]: a fixed rank (1..head_dim) instead of the energy rule; 0 = use the energy rule.
//  - uniform_layer_rank [true]: official: every head of a layer takes the largest rank any of its heads needs.
//    false: each KV head keeps its own rank (the storage supports per-head widths).
//  - key_scope [kPerHead]: kPerHead, one key basis per KV head (official OPT/MPT path); kPerLayer, one key basis
//    per layer shared by all KV heads (official Llama path: rows of all heads stacked).
//  - use_queries [true]: query rows given to `add` join the key rows of their KV head in the key basis
//    (official OPT/MPT path: K and Q decomposed jointly, because the query is projected with the same basis).
//    false: the key basis sees keys only (queries passed to `add` are then ignored).
//
// Choices where the paper / official code are silent or differ from this library:
//  - RoPE. Keys reach the cache already rotated, so calibration uses post-RoPE keys (and post-RoPE queries),
//    queries are projected with the key basis and attention runs entirely in rank r_k: a real compute and memory
//    saving, O(n (r_k + r_v)) per step. The paper's Llama path instead stores pre-RoPE low-rank keys and every
//    step up-projects all cached keys (n x r_k x d multiply-adds) and rotates them at their positions before a
//    full-width attention: memory saving only. That path needs pre-RoPE keys and the rotation inside the cache,
//    which the KVCache interface (post-RoPE keys) does not have; bench/bench_eigen_attention.cpp measures what
//    the up-projection would cost relative to the attention step. Because post-RoPE keys rotate with position,
//    calibrate on prompts at least as long as the positions the cache will see.
//  - Uncentred activations (no mean subtracted), like the official code. The Gram matrices are accumulated in
//    double, the basis is stored in float.
//  - Ties among eigenvalues: the order is the solver's (ascending eigenvalues, reversed); eigenvector signs are
//    the solver's and are kept as they are (attention is invariant to them).
//  - Too few samples: a basis of rank r needs at least r calibration rows (the directions beyond the rows'
//    span are arbitrary); asking for or needing more is an error. Layers with no samples are an error.
//  - Not implemented from the paper: the layer-wise rank search against an output-error budget (it needs the
//    model's layer outputs; pass a per-call energy or a fixed rank instead), and the LoRA fine-tuning.
//  - Values keep one basis per KV head (official); GQA query heads of a group share their KV head's U_k and U_v.
//
// Basis file format (all integers and floats little-endian; float = IEEE-754 binary32):
//   8 bytes  magic "KVTEIGB\0"
//   u32      version (1)
//   i32      n_layers, n_kv_heads, head_dim            (each >= 1; head_dim <= 65536)
//   i32 x 2  key_rank, value_rank per (layer, KV head), layer-major   (each in 1..head_dim)
//   floats   per (layer, KV head), layer-major: the key basis then the value basis, each head_dim x rank
//            column-major (column j = basis vector j)
//   u64      FNV-1a 64-bit hash of every byte before it
// load()/from_bytes() reject (kvtrim::Error) a wrong magic or version, out-of-range sizes, a file shorter or
// longer than its header implies, a hash mismatch, non-finite entries and non-orthonormal bases.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checked_file.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../macros.hpp"
#include "../policy.hpp"
#include "full_cache.hpp"

namespace kvtrim {

// ---- per-token math (shared with a GPU backend) ---------------------------------------------------------------
// Both take the basis as U, d x r row-major (row i = coordinate i of every basis vector), and loop so that the
// inner loop runs over contiguous memory without a reduction (vectorises without reassociation).

// y[0..r) = Uᵀ x for x[0..d).
KVTRIM_HOST_DEVICE inline void lowrank_project(const float* U, int d, int r, const float* x, float* y) {
  for (int j = 0; j < r; ++j) y[j] = 0.0f;
  for (int i = 0; i < d; ++i) {
    const float xi = x[i];
    const float* row = U + static_cast<std::size_t>(i) * r;
    for (int j = 0; j < r; ++j) y[j] += row[j] * xi;
  }
}

// x[0..d) = U y for y[0..r); Ut is the same basis transposed, r x d row-major.
KVTRIM_HOST_DEVICE inline void lowrank_unproject(const float* Ut, int d, int r, const float* y, float* x) {
  for (int i = 0; i < d; ++i) x[i] = 0.0f;
  for (int j = 0; j < r; ++j) {
    const float yj = y[j];
    const float* row = Ut + static_cast<std::size_t>(j) * d;
    for (int i = 0; i < d; ++i) x[i] += row[i] * yj;
  }
}

// ---- calibration options and the rank rule ------------------------------------------------------------------

enum class EnergyMeasure { kSingularValues, kSquaredSingularValues };
enum class RankRule { kSmallestReaching, kOfficialBelow };
enum class KeyBasisScope { kPerHead, kPerLayer };

struct EigenCalibration {
  double energy = 0.98;
  EnergyMeasure measure = EnergyMeasure::kSingularValues;
  RankRule rule = RankRule::kSmallestReaching;
  int key_rank = 0;    // 0: from `energy`
  int value_rank = 0;  // 0: from `energy`
  bool uniform_layer_rank = true;
  KeyBasisScope key_scope = KeyBasisScope::kPerHead;
  bool use_queries = true;

  void validate(int head_dim) const {
    KVTRIM_CHECK(energy > 0.0 && energy <= 1.0, "EigenCalibration.energy must be in (0, 1], got ", energy);
    KVTRIM_CHECK(key_rank >= 0 && key_rank <= head_dim, "EigenCalibration.key_rank must be in 0..head_dim (",
                 head_dim, "; 0 = from energy), got ", key_rank);
    KVTRIM_CHECK(value_rank >= 0 && value_rank <= head_dim,
                 "EigenCalibration.value_rank must be in 0..head_dim (", head_dim, "; 0 = from energy), got ",
                 value_rank);
  }
};

// Rank chosen for a spectrum given as the eigenvalues of XᵀX (squared singular values), in descending order.
// Negative eigenvalues (round-off) count as 0. Throws when the spectrum carries no energy.
inline int rank_for_energy(std::span<const double> eigenvalues_desc, double energy, EnergyMeasure measure,
                           RankRule rule) {
  KVTRIM_CHECK(energy > 0.0 && energy <= 1.0, "rank_for_energy: energy must be in (0, 1], got ", energy);
  const int n = static_cast<int>(eigenvalues_desc.size());
  std::vector<double> e(eigenvalues_desc.size());
  for (int j = 0; j < n; ++j) {
    const double lambda = std::max(eigenvalues_desc[j], 0.0);
    e[j] = measure == EnergyMeasure::kSingularValues ? std::sqrt(lambda) : lambda;
  }
  double total = 0.0;
  for (double x : e) total += x;
  KVTRIM_CHECK(total > 0.0, "rank_for_energy: the calibration samples carry no energy (all zero)");
  double cum = 0.0;
  int below = 0;  // #{ j : cumsum_j / total < energy }
  for (int j = 0; j < n; ++j) {
    cum += e[j];
    const double c = j == n - 1 ? 1.0 : cum / total;  // the full sum is exactly the total
    if (c >= energy) return rule == RankRule::kSmallestReaching ? j + 1 : std::max(below, 1);
    ++below;
  }
  return n;  // unreachable: the last cumulative value is 1 >= energy
}

// ---- the basis ------------------------------------------------------------------------------------------------

class EigenBasis {
 public:
  EigenBasis() = default;
  // Full-rank identity bases for every (layer, KV head): storage is exact, nothing is compressed.
  EigenBasis(int n_layers, int n_kv_heads, int head_dim) : L_(n_layers), H_(n_kv_heads), d_(head_dim) {
    KVTRIM_CHECK(n_layers >= 1, "EigenBasis: n_layers must be >= 1, got ", n_layers);
    KVTRIM_CHECK(n_kv_heads >= 1, "EigenBasis: n_kv_heads must be >= 1, got ", n_kv_heads);
    KVTRIM_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "EigenBasis: head_dim must be in 1..", kMaxHeadDim,
                 ", got ", head_dim);
    const auto n = static_cast<std::size_t>(n_layers) * n_kv_heads;
    keys_.assign(n, Eigen::MatrixXf::Identity(head_dim, head_dim));
    values_.assign(n, Eigen::MatrixXf::Identity(head_dim, head_dim));
  }

  static constexpr int kMaxHeadDim = 65536;

  int n_layers() const { return L_; }
  int n_kv_heads() const { return H_; }
  int head_dim() const { return d_; }
  // d x r, orthonormal columns (column j = basis vector j, most energetic first).
  const Eigen::MatrixXf& key(int layer, int kv_head) const { return keys_[index(layer, kv_head)]; }
  const Eigen::MatrixXf& value(int layer, int kv_head) const { return values_[index(layer, kv_head)]; }
  int key_rank(int layer, int kv_head) const { return static_cast<int>(key(layer, kv_head).cols()); }
  int value_rank(int layer, int kv_head) const { return static_cast<int>(value(layer, kv_head).cols()); }

  // Floats one token occupies in all layers and KV heads: sum of (r_k + r_v), versus 2 * head_dim * L * H.
  std::int64_t floats_per_token() const {
    std::int64_t s = 0;
    for (std::size_t i = 0; i < keys_.size(); ++i) s += keys_[i].cols() + values_[i].cols();
    return s;
  }
  std::int64_t full_floats_per_token() const { return 2LL * d_ * L_ * H_; }

  // Replaces the bases of one (layer, KV head). Each must be head_dim x r with 1 <= r <= head_dim, finite,
  // with orthonormal columns (|UᵀU - I| <= 1e-4 entrywise).
  void set(int layer, int kv_head, Eigen::MatrixXf key_basis, Eigen::MatrixXf value_basis) {
    check_one(key_basis, "key", layer, kv_head);
    check_one(value_basis, "value", layer, kv_head);
    keys_[index(layer, kv_head)] = std::move(key_basis);
    values_[index(layer, kv_head)] = std::move(value_basis);
  }

  // ---- serialisation (format in the header comment) ----
  std::vector<unsigned char> to_bytes() const {
    KVTRIM_CHECK(L_ > 0, "EigenBasis::to_bytes: the basis is empty (default-constructed)");
    const std::size_t floats = static_cast<std::size_t>(floats_per_token()) * static_cast<std::size_t>(d_);
    std::vector<unsigned char> b(kMagic.size() + 4 * 4 + keys_.size() * 8 + 4 * floats + 8);
    std::size_t at = 0;
    for (unsigned char c : kMagic) b[at++] = c;
    bytes::put_u32(b, at, kVersion);
    bytes::put_u32(b, at, static_cast<std::uint32_t>(L_));
    bytes::put_u32(b, at, static_cast<std::uint32_t>(H_));
    bytes::put_u32(b, at, static_cast<std::uint32_t>(d_));
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      bytes::put_u32(b, at, static_cast<std::uint32_t>(keys_[i].cols()));
      bytes::put_u32(b, at, static_cast<std::uint32_t>(values_[i].cols()));
    }
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      for (const Eigen::MatrixXf* m : {&keys_[i], &values_[i]})
        for (Eigen::Index c = 0; c < m->cols(); ++c)
          for (Eigen::Index r = 0; r < m->rows(); ++r) bytes::put_u32(b, at, std::bit_cast<std::uint32_t>((*m)(r, c)));
    }
    const std::uint64_t hash = bytes::fnv1a64(b.data(), at);
    bytes::put_u64(b, at, hash);
    return b;
  }

  static EigenBasis from_bytes(std::span<const unsigned char> b) {
    constexpr std::size_t kHead = 8 + 4 * 4;
    KVTRIM_CHECK(b.size() >= kHead + 8, "EigenBasis: data of ", b.size(), " bytes is too short for a header (",
                 kHead + 8, " bytes at least); truncated or not a basis file");
    KVTRIM_CHECK(std::equal(kMagic.begin(), kMagic.end(), b.begin()),
                 "EigenBasis: bad magic; expected \"KVTEIGB\\0\" (not a kvtrim Eigen Attention basis)");
    std::size_t at = 8;
    const std::uint32_t version = bytes::get_u32(b, at);
    KVTRIM_CHECK(version == kVersion, "EigenBasis: format version ", version, " is not supported (expected ",
                 kVersion, ")");
    const auto L = static_cast<std::int32_t>(bytes::get_u32(b, at));
    const auto H = static_cast<std::int32_t>(bytes::get_u32(b, at));
    const auto d = static_cast<std::int32_t>(bytes::get_u32(b, at));
    KVTRIM_CHECK(L >= 1 && L <= 1 << 16, "EigenBasis: n_layers ", L, " out of range 1..65536");
    KVTRIM_CHECK(H >= 1 && H <= 1 << 16, "EigenBasis: n_kv_heads ", H, " out of range 1..65536");
    KVTRIM_CHECK(d >= 1 && d <= kMaxHeadDim, "EigenBasis: head_dim ", d, " out of range 1..", kMaxHeadDim);
    const std::size_t heads = static_cast<std::size_t>(L) * static_cast<std::size_t>(H);
    KVTRIM_CHECK(b.size() >= kHead + heads * 8 + 8, "EigenBasis: data of ", b.size(),
                 " bytes is truncated: the rank table alone needs ", kHead + heads * 8 + 8, " bytes");
    std::vector<std::int32_t> ranks(2 * heads);
    std::uint64_t floats = 0;
    for (std::size_t i = 0; i < 2 * heads; ++i) {
      ranks[i] = static_cast<std::int32_t>(bytes::get_u32(b, at));
      KVTRIM_CHECK(ranks[i] >= 1 && ranks[i] <= d, "EigenBasis: ", i % 2 == 0 ? "key" : "value", " rank ",
                   ranks[i], " of layer ", i / 2 / H, " KV head ", i / 2 % H, " out of range 1..head_dim (", d, ")");
      floats += static_cast<std::uint64_t>(ranks[i]) * static_cast<std::uint64_t>(d);
    }
    const std::uint64_t want = at + 4 * floats + 8;
    KVTRIM_CHECK(b.size() == want, "EigenBasis: data has ", b.size(), " bytes but its header implies ", want,
                 b.size() < want ? " (truncated)" : " (trailing bytes)");
    std::size_t end = b.size() - 8;
    std::size_t tail = end;
    const std::uint64_t stored = bytes::get_u64(b, tail);
    KVTRIM_CHECK(stored == bytes::fnv1a64(b.data(), end),
                 "EigenBasis: checksum mismatch (the data is corrupt or was modified)");
    EigenBasis out(L, H, d);
    for (std::size_t i = 0; i < heads; ++i) {
      Eigen::MatrixXf k(d, ranks[2 * i]), v(d, ranks[2 * i + 1]);
      for (Eigen::MatrixXf* m : {&k, &v})
        for (Eigen::Index c = 0; c < m->cols(); ++c)
          for (Eigen::Index r = 0; r < m->rows(); ++r) (*m)(r, c) = std::bit_cast<float>(bytes::get_u32(b, at));
      out.set(static_cast<int>(i / H), static_cast<int>(i % H), std::move(k), std::move(v));
    }
    return out;
  }

  void save(const std::string& path) const { bytes::write_file(path, to_bytes(), "EigenBasis::save"); }
  static EigenBasis load(const std::string& path) {
    return bytes::read_file(path, "EigenBasis::load", [](std::span<const unsigned char> b) { return from_bytes(b); });
  }

 private:
  static constexpr std::array<unsigned char, 8> kMagic{'K', 'V', 'T', 'E', 'I', 'G', 'B', '\0'};
  static constexpr std::uint32_t kVersion = 1;

  std::size_t index(int layer, int kv_head) const {
    KVTRIM_CHECK(layer >= 0 && layer < L_, "EigenBasis: layer ", layer, " out of range 0..", L_ - 1);
    KVTRIM_CHECK(kv_head >= 0 && kv_head < H_, "EigenBasis: KV head ", kv_head, " out of range 0..", H_ - 1);
    return static_cast<std::size_t>(layer) * H_ + kv_head;
  }
  void check_one(const Eigen::MatrixXf& U, const char* what, int layer, int kv_head) const {
    KVTRIM_CHECK(U.rows() == d_, "EigenBasis: ", what, " basis of layer ", layer, " KV head ", kv_head, " has ",
                 U.rows(), " rows; expected head_dim = ", d_);
    KVTRIM_CHECK(U.cols() >= 1 && U.cols() <= d_, "EigenBasis: ", what, " basis of layer ", layer, " KV head ",
                 kv_head, " has rank ", U.cols(), "; expected 1..head_dim (", d_, ")");
    KVTRIM_CHECK(U.allFinite(), "EigenBasis: ", what, " basis of layer ", layer, " KV head ", kv_head,
                 " has non-finite entries");
    const Eigen::MatrixXd G = U.cast<double>().transpose() * U.cast<double>();
    const double err = (G - Eigen::MatrixXd::Identity(G.rows(), G.cols())).cwiseAbs().maxCoeff();
    KVTRIM_CHECK(err <= 1e-4, "EigenBasis: ", what, " basis of layer ", layer, " KV head ", kv_head,
                 " is not orthonormal (max |UᵀU - I| = ", err, ", expected <= 1e-4)");
  }

  int L_ = 0, H_ = 0, d_ = 0;
  std::vector<Eigen::MatrixXf> keys_, values_;  // layer-major
};

// ---- calibration ----------------------------------------------------------------------------------------------

// Accumulates calibration activations. Inputs use prefill's layout: K and V [N x n_kv_heads*head_dim],
// Q [N x n_q_heads*head_dim] (optional: pass an empty span), row-major, post-RoPE like the cache receives them.
class EigenCalibrator {
 public:
  // Only the shape of `shape` is used (layers, KV heads, query heads, head dim); budgets are ignored.
  explicit EigenCalibrator(const CacheConfig& shape)
      : L_(shape.n_layers), H_(shape.n_kv_heads), Hq_(shape.n_q_heads), d_(shape.head_dim) {
    KVTRIM_CHECK(L_ >= 1, "EigenCalibrator: n_layers must be >= 1, got ", L_);
    KVTRIM_CHECK(H_ >= 1, "EigenCalibrator: n_kv_heads must be >= 1, got ", H_);
    KVTRIM_CHECK(Hq_ >= 1 && Hq_ % H_ == 0, "EigenCalibrator: n_q_heads (", Hq_,
                 ") must be a positive multiple of n_kv_heads (", H_, ")");
    KVTRIM_CHECK(d_ >= 1 && d_ <= EigenBasis::kMaxHeadDim, "EigenCalibrator: head_dim must be in 1..",
                 EigenBasis::kMaxHeadDim, ", got ", d_);
    const auto n = static_cast<std::size_t>(L_) * H_;
    gk_.assign(n, Eigen::MatrixXd::Zero(d_, d_));
    gq_.assign(n, Eigen::MatrixXd::Zero(d_, d_));
    gv_.assign(n, Eigen::MatrixXd::Zero(d_, d_));
    nk_.assign(n, 0);
    nq_.assign(n, 0);
    nv_.assign(n, 0);
  }

  void add(int layer, std::span<const float> K, std::span<const float> V, std::span<const float> Q = {}) {
    KVTRIM_CHECK(layer >= 0 && layer < L_, "EigenCalibrator::add: layer ", layer, " out of range 0..", L_ - 1);
    const std::size_t kw = static_cast<std::size_t>(H_) * d_, qw = static_cast<std::size_t>(Hq_) * d_;
    KVTRIM_CHECK(!K.empty() && K.size() % kw == 0, "EigenCalibrator::add: K has ", K.size(),
                 " floats; expected a positive multiple of n_kv_heads*head_dim = ", kw);
    const std::size_t N = K.size() / kw;
    KVTRIM_CHECK(V.size() == N * kw, "EigenCalibrator::add: V has ", V.size(), " floats; expected N*n_kv_heads*head_dim = ",
                 N, "*", kw, " (as many rows as K)");
    KVTRIM_CHECK(Q.empty() || Q.size() == N * qw, "EigenCalibrator::add: Q has ", Q.size(),
                 " floats; expected 0 (no queries) or N*n_q_heads*head_dim = ", N, "*", qw);
    auto finite = [](std::span<const float> x) {
      return Eigen::Map<const Eigen::ArrayXf>(x.data(), static_cast<Eigen::Index>(x.size())).allFinite();
    };
    KVTRIM_CHECK(finite(K) && finite(V) && (Q.empty() || finite(Q)),
                 "EigenCalibrator::add: calibration samples must be finite (NaN/Inf found)");
    using Strided = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                               Eigen::OuterStride<>>;
    const auto rows = static_cast<Eigen::Index>(N);
    const int g = Hq_ / H_;
    for (int h = 0; h < H_; ++h) {
      const std::size_t i = static_cast<std::size_t>(layer) * H_ + h;
      accumulate(gk_[i], Strided(K.data() + static_cast<std::size_t>(h) * d_, rows, d_,
                                 Eigen::OuterStride<>(static_cast<Eigen::Index>(kw))));
      accumulate(gv_[i], Strided(V.data() + static_cast<std::size_t>(h) * d_, rows, d_,
                                 Eigen::OuterStride<>(static_cast<Eigen::Index>(kw))));
      nk_[i] += static_cast<std::int64_t>(N);
      nv_[i] += static_cast<std::int64_t>(N);
      if (Q.empty()) continue;
      for (int q = h * g; q < (h + 1) * g; ++q)
        accumulate(gq_[i], Strided(Q.data() + static_cast<std::size_t>(q) * d_, rows, d_,
                                   Eigen::OuterStride<>(static_cast<Eigen::Index>(qw))));
      nq_[i] += static_cast<std::int64_t>(N) * g;
    }
  }

  // Calibration rows seen for one (layer, KV head): keys (and values), and query rows of its group.
  std::int64_t key_rows(int layer, int kv_head) const { return nk_[index(layer, kv_head)]; }
  std::int64_t query_rows(int layer, int kv_head) const { return nq_[index(layer, kv_head)]; }

  EigenBasis basis(const EigenCalibration& opt = {}) const {
    opt.validate(d_);
    EigenBasis out(L_, H_, d_);
    for (int l = 0; l < L_; ++l) {
      std::vector<Eigen::MatrixXd> kvec(static_cast<std::size_t>(H_)), vvec(static_cast<std::size_t>(H_));
      std::vector<Eigen::VectorXd> kval(static_cast<std::size_t>(H_)), vval(static_cast<std::size_t>(H_));
      std::vector<int> rk(static_cast<std::size_t>(H_)), rv(static_cast<std::size_t>(H_));
      std::vector<std::int64_t> krows(static_cast<std::size_t>(H_)), vrows(static_cast<std::size_t>(H_));
      // Key Gram per head, or one per layer summed over heads (shared basis).
      Eigen::MatrixXd layer_gram;
      std::int64_t layer_rows = 0;
      if (opt.key_scope == KeyBasisScope::kPerLayer) {
        layer_gram = Eigen::MatrixXd::Zero(d_, d_);
        for (int h = 0; h < H_; ++h) {
          const std::size_t i = index(l, h);
          layer_gram += gk_[i];
          layer_rows += nk_[i];
          if (opt.use_queries) {
            layer_gram += gq_[i];
            layer_rows += nq_[i];
          }
        }
      }
      for (int h = 0; h < H_; ++h) {
        const std::size_t i = index(l, h), s = static_cast<std::size_t>(h);
        KVTRIM_CHECK(nk_[i] > 0, "EigenCalibrator: no calibration samples for layer ", l, " (call add(", l,
                     ", K, V[, Q]) first)");
        if (opt.key_scope == KeyBasisScope::kPerLayer) {
          if (h == 0) {
            decompose(layer_gram, kvec[0], kval[0]);
            krows[0] = layer_rows;
          } else {
            kvec[s] = kvec[0], kval[s] = kval[0], krows[s] = layer_rows;
          }
        } else {
          decompose(opt.use_queries ? Eigen::MatrixXd(gk_[i] + gq_[i]) : gk_[i], kvec[s], kval[s]);
          krows[s] = nk_[i] + (opt.use_queries ? nq_[i] : 0);
        }
        decompose(gv_[i], vvec[s], vval[s]);
        vrows[s] = nv_[i];
        rk[s] = choose_rank(kval[s], opt.key_rank, opt, "key", l, h);
        rv[s] = choose_rank(vval[s], opt.value_rank, opt, "value", l, h);
      }
      if (opt.uniform_layer_rank) {
        const int mk = *std::max_element(rk.begin(), rk.end()), mv = *std::max_element(rv.begin(), rv.end());
        std::fill(rk.begin(), rk.end(), mk);
        std::fill(rv.begin(), rv.end(), mv);
      }
      for (int h = 0; h < H_; ++h) {
        const std::size_t s = static_cast<std::size_t>(h);
        check_rows(rk[s], krows[s], opt.key_rank > 0, "key", l, h);
        check_rows(rv[s], vrows[s], opt.value_rank > 0, "value", l, h);
        out.set(l, h, kvec[s].leftCols(rk[s]).cast<float>(), vvec[s].leftCols(rv[s]).cast<float>());
      }
    }
    return out;
  }

 private:
  template <class X>
  static void accumulate(Eigen::MatrixXd& gram, const X& x) {
    const Eigen::MatrixXd xd = x.template cast<double>();
    gram.noalias() += xd.transpose() * xd;
  }
  // Eigenvectors of a Gram matrix sorted by descending eigenvalue.
  static void decompose(const Eigen::MatrixXd& gram, Eigen::MatrixXd& vectors, Eigen::VectorXd& values) {
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(gram);
    KVTRIM_CHECK(es.info() == Eigen::Success, "EigenCalibrator: the eigen solver did not converge");
    values = es.eigenvalues().reverse();
    vectors = es.eigenvectors().rowwise().reverse();
  }
  int choose_rank(const Eigen::VectorXd& values, int fixed, const EigenCalibration& opt, const char* what, int l,
                  int h) const {
    KVTRIM_CHECK(values(0) > 0.0, "EigenCalibrator: the ", what, " samples of layer ", l, " KV head ", h,
                 " are all zero; no basis can be computed");
    if (fixed > 0) return fixed;
    return rank_for_energy(std::span<const double>(values.data(), static_cast<std::size_t>(values.size())),
                           opt.energy, opt.measure, opt.rule);
  }
  static void check_rows(int rank, std::int64_t rows, bool fixed, const char* what, int l, int h) {
    KVTRIM_CHECK(rank <= rows, "EigenCalibrator: too few calibration samples: ", what, " rank ", rank,
                 fixed ? " (requested)" : " (needed for the energy target)", " of layer ", l, " KV head ", h,
                 " needs at least ", rank, " sample rows, got ", rows);
  }
  std::size_t index(int layer, int kv_head) const {
    KVTRIM_CHECK(layer >= 0 && layer < L_ && kv_head >= 0 && kv_head < H_, "EigenCalibrator: layer ", layer,
                 " / KV head ", kv_head, " out of range");
    return static_cast<std::size_t>(layer) * H_ + kv_head;
  }

  int L_, H_, Hq_, d_;
  std::vector<Eigen::MatrixXd> gk_, gq_, gv_;  // Gram matrices of keys, queries (summed over the group), values
  std::vector<std::int64_t> nk_, nq_, nv_;
};

// Samples of one layer for calibrate(): K and V [N x n_kv_heads*head_dim], Q [N x n_q_heads*head_dim] or empty.
struct EigenSamples {
  std::span<const float> keys, values, queries;
};

// One-call calibration: layers[l] holds the samples of layer l (one entry per layer).
inline EigenBasis calibrate(const CacheConfig& shape, std::span<const EigenSamples> layers,
                            const EigenCalibration& opt = {}) {
  EigenCalibrator c(shape);
  KVTRIM_CHECK(static_cast<int>(layers.size()) == shape.n_layers, "calibrate: got samples for ", layers.size(),
               " layers; expected one entry per layer (", shape.n_layers, ")");
  for (std::size_t l = 0; l < layers.size(); ++l)
    c.add(static_cast<int>(l), layers[l].keys, layers[l].values, layers[l].queries);
  return c.basis(opt);
}

// ---- the policy -----------------------------------------------------------------------------------------------

namespace detail {
inline constexpr std::string_view kEigenPrefix = "eigen+";
}  // namespace detail

template <class Inner = FullCache>
class EigenAttention : public Inner {
  static_assert(Policy<Inner>, "EigenAttention<Inner>: Inner must be a kvtrim::Policy");
  static_assert(!requires(const Inner& p) { p.key_width(0); },
                "EigenAttention<Inner>: Inner already stores keys in its own width (nested low-rank storage is "
                "not supported)");
  static_assert(!rules::simhash<Inner>(),
                "EigenAttention<Inner>: SimHash codes of low-rank keys are not supported (the projection is drawn "
                "at head_dim); use the policy without EigenAttention");

 public:
  struct Params {
    std::shared_ptr<const EigenBasis> basis;  // from calibration, not settable by name
    typename Inner::Params inner{};
    static constexpr auto fields() { return std::tuple{field("inner", &Params::inner)}; }
  };
  static constexpr std::string_view kName = detail::ComposedName<detail::kEigenPrefix, Inner>::kValue;
  using InnerPolicy = Inner;

  EigenAttention(const Params& p, const LayerContext& ctx)
      : Inner(p.inner, ctx), basis_(checked(p, ctx)), d_(ctx.head_dim) {
    for (int h = 0; h < ctx.n_kv_heads; ++h) {
      heads_.push_back(Mats{basis_->key(ctx.layer, h), basis_->value(ctx.layer, h),
                            basis_->value(ctx.layer, h).transpose()});
    }
  }

  // ---- low-rank storage (see cpu_backend.hpp, kProjects) ----
  int key_width(int kv_head) const { return static_cast<int>(heads_[kv_head].k.cols()); }
  int value_width(int kv_head) const { return static_cast<int>(heads_[kv_head].v.cols()); }
  void project_key(int kv_head, const float* in, float* out) const {
    const Mats& m = heads_[kv_head];
    lowrank_project(m.k.data(), d_, static_cast<int>(m.k.cols()), in, out);
  }
  void project_value(int kv_head, const float* in, float* out) const {
    const Mats& m = heads_[kv_head];
    lowrank_project(m.v.data(), d_, static_cast<int>(m.v.cols()), in, out);
  }
  // in: [group x head_dim]; out: [group x key_width] packed.
  void project_queries(int kv_head, int group, const float* in, float* out) const {
    const Mats& m = heads_[kv_head];
    const int r = static_cast<int>(m.k.cols());
    for (int g = 0; g < group; ++g)
      lowrank_project(m.k.data(), d_, r, in + static_cast<std::size_t>(g) * d_, out + static_cast<std::size_t>(g) * r);
  }
  // in: [group x value_width] packed; out: [group x head_dim].
  void unproject_outputs(int kv_head, int group, const float* in, float* out) const {
    const Mats& m = heads_[kv_head];
    const int r = static_cast<int>(m.v.cols());
    for (int g = 0; g < group; ++g)
      lowrank_unproject(m.vt.data(), d_, r, in + static_cast<std::size_t>(g) * r, out + static_cast<std::size_t>(g) * d_);
  }

  Inner& inner() { return *this; }
  const Inner& inner() const { return *this; }
  const EigenBasis& basis() const { return *basis_; }

 private:
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  struct Mats {
    RowMajor k, v, vt;  // U_k (d x r_k), U_v (d x r_v) and U_vᵀ (r_v x d), row-major
  };

  static std::shared_ptr<const EigenBasis> checked(const Params& p, const LayerContext& ctx) {
    KVTRIM_CHECK(p.basis != nullptr, "EigenAttention: Params.basis is null; calibrate() or load() a basis first");
    const EigenBasis& b = *p.basis;
    KVTRIM_CHECK(b.n_layers() == ctx.n_layers && b.n_kv_heads() == ctx.n_kv_heads && b.head_dim() == ctx.head_dim,
                 "EigenAttention: the basis has shape (n_layers ", b.n_layers(), ", n_kv_heads ", b.n_kv_heads(),
                 ", head_dim ", b.head_dim(), ") but the cache has (n_layers ", ctx.n_layers, ", n_kv_heads ",
                 ctx.n_kv_heads, ", head_dim ", ctx.head_dim, ")");
    return p.basis;
  }

  std::shared_ptr<const EigenBasis> basis_;
  int d_;
  std::vector<Mats> heads_;
};

}  // namespace kvtrim
