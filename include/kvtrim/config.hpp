// kvtrim: cache shape and budgets.
#pragma once

// kvtrim is C++20 (std::span, concepts, designated initialisers). Older modes get one message instead of
// an error at every use; the missing header after it is a fatal error, so the compiler stops there.
#if !(__cplusplus >= 202002L || (defined(_MSVC_LANG) && _MSVC_LANG >= 202002L))
#error "kvtrim needs C++20: compile with -std=c++20 (MSVC: /std:c++20); in CMake, link kvtrim::kvtrim, which asks for cxx_std_20"
#include <kvtrim_needs_cpp20>
#endif

#include <cstddef>
#include <cstdint>
#include <vector>

#include "error.hpp"

namespace kvtrim {

// Shape of the attention the cache serves, and how many tokens each (layer, KV head) may keep.
struct CacheConfig {
  int n_layers = 0;
  int n_kv_heads = 0;
  int n_q_heads = 0;  // a multiple of n_kv_heads; query head h reads KV head h / (n_q_heads / n_kv_heads)
  int head_dim = 0;
  int budget = 0;  // tokens kept per (layer, KV head) unless head_budgets overrides it
  // Optional per-(layer, KV head) budgets, layer-major (index layer * n_kv_heads + head). Empty: all use `budget`.
  std::vector<int> head_budgets;
  // Reject NaN/Inf in q, k, v (one pass over the inputs, O(d) per head and step). Turning it off is the
  // caller's promise that inputs are finite.
  bool check_finite = true;
  // Threads that process the KV heads of a call in parallel (CPU backend); results are identical for any
  // value. 1 (default): the calling thread only.
  int threads = 1;
  // Slots beyond budget + 1 that each head reserves for append()/verify() chunks of more than one token. The
  // CPU backend grows a head on demand instead (and gives the memory back after the chunk); the CUDA backend
  // allocates once, so it accepts chunks of at most 1 + chunk_capacity tokens.
  int chunk_capacity = 0;

  int group_size() const { return n_q_heads / n_kv_heads; }

  int budget_of(int layer, int kv_head) const {
    return head_budgets.empty() ? budget
                                : head_budgets[static_cast<std::size_t>(layer) * n_kv_heads + kv_head];
  }

  void validate() const {
    KVTRIM_CHECK(n_layers > 0, "CacheConfig.n_layers must be > 0, got ", n_layers);
    KVTRIM_CHECK(n_kv_heads > 0, "CacheConfig.n_kv_heads must be > 0, got ", n_kv_heads);
    KVTRIM_CHECK(n_q_heads > 0, "CacheConfig.n_q_heads must be > 0, got ", n_q_heads);
    KVTRIM_CHECK(n_q_heads % n_kv_heads == 0, "CacheConfig.n_q_heads (", n_q_heads,
                 ") must be a multiple of n_kv_heads (", n_kv_heads, ") for grouped-query attention");
    KVTRIM_CHECK(head_dim > 0, "CacheConfig.head_dim must be > 0, got ", head_dim);
    // Upper bounds far above any real model keep every size computation inside its integer type.
    constexpr int kMaxCount = 1 << 16, kMaxBudget = 1 << 28;
    KVTRIM_CHECK(n_layers <= kMaxCount && n_q_heads <= kMaxCount && head_dim <= kMaxCount,
                 "CacheConfig: n_layers (", n_layers, "), n_q_heads (", n_q_heads, ") and head_dim (", head_dim,
                 ") must each be <= ", kMaxCount);
    KVTRIM_CHECK(threads >= 1, "CacheConfig.threads must be >= 1 (1 = the calling thread only), got ", threads);
    KVTRIM_CHECK(chunk_capacity >= 0 && chunk_capacity <= kMaxBudget, "CacheConfig.chunk_capacity must be in 0..",
                 kMaxBudget, ", got ", chunk_capacity);
    if (head_budgets.empty()) {
      KVTRIM_CHECK(budget > 0 && budget <= kMaxBudget, "CacheConfig.budget must be in 1..", kMaxBudget,
                   " tokens, got ", budget);
    } else {
      const std::size_t want = static_cast<std::size_t>(n_layers) * n_kv_heads;
      KVTRIM_CHECK(head_budgets.size() == want, "CacheConfig.head_budgets must have n_layers * n_kv_heads = ",
                   want, " entries (layer-major), got ", head_budgets.size());
      for (std::size_t i = 0; i < want; ++i)
        KVTRIM_CHECK(head_budgets[i] > 0 && head_budgets[i] <= kMaxBudget, "CacheConfig.head_budgets[", i,
                     "] (layer ", i / n_kv_heads, ", KV head ", i % n_kv_heads, ") must be in 1..", kMaxBudget,
                     " tokens, got ", head_budgets[i]);
    }
  }
};

// What a policy is told about the layer it serves when it is constructed (one policy object per layer).
struct LayerContext {
  int layer = 0;
  int n_layers = 0;
  int n_kv_heads = 0;
  int group = 1;  // query heads per KV head
  int head_dim = 0;
  std::vector<int> budgets;  // per KV head of this layer
  int min_budget() const {
    int m = budgets.empty() ? 0 : budgets[0];
    for (int b : budgets) m = b < m ? b : m;
    return m;
  }
};

}  // namespace kvtrim
