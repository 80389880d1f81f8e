// kvtrim CUDA backend: the arithmetic the kernels share with host code, written once.
//
// Everything here is KVTRIM_HOST_DEVICE and free of CUDA headers, so the host tests (compiled by the host
// compiler) check the same functions the kernels run:
//  - SoftmaxPartial / merge: the flash-decoding combine of per-split (max, sum of exp) pairs;
//  - VictimKey / better_victim: the masked arg-min reduction, built on select.hpp's evicts_before (lowest
//    score first, oldest position on ties), so the device picks the same victim as lowest_unprotected in
//    whatever order the parallel reduction meets the candidates;
//  - plan_splits: how many sequence splits the decode kernel uses for a head's capacity.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <kvtrim/macros.hpp>
#include <kvtrim/select.hpp>

namespace kvtrim::gpu {

// Running softmax statistics of one query over a subset of slots: m = max logit, l = sum exp(logit - m).
// An empty subset is {-inf, 0}.
struct SoftmaxPartial {
  float m = -INFINITY;
  float l = 0.0f;
};

// Weight that rescales a partial with max m_part to the common max m_all (0 for an empty partial).
KVTRIM_HOST_DEVICE inline float rescale_weight(float m_part, float m_all) {
  return m_part == -INFINITY ? 0.0f : ::expf(m_part - m_all);
}

// Combines two partials (order-independent up to rounding).
KVTRIM_HOST_DEVICE inline SoftmaxPartial merge(SoftmaxPartial a, SoftmaxPartial b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {};
  return {m, a.l * rescale_weight(a.m, m) + b.l * rescale_weight(b.m, m)};
}

// A candidate victim: slot < 0 means "no candidate" (every slot seen so far was protected).
struct VictimKey {
  float score = 0.0f;
  std::int64_t pos = 0;
  int slot = -1;
};

// The candidate that should be evicted first of a and b; associative and commutative because positions
// within a head are unique, so a tree reduction in any order finds the same slot as a sequential scan.
KVTRIM_HOST_DEVICE inline VictimKey better_victim(const VictimKey& a, const VictimKey& b) {
  if (a.slot < 0) return b;
  if (b.slot < 0) return a;
  return evicts_before(b.score, b.pos, a.score, a.pos) ? b : a;
}

// Sort key of a prompt token for the device selection: ascending keys = evict first. The high 32 bits are the
// score mapped to an unsigned integer of the same order (-0 and +0 equal, as operator< sees them), the low 32
// bits the token index, which is the position order of the prompt; so one radix sort of unique keys reproduces
// evicts_before (lowest score, oldest on ties) with no reliance on sort stability. Protected tokens get +inf.
KVTRIM_HOST_DEVICE inline std::uint32_t ordered_bits(float s) {
  s = s + 0.0f;  // -0 -> +0
#if defined(__CUDA_ARCH__)
  const std::uint32_t u = __float_as_uint(s);
#else
  std::uint32_t u;
  std::memcpy(&u, &s, sizeof u);
#endif
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}
KVTRIM_HOST_DEVICE inline std::uint64_t prompt_sort_key(float score, int token) {
  return (static_cast<std::uint64_t>(ordered_bits(score)) << 32) | static_cast<std::uint32_t>(token);
}
KVTRIM_HOST_DEVICE inline int sort_key_token(std::uint64_t key) { return static_cast<int>(key & 0xffffffffu); }
KVTRIM_HOST_DEVICE inline bool sort_key_protected(std::uint64_t key) {
  return static_cast<std::uint32_t>(key >> 32) == ordered_bits(INFINITY);
}

// Slots per split of the decode kernel and the number of splits for a capacity.
inline constexpr int kDecodeChunk = 256;
KVTRIM_HOST_DEVICE inline int plan_splits(int capacity) { return (capacity + kDecodeChunk - 1) / kDecodeChunk; }

// Largest tile of query heads (8, 4, 2 or 1) that divides the group: one block reads each key once per tile.
KVTRIM_HOST_DEVICE inline int group_tile(int group) {
  return group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}

}  // namespace kvtrim::gpu
