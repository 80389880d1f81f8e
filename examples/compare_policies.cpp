// compare_policies: how every kvtrim policy trades KV memory for quality on a real llama2.c model.
//
// Text (TinyStories validation, the first --bytes bytes) is tokenised and cut into windows of BOS + up to
// --window - 1 tokens, fed teacher-forced through the engine in examples/llama2 with each policy's cache, in
// two protocols:
//   stream  every token decoded one by one from BOS, so eviction happens while decoding;
//           metrics over every predicted token of the window.
//   prompt  the first --prompt tokens prefilled in one pass and compressed by the policy, the rest decoded;
//           metrics over the tokens predicted by decode steps (the prefill's own predictions are exact).
// For every (policy, budget, protocol) it reports perplexity and its ratio to the full cache, top-1
// agreement with the full cache's prediction, mean KL(full || policy) of the next-token distributions,
// long-range recall, KV memory in use (peak bytes per window, and % of the full cache), and tokens/s.
// Long-range recall: among predicted positions whose target token occurred earlier in the window but not in
// the last --recall-distance - 1 tokens (its closest earlier occurrence is >= --recall-distance tokens back)
// and which the full cache predicts correctly (top-1), the fraction the policy still predicts correctly.
//
// Output: a table on the terminal, results.csv, table.md and PNG plots (gnuplot) in --out.
// Adding a policy is one line in llama2/registry.hpp.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include "llama2/model.hpp"
#include "llama2/registry.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// CPU time of the calling thread (tokens/s stays meaningful on a machine shared with other work).
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

enum class Protocol { kStream = 0, kPrompt = 1 };
const char* protocol_name(Protocol p) { return p == Protocol::kStream ? "stream" : "prompt"; }

struct Options {
  std::string models, model, tokenizer, text, out = "out/compare";
  std::size_t bytes = 100000, calib_bytes = 20000;
  int window = 512, prompt = 256, recall_distance = 64, threads = 0;
  double eigen_energy = 0.9;
  std::vector<int> budgets{32, 64, 128, 256};
  std::vector<Protocol> protocols{Protocol::kStream, Protocol::kPrompt};
  std::vector<std::string> only;  // policy names (empty: all)
  bool quick = false, plots = true, list = false;
};

// ---- everything one (policy, budget, protocol) accumulates over the windows ------------------------------
struct Acc {
  double nll = 0, kl = 0, peak_bytes = 0, seconds = 0;
  long long n = 0, agree = 0, recall_hit = 0, recall_n = 0, tokens = 0, windows = 0;
  std::string error;
  void add(const Acc& o) {
    nll += o.nll, kl += o.kl, peak_bytes += o.peak_bytes, seconds += o.seconds;
    n += o.n, agree += o.agree, recall_hit += o.recall_hit, recall_n += o.recall_n, tokens += o.tokens;
    windows += o.windows;
    if (error.empty()) error = o.error;
  }
};

// The full cache's predictions for one window and protocol: what every policy is compared with.
struct Reference {
  int first = 0;                // first evaluated position t (predicting token t+1)
  std::vector<float> logprob;   // [(L-1-first) x vocab] log-softmax of the full cache
  std::vector<int> argmax;      // top-1 of the full cache
  std::vector<char> long_range; // target is a long-range repeat and the full cache gets it right
};

void log_softmax(const float* logits, int n, std::vector<float>& out) {
  out.resize(static_cast<std::size_t>(n));
  float m = logits[0];
  for (int i = 1; i < n; ++i) m = std::max(m, logits[i]);
  double z = 0;
  for (int i = 0; i < n; ++i) z += std::exp(double(logits[i] - m));
  const float lse = m + static_cast<float>(std::log(z));
  for (int i = 0; i < n; ++i) out[i] = logits[i] - lse;
}
int argmax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

// One worker: its own engine state; runs any policy over the current window.
class Runner {
 public:
  Runner(const llama2::Checkpoint& ck, const Options& opt) : ck_(ck), tf_(ck), opt_(opt) {}

  void set_window(const std::vector<int>& tokens) { toks_ = &tokens; }

