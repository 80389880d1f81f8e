// The llama2.c engine in examples/llama2: exact reproduction of the published greedy text of stories260K,
// logits against an independent double-precision forward pass written here with plain loops (its own file
// parsing, its own attention over a plain list of past keys/values), the tokenizer against a naive BPE, and
// clear errors for broken model files. Tests that need the real model skip with a message when it is absent.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "../examples/llama2/model.hpp"
#include "testing.hpp"

namespace {

namespace fs = std::filesystem;

std::string models_dir() {
  if (const char* env = std::getenv("KVTRIM_MODELS")) return env;
  return KVTRIM_DEFAULT_MODELS_DIR;
}
bool have_models() {
  const std::string d = models_dir();
  return fs::exists(d + "/stories260K.bin") && fs::exists(d + "/tok512.bin");
}
#define REQUIRE_MODELS()                                                                                  \
  if (!have_models()) {                                                                                   \
    WARN("SKIPPED: stories260K.bin / tok512.bin not found in " << models_dir()                           \
                                                                << " (set KVTRIM_MODELS to their folder)"); \
    return;                                                                                               \
  }

// The published greedy output of stories260K from BOS, 200 steps, temperature 0 (SOURCES.md; llama2.c's
// test_all.py expected_stdout without its final newline).
const char* kReference =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
    "saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want "
    "to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she";

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
void write_bytes(const std::string& path, const std::vector<char>& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(b.data(), static_cast<std::streamsize>(b.size()));
}
std::string temp_path(const std::string& name) {
  return (fs::temp_directory_path() / ("kvtrim_test_llama2_" + name)).string();
}

// ---- independent reference: parses the file itself, runs the model in double with plain loops ----------
struct RefModel {
  int dim, hidden, layers, heads, kv_heads, vocab, seq;
  bool shared;
  std::vector<float> w;
  std::size_t emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, wcls;

  explicit RefModel(const std::string& path) {
    std::vector<char> b = read_bytes(path);
    std::int32_t h[7];
    std::memcpy(h, b.data(), sizeof h);
    dim = h[0], hidden = h[1], layers = h[2], heads = h[3], kv_heads = h[4], vocab = std::abs(h[5]), seq = h[6];
    shared = h[5] > 0;
    w.resize((b.size() - 28) / 4);
    std::memcpy(w.data(), b.data() + 28, w.size() * 4);
    const std::size_t hs = dim / heads, kvd = kv_heads * hs, L = layers;
    std::size_t o = 0;
    emb = o, o += std::size_t(vocab) * dim;
    rms_att = o, o += L * dim;
    wq = o, o += L * dim * dim;
    wk = o, o += L * kvd * dim;
    wv = o, o += L * kvd * dim;
    wo = o, o += L * dim * dim;
    rms_ffn = o, o += L * dim;
    w1 = o, o += L * hidden * dim;
    w2 = o, o += L * dim * hidden;
    w3 = o, o += L * hidden * dim;
    rms_final = o, o += dim;
    o += std::size_t(seq) * hs;  // freq_cis real + imag
    wcls = shared ? emb : o;
  }
  int hs() const { return dim / heads; }
  int kvd() const { return kv_heads * hs(); }
  // y[r] = sum_c W[r][c] x[c] for the row-major matrix at offset `at` with `cols` columns.
  std::vector<double> matvec(std::size_t at, int rows, int cols, const std::vector<double>& x) const {
    std::vector<double> y(rows, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) y[r] += double(w[at + std::size_t(r) * cols + c]) * x[c];
    return y;
  }
  std::vector<double> rmsnorm(const std::vector<double>& x, std::size_t at) const {
    double ss = 0;
    for (double e : x) ss += e * e;
    const double s = 1.0 / std::sqrt(ss / double(x.size()) + 1e-5);
    std::vector<double> o(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) o[i] = double(w[at + i]) * x[i] * s;
    return o;
  }
  void rope(std::vector<double>& x, int n_heads, std::int64_t pos) const {
    for (int h = 0; h < n_heads; ++h)
      for (int i = 0; i < hs() / 2; ++i) {
        const double ang = double(pos) * std::pow(10000.0, -2.0 * i / hs());
        double& a = x[std::size_t(h) * hs() + 2 * i];
        double& b = x[std::size_t(h) * hs() + 2 * i + 1];
        const double a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = a0 * std::sin(ang) + b0 * std::cos(ang);
      }
  }
};

// A sequence run by the reference: a plain list of every past token's rotated key and value per layer.
// `visible(t, j)` says whether token j is attended at step t (all by default: the full cache).
struct RefRun {
  const RefModel& m;
  std::vector<std::vector<std::vector<double>>> K, V;  // [layer][token][kv_dim]
  std::function<bool(int, int)> visible = [](int, int) { return true; };
  explicit RefRun(const RefModel& model) : m(model), K(model.layers), V(model.layers) {}

