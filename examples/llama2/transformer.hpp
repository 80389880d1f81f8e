// The Llama forward pass (RMSNorm, RoPE, grouped-query attention, SwiGLU) on Eigen, float32, with its KV
// cache provided by kvtrim: any kvtrim::KVCache<Policy, Backend> plugs in.
//
//   llama2::Checkpoint model = llama2::Checkpoint::load("stories260K.bin");
//   kvtrim::KVCache<kvtrim::StreamingLLM> cache(llama2::cache_config(model.config(), 128), {.sinks = 4});
//   llama2::Transformer tf(model);
//   const float* logits = tf.decode(cache, token, pos);   // one token; the cache decides what stays
//   tf.prefill(cache, prompt_tokens, logits_out);          // a prompt in one pass; the policy compresses it
//
// The engine owns no attention state: per layer it computes q, k, v, rotates q and k at the token's
// position (so keys enter the cache already rotated), hands them to the cache, and continues with the
// attention output the cache returns. Only the cache knows which past tokens are kept.
#pragma once

#include <kvtrim/kvtrim.hpp>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "checkpoint.hpp"

namespace llama2 {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
using VectorMap = Eigen::Map<Eigen::VectorXf>;
using ConstVectorMap = Eigen::Map<const Eigen::VectorXf>;

// The cache shape a checkpoint needs, with `budget` tokens per (layer, KV head).
inline kvtrim::CacheConfig cache_config(const Config& c, int budget) {
  kvtrim::CacheConfig cfg;
  cfg.n_layers = c.n_layers;
  cfg.n_kv_heads = c.n_kv_heads;
  cfg.n_q_heads = c.n_heads;
  cfg.head_dim = c.head_size();
  cfg.budget = budget;
  return cfg;
}

// RMSNorm as llama2.c computes it: o = w * x / sqrt(mean(x^2) + 1e-5).
inline void rmsnorm(float* o, const float* x, const float* w, int n) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  ss = 1.0f / std::sqrt(ss / static_cast<float>(n) + 1e-5f);
  for (int i = 0; i < n; ++i) o[i] = w[i] * (ss * x[i]);
}

// RoPE angles for one position: cos/sin for each pair (2i, 2i+1) inside a head, theta = 10000.
struct Rope {
  std::vector<float> cos, sin;  // [head_size / 2]
  void at(std::int64_t pos, int head_size) {
    const int half = head_size / 2;
    cos.resize(static_cast<std::size_t>(half));
    sin.resize(static_cast<std::size_t>(half));
    for (int i = 0; i < half; ++i) {
      const float freq = 1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(head_size));
      const float angle = static_cast<float>(pos) * freq;
      cos[i] = std::cos(angle);
      sin[i] = std::sin(angle);
    }
  }
  // Rotates every head of x ([n_heads x head_size]) in place.
  void apply(float* x, int n_heads, int head_size) const {
    for (int h = 0; h < n_heads; ++h)
      for (int i = 0; i < head_size / 2; ++i) {
        float* p = x + static_cast<std::size_t>(h) * head_size + 2 * i;
        const float a = p[0], b = p[1];
        p[0] = a * cos[i] - b * sin[i];
        p[1] = a * sin[i] + b * cos[i];
      }
  }
};

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

class Transformer {
 public:
  // Optional: sees each layer's rotated queries, keys and values of every token before the cache does
  // (layer, position, q [dim], k [kv_dim], v [kv_dim]); used to collect calibration samples.
  using KvTap = std::function<void(int, std::int64_t, const float*, const float*, const float*)>;

  explicit Transformer(const Checkpoint& ck) : ck_(ck), c_(ck.config()) {
    x_.resize(c_.dim);
    xb_.resize(c_.dim);
    xb2_.resize(c_.dim);
    q_.resize(c_.dim);
    att_.resize(c_.dim);
    k_.resize(c_.kv_dim());
    v_.resize(c_.kv_dim());
    h1_.resize(c_.hidden_dim);
    h3_.resize(c_.hidden_dim);
    logits_.resize(c_.vocab_size);
  }

  const Config& config() const { return c_; }
  void set_kv_tap(KvTap tap) { tap_ = std::move(tap); }