  // Feeds the window through KVCache<P> under protocol `pr`; calls on_logits(t, logits) for each
  // evaluated position t. Returns the peak bytes in use after any call, and adds time and tokens to acc.
  template <class P, class F>
  std::size_t drive(const typename P::Params& params, int budget, Protocol pr, Acc& acc, F&& on_logits) {
    const std::vector<int>& tok = *toks_;
    const int L = static_cast<int>(tok.size());
    kvtrim::KVCache<P> cache(llama2::cache_config(ck_.config(), budget), params);
    const double t0 = thread_seconds();
    std::size_t peak = 0;
    int t = 0;
    if (pr == Protocol::kPrompt) {
      const int P0 = first_eval(pr, L);
      tf_.prefill(cache, std::span<const int>(tok.data(), static_cast<std::size_t>(P0)));
      peak = cache.bytes_used();
      t = P0;
    }
    for (; t < L - 1; ++t) {
      const float* logits = tf_.decode(cache, tok[t], t);
      peak = std::max(peak, cache.bytes_used());
      on_logits(t, logits);
    }
    acc.seconds += thread_seconds() - t0;
    acc.tokens += L - 1;
    return peak;
  }

  int first_eval(Protocol pr, int L) const {
    return pr == Protocol::kStream ? 0 : std::min(opt_.prompt, L - 2);
  }

  // The full cache's run: fills ref and the full cache's own metrics.
  void reference(Protocol pr, Reference& ref, Acc& acc) {
    const std::vector<int>& tok = *toks_;
    const int L = static_cast<int>(tok.size()), V = ck_.config().vocab_size;
    ref.first = first_eval(pr, L);
    const std::size_t n = static_cast<std::size_t>(L - 1 - ref.first);
    ref.logprob.assign(n * V, 0.0f);
    ref.argmax.assign(n, 0);
    ref.long_range.assign(n, 0);
    const std::size_t peak = drive<kvtrim::FullCache>({}, L, pr, acc, [&](int t, const float* logits) {
      const std::size_t i = static_cast<std::size_t>(t - ref.first);
      log_softmax(logits, V, lp_);
      std::copy(lp_.begin(), lp_.end(), ref.logprob.begin() + static_cast<std::ptrdiff_t>(i * V));
      ref.argmax[i] = argmax(logits, V);
      const int target = tok[t + 1];
      acc.nll -= lp_[target];
      acc.agree += 1;
      acc.n += 1;
      ref.long_range[i] = ref.argmax[i] == target && is_long_range(t + 1);
      acc.recall_n += ref.long_range[i];
      acc.recall_hit += ref.long_range[i];
    });
    acc.peak_bytes += static_cast<double>(peak);
    acc.windows += 1;
  }

  template <class P>
  void evaluate(const typename P::Params& params, int budget, Protocol pr, const Reference& ref, Acc& acc) {
    const std::vector<int>& tok = *toks_;
    const int V = ck_.config().vocab_size;
    const std::size_t peak = drive<P>(params, budget, pr, acc, [&](int t, const float* logits) {
      const std::size_t i = static_cast<std::size_t>(t - ref.first);
      log_softmax(logits, V, lp_);
      const float* r = ref.logprob.data() + i * V;
      double kl = 0;
      for (int v = 0; v < V; ++v) kl += std::exp(double(r[v])) * (double(r[v]) - double(lp_[v]));
      const int top = argmax(logits, V), target = tok[t + 1];
      acc.nll -= lp_[target];
      acc.kl += std::max(0.0, kl);
      acc.agree += top == ref.argmax[i];
      acc.n += 1;
      if (ref.long_range[i]) {
        acc.recall_n += 1;
        acc.recall_hit += top == target;
      }
    });
    acc.peak_bytes += static_cast<double>(peak);
    acc.windows += 1;
  }

  llama2::Transformer& transformer() { return tf_; }

 private:
  // Target at window position p: its closest earlier occurrence (BOS excluded) is >= recall_distance back.
  bool is_long_range(int p) const {
    const std::vector<int>& tok = *toks_;
    for (int j = p - 1; j >= 1; --j)
      if (tok[j] == tok[p]) return p - j >= opt_.recall_distance;
    return false;
  }

  const llama2::Checkpoint& ck_;
  llama2::Transformer tf_;
  const Options& opt_;
  const std::vector<int>* toks_ = nullptr;
  std::vector<float> lp_;
};

// ---- the policies (one line each in llama2/registry.hpp) ---------------------------------------------------
struct Entry {
  std::string name;
  llama2::EntryFlags flags;
  std::function<void(Runner&, int, Protocol, const Reference&, Acc&)> run;
};

std::vector<Entry> entries_of(const llama2::RegistryInputs& in) {
  std::vector<Entry> out;
  llama2::for_each_policy(in, [&]<class P>(std::type_identity<P>, const char* name, auto make, llama2::EntryFlags f) {
    out.push_back({name, f, [make](Runner& r, int budget, Protocol pr, const Reference& ref, Acc& acc) {
                     r.evaluate<P>(make(budget), budget, pr, ref, acc);
                   }});
  });
  return out;
}