  std::vector<double> step(int token) {
    const int t = static_cast<int>(K[0].size()), dim = m.dim, hs = m.hs(), kvd = m.kvd();
    std::vector<double> x(dim);
    for (int i = 0; i < dim; ++i) x[i] = m.w[m.emb + std::size_t(token) * dim + i];
    for (int l = 0; l < m.layers; ++l) {
      auto xb = m.rmsnorm(x, m.rms_att + std::size_t(l) * dim);
      auto q = m.matvec(m.wq + std::size_t(l) * dim * dim, dim, dim, xb);
      auto k = m.matvec(m.wk + std::size_t(l) * kvd * dim, kvd, dim, xb);
      auto v = m.matvec(m.wv + std::size_t(l) * kvd * dim, kvd, dim, xb);
      m.rope(q, m.heads, t);
      m.rope(k, m.kv_heads, t);
      K[l].push_back(k);
      V[l].push_back(v);
      std::vector<double> att(dim, 0.0);
      for (int h = 0; h < m.heads; ++h) {
        const int kvh = h / (m.heads / m.kv_heads);
        std::vector<double> s;
        std::vector<int> who;
        for (int j = 0; j <= t; ++j) {
          if (!visible(t, j)) continue;
          double dot = 0;
          for (int i = 0; i < hs; ++i) dot += q[std::size_t(h) * hs + i] * K[l][j][std::size_t(kvh) * hs + i];
          s.push_back(dot / std::sqrt(double(hs)));
          who.push_back(j);
        }
        double mx = -1e300, z = 0;
        for (double e : s) mx = std::max(mx, e);
        for (double& e : s) z += (e = std::exp(e - mx));
        for (std::size_t n = 0; n < s.size(); ++n)
          for (int i = 0; i < hs; ++i) att[std::size_t(h) * hs + i] += s[n] / z * V[l][who[n]][std::size_t(kvh) * hs + i];
      }
      auto o = m.matvec(m.wo + std::size_t(l) * dim * dim, dim, dim, att);
      for (int i = 0; i < dim; ++i) x[i] += o[i];
      xb = m.rmsnorm(x, m.rms_ffn + std::size_t(l) * dim);
      auto h1 = m.matvec(m.w1 + std::size_t(l) * m.hidden * dim, m.hidden, dim, xb);
      auto h3 = m.matvec(m.w3 + std::size_t(l) * m.hidden * dim, m.hidden, dim, xb);
      for (int i = 0; i < m.hidden; ++i) h1[i] = h1[i] / (1.0 + std::exp(-h1[i])) * h3[i];
      auto f = m.matvec(m.w2 + std::size_t(l) * dim * m.hidden, dim, m.hidden, h1);
      for (int i = 0; i < dim; ++i) x[i] += f[i];
    }
    x = m.rmsnorm(x, m.rms_final);
    return m.matvec(m.wcls, m.vocab, dim, x);
  }
};

double max_abs_diff(const float* a, const std::vector<double>& b) {
  double d = 0;
  for (std::size_t i = 0; i < b.size(); ++i) d = std::max(d, std::abs(double(a[i]) - b[i]));
  return d;
}
double max_abs(const std::vector<double>& b) {
  double d = 0;
  for (double e : b) d = std::max(d, std::abs(e));
  return d;
}

// A random checkpoint file in llama2.c's layout (for shapes the real model does not have).
void write_random_checkpoint(const std::string& path, int dim, int hidden, int layers, int heads, int kv_heads,
                             int vocab, int seq, bool shared, std::uint64_t seed) {
  const std::size_t hs = dim / heads, kvd = kv_heads * hs, L = layers;
  const std::size_t n = std::size_t(vocab) * dim + L * dim + L * dim * dim + 2 * L * kvd * dim + L * dim * dim +
                        L * dim + 3 * L * hidden * dim + dim + std::size_t(seq) * hs +
                        (shared ? 0 : std::size_t(vocab) * dim);
  kvtest::Rng rng(seed);
  std::vector<float> w = rng.normal(n, 0.3f);
  std::int32_t h[7] = {dim, hidden, layers, heads, kv_heads, shared ? vocab : -vocab, seq};
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(h), sizeof h);
  f.write(reinterpret_cast<const char*>(w.data()), static_cast<std::streamsize>(w.size() * 4));
}

}  // namespace

