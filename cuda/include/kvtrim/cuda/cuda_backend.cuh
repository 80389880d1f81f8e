// kvtrim CUDA backend: CudaBackend<T>, a drop-in for CpuBackend in KVCache<Policy, Backend>.
//
//   #include <kvtrim/kvtrim.hpp>
//   #include <kvtrim/cuda/cuda_backend.cuh>
//   kvtrim::KVCache<kvtrim::StreamingLLM, kvtrim::CudaBackend<__half>> cache(cfg, {.sinks = 4});
//   cache.backend().set_stream(my_stream);   // optional: the backend otherwise owns a non-blocking stream
//
// Storage type T is float, __half or __nv_bfloat16; every computation accumulates in fp32. Slots live on the
// device, per (layer, KV head), with positions and the policy's SlotMeta; the policy's decisions run on the
// device through DevicePolicy<P> (device_policy.hpp), so a decode step issues kernels only and never reads
// anything back. Introspection (size, positions, evictions, bytes) copies the small per-head records back when
// asked, once per change.
//
// Inputs: q/k/v/out (and Q/K/V/out for prefill) may be host or device pointers, all of the same kind.
//  - host pointers: copied in and out on the backend's stream; the call returns when `out` is written.
//  - device pointers: nothing is copied and the call returns as soon as the work is queued on the stream;
//    KVCache's finiteness check reads inputs on the host, so device inputs need CacheConfig::check_finite =
//    false (the caller's promise that they are finite). Kernel-side failures (a head with no free slot, every
//    token protected) are then reported by the next synchronize() or introspection call.
// Requirements (checked at construction, kvtrim::Error otherwise): a CUDA device, head_dim a multiple of 4 and
// at most 256, a policy with a DevicePolicy specialisation, no low-rank (projected) storage.
#pragma once

// Eigen serves only the host side of kvtrim; under nvcc its device annotations would be compiled (and warn)
// unless it is told not to. Include this header before Eigen (or define EIGEN_NO_CUDA yourself).
#if defined(__CUDACC__) && !defined(EIGEN_NO_CUDA)
#define EIGEN_NO_CUDA
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <initializer_list>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

#include <kvtrim/config.hpp>
#include <kvtrim/error.hpp>
#include <kvtrim/policy.hpp>

#include "check.hpp"
#include "device_policy.hpp"
#include "kernels.cuh"

