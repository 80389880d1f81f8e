// kvtrim CUDA backend: the kernels.
//
// Storage per (layer, KV head) is one DevHead record in device memory: key and value rows in the storage type
// T (float, __half or __nv_bfloat16), positions, the policy's SlotMeta, and the mutable part (slot count,
// newest position, eviction count, the policy's State). Kernels take the records of one layer and put one
// block (or one grid row) on each KV head, so a decode step is a handful of launches for the whole layer and
// the host never reads anything back. Every decision is a call to the policy's own rules (policy.hpp); the
// kernels are generic and know no policy.
//
//  simhash_kernel        SimHash codes of keys and queries (kSimHash policies), one thread per bit
//  append_kernel         new token -> slot n (fp32 -> T), position, SlotMeta{}, the policy's on_insert
//  evict_kernel          while n > limit: masked arg-min over the slots (protected skipped, lowest score,
//                        oldest position on ties, select.hpp's rule), last slot moves into the hole
//  merge_evict_kernel    kMerges policies: head statistics, the lowest-scored unprotected victim, its most
//                        similar absorbing slot by key cosine, a weighted merge of the rows, then removal
//  fit_kernel            structured eviction (kStructured policies, BUZZ): fit_key / fit_slot for every slot,
//                        then survivors at or above the kept count move into the holes below it
//  decode_split_kernel   pass 1 of flash-decoding: block = (split of kDecodeChunk slots, KV head, tile of G
//                        query heads); every key/value row is read once for the G queries (GQA), 4-wide
//                        vector loads, kRows rows in flight per warp, fp32 math; writes (max, sum exp, unnormalised output) per split and,
//                        when the policy needs them, the raw logits of each slot
//  decode_combine_kernel pass 2: merges the splits into the output (and the softmax statistics)
//  probs_kernel          logits -> probabilities exp(s - m) / l in place (only for kAttention policies)
//  on_attention_kernel   the policy's on_attention per slot with the step's group-reduced probability
//  prompt_*              prefill: causal softmax of cuBLAS scores (with column / window sums), per-token
//                        metadata and scores, keep marks from a stable sort, compaction into the slots
#pragma once

// Eigen serves only the host side of kvtrim; under nvcc its device annotations would be compiled (and warn)
// unless it is told not to. Include this header before Eigen (or define EIGEN_NO_CUDA yourself).
#if defined(__CUDACC__) && !defined(EIGEN_NO_CUDA)
#define EIGEN_NO_CUDA
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include <kvtrim/policy.hpp>
#include <kvtrim/select.hpp>
#include <kvtrim/simhash.hpp>

#include "kernel_math.hpp"
#include "status.hpp"