// ---- text, calibration --------------------------------------------------------------------------------------
std::string read_text(const std::string& path, std::size_t offset, std::size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw kvtrim::Error("cannot open the text " + path);
  f.seekg(static_cast<std::streamoff>(offset));
  std::string s(bytes, '\0');
  f.read(s.data(), static_cast<std::streamsize>(bytes));
  s.resize(static_cast<std::size_t>(f.gcount()));
  // Never cut a UTF-8 character in half at either end.
  while (!s.empty() && (static_cast<unsigned char>(s.front()) & 0xC0) == 0x80) s.erase(s.begin());
  std::size_t cut = s.size();
  while (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0xC0) == 0x80) --cut;
  if (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0x80)) s.resize(cut - 1);
  return s;
}

// Windows of BOS + (window - 1) tokens; a shorter remainder is dropped.
std::vector<std::vector<int>> make_windows(const std::vector<int>& ids, int window) {
  std::vector<std::vector<int>> out;
  const std::size_t w = static_cast<std::size_t>(window - 1);
  for (std::size_t i = 0; i + w <= ids.size(); i += w) {
    std::vector<int> win{llama2::Tokenizer::kBos};
    win.insert(win.end(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids.begin() + static_cast<std::ptrdiff_t>(i + w));
    out.push_back(std::move(win));
  }
  return out;
}

std::shared_ptr<const kvtrim::EigenBasis> calibrate_eigen(const llama2::Checkpoint& ck,
                                                          const std::vector<std::vector<int>>& windows,
                                                          double energy) {
  const auto& c = ck.config();
  kvtrim::EigenCalibrator cal(llama2::cache_config(c, 1));
  llama2::Transformer tf(ck);
  const std::size_t kvd = static_cast<std::size_t>(c.kv_dim()), dim = static_cast<std::size_t>(c.dim);
  tf.set_kv_tap([&](int layer, std::int64_t, const float* q, const float* k, const float* v) {
    cal.add(layer, {k, kvd}, {v, kvd}, {q, dim});
  });
  for (const auto& w : windows) {
    kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(c, static_cast<int>(w.size())));
    tf.prefill(cache, w);
  }
  kvtrim::EigenCalibration opt;
  opt.energy = energy;
  return std::make_shared<const kvtrim::EigenBasis>(cal.basis(opt));
}

// ---- output -------------------------------------------------------------------------------------------------
struct Row {
  Protocol protocol;
  std::string policy;
  int budget;
  bool fixed;
  Acc acc;
};

std::string fmt(const char* f, double x) {
  char b[64];
  std::snprintf(b, sizeof b, f, x);
  return b;
}

struct Metrics {
  double ppl, ratio, agree, kl, recall, bytes, pct, tps;
};
Metrics metrics(const Acc& a, const Acc& full) {
  Metrics m{};
  m.ppl = std::exp(a.nll / double(std::max(1LL, a.n)));
  m.ratio = m.ppl / std::exp(full.nll / double(std::max(1LL, full.n)));
  m.agree = double(a.agree) / double(std::max(1LL, a.n));
  m.kl = a.kl / double(std::max(1LL, a.n));
  m.recall = a.recall_n ? double(a.recall_hit) / double(a.recall_n) : 1.0;
  m.bytes = a.peak_bytes / double(std::max(1LL, a.windows));
  m.pct = 100.0 * a.peak_bytes / std::max(1.0, full.peak_bytes);
  m.tps = a.seconds > 0 ? double(a.tokens) / a.seconds : 0;
  return m;
}