namespace kvtrim {

namespace gpu {

// Device memory owned by one object (freed in the destructor; move-only).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) { allocate(bytes); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_, bytes_ = o.bytes_;
      o.p_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  void allocate(std::size_t bytes) {
    release();
    if (bytes == 0) return;
    KVTRIM_CUDA_CHECK(cudaMalloc(&p_, bytes));
    bytes_ = bytes;
  }
  // Grows (never shrinks) to at least `bytes`; contents are not kept.
  void ensure(std::size_t bytes) {
    if (bytes > bytes_) allocate(bytes);
  }
  template <class U>
  U* as() const {
    return static_cast<U*>(p_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void release() noexcept {
    if (p_ != nullptr) (void)cudaFree(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// true for device or managed memory, false for ordinary host memory.
inline bool is_device_pointer(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

}  // namespace gpu

template <class T = float>
struct CudaBackend {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "kvtrim::CudaBackend<T>: T must be float, __half or __nv_bfloat16");
  static constexpr const char* kName = "cuda";
  using Storage = T;

  template <class P>
  class Impl;
};

template <class T>
template <class P>
class CudaBackend<T>::Impl {
  using DP = gpu::DevicePolicy<P>;
  static_assert(DP::kDefined,
                "kvtrim::CudaBackend: this policy has no device implementation; specialise "
                "kvtrim::gpu::DevicePolicy<P> (see kvtrim/cuda/device_policy.hpp) or use CpuBackend");

 public:
  using Meta = typename P::SlotMeta;
  using State = typename DP::State;
  using Head = gpu::DevHead<T, Meta, State>;
  static_assert(std::is_trivially_copyable_v<State>, "DevicePolicy<P>::State must be trivially copyable");
  static constexpr bool kProbs = has(P::kSignals, Signals::kAttention);
  static constexpr bool kNeverEvicts = requires { P::kNeverEvicts; };
  static constexpr bool kProjects = requires(const P& p) { p.key_width(0); };
  static_assert(!kProjects, "kvtrim::CudaBackend: low-rank (projected) storage is not supported on the GPU yet");

 private:
  // Everything the head views point at lives here, on the heap, so Impl (and KVCache) can move.
  struct Store {
    int L = 0, H = 0, Hq = 0, g = 0, d = 0;
    int max_cap = 0, max_splits = 0;
    std::vector<int> splits;  // per layer
    cudaStream_t stream = nullptr;
    bool own_stream = false;
    cublasHandle_t blas = nullptr;
    gpu::DeviceBuffer slab, heads, io, part_ml, part_o, logits, stats, error;
    std::vector<Head> initial;  // records of empty heads (for reset)
    // host mirror of the device records, refreshed on demand
    mutable std::vector<Head> mirror;
    mutable bool mirror_valid = false;
    mutable std::vector<std::vector<std::int64_t>> pos;
    mutable std::vector<char> pos_valid;
    std::vector<int> host_n;  // exact counts for never-evicting policies (no read-back needed)
    ~Store() {
      if (blas != nullptr) (void)cublasDestroy(blas);
      if (own_stream && stream != nullptr) (void)cudaStreamDestroy(stream);
    }
    float* q_in() const { return io.as<float>(); }
    float* k_in() const { return q_in() + static_cast<std::size_t>(Hq) * d; }
    float* v_in() const { return k_in() + static_cast<std::size_t>(H) * d; }
    float* out() const { return v_in() + static_cast<std::size_t>(H) * d; }
    Head* layer_heads(int layer) const { return heads.as<Head>() + static_cast<std::size_t>(layer) * H; }

    void invalidate(int layer) {
      mirror_valid = false;
      for (int h = 0; h < H; ++h) pos_valid[static_cast<std::size_t>(layer) * H + h] = 0;
    }
    // Waits for the stream, then turns an error a kernel reported into kvtrim::Error (and clears it).
    void sync_and_check() const {
      KVTRIM_CUDA_CHECK(cudaStreamSynchronize(stream));
      int code = 0;
      KVTRIM_CUDA_CHECK(cudaMemcpy(&code, error.as<int>(), sizeof(int), cudaMemcpyDeviceToHost));
      if (code == 0) return;
      KVTRIM_CUDA_CHECK(cudaMemset(error.as<int>(), 0, sizeof(int)));
      mirror_valid = false;
      std::fill(pos_valid.begin(), pos_valid.end(), 0);
      KVTRIM_CHECK(code != gpu::kErrHeadFull, "CudaBackend<", P::kName,
                   ">: a token arrived at a KV head with no free slot (the cache state is no longer reliable; "
                   "call reset())");
      KVTRIM_CHECK(code != gpu::kErrAllProtected, P::kName,
                   ": every remaining token is protected but a head is over its limit (CudaBackend; the cache "
                   "state is no longer reliable; call reset())");
      detail::throw_error("CudaBackend: unknown device error code ", code);
    }
    const Head& record(std::size_t i) const {
      if (!mirror_valid) {
        sync_and_check();
        KVTRIM_CUDA_CHECK(cudaMemcpy(mirror.data(), heads.as<Head>(), sizeof(Head) * mirror.size(),
                                     cudaMemcpyDeviceToHost));
        mirror_valid = true;
      }
      return mirror[i];
    }
    int size(std::size_t i) const {
      if constexpr (kNeverEvicts) return host_n[i];
      return record(i).n;
    }
    std::span<const std::int64_t> positions(std::size_t i) const {
      if (!pos_valid[i]) {
        const Head& r = record(i);
        pos[i].resize(static_cast<std::size_t>(r.n));
        if (r.n > 0)
          KVTRIM_CUDA_CHECK(cudaMemcpy(pos[i].data(), r.pos, sizeof(std::int64_t) * static_cast<std::size_t>(r.n),
                                       cudaMemcpyDeviceToHost));
        pos_valid[i] = 1;
      }
      return {pos[i].data(), pos[i].size()};
    }
  };

 public:
  // Read-only view of one (layer, KV head) with the members KVCache and the tests use on a HeadStore.
  class HeadView {
   public:
    HeadView(const Store* s, std::size_t i) : s_(s), i_(i) {}
    int size() const { return s_->size(i_); }
    int budget() const { return s_->initial[i_].budget; }
    int capacity() const { return s_->initial[i_].cap; }
    int key_dim() const { return s_->d; }
    int value_dim() const { return s_->d; }
    std::span<const std::int64_t> positions() const { return s_->positions(i_); }
    std::int64_t newest_pos() const { return s_->record(i_).newest; }
    std::uint64_t evictions() const { return s_->record(i_).evictions; }
    std::uint64_t merges() const { return 0; }
    std::size_t bytes_per_slot() const {
      return sizeof(T) * 2 * static_cast<std::size_t>(s_->d) + sizeof(std::int64_t) + sizeof(Meta);
    }
    std::size_t bytes_used() const { return static_cast<std::size_t>(size()) * bytes_per_slot(); }
    std::size_t bytes_reserved() const { return static_cast<std::size_t>(capacity()) * bytes_per_slot(); }

   private:
    const Store* s_;
    std::size_t i_;
  };

  Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg), st_(std::make_unique<Store>()) {
    gpu::require_device("CudaBackend");
    const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
    KVTRIM_CHECK(d % 4 == 0 && d <= 256, "CudaBackend: head_dim is ", d,
                 "; the decode kernel expects a multiple of 4 of at most 256");
    policies_.reserve(static_cast<std::size_t>(L));
    Store& s = *st_;
    s.L = L, s.H = H, s.Hq = cfg.n_q_heads, s.g = g, s.d = d;
    s.splits.resize(static_cast<std::size_t>(L));
    // slab layout per head: keys, values, positions, metadata (each 256-byte aligned)
    auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
    std::vector<std::size_t> offset;
    std::size_t total = 0;
    for (int l = 0; l < L; ++l) {
      LayerContext ctx{l, L, H, g, d, {}};
      for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
      policies_.emplace_back(params, ctx);
      int layer_cap = 0;
      for (int h = 0; h < H; ++h) {
        const int budget = cfg.budget_of(l, h), cap = budget + 1;
        Head r;
        r.cap = cap;
        r.budget = budget;
        r.limit = DP::keep_limit(policies_.back(), budget);
        KVTRIM_CHECK(r.limit >= 1 && r.limit <= budget, "CudaBackend: ", P::kName, " keeps ", r.limit,
                     " tokens in layer ", l, " KV head ", h, "; expected 1..budget (", budget, ")");
        r.state = DP::initial(policies_.back(), params, budget);
        offset.push_back(total);
        total += align(sizeof(T) * static_cast<std::size_t>(cap) * d) * 2 +
                 align(sizeof(std::int64_t) * static_cast<std::size_t>(cap)) +
                 align(sizeof(Meta) * static_cast<std::size_t>(cap));
        s.initial.push_back(r);
        layer_cap = std::max(layer_cap, cap);
      }
      s.splits[static_cast<std::size_t>(l)] = gpu::plan_splits(layer_cap);
      s.max_cap = std::max(s.max_cap, layer_cap);
      s.max_splits = std::max(s.max_splits, s.splits[static_cast<std::size_t>(l)]);
    }
    s.slab.allocate(total);
    for (std::size_t i = 0; i < s.initial.size(); ++i) {
      Head& r = s.initial[i];
      auto* base = s.slab.template as<unsigned char>() + offset[i];
      const std::size_t kv = align(sizeof(T) * static_cast<std::size_t>(r.cap) * d);
      r.k = reinterpret_cast<T*>(base);
      r.v = reinterpret_cast<T*>(base + kv);
      r.pos = reinterpret_cast<std::int64_t*>(base + 2 * kv);
      r.meta = reinterpret_cast<Meta*>(base + 2 * kv + align(sizeof(std::int64_t) * static_cast<std::size_t>(r.cap)));
    }
    s.heads.allocate(sizeof(Head) * s.initial.size());
    s.mirror.resize(s.initial.size());
    s.pos.resize(s.initial.size());
    s.pos_valid.assign(s.initial.size(), 0);
    s.host_n.assign(s.initial.size(), 0);
    const std::size_t Hq = static_cast<std::size_t>(s.Hq);
    s.io.allocate(sizeof(float) * (2 * Hq + 2 * static_cast<std::size_t>(H)) * d);
    s.part_ml.allocate(sizeof(float) * Hq * s.max_splits * 2);
    s.part_o.allocate(sizeof(float) * Hq * s.max_splits * d);
    if constexpr (kProbs) {
      s.logits.allocate(sizeof(float) * Hq * s.max_cap);
      s.stats.allocate(sizeof(float) * Hq * 2);
    }
    s.error.allocate(sizeof(int));
    KVTRIM_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    s.own_stream = true;
    KVTRIM_CUBLAS_CHECK(cublasCreate(&s.blas));
    KVTRIM_CUBLAS_CHECK(cublasSetStream(s.blas, s.stream));
    KVTRIM_CUBLAS_CHECK(cublasSetMathMode(s.blas, CUBLAS_DEFAULT_MATH));  // true fp32 GEMMs (no TF32)
    KVTRIM_CUDA_CHECK((gpu::kernels::prepare_decode_attention<T, Head>(g, d)));
    for (std::size_t i = 0; i < s.initial.size(); ++i) views_.emplace_back(st_.get(), i);
    upload_initial();
  }

  const HeadView& head(int layer, int kv) const { return views_[index(layer, kv)]; }
  P& policy(int layer) { return policies_[static_cast<std::size_t>(layer)]; }
  const P& policy(int layer) const { return policies_[static_cast<std::size_t>(layer)]; }

  // The stream every kernel and copy of this cache runs on. A stream set here is not owned (the caller keeps
  // it alive); the work queued so far is finished first.
  cudaStream_t stream() const { return st_->stream; }
  void set_stream(cudaStream_t stream) {
    Store& s = *st_;
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    if (s.own_stream) KVTRIM_CUDA_CHECK(cudaStreamDestroy(s.stream));
    s.stream = stream;
    s.own_stream = false;
    KVTRIM_CUBLAS_CHECK(cublasSetStream(s.blas, stream));
  }
  // Waits for the queued work and reports any error a kernel left (kvtrim::Error).
  void synchronize() const { st_->sync_and_check(); }

  void reset() {
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(st_->stream));
    upload_initial();
  }

  // q: [n_q_heads * d], k, v: [n_kv_heads * d], out: [n_q_heads * d]; host or device memory (see the top).
  void decode(int layer, const float* q, const float* k, const float* v, float* out, std::int64_t pos) {
    Store& s = *st_;
    const int H = s.H, d = s.d;
    const bool dev = same_memory_kind({q, k, v, out}, "decode");
    const std::size_t qb = sizeof(float) * static_cast<std::size_t>(s.Hq) * d;
    const std::size_t kb = sizeof(float) * static_cast<std::size_t>(H) * d;
    if (!dev) {
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.q_in(), q, qb, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.k_in(), k, kb, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.v_in(), v, kb, cudaMemcpyHostToDevice, s.stream));
      q = s.q_in(), k = s.k_in(), v = s.v_in();
    }
    float* o = dev ? out : s.out();
    Head* heads = s.layer_heads(layer);
    int* err = s.error.template as<int>();
    gpu::kernels::append_kernel<T, Meta, State, DP><<<H, 128, 0, s.stream>>>(heads, k, v, d, pos, err);
    if constexpr (P::kTiming == EvictTiming::kBeforeAttention)
      gpu::kernels::evict_kernel<T, Meta, State, DP><<<H, 256, 0, s.stream>>>(heads, d, err);
    attend(layer, heads, q, o);
    if constexpr (kProbs) {
      const dim3 grid(static_cast<unsigned>((s.max_cap + 127) / 128), static_cast<unsigned>(H));
      gpu::kernels::on_attention_kernel<DP, Head>
          <<<grid, 128, 0, s.stream>>>(heads, s.logits.template as<float>(), s.max_cap, s.g);
    }
    if constexpr (P::kTiming == EvictTiming::kAfterAttention)
      gpu::kernels::evict_kernel<T, Meta, State, DP><<<H, 256, 0, s.stream>>>(heads, d, err);
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    if constexpr (kNeverEvicts)
      for (int h = 0; h < H; ++h) ++s.host_n[index(layer, h)];
    s.invalidate(layer);
    if (!dev) {
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(out, o, qb, cudaMemcpyDeviceToHost, s.stream));
      s.sync_and_check();
    }
  }