namespace kvtrim::gpu {

template <class T, class Meta, class State>
struct DevHead {
  // fixed at construction
  T* k = nullptr;
  T* v = nullptr;
  std::int64_t* pos = nullptr;
  Meta* meta = nullptr;
  int cap = 0;     // slots allocated (budget + 1)
  int budget = 0;  // tokens allowed after a step
  int limit = 0;   // tokens the policy keeps after a decode step (rules::keep_limit, <= budget)
  int prompt_limit = 0;  // tokens it keeps after prefill (rules::prompt_limit, <= budget)
  // mutable, written by the kernels
  int n = 0;
  std::int64_t newest = -1;
  unsigned long long evictions = 0;
  unsigned long long merges = 0;
  State state{};
};

namespace kernels {

inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int kDecodeThreads = 128;  // 4 warps per decode block
inline constexpr int kDecodeWarps = kDecodeThreads / 32;
inline constexpr int kMaxVecPerLane = 2;    // head_dim <= 256: at most two 4-wide vectors per lane
inline constexpr int kRows = 4;             // slots a warp loads at once (memory-level parallelism)

// Leaves the first failure of the launch in the backend's error word.
__device__ __forceinline__ void report(int* error, Status s) { atomicCAS(error, 0, static_cast<int>(s)); }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Four consecutive elements starting at a multiple of 4 (rows are 4-element aligned: head_dim % 4 == 0),
// one 16-byte (float) or 8-byte (half, bf16) load.
__device__ __forceinline__ void load4(const float* p, float (&o)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  o[0] = x.x;
  o[1] = x.y;
  o[2] = x.z;
  o[3] = x.w;
}
__device__ __forceinline__ void load4(const __half* p, float (&o)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  o[0] = a.x;
  o[1] = a.y;
  o[2] = b.x;
  o[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&o)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  o[0] = a.x;
  o[1] = a.y;
  o[2] = b.x;
  o[3] = b.y;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Block-wide reduction of one float (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float x, float* scratch /* >= 33 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float y = lane < nw ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
    y = kMax ? warp_max(y) : warp_sum(y);
    if (lane == 0) scratch[32] = y;
  }
  __syncthreads();
  const float r = scratch[32];
  __syncthreads();  // scratch may be reused right after
  return r;
}

// ---- decode: hash, append, evict ------------------------------------------------------------------------

// grid: one block of kHashThreads per vector; vector i is x + i * stride (dim floats). Thread j < bits
// computes bit j with simhash_bit, the host's arithmetic, so codes equal SimHashProjection::code exactly.
inline constexpr int kHashThreads = 64;  // = kSimHashMaxBits
template <class = void>  // a template, so that every translation unit including this header may define it
__global__ void __launch_bounds__(kHashThreads)
    simhash_kernel(const float* proj, int dim, int bits, const float* x, std::size_t stride, std::uint64_t* codes) {
  __shared__ unsigned halves[2];
  const int j = static_cast<int>(threadIdx.x);
  const float* xi = x + static_cast<std::size_t>(blockIdx.x) * stride;
  const bool bit = j < bits && simhash_bit(proj + static_cast<std::size_t>(j) * dim, dim, xi);
  const unsigned word = __ballot_sync(kFullMask, bit);
  if ((j & 31) == 0) halves[j >> 5] = word;
  __syncthreads();
  if (j == 0) codes[blockIdx.x] = static_cast<std::uint64_t>(halves[0]) | (static_cast<std::uint64_t>(halves[1]) << 32);
}

// What a decode step appends, per KV head: k, v [n_kv_heads x d] fp32; k_codes [n_kv_heads] and q_codes
// [n_kv_heads x group] the step's SimHash codes (kSimHash policies; null otherwise).
struct AppendArgs {
  const float* k = nullptr;
  const float* v = nullptr;
  int d = 0;
  int group = 1;
  const std::uint64_t* k_codes = nullptr;
  const std::uint64_t* q_codes = nullptr;
  std::int64_t position = 0;
  int* error = nullptr;
  bool rules = true;  // false: the rows only (a speculative verify), no on_insert
};

// grid: one block per KV head of the layer.
template <class T, class P>
__global__ void append_kernel(DevHead<T, typename P::SlotMeta, typename P::State>* heads, AppendArgs a) {
  auto& h = heads[blockIdx.x];
  const int n = h.n;
  __syncthreads();  // every thread has read n before thread 0 advances it
  if (n >= h.cap) {
    if (threadIdx.x == 0) report(a.error, Status::kHeadFull);
    return;
  }
  const int d = a.d;
  const float* kin = a.k + static_cast<std::size_t>(blockIdx.x) * d;
  const float* vin = a.v + static_cast<std::size_t>(blockIdx.x) * d;
  T* kd = h.k + static_cast<std::size_t>(n) * d;
  T* vd = h.v + static_cast<std::size_t>(n) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    kd[e] = from_f<T>(kin[e]);
    vd[e] = from_f<T>(vin[e]);
  }
  if (threadIdx.x == 0) {
    h.pos[n] = a.position;
    h.meta[n] = typename P::SlotMeta{};
    if (a.position > h.newest) h.newest = a.position;
    TokenInputs in;
    in.key = kin;
    in.d = d;
    in.group = a.group;
    if (a.k_codes != nullptr) in.key_code = a.k_codes[blockIdx.x];
    if (a.q_codes != nullptr) in.q_codes = a.q_codes + static_cast<std::size_t>(blockIdx.x) * a.group;
    if (a.rules) P::on_insert(h.state, h.meta[n], a.position, in);
    h.n = n + 1;
  }
}

__device__ __forceinline__ VictimKey shfl_victim(const VictimKey& k, int offset) {
  VictimKey o;
  o.score = __shfl_xor_sync(kFullMask, k.score, offset);
  o.pos = __shfl_xor_sync(kFullMask, static_cast<long long>(k.pos), offset);
  o.slot = __shfl_xor_sync(kFullMask, k.slot, offset);
  return o;
}

// The whole block removes slot `victim` of a head holding n tokens: the last slot moves into the hole. Every
// thread calls it with the same arguments; on return n is published (after a barrier).
template <class T, class Meta, class State>
__device__ void remove_slot(DevHead<T, Meta, State>& h, int victim, int n, int d, bool merged) {
  const int last = n - 1;
  if (victim != last) {
    T* kv = h.k + static_cast<std::size_t>(victim) * d;
    T* vv = h.v + static_cast<std::size_t>(victim) * d;
    const T* kl = h.k + static_cast<std::size_t>(last) * d;
    const T* vl = h.v + static_cast<std::size_t>(last) * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
      kv[e] = kl[e];
      vv[e] = vl[e];
    }
  }
  __syncthreads();  // every read of n, pos and meta of this round is done
  if (threadIdx.x == 0) {
    if (victim != last) {
      h.pos[victim] = h.pos[last];
      h.meta[victim] = h.meta[last];
    }
    h.n = last;
    ++(merged ? h.merges : h.evictions);
  }
  __syncthreads();
}

// Block-wide better_victim over per-thread candidates (blockDim.x a multiple of 32); every thread gets the slot.
__device__ __forceinline__ int block_victim(VictimKey best, VictimKey* warp_best /* [32] */, int* s_victim) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) best = better_victim(best, shfl_victim(best, o));
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    VictimKey b;
    for (int w = 0; w < nw; ++w) b = better_victim(b, warp_best[w]);
    *s_victim = b.slot;
  }
  __syncthreads();
  const int victim = *s_victim;
  __syncthreads();  // s_victim may be written again in the next round
  return victim;
}

