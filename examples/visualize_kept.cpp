// visualize_kept: which positions a policy keeps, per KV head, over the decode steps of one window.
//
// One window of text (BOS + window - 1 tokens) is decoded token by token (the stream protocol) with each
// chosen configuration at one budget; after every step the kept positions of each KV head of one layer are
// recorded. The PNG has one panel per (configuration, KV head): x = decode step, y = position; black = kept,
// light grey = evicted, white = not seen yet. A sliding window is a diagonal band, sinks a horizontal line at
// the bottom, heavy hitters scattered horizontal streaks, BUZZ a band with a thinning "beehive" below it.
//   visualize_kept [--policies H2O,TOVA,BUZZ] [--param NAME.key=value] [--budget 64] [--layer 2]
//                  [--window 512] [--skip N] [--out DIR] [--models DIR | --model F --tokenizer F --text F]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/configurations.hpp"
#include "llama2/model.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

namespace {

// kept[h][pos * L + step] for the chosen layer: 2 kept, 1 evicted, 0 not seen yet.
using KeptMap = std::vector<std::vector<unsigned char>>;

KeptMap record(const llama2::Checkpoint& ck, const std::vector<int>& tokens, kvtrim::AnyCache& cache, int layer) {
  const auto& c = ck.config();
  const int L = static_cast<int>(tokens.size());
  llama2::Transformer tf(ck);
  KeptMap kept(static_cast<std::size_t>(c.n_kv_heads), std::vector<unsigned char>(static_cast<std::size_t>(L) * L, 0));
  for (int t = 0; t < L; ++t) {
    tf.decode(cache, tokens[static_cast<std::size_t>(t)], t);
    for (int h = 0; h < c.n_kv_heads; ++h) {
      auto& k = kept[static_cast<std::size_t>(h)];
      for (int p = 0; p <= t; ++p) k[static_cast<std::size_t>(p) * L + t] = 1;
      for (std::int64_t p : cache.positions(layer, h)) k[static_cast<std::size_t>(p) * L + t] = 2;
    }
  }
  return kept;
}

// The configurations this program can draw: a uniform budget, an eviction policy, no calibration.
std::vector<examples::Configuration> drawable() {
  std::vector<examples::Configuration> out;
  for (const auto& c : examples::default_configurations())
    if (c.plan == examples::PlanKind::kUniform && !c.fixed && !examples::needs_basis(c.policy)) out.push_back(c);
  return out;
}

int visualize(int argc, char** argv) {
  cli::Parser p("visualize_kept",
                {{"--models", "DIR", "folder with stories260K.bin, tok512.bin, tinystories_valid_head.txt\n(default $KVTRIM_MODELS, else ../shared/models beside the repository)"},
                 {"--model", "FILE", "llama2.c checkpoint (default DIR/stories260K.bin)"},
                 {"--tokenizer", "FILE", "its tokenizer (default DIR/tok512.bin)"},
                 {"--text", "FILE", "text (default DIR/tinystories_valid_head.txt)"},
                 {"--policies", "a,b,...", "configurations to draw (default H2O,TOVA,BUZZ; any case)"},
                 {"--param", "NAME.key=value", "set a parameter of configuration or policy NAME (repeatable)"},
                 {"--budget", "B", "tokens kept per KV head (default 64)"},
                 {"--layer", "N", "layer to draw (default 2)"},
                 {"--window", "N", "tokens of the window, BOS included (default 512, at most the context)"},
                 {"--skip", "N", "windows of text to skip before the drawn one (default 0)"},
                 {"--out", "DIR", "output folder, relative to the current directory (default out/visualize)"}});
  const char* env = std::getenv("KVTRIM_MODELS");
  std::string dir = env ? env : KVTRIM_EXAMPLES_MODELS_DIR, out = "out/visualize", model, tokenizer, text_path;
  std::vector<std::string> wanted{"H2O", "TOVA", "BUZZ"}, params;
  long long budget = 64, layer = 2, window = 512, skip = 0;
  p.start(argc, argv);
  while (p.next()) {
    if (p.is("--help")) {
      std::fputs(p.help("visualize_kept [options]   kept positions per KV head over one window").c_str(), stdout);
      std::printf("configurations: %s\n", examples::configuration_list(drawable()).c_str());
      return 0;
    } else if (p.is("--models")) dir = p.value();
    else if (p.is("--model")) model = p.value();
    else if (p.is("--tokenizer")) tokenizer = p.value();
    else if (p.is("--text")) text_path = p.value();
    else if (p.is("--policies")) wanted = p.list();
    else if (p.is("--param")) params.push_back(p.value());
    else if (p.is("--budget")) budget = p.integer(1, 1 << 20);
    else if (p.is("--layer")) layer = p.integer(0, 1 << 16);
    else if (p.is("--window")) window = p.integer(2, 1 << 22);
    else if (p.is("--skip")) skip = p.integer(0, 1 << 20);
    else if (p.is("--out")) out = p.value();
  }
  std::vector<examples::Configuration> all = drawable(), chosen;
  for (const std::string& prm : params) examples::apply_param(all, prm);
  for (const std::string& n : wanted) {
    const examples::Configuration* c = examples::find_configuration(all, n);
    if (c == nullptr)
      throw cli::UsageError("--policies: no drawable configuration named '" + n + "'; they are " +
                            examples::configuration_list(all));
    examples::check_settings(*c, budget);
    chosen.push_back(*c);
  }
  if (model.empty()) model = dir + "/stories260K.bin";
  if (tokenizer.empty()) tokenizer = dir + "/tok512.bin";
  if (text_path.empty()) text_path = dir + "/tinystories_valid_head.txt";
  cli::require_file(model, "checkpoint");
  cli::require_file(tokenizer, "tokenizer");
  cli::require_file(text_path, "text");
  const auto ck = llama2::Checkpoint::load(model);
  const auto& c = ck.config();
  const auto tok = llama2::Tokenizer::load(tokenizer, c.vocab_size);
  if (window > c.seq_len)
    throw cli::UsageError("--window: " + std::to_string(window) + " is out of range 2.." + std::to_string(c.seq_len) +
                          " (the model's context)");
  if (layer >= c.n_layers)
    throw cli::UsageError("--layer: " + std::to_string(layer) + " is out of range 0.." + std::to_string(c.n_layers - 1));
  std::ifstream f(text_path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  text.resize(std::min(text.size(), static_cast<std::size_t>(window) * 8 * static_cast<std::size_t>(skip + 1)));
  while (!text.empty() && (static_cast<unsigned char>(text.back()) & 0x80)) text.pop_back();
  const std::vector<int> ids = tok.encode(text, false, false);
  const std::size_t w = static_cast<std::size_t>(window - 1), start = w * static_cast<std::size_t>(skip);
  if (ids.size() < start + w)
    throw cli::UsageError("the text is too short for window " + std::to_string(skip) + " of " + std::to_string(window) +
                          " tokens (lower --skip or --window)");
  std::vector<int> tokens{llama2::Tokenizer::kBos};
  tokens.insert(tokens.end(), ids.begin() + static_cast<std::ptrdiff_t>(start),
                ids.begin() + static_cast<std::ptrdiff_t>(start + w));
  const int L = static_cast<int>(tokens.size());

  out = cli::absolute(out);
  std::filesystem::create_directories(out);
  std::vector<std::string> done;
  for (const examples::Configuration& conf : chosen) {
    std::fprintf(stderr, "visualize_kept: %s, budget %lld, %d steps\n", conf.name.c_str(), budget, L);
    auto cache = examples::build_cache(conf, budget, llama2::cache_config(c, static_cast<int>(budget)));
    const KeptMap kept = record(ck, tokens, *cache, static_cast<int>(layer));
    for (int h = 0; h < c.n_kv_heads; ++h) {
      std::ofstream dat(out + "/kept_" + conf.name + "_h" + std::to_string(h) + ".dat");
      for (int pos = 0; pos < L; ++pos) {
        std::string line;
        line.reserve(static_cast<std::size_t>(2 * L));
        for (int t = 0; t < L; ++t) {
          line += static_cast<char>('0' + kept[static_cast<std::size_t>(h)][static_cast<std::size_t>(pos) * L + t]);
          line += t + 1 < L ? ' ' : '\n';
        }
        dat << line;
      }
    }
    done.push_back(conf.name);
  }

  const std::string png = out + "/kept.png";
  std::ofstream gp(out + "/kept.gp");
  gp << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size " << 380 * c.n_kv_heads + 120 << ","
     << 360 * done.size() + 80 << " font ',10' } else { set terminal png size " << 380 * c.n_kv_heads + 120 << ","
     << 360 * done.size() + 80 << " }\n"
     << "set output '" << png << "'\n"
     << "set palette defined (0 'white', 1 '#d9d9d9', 2 'black')\nset cbrange [0:2]\nunset colorbox\n"
     << "set xrange [-0.5:" << L - 0.5 << "]\nset yrange [-0.5:" << L - 0.5 << "]\nset size ratio -1\n"
     << "set multiplot layout " << done.size() << "," << c.n_kv_heads << " title 'Kept positions (black) per KV "
     << "head of layer " << layer << ", budget " << budget << " of " << L << " tokens; x = decode step, y = "
     << "position'\n";
  for (const auto& name : done)
    for (int h = 0; h < c.n_kv_heads; ++h)
      gp << "set title '" << name << ", KV head " << h << "'\nplot '" << out << "/kept_" << name << "_h" << h
         << ".dat' matrix with image notitle\n";
  gp << "unset multiplot\n";
  gp.close();
  if (std::system(("gnuplot '" + out + "/kept.gp'").c_str()) != 0)
    throw std::runtime_error("gnuplot failed (install gnuplot-nox); data and script are in " + out);
  std::printf("%s\n", png.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run("visualize_kept", [&] { return visualize(argc, argv); });
}
