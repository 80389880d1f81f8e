// Greedy generation with a llama2.c checkpoint and any registered kvtrim policy.
//   generate [--policy NAME] [--param key=value ...] [--budget B | --plan FILE] [--steps N] [prompt]
// With the default full cache and no prompt this prints the same text as llama2.c's
// `run stories260K.bin -z tok512.bin -t 0.0 -n 200`.
#include <kvtrim/any_cache.hpp>
#include <kvtrim/budget_plan.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/configurations.hpp"
#include "llama2/model.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

namespace {

int generate(int argc, char** argv) {
  cli::Parser p("generate",
                {{"--models", "DIR", "folder with stories260K.bin and tok512.bin (default $KVTRIM_MODELS, else\n../shared/models beside the repository)"},
                 {"--model", "FILE", "llama2.c checkpoint (default DIR/stories260K.bin)"},
                 {"--tokenizer", "FILE", "its tokenizer (default DIR/tok512.bin)"},
                 {"--steps", "N", "positions to run, the prompt included (default 200; at most the model's context)"},
                 {"--policy", "NAME", "registered policy (default full); --policy bogus lists them"},
                 {"--param", "key=value", "a parameter of the policy (repeatable), e.g. --param heavy_ratio=0.25"},
                 {"--budget", "B", "tokens kept per KV head (default: the steps, i.e. nothing is evicted)"},
                 {"--plan", "FILE", "per-head budgets from a saved BudgetPlan (compare_policies writes them to\nOUT/plans/*.kvb) instead of --budget"},
                 {"--basis", "FILE", "Eigen Attention basis for the eigen+* policies (EigenBasis::save format)"}},
                /*positional=*/true);
  const char* env = std::getenv("KVTRIM_MODELS");
  std::string dir = env ? env : KVTRIM_EXAMPLES_MODELS_DIR, model, tokenizer, prompt, policy = "full", plan_path, basis_path;
  long long steps = 200, budget = 0;
  bool have_prompt = false;
  examples::Settings params;
  p.start(argc, argv);
  while (p.next()) {
    if (p.is("--help")) {
      std::fputs(p.help("generate [options] [prompt]   greedy generation through a kvtrim cache").c_str(), stdout);
      std::printf("policies: %s\n", examples::policy_list().c_str());
      return 0;
    } else if (p.is("--models")) dir = p.value();
    else if (p.is("--model")) model = p.value();
    else if (p.is("--tokenizer")) tokenizer = p.value();
    else if (p.is("--steps")) steps = p.integer(1, 1 << 22);
    else if (p.is("--policy")) policy = p.value();
    else if (p.is("--budget")) budget = p.integer(1, kvtrim::BudgetPlan::kMaxBudget);
    else if (p.is("--plan")) plan_path = p.value();
    else if (p.is("--basis")) basis_path = p.value();
    else if (p.is("--param")) {
      const auto items = examples::parse_settings(p.value(), "--param");
      params.insert(params.end(), items.begin(), items.end());
    } else if (p.positional()) {
      if (have_prompt) throw cli::UsageError("more than one prompt ('" + prompt + "', '" + p.current() + "'); quote it");
      prompt = p.current(), have_prompt = true;
    }
  }
  if (!examples::known_policy(policy))
    throw cli::UsageError("unknown policy '" + policy + "'; the registered policies are " + examples::policy_list());
  if (budget > 0 && !plan_path.empty()) throw cli::UsageError("give --budget or --plan, not both");
  // Parameters are checked before any file is read.
  examples::Configuration conf{policy, policy, ""};
  for (const auto& [k, v] : params) conf.settings += (conf.settings.empty() ? "" : ",") + k + "=" + v;
  examples::check_settings(conf, budget > 0 ? budget : steps);
  if (examples::needs_basis(policy) && basis_path.empty())
    throw cli::UsageError("policy " + policy + " stores low-rank keys and needs --basis FILE (an Eigen Attention basis)");
  if (model.empty()) model = dir + "/stories260K.bin";
  if (tokenizer.empty()) tokenizer = dir + "/tok512.bin";
  cli::require_file(model, "checkpoint");
  cli::require_file(tokenizer, "tokenizer");
  if (!plan_path.empty()) cli::require_file(plan_path, "--plan");
  if (!basis_path.empty()) cli::require_file(basis_path, "--basis");

  const auto ck = llama2::Checkpoint::load(model);
  const auto& c = ck.config();
  const auto tok = llama2::Tokenizer::load(tokenizer, c.vocab_size);
  if (steps > c.seq_len)
    throw cli::UsageError("--steps: " + std::to_string(steps) + " is out of range 1.." + std::to_string(c.seq_len) +
                          " (the model's context)");
  kvtrim::CacheConfig cfg = llama2::cache_config(c, static_cast<int>(budget > 0 ? budget : steps));
  if (!plan_path.empty()) cfg = kvtrim::BudgetPlan::load(plan_path).apply(cfg);
  std::shared_ptr<const kvtrim::EigenBasis> basis;
  if (!basis_path.empty()) basis = std::make_shared<const kvtrim::EigenBasis>(kvtrim::EigenBasis::load(basis_path));
  auto cache = examples::build_cache(conf, cfg.budget, cfg, basis);

  llama2::Transformer tf(ck);
  const std::vector<int> prompt_ids = tok.encode(prompt, true, false);
  int token = prompt_ids[0];
  for (int pos = 0; pos < steps; ++pos) {
    const float* logits = tf.decode(*cache, token, pos);
    int next = 0;
    if (pos + 1 < static_cast<int>(prompt_ids.size())) {
      next = prompt_ids[static_cast<std::size_t>(pos) + 1];
    } else {
      for (int i = 1; i < c.vocab_size; ++i)
        if (logits[i] > logits[next]) next = i;
    }
    if (next == llama2::Tokenizer::kBos) break;
    std::fputs(tok.decode(token, next).c_str(), stdout);
    token = next;
  }
  std::fputs("\n", stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("generate", [&] { return generate(argc, argv); });
}