// grid: one block per KV head (blockDim.x a multiple of 32). Evicts one victim at a time until n <= limit.
template <class T, class P>
__global__ void evict_kernel(DevHead<T, typename P::SlotMeta, typename P::State>* heads, int d, int* error) {
  using Meta = typename P::SlotMeta;
  auto& h = heads[blockIdx.x];
  __shared__ VictimKey warp_best[32];
  __shared__ int s_victim;
  for (;;) {
    const int n = h.n;
    if (n <= h.limit) return;  // uniform: n was published before the last barrier
    const std::int64_t newest = h.newest;
    VictimKey best;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const std::int64_t p = h.pos[i];
      const Meta m = h.meta[i];
      if (P::protects(h.state, m, p, newest)) continue;
      best = better_victim(best, VictimKey{P::score(h.state, m, p, newest), p, i});
    }
    const int victim = block_victim(best, warp_best, &s_victim);
    if (victim < 0) {
      if (threadIdx.x == 0) report(error, Status::kAllProtected);
      return;
    }
    remove_slot(h, victim, n, d, false);
  }
}

// grid: one block of kMergeThreads per KV head (kMerges policies; the rule is in policy.hpp, rules::merges).
// While n > limit: the head's Stats, the victim (lowest merge_score among the unprotected, oldest on ties), then,
// when may_merge, the absorbing slot with the highest key cosine (fp32 over the stored rows; older on ties); if
// that cosine reaches merge_threshold the victim's rows are folded into it with the policy's mix weights
// (mix_rn: no fused multiply-add) and its metadata merged; the victim then leaves.
inline constexpr int kMergeThreads = 256;
template <class T, class P>
__global__ void __launch_bounds__(kMergeThreads)
    merge_evict_kernel(DevHead<T, typename P::SlotMeta, typename P::State>* heads, int d, int* error) {
  using Stats = typename P::Stats;
  auto& h = heads[blockIdx.x];
  __shared__ Stats thread_stats[kMergeThreads];
  __shared__ Stats s_stats;
  __shared__ VictimKey warp_best[32];
  __shared__ int s_victim, s_target;
  __shared__ float s_victim_norm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (;;) {
    const int n = h.n;
    if (n <= h.limit) return;  // uniform: n was published before the last barrier
    const std::int64_t newest = h.newest;
    Stats mine{};
    for (int i = threadIdx.x; i < n; i += blockDim.x) mine = P::combine(mine, P::stats_of(h.meta[i]));
    thread_stats[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      Stats all{};
      for (int t = 0; t < static_cast<int>(blockDim.x); ++t) all = P::combine(all, thread_stats[t]);
      s_stats = all;
    }
    __syncthreads();
    const Stats st = s_stats;
    VictimKey best;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const std::int64_t p = h.pos[i];
      if (P::protects(h.state, h.meta[i], p, newest)) continue;
      best = better_victim(best, VictimKey{P::merge_score(h.state, st, h.meta[i]), p, i});
    }
    const int victim = block_victim(best, warp_best, &s_victim);
    if (victim < 0) {
      if (threadIdx.x == 0) report(error, Status::kAllProtected);
      return;
    }
    const T* kv = h.k + static_cast<std::size_t>(victim) * d;
    if (P::may_merge(h.state, st, h.meta[victim])) {  // uniform: every thread reads the same values
      if (warp == 0) {
        float sq = 0.0f;
        for (int e = lane; e < d; e += 32) sq += to_f(kv[e]) * to_f(kv[e]);
        sq = warp_sum(sq);
        if (lane == 0) s_victim_norm = sqrtf(sq);
      }
      __syncthreads();
      // The absorbing slot: the highest cosine, the older on ties, i.e. better_victim's choice on minus the
      // cosine. Per warp, lanes across the key rows.
      VictimKey cand;
      for (int c = warp; c < n; c += nw) {
        if (c == victim || !P::absorbs(h.state, h.meta[c], h.pos[c])) continue;
        const T* kc = h.k + static_cast<std::size_t>(c) * d;
        float dot = 0.0f, sq = 0.0f;
        for (int e = lane; e < d; e += 32) {
          const float x = to_f(kc[e]);
          dot += x * to_f(kv[e]);
          sq += x * x;
        }
        dot = warp_sum(dot);
        sq = warp_sum(sq);
        cand = better_victim(cand, VictimKey{-cosine_from(dot, sqrtf(sq), s_victim_norm), h.pos[c], c});
      }
      if (lane == 0) warp_best[warp] = cand;
      __syncthreads();
      if (threadIdx.x == 0) {
        VictimKey b;
        for (int w = 0; w < nw; ++w) b = better_victim(b, warp_best[w]);
        s_target = b.slot >= 0 && -b.score >= P::merge_threshold(h.state) ? b.slot : -1;
      }
      __syncthreads();
    } else if (threadIdx.x == 0) {
      s_target = -1;
    }
    __syncthreads();
    const int target = s_target;
    if (target >= 0) {
      const MixWeights mix = P::mix_weights(h.state, h.meta[target], h.meta[victim]);
      T* kt = h.k + static_cast<std::size_t>(target) * d;
      T* vt = h.v + static_cast<std::size_t>(target) * d;
      const T* vv = h.v + static_cast<std::size_t>(victim) * d;
      const bool keys = P::merges_keys(h.state);
      for (int e = threadIdx.x; e < d; e += blockDim.x) {
        if (keys) kt[e] = from_f<T>(mix_rn(mix, to_f(kt[e]), to_f(kv[e])));
        vt[e] = from_f<T>(mix_rn(mix, to_f(vt[e]), to_f(vv[e])));
      }
      __syncthreads();  // the weights above were read before the metadata changes
      if (threadIdx.x == 0) P::merge_meta(h.meta[target], h.meta[victim]);
      __syncthreads();
    }
    remove_slot(h, victim, n, d, target >= 0);
  }
}

