// kvtrim: the pieces of kvtrim's small binary file formats (Eigen Attention bases, budget plans).
//
// Integers little-endian, an FNV-1a 64-bit checksum of everything before it at the end, and whole-file read and
// write that turn I/O failures into kvtrim::Error naming the file. Each format validates its own fields.
#pragma once

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "error.hpp"

namespace kvtrim::bytes {

inline void put_u32(std::vector<unsigned char>& b, std::size_t& at, std::uint32_t x) {
  for (int i = 0; i < 4; ++i) b[at++] = static_cast<unsigned char>(x >> (8 * i));
}
inline void put_u64(std::vector<unsigned char>& b, std::size_t& at, std::uint64_t x) {
  for (int i = 0; i < 8; ++i) b[at++] = static_cast<unsigned char>(x >> (8 * i));
}
inline std::uint32_t get_u32(std::span<const unsigned char> b, std::size_t& at) {
  std::uint32_t x = 0;
  for (int i = 0; i < 4; ++i) x |= static_cast<std::uint32_t>(b[at + i]) << (8 * i);
  at += 4;
  return x;
}
inline std::uint64_t get_u64(std::span<const unsigned char> b, std::size_t& at) {
  std::uint64_t x = 0;
  for (int i = 0; i < 8; ++i) x |= static_cast<std::uint64_t>(b[at + i]) << (8 * i);
  at += 8;
  return x;
}
inline std::uint64_t fnv1a64(const unsigned char* p, std::size_t n) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

// Writes `data` to `path` (replacing it); `who` names the caller in errors ("EigenBasis::save").
inline void write_file(const std::string& path, const std::vector<unsigned char>& data, std::string_view who) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  KVTRIM_CHECK(f.good(), who, ": cannot open '", path, "' for writing");
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  f.flush();
  KVTRIM_CHECK(f.good(), who, ": writing '", path, "' failed");
}

// The whole file, then parse(bytes); a parse error is rethrown with the file's name in front.
template <class Parse>
auto read_file(const std::string& path, std::string_view who, Parse&& parse) {
  std::ifstream f(path, std::ios::binary);
  KVTRIM_CHECK(f.good(), who, ": cannot open '", path, "'");
  std::vector<unsigned char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  KVTRIM_CHECK(!f.bad(), who, ": reading '", path, "' failed");
  try {
    return parse(std::span<const unsigned char>(data));
  } catch (const Error& e) {
    detail::throw_error(who, "('", path, "'): ", std::string_view(e.what()).substr(8));  // without "kvtrim: "
  }
}

}  // namespace kvtrim::bytes
