// Several stories generated at once through one kvtrim::KVBatch: the integration guide for an engine.
//   batch_generate [--policy NAME] [--param key=value ...] [--budget B] [--steps N] [--batch B] [--threads T]
//                  [--kv-dtype float|half|bf16] [--check] [prompt ...]
//
// The loop an engine runs (continuous batching):
//   1. sequences join the batch while there is room (KVBatch::add gives each its own cache: budgets, positions
//      and policy state of its own);
//   2. one step: every active sequence contributes one row (its next token at its own position); the model
//      computes Q, K, V for all rows with one matrix product per weight, and per layer KVBatch::decode runs
//      kvtrim over the rows (each (sequence, KV head) pair on the batch's threads) and returns the attention
//      output rows;
//   3. sequences that are done (the model ended the story, or --steps positions) leave (KVBatch::remove) and
//      the next prompt takes the free row.
// Activations are float32 here; an fp16/bf16 engine hands the same calls kvtrim::half or kvtrim::bfloat16 spans
// (kv_cache.hpp, "fp16 / bf16 activations"). --kv-dtype picks how the cache stores keys and values
// (kvtrim::CpuBackend<T>): half and bf16 halve its memory and the bytes each step reads.
//
// --check replays every story one sequence at a time through the single-sequence path (Transformer::decode
// into a KVCache of the same policy and storage, fed the tokens the batch produced) and compares the logits of
// every position; it prints both throughputs and exits 1 when any logit differs by more than the storage type's
// tolerance. The two paths compute K and V with different matrix products (fp32 sums in another order): with
// fp32 storage their logits differ by at most ~4e-5 (1e-3 allows for it), but a 16-bit store can round two such
// nearly equal values to neighbouring 16-bit numbers, one unit of rounding apart, which moves the logits much
// more (measured on 8 stories x 512 positions, full cache: up to 0.019 with half, 0.073 with bf16). The
// tolerance for half and bf16 is 64 units of rounding (2^-11 and 2^-8): 0.031 and 0.25.
#include <kvtrim/batch.hpp>
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cli.hpp"
#include "common/configurations.hpp"
#include "llama2/model.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