// ---- structured eviction (kStructured policies) ---------------------------------------------------------

inline constexpr int kFitThreads = 256;

// Writes list[rank] = i for every i in [begin, end) with flag(i), in index order; returns the count. Every
// thread of the block must call it (it synchronises).
template <class Scan, class Flag>
__device__ int block_collect(typename Scan::TempStorage& tmp, int begin, int end, Flag flag, int* list) {
  int base = 0;
  for (int i0 = begin; i0 < end; i0 += kFitThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    const int f = i < end && flag(i) ? 1 : 0;
    int offset = 0, total = 0;
    Scan(tmp).ExclusiveSum(f, offset, total);
    if (f) list[base + offset] = i;
    base += total;
    __syncthreads();  // tmp is reused by the next chunk
  }
  return base;
}

// grid: one block of kFitThreads per KV head. Scratch per head (stride ints / Metas): keys, flags, holes, movers
// and new metadata. Passes repeat while the policy's needs_fit.
template <class T, class P>
__global__ void __launch_bounds__(kFitThreads)
    fit_kernel(DevHead<T, typename P::SlotMeta, typename P::State>* heads, int d, int stride, int* scratch,
               typename P::SlotMeta* new_meta, int* error) {
  using Meta = typename P::SlotMeta;
  using Scan = cub::BlockScan<int, kFitThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  auto& h = heads[blockIdx.x];
  int* keys = scratch + static_cast<std::size_t>(blockIdx.x) * 4 * stride;
  int* flags = keys + stride;
  int* holes = flags + stride;
  int* movers = holes + stride;
  Meta* nm = new_meta + static_cast<std::size_t>(blockIdx.x) * stride;
  for (;;) {
    const int n = h.n;
    if (!P::needs_fit(h.state, n)) return;  // uniform: n was published before the last barrier
    for (int i = threadIdx.x; i < n; i += blockDim.x) keys[i] = P::fit_key(h.state, h.pos, h.meta, n, i);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      flags[i] = P::fit_slot(h.state, h.meta, keys, n, i, nm[i]) ? 1 : 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      if (flags[i]) h.meta[i] = nm[i];
    const int kept = block_collect<Scan>(scan_tmp, 0, n, [&](int i) { return flags[i] != 0; }, keys);
    if (kept == n) {
      if (threadIdx.x == 0) report(error, Status::kNoProgress);
      return;
    }
    // the k-th hole below `kept` receives the k-th survivor at or above it (sources and targets are disjoint)
    const int n_holes = block_collect<Scan>(scan_tmp, 0, kept, [&](int i) { return flags[i] == 0; }, holes);
    block_collect<Scan>(scan_tmp, kept, n, [&](int i) { return flags[i] != 0; }, movers);
    const std::size_t moved = static_cast<std::size_t>(n_holes) * d;
    for (std::size_t e = threadIdx.x; e < moved; e += blockDim.x) {
      const std::size_t r = e / d, c = e % d;
      const std::size_t dst = static_cast<std::size_t>(holes[r]) * d + c;
      const std::size_t src = static_cast<std::size_t>(movers[r]) * d + c;
      h.k[dst] = h.k[src];
      h.v[dst] = h.v[src];
    }
    for (int r = threadIdx.x; r < n_holes; r += blockDim.x) {
      h.pos[holes[r]] = h.pos[movers[r]];
      h.meta[holes[r]] = h.meta[movers[r]];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      h.n = kept;
      h.evictions += static_cast<unsigned long long>(n - kept);
    }
    __syncthreads();
  }
}

// ---- decode attention -----------------------------------------------------------------------------------

struct DecodeArgs {
  const float* q = nullptr;  // [n_q_heads x d] fp32, query head kv * group + i belongs to KV head kv
  int group = 1;
  int d = 0;
  float scale = 1.0f;
  int n_splits = 1;
  float* part_ml = nullptr;  // [n_q_heads x n_splits x 2]: max logit, sum of exp
  float* part_o = nullptr;   // [n_q_heads x n_splits x d]: sum of exp(s - max) * v
  float* logits = nullptr;   // [n_q_heads x logits_stride] or null: raw scaled logits per slot
  int logits_stride = 0;
};

// Dynamic shared memory of decode_split_kernel for a tile of G query heads.
inline std::size_t decode_smem_bytes(int G, int d) {
  return sizeof(float) * static_cast<std::size_t>(G) *
         (static_cast<std::size_t>(d) * (1 + kDecodeWarps) + kDecodeChunk + 2);
}

