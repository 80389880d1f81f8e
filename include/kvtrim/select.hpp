// kvtrim: the selection rule every backend applies to a policy's scores.
//
// Convention: a policy scores every slot by how much it deserves to stay (higher = keep). The victim is the
// unprotected slot with the lowest score; among equal scores the oldest position goes first, so decisions never
// depend on slot order or on the order in which a parallel reduction meets the candidates. NaN cannot reach a
// score: the cache rejects non-finite inputs (with check_finite off, a NaN score compares false and is simply
// never preferred).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.hpp"

namespace kvtrim {

// Tokens that are never evicted: the first `sinks` positions of the sequence and the `recent` newest ones.
struct Protection {
  int sinks = 0;
  int recent = 0;
  KVTRIM_HOST_DEVICE bool protects(std::int64_t pos, std::int64_t newest) const {
    return (pos < sinks) | (pos > newest - recent);  // no short circuit: a branch-free test the loops vectorise
  }
};

// true for the first `limit` calls with the same counter (e.g. marking the first tokens of a sequence as sinks).
KVTRIM_HOST_DEVICE inline bool take_first(int& taken, int limit) {
  if (taken >= limit) return false;
  ++taken;
  return true;
}

// true when slot a should be evicted before slot b.
KVTRIM_HOST_DEVICE inline bool evicts_before(float score_a, std::int64_t pos_a, float score_b, std::int64_t pos_b) {
  return score_a < score_b || (score_a == score_b && pos_a < pos_b);
}

// A candidate victim: slot < 0 means "no candidate" (every slot seen so far was protected).
struct VictimKey {
  float score = 0.0f;
  std::int64_t pos = 0;
  int slot = -1;
};

// The candidate that should be evicted first of a and b; associative and commutative because positions within a
// head are unique, so a tree reduction in any order finds the same slot as a sequential scan.
KVTRIM_HOST_DEVICE inline VictimKey better_victim(const VictimKey& a, const VictimKey& b) {
  if (a.slot < 0) return b;
  if (b.slot < 0) return a;
  return evicts_before(b.score, b.pos, a.score, a.pos) ? b : a;
}

// Sort key of a prompt token: ascending keys = evict first. The high 32 bits are the score mapped to an unsigned
// integer of the same order (-0 and +0 equal, as operator< sees them), the low 32 bits the token index, which is
// the position order of the prompt; so one sort of unique keys reproduces evicts_before (lowest score, oldest on
// ties) with no reliance on sort stability. Protected tokens get +inf; a NaN score (non-finite inputs with
// check_finite off) counts as -inf, so it can never outrank a protected token.
KVTRIM_HOST_DEVICE inline std::uint32_t ordered_bits(float s) {
  s = s + 0.0f;  // -0 -> +0
#if defined(__CUDA_ARCH__)
  const std::uint32_t u = __float_as_uint(s);
#else
  std::uint32_t u;
  std::memcpy(&u, &s, sizeof u);
#endif
  // negative: flip every bit; otherwise set the sign bit (branch-free, so loops over slots vectorise)
  return u ^ (static_cast<std::uint32_t>(static_cast<std::int32_t>(u) >> 31) | 0x80000000u);
}
KVTRIM_HOST_DEVICE inline std::uint64_t prompt_sort_key(float score, int token) {
  const float s = score != score ? -INFINITY : score;
  return (static_cast<std::uint64_t>(ordered_bits(s)) << 32) | static_cast<std::uint32_t>(token);
}
KVTRIM_HOST_DEVICE inline int sort_key_token(std::uint64_t key) { return static_cast<int>(key & 0xffffffffu); }
KVTRIM_HOST_DEVICE inline bool sort_key_protected(std::uint64_t key) {
  return static_cast<std::uint32_t>(key >> 32) == ordered_bits(INFINITY);
}

}  // namespace kvtrim