namespace {

struct Options {
  std::string policy = "full";
  examples::Settings params;
  std::shared_ptr<const kvtrim::EigenBasis> basis;
  int steps = 128, batch = 4, threads = 1, budget = 0;
  std::string kv_dtype = "float";
  bool check = false;
};

struct Story {
  std::vector<int> prompt;  // BOS first
  std::vector<int> tokens;  // every token fed to the model, position by position
  std::vector<float> logits;  // [positions x vocab] (kept for --check only)
  std::string text;
  int id = -1;  // in the batch while active
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int argmax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

// Runs every story through one batch of policy P stored by Backend; returns the tokens per second of the
// generation loop.
template <class P, class Backend>
double generate(const llama2::Checkpoint& ck, const llama2::Tokenizer& tok, const kvtrim::CacheConfig& cfg,
                const typename P::Params& params, const Options& opt, std::vector<Story>& stories) {
  const int vocab = ck.config().vocab_size;
  kvtrim::KVBatch<P, Backend> batch(cfg, params, {.threads = opt.threads});
  llama2::Transformer tf(ck);
  std::vector<Story*> active;
  std::vector<int> ids, tokens;
  std::vector<std::int64_t> positions;
  std::size_t next = 0;
  long long fed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (next < stories.size() || !active.empty()) {
    while (static_cast<int>(active.size()) < opt.batch && next < stories.size()) {  // 1. join
      Story& s = stories[next++];
      s.id = batch.add();
      s.tokens = {s.prompt[0]};
      active.push_back(&s);
    }
    ids.clear(), tokens.clear(), positions.clear();  // 2. one step, a row per active sequence
    for (const Story* s : active) {
      ids.push_back(s->id);
      tokens.push_back(s->tokens.back());
      positions.push_back(static_cast<std::int64_t>(s->tokens.size()) - 1);
    }
    const float* logits = tf.decode_batch(batch, ids, tokens, positions);
    fed += static_cast<long long>(active.size());
    for (std::size_t r = 0; r < active.size(); ++r) {
      Story& s = *active[r];
      const float* row = logits + r * static_cast<std::size_t>(vocab);
      if (opt.check) s.logits.insert(s.logits.end(), row, row + vocab);
      const std::size_t pos = s.tokens.size() - 1;
      const int token = pos + 1 < s.prompt.size() ? s.prompt[pos + 1] : argmax(row, vocab);
      const bool done = token == llama2::Tokenizer::kBos || static_cast<int>(s.tokens.size()) >= opt.steps;
      if (token != llama2::Tokenizer::kBos) s.text += tok.decode(s.tokens.back(), token);
      if (done) {
        batch.remove(s.id);  // 3. leave
        s.id = -1;
      } else {
        s.tokens.push_back(token);
      }
    }
    std::erase_if(active, [](const Story* s) { return s->id < 0; });
  }
  return static_cast<double>(fed) / seconds_since(t0);
}

// The single-sequence path over the batch's tokens: returns its tokens per second; max_diff and positions
// get the largest logit difference and the positions compared.
template <class P, class Backend>
double replay_one_by_one(const llama2::Checkpoint& ck, const kvtrim::CacheConfig& cfg, const typename P::Params& params,
                         const std::vector<Story>& stories, double& max_diff, long long& positions, long long& agree) {
  const int vocab = ck.config().vocab_size;
  llama2::Transformer tf(ck);
  double seconds = 0;
  for (const Story& s : stories) {
    kvtrim::KVCache<P, Backend> cache(cfg, params);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t pos = 0; pos < s.tokens.size(); ++pos) {
      const float* logits = tf.decode(cache, s.tokens[pos], static_cast<std::int64_t>(pos));
      const float* batched = s.logits.data() + pos * static_cast<std::size_t>(vocab);
      for (int v = 0; v < vocab; ++v) max_diff = std::max(max_diff, std::abs(double(logits[v]) - double(batched[v])));
      agree += argmax(logits, vocab) == argmax(batched, vocab);
      ++positions;
    }
    seconds += seconds_since(t0);
  }
  return static_cast<double>(positions) / seconds;
}

// The batch loop with P stored by Backend, its stories printed, and with --check the single-sequence replay;
// returns the exit status.
template <class P, class Backend>
int run_policy(const llama2::Checkpoint& ck, const llama2::Tokenizer& tok, const kvtrim::CacheConfig& cfg,
               const typename P::Params& params, const Options& opt, std::vector<Story>& stories, int budget) {
  const double batched = generate<P, Backend>(ck, tok, cfg, params, opt, stories);
  long long tokens = 0;
  for (std::size_t i = 0; i < stories.size(); ++i) {
    std::printf("[%zu] %s\n", i + 1, stories[i].text.c_str());
    tokens += static_cast<long long>(stories[i].tokens.size());
  }
  std::printf("batch_generate: %zu stories, %lld positions, policy %s, budget %d, kv-dtype %s, batch %d, threads %d: "
              "%.0f tokens/s\n",
              stories.size(), tokens, opt.policy.c_str(), budget, opt.kv_dtype.c_str(), opt.batch, opt.threads, batched);
  if (!opt.check) return 0;
  double max_diff = 0;
  long long positions = 0, agree = 0;
  const double single = replay_one_by_one<P, Backend>(ck, cfg, params, stories, max_diff, positions, agree);
  std::printf("check: one sequence at a time (Transformer::decode + KVCache) %.0f tokens/s; batched/single %.2fx; "
              "max |logit difference| %.2e over %lld positions; top-1 agreement %lld/%lld\n",
              single, batched / single, max_diff, positions, agree, positions);
  using T = typename Backend::Storage;
  const double tolerance = std::is_same_v<T, float> ? 1e-3 : std::is_same_v<T, kvtrim::half> ? 64.0 / 2048 : 64.0 / 256;
  if (max_diff <= tolerance) return 0;
  std::fprintf(stderr, "batch_generate: check FAILED: the batched logits differ from the single-sequence path by %.3g (> %.3g)\n",
               max_diff, tolerance);
  return 1;
}

int run(int argc, char** argv) {
  cli::Parser p("batch_generate",
                {{"--models", "DIR", "folder with stories260K.bin and tok512.bin (default $KVTRIM_MODELS, else\n../shared/models beside the repository)"},
                 {"--model", "FILE", "llama2.c checkpoint (default DIR/stories260K.bin)"},
                 {"--tokenizer", "FILE", "its tokenizer (default DIR/tok512.bin)"},
                 {"--steps", "N", "positions per story, the prompt included (default 128; at most the model's context)"},
                 {"--batch", "B", "sequences decoded together (default 4); more prompts wait for a free row"},
                 {"--threads", "T", "kvtrim threads for the (sequence, KV head) pairs of a step (default 1)"},
                 {"--policy", "NAME", "registered policy (default full); --policy bogus lists them"},
                 {"--param", "key=value", "a parameter of the policy (repeatable), e.g. --param heavy_ratio=0.25"},
                 {"--budget", "B", "tokens kept per KV head (default: --steps, i.e. nothing is evicted)"},
                 {"--basis", "FILE", "Eigen Attention basis for the eigen+* policies (EigenBasis::save format)"},
                 {"--kv-dtype", "TYPE", "how the cache stores keys and values: float (default), half or bf16"},
                 {"--check", "", "replay each story alone through the single-sequence path and compare logits"}},
                /*positional=*/true);
  const char* env = std::getenv("KVTRIM_MODELS");
  std::string dir = env ? env : KVTRIM_EXAMPLES_MODELS_DIR, model, tokenizer, basis_path;
  std::vector<std::string> prompts;
  Options opt;
  p.start(argc, argv);
  while (p.next()) {
    if (p.is("--help")) {
      std::fputs(p.help("batch_generate [options] [prompt ...]   several stories at once through one kvtrim::KVBatch").c_str(),
                 stdout);
      std::printf("policies: %s\n", examples::policy_list().c_str());
      return 0;
    } else if (p.is("--models")) dir = p.value();
    else if (p.is("--model")) model = p.value();
    else if (p.is("--tokenizer")) tokenizer = p.value();
    else if (p.is("--steps")) opt.steps = static_cast<int>(p.integer(1, 1 << 20));
    else if (p.is("--batch")) opt.batch = static_cast<int>(p.integer(1, 4096));
    else if (p.is("--threads")) opt.threads = static_cast<int>(p.integer(1, 256));
    else if (p.is("--policy")) opt.policy = p.value();
    else if (p.is("--budget")) opt.budget = static_cast<int>(p.integer(1, kvtrim::BudgetPlan::kMaxBudget));
    else if (p.is("--basis")) basis_path = p.value();
    else if (p.is("--check")) opt.check = true;
    else if (p.is("--kv-dtype")) {
      opt.kv_dtype = p.value();
      if (opt.kv_dtype != "float" && opt.kv_dtype != "half" && opt.kv_dtype != "bf16")
        throw cli::UsageError("--kv-dtype: '" + opt.kv_dtype + "' is not a storage type; expected float, half or bf16");
    }
    else if (p.is("--param")) {
      const auto items = examples::parse_settings(p.value(), "--param");
      opt.params.insert(opt.params.end(), items.begin(), items.end());
    } else if (p.positional()) {
      prompts.push_back(p.current());
    }
  }
  if (prompts.empty())
    prompts = {"Once upon a time", "Tom had a red ball", "The little cat was sad", "One day, Lily went to the park",
               "Ben and his mom", "The sun was hot"};
  if (!examples::known_policy(opt.policy))
    throw cli::UsageError("unknown policy '" + opt.policy + "'; the registered policies are " + examples::policy_list());
  examples::Configuration conf{opt.policy, opt.policy, ""};
  for (const auto& [k, v] : opt.params) conf.settings += (conf.settings.empty() ? "" : ",") + k + "=" + v;
  const int budget = opt.budget > 0 ? opt.budget : opt.steps;
  examples::check_settings(conf, budget);
  if (examples::needs_basis(opt.policy) && basis_path.empty())
    throw cli::UsageError("policy " + opt.policy + " stores low-rank keys and needs --basis FILE (an Eigen Attention basis)");
  if (model.empty()) model = dir + "/stories260K.bin";
  if (tokenizer.empty()) tokenizer = dir + "/tok512.bin";
  cli::require_file(model, "checkpoint");
  cli::require_file(tokenizer, "tokenizer");
  if (!basis_path.empty()) {
    cli::require_file(basis_path, "--basis");
    opt.basis = std::make_shared<const kvtrim::EigenBasis>(kvtrim::EigenBasis::load(basis_path));
  }

  const auto ck = llama2::Checkpoint::load(model);
  const auto tok = llama2::Tokenizer::load(tokenizer, ck.config().vocab_size);
  if (opt.steps > ck.config().seq_len)
    throw cli::UsageError("--steps: " + std::to_string(opt.steps) + " is out of range 1.." +
                          std::to_string(ck.config().seq_len) + " (the model's context)");
  std::vector<Story> stories(prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    stories[i].prompt = tok.encode(prompts[i], true, false);
    if (static_cast<int>(stories[i].prompt.size()) > opt.steps)
      throw cli::UsageError("prompt " + std::to_string(i + 1) + " has " + std::to_string(stories[i].prompt.size()) +
                            " tokens (BOS included), more than --steps " + std::to_string(opt.steps));
  }
  const kvtrim::CacheConfig cfg = llama2::cache_config(ck.config(), budget);

  int status = 0;
  kvtrim::with_policy(opt.policy, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    const auto params = kvtrim::policy_params(entry, {.params = examples::resolve(conf, budget), .basis = opt.basis});
    if (opt.kv_dtype == "half")
      status = run_policy<P, kvtrim::CpuBackend<kvtrim::half>>(ck, tok, cfg, params, opt, stories, budget);
    else if (opt.kv_dtype == "bf16")
      status = run_policy<P, kvtrim::CpuBackend<kvtrim::bfloat16>>(ck, tok, cfg, params, opt, stories, budget);
    else
      status = run_policy<P, kvtrim::CpuBackend<>>(ck, tok, cfg, params, opt, stories, budget);
  });
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("batch_generate", [&] { return run(argc, argv); });
}