TEST_CASE("llama2: greedy generation from BOS with FullCache reproduces the published stories260K text") {
  REQUIRE_MODELS();
  const auto ck = llama2::Checkpoint::load(models_dir() + "/stories260K.bin");
  const auto tok = llama2::Tokenizer::load(models_dir() + "/tok512.bin", ck.config().vocab_size);
  CHECK(ck.config().dim == 64);
  CHECK(ck.config().n_kv_heads == 4);
  kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(ck.config(), 200));
  llama2::Transformer tf(ck);
  std::string text;
  int token = llama2::Tokenizer::kBos;
  for (int pos = 0; pos < 200; ++pos) {
    const float* logits = tf.decode(cache, token, pos);
    int next = 0;
    for (int i = 1; i < ck.config().vocab_size; ++i)
      if (logits[i] > logits[next]) next = i;
    if (next == llama2::Tokenizer::kBos) break;
    text += tok.decode(token, next);
    token = next;
  }
  CHECK(text == kReference);
  CHECK(cache.size(0, 0) == 200);
}

TEST_CASE("llama2: decode and prefill logits match an independent double-precision forward pass") {
  REQUIRE_MODELS();
  const std::string path = models_dir() + "/stories260K.bin";
  const auto ck = llama2::Checkpoint::load(path);
  const auto tok = llama2::Tokenizer::load(models_dir() + "/tok512.bin", ck.config().vocab_size);
  const RefModel ref(path);
  const std::vector<int> ids = tok.encode("Tom had a red kite. He ran to the hill with his dog.", true, false);
  REQUIRE(ids.size() >= 12);
  const int T = 12;

  SECTION("decode, one token at a time, FullCache") {
    kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(ck.config(), 64));
    llama2::Transformer tf(ck);
    RefRun run(ref);
    for (int t = 0; t < T; ++t) {
      const float* logits = tf.decode(cache, ids[t], t);
      const auto want = run.step(ids[t]);
      INFO("token " << t);
      CHECK(max_abs_diff(logits, want) < 1e-4 * std::max(1.0, max_abs(want)));
    }
  }
  SECTION("prefill of the whole prompt, every row of logits") {
    kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(ck.config(), 64));
    llama2::Transformer tf(ck);
    std::vector<float> logits(static_cast<std::size_t>(T) * ck.config().vocab_size);
    tf.prefill(cache, std::span<const int>(ids.data(), T), logits);
    RefRun run(ref);
    for (int t = 0; t < T; ++t) {
      const auto want = run.step(ids[t]);
      INFO("token " << t);
      CHECK(max_abs_diff(logits.data() + std::size_t(t) * ck.config().vocab_size, want) <
            1e-4 * std::max(1.0, max_abs(want)));
    }
    CHECK(cache.size(2, 3) == T);
  }
  SECTION("StreamingLLM cache: the engine attends exactly to the sinks and the recent window") {
    const int sinks = 2, budget = 6, n = 20;
    std::vector<int> long_ids = tok.encode(
        "Tom had a red kite. He ran to the hill with his dog. The wind was strong and the kite flew high.", true,
        false);
    REQUIRE(long_ids.size() >= std::size_t(n));
    kvtrim::KVCache<kvtrim::StreamingLLM> cache(llama2::cache_config(ck.config(), budget), {.sinks = sinks});
    llama2::Transformer tf(ck);
    RefRun run(ref);
    run.visible = [&](int t, int j) { return j < sinks || j > t - (budget - sinks); };
    for (int t = 0; t < n; ++t) {
      const float* logits = tf.decode(cache, long_ids[t], t);
      const auto want = run.step(long_ids[t]);
      INFO("token " << t);
      CHECK(max_abs_diff(logits, want) < 1e-4 * std::max(1.0, max_abs(want)));
    }
  }
}

