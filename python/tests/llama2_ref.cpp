// kvtrim_llama2_ref: the C++ llama2.c engine (examples/llama2) as the reference the Python tests compare the
// Hugging Face + kvtrim path with. It prints one JSON document on stdout.
//
//   kvtrim_llama2_ref --model M --tokenizer T --text F --bytes N --window W [--windows K]
//                     [--policy NAME --budget B --protocol stream|prompt --prompt P --param key=value ...]
//                     [--generate STEPS]
//
// Windows are cut as compare_policies cuts them: the first N bytes of the text (never splitting a UTF-8
// character), tokenised without BOS, then BOS + W-1 tokens per window (a shorter remainder is dropped).
// With --policy, each window is fed teacher-forced through the engine with that registered policy:
//   stream  every token decoded from BOS; every position predicts the next token;
//   prompt  the first min(P, L-2) tokens prefilled in one pass and compressed, the rest decoded; the positions
//           fed by decode predict.
// Per window it reports the summed negative log-likelihood of the targets, their count, the top-1 predictions
// and the peak KV bytes in use. --generate STEPS: greedy tokens from BOS through the policy (as examples/generate).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <kvtrim/any_cache.hpp>

#include "llama2/model.hpp"

namespace {

std::string read_text(const std::string& path, std::size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw kvtrim::Error("cannot open the text " + path);
  std::string s(bytes, '\0');
  f.read(s.data(), static_cast<std::streamsize>(bytes));
  s.resize(static_cast<std::size_t>(f.gcount()));
  std::size_t cut = s.size();  // never end inside a UTF-8 character
  while (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0xC0) == 0x80) --cut;
  if (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0x80)) s.resize(cut - 1);
  return s;
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') o += '\\', o += static_cast<char>(c);
    else if (c == '\n') o += "\\n";
    else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else o += static_cast<char>(c);
  }
  return o + "\"";
}

template <class T>
std::string json_list(const std::vector<T>& v) {
  std::string o = "[";
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i > 0) o += ',';
    o += std::to_string(v[i]);
  }
  o += ']';
  return o;
}

struct Options {
  std::string model, tokenizer, text, policy, protocol = "stream";
  std::size_t bytes = 4000;
  int window = 512, windows = 0, prompt = 256, budget = 0, generate = 0;
  std::vector<std::pair<std::string, std::string>> params;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) throw kvtrim::Error("option " + a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--model") o.model = v;
    else if (a == "--tokenizer") o.tokenizer = v;
    else if (a == "--text") o.text = v;
    else if (a == "--bytes") o.bytes = std::stoul(v);
    else if (a == "--window") o.window = std::stoi(v);
    else if (a == "--windows") o.windows = std::stoi(v);
    else if (a == "--policy") o.policy = v;
    else if (a == "--budget") o.budget = std::stoi(v);
    else if (a == "--protocol") o.protocol = v;
    else if (a == "--prompt") o.prompt = std::stoi(v);
    else if (a == "--generate") o.generate = std::stoi(v);
    else if (a == "--param") {
      const std::size_t eq = v.find('=');
      if (eq == std::string::npos) throw kvtrim::Error("--param " + v + ": expected key=value");
      o.params.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    } else throw kvtrim::Error("unknown option " + a);
  }
  if (o.protocol != "stream" && o.protocol != "prompt") throw kvtrim::Error("--protocol: stream or prompt");
  return o;
}

void log_softmax(const float* logits, int n, std::vector<double>& out) {
  out.resize(static_cast<std::size_t>(n));
  double m = logits[0];
  for (int i = 1; i < n; ++i) m = std::max(m, double(logits[i]));
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp(double(logits[i]) - m);
  const double lse = m + std::log(z);
  for (int i = 0; i < n; ++i) out[i] = double(logits[i]) - lse;
}

int argmax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse(argc, argv);
    const auto ck = llama2::Checkpoint::load(opt.model);
    const auto& c = ck.config();
    const auto tok = llama2::Tokenizer::load(opt.tokenizer, c.vocab_size);
    llama2::Transformer tf(ck);
    const kvtrim::PolicyOptions popt{opt.params, nullptr};
    std::printf("{\"config\": {\"dim\": %d, \"n_layers\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, \"vocab_size\": %d, "
                "\"seq_len\": %d}",
                c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len);

    if (!opt.text.empty()) {
      const std::vector<int> ids = tok.encode(read_text(opt.text, opt.bytes), false, false);
      std::printf(",\n\"text_tokens\": %s", json_list(ids).c_str());
      std::vector<std::vector<int>> windows;
      const std::size_t w = static_cast<std::size_t>(opt.window - 1);
      for (std::size_t i = 0; i + w <= ids.size(); i += w) {
        if (opt.windows > 0 && windows.size() == static_cast<std::size_t>(opt.windows)) break;
        std::vector<int> win{llama2::Tokenizer::kBos};
        win.insert(win.end(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids.begin() + static_cast<std::ptrdiff_t>(i + w));
        windows.push_back(std::move(win));
      }
      std::printf(",\n\"windows\": [");
      for (std::size_t i = 0; i < windows.size(); ++i) std::printf("%s%s", i ? ",\n" : "", json_list(windows[i]).c_str());
      std::printf("]");
      if (!opt.policy.empty()) {
        std::printf(",\n\"results\": [");
        std::vector<double> lp;
        for (std::size_t wi = 0; wi < windows.size(); ++wi) {
          const std::vector<int>& t = windows[wi];
          const int L = static_cast<int>(t.size());
          auto cache = kvtrim::make_cache(opt.policy, llama2::cache_config(c, opt.budget > 0 ? opt.budget : L), popt);
          double nll = 0;
          std::vector<int> top1;
          std::size_t peak = 0;
          int pos = 0;
          if (opt.protocol == "prompt") {
            const int P0 = std::min(opt.prompt, L - 2);
            tf.prefill(*cache, std::span<const int>(t.data(), static_cast<std::size_t>(P0)));
            peak = cache->bytes_used();
            pos = P0;
          }
          const int first = pos;
          for (; pos < L - 1; ++pos) {
            const float* logits = tf.decode(*cache, t[pos], pos);
            peak = std::max(peak, cache->bytes_used());
            log_softmax(logits, c.vocab_size, lp);
            nll -= lp[t[pos + 1]];
            top1.push_back(argmax(logits, c.vocab_size));
          }
          std::printf("%s{\"nll\": %.17g, \"n\": %d, \"first\": %d, \"peak_bytes\": %zu, \"evictions\": %llu, \"top1\": %s}",
                      wi ? ",\n" : "", nll, L - 1 - first, first, peak, (unsigned long long)cache->evictions(),
                      json_list(top1).c_str());
        }
        std::printf("]");
      }
    }

    if (opt.generate > 0) {
      const int steps = opt.generate;
      auto cache = kvtrim::make_cache(opt.policy.empty() ? "full" : opt.policy,
                                      llama2::cache_config(c, opt.budget > 0 ? opt.budget : steps), popt);
      std::vector<int> out;
      std::string text;
      int token = llama2::Tokenizer::kBos;
      for (int pos = 0; pos < steps; ++pos) {
        const int next = argmax(tf.decode(*cache, token, pos), c.vocab_size);
        if (next == llama2::Tokenizer::kBos) break;
        out.push_back(next);
        text += tok.decode(token, next);
        token = next;
      }
      std::printf(",\n\"generate\": {\"tokens\": %s, \"text\": %s}", json_list(out).c_str(), json_string(text).c_str());
    }
    std::printf("}\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtrim_llama2_ref: %s\n", e.what());
    return 1;
  }
}