// grid: (n_splits, n_kv_heads, group / G); block: kDecodeThreads. Requires d % 4 == 0 and d <= 256.
template <class T, int G, class Head>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const Head* heads, DecodeArgs a) {
  extern __shared__ float4 smem4[];
  const int d = a.d, d4 = d / 4;
  float* q_s = reinterpret_cast<float*>(smem4);  // [G x d]
  float* red = q_s + G * d;                      // [warps x G x d]
  float* s_s = red + kDecodeWarps * G * d;       // [G x chunk]
  float* stat = s_s + G * kDecodeChunk;          // [G x 2]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, row0 = blockIdx.y * a.group + blockIdx.z * G;
  const Head& h = heads[blockIdx.y];
  const int begin = split * kDecodeChunk;
  const int cnt = min(h.n - begin, kDecodeChunk);
  auto ml = [&](int g) { return a.part_ml + (static_cast<std::size_t>(row0 + g) * a.n_splits + split) * 2; };
  auto po = [&](int g) { return a.part_o + (static_cast<std::size_t>(row0 + g) * a.n_splits + split) * d; };
  if (cnt <= 0) {  // an empty split: neutral partial (the whole block leaves together)
    for (int g = tid; g < G; g += blockDim.x) {
      ml(g)[0] = -INFINITY;
      ml(g)[1] = 0.0f;
    }
    for (int i = tid; i < G * d; i += blockDim.x) po(i / d)[i % d] = 0.0f;
    return;
  }
  for (int i = tid; i < G * d; i += blockDim.x) q_s[i] = a.q[static_cast<std::size_t>(row0) * d + i];
  __syncthreads();

  // scores: a warp takes kRows slots at a time (their loads issued together), lanes across the key rows, all G
  // queries per key read
  for (int j0 = warp * kRows; j0 < cnt; j0 += kDecodeWarps * kRows) {
    float acc[kRows][G];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int g = 0; g < G; ++g) acc[r][g] = 0.0f;
    for (int c = lane; c < d4; c += 32) {
      float kv[kRows][4];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (j0 + r < cnt) {
          load4(h.k + static_cast<std::size_t>(begin + j0 + r) * d + 4 * c, kv[r]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) kv[r][e] = 0.0f;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float4 qq = reinterpret_cast<const float4*>(q_s + g * d)[c];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          acc[r][g] += qq.x * kv[r][0] + qq.y * kv[r][1] + qq.z * kv[r][2] + qq.w * kv[r][3];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int g = 0; g < G; ++g) acc[r][g] = warp_sum(acc[r][g]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int j = j0 + r;
        if (j >= cnt) break;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float s = acc[r][g] * a.scale;
          s_s[g * kDecodeChunk + j] = s;
          if (a.logits != nullptr) a.logits[static_cast<std::size_t>(row0 + g) * a.logits_stride + begin + j] = s;
        }
      }
    }
  }
  __syncthreads();

  // per query: max and sum of exp over this split; s_s becomes exp(s - max)
  for (int g = warp; g < G; g += kDecodeWarps) {
    float* row = s_s + g * kDecodeChunk;
    float m = -INFINITY;
    for (int j = lane; j < cnt; j += 32) m = fmaxf(m, row[j]);
    m = warp_max(m);
    float l = 0.0f;
    for (int j = lane; j < cnt; j += 32) {
      const float p = expf(row[j] - m);
      row[j] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stat[2 * g] = m;
      stat[2 * g + 1] = l;
    }
  }
  __syncthreads();

  // values: kRows slots per warp at a time, lane owns 4-wide column vectors lane and lane + 32
  float o[G][kMaxVecPerLane][4];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int u = 0; u < kMaxVecPerLane; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[g][u][e] = 0.0f;
  for (int j0 = warp * kRows; j0 < cnt; j0 += kDecodeWarps * kRows) {
#pragma unroll
    for (int u = 0; u < kMaxVecPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c >= d4) continue;
      float vv[kRows][4];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (j0 + r < cnt) {
          load4(h.v + static_cast<std::size_t>(begin + j0 + r) * d + 4 * c, vv[r]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) vv[r][e] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int j = j0 + r < cnt ? j0 + r : j0;  // rows past the end add 0 * (a live row's weight)
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float p = s_s[g * kDecodeChunk + j];
#pragma unroll
          for (int e = 0; e < 4; ++e) o[g][u][e] += p * vv[r][e];
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int u = 0; u < kMaxVecPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c < d4)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(warp * G + g) * d + 4 * c + e] = o[g][u][e];
    }
  __syncthreads();
  for (int i = tid; i < G * d; i += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) s += red[w * G * d + i];
    po(i / d)[i % d] = s;
  }
  for (int g = tid; g < G; g += blockDim.x) {
    ml(g)[0] = stat[2 * g];
    ml(g)[1] = stat[2 * g + 1];
  }
}

