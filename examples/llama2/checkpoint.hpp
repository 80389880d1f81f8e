// llama2.c checkpoint loader (the "legacy" version-0 float32 format of karpathy/llama2.c).
//
// File layout: a header of 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size, seq_len), then float32 tensors in this order:
//   token_embedding [vocab x dim], rms_att [L x dim], wq [L x dim x dim], wk [L x kv_dim x dim],
//   wv [L x kv_dim x dim], wo [L x dim x dim], rms_ffn [L x dim], w1 [L x hidden x dim],
//   w2 [L x dim x hidden], w3 [L x hidden x dim], rms_final [dim],
//   freq_cis_real [seq_len x head_size/2], freq_cis_imag [same]   (unused: RoPE is computed),
//   wcls [vocab x dim]   only when vocab_size is negative in the header (unshared classifier).
// Matrices are row-major [out x in], so y = W x.
//
// Every problem (missing file, a directory, truncated file, a header whose sizes disagree with the file size, absurd
// dimensions, non-finite weights) throws llama2::LoadError (a kvtrim::Error) before anything large is
// allocated.
#pragma once

#include <kvtrim/error.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace llama2 {

struct LoadError : kvtrim::Error {
  using kvtrim::Error::Error;
};

struct Config {
  int dim = 0;
  int hidden_dim = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int vocab_size = 0;  // always positive here; see shared_classifier
  int seq_len = 0;
  bool shared_classifier = true;  // header vocab_size > 0: the classifier is the token embedding

  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_size(); }
};

// Float counts of each tensor, in file order (used for the size check and for slicing).
struct TensorSizes {
  std::uint64_t embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis, wcls;
  std::uint64_t total() const {
    return embedding + rms_att + wq + wk + wv + wo + rms_ffn + w1 + w2 + w3 + rms_final + freq_cis + wcls;
  }
};

inline TensorSizes tensor_sizes(const Config& c) {
  const std::uint64_t L = static_cast<std::uint64_t>(c.n_layers), d = static_cast<std::uint64_t>(c.dim),
                      h = static_cast<std::uint64_t>(c.hidden_dim), v = static_cast<std::uint64_t>(c.vocab_size),
                      kv = static_cast<std::uint64_t>(c.kv_dim()), hs = static_cast<std::uint64_t>(c.head_size()),
                      T = static_cast<std::uint64_t>(c.seq_len);
  return TensorSizes{v * d,      L * d,     L * d * d, L * kv * d, L * kv * d,
                     L * d * d,  L * d,     L * h * d, L * d * h,  L * h * d,
                     d,          T * hs,  // real + imag halves: 2 * seq_len * head_size / 2
                     c.shared_classifier ? 0 : v * d};
}

// Rejects headers no real checkpoint has, before any size arithmetic is trusted.
inline void validate_header(const Config& c, const std::string& path) {
  auto bad = [&](const char* what, long long value, const char* expected) {
    throw LoadError("llama2 checkpoint " + path + ": header field " + what + " = " + std::to_string(value) +
                    "; expected " + expected + " (is this a llama2.c float32 checkpoint?)");
  };
  if (c.dim <= 0 || c.dim > 65536) bad("dim", c.dim, "1..65536");
  if (c.hidden_dim <= 0 || c.hidden_dim > 1 << 20) bad("hidden_dim", c.hidden_dim, "1..1048576");
  if (c.n_layers <= 0 || c.n_layers > 1024) bad("n_layers", c.n_layers, "1..1024");
  if (c.n_heads <= 0 || c.n_heads > c.dim || c.dim % c.n_heads != 0)
    bad("n_heads", c.n_heads, "a divisor of dim");
  if (c.head_size() % 2 != 0) bad("n_heads", c.n_heads, "dim / n_heads even (RoPE rotates pairs)");
  if (c.n_kv_heads <= 0 || c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads != 0)
    bad("n_kv_heads", c.n_kv_heads, "a divisor of n_heads");
  if (c.vocab_size <= 0 || c.vocab_size > 1 << 22) bad("|vocab_size|", c.vocab_size, "1..4194304");
  if (c.seq_len <= 0 || c.seq_len > 1 << 22) bad("seq_len", c.seq_len, "1..4194304");
}

