// kvtrim CUDA backend: the arithmetic the kernels share with host code, written once.
//
// Everything here is KVTRIM_HOST_DEVICE and free of CUDA headers, so the host tests (compiled by the host
// compiler) check the same functions the kernels run:
//  - SoftmaxPartial / merge: the flash-decoding combine of per-split (max, sum of exp) pairs;
//  - plan_splits / group_tile: how the decode kernel splits a head's capacity and tiles a query group.
// The selection rule itself (VictimKey, better_victim, prompt sort keys) is the library's: kvtrim/select.hpp.
#pragma once

#include <cmath>
#include <cstdint>

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

// Slots per split of the decode kernel and the number of splits for a capacity.
inline constexpr int kDecodeChunk = 256;
KVTRIM_HOST_DEVICE inline int plan_splits(int capacity) { return (capacity + kDecodeChunk - 1) / kDecodeChunk; }

// Largest tile of query heads (8, 4, 2 or 1) that divides the group: one block reads each key once per tile.
KVTRIM_HOST_DEVICE inline int group_tile(int group) {
  return group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}

}  // namespace kvtrim::gpu