// grid: n_q_heads blocks. out: [n_q_heads x d]; stats (optional): [n_q_heads x 2] global max and sum.
template <class = void>  // a template, so that every translation unit including this header may define it
__global__ void decode_combine_kernel(const float* part_ml, const float* part_o, int n_splits, int d, float* out,
                                      float* stats) {
  const int row = blockIdx.x;
  const float* ml = part_ml + static_cast<std::size_t>(row) * n_splits * 2;
  SoftmaxPartial tot;
  for (int s = 0; s < n_splits; ++s) tot = merge(tot, SoftmaxPartial{ml[2 * s], ml[2 * s + 1]});
  const float inv = tot.l > 0.0f ? 1.0f / tot.l : 0.0f;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < n_splits; ++s)
      acc += rescale_weight(ml[2 * s], tot.m) * part_o[(static_cast<std::size_t>(row) * n_splits + s) * d + e];
    out[static_cast<std::size_t>(row) * d + e] = acc * inv;
  }
  if (stats != nullptr && threadIdx.x == 0) {
    stats[2 * row] = tot.m;
    stats[2 * row + 1] = tot.l;
  }
}

// grid: (ceil(stride / blockDim), n_q_heads). Logits of the live slots -> probabilities, in place.
template <class Head>
__global__ void probs_kernel(const Head* heads, const float* stats, float* logits, int stride, int group) {
  const int row = blockIdx.y;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= heads[row / group].n) return;
  float* x = logits + static_cast<std::size_t>(row) * stride + i;
  *x = expf(*x - stats[2 * row]) / stats[2 * row + 1];
}

// grid: (ceil(stride / blockDim), n_kv_heads). One thread per live slot: the slot's probabilities reduced over
// the group by the policy's rule, then its on_attention.
template <class P, class Head>
__global__ void on_attention_kernel(Head* heads, const float* probs, int stride, int group) {
  Head& h = heads[blockIdx.y];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= h.n) return;
  const AttentionRows rows{probs + static_cast<std::size_t>(blockIdx.y) * group * stride, h.n, group, stride};
  P::on_attention(h.state, h.meta[i], rows.reduce(i, P::group_reduce(h.state)));
}

// ---- host-side launch of a decode attention step (used by CudaBackend and the benchmark) ----------------

template <class T, class Head>
auto decode_split_for_tile(int tile) {
  using Kernel = void (*)(const Head*, DecodeArgs);
  Kernel k = tile == 8   ? decode_split_kernel<T, 8, Head>
             : tile == 4 ? decode_split_kernel<T, 4, Head>
             : tile == 2 ? decode_split_kernel<T, 2, Head>
                         : decode_split_kernel<T, 1, Head>;
  return k;
}

// Once per shape: lets the pass-1 kernel use more than 48 KiB of shared memory when it needs it.
template <class T, class Head>
cudaError_t prepare_decode_attention(int group, int d) {
  const int tile = group_tile(group);
  const std::size_t smem = decode_smem_bytes(tile, d);
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(decode_split_for_tile<T, Head>(tile), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

// Pass 1 over n_kv heads (a.n_splits splits each), pass 2 into out [n_kv*group x d]; when a.logits is set,
// also the global statistics into stats [n_kv*group x 2] and the probabilities in place of the logits.
template <class T, class Head>
void launch_decode_attention(const Head* heads, int n_kv, const DecodeArgs& a, float* out, float* stats,
                             cudaStream_t stream) {
  const int tile = group_tile(a.group);
  const dim3 grid(static_cast<unsigned>(a.n_splits), static_cast<unsigned>(n_kv),
                  static_cast<unsigned>(a.group / tile));
  decode_split_for_tile<T, Head>(tile)<<<grid, kDecodeThreads, decode_smem_bytes(tile, a.d), stream>>>(heads, a);
  const int rows = n_kv * a.group;
  decode_combine_kernel<<<rows, 128, 0, stream>>>(a.part_ml, a.part_o, a.n_splits, a.d, out,
                                                  a.logits != nullptr ? stats : nullptr);
  if (a.logits != nullptr) {
    const dim3 g2(static_cast<unsigned>((a.logits_stride + 255) / 256), static_cast<unsigned>(rows));
    probs_kernel<Head><<<g2, 256, 0, stream>>>(heads, stats, a.logits, a.logits_stride, a.group);
  }
}

// ---- prefill ------------------------------------------------------------------------------------------

// S: [group x B x width] scaled scores of prompt rows t0..t0+B-1 (row r sees keys 0..t0+r). Causal softmax in
// place (masked entries become 0). With kSums, adds each probability to col[gi x T], for the last `window`
// rows of the prompt to win[gi x T], and for the last `vote_window` rows to vote[gi x T]. grid: (B, group).
template <bool kSums>
__global__ void prompt_softmax_kernel(float* S, int B, int width, int t0, int T, int window, float* col,
                                      float* win, int vote_window, float* vote) {
  __shared__ float scratch[33];
  const int r = blockIdx.x, gi = blockIdx.y, t = t0 + r;
  float* row = S + (static_cast<std::size_t>(gi) * B + r) * width;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_reduce<true>(m, scratch);
  float l = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const float p = expf(row[j] - m);
    row[j] = p;
    l += p;
  }
  l = block_reduce<false>(l, scratch);
  const float inv = 1.0f / l;
  const bool in_window = t >= T - window, in_vote = t >= T - vote_window;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    if (j > t) {
      row[j] = 0.0f;
      continue;
    }
    const float p = row[j] * inv;
    row[j] = p;
    if constexpr (kSums) {
      atomicAdd(col + static_cast<std::size_t>(gi) * T + j, p);
      if (in_window) atomicAdd(win + static_cast<std::size_t>(gi) * T + j, p);
      if (in_vote) atomicAdd(vote + static_cast<std::size_t>(gi) * T + j, p);
    }
  }
}