TEST_CASE("llama2: GQA model with an unshared classifier (negative vocab) matches the reference") {
  const std::string path = temp_path("random_unshared.bin");
  write_random_checkpoint(path, 32, 48, 3, 4, 2, 40, 64, /*shared=*/false, 11);
  const auto ck = llama2::Checkpoint::load(path);
  REQUIRE_FALSE(ck.config().shared_classifier);
  REQUIRE(ck.config().vocab_size == 40);
  const RefModel ref(path);
  kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(ck.config(), 16));
  llama2::Transformer tf(ck);
  RefRun run(ref);
  kvtest::Rng rng(3);
  for (int t = 0; t < 10; ++t) {
    const int token = rng.uniform_int(0, 39);
    const float* logits = tf.decode(cache, token, t);
    const auto want = run.step(token);
    INFO("token " << t);
    CHECK(max_abs_diff(logits, want) < 1e-4 * std::max(1.0, max_abs(want)));
  }
  // The same weights read as a shared-classifier model would be a different (smaller) file: refused.
  std::vector<char> b = read_bytes(path);
  const std::int32_t positive = 40;
  std::memcpy(b.data() + 20, &positive, 4);
  write_bytes(path, b);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(path), Catch::Contains("implies"));
  fs::remove(path);
}

TEST_CASE("llama2: tokenizer encodes like a naive whole-text BPE and decodes back to the text") {
  REQUIRE_MODELS();
  const auto tok = llama2::Tokenizer::load(models_dir() + "/tok512.bin", 512);
  // Naive reference: the whole text (dummy prefix included) merged at once, best score first, the
  // vocabulary searched linearly.
  auto naive = [&](const std::string& text) {
    std::vector<int> ids;
    auto find = [&](const std::string& s) {
      for (int id = 0; id < tok.vocab_size(); ++id)
        if (tok.piece(id) == s) return id;
      return -1;
    };
    for (const std::string& p : std::vector<std::string>{" "}) ids.push_back(find(p));
    for (char c : text) {  // the test text is ASCII
      const int id = find(std::string(1, c));
      ids.push_back(id >= 0 ? id : static_cast<unsigned char>(c) + 3);
    }
    for (;;) {
      int best = -1;
      std::size_t at = 0;
      for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
        const int id = find(tok.piece(ids[i]) + tok.piece(ids[i + 1]));
        if (id >= 0 && (best < 0 || tok.score(id) > tok.score(best))) best = id, at = i;
      }
      if (best < 0) break;
      ids[at] = best;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    ids.insert(ids.begin(), llama2::Tokenizer::kBos);
    return ids;
  };
  const std::string text = "Lily saw a big dog.\nThe dog said, \"Woof!\"\n\nThey played all day.";
  const auto ids = tok.encode(text, true, false);
  REQUIRE(ids.front() == llama2::Tokenizer::kBos);
  std::string back;
  for (std::size_t i = 1; i < ids.size(); ++i) back += tok.decode(ids[i - 1], ids[i]);
  CHECK(back == text);
  CHECK(ids == naive(text));
  CHECK(tok.encode("Once upon a time", true, false) == naive("Once upon a time"));
  // Newlines are byte tokens <0x0A> (id 13) in tok512.
  CHECK(std::count(ids.begin(), ids.end(), 13) == 3);
}

