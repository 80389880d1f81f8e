// compare_policies: how kvtrim's policies trade KV memory for quality on a real llama2.c model, with
// intervals, per-window results and the metadata needed to trust and reproduce a run.
//
// Text (TinyStories validation, the first --bytes bytes) is tokenised and cut into windows of BOS + up to
// --window - 1 tokens (the last, shorter window included unless --drop-last), fed teacher-forced through the
// engine in examples/llama2 with each configuration's cache, in two protocols:
//   stream  every token decoded one by one from BOS, so eviction happens while decoding; every text token is
//           predicted once and scored.
//   prompt  the first --prompt tokens prefilled in one pass and compressed by the policy, the rest decoded;
//           scored over the tokens predicted by decode steps (windows shorter than --prompt + 2 are skipped).
// Configurations (examples/common/configurations.hpp) are registry policies with settings and a way of
// sharing the budget: uniform (every (layer, KV head) the same), or one total shared by all heads through a
// BudgetPlan calibrated on separate text (kvtrim/budget_plan.hpp), or per window with hindsight (oracle).
// For every (configuration, budget, protocol): perplexity and its ratio to the full cache, top-1 agreement
// with the full cache, mean KL(full || policy), long-range recall, KV memory (peak bytes in use), tokens/s,
// with bootstrap 95% intervals over windows and paired differences against StreamingLLM.
// Long-range recall: among predicted positions whose target token occurred earlier in the window but not in
// the last --recall-distance - 1 tokens and which the full cache predicts correctly (top-1), the fraction the
// configuration still predicts correctly.
// Calibration text (Eigen Attention's basis, budget plans, the per-head analysis) is read from
// --calib-offset, disjoint from the evaluated bytes.
//
// Output in --out: results.csv (one row per configuration, budget and protocol, with intervals and run
// metadata), windows.csv (per window), heads.csv (per-head attention analysis), plans.csv and plans/*.kvb
// (the budget plans), table.md and PNG plots (gnuplot).
#include <kvtrim/budget_calibration.hpp>
#include <kvtrim/budget_plan.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "common/cli.hpp"
#include "common/configurations.hpp"
#include "common/head_analysis.hpp"
#include "common/sha256.hpp"
#include "llama2/model.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif
#ifndef KVTRIM_EXAMPLES_SOURCE_DIR
#define KVTRIM_EXAMPLES_SOURCE_DIR "."
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using examples::Configuration;
using examples::PlanKind;

// CPU time of the calling thread (tokens/s stays meaningful on a machine shared with other work).
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

enum class Protocol { kStream = 0, kPrompt = 1 };
const char* protocol_name(Protocol p) { return p == Protocol::kStream ? "stream" : "prompt"; }

// How budgets compare across policies (see usage()).
enum class Footing { kAttended, kBudget };

struct Options {
  std::string models, model, tokenizer, text, out, plans_from;
  std::size_t bytes = 100000, calib_offset = 200000, calib_bytes = 40000;
  int window = 512, prompt = 256, recall_distance = 64, threads = 0, bootstrap = 2000;
  std::uint64_t seed = 1;
  double eigen_energy = 0.9;
  std::vector<int> budgets{32, 64, 128, 256};
  std::vector<Protocol> protocols{Protocol::kStream, Protocol::kPrompt};
  std::vector<std::string> only, params, added;
  Footing footing = Footing::kAttended;
  bool quick = false, plots = true, list = false, drop_last = false;
  std::string command_line;
};

// ---- what one (configuration, budget, protocol) accumulates over one window ------------------------------
struct Acc {
  double nll = 0, kl = 0, peak_bytes = 0, seconds = 0;
  long long n = 0, agree = 0, recall_hit = 0, recall_n = 0, tokens = 0;
  std::string error;
};

// The full cache's predictions for one window and protocol: what every configuration is compared with.
struct Reference {
  int first = 0;                 // first evaluated position t (predicting token t+1)
  std::vector<float> logprob;    // [(L-1-first) x vocab] log-softmax of the full cache
  std::vector<int> argmax;       // top-1 of the full cache
  std::vector<char> long_range;  // target is a long-range repeat and the full cache gets it right
};

// Every layer's rotated Q, K, V of one window, as the cache receives them.
struct Capture {
  std::vector<std::vector<float>> Q, K, V;
  void reset(int layers) {
    Q.assign(static_cast<std::size_t>(layers), {});
    K.assign(static_cast<std::size_t>(layers), {});
    V.assign(static_cast<std::size_t>(layers), {});
  }
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

// One worker: its own engine state; runs any cache over the current window.
class Runner {
 public:
  Runner(const llama2::Checkpoint& ck, const Options& opt) : ck_(ck), tf_(ck), opt_(opt) {}

  void set_window(const std::vector<int>& tokens) { toks_ = &tokens; }
  int length() const { return static_cast<int>(toks_->size()); }
  // The prompt protocol needs a prompt and at least 2 tokens to decode.
  bool runs(Protocol pr) const { return pr == Protocol::kStream || length() >= opt_.prompt + 2; }
  int first_eval(Protocol pr) const { return pr == Protocol::kStream ? 0 : opt_.prompt; }