// The prompt of one layer as the selection kernels see it. K: [T x n_kv_heads*d] fp32 prompt keys (stored
// width); col/win/vote: [n_kv_heads x group x T] attention sums (null when the policy needs none); k_codes
// [T x n_kv_heads] and last_q_codes [n_kv_heads x group] (the last prompt token's queries): SimHash codes for
// kSimHash policies, else null.
struct PromptArgs {
  const float* K = nullptr;
  int n_kv = 0;
  int d = 0;
  int T = 0;
  int group = 1;
  std::int64_t first_pos = 0;
  const float* col = nullptr;
  const float* win = nullptr;
  const float* vote = nullptr;
  const std::uint64_t* k_codes = nullptr;
  const std::uint64_t* last_q_codes = nullptr;
};

// grid: one block per KV head. Replays on_insert over the prompt in order (thread 0; cheap per token), then
// gives every token its sort key for the keep selection (prompt_sort_key; protected tokens score +inf and
// sort last). meta_tmp: [n_kv_heads x T]; keys: [n_kv_heads x T].
template <class P, class Head>
__global__ void prompt_meta_kernel(Head* heads, typename P::SlotMeta* meta_tmp, std::uint64_t* keys, PromptArgs a) {
  Head& h = heads[blockIdx.x];
  const int T = a.T;
  auto* meta = meta_tmp + static_cast<std::size_t>(blockIdx.x) * T;
  if (threadIdx.x == 0) {
    for (int t = 0; t < T; ++t) {
      meta[t] = typename P::SlotMeta{};
      TokenInputs in;
      in.key = a.K + static_cast<std::size_t>(t) * a.n_kv * a.d + static_cast<std::size_t>(blockIdx.x) * a.d;
      in.d = a.d;
      in.group = a.group;
      in.prefill = true;
      if (a.k_codes != nullptr) in.key_code = a.k_codes[static_cast<std::size_t>(t) * a.n_kv + blockIdx.x];
      if (a.last_q_codes != nullptr && t == T - 1)
        in.q_codes = a.last_q_codes + static_cast<std::size_t>(blockIdx.x) * a.group;
      P::on_insert(h.state, meta[t], a.first_pos + t, in);
    }
    const std::int64_t last = a.first_pos + T - 1;
    if (last > h.newest) h.newest = last;
  }
  __syncthreads();
  const std::int64_t newest = h.newest;
  const std::size_t base = static_cast<std::size_t>(blockIdx.x) * a.group * T;
  auto rows = [&](const float* sums) { return AttentionRows{sums != nullptr ? sums + base : nullptr, T, a.group, T}; };
  const PromptSums sums{rows(a.col), rows(a.win), rows(a.vote)};
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const float s = P::prompt_score(h.state, meta[t], t, sums);
    const float score = rules::prompt_protects<P>(h.state, meta[t], a.first_pos + t, newest) ? INFINITY : s;
    keys[static_cast<std::size_t>(blockIdx.x) * T + t] = prompt_sort_key(score, t);
  }
}

// grid: (ceil(T / blockDim), n_kv_heads). After an ascending sort of each head's keys, the first
// T - min(T, prompt_limit) tokens are dropped; a dropped protected key means the protected tokens alone exceed
// the limit.
template <class Head>
__global__ void prompt_mark_kernel(const Head* heads, const std::uint64_t* sorted_keys, unsigned char* keep, int T,
                                   int* error) {
  const Head& h = heads[blockIdx.y];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T) return;
  const int drop = T - min(T, h.prompt_limit);
  const std::uint64_t key = sorted_keys[static_cast<std::size_t>(blockIdx.y) * T + i];
  const bool dropped = i < drop;
  keep[static_cast<std::size_t>(blockIdx.y) * T + sort_key_token(key)] = dropped ? 0 : 1;
  if (dropped && sort_key_protected(key)) report(error, Status::kAllProtected);
}

