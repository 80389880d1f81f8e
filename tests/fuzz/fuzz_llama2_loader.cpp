// libFuzzer target: the llama2.c example's loaders (examples/llama2/checkpoint.hpp, tokenizer.hpp) on arbitrary
// bytes. The first byte picks the loader; the rest is written to a file and loaded. Anything but success or
// llama2::LoadError (a kvtrim::Error) is a finding: a crash, a sanitizer report, another exception type
// (std::bad_alloc would mean an allocation driven by the header, not the file size), or a loaded tokenizer that
// cannot encode and decode arbitrary text.
#include <llama2/checkpoint.hpp>
#include <llama2/tokenizer.hpp>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace {
std::string scratch_file() {
  return "/tmp/kvtrim_fuzz_loader_" + std::to_string(::getpid()) + ".bin";
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const int which = data[0] % 2;
  const std::string path = scratch_file();
  std::size_t skip = 1;
  int vocab = 0;
  if (which == 1) {  // tokenizer: 2 more bytes give the checkpoint's vocabulary size
    if (size < 3) return 0;
    // Finding 1 (reported, regression test in test_reliability): a vocabulary smaller than 259 loads, and then
    // encode()'s byte fallback (ids 3..258) reads past it. Past that bug, fuzz vocabularies of 259..4096.
    vocab = 259 + ((data[1] | (data[2] << 8)) % 3838);
    skip = 3;
  }
  if (FILE* fp = std::fopen(path.c_str(), "wb")) {
    if (size > skip) std::fwrite(data + skip, 1, size - skip, fp);
    std::fclose(fp);
  } else {
    return 0;
  }
  try {
    if (which == 0) {
      const auto ck = llama2::Checkpoint::load(path);
      const auto& c = ck.config();
      // Touch both ends of the weights: the slicing must stay inside the buffer.
      volatile float sink = ck.embedding()[0] + ck.rms_final()[c.dim - 1] + ck.wcls()[0] +
                            ck.w3(c.n_layers - 1)[static_cast<std::size_t>(c.hidden_dim) * c.dim - 1];
      (void)sink;
    } else {
      const auto tok = llama2::Tokenizer::load(path, vocab);
      const std::string text(reinterpret_cast<const char*>(data), size < 64 ? size : 64);
      const auto ids = tok.encode(text, true, true);
      int prev = llama2::Tokenizer::kBos;
      for (int id : ids) {
        (void)tok.decode(prev, id);
        prev = id;
      }
    }
  } catch (const kvtrim::Error&) {
    // rejected with a message: fine
  }
  std::remove(path.c_str());
  return 0;
}
