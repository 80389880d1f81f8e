// Greedy generation with a llama2.c checkpoint and a kvtrim cache.
//   generate [--model PATH] [--tokenizer PATH] [--steps N] [--budget B] [--policy full|streaming] [prompt]
// With the default full cache and no prompt this prints the same text as llama2.c's
// `run stories260K.bin -z tok512.bin -t 0.0 -n 200`.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "llama2/model.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

template <class Cache>
int run(const llama2::Checkpoint& ck, const llama2::Tokenizer& tok, Cache& cache, const std::string& prompt,
        int steps) {
  llama2::Transformer tf(ck);
  const std::vector<int> prompt_ids = tok.encode(prompt, true, false);
  int token = prompt_ids[0];
  for (int pos = 0; pos < steps; ++pos) {
    const float* logits = tf.decode(cache, token, pos);
    int next = 0;
    if (pos + 1 < static_cast<int>(prompt_ids.size())) {
      next = prompt_ids[pos + 1];
    } else {
      for (int i = 1; i < ck.config().vocab_size; ++i)
        if (logits[i] > logits[next]) next = i;
    }
    if (next == llama2::Tokenizer::kBos) break;
    std::fputs(tok.decode(token, next).c_str(), stdout);
    token = next;
  }
  std::fputs("\n", stdout);
  return 0;
}

int main(int argc, char** argv) {
  std::string dir = KVTRIM_EXAMPLES_MODELS_DIR;
  if (const char* env = std::getenv("KVTRIM_MODELS")) dir = env;
  std::string model = dir + "/stories260K.bin", tokenizer = dir + "/tok512.bin", prompt, policy = "full";
  int steps = 200, budget = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "generate: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") model = value();
    else if (a == "--tokenizer") tokenizer = value();
    else if (a == "--steps") steps = std::stoi(value());
    else if (a == "--budget") budget = std::stoi(value());
    else if (a == "--policy") policy = value();
    else if (a == "--help" || a == "-h") {
      std::puts("generate [--model PATH] [--tokenizer PATH] [--steps N] [--budget B] [--policy full|streaming] [prompt]");
      return 0;
    } else prompt = a;
  }
  try {
    const auto ck = llama2::Checkpoint::load(model);
    const auto tok = llama2::Tokenizer::load(tokenizer, ck.config().vocab_size);
    if (steps <= 0 || steps > ck.config().seq_len) steps = ck.config().seq_len;
    if (budget <= 0) budget = steps;
    const auto cfg = llama2::cache_config(ck.config(), budget);
    if (policy == "streaming") {
      kvtrim::KVCache<kvtrim::StreamingLLM> cache(cfg, {.sinks = 4});
      return run(ck, tok, cache, prompt, steps);
    }
    kvtrim::KVCache<kvtrim::FullCache> cache(llama2::cache_config(ck.config(), steps));
    return run(ck, tok, cache, prompt, steps);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate: %s\n", e.what());
    return 1;
  }
}