  // Q: [T x n_q_heads*d], K, V: [T x n_kv_heads*d], out: [T x n_q_heads*d], row-major; host or device memory.
  // Exact causal attention with cuBLAS (fp32 inputs, fp32 GEMMs), then the policy's prompt selection on the
  // device; the kept tokens are stored once, in position order.
  void prefill(int layer, const float* Q, const float* K, const float* V, float* out, int NT,
               std::int64_t first_pos) {
    Store& s = *st_;
    const int H = s.H, Hq = s.Hq, d = s.d, g = s.g;
    const bool dev = same_memory_kind({Q, K, V, out}, "prefill");
    const std::size_t Tz = static_cast<std::size_t>(NT);
    const std::size_t qn = Tz * Hq * d, kn = Tz * H * d;
    gpu::DeviceBuffer in_buf, out_buf;
    if (!dev) {
      in_buf.allocate(sizeof(float) * (qn + 2 * kn));
      out_buf.allocate(sizeof(float) * qn);
      float* base = in_buf.as<float>();
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(base, Q, sizeof(float) * qn, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(base + qn, K, sizeof(float) * kn, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(base + qn + kn, V, sizeof(float) * kn, cudaMemcpyHostToDevice, s.stream));
      Q = base, K = base + qn, V = base + qn + kn;
    }
    float* O = dev ? out : out_buf.as<float>();
    const int window = std::clamp(policy(layer).prompt_window(), 0, NT);

    // ---- exact causal attention, one KV head (and its query group) at a time, in blocks of query rows
    gpu::DeviceBuffer sums;  // col [H x g x NT] then win [H x g x NT]
    float* col = nullptr;
    float* win = nullptr;
    if constexpr (kProbs) {
      sums.allocate(sizeof(float) * 2 * static_cast<std::size_t>(H) * g * Tz);
      KVTRIM_CUDA_CHECK(cudaMemsetAsync(sums.as<float>(), 0, sums.bytes(), s.stream));
      col = sums.as<float>();
      win = col + static_cast<std::size_t>(H) * g * Tz;
    }
    constexpr std::size_t kScoreBytes = std::size_t{256} << 20;  // bound on the score block
    const int B = static_cast<int>(std::clamp<std::size_t>(kScoreBytes / (sizeof(float) * g * Tz), 1, 1024));
    const int rows = std::min(B, NT);
    gpu::DeviceBuffer S(sizeof(float) * static_cast<std::size_t>(g) * rows * Tz);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d)), one = 1.0f, zero = 0.0f;
    for (int kv = 0; kv < H; ++kv) {
      for (int t0 = 0; t0 < NT; t0 += rows) {
        const int b = std::min(rows, NT - t0), width = t0 + b;
        // S^NT (col-major width x b) = K_kv (width x d) * Q^NT; the g query heads of the group share K (stride 0)
        KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
            s.blas, CUBLAS_OP_T, CUBLAS_OP_N, width, b, d, &scale, K + static_cast<std::size_t>(kv) * d, H * d, 0,
            Q + (static_cast<std::size_t>(t0) * Hq + static_cast<std::size_t>(kv) * g) * d, Hq * d, d, &zero,
            S.as<float>(), width, static_cast<long long>(b) * width, g));
        const dim3 grid(static_cast<unsigned>(b), static_cast<unsigned>(g));
        float* c = kProbs ? col + static_cast<std::size_t>(kv) * g * Tz : nullptr;
        float* w = kProbs ? win + static_cast<std::size_t>(kv) * g * Tz : nullptr;
        gpu::kernels::prompt_softmax_kernel<kProbs>
            <<<grid, 256, 0, s.stream>>>(S.as<float>(), b, width, t0, NT, window, c, w);
        KVTRIM_CUDA_CHECK(cudaGetLastError());
        // O^NT (col-major d x b, ld Hq*d) = V_kv^NT (d x width) * P^NT (width x b)
        KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
            s.blas, CUBLAS_OP_N, CUBLAS_OP_N, d, b, width, &one, V + static_cast<std::size_t>(kv) * d, H * d, 0,
            S.as<float>(), width, static_cast<long long>(b) * width, &zero,
            O + (static_cast<std::size_t>(t0) * Hq + static_cast<std::size_t>(kv) * g) * d, Hq * d, d, g));
      }
    }

    // ---- the policy's selection: metadata and scores per prompt token, stable sort, keep marks, store
    Head* heads = s.layer_heads(layer);
    int* err = s.error.template as<int>();
    const std::size_t HT = static_cast<std::size_t>(H) * Tz;
    gpu::DeviceBuffer meta_tmp(sizeof(Meta) * HT), keys(sizeof(std::uint64_t) * 2 * HT), keep(HT),
        offsets(sizeof(int) * (static_cast<std::size_t>(H) + 1));
    std::uint64_t* keys_in = keys.as<std::uint64_t>();
    std::uint64_t* keys_out = keys_in + HT;
    gpu::kernels::prompt_meta_kernel<DP, Head, Meta><<<H, 256, 0, s.stream>>>(
        heads, meta_tmp.as<Meta>(), keys_in, K, H, d, NT, first_pos, col, window > 0 ? win : nullptr, g);
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    bool select = false;
    for (int h = 0; h < H; ++h) select = select || NT > s.initial[index(layer, h)].limit;
    if (select) {
      std::vector<int> off(static_cast<std::size_t>(H) + 1);
      for (int h = 0; h <= H; ++h) off[static_cast<std::size_t>(h)] = h * NT;
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(offsets.as<int>(), off.data(), sizeof(int) * off.size(),
                                        cudaMemcpyHostToDevice, s.stream));
      std::size_t temp_bytes = 0;
      KVTRIM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, temp_bytes, keys_in, keys_out,
                                                                static_cast<int>(HT), H, offsets.as<int>(),
                                                                offsets.as<int>() + 1, 0, 64, s.stream));
      gpu::DeviceBuffer temp(std::max<std::size_t>(temp_bytes, 1));
      KVTRIM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp.as<void>(), temp_bytes, keys_in, keys_out,
                                                                static_cast<int>(HT), H, offsets.as<int>(),
                                                                offsets.as<int>() + 1, 0, 64, s.stream));
      const dim3 grid(static_cast<unsigned>((NT + 255) / 256), static_cast<unsigned>(H));
      gpu::kernels::prompt_mark_kernel<Head>
          <<<grid, 256, 0, s.stream>>>(heads, keys_out, keep.as<unsigned char>(), NT, err);
      KVTRIM_CUDA_CHECK(cudaGetLastError());
      KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // temp is freed when this scope ends
    } else {
      KVTRIM_CUDA_CHECK(cudaMemsetAsync(keep.as<unsigned char>(), 1, HT, s.stream));
    }
    gpu::kernels::prompt_store_kernel<T, Head, Meta><<<H, gpu::kernels::kStoreThreads, 0, s.stream>>>(
        heads, K, V, H, d, NT, first_pos, keep.as<unsigned char>(), meta_tmp.as<Meta>(), err);
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    if constexpr (kNeverEvicts)
      for (int h = 0; h < H; ++h) s.host_n[index(layer, h)] += NT;
    s.invalidate(layer);
    if (!dev) KVTRIM_CUDA_CHECK(cudaMemcpyAsync(out, O, sizeof(float) * qn, cudaMemcpyDeviceToHost, s.stream));
    // The temporaries above are freed when this function returns: wait for the work that reads them.
    s.sync_and_check();
  }

 private:
  std::size_t index(int layer, int kv) const { return static_cast<std::size_t>(layer) * cfg_.n_kv_heads + kv; }

  static bool same_memory_kind(std::initializer_list<const void*> ptrs, const char* op) {
    int device = 0, host = 0;
    for (const void* p : ptrs) (gpu::is_device_pointer(p) ? device : host)++;
    KVTRIM_CHECK(device == 0 || host == 0, "CudaBackend ", op, ": ", device, " of the ", device + host,
                 " buffers are in device memory and ", host,
                 " in host memory; pass all of them in host memory or all in device memory");
    return device > 0;
  }

  void attend(int layer, const Head* heads, const float* q, float* out) {
    Store& s = *st_;
    gpu::kernels::DecodeArgs a;
    a.q = q;
    a.group = s.g;
    a.d = s.d;
    a.scale = 1.0f / std::sqrt(static_cast<float>(s.d));
    a.n_splits = s.splits[static_cast<std::size_t>(layer)];
    a.part_ml = s.part_ml.template as<float>();
    a.part_o = s.part_o.template as<float>();
    a.logits = kProbs ? s.logits.template as<float>() : nullptr;
    a.logits_stride = s.max_cap;
    gpu::kernels::launch_decode_attention<T, Head>(heads, s.H, a, out, s.stats.template as<float>(), s.stream);
  }

  void upload_initial() {
    Store& s = *st_;
    KVTRIM_CUDA_CHECK(cudaMemcpy(s.heads.template as<Head>(), s.initial.data(), sizeof(Head) * s.initial.size(),
                                 cudaMemcpyHostToDevice));
    KVTRIM_CUDA_CHECK(cudaMemset(s.error.template as<int>(), 0, sizeof(int)));
    std::fill(s.host_n.begin(), s.host_n.end(), 0);
    s.mirror_valid = false;
    std::fill(s.pos_valid.begin(), s.pos_valid.end(), 0);
  }

  CacheConfig cfg_;
  std::vector<P> policies_;
  std::unique_ptr<Store> st_;
  std::vector<HeadView> views_;
};

}  // namespace kvtrim
