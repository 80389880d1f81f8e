// llama2.c tokenizer: byte-pair encoding by merge scores, with byte fallback.
//
// File layout: int32 max_token_length, then for each of the model's vocab_size tokens: float32 score,
// int32 length, `length` bytes. The vocabulary size is not in the file; it comes from the checkpoint.
// Conventions (as in llama2.c's run.c): id 1 is BOS, id 2 is EOS, ids 3..258 are the byte tokens
// <0x00>..<0xFF>; encode() adds a leading " " (sentencepiece's dummy prefix) to non-empty text, looks up
// each UTF-8 code point (falling back to its bytes), then repeatedly merges the adjacent pair whose
// concatenation is the vocabulary entry with the highest score (first such pair on ties).
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "checkpoint.hpp"

namespace llama2 {

class Tokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;

  static Tokenizer load(const std::string& path, int vocab_size) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      throw LoadError("llama2 tokenizer " + path + ": is a directory, not a tokenizer file");
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f)
      throw LoadError("llama2 tokenizer " + path +
                      ": cannot open the file (use the tokenizer that belongs to the checkpoint: tok512.bin for "
                      "stories260K, tokenizer.bin from karpathy/llama2.c for stories15M/42M/110M)");
    const std::streamoff size = f.tellg();
    f.seekg(0);
    auto fail = [&](const std::string& why) { throw LoadError("llama2 tokenizer " + path + ": " + why); };
    // Byte fallback addresses ids 3..258, so a smaller vocabulary could not encode arbitrary text.
    if (vocab_size < 259)
      fail("vocab_size must be >= 259 (ids 3..258 are the byte tokens <0x00>..<0xFF>), got " +
           std::to_string(vocab_size));
    std::int32_t max_len = 0;
    if (!f.read(reinterpret_cast<char*>(&max_len), 4)) fail("shorter than the 4-byte header");
    if (max_len <= 0 || max_len > 1 << 16) fail("max_token_length " + std::to_string(max_len) + " out of 1..65536");
    Tokenizer t;
    t.vocab_.resize(static_cast<std::size_t>(vocab_size));
    t.scores_.resize(static_cast<std::size_t>(vocab_size));
    for (int i = 0; i < vocab_size; ++i) {
      float score = 0;
      std::int32_t len = 0;
      if (!f.read(reinterpret_cast<char*>(&score), 4) || !f.read(reinterpret_cast<char*>(&len), 4))
        fail("truncated at token " + std::to_string(i) + " of " + std::to_string(vocab_size) +
             " (does the tokenizer belong to this checkpoint?)");
      if (len < 0 || len > max_len)
        fail("token " + std::to_string(i) + " has length " + std::to_string(len) + ", outside 0..max_token_length " +
             std::to_string(max_len));
      std::string s(static_cast<std::size_t>(len), '\0');
      if (len > 0 && !f.read(s.data(), len)) fail("truncated inside token " + std::to_string(i));
      t.scores_[i] = score;
      t.vocab_[i] = std::move(s);
    }
    if (static_cast<std::streamoff>(f.tellg()) != size)
      fail(std::to_string(size - static_cast<std::streamoff>(f.tellg())) + " bytes left after " +
           std::to_string(vocab_size) + " tokens: the tokenizer's vocabulary is larger than the checkpoint's");
    for (int i = vocab_size - 1; i >= 0; --i) t.index_[t.vocab_[i]] = i;  // lowest id wins on duplicates
    t.newline_splits_ = true;
    for (int i = 0; i < vocab_size; ++i)
      if (i != kBos && i != kEos && t.vocab_[i].find('\n') != std::string::npos) t.newline_splits_ = false;
    return t;
  }

  int vocab_size() const { return static_cast<int>(vocab_.size()); }
  const std::string& piece(int id) const { return vocab_.at(static_cast<std::size_t>(id)); }
  float score(int id) const { return scores_.at(static_cast<std::size_t>(id)); }

  // Id of an exact vocabulary entry, or -1.
  int lookup(std::string_view s) const {
    auto it = index_.find(std::string(s));
    return it == index_.end() ? -1 : it->second;
  }

  std::vector<int> encode(std::string_view text, bool bos, bool eos) const {
    std::vector<int> out;
    if (bos) out.push_back(kBos);
    if (!text.empty()) {
      const int space = lookup(" ");
      if (space >= 0) out.push_back(space);
    }
    // Code points (or their bytes) first.
    std::vector<int> ids;
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;
      const auto c = static_cast<unsigned char>(text[i]);
      if ((c & 0xE0) == 0xC0) n = 2;
      else if ((c & 0xF0) == 0xE0) n = 3;
      else if ((c & 0xF8) == 0xF0) n = 4;
      if (i + n > text.size()) n = 1;
      for (std::size_t j = 1; j < n; ++j)
        if ((static_cast<unsigned char>(text[i + j]) & 0xC0) != 0x80) n = 1;  // malformed: bytes one by one
      const int id = lookup(text.substr(i, n));
      if (id >= 0) {
        ids.push_back(id);
      } else {
        for (std::size_t j = 0; j < n; ++j) ids.push_back(static_cast<unsigned char>(text[i + j]) + 3);
      }
      i += n;
    }
    // The dummy prefix takes part in merges like any other token.
    if (!text.empty() && !out.empty() && out.back() != kBos) {
      ids.insert(ids.begin(), out.back());
      out.pop_back();
    }
    // Merges. No vocabulary entry contains a newline (checked at load), so no merge can cross one and each
    // line can be merged on its own: same result as merging the whole text, without the quadratic cost.
    std::size_t start = 0;
    const int newline = lookup("\n") >= 0 ? lookup("\n") : '\n' + 3;
    for (std::size_t i = 0; i <= ids.size(); ++i) {
      if (i < ids.size() && (!newline_splits_ || ids[i] != newline)) continue;
      std::vector<int> seg(ids.begin() + static_cast<std::ptrdiff_t>(start), ids.begin() + static_cast<std::ptrdiff_t>(i));
      merge(seg);
      out.insert(out.end(), seg.begin(), seg.end());
      if (i < ids.size()) out.push_back(ids[i]);
      start = i + 1;
    }
    if (eos) out.push_back(kEos);
    return out;
  }

  // Text of `token` following `prev` (the leading space after BOS is dropped; byte tokens become bytes).
  std::string decode(int prev, int token) const {
    std::string_view p = piece(token);
    if (prev == kBos && !p.empty() && p[0] == ' ') p.remove_prefix(1);
    if (p.size() == 6 && p.substr(0, 3) == "<0x" && p[5] == '>') {
      auto hex = [](char ch) {
        return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
      };
      const int hi = hex(p[3]), lo = hex(p[4]);
      if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
    }
    return std::string(p);
  }

 private:
  void merge(std::vector<int>& ids) const {
    std::string buf;
    while (ids.size() >= 2) {
      float best = -1e10f;
      int best_id = -1;
      std::size_t best_at = 0;
      for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
        buf = vocab_[ids[i]];
        buf += vocab_[ids[i + 1]];
        const auto it = index_.find(buf);
        if (it != index_.end() && scores_[it->second] > best) {
          best = scores_[it->second];
          best_id = it->second;
          best_at = i;
        }
      }
      if (best_id < 0) break;
      ids[best_at] = best_id;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
  }

  std::vector<std::string> vocab_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> index_;
  bool newline_splits_ = false;
};

}  // namespace llama2
