// visualize_kept: which positions a policy keeps, per KV head, over the decode steps of one window.
//
// One window of text (BOS + window - 1 tokens) is decoded token by token (the stream protocol) with each
// chosen policy at one budget; after every step the kept positions of each KV head of one layer are recorded.
// The PNG has one panel per (policy, KV head): x = decode step, y = position; black = kept, light grey =
// evicted, white = not seen yet. A sliding window is a diagonal band, sinks a horizontal line at the bottom,
// heavy hitters scattered horizontal streaks, BUZZ a band with a thinning "beehive" below it.
//   visualize_kept [--models DIR] [--policies H2O,TOVA,BUZZ] [--budget 64] [--layer 2] [--window 512]
//                  [--skip N] [--out DIR]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "llama2/model.hpp"
#include "llama2/registry.hpp"

#ifndef KVTRIM_EXAMPLES_MODELS_DIR
#define KVTRIM_EXAMPLES_MODELS_DIR "../shared/models"
#endif

namespace {

// kept[h][pos * L + step] for the chosen layer: 2 kept, 1 evicted, 0 not seen yet.
using KeptMap = std::vector<std::vector<unsigned char>>;

template <class P>
KeptMap record(const llama2::Checkpoint& ck, const std::vector<int>& tokens, const typename P::Params& params,
               int budget, int layer) {
  const auto& c = ck.config();
  const int L = static_cast<int>(tokens.size());
  kvtrim::KVCache<P> cache(llama2::cache_config(c, budget), params);
  llama2::Transformer tf(ck);
  KeptMap kept(static_cast<std::size_t>(c.n_kv_heads), std::vector<unsigned char>(static_cast<std::size_t>(L) * L, 0));
  for (int t = 0; t < L; ++t) {
    tf.decode(cache, tokens[t], t);
    for (int h = 0; h < c.n_kv_heads; ++h) {
      auto& k = kept[h];
      for (int p = 0; p <= t; ++p) k[static_cast<std::size_t>(p) * L + t] = 1;
      for (std::int64_t p : cache.positions(layer, h)) k[static_cast<std::size_t>(p) * L + t] = 2;
    }
  }
  return kept;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("KVTRIM_MODELS");
  std::string dir = env ? env : KVTRIM_EXAMPLES_MODELS_DIR, out = "out/visualize";
  std::vector<std::string> wanted{"H2O", "TOVA", "BUZZ"};
  int budget = 64, layer = 2, window = 512, skip = 0;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw kvtrim::Error("option " + a + " needs a value");
        return argv[++i];
      };
      if (a == "--models") dir = value();
      else if (a == "--policies") wanted = split(value());
      else if (a == "--budget") budget = std::stoi(value());
      else if (a == "--layer") layer = std::stoi(value());
      else if (a == "--window") window = std::stoi(value());
      else if (a == "--skip") skip = std::stoi(value());
      else if (a == "--out") out = value();
      else {
        std::puts("visualize_kept [--models DIR] [--policies H2O,TOVA,BUZZ] [--budget 64] [--layer 2] [--window 512]\n"
                  "               [--skip N (windows to skip in the text)] [--out DIR]");
        return a == "--help" || a == "-h" ? 0 : 2;
      }
    }
    const std::string model = dir + "/stories260K.bin", tokenizer = dir + "/tok512.bin",
                      text_path = dir + "/tinystories_valid_head.txt";
    for (const std::string& f : {model, tokenizer, text_path})
      if (!std::filesystem::exists(f)) {
        std::fprintf(stderr,
                     "visualize_kept: %s not found. Get stories260K.bin and tok512.bin from "
                     "huggingface.co/karpathy/tinyllamas (stories260K) and pass their folder with --models DIR.\n",
                     f.c_str());
        return 2;
      }
    const auto ck = llama2::Checkpoint::load(model);
    const auto& c = ck.config();
    const auto tok = llama2::Tokenizer::load(tokenizer, c.vocab_size);
    KVTRIM_CHECK(window >= 2 && window <= c.seq_len, "--window ", window, " must be in 2..", c.seq_len);
    KVTRIM_CHECK(layer >= 0 && layer < c.n_layers, "--layer ", layer, " must be in 0..", c.n_layers - 1);
    KVTRIM_CHECK(skip >= 0, "--skip must be >= 0");
    std::ifstream f(text_path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    text.resize(std::min(text.size(), static_cast<std::size_t>(window) * 8 * (skip + 1)));  // ~2 bytes per token
    while (!text.empty() && (static_cast<unsigned char>(text.back()) & 0x80)) text.pop_back();
    const std::vector<int> ids = tok.encode(text, false, false);
    const std::size_t w = static_cast<std::size_t>(window - 1), start = w * static_cast<std::size_t>(skip);
    KVTRIM_CHECK(ids.size() >= start + w, "the text is too short for window ", skip, " of ", window, " tokens");
    std::vector<int> tokens{llama2::Tokenizer::kBos};
    tokens.insert(tokens.end(), ids.begin() + static_cast<std::ptrdiff_t>(start),
                  ids.begin() + static_cast<std::ptrdiff_t>(start + w));
    const int L = static_cast<int>(tokens.size());

    std::filesystem::create_directories(out);
    std::vector<std::string> done;
    llama2::RegistryInputs none;  // calibrated entries (Eigen) are not drawn here
    llama2::for_each_policy(none, [&]<class P>(std::type_identity<P>, const char* name, auto make,
                                               llama2::EntryFlags flags) {
      bool want = false;
      for (const auto& n : wanted) want |= n == name;
      if (!want || flags.calibrated || flags.fixed_budget) return;
      std::fprintf(stderr, "visualize_kept: %s, budget %d, %d steps\n", name, budget, L);
      const KeptMap kept = record<P>(ck, tokens, make(budget), budget, layer);
      for (int h = 0; h < c.n_kv_heads; ++h) {
        std::ofstream dat(out + "/kept_" + name + "_h" + std::to_string(h) + ".dat");
        for (int p = 0; p < L; ++p) {
          std::string line;
          line.reserve(static_cast<std::size_t>(2 * L));
          for (int t = 0; t < L; ++t) {
            line += static_cast<char>('0' + kept[h][static_cast<std::size_t>(p) * L + t]);
            line += t + 1 < L ? ' ' : '\n';
          }
          dat << line;
        }
      }
      done.push_back(name);
    });
    for (const auto& n : wanted)
      if (std::find(done.begin(), done.end(), n) == done.end())
        std::fprintf(stderr, "visualize_kept: '%s' is not a registered evicting policy (skipped)\n", n.c_str());
    KVTRIM_CHECK(!done.empty(), "no policy to draw");

    const std::string png = out + "/kept.png";
    std::ofstream gp(out + "/kept.gp");
    gp << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size " << 380 * c.n_kv_heads + 120
       << "," << 360 * done.size() + 80 << " font ',10' } else { set terminal png size " << 380 * c.n_kv_heads + 120
       << "," << 360 * done.size() + 80 << " }\n"
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
    if (std::system(("gnuplot '" + out + "/kept.gp'").c_str()) != 0) {
      std::fprintf(stderr, "visualize_kept: gnuplot failed (install gnuplot-nox); data and script are in %s\n",
                   out.c_str());
      return 1;
    }
    std::printf("%s\n", png.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "visualize_kept: %s\n", e.what());
    return 1;
  }
}