void write_outputs(const Options& opt, const std::vector<Row>& rows, const llama2::Config& c, int n_windows,
                   int full_budget) {
  fs::create_directories(opt.out);
  auto full_of = [&](Protocol p) -> const Acc& {
    for (const Row& r : rows)
      if (r.protocol == p && r.policy == "Full") return r.acc;
    return rows.front().acc;
  };
  std::ofstream csv(opt.out + "/results.csv");
  csv << "protocol,policy,budget,kv_bytes,kv_pct_of_full,perplexity,ppl_ratio,top1_agreement,mean_kl,"
         "long_range_recall,recall_positions,evaluated_tokens,tokens_per_s,error\n";
  std::ofstream md(opt.out + "/table.md");
  for (Protocol p : opt.protocols) {
    const Acc& full = full_of(p);
    std::printf("\n%s protocol (%d windows of %d tokens%s; full-cache perplexity %.3f over %lld tokens, "
                "%lld long-range positions)\n",
                protocol_name(p), n_windows, full_budget,
                p == Protocol::kPrompt ? (", prompt " + std::to_string(opt.prompt)).c_str() : "",
                std::exp(full.nll / double(std::max(1LL, full.n))), full.n, full.recall_n);
    std::printf("%-18s %6s %10s %7s %9s %8s %7s %8s %7s %9s\n", "policy", "budget", "KV bytes", "% full", "ppl",
                "x full", "top-1", "KL", "recall", "tok/s");
    md << "\n**" << protocol_name(p) << "** (" << n_windows << " windows)\n\n"
       << "| policy | budget | KV bytes | % of full | perplexity | × full | top-1 agree | mean KL | long-range "
          "recall | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const Row& r : rows) {
      if (r.protocol != p) continue;
      const std::string budget = r.fixed ? std::to_string(full_budget) + "*" : std::to_string(r.budget);
      if (!r.acc.error.empty()) {
        std::printf("%-18s %6s  n/a: %s\n", r.policy.c_str(), budget.c_str(), r.acc.error.c_str());
        csv << protocol_name(p) << ',' << r.policy << ',' << r.budget << ",,,,,,,,,,,\"" << r.acc.error << "\"\n";
        md << "| " << r.policy << " | " << budget << " | n/a: " << r.acc.error << " ||||||||\n";
        continue;
      }
      const Metrics m = metrics(r.acc, full);
      std::printf("%-18s %6s %10.0f %6.1f%% %9.3f %8.3f %6.1f%% %8.4f %6.1f%% %9.0f\n", r.policy.c_str(),
                  budget.c_str(), m.bytes, m.pct, m.ppl, m.ratio, 100 * m.agree, m.kl, 100 * m.recall, m.tps);
      csv << protocol_name(p) << ',' << r.policy << ',' << (r.fixed ? full_budget : r.budget) << ','
          << fmt("%.0f", m.bytes) << ',' << fmt("%.2f", m.pct) << ',' << fmt("%.4f", m.ppl) << ','
          << fmt("%.4f", m.ratio) << ',' << fmt("%.4f", m.agree) << ',' << fmt("%.5f", m.kl) << ','
          << fmt("%.4f", m.recall) << ',' << r.acc.recall_n << ',' << r.acc.n << ',' << fmt("%.0f", m.tps) << ",\n";
      md << "| " << r.policy << " | " << budget << " | " << fmt("%.0f", m.bytes) << " | " << fmt("%.1f", m.pct)
         << "% | " << fmt("%.3f", m.ppl) << " | " << fmt("%.3f", m.ratio) << " | " << fmt("%.1f", 100 * m.agree)
         << "% | " << fmt("%.4f", m.kl) << " | " << fmt("%.1f", 100 * m.recall) << "% | " << fmt("%.0f", m.tps)
         << " |\n";
    }
  }
  std::printf("\n* = runs once with a budget that holds the whole window (never evicts).\n");
  std::printf("model: %d layers, %d query heads over %d KV heads, head dim %d, vocab %d\n", c.n_layers, c.n_heads,
              c.n_kv_heads, c.head_size(), c.vocab_size);
  md << "\n\\* runs once with a budget that holds the whole window (never evicts).\n";
  csv.close();
  md.close();

  if (!opt.plots) return;
  if (std::system("gnuplot --version > /dev/null 2>&1") != 0) {
    std::printf("gnuplot not found: no PNG plots (install gnuplot-nox; ./test.sh does)\n");
    return;
  }
  // Data: one block per (protocol, policy), rows sorted by memory: pct ratio recall agreement.
  std::vector<std::string> names;
  for (const Row& r : rows)
    if (std::find(names.begin(), names.end(), r.policy) == names.end()) names.push_back(r.policy);
  std::ofstream dat(opt.out + "/plot.dat");
  std::vector<std::vector<std::pair<int, std::string>>> blocks(opt.protocols.size());  // (block index, name)
  int block = 0;
  for (std::size_t pi = 0; pi < opt.protocols.size(); ++pi) {
    const Protocol p = opt.protocols[pi];
    for (const std::string& name : names) {
      std::vector<Metrics> pts;
      for (const Row& r : rows)
        if (r.protocol == p && r.policy == name && r.acc.error.empty()) pts.push_back(metrics(r.acc, full_of(p)));
      if (pts.empty()) continue;
      std::sort(pts.begin(), pts.end(), [](const Metrics& a, const Metrics& b) { return a.pct < b.pct; });
      dat << "# " << protocol_name(p) << ' ' << name << '\n';
      for (const Metrics& m : pts)
        dat << fmt("%.3f", m.pct) << ' ' << fmt("%.5f", m.ratio) << ' ' << fmt("%.5f", 100 * m.recall) << ' '
            << fmt("%.5f", 100 * m.agree) << ' ' << fmt("%.6f", m.kl) << '\n';
      dat << "\n\n";
      blocks[pi].push_back({block++, name});
    }
  }
  dat.close();
  struct Plot {
    const char* file;
    int column;
    const char* ylabel;
    const char* yrange;
  };
  // Zoomed on the useful range; points outside it are clipped at the border (the table has every value).
  const Plot plots[] = {{"ppl_ratio.png", 2, "perplexity / full-cache perplexity (clipped at 1.6)", "[0.99:1.6]"},
                        {"recall.png", 3, "long-range recall, % (clipped at 60)", "[60:100.5]"},
                        {"top1.png", 4, "top-1 agreement with the full cache, % (clipped at 60)", "[60:100.5]"}};
  const char* colors[] = {"#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                          "#7f7f7f", "#bcbd22", "#17becf", "#000080", "#b8860b", "#ff1493", "#00ced1", "#556b2f"};
  auto color_of = [&](const std::string& name) {
    const auto at = std::find(names.begin(), names.end(), name) - names.begin();
    return colors[static_cast<std::size_t>(at) % (sizeof colors / sizeof colors[0])];
  };
  auto style_of = [&](const std::string& name) {
    return static_cast<int>(std::find(names.begin(), names.end(), name) - names.begin());
  };
  std::ofstream gp(opt.out + "/plots.gp");
  gp << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 1600,650 font ',11' } "
        "else { set terminal png size 1600,650 }\n"
     << "set grid\nset xlabel 'KV memory in use (% of the full cache)'\nset xrange [0:102]\n";
  const double panel = 0.82 / static_cast<double>(opt.protocols.size());
  for (const Plot& pl : plots) {
    gp << "set output '" << opt.out << '/' << pl.file << "'\n"
       << "set ylabel '" << pl.ylabel << "'\nset yrange " << pl.yrange << "\n"
       << "set multiplot title '" << c.n_layers << "-layer llama2.c model (" << c.dim << " dim), " << n_windows
       << " windows of " << full_budget << " tokens; one point per budget'\n";
    for (std::size_t pi = 0; pi < opt.protocols.size(); ++pi) {
      gp << "set origin " << panel * static_cast<double>(pi) << ",0\nset size " << panel << ",0.95\n"
         << (pi + 1 == opt.protocols.size() ? "set key at screen 0.995,0.9 right top Left reverse\n" : "unset key\n")
         << "set title '" << protocol_name(opt.protocols[pi]) << " protocol'\nplot ";
      for (std::size_t b = 0; b < blocks[pi].size(); ++b) {
        const std::string& name = blocks[pi][b].second;
        gp << (b ? ", " : "") << "'" << opt.out << "/plot.dat' index " << blocks[pi][b].first << " using 1:"
           << pl.column << " with linespoints lw 2 lc rgb '" << color_of(name) << "' dt " << style_of(name) % 4 + 1
           << " pt " << style_of(name) % 13 + 1 << " ps 1.4 title '" << name << "'";
      }
      gp << "\n";
    }
    gp << "unset multiplot\n";
  }
  gp.close();
  if (std::system(("gnuplot '" + opt.out + "/plots.gp'").c_str()) != 0)
    std::printf("gnuplot failed on %s/plots.gp: no PNG plots\n", opt.out.c_str());
  else
    std::printf("plots: %s/ppl_ratio.png %s/recall.png %s/top1.png\n", opt.out.c_str(), opt.out.c_str(),
                opt.out.c_str());
}

