// kvtrim: what a policy asks of the backend, and when it evicts.
#pragma once

#include <array>
#include <cstdint>

#include "params.hpp"

namespace kvtrim {

// Inputs a policy needs besides keys and values. The backend produces only what is asked for: attention
// probabilities cost nothing extra on the CPU (they are the softmax of the same step) but a GPU kernel
// must write them out, so a policy that does not need them says so.
enum class Signals : std::uint32_t {
  kNone = 0,
  kAttention = 1u << 0,  // per-slot attention probabilities of the step (decode) / column sums (prefill)
  kQuery = 1u << 1,      // the new token's queries before attention (e.g. to hash them as a probe)
};

constexpr Signals operator|(Signals a, Signals b) {
  return static_cast<Signals>(static_cast<std::uint32_t>(a) | static_cast<std::uint32_t>(b));
}
constexpr bool has(Signals set, Signals flag) {
  return (static_cast<std::uint32_t>(set) & static_cast<std::uint32_t>(flag)) != 0;
}

// When a decode step makes room for the new token.
//  kAfterAttention:  the new token joins the cache, attention runs over budget + 1 slots, then the policy
//                    evicts (score-based policies: they score with this step's attention).
//  kBeforeAttention: the policy evicts before attention, so the step attends only to what is kept
//                    (a policy that predicts the victim from the new token, before it attends).
enum class EvictTiming { kAfterAttention, kBeforeAttention };

// How the scores of the query heads that share one KV head (GQA) become one score per KV slot.
enum class GroupReduce { kMean, kSum, kMax };
constexpr auto enum_names(GroupReduce) {
  return std::array{EnumName<GroupReduce>{GroupReduce::kMean, "mean"}, EnumName<GroupReduce>{GroupReduce::kSum, "sum"},
                    EnumName<GroupReduce>{GroupReduce::kMax, "max"}};
}

}  // namespace kvtrim