  // One token at position `pos` through every layer; returns the logits [vocab_size] (valid until the
  // next call). `pos` must increase from call to call within one cache's sequence.
  template <class Cache>
  const float* decode(Cache& cache, int token, std::int64_t pos) {
    check_token(token);
    const int dim = c_.dim, kvd = c_.kv_dim(), hs = c_.head_size();
    x_ = ConstVectorMap(ck_.embedding() + static_cast<std::size_t>(token) * dim, dim);
    rope_.at(pos, hs);
    for (int l = 0; l < c_.n_layers; ++l) {
      rmsnorm(xb_.data(), x_.data(), ck_.rms_att(l), dim);
      q_.noalias() = ConstMatrixMap(ck_.wq(l), dim, dim) * xb_;
      k_.noalias() = ConstMatrixMap(ck_.wk(l), kvd, dim) * xb_;
      v_.noalias() = ConstMatrixMap(ck_.wv(l), kvd, dim) * xb_;
      rope_.apply(q_.data(), c_.n_heads, hs);
      rope_.apply(k_.data(), c_.n_kv_heads, hs);
      if (tap_) tap_(l, pos, q_.data(), k_.data(), v_.data());
      cache.decode(l, std::span<const float>(q_.data(), dim), std::span<const float>(k_.data(), kvd),
                   std::span<const float>(v_.data(), kvd), std::span<float>(att_.data(), dim), pos);
      x_.noalias() += ConstMatrixMap(ck_.wo(l), dim, dim) * att_;
      ffn(l);
    }
    rmsnorm(xb_.data(), x_.data(), ck_.rms_final(), dim);
    logits_.noalias() = ConstMatrixMap(ck_.wcls(), c_.vocab_size, dim) * xb_;
    return logits_.data();
  }

  // A prompt of T tokens at positions 0..T-1 in one pass per layer (the cache must be empty). Writes the
  // logits of every prompt token into `logits` ([T x vocab_size], row-major) when it is non-empty, else
  // only the last token's logits are computed and returned.
  template <class Cache>
  const float* prefill(Cache& cache, std::span<const int> tokens, std::span<float> logits = {}) {
    const int T = static_cast<int>(tokens.size());
    KVTRIM_CHECK(T > 0, "llama2 prefill: empty prompt");
    KVTRIM_CHECK(logits.empty() || logits.size() == static_cast<std::size_t>(T) * c_.vocab_size,
                 "llama2 prefill: logits has ", logits.size(), " floats; expected T*vocab_size = ",
                 static_cast<std::size_t>(T) * c_.vocab_size);
    const int dim = c_.dim;
    Matrix X(T, dim), A(T, dim);
    for (int t = 0; t < T; ++t) embed(tokens[t], X.row(t).data());
    std::vector<Rope> ropes(static_cast<std::size_t>(T));
    for (int t = 0; t < T; ++t) ropes[t].at(t, c_.head_size());
    for (int l = 0; l < c_.n_layers; ++l) {
      qkv_rows(l, X, ropes, [](int t) { return static_cast<std::int64_t>(t); });
      cache.prefill(l, std::span<const float>(Qr_.data(), Qr_.size()), std::span<const float>(Kr_.data(), Kr_.size()),
                    std::span<const float>(Vr_.data(), Vr_.size()), std::span<float>(A.data(), A.size()));
      finish_rows(l, X, A);
    }
    const ConstMatrixMap Wcls(ck_.wcls(), c_.vocab_size, dim);
    for (int t = logits.empty() ? T - 1 : 0; t < T; ++t) {
      rmsnorm(xb_.data(), X.row(t).data(), ck_.rms_final(), dim);
      logits_.noalias() = Wcls * xb_;
      if (!logits.empty())
        std::copy(logits_.data(), logits_.data() + c_.vocab_size, logits.data() + static_cast<std::size_t>(t) * c_.vocab_size);
    }
    return logits_.data();
  }

  // One token for each sequence of a kvtrim::KVBatch: row r is sequence ids[r] with token tokens[r] at position
  // positions[r]. The same forward pass as decode(), with the weights applied to all B rows at once (one
  // matrix product per weight instead of B), which is where batching pays off on the engine side; kvtrim
  // decodes the B sequences' (sequence, KV head) pairs on the batch's threads. Returns the logits
  // [B x vocab_size], row-major, valid until the next call.
  template <class Batch>
  const float* decode_batch(Batch& batch, std::span<const int> ids, std::span<const int> tokens,
                            std::span<const std::int64_t> positions) {
    const int B = static_cast<int>(ids.size());
    KVTRIM_CHECK(B > 0 && tokens.size() == ids.size() && positions.size() == ids.size(), "llama2 decode_batch: ",
                 ids.size(), " ids, ", tokens.size(), " tokens and ", positions.size(),
                 " positions; expected the same number (at least 1) of each");
    const int dim = c_.dim;
    Xb_.resize(B, dim);
    Ab_.resize(B, dim);
    ropes_.resize(static_cast<std::size_t>(B));
    for (int r = 0; r < B; ++r) {
      embed(tokens[r], Xb_.row(r).data());
      ropes_[r].at(positions[r], c_.head_size());
    }
    for (int l = 0; l < c_.n_layers; ++l) {
      qkv_rows(l, Xb_, ropes_, [&](int r) { return positions[r]; });
      batch.decode(l, ids, std::span<const float>(Qr_.data(), Qr_.size()), std::span<const float>(Kr_.data(), Kr_.size()),
                   std::span<const float>(Vr_.data(), Vr_.size()), std::span<float>(Ab_.data(), Ab_.size()), positions);
      finish_rows(l, Xb_, Ab_);
    }
    for (int r = 0; r < B; ++r) rmsnorm(XBr_.row(r).data(), Xb_.row(r).data(), ck_.rms_final(), dim);
    Logits_.noalias() = XBr_ * ConstMatrixMap(ck_.wcls(), c_.vocab_size, dim).transpose();
    return Logits_.data();
  }