TEST_CASE("llama2: missing, truncated and inconsistent files give a clear kvtrim::Error") {
  const std::string good = temp_path("good.bin");
  write_random_checkpoint(good, 16, 24, 2, 2, 1, 20, 8, true, 5);
  REQUIRE_NOTHROW(llama2::Checkpoint::load(good));
  const std::vector<char> bytes = read_bytes(good);
  const std::string bad = temp_path("bad.bin");

  CHECK_THROWS_AS(llama2::Checkpoint::load(temp_path("does_not_exist.bin")), kvtrim::Error);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(temp_path("does_not_exist.bin")), Catch::Contains("cannot open"));
  // A directory opens as a stream on some systems and reads as garbage: it is named as what it is.
  CHECK_THROWS_WITH(llama2::Checkpoint::load(fs::temp_directory_path().string()), Catch::Contains("is a directory"));
  CHECK_THROWS_WITH(llama2::Tokenizer::load(fs::temp_directory_path().string(), 512), Catch::Contains("is a directory"));

  write_bytes(bad, std::vector<char>(bytes.begin(), bytes.begin() + 20));
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("header"));

  write_bytes(bad, std::vector<char>(bytes.begin(), bytes.end() - 4));
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("truncated"));

  auto extra = bytes;
  extra.insert(extra.end(), 8, 0);
  write_bytes(bad, extra);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("implies"));

  auto with_field = [&](int field, std::int32_t value) {
    auto b = bytes;
    std::memcpy(b.data() + 4 * field, &value, 4);
    write_bytes(bad, b);
  };
  with_field(0, 1 << 30);  // absurd dim: refused from the header alone
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("dim"));
  with_field(3, 3);  // 16 % 3 != 0
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("n_heads"));
  with_field(4, 0);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("n_kv_heads"));
  with_field(2, -1);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("n_layers"));
  with_field(6, 2000000000);  // huge seq_len: refused (out of range) rather than allocated
  CHECK_THROWS_AS(llama2::Checkpoint::load(bad), llama2::LoadError);

  auto nan = bytes;
  const float q = std::nanf("");
  std::memcpy(nan.data() + 28 + 4 * 7, &q, 4);
  write_bytes(bad, nan);
  CHECK_THROWS_WITH(llama2::Checkpoint::load(bad), Catch::Contains("not finite"));

  // Tokenizer: missing, truncated, and larger than the model's vocabulary.
  CHECK_THROWS_WITH(llama2::Tokenizer::load(temp_path("no_tok.bin"), 20), Catch::Contains("cannot open"));
  std::vector<char> tk;
  auto put = [&](const void* p, std::size_t n) { tk.insert(tk.end(), (const char*)p, (const char*)p + n); };
  const std::int32_t max_len = 4;
  put(&max_len, 4);
  for (int i = 0; i < 300; ++i) {  // at least 259 entries: ids 3..258 are the byte tokens
    const float score = float(i);
    const std::int32_t len = 2;
    put(&score, 4);
    put(&len, 4);
    put("ab", 2);
  }
  write_bytes(bad, tk);
  CHECK_NOTHROW(llama2::Tokenizer::load(bad, 300));
  CHECK_THROWS_WITH(llama2::Tokenizer::load(bad, 301), Catch::Contains("truncated"));
  CHECK_THROWS_WITH(llama2::Tokenizer::load(bad, 299), Catch::Contains("left after"));
  CHECK_THROWS_WITH(llama2::Tokenizer::load(bad, 5), Catch::Contains(">= 259"));
  fs::remove(good);
  fs::remove(bad);
}