// ---- command line -------------------------------------------------------------------------------------------
void usage() {
  std::puts(
      "compare_policies [options]   compares kvtrim policies on a llama2.c model\n"
      "  --models DIR          folder with stories260K.bin, tok512.bin, tinystories_valid_head.txt\n"
      "                        (default: $KVTRIM_MODELS, else ../shared/models)\n"
      "  --model FILE          llama2.c checkpoint (default DIR/stories260K.bin; any llama2.c model works)\n"
      "  --tokenizer FILE      its tokenizer (default DIR/tok512.bin; tokenizer.bin for stories15M/42M/110M)\n"
      "  --text FILE           evaluation text (default DIR/tinystories_valid_head.txt)\n"
      "  --bytes N             bytes of text to evaluate (default 100000)\n"
      "  --calib-bytes N       bytes after those for Eigen Attention's calibration (default 20000)\n"
      "  --eigen-energy E      Eigen Attention's spectrum energy kept, in (0, 1] (default 0.9)\n"
      "  --window N            tokens per window, BOS included (default 512, at most the model's seq_len)\n"
      "  --prompt N            prompt tokens in the prompt protocol (default 256)\n"
      "  --budgets a,b,...     tokens kept per KV head (default 32,64,128,256)\n"
      "  --protocols p,...     stream and/or prompt (default both)\n"
      "  --policies a,b,...    only these policies (names as in --list; FullCache always runs)\n"
      "  --recall-distance N   long-range recall distance (default 64)\n"
      "  --threads N           worker threads (default: all cores)\n"
      "  --out DIR             CSV, table.md and PNG plots (default out/compare)\n"
      "  --no-plots            skip gnuplot\n"
      "  --quick               a few seconds: 2000 bytes, windows of 128, prompt 64, budgets 16,32\n"
      "  --list                list the registered policies");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  bool bytes_set = false, calib_set = false, window_set = false, prompt_set = false, budgets_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw kvtrim::Error("option " + a + " needs a value (see --help)");
      return argv[++i];
    };
    auto number = [&](long long lo, long long hi) {
      const std::string v = value();
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || x < lo || x > hi)
        throw kvtrim::Error("option " + a + " = '" + v + "': expected an integer in " + std::to_string(lo) + ".." +
                            std::to_string(hi));
      return x;
    };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--models") o.models = value();
    else if (a == "--model") o.model = value();
    else if (a == "--tokenizer") o.tokenizer = value();
    else if (a == "--text") o.text = value();
    else if (a == "--bytes") o.bytes = static_cast<std::size_t>(number(1, 1LL << 40)), bytes_set = true;
    else if (a == "--calib-bytes") o.calib_bytes = static_cast<std::size_t>(number(0, 1LL << 40)), calib_set = true;
    else if (a == "--window") o.window = static_cast<int>(number(4, 1 << 22)), window_set = true;
    else if (a == "--prompt") o.prompt = static_cast<int>(number(1, 1 << 22)), prompt_set = true;
    else if (a == "--recall-distance") o.recall_distance = static_cast<int>(number(1, 1 << 22));
    else if (a == "--threads") o.threads = static_cast<int>(number(1, 1024));
    else if (a == "--out") o.out = value();
    else if (a == "--eigen-energy") {
      const std::string v = value();
      o.eigen_energy = std::atof(v.c_str());
      if (!(o.eigen_energy > 0 && o.eigen_energy <= 1))
        throw kvtrim::Error("option --eigen-energy = '" + v + "': expected a number in (0, 1]");
    }
    else if (a == "--no-plots") o.plots = false;
    else if (a == "--quick") o.quick = true;
    else if (a == "--list") o.list = true;
    else if (a == "--policies") o.only = split(value());
    else if (a == "--budgets") {
      o.budgets.clear();
      for (const std::string& b : split(value())) {
        char* end = nullptr;
        const long x = std::strtol(b.c_str(), &end, 10);
        if (*end != '\0' || x < 1 || x > (1 << 22))
          throw kvtrim::Error("option --budgets: '" + b + "' is not a positive integer");
        o.budgets.push_back(static_cast<int>(x));
      }
      budgets_set = true;
    } else if (a == "--protocols") {
      o.protocols.clear();
      for (const std::string& p : split(value())) {
        if (p == "stream") o.protocols.push_back(Protocol::kStream);
        else if (p == "prompt") o.protocols.push_back(Protocol::kPrompt);
        else throw kvtrim::Error("option --protocols: '" + p + "'; expected stream and/or prompt");
      }
    } else {
      throw kvtrim::Error("unknown option '" + a + "' (see --help)");
    }
  }
  if (o.quick) {
    if (!bytes_set) o.bytes = 2000;
    if (!calib_set) o.calib_bytes = 2000;
    if (!window_set) o.window = 128;
    if (!prompt_set) o.prompt = 64;
    if (!budgets_set) o.budgets = {16, 32};
  }
  if (o.models.empty()) {
    const char* env = std::getenv("KVTRIM_MODELS");
    o.models = env ? env : KVTRIM_EXAMPLES_MODELS_DIR;
  }
  if (o.model.empty()) o.model = o.models + "/stories260K.bin";
  if (o.tokenizer.empty()) o.tokenizer = o.models + "/tok512.bin";
  if (o.text.empty()) o.text = o.models + "/tinystories_valid_head.txt";
  if (o.threads == 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (o.protocols.empty()) throw kvtrim::Error("option --protocols: give stream and/or prompt");
  return o;
}