 private:
  void check_token(int token) const {
    KVTRIM_CHECK(token >= 0 && token < c_.vocab_size, "llama2: token id ", token, " out of range 0..",
                 c_.vocab_size - 1);
  }
  void embed(int token, float* row) const {
    check_token(token);
    const float* e = ck_.embedding() + static_cast<std::size_t>(token) * c_.dim;
    std::copy(e, e + c_.dim, row);
  }
  // Qr_, Kr_, Vr_ of the rows of X at layer l, rotated (row r by ropes[r]) and shown to the tap.
  template <class PositionOf>
  void qkv_rows(int l, const Matrix& X, const std::vector<Rope>& ropes, PositionOf position_of) {
    const int T = static_cast<int>(X.rows()), dim = c_.dim, kvd = c_.kv_dim(), hs = c_.head_size();
    XBr_.resize(T, dim);
    for (int t = 0; t < T; ++t) rmsnorm(XBr_.row(t).data(), X.row(t).data(), ck_.rms_att(l), dim);
    Qr_.noalias() = XBr_ * ConstMatrixMap(ck_.wq(l), dim, dim).transpose();
    Kr_.noalias() = XBr_ * ConstMatrixMap(ck_.wk(l), kvd, dim).transpose();
    Vr_.noalias() = XBr_ * ConstMatrixMap(ck_.wv(l), kvd, dim).transpose();
    for (int t = 0; t < T; ++t) {
      ropes[static_cast<std::size_t>(t)].apply(Qr_.row(t).data(), c_.n_heads, hs);
      ropes[static_cast<std::size_t>(t)].apply(Kr_.row(t).data(), c_.n_kv_heads, hs);
      if (tap_) tap_(l, position_of(t), Qr_.row(t).data(), Kr_.row(t).data(), Vr_.row(t).data());
    }
  }
  // X += A Wo^T, then the feed-forward block on every row of X.
  void finish_rows(int l, Matrix& X, const Matrix& A) {
    const int T = static_cast<int>(X.rows()), dim = c_.dim;
    X.noalias() += A * ConstMatrixMap(ck_.wo(l), dim, dim).transpose();
    for (int t = 0; t < T; ++t) rmsnorm(XBr_.row(t).data(), X.row(t).data(), ck_.rms_ffn(l), dim);
    H1r_.noalias() = XBr_ * ConstMatrixMap(ck_.w1(l), c_.hidden_dim, dim).transpose();
    H3r_.noalias() = XBr_ * ConstMatrixMap(ck_.w3(l), c_.hidden_dim, dim).transpose();
    H1r_ = H1r_.unaryExpr([](float a) { return silu(a); }).cwiseProduct(H3r_);
    X.noalias() += H1r_ * ConstMatrixMap(ck_.w2(l), dim, c_.hidden_dim).transpose();
  }
  // x += W2 (silu(W1 rmsnorm(x)) * W3 rmsnorm(x))
  void ffn(int l) {
    const int dim = c_.dim, hid = c_.hidden_dim;
    rmsnorm(xb_.data(), x_.data(), ck_.rms_ffn(l), dim);
    h1_.noalias() = ConstMatrixMap(ck_.w1(l), hid, dim) * xb_;
    h3_.noalias() = ConstMatrixMap(ck_.w3(l), hid, dim) * xb_;
    for (int i = 0; i < hid; ++i) h1_[i] = silu(h1_[i]) * h3_[i];
    x_.noalias() += ConstMatrixMap(ck_.w2(l), dim, hid) * h1_;
  }

  const Checkpoint& ck_;
  Config c_;
  Eigen::VectorXf x_, xb_, xb2_, q_, att_, k_, v_, h1_, h3_, logits_;
  Rope rope_;
  // Row-wise work of prefill and decode_batch: rows x dim activations, their Q, K, V and FFN hidden rows.
  Matrix Xb_, Ab_, XBr_, Qr_, Kr_, Vr_, H1r_, H3r_, Logits_;
  std::vector<Rope> ropes_;
  KvTap tap_;
};

}  // namespace llama2