// grid: one block of kFitThreads per KV head. The structured fit of a prompt (kStructured policies): passes of
// fit_key / fit_slot over the surviving prompt tokens (kept in position order) while needs_fit, then keep marks
// and the survivors' metadata. meta_tmp, keep: [n_kv_heads x T]; scratch: [n_kv_heads x 6T] ints; metas:
// [n_kv_heads x 3T]; positions: [n_kv_heads x 2T].
template <class P, class Head, class Meta>
__global__ void __launch_bounds__(kFitThreads)
    prompt_fit_kernel(const Head* heads, Meta* meta_tmp, unsigned char* keep, int T, std::int64_t first_pos,
                      int* scratch, Meta* metas, std::int64_t* positions, int* error) {
  using Scan = cub::BlockScan<int, kFitThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const Head& h = heads[blockIdx.x];
  const std::size_t Tz = static_cast<std::size_t>(T);
  int* idx[2] = {scratch + blockIdx.x * 6 * Tz, scratch + blockIdx.x * 6 * Tz + Tz};
  int* keys = idx[1] + Tz;
  int* flags = keys + Tz;
  int* order = flags + Tz;
  Meta* mt[2] = {metas + blockIdx.x * 3 * Tz, metas + blockIdx.x * 3 * Tz + Tz};
  Meta* nm = mt[1] + Tz;
  std::int64_t* ps[2] = {positions + blockIdx.x * 2 * Tz, positions + blockIdx.x * 2 * Tz + Tz};
  Meta* mine = meta_tmp + blockIdx.x * Tz;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    idx[0][t] = t;
    ps[0][t] = first_pos + t;
    mt[0][t] = mine[t];
  }
  __syncthreads();
  int cur = 0, n = T;
  while (P::needs_fit(h.state, n)) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) keys[i] = P::fit_key(h.state, ps[cur], mt[cur], n, i);
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      flags[i] = P::fit_slot(h.state, mt[cur], keys, n, i, nm[i]) ? 1 : 0;
    __syncthreads();
    const int kept = block_collect<Scan>(scan_tmp, 0, n, [&](int i) { return flags[i] != 0; }, order);
    if (kept == n) {
      if (threadIdx.x == 0) report(error, Status::kNoProgress);
      return;
    }
    const int nxt = 1 - cur;
    for (int r = threadIdx.x; r < kept; r += blockDim.x) {  // stable: survivors stay in position order
      idx[nxt][r] = idx[cur][order[r]];
      ps[nxt][r] = ps[cur][order[r]];
      mt[nxt][r] = nm[order[r]];
    }
    __syncthreads();
    cur = nxt;
    n = kept;
  }
  for (int t = threadIdx.x; t < T; t += blockDim.x) keep[blockIdx.x * Tz + t] = 0;
  __syncthreads();
  for (int r = threadIdx.x; r < n; r += blockDim.x) {
    keep[blockIdx.x * Tz + idx[cur][r]] = 1;
    mine[idx[cur][r]] = mt[cur][r];
  }
}

// dst[i] = src[i] (fp32 -> T) for i < n; a grid-stride loop.
template <class T>
__global__ void convert_rows_kernel(T* dst, const float* src, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = from_f<T>(src[i]);
}

// grid: one block of kStoreThreads per KV head. Kept prompt tokens go to slots 0..kept-1 in position order.
// K, V: [T x n_kv_heads*d] fp32; keep: [n_kv_heads x T]; meta_tmp: [n_kv_heads x T].
inline constexpr int kStoreThreads = 256;
template <class T, class Head, class Meta>
__global__ void __launch_bounds__(kStoreThreads)
    prompt_store_kernel(Head* heads, const float* K, const float* V, int n_kv, int d, int n_tokens,
                        std::int64_t first_pos, const unsigned char* keep, const Meta* meta_tmp, int* error) {
  using Scan = cub::BlockScan<int, kStoreThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int s_slot[kStoreThreads];
  Head& h = heads[blockIdx.x];
  const int start = h.n;
  int base = start;
  for (int t0 = 0; t0 < n_tokens; t0 += kStoreThreads) {
    const int t = t0 + static_cast<int>(threadIdx.x);
    const int flag = t < n_tokens && keep[static_cast<std::size_t>(blockIdx.x) * n_tokens + t] ? 1 : 0;
    int offset = 0, total = 0;
    Scan(scan_tmp).ExclusiveSum(flag, offset, total);
    s_slot[threadIdx.x] = flag ? base + offset : -1;
    __syncthreads();
    if (base + total > h.cap) {
      if (threadIdx.x == 0) report(error, Status::kHeadFull);
      return;
    }
    // copy rows cooperatively: the block walks the chunk's kept rows, threads across the row
    for (int r = 0; r < kStoreThreads && t0 + r < n_tokens; ++r) {
      const int slot = s_slot[r];
      if (slot < 0) continue;
      const std::size_t src = static_cast<std::size_t>(t0 + r) * n_kv * d + static_cast<std::size_t>(blockIdx.x) * d;
      T* kd = h.k + static_cast<std::size_t>(slot) * d;
      T* vd = h.v + static_cast<std::size_t>(slot) * d;
      for (int e = threadIdx.x; e < d; e += blockDim.x) {
        kd[e] = from_f<T>(K[src + e]);
        vd[e] = from_f<T>(V[src + e]);
      }
    }
    if (flag) {
      const int slot = base + offset;
      h.pos[slot] = first_pos + t;
      h.meta[slot] = meta_tmp[static_cast<std::size_t>(blockIdx.x) * n_tokens + t];
    }
    base += total;
    __syncthreads();  // s_slot and scan_tmp are reused by the next chunk
  }
  if (threadIdx.x == 0) {
    h.n = base;
    h.evictions += static_cast<unsigned long long>(n_tokens - (base - start));
  }
}

}  // namespace kernels
}  // namespace kvtrim::gpu