  // Feeds the window through `cache` under protocol `pr`; calls on_logits(t, logits) for each evaluated
  // position t. Returns the peak bytes in use after any call, and adds time and tokens to acc.
  template <class F>
  std::size_t drive(kvtrim::AnyCache& cache, Protocol pr, Acc& acc, F&& on_logits) {
    const std::vector<int>& tok = *toks_;
    const int L = length();
    const double t0 = thread_seconds();
    std::size_t peak = 0;
    int t = 0;
    if (pr == Protocol::kPrompt) {
      const int P0 = first_eval(pr);
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

  // The full cache's run: fills ref and the full cache's own metrics; captures Q, K, V when cap is given.
  void reference(Protocol pr, Reference& ref, Acc& acc, Capture* cap) {
    const std::vector<int>& tok = *toks_;
    const int L = length(), V = ck_.config().vocab_size;
    const auto& c = ck_.config();
    ref.first = first_eval(pr);
    const std::size_t n = static_cast<std::size_t>(L - 1 - ref.first);
    ref.logprob.assign(n * V, 0.0f);
    ref.argmax.assign(n, 0);
    ref.long_range.assign(n, 0);
    if (cap != nullptr) {
      cap->reset(c.n_layers);
      tf_.set_kv_tap([&](int layer, std::int64_t, const float* q, const float* k, const float* v) {
        const auto l = static_cast<std::size_t>(layer);
        cap->Q[l].insert(cap->Q[l].end(), q, q + c.dim);
        cap->K[l].insert(cap->K[l].end(), k, k + c.kv_dim());
        cap->V[l].insert(cap->V[l].end(), v, v + c.kv_dim());
      });
    }
    auto full = kvtrim::make_cache("full", llama2::cache_config(c, L));
    const std::size_t peak = drive(*full, pr, acc, [&](int t, const float* logits) {
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
    tf_.set_kv_tap(nullptr);
    acc.peak_bytes += static_cast<double>(peak);
  }

  void evaluate(kvtrim::AnyCache& cache, Protocol pr, const Reference& ref, Acc& acc) {
    const std::vector<int>& tok = *toks_;
    const int V = ck_.config().vocab_size;
    const std::size_t peak = drive(cache, pr, acc, [&](int t, const float* logits) {
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
  }

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

// ---- text and windows ---------------------------------------------------------------------------------------
std::string read_text(const std::string& path, std::size_t offset, std::size_t bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw cli::MissingInput("cannot open the text " + path);
  f.seekg(static_cast<std::streamoff>(offset));
  std::string s(bytes, '\0');
  f.read(s.data(), static_cast<std::streamsize>(bytes));
  s.resize(static_cast<std::size_t>(std::max<std::streamsize>(0, f.gcount())));
  // Never cut a UTF-8 character in half at either end.
  while (!s.empty() && (static_cast<unsigned char>(s.front()) & 0xC0) == 0x80) s.erase(s.begin());
  std::size_t cut = s.size();
  while (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0xC0) == 0x80) --cut;
  if (cut > 0 && (static_cast<unsigned char>(s[cut - 1]) & 0x80)) s.resize(cut - 1);
  return s;
}

// Windows of BOS + (window - 1) tokens; the remainder (BOS + at least one token) is a last, shorter window
// unless drop_last.
std::vector<std::vector<int>> make_windows(const std::vector<int>& ids, int window, bool drop_last) {
  std::vector<std::vector<int>> out;
  const std::size_t w = static_cast<std::size_t>(window - 1);
  for (std::size_t i = 0; i < ids.size(); i += w) {
    const std::size_t end = std::min(ids.size(), i + w);
    if (end - i < w && drop_last) break;
    std::vector<int> win{llama2::Tokenizer::kBos};
    win.insert(win.end(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids.begin() + static_cast<std::ptrdiff_t>(end));
    out.push_back(std::move(win));
  }
  return out;
}

// A calibrator measuring output errors after the layer's W_o (budget_calibration.hpp).
kvtrim::BudgetCalibrator make_calibrator(const llama2::Checkpoint& ck, int max_budget) {
  const auto& c = ck.config();
  kvtrim::BudgetCalibrator cal(llama2::cache_config(c, 1), {.max_budget = max_budget, .sinks = 4});
  for (int l = 0; l < c.n_layers; ++l)
    cal.set_output_projection(l, {ck.wo(l), static_cast<std::size_t>(c.dim) * c.dim}, c.dim);
  return cal;
}

// ---- results ------------------------------------------------------------------------------------------------
struct Job {
  int config;  // -1: the full-cache reference
  int budget;  // nominal tokens per head
  Protocol protocol;
  kvtrim::CacheConfig cfg;  // what the cache is built with (per-head budgets included; oracle: per window)
  int shift = 0;            // budget added for equal footing
  int min_budget = 1;       // the policy's smallest budget (oracle plans)
};

struct Metrics {
  double ppl = 0, ratio = 0, agree = 0, kl = 0, recall = 0, bytes = 0, pct = 0, tps = 0;
  long long n = 0, recall_n = 0, windows = 0;
};

struct Interval {
  double lo = std::nan(""), hi = std::nan("");
};

struct Row {
  Protocol protocol;
  int job;
  std::string name, policy, params, plan;
  int budget = 0, attended = 0;
  long long total_budget = 0;
  bool fixed = false;
  Metrics m;
  Interval ratio, recall, agree, d_ratio, d_recall;
  double d_ratio_pt = std::nan(""), d_recall_pt = std::nan("");
  std::string error;
};

std::string fmt(const char* f, double x) {
  char b[64];
  std::snprintf(b, sizeof b, f, x);
  return b;
}

// Sums of one job over a multiset of windows (weights = how often each window is drawn).
struct Sums {
  double nll = 0, kl = 0, bytes = 0, seconds = 0;
  double n = 0, agree = 0, hit = 0, rn = 0, tokens = 0, windows = 0;
  void add(const Acc& a, double w) {
    if (a.n == 0) return;  // a window this protocol skips
    nll += w * a.nll, kl += w * a.kl, bytes += w * a.peak_bytes, seconds += w * a.seconds;
    n += w * double(a.n), agree += w * double(a.agree), hit += w * double(a.recall_hit), rn += w * double(a.recall_n);
    tokens += w * double(a.tokens), windows += w;
  }
};

Metrics metrics_of(const Sums& s, const Sums& full) {
  Metrics m;
  m.n = static_cast<long long>(s.n);
  m.recall_n = static_cast<long long>(s.rn);
  m.windows = static_cast<long long>(s.windows);
  m.ppl = std::exp(s.nll / std::max(1.0, s.n));
  m.ratio = m.ppl / std::exp(full.nll / std::max(1.0, full.n));
  m.agree = s.agree / std::max(1.0, s.n);
  m.kl = s.kl / std::max(1.0, s.n);
  m.recall = s.rn > 0 ? s.hit / s.rn : 1.0;
  m.bytes = s.bytes / std::max(1.0, s.windows);
  m.pct = 100.0 * s.bytes / std::max(1.0, full.bytes);
  m.tps = s.seconds > 0 ? s.tokens / s.seconds : 0;
  return m;
}

Interval percentile_interval(std::vector<double> v) {
  Interval iv;
  if (v.empty()) return iv;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const double x = q * double(v.size() - 1);
    const std::size_t i = static_cast<std::size_t>(x);
    const double f = x - double(i);
    return i + 1 < v.size() ? v[i] * (1 - f) + v[i + 1] * f : v[i];
  };
  iv.lo = at(0.025);
  iv.hi = at(0.975);
  return iv;
}

// ---- command line -------------------------------------------------------------------------------------------
std::string timing_lists(bool before) {
  std::string s;
  for (std::string_view n : kvtrim::policy_names())
    if (n != "full" && examples::evicts_before_attention(n) == before) s += (s.empty() ? "" : ", ") + std::string(n);
  return s;
}

cli::Parser make_parser() {
  return cli::Parser(
      "compare_policies",
      {{"--models", "DIR", "folder with stories260K.bin, tok512.bin, tinystories_valid_head.txt\n(default: $KVTRIM_MODELS, else ../shared/models beside the repository)"},
       {"--model", "FILE", "llama2.c checkpoint (default DIR/stories260K.bin; any llama2.c model works)"},
       {"--tokenizer", "FILE", "its tokenizer (default DIR/tok512.bin; tokenizer.bin for stories15M/42M/110M)"},
       {"--text", "FILE", "evaluation and calibration text (default DIR/tinystories_valid_head.txt)"},
       {"--bytes", "N", "bytes of text evaluated, from the start (default 100000)"},
       {"--drop-last", "", "drop the last, shorter window (default: every text token is scored)"},
       {"--calib-offset", "N", "where the calibration text starts, at or after --bytes (default 200000)"},
       {"--calib-bytes", "N", "bytes of calibration text: budget plans, Eigen basis, per-head analysis\n(default 40000; 0 = none: plans and Eigen are skipped)"},
       {"--eigen-energy", "E", "Eigen Attention's spectrum energy kept, in (0, 1] (default 0.9)"},
       {"--window", "N", "tokens per window, BOS included (default 512, at most the model's seq_len)"},
       {"--prompt", "N", "prompt tokens in the prompt protocol (default 256)"},
       {"--budgets", "a,b,...", "nominal tokens per KV head (default 32,64,128,256); a plan shares\nn_layers x n_kv_heads x budget tokens"},
       {"--protocols", "p,...", "stream and/or prompt (default both)"},
       {"--footing", "MODE", "attended (default) or budget; see below"},
       {"--policies", "a,b,...", "only these configurations (names as in --list, any case; the full cache\nalways runs)"},
       {"--param", "NAME.key=value", "set a parameter of every configuration of registry policy NAME (e.g.\nh2o.heavy_ratio=0.25), or else of configuration NAME (any case, e.g.\nH2O+global.heavy_ratio=0.25); repeatable; --list shows the parameters"},
       {"--add", "NAME=POLICY[@global|@per-layer][:k=v,...]", "add a configuration (repeatable), e.g.\n--add TOVA4=tova:sinks=4 --add H2O-plan=h2o@global"},
       {"--plans-from", "DIR", "load the budget plans from DIR/plans/*.kvb (a previous run's --out)\ninstead of calibrating them"},
       {"--recall-distance", "N", "long-range recall distance (default 64)"},
       {"--bootstrap", "N", "bootstrap resamples of the windows for the 95% intervals (default 2000; 0 = off)"},
       {"--seed", "N", "seed of the bootstrap (default 1)"},
       {"--threads", "N", "worker threads (default: all cores)"},
       {"--out", "DIR", "results folder, relative to the current directory (default out/compare;\n--quick: out/compare-quick)"},
       {"--no-plots", "", "skip gnuplot"},
       {"--quick", "", "a few seconds: 2000 bytes, windows of 128, prompt 64, budgets 16,32, 200 resamples"},
       {"--list", "", "list the configurations and the registered policies with their parameters"}});
}

void usage(const cli::Parser& p) {
  std::fputs(p.help("compare_policies [options]   compares kvtrim policies on a llama2.c model").c_str(), stdout);
  std::printf(
      "\nEqual footing (--footing). A policy that evicts after attention keeps B tokens per head and lets the new\n"
      "token attend to them plus itself (B + 1); one that evicts before attention drops a token first and attends\n"
      "to B. Every step attends to the tokens it holds at that moment, so attended tokens are also the least\n"
      "memory a step needs.\n"
      "  attended (default): every configuration attends to B + 1 tokens per KV head per step at budget B:\n"
      "    after attention (%s) keep B;\n"
      "    before attention (%s) keep B + 1 (their budget is raised by one; plans: every head's).\n"
      "  budget: every configuration keeps B; the first group attends to B + 1, the second to B.\n"
      "The 'attended' column of the results says which; KV bytes are always measured.\n",
      timing_lists(false).c_str(), timing_lists(true).c_str());
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 0; i < argc; ++i) o.command_line += (i ? " " : "") + std::string(argv[i]);
  cli::Parser p = make_parser();
  p.start(argc, argv);
  bool bytes_set = false, calib_set = false, window_set = false, prompt_set = false, budgets_set = false,
       boot_set = false;
  while (p.next()) {
    if (p.is("--help")) {
      usage(p);
      std::exit(0);
    } else if (p.is("--models")) o.models = p.value();
    else if (p.is("--model")) o.model = p.value();
    else if (p.is("--tokenizer")) o.tokenizer = p.value();
    else if (p.is("--text")) o.text = p.value();
    else if (p.is("--bytes")) o.bytes = static_cast<std::size_t>(p.integer(1, 1LL << 40)), bytes_set = true;
    else if (p.is("--drop-last")) o.drop_last = true;
    else if (p.is("--calib-offset")) o.calib_offset = static_cast<std::size_t>(p.integer(0, 1LL << 40));
    else if (p.is("--calib-bytes")) o.calib_bytes = static_cast<std::size_t>(p.integer(0, 1LL << 40)), calib_set = true;
    else if (p.is("--eigen-energy")) o.eigen_energy = p.number(1e-9, 1.0);
    else if (p.is("--window")) o.window = static_cast<int>(p.integer(4, 1 << 22)), window_set = true;
    else if (p.is("--prompt")) o.prompt = static_cast<int>(p.integer(1, 1 << 22)), prompt_set = true;
    else if (p.is("--recall-distance")) o.recall_distance = static_cast<int>(p.integer(1, 1 << 22));
    else if (p.is("--threads")) o.threads = static_cast<int>(p.integer(1, 1024));
    else if (p.is("--bootstrap")) o.bootstrap = static_cast<int>(p.integer(0, 1000000)), boot_set = true;
    else if (p.is("--seed")) o.seed = static_cast<std::uint64_t>(p.integer(0, 1LL << 62));
    else if (p.is("--out")) o.out = p.value();
    else if (p.is("--plans-from")) o.plans_from = p.value();
    else if (p.is("--no-plots")) o.plots = false;
    else if (p.is("--quick")) o.quick = true;
    else if (p.is("--list")) o.list = true;
    else if (p.is("--policies")) o.only = p.list();
    else if (p.is("--param")) o.params.push_back(p.value());
    else if (p.is("--add")) o.added.push_back(p.value());
    else if (p.is("--footing")) {
      const std::string v = p.value();
      if (v == "attended") o.footing = Footing::kAttended;
      else if (v == "budget") o.footing = Footing::kBudget;
      else throw cli::UsageError("--footing: '" + v + "' is not attended or budget");
    } else if (p.is("--budgets")) {
      o.budgets.clear();
      for (const std::string& b : p.list()) o.budgets.push_back(static_cast<int>(cli::Parser::parse_integer("--budgets", b, 1, 1 << 22)));
      budgets_set = true;
    } else if (p.is("--protocols")) {
      o.protocols.clear();
      for (const std::string& v : p.list()) {
        const Protocol pr = v == "stream" ? Protocol::kStream : Protocol::kPrompt;
        if (v != "stream" && v != "prompt") throw cli::UsageError("--protocols: '" + v + "' is not stream or prompt");
        if (std::find(o.protocols.begin(), o.protocols.end(), pr) == o.protocols.end()) o.protocols.push_back(pr);
      }
    }
  }
  if (o.quick) {
    if (!bytes_set) o.bytes = 2000;
    if (!calib_set) o.calib_bytes = 4000;
    if (!window_set) o.window = 128;
    if (!prompt_set) o.prompt = 64;
    if (!budgets_set) o.budgets = {16, 32};
    if (!boot_set) o.bootstrap = 200;
  }
  std::sort(o.budgets.begin(), o.budgets.end());
  o.budgets.erase(std::unique(o.budgets.begin(), o.budgets.end()), o.budgets.end());
  if (o.out.empty()) o.out = o.quick ? "out/compare-quick" : "out/compare";
  if (o.models.empty()) {
    const char* env = std::getenv("KVTRIM_MODELS");
    o.models = env ? env : KVTRIM_EXAMPLES_MODELS_DIR;
  }
  if (o.model.empty()) o.model = o.models + "/stories260K.bin";
  if (o.tokenizer.empty()) o.tokenizer = o.models + "/tok512.bin";
  if (o.text.empty()) o.text = o.models + "/tinystories_valid_head.txt";
  if (o.threads == 0) o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (o.calib_bytes > 0 && o.calib_offset < o.bytes)
    throw cli::UsageError("--calib-offset " + std::to_string(o.calib_offset) + " lies inside the evaluated text (the first " +
                          std::to_string(o.bytes) + " bytes); calibration must use other text");
  if (o.prompt + 2 > o.window)
    throw cli::UsageError("--prompt " + std::to_string(o.prompt) + " must leave at least 2 tokens of the window (" +
                          std::to_string(o.window) + ") to decode");
  return o;
}

// The configurations this run uses: defaults + --add, --param applied, --policies selected.
std::vector<Configuration> configurations(const Options& o) {
  std::vector<Configuration> list = examples::default_configurations();
  for (const std::string& a : o.added) {
    Configuration c = examples::parse_added(a);
    if (examples::find_configuration(list, c.name))
      throw cli::UsageError("--add: a configuration named '" + c.name + "' exists already");
    list.push_back(std::move(c));
  }
  for (const std::string& p : o.params) examples::apply_param(list, p);
  if (o.only.empty()) return list;
  std::vector<Configuration> chosen;
  for (const std::string& n : o.only) {
    const Configuration* c = examples::find_configuration(list, n);
    if (c == nullptr)
      throw cli::UsageError("--policies: no configuration named '" + n + "'; the configurations are " +
                            examples::configuration_list(list));
    if (!examples::find_configuration(chosen, c->name)) chosen.push_back(*c);
  }
  return chosen;
}

void list_configurations(const Options& o) {
  std::puts("Configurations (name: registry policy, settings over its defaults, budget sharing):");
  std::puts("  Full: full (the reference; always runs)");
  for (const Configuration& c : configurations(o))
    std::printf("  %s: %s%s%s, %s%s\n", c.name.c_str(), c.policy.c_str(), c.settings.empty() ? "" : " ",
                c.settings.c_str(), std::string(examples::plan_name(c.plan)).c_str(),
                c.fixed ? " (never evicts: one run at the window size)" : "");
  std::puts("\nRegistered policies and their parameters (defaults; set with --param NAME.key=value):");
  kvtrim::for_each_policy([](const auto& entry) {
    const std::string params = kvtrim::describe_params(entry.params());
    std::printf("  %s: %s%s\n", std::string(entry.name()).c_str(), params.empty() ? "(none)" : params.c_str(),
                entry.kNeedsBasis ? " basis=(calibrated)" : "");
  });
}

// ---- metadata -----------------------------------------------------------------------------------------------
std::string run_command(const std::string& cmd) {
  std::string out;
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, f)) out += buf;
    pclose(f);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char b[32];
  std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return b;
}

}  // namespace

// ---- the run ------------------------------------------------------------------------------------------------
namespace {

struct Run {
  Options opt;
  std::vector<Configuration> configs;
  std::vector<std::vector<int>> windows;
  std::vector<Job> jobs;
  std::vector<std::vector<Acc>> results;  // [window][job]
  std::vector<std::string> metadata;      // "key: value" lines
  std::map<std::pair<int, int>, kvtrim::BudgetPlan> plans;  // (config, budget) -> plan as calibrated (no shift)
  std::unique_ptr<examples::HeadAnalysis> heads;
  std::shared_ptr<const kvtrim::EigenBasis> basis;
  std::vector<examples::PoolBound> pools;
  long long text_tokens = 0;
};

std::string plan_file(const std::string& dir, const Configuration& c, int budget) {
  return dir + "/plans/" + c.name + "-" + std::to_string(budget) + ".kvb";
}

void write_csv_header(std::ofstream& f, const Run& run) {
  for (const std::string& m : run.metadata) f << "# " << m << '\n';
}

std::vector<Row> summarise(const Run& run, const llama2::Config& c) {
  const Options& opt = run.opt;
  const std::size_t W = run.windows.size();
  // The bootstrap draws: counts[r][w] = how often window w is in resample r (the same draws for every job, so
  // differences between jobs are paired).
  std::vector<std::vector<double>> counts(static_cast<std::size_t>(opt.bootstrap), std::vector<double>(W, 0.0));
  std::mt19937_64 rng(opt.seed);
  std::uniform_int_distribution<std::size_t> pick(0, W - 1);
  for (auto& draw : counts)
    for (std::size_t i = 0; i < W; ++i) draw[pick(rng)] += 1;
  auto sums = [&](int job, const std::vector<double>* weights) {
    Sums s;
    for (std::size_t w = 0; w < W; ++w) s.add(run.results[w][static_cast<std::size_t>(job)], weights ? (*weights)[w] : 1.0);
    return s;
  };
  auto reference_of = [&](Protocol p) {
    for (std::size_t j = 0; j < run.jobs.size(); ++j)
      if (run.jobs[j].config < 0 && run.jobs[j].protocol == p) return static_cast<int>(j);
    return -1;
  };
  // StreamingLLM at the same nominal budget and protocol: what every row is compared with.
  auto baseline_of = [&](const Job& job) {
    for (std::size_t j = 0; j < run.jobs.size(); ++j) {
      const Job& b = run.jobs[j];
      if (b.config >= 0 && b.protocol == job.protocol && b.budget == job.budget &&
          run.configs[static_cast<std::size_t>(b.config)].name == "StreamingLLM")
        return static_cast<int>(j);
    }
    return -1;
  };
  std::vector<Row> rows;
  for (std::size_t j = 0; j < run.jobs.size(); ++j) {
    const Job& job = run.jobs[j];
    Row r;
    r.protocol = job.protocol;
    r.job = static_cast<int>(j);
    if (job.config < 0) {
      r.name = "Full", r.policy = "full", r.plan = "uniform", r.fixed = true;
      r.budget = r.attended = opt.window;
      r.total_budget = static_cast<long long>(c.n_layers) * c.n_kv_heads * opt.window;
    } else {
      const Configuration& cf = run.configs[static_cast<std::size_t>(job.config)];
      r.name = cf.name, r.policy = cf.policy, r.plan = std::string(examples::plan_name(cf.plan)), r.fixed = cf.fixed;
      r.budget = job.budget;
      const bool before = examples::evicts_before_attention(cf.policy);
      r.attended = cf.fixed ? opt.window : job.budget + job.shift + (before ? 0 : 1);
      r.total_budget = static_cast<long long>(c.n_layers) * c.n_kv_heads * job.cfg.budget;  // uniform, oracle
      if (!job.cfg.head_budgets.empty())
        r.total_budget = kvtrim::BudgetPlan(c.n_layers, c.n_kv_heads, job.cfg.head_budgets).total();
      try {
        r.params = examples::build_cache(cf, job.budget, job.cfg, run.basis)->params();
      } catch (const std::exception&) {
        r.params = cf.settings;  // an oracle plan's cache is built per window
      }
    }
    for (std::size_t w = 0; w < W && r.error.empty(); ++w) r.error = run.results[w][j].error;
    if (!r.error.empty()) {
      rows.push_back(r);
      continue;
    }
    const int ref = reference_of(job.protocol), base = baseline_of(job);
    const Sums full = sums(ref, nullptr), own = sums(static_cast<int>(j), nullptr);
    r.m = metrics_of(own, full);
    bool base_ok = base >= 0;
    for (std::size_t w = 0; base_ok && w < W; ++w) base_ok = run.results[w][static_cast<std::size_t>(base)].error.empty();
    Metrics bm;
    if (base_ok) {
      bm = metrics_of(sums(base, nullptr), full);
      r.d_ratio_pt = r.m.ratio - bm.ratio;
      r.d_recall_pt = r.m.recall - bm.recall;
    }
    if (opt.bootstrap > 0 && W > 1) {
      std::vector<double> ratio, recall, agree, dr, drec;
      for (const auto& draw : counts) {
        const Sums f = sums(ref, &draw), s = sums(static_cast<int>(j), &draw);
        if (s.n == 0) continue;
        const Metrics m = metrics_of(s, f);
        ratio.push_back(m.ratio), recall.push_back(m.recall), agree.push_back(m.agree);
        if (base_ok) {
          const Metrics b = metrics_of(sums(base, &draw), f);
          dr.push_back(m.ratio - b.ratio), drec.push_back(m.recall - b.recall);
        }
      }
      r.ratio = percentile_interval(ratio), r.recall = percentile_interval(recall), r.agree = percentile_interval(agree);
      if (base_ok) r.d_ratio = percentile_interval(dr), r.d_recall = percentile_interval(drec);
    }
    rows.push_back(r);
  }
  return rows;
}

bool beats_baseline(const Row& r) {
  return r.error.empty() && std::isfinite(r.d_ratio.hi) && r.d_ratio.hi < 0 && r.d_recall.lo > 0;
}

std::string ci(const Interval& iv, const char* f, double scale = 1.0) {
  if (!std::isfinite(iv.lo)) return "";
  return "[" + fmt(f, scale * iv.lo) + ", " + fmt(f, scale * iv.hi) + "]";
}

void write_tables(const Run& run, const std::vector<Row>& rows, const llama2::Config& c) {
  const Options& opt = run.opt;
  std::ofstream csv(opt.out + "/results.csv");
  write_csv_header(csv, run);
  csv << "protocol,configuration,policy,plan,budget,attended_per_step,total_budget,kv_bytes,kv_pct_of_full,perplexity,"
         "ppl_ratio,ppl_ratio_lo,ppl_ratio_hi,top1_agreement,top1_lo,top1_hi,mean_kl,long_range_recall,recall_lo,"
         "recall_hi,recall_positions,evaluated_tokens,windows,d_ratio_vs_streaming,d_ratio_lo,d_ratio_hi,"
         "d_recall_vs_streaming,d_recall_lo,d_recall_hi,tokens_per_s,params,error\n";
  auto num = [](double x, const char* f) { return std::isfinite(x) ? fmt(f, x) : std::string(); };
  std::ofstream md(opt.out + "/table.md");
  for (Protocol p : opt.protocols) {
    const Row* full = nullptr;
    for (const Row& r : rows)
      if (r.protocol == p && r.name == "Full") full = &r;
    std::printf("\n%s protocol (%lld windows; full-cache perplexity %.3f over %lld tokens, %lld long-range positions)\n",
                protocol_name(p), full ? full->m.windows : 0, full ? full->m.ppl : 0.0, full ? full->m.n : 0,
                full ? full->m.recall_n : 0);
    std::printf("%-22s %6s %4s %9s %6s %7s %-17s %6s %7s %-15s %-17s %7s\n", "configuration", "budget", "att", "KV bytes",
                "% full", "x full", "[95% CI]", "top-1", "recall", "[95% CI]", "d(x full) vs SLLM", "tok/s");
    md << "\n**" << protocol_name(p) << "** (" << (full ? full->m.windows : 0) << " windows, "
       << (full ? full->m.n : 0) << " scored tokens)\n\n"
       << "| configuration | budget | attended | KV bytes | % of full | perplexity | × full [95% CI] | top-1 | mean KL | "
          "long-range recall [95% CI] | Δ× vs StreamingLLM [95% CI] | Δ recall [95% CI] | tokens/s |\n"
          "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|---:|\n";
    for (const Row& r : rows) {
      if (r.protocol != p) continue;
      const std::string budget = r.fixed ? std::to_string(opt.window) + "*" : std::to_string(r.budget);
      if (!r.error.empty()) {
        std::printf("%-22s %6s  n/a: %s\n", r.name.c_str(), budget.c_str(), r.error.c_str());
        csv << protocol_name(p) << ',' << r.name << ',' << r.policy << ',' << r.plan << ',' << r.budget
            << std::string(26, ',') << "\"" << r.params << "\",\"" << r.error << "\"\n";
        md << "| " << r.name << " | " << budget << " | n/a: " << r.error << " |||||||||||\n";
        continue;
      }
      const Metrics& m = r.m;
      std::printf("%-22s %6s %4d %9.0f %5.1f%% %7.3f %-17s %5.1f%% %6.1f%% %-15s %-17s %7.0f\n", r.name.c_str(),
                  budget.c_str(), r.attended, m.bytes, m.pct, m.ratio, ci(r.ratio, "%.3f").c_str(), 100 * m.agree,
                  100 * m.recall, ci(r.recall, "%.1f", 100).c_str(),
                  std::isfinite(r.d_ratio_pt) && r.name != "StreamingLLM"
                      ? (fmt("%+.3f ", r.d_ratio_pt) + ci(r.d_ratio, "%+.3f")).c_str()
                      : "",
                  m.tps);
      csv << protocol_name(p) << ',' << r.name << ',' << r.policy << ',' << r.plan << ','
          << (r.fixed ? opt.window : r.budget) << ',' << r.attended << ',' << r.total_budget << ','
          << fmt("%.0f", m.bytes) << ',' << fmt("%.2f", m.pct) << ',' << fmt("%.4f", m.ppl) << ','
          << fmt("%.4f", m.ratio) << ',' << num(r.ratio.lo, "%.4f") << ',' << num(r.ratio.hi, "%.4f") << ','
          << fmt("%.4f", m.agree) << ',' << num(r.agree.lo, "%.4f") << ',' << num(r.agree.hi, "%.4f") << ','
          << fmt("%.5f", m.kl) << ',' << fmt("%.4f", m.recall) << ',' << num(r.recall.lo, "%.4f") << ','
          << num(r.recall.hi, "%.4f") << ',' << m.recall_n << ',' << m.n << ',' << m.windows << ','
          << num(r.d_ratio_pt, "%.4f") << ',' << num(r.d_ratio.lo, "%.4f") << ',' << num(r.d_ratio.hi, "%.4f") << ','
          << num(r.d_recall_pt, "%.4f") << ',' << num(r.d_recall.lo, "%.4f") << ',' << num(r.d_recall.hi, "%.4f")
          << ',' << fmt("%.0f", m.tps) << ",\"" << r.params << "\",\n";
      const bool base = r.name == "StreamingLLM" || r.name == "Full";
      md << "| " << r.name << " | " << budget << " | " << r.attended << " | " << fmt("%.0f", m.bytes) << " | "
         << fmt("%.1f", m.pct) << "% | " << fmt("%.3f", m.ppl) << " | " << fmt("%.3f", m.ratio) << " "
         << ci(r.ratio, "%.3f") << " | " << fmt("%.1f", 100 * m.agree) << "% | " << fmt("%.4f", m.kl) << " | "
         << fmt("%.1f", 100 * m.recall) << "% " << ci(r.recall, "%.1f", 100) << " | "
         << (base || !std::isfinite(r.d_ratio_pt) ? "" : fmt("%+.3f ", r.d_ratio_pt) + ci(r.d_ratio, "%+.3f")) << " | "
         << (base || !std::isfinite(r.d_recall_pt) ? "" : fmt("%+.1f ", 100 * r.d_recall_pt) + ci(r.d_recall, "%+.1f", 100))
         << " | " << fmt("%.0f", m.tps) << " |\n";
    }
  }
  // Which configurations beat StreamingLLM on both perplexity and recall, beyond the paired 95% interval.
  std::printf("\nBeats StreamingLLM at the same budget on perplexity and long-range recall (paired 95%% intervals of "
              "both differences exclude 0):\n");
  md << "\n**Beats StreamingLLM** at the same budget on perplexity and long-range recall (the paired bootstrap 95% "
        "intervals of both differences exclude 0):\n\n";
  for (Protocol p : opt.protocols)
    for (int b : opt.budgets) {
      std::string who;
      for (const Row& r : rows)
        if (r.protocol == p && r.budget == b && !r.fixed && beats_baseline(r))
          who += (who.empty() ? "" : ", ") + r.name + " (" + fmt("%+.3f", r.d_ratio_pt) + " ×, " +
                 fmt("%+.1f", 100 * r.d_recall_pt) + " pts recall)";
      std::printf("  %s, budget %d: %s\n", protocol_name(p), b, who.empty() ? "none" : who.c_str());
      md << "- " << protocol_name(p) << ", budget " << b << ": " << (who.empty() ? "none" : who) << "\n";
    }
  md << "\n\\* runs once with a budget that holds the whole window (never evicts). attended = tokens each step "
        "attends to per KV head (--footing).\n";
  std::printf("\n* = runs once with a budget that holds the whole window (never evicts); att = tokens attended per "
              "KV head per step\nmodel: %d layers, %d query heads over %d KV heads, head dim %d, vocab %d\n",
              c.n_layers, c.n_heads, c.n_kv_heads, c.head_size(), c.vocab_size);

  // Per-window results.
  std::ofstream win(opt.out + "/windows.csv");
  write_csv_header(win, run);
  win << "protocol,configuration,budget,window,window_tokens,scored_tokens,nll,top1_agree,kl,recall_hits,"
         "recall_positions,peak_kv_bytes,seconds,error\n";
  for (const Row& r : rows) {
    const Job& job = run.jobs[static_cast<std::size_t>(r.job)];
    for (std::size_t w = 0; w < run.windows.size(); ++w) {
      const Acc& a = run.results[w][static_cast<std::size_t>(r.job)];
      win << protocol_name(job.protocol) << ',' << r.name << ',' << (r.fixed ? opt.window : r.budget) << ',' << w << ','
          << run.windows[w].size() << ',' << a.n << ',' << fmt("%.6f", a.nll) << ',' << a.agree << ','
          << fmt("%.6f", a.kl) << ',' << a.recall_hit << ',' << a.recall_n << ',' << fmt("%.0f", a.peak_bytes) << ','
          << fmt("%.4f", a.seconds) << ",\"" << a.error << "\"\n";
    }
  }
}

void write_heads(const Run& run, const llama2::Config& c, std::ofstream& md) {
  if (!run.heads) return;
  const Options& opt = run.opt;
  std::ofstream csv(opt.out + "/heads.csv");
  write_csv_header(csv, run);
  // Plan budgets of the global StreamingLLM plan at each budget, beside each head's statistics.
  const Configuration* sllm = examples::find_configuration(run.configs, "StreamingLLM+global");
  int sllm_index = -1;
  for (std::size_t i = 0; i < run.configs.size(); ++i)
    if (sllm && run.configs[i].name == sllm->name) sllm_index = static_cast<int>(i);
  csv << "layer,kv_head,bos_mass,mean_distance,distance_90pct,entropy_nats,norm_attention_spearman,bos_norm_rank,"
         "mass_top32,mass_bos_recent32,mass_lowest_norm32,mass_l2_sinks4_recent10_32";
  for (int b : opt.budgets)
    if (sllm_index >= 0 && run.plans.count({sllm_index, b})) csv << ",plan_streaming_global_" << b;
  csv << '\n';
  std::printf("\nPer-head attention on the calibration text (mean over queries; GQA: mean over the query group):\n"
              "%5s %4s %6s %6s %5s %6s %7s %6s | mass kept at 32 tokens: %5s %5s %5s %5s | global plan\n",
              "layer", "head", "BOS", "dist", "d90", "H", "rho(n)", "BOSrk", "top", "recent", "lownorm", "L2prot");
  md << "\n**Per-head attention** (calibration text; d90 = newest tokens holding 90% of the non-BOS attention; "
        "ρ = Spearman correlation of key norm and attention; mass kept by 32 tokens chosen as the top-attended, "
        "BOS + newest, lowest key norm, 4 sinks + 10 newest + lowest norm)\n\n"
        "| layer | KV head | attention on BOS | mean distance | d90 | entropy | ρ(norm, attention) | BOS norm rank | "
        "top-32 | BOS+recent | lowest norm | L2 protected | StreamingLLM+global budgets |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const examples::HeadStats& s = run.heads->stats(l, h);
      const double q = std::max(1.0, s.queries), n = std::max(1.0, s.sampled);
      std::string plan_cells;
      for (int b : opt.budgets)
        if (sllm_index >= 0 && run.plans.count({sllm_index, b}))
          plan_cells += (plan_cells.empty() ? "" : " / ") + std::to_string(run.plans.at({sllm_index, b}).budget(l, h));
      csv << l << ',' << h << ',' << fmt("%.4f", s.bos_mass / q) << ',' << fmt("%.2f", s.mean_distance / q) << ','
          << s.distance_for(0.9) << ',' << fmt("%.3f", s.entropy / q) << ',' << fmt("%.3f", s.norm_rank_corr / n) << ','
          << fmt("%.3f", s.bos_norm_rank / n) << ',' << fmt("%.4f", s.mass_top / n) << ','
          << fmt("%.4f", s.mass_recent / n) << ',' << fmt("%.4f", s.mass_low_norm / n) << ','
          << fmt("%.4f", s.mass_l2_protected / n);
      for (int b : opt.budgets)
        if (sllm_index >= 0 && run.plans.count({sllm_index, b})) csv << ',' << run.plans.at({sllm_index, b}).budget(l, h);
      csv << '\n';
      std::printf("%5d %4d %6.3f %6.1f %5d %6.2f %7.3f %6.2f |                         %5.3f %5.3f %5.3f %5.3f | %s\n",
                  l, h, s.bos_mass / q, s.mean_distance / q, s.distance_for(0.9), s.entropy / q, s.norm_rank_corr / n,
                  s.bos_norm_rank / n, s.mass_top / n, s.mass_recent / n, s.mass_low_norm / n,
                  s.mass_l2_protected / n, plan_cells.c_str());
      md << "| " << l << " | " << h << " | " << fmt("%.3f", s.bos_mass / q) << " | " << fmt("%.1f", s.mean_distance / q)
         << " | " << s.distance_for(0.9) << " | " << fmt("%.2f", s.entropy / q) << " | "
         << fmt("%.3f", s.norm_rank_corr / n) << " | " << fmt("%.2f", s.bos_norm_rank / n) << " | "
         << fmt("%.3f", s.mass_top / n) << " | " << fmt("%.3f", s.mass_recent / n) << " | "
         << fmt("%.3f", s.mass_low_norm / n) << " | " << fmt("%.3f", s.mass_l2_protected / n) << " | " << plan_cells
         << " |\n";
    }
  if (!run.pools.empty()) {
    std::printf("\nShared slot pool per layer, upper bound (calibration text; attention mass lost per query and head, "
                "keep model 4 sinks + newest, layer total = n_kv_heads x budget):\n%5s %6s %9s %9s %9s\n",
                "layer", "budget", "uniform", "fixed", "per-step");
    md << "\n**Shared slot pool per layer, upper bound** (calibration text; attention mass lost per query and head with 4 "
          "sinks + the newest tokens; each layer's n_kv_heads × budget slots split equally, by the best fixed split, "
          "or by the best split for every query separately, which no causal policy reaches)\n\n"
          "| layer | budget | uniform | best fixed split | best per-step split |\n|---:|---:|---:|---:|---:|\n";
    for (const examples::PoolBound& pb : run.pools) {
      std::printf("%5d %6d %9.4f %9.4f %9.4f\n", pb.layer, pb.budget, pb.uniform, pb.fixed, pb.oracle);
      md << "| " << pb.layer << " | " << pb.budget << " | " << fmt("%.4f", pb.uniform) << " | " << fmt("%.4f", pb.fixed)
         << " | " << fmt("%.4f", pb.oracle) << " |\n";
    }
  }
}

void write_plots(const Run& run, const std::vector<Row>& rows, const llama2::Config& c) {
  const Options& opt = run.opt;
  if (!opt.plots) return;
  if (std::system("gnuplot --version > /dev/null 2>&1") != 0) {
    std::printf("gnuplot not found: no PNG plots (install gnuplot-nox; ./test.sh does)\n");
    return;
  }
  // One data block per (protocol, configuration), rows sorted by memory:
  // pct ratio ratio_lo ratio_hi recall recall_lo recall_hi top1 top1_lo top1_hi (percent for the last six).
  std::vector<std::string> names;
  for (const Row& r : rows)
    if (std::find(names.begin(), names.end(), r.name) == names.end()) names.push_back(r.name);
  std::ofstream dat(opt.out + "/plot.dat");
  struct Block {
    int index;
    std::string name;
  };
  std::vector<std::vector<Block>> blocks(opt.protocols.size());
  int block = 0;
  auto or_pt = [](double x, double pt) { return std::isfinite(x) ? x : pt; };
  for (std::size_t pi = 0; pi < opt.protocols.size(); ++pi) {
    for (const std::string& name : names) {
      std::vector<const Row*> pts;
      for (const Row& r : rows)
        if (r.protocol == opt.protocols[pi] && r.name == name && r.error.empty()) pts.push_back(&r);
      if (pts.empty()) continue;
      std::sort(pts.begin(), pts.end(), [](const Row* a, const Row* b) { return a->m.pct < b->m.pct; });
      dat << "# " << protocol_name(opt.protocols[pi]) << ' ' << name << '\n';
      for (const Row* r : pts)
        dat << fmt("%.3f", r->m.pct) << ' ' << fmt("%.5f", r->m.ratio) << ' ' << fmt("%.5f", or_pt(r->ratio.lo, r->m.ratio))
            << ' ' << fmt("%.5f", or_pt(r->ratio.hi, r->m.ratio)) << ' ' << fmt("%.4f", 100 * r->m.recall) << ' '
            << fmt("%.4f", 100 * or_pt(r->recall.lo, r->m.recall)) << ' '
            << fmt("%.4f", 100 * or_pt(r->recall.hi, r->m.recall)) << ' ' << fmt("%.4f", 100 * r->m.agree) << ' '
            << fmt("%.4f", 100 * or_pt(r->agree.lo, r->m.agree)) << ' ' << fmt("%.4f", 100 * or_pt(r->agree.hi, r->m.agree))
            << '\n';
      dat << "\n\n";
      blocks[pi].push_back({block++, name});
    }
  }
  dat.close();
  struct Plot {
    const char* file;
    int column;  // value; lo and hi follow
    const char* ylabel;
    double ymin, ymax;
    bool high_is_bad;  // off-scale side: above ymax (perplexity) or below ymin (recall, agreement)
  };
  const Plot plots[] = {{"ppl_ratio.png", 2, "perplexity / full-cache perplexity", 0.99, 1.4, true},
                        {"recall.png", 5, "long-range recall, %", 70, 100.5, false},
                        {"top1.png", 8, "top-1 agreement with the full cache, %", 70, 100.5, false}};
  // Colour per base configuration (the name before +global/+layer/+oracle); dash and open points per plan.
  auto base_of = [](const std::string& n) {
    for (const char* suffix : {"+global", "+layer", "+oracle"}) {
      const std::size_t at = n.rfind(suffix);
      if (at != std::string::npos && at + std::string(suffix).size() == n.size()) return n.substr(0, at);
    }
    return n;
  };
  std::vector<std::string> bases;
  for (const std::string& n : names)
    if (std::find(bases.begin(), bases.end(), base_of(n)) == bases.end()) bases.push_back(base_of(n));
  const char* colors[] = {"#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                          "#7f7f7f", "#bcbd22", "#17becf", "#000080", "#b8860b", "#ff1493", "#00ced1", "#556b2f"};
  auto style = [&](const std::string& name) {
    const std::size_t bi = static_cast<std::size_t>(std::find(bases.begin(), bases.end(), base_of(name)) - bases.begin());
    std::string plan = "uniform";
    for (const Row& r : rows)
      if (r.name == name) plan = r.plan;
    const int dt = plan == "global" ? 2 : plan == "per-layer" ? 3 : plan == "oracle" ? 4 : 1;
    const int filled[] = {7, 5, 9, 11, 13, 15}, open[] = {6, 4, 8, 10, 12, 14};
    const int pt = plan == "uniform" ? filled[bi % 6] : open[bi % 6];
    return "lc rgb '" + std::string(colors[bi % (sizeof colors / sizeof colors[0])]) + "' dt " + std::to_string(dt) +
           " pt " + std::to_string(pt) + " lw " + (plan == "uniform" ? "1.5" : "2.5");
  };
  std::ofstream gp(opt.out + "/plots.gp");
  gp << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 1900,1250 font ',11' } "
        "else { set terminal png size 1900,1250 }\nset grid\nset xlabel 'KV memory in use (% of the full cache)'\n"
        "set bars small\n";
  const std::string file = opt.out + "/plot.dat";
  for (const Plot& pl : plots) {
    const std::string v = "$" + std::to_string(pl.column), lo = "$" + std::to_string(pl.column + 1),
                      hi = "$" + std::to_string(pl.column + 2);
    const std::string ymin = fmt("%g", pl.ymin), ymax = fmt("%g", pl.ymax);
    // Values off the scale are drawn at the border (clamp) and marked with a triangle and their value.
    const std::string clamp = "(" + v + ">" + ymax + "?" + ymax + ":" + v + "<" + ymin + "?" + ymin + ":" + v + ")";
    const std::string clamp_lo = "(" + lo + "<" + ymin + "?" + ymin + ":" + lo + ">" + ymax + "?" + ymax + ":" + lo + ")";
    const std::string clamp_hi = "(" + hi + ">" + ymax + "?" + ymax + ":" + hi + "<" + ymin + "?" + ymin + ":" + hi + ")";
    const std::string off = "(" + v + ">" + ymax + "||" + v + "<" + ymin + ")";
    gp << "set output '" << opt.out << '/' << pl.file << "'\nset ylabel '" << pl.ylabel << "'\nset yrange [" << ymin
       << ":" << ymax << "]\nset multiplot layout " << opt.protocols.size() << ",2 title '" << c.n_layers
       << "-layer llama2.c model (" << c.dim << " dim), " << run.windows.size() << " windows of up to " << opt.window
       << " tokens; bars: bootstrap 95% intervals; triangles: off the scale, drawn at the border with their value; "
          "dashed: budget plans'\n";
    for (std::size_t pi = 0; pi < opt.protocols.size(); ++pi)
      for (int zoom = 0; zoom < 2; ++zoom) {
        gp << (zoom ? "set xrange [4:32]\nset key outside right top Left reverse font ',9'\n"
                    : "set xrange [0:102]\nunset key\n")
           << "set title '" << protocol_name(opt.protocols[pi]) << " protocol" << (zoom ? ", 4-32% of the memory" : "")
           << "'\nplot ";
        for (std::size_t b = 0; b < blocks[pi].size(); ++b) {
          const Block& bl = blocks[pi][b];
          gp << (b ? ", " : "") << "'" << file << "' index " << bl.index << " using 1:" << clamp << ":" << clamp_lo << ":"
             << clamp_hi << " with yerrorlines " << style(bl.name) << " ps 1.3 title '" << bl.name << "'"
             << ", '' index " << bl.index << " using 1:(" << off << "?" << clamp << ":1/0) with points pt "
             << (pl.high_is_bad ? 8 : 10) << " ps 3 lc rgb 'red' notitle"
             << ", '' index " << bl.index << " using 1:(" << off << "?" << clamp << ":1/0):(sprintf('%.3g', " << v
             << ")) with labels offset 0," << (pl.high_is_bad ? "-1.2" : "1.2") << " font ',8' tc rgb 'red' notitle";
        }
        gp << "\n";
      }
    gp << "unset multiplot\n";
  }
  gp.close();
  if (std::system(("gnuplot '" + opt.out + "/plots.gp' 2>'" + opt.out + "/gnuplot.log'").c_str()) != 0)
    std::printf("gnuplot failed on %s/plots.gp (see gnuplot.log): no PNG plots\n", opt.out.c_str());
  else
    std::printf("plots: %s/ppl_ratio.png %s/recall.png %s/top1.png\n", opt.out.c_str(), opt.out.c_str(), opt.out.c_str());
}

int run_main(int argc, char** argv) {
  Run run;
  run.opt = parse(argc, argv);
  Options& opt = run.opt;
  if (opt.list) {
    list_configurations(opt);
    return 0;
  }
  run.configs = configurations(opt);
  for (const Configuration& cf : run.configs)
    for (int b : opt.budgets) examples::check_settings(cf, b);
  const std::vector<std::pair<std::string, std::string>> inputs{
      {opt.model, "checkpoint"}, {opt.tokenizer, "tokenizer"}, {opt.text, "text"}};
  for (const auto& [file, what] : inputs)
    try {
      cli::require_file(file, what);
    } catch (const cli::MissingInput& e) {
      throw cli::MissingInput(std::string(e.what()) +
                              "; get stories260K.bin and tok512.bin from huggingface.co/karpathy/tinyllamas (stories260K) "
                              "and the text from the TinyStories validation split, then pass --models DIR or --model/"
                              "--tokenizer/--text");
    }
  if (!opt.plans_from.empty()) cli::require_dir(opt.plans_from + "/plans", "--plans-from: the plans folder");
  opt.out = cli::absolute(opt.out);
  // A quick run never overwrites a full run's results.
  {
    std::ifstream prev(opt.out + "/results.csv");
    std::string line;
    for (int i = 0; i < 4 && std::getline(prev, line); ++i)
      if (opt.quick && line == "# mode: full")
        throw cli::UsageError("--quick would overwrite the full run in " + opt.out + "; give another --out");
  }
  const auto t_start = Clock::now();
  const auto ck = llama2::Checkpoint::load(opt.model);
  const auto& c = ck.config();
  const auto tok = llama2::Tokenizer::load(opt.tokenizer, c.vocab_size);
  if (opt.window > c.seq_len)
    throw cli::UsageError("--window " + std::to_string(opt.window) + " exceeds the model's context of " +
                          std::to_string(c.seq_len) + " tokens");
  const std::string text = read_text(opt.text, 0, opt.bytes);
  const std::vector<int> ids = tok.encode(text, false, false);
  run.text_tokens = static_cast<long long>(ids.size());
  run.windows = make_windows(ids, opt.window, opt.drop_last);
  if (run.windows.empty())
    throw cli::UsageError("the first " + std::to_string(opt.bytes) + " bytes of " + opt.text + " give no window of " +
                          std::to_string(opt.window) + " tokens (raise --bytes)");
  long long scored = 0;
  for (const auto& w : run.windows) scored += static_cast<long long>(w.size()) - 1;
  const auto calib = opt.calib_bytes > 0 ? make_windows(tok.encode(read_text(opt.text, opt.calib_offset, opt.calib_bytes),
                                                                    false, false),
                                                         opt.window, true)
                                         : std::vector<std::vector<int>>{};
  const int L = c.n_layers, H = c.n_kv_heads;
  const kvtrim::CacheConfig shape = llama2::cache_config(c, 1);

  // Calibration: budget curves, Eigen Attention's basis and the per-head analysis from the same windows.
  bool need_plans = false, need_basis = false;
  for (const Configuration& cf : run.configs) {
    need_plans |= cf.plan == PlanKind::kGlobal || cf.plan == PlanKind::kPerLayer;
    need_basis |= examples::needs_basis(cf.policy);
  }
  std::shared_ptr<const kvtrim::EigenBasis> basis;
  kvtrim::BudgetCurves curves;
  if (!calib.empty()) {
    auto cal = make_calibrator(ck, opt.window);
    kvtrim::EigenCalibrator eig(shape);
    std::vector<int> pool_budgets;
    for (int b : opt.budgets)
      if (b * 2 <= opt.window && b <= 64) pool_budgets.push_back(b);  // an exact split per query costs O(H (H b)^2)
    run.heads = std::make_unique<examples::HeadAnalysis>(L, H, c.n_heads / H, c.head_size(), opt.window, pool_budgets,
                                                         32, std::min(64, opt.window / 2));
    llama2::Transformer tf(ck);
    Capture cap;
    tf.set_kv_tap([&](int layer, std::int64_t, const float* q, const float* k, const float* v) {
      const auto l = static_cast<std::size_t>(layer);
      cap.Q[l].insert(cap.Q[l].end(), q, q + c.dim);
      cap.K[l].insert(cap.K[l].end(), k, k + c.kv_dim());
      cap.V[l].insert(cap.V[l].end(), v, v + c.kv_dim());
    });
    std::fprintf(stderr, "  calibrating on %zu windows (bytes %zu..%zu of the text)\n", calib.size(), opt.calib_offset,
                 opt.calib_offset + opt.calib_bytes);
    for (const auto& w : calib) {
      cap.reset(L);
      auto full = kvtrim::make_cache("full", llama2::cache_config(c, static_cast<int>(w.size())));
      tf.prefill(*full, w);
      for (int l = 0; l < L; ++l) {
        const auto li = static_cast<std::size_t>(l);
        if (need_plans) cal.add(l, cap.Q[li], cap.K[li], cap.V[li]);
        if (need_basis) eig.add(l, cap.K[li], cap.V[li], cap.Q[li]);
        run.heads->add(l, cap.Q[li], cap.K[li]);
      }
    }
    run.pools = run.heads->pool_bounds();
    if (need_plans) curves = cal.curves();
    if (need_basis) {
      kvtrim::EigenCalibration eo;
      eo.energy = opt.eigen_energy;
      basis = std::make_shared<const kvtrim::EigenBasis>(eig.basis(eo));
      run.basis = basis;
      std::printf("Eigen Attention basis (energy %.2f), key/value ranks per layer (of %d):", opt.eigen_energy,
                  c.head_size());
      for (int l = 0; l < L; ++l) std::printf(" %d/%d", basis->key_rank(l, 0), basis->value_rank(l, 0));
      std::printf("\n");
    }
  } else if (need_plans || need_basis) {
    std::fprintf(stderr, "compare_policies: no calibration text (--calib-bytes 0 or the text ends before "
                         "--calib-offset); budget plans and Eigen Attention are skipped\n");
  }
  // Configurations that cannot run without calibration are dropped (said above).
  std::vector<Configuration> kept;
  for (const Configuration& cf : run.configs) {
    const bool plan = cf.plan == PlanKind::kGlobal || cf.plan == PlanKind::kPerLayer;
    if ((plan && curves.n_layers() == 0 && opt.plans_from.empty()) || (examples::needs_basis(cf.policy) && !basis)) continue;
    kept.push_back(cf);
  }
  run.configs = kept;

  // Jobs: per protocol the reference, then every (configuration, budget).
  if (!opt.plans_from.empty()) opt.plans_from = cli::absolute(opt.plans_from);
  fs::create_directories(opt.out + "/plans");
  std::ofstream plans_csv(opt.out + "/plans.csv");
  plans_csv << "configuration,budget,total,min_budget";
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) plans_csv << ",L" << l << "H" << h;
  plans_csv << '\n';
  for (Protocol p : opt.protocols) {
    run.jobs.push_back({-1, opt.window, p, llama2::cache_config(c, opt.window)});
    for (std::size_t ci = 0; ci < run.configs.size(); ++ci) {
      const Configuration& cf = run.configs[ci];
      const int shift = opt.footing == Footing::kAttended && examples::evicts_before_attention(cf.policy) ? 1 : 0;
      if (cf.fixed) {
        run.jobs.push_back({static_cast<int>(ci), opt.window, p, llama2::cache_config(c, opt.window)});
        continue;
      }
      for (int b : opt.budgets) {
        Job job{static_cast<int>(ci), b, p, llama2::cache_config(c, b + shift), shift, 1};
        if (cf.plan != PlanKind::kUniform) {
          job.min_budget = examples::min_budget(cf, b, shape, basis);
          const std::int64_t total = std::int64_t{L} * H * b;
          if (cf.plan != PlanKind::kOracle) {
            const auto key = std::pair{static_cast<int>(ci), b};
            if (!run.plans.count(key)) {
              kvtrim::BudgetPlan plan;
              if (!opt.plans_from.empty()) {
                const std::string f = plan_file(opt.plans_from, cf, b);
                cli::require_file(f, "--plans-from: plan");
                plan = kvtrim::BudgetPlan::load(f);
                if (plan.n_layers() != L || plan.n_kv_heads() != H || plan.total() != total)
                  throw cli::UsageError("--plans-from: " + f + " is a plan for " + std::to_string(plan.n_layers()) +
                                        " layers x " + std::to_string(plan.n_kv_heads()) + " KV heads with " +
                                        std::to_string(plan.total()) + " tokens; this run needs " + std::to_string(L) +
                                        " x " + std::to_string(H) + " with " + std::to_string(total));
              } else {
                plan = kvtrim::allocate_budgets(
                    curves, {.total = total,
                             .min_budget = job.min_budget,
                             .max_budget = opt.window,
                             .scope = cf.plan == PlanKind::kGlobal ? kvtrim::BudgetScope::kGlobal
                                                                   : kvtrim::BudgetScope::kPerLayer});
              }
              plan.save(plan_file(opt.out, cf, b));
              plans_csv << cf.name << ',' << b << ',' << plan.total() << ',' << job.min_budget;
              for (int x : plan.budgets()) plans_csv << ',' << x;
              plans_csv << '\n';
              run.plans.emplace(key, plan);
            }
            job.cfg = run.plans.at(key).shifted(shift).apply(shape);
          }
        }
        run.jobs.push_back(job);
      }
    }
  }
  plans_csv.close();

  // Metadata, written at the top of every CSV.
  const std::string commit = run_command("git -C '" + std::string(KVTRIM_EXAMPLES_SOURCE_DIR) +
                                         "' describe --always --dirty --abbrev=12 2>/dev/null");
  std::string budgets, protocols;
  for (int b : opt.budgets) budgets += (budgets.empty() ? "" : ",") + std::to_string(b);
  for (Protocol p : opt.protocols) protocols += (protocols.empty() ? "" : ",") + std::string(protocol_name(p));
  run.metadata = {
      "kvtrim compare_policies (read with e.g. pandas.read_csv(f, comment='#'))",
      std::string("mode: ") + (opt.quick ? "quick" : "full"),
      "command: " + opt.command_line,
      "commit: " + (commit.empty() ? std::string("unknown (not a git checkout)") : commit),
      "date_utc: " + utc_now(),
      "model: " + cli::absolute(opt.model) + " sha256=" + examples::sha256_file(opt.model),
      "tokenizer: " + cli::absolute(opt.tokenizer) + " sha256=" + examples::sha256_file(opt.tokenizer),
      "text: " + cli::absolute(opt.text) + " sha256=" + examples::sha256_file(opt.text) + " evaluated_bytes=0.." +
          std::to_string(opt.bytes) + " (sha256=" + examples::sha256_bytes(text) + ") calibration_bytes=" +
          std::to_string(opt.calib_offset) + ".." + std::to_string(opt.calib_offset + opt.calib_bytes),
      "options: window=" + std::to_string(opt.window) + " prompt=" + std::to_string(opt.prompt) + " budgets=" + budgets +
          " protocols=" + protocols + " footing=" + (opt.footing == Footing::kAttended ? "attended" : "budget") +
          " recall_distance=" + std::to_string(opt.recall_distance) + " bootstrap=" + std::to_string(opt.bootstrap) +
          " seed=" + std::to_string(opt.seed) + " eigen_energy=" + fmt("%g", opt.eigen_energy) +
          " drop_last=" + (opt.drop_last ? "true" : "false") + " threads=" + std::to_string(opt.threads) +
          " plans=" + (opt.plans_from.empty() ? std::string("calibrated") : "loaded from " + opt.plans_from),
      "data: " + std::to_string(run.windows.size()) + " windows, " + std::to_string(run.text_tokens) +
          " text tokens, " + std::to_string(scored) + " scored in the stream protocol; calibration " +
          std::to_string(calib.size()) + " windows",
      "model_shape: layers=" + std::to_string(L) + " q_heads=" + std::to_string(c.n_heads) + " kv_heads=" +
          std::to_string(H) + " head_dim=" + std::to_string(c.head_size()) + " vocab=" + std::to_string(c.vocab_size),
  };

  const std::size_t W = run.windows.size();
  std::printf("compare_policies: %s, %zu windows of up to %d tokens (%lld text tokens), %zu configurations x %zu "
              "budgets x %zu protocols, %d threads\n",
              opt.model.c_str(), W, opt.window, run.text_tokens, run.configs.size() + 1, opt.budgets.size(),
              opt.protocols.size(), opt.threads);
  std::fflush(stdout);

  // Per (window, job) results, reduced in window order at the end (deterministic whatever the threads).
  run.results.assign(W, std::vector<Acc>(run.jobs.size()));
  std::atomic<std::size_t> next_window{0}, done{0};
  std::mutex err_mutex;
  std::string fatal;
  auto worker = [&]() {
    Runner runner(ck, opt);
    Reference ref[2];
    Capture cap;
    for (std::size_t w; (w = next_window++) < W;) {
      runner.set_window(run.windows[w]);
      bool captured = false;
      std::map<int, kvtrim::BudgetPlan> oracle;  // per nominal budget
      std::unique_ptr<kvtrim::BudgetCurves> window_curves;
      for (std::size_t j = 0; j < run.jobs.size(); ++j) {
        const Job& job = run.jobs[j];
        Acc& acc = run.results[w][j];
        try {
          if (!runner.runs(job.protocol)) {
            ++done;
            continue;
          }
          Reference& r = ref[static_cast<int>(job.protocol)];
          if (job.config < 0) {
            runner.reference(job.protocol, r, acc, captured ? nullptr : &cap);
            captured = true;
          } else {
            const Configuration& cf = run.configs[static_cast<std::size_t>(job.config)];
            kvtrim::CacheConfig cfg = job.cfg;
            if (cf.plan == PlanKind::kOracle) {
              if (!window_curves) {  // calibrated on this very window: hindsight
                auto cal = make_calibrator(ck, opt.window);
                for (int l = 0; l < L; ++l) {
                  const auto li = static_cast<std::size_t>(l);
                  cal.add(l, cap.Q[li], cap.K[li], cap.V[li]);
                }
                window_curves = std::make_unique<kvtrim::BudgetCurves>(cal.curves());
              }
              if (!oracle.count(job.budget))
                oracle.emplace(job.budget, kvtrim::allocate_budgets(*window_curves, {.total = std::int64_t{L} * H * job.budget,
                                                                                     .min_budget = job.min_budget,
                                                                                     .max_budget = opt.window}));
              cfg = oracle.at(job.budget).shifted(job.shift).apply(shape);
            }
            auto cache = examples::build_cache(cf, job.budget, cfg, basis);
            runner.evaluate(*cache, job.protocol, r, acc);
          }
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
  const std::size_t total = W * run.jobs.size();
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

  const std::vector<Row> rows = summarise(run, c);
  write_tables(run, rows, c);
  {
    std::ofstream md(opt.out + "/table.md", std::ios::app);
    write_heads(run, c, md);
  }
  write_plots(run, rows, c);
  std::printf("results: %s/results.csv, windows.csv, heads.csv, plans.csv, table.md (%.0f s)\n", opt.out.c_str(),
              std::chrono::duration<double>(Clock::now() - t_start).count());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("compare_policies", [&] { return run_main(argc, argv); });
}