// The weights, held in one buffer; accessors return pointers to row-major [out x in] matrices.
class Checkpoint {
 public:
  static Checkpoint load(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      throw LoadError("llama2 checkpoint " + path + ": is a directory, not a checkpoint file");
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f)
      throw LoadError("llama2 checkpoint " + path +
                      ": cannot open the file (download a llama2.c checkpoint such as stories260K.bin or "
                      "stories15M.bin from huggingface.co/karpathy/tinyllamas and pass its path)");
    const std::streamoff file_size = f.tellg();
    if (file_size < 28)
      throw LoadError("llama2 checkpoint " + path + ": " + std::to_string(file_size) +
                      " bytes, shorter than the 28-byte header (7 int32)");
    f.seekg(0);
    std::int32_t h[7];
    f.read(reinterpret_cast<char*>(h), sizeof(h));
    Checkpoint ck;
    Config& c = ck.cfg_;
    c.dim = h[0];
    c.hidden_dim = h[1];
    c.n_layers = h[2];
    c.n_heads = h[3];
    c.n_kv_heads = h[4];
    c.shared_classifier = h[5] > 0;
    c.vocab_size = h[5] == INT32_MIN ? 0 : std::abs(h[5]);
    c.seq_len = h[6];
    validate_header(c, path);
    const TensorSizes s = tensor_sizes(c);
    const std::uint64_t expected = 28 + 4 * s.total();
    if (static_cast<std::uint64_t>(file_size) != expected)
      throw LoadError("llama2 checkpoint " + path + ": file has " + std::to_string(file_size) +
                      " bytes but its header (dim " + std::to_string(c.dim) + ", hidden_dim " +
                      std::to_string(c.hidden_dim) + ", n_layers " + std::to_string(c.n_layers) + ", n_heads " +
                      std::to_string(c.n_heads) + ", n_kv_heads " + std::to_string(c.n_kv_heads) + ", vocab_size " +
                      std::to_string(h[5]) + ", seq_len " + std::to_string(c.seq_len) + ") implies " +
                      std::to_string(expected) + " bytes" +
                      (static_cast<std::uint64_t>(file_size) < expected ? " (truncated?)"
                                                                        : " (not a legacy float32 checkpoint?)"));
    ck.data_.resize(s.total());
    f.read(reinterpret_cast<char*>(ck.data_.data()), static_cast<std::streamsize>(4 * s.total()));
    if (!f) throw LoadError("llama2 checkpoint " + path + ": read error after the header");
    for (std::size_t i = 0; i < ck.data_.size(); ++i)
      if (!std::isfinite(ck.data_[i]))
        throw LoadError("llama2 checkpoint " + path + ": weight " + std::to_string(i) + " is not finite");
    ck.slice(s);
    return ck;
  }

  const Config& config() const { return cfg_; }

  const float* embedding() const { return data_.data() + off_.embedding; }
  const float* rms_att(int l) const { return at(off_.rms_att, l, cfg_.dim); }
  const float* wq(int l) const { return at(off_.wq, l, std::uint64_t(cfg_.dim) * cfg_.dim); }
  const float* wk(int l) const { return at(off_.wk, l, std::uint64_t(cfg_.kv_dim()) * cfg_.dim); }
  const float* wv(int l) const { return at(off_.wv, l, std::uint64_t(cfg_.kv_dim()) * cfg_.dim); }
  const float* wo(int l) const { return at(off_.wo, l, std::uint64_t(cfg_.dim) * cfg_.dim); }
  const float* rms_ffn(int l) const { return at(off_.rms_ffn, l, cfg_.dim); }
  const float* w1(int l) const { return at(off_.w1, l, std::uint64_t(cfg_.hidden_dim) * cfg_.dim); }
  const float* w2(int l) const { return at(off_.w2, l, std::uint64_t(cfg_.dim) * cfg_.hidden_dim); }
  const float* w3(int l) const { return at(off_.w3, l, std::uint64_t(cfg_.hidden_dim) * cfg_.dim); }
  const float* rms_final() const { return data_.data() + off_.rms_final; }
  const float* wcls() const { return data_.data() + (cfg_.shared_classifier ? off_.embedding : off_.wcls); }

 private:
  const float* at(std::uint64_t base, int layer, std::uint64_t per_layer) const {
    return data_.data() + base + static_cast<std::uint64_t>(layer) * per_layer;
  }
  // Offsets (in floats) of each tensor: a running sum over the file order.
  void slice(const TensorSizes& s) {
    std::uint64_t o = 0;
    auto next = [&o](std::uint64_t n) {
      const std::uint64_t here = o;
      o += n;
      return here;
    };
    off_.embedding = next(s.embedding);
    off_.rms_att = next(s.rms_att);
    off_.wq = next(s.wq);
    off_.wk = next(s.wk);
    off_.wv = next(s.wv);
    off_.wo = next(s.wo);
    off_.rms_ffn = next(s.rms_ffn);
    off_.w1 = next(s.w1);
    off_.w2 = next(s.w2);
    off_.w3 = next(s.w3);
    off_.rms_final = next(s.rms_final);
    next(s.freq_cis);
    off_.wcls = next(s.wcls);
  }

  Config cfg_;
  TensorSizes off_{};
  std::vector<float> data_;
};

}  // namespace llama2