int missing_files(const Options& o) {
  std::vector<std::string> missing;
  for (const std::string& f : {o.model, o.tokenizer, o.text})
    if (!fs::exists(f)) missing.push_back(f);
  if (missing.empty()) return 0;
  std::fprintf(stderr, "compare_policies: missing input file(s):\n");
  for (const auto& f : missing) std::fprintf(stderr, "  %s\n", f.c_str());
  std::fprintf(stderr,
               "\nIt needs a llama2.c checkpoint, its tokenizer and some text. Get them from:\n"
               "  stories260K.bin + tok512.bin: huggingface.co/karpathy/tinyllamas (folder stories260K)\n"
               "  stories15M.bin / stories42M.bin / stories110M.bin: huggingface.co/karpathy/tinyllamas, with\n"
               "    tokenizer.bin from github.com/karpathy/llama2.c\n"
               "  text: any UTF-8 text, e.g. the TinyStories validation split (huggingface.co/datasets/"
               "roneneldan/TinyStories)\n"
               "Then point at them: ./compare.sh --models DIR   (or --model FILE --tokenizer FILE --text FILE,\n"
               "or set KVTRIM_MODELS=DIR).\n");
  return 2;  // the quick ctest treats 2 as skipped
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse(argc, argv);
    llama2::RegistryInputs shared;
    if (opt.list) {
      std::puts("Full (FullCache, the reference; always runs)");
      for (const Entry& e : entries_of(shared))
        std::printf("%s%s%s\n", e.name.c_str(), e.flags.fixed_budget ? " (never evicts: one run at the window size)" : "",
                    e.flags.calibrated ? " (calibrated on text after the evaluated bytes)" : "");
      return 0;
    }
    if (int rc = missing_files(opt)) return rc;
    const auto ck = llama2::Checkpoint::load(opt.model);
    const auto& c = ck.config();
    const auto tok = llama2::Tokenizer::load(opt.tokenizer, c.vocab_size);
    if (opt.window > c.seq_len)
      throw kvtrim::Error("--window " + std::to_string(opt.window) + " exceeds the model's context of " +
                          std::to_string(c.seq_len) + " tokens");
    if (opt.prompt + 2 > opt.window)
      throw kvtrim::Error("--prompt " + std::to_string(opt.prompt) + " must leave at least 2 tokens of the window (" +
                          std::to_string(opt.window) + ") to decode");

    const auto t_start = Clock::now();
    const auto windows = make_windows(tok.encode(read_text(opt.text, 0, opt.bytes), false, false), opt.window);
    if (windows.empty())
      throw kvtrim::Error("the first " + std::to_string(opt.bytes) + " bytes of " + opt.text +
                          " give fewer tokens than one window of " + std::to_string(opt.window) + " (raise --bytes)");
    auto calib = make_windows(tok.encode(read_text(opt.text, opt.bytes, opt.calib_bytes), false, false), opt.window);

    // Which entries run: FullCache first (the reference), then the registry (filtered).
    std::vector<Entry> entries;
    std::vector<std::string> wanted = opt.only;
    auto selected = [&](const std::string& name) {
      if (wanted.empty()) return true;
      for (const auto& w : wanted)
        if (w == name) return true;
      return false;
    };
    bool need_eigen = false;
    for (const Entry& e : entries_of(shared))
      if (selected(e.name) && e.flags.calibrated) need_eigen = true;
    if (need_eigen) {
      if (calib.empty()) {
        std::fprintf(stderr, "compare_policies: no text after the evaluated bytes for Eigen Attention's calibration "
                             "(--calib-bytes); Eigen Attention is skipped\n");
      } else {
        shared.eigen = calibrate_eigen(ck, calib, opt.eigen_energy);
        std::printf("Eigen Attention basis (energy %.2f): calibrated on %zu windows (%zu tokens) after the evaluated "
                    "text; key/value ranks per layer (of %d):",
                    opt.eigen_energy, calib.size(), calib.size() * calib.front().size(), c.head_size());
        for (int l = 0; l < c.n_layers; ++l)
          std::printf(" %d/%d", shared.eigen->key_rank(l, 0), shared.eigen->value_rank(l, 0));
        std::printf("\n");
      }
    }
    for (Entry& e : entries_of(shared)) {
      if (!selected(e.name)) continue;
      if (e.flags.calibrated && !shared.eigen) continue;
      entries.push_back(std::move(e));
    }
    for (const auto& w : wanted) {
      bool found = false;
      for (const Entry& e : entries_of(shared)) found |= e.name == w;
      if (!found) throw kvtrim::Error("--policies: no policy named '" + w + "' (see --list)");
    }

    // Jobs per window: for each protocol the reference, then every (entry, budget).
    struct Job {
      int entry;  // -1: the reference
      int budget;
      Protocol protocol;
    };
    std::vector<Job> jobs;
    for (Protocol p : opt.protocols) {
      jobs.push_back({-1, opt.window, p});
      for (std::size_t e = 0; e < entries.size(); ++e) {
        if (entries[e].flags.fixed_budget) {
          jobs.push_back({static_cast<int>(e), opt.window, p});
          continue;
        }
        for (int b : opt.budgets) jobs.push_back({static_cast<int>(e), b, p});
      }
    }
    const std::size_t W = windows.size();
    std::printf("compare_policies: %s, %zu windows of %d tokens (%zu bytes of %s), %zu policies x %zu budgets x %zu "
                "protocols, %d threads\n",
                opt.model.c_str(), W, opt.window, opt.bytes, opt.text.c_str(), entries.size() + 1, opt.budgets.size(),
                opt.protocols.size(), opt.threads);
    std::fflush(stdout);

    // Per (window, job) results, reduced in window order at the end (deterministic whatever the threads).
    std::vector<std::vector<Acc>> results(W, std::vector<Acc>(jobs.size()));
    std::atomic<std::size_t> next_window{0}, done{0};
    std::mutex err_mutex;
    std::string fatal;
    auto worker = [&]() {
      Runner runner(ck, opt);
      Reference ref[2];
      for (std::size_t w; (w = next_window++) < W;) {
        runner.set_window(windows[w]);
        for (std::size_t j = 0; j < jobs.size(); ++j) {
          const Job& job = jobs[j];
          Acc& acc = results[w][j];
          Reference& r = ref[static_cast<int>(job.protocol)];
          try {
            if (job.entry < 0) runner.reference(job.protocol, r, acc);
            else entries[static_cast<std::size_t>(job.entry)].run(runner, job.budget, job.protocol, r, acc);
          } catch (const kvtrim::Error& e) {
            acc = Acc{};
            acc.error = e.what();
          } catch (const std::exception& e) {
            std::lock_guard<std::mutex> lock(err_mutex);
            fatal = e.what();
          }
          ++done;
        }
      }
    };
    std::vector<std::thread> pool;
    for (int t = 0; t < opt.threads; ++t) pool.emplace_back(worker);
    const bool tty = isatty(fileno(stderr)) != 0;
    const std::size_t total = W * jobs.size();
    int last_decile = -1;
    for (;;) {
      const std::size_t d = done.load();
      const double el = std::chrono::duration<double>(Clock::now() - t_start).count();
      const double frac = double(d) / double(total);
      const double eta = frac > 0 ? el * (1 - frac) / frac : 0;
      if (tty) {
        std::fprintf(stderr, "\r  running: %5.1f%% of %zu runs, window %zu/%zu, %3.0fs elapsed, ~%3.0fs left   ",
                     100 * frac, total, std::min(W, next_window.load()), W, el, eta);
      } else if (static_cast<int>(10 * frac) > last_decile) {
        last_decile = static_cast<int>(10 * frac);
        std::fprintf(stderr, "  running: %3.0f%% of %zu runs, %.0fs elapsed\n", 100 * frac, total, el);
      }
      if (d >= total) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(tty ? 250 : 500));
    }
    for (auto& t : pool) t.join();
    if (tty) std::fprintf(stderr, "\n");
    if (!fatal.empty()) throw std::runtime_error(fatal);

    std::vector<Row> rows;
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      Row r{jobs[j].protocol, jobs[j].entry < 0 ? "Full" : entries[static_cast<std::size_t>(jobs[j].entry)].name,
            jobs[j].budget, jobs[j].entry < 0 || entries[static_cast<std::size_t>(jobs[j].entry)].flags.fixed_budget, {}};
      for (std::size_t w = 0; w < W; ++w) r.acc.add(results[w][j]);
      if (!r.acc.error.empty()) {
        Acc failed;
        failed.error = r.acc.error;
        r.acc = failed;
      }
      rows.push_back(std::move(r));
    }
    write_outputs(opt, rows, c, static_cast<int>(W), opt.window);
    std::printf("results: %s/results.csv, %s/table.md (%.0f s)\n", opt.out.c_str(), opt.out.c_str(),
                std::chrono::duration<double>(Clock::now() - t_start).count());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_policies: %s\n", e.what());
    return 1;
  }
}
