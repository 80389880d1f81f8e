// kvtrim CUDA backend: CudaBackend<T>, a drop-in for CpuBackend in KVCache<Policy, Backend>.
//
//   #include <kvtrim/kvtrim.hpp>
//   #include <kvtrim/cuda/cuda_backend.cuh>
//   kvtrim::KVCache<Policy, kvtrim::CudaBackend<__half>> cache(cfg, params);
//   cache.backend().set_stream(my_stream);   // optional: the backend otherwise owns a non-blocking stream
//
// Storage type T is float, __half or __nv_bfloat16; every computation accumulates in fp32. Slots live on the
// device, per (layer, KV head), with positions, the policy's SlotMeta and its State; the kernels call the
// policy's own rules (policy.hpp), the ones the CPU backend runs, so a decode step issues kernels only and never
// reads anything back. Introspection (size, positions, evictions, bytes) copies the small per-head records back
// when asked, once per change.
//
// Inputs: q/k/v/out (and Q/K/V/out for prefill) may be host or device pointers, all of the same kind.
//  - host pointers: copied in and out on the backend's stream; the call returns when `out` is written.
//  - device pointers: nothing is copied and the call returns as soon as the work is queued on the stream;
//    KVCache's finiteness check reads inputs on the host, so with CacheConfig::check_finite on (the default)
//    device inputs are refused with a kvtrim::Error that says to set it off (the caller's promise that they are
//    finite); they are never read on the host. Kernel-side failures (a head with no free slot, every token
//    protected) are then reported by the next synchronize() or introspection call.
// Requirements (checked at construction, kvtrim::Error otherwise): a CUDA device, head_dim a multiple of 4 and
// at most 256.
//
// Where the work runs: decode is kernels only (append, eviction, merge or structured fit, attention, the
// policy's attention rule), plus cuBLAS GEMMs for low-rank storage's projections. Prefill runs the causal
// attention with cuBLAS and the selection on the device, except for policies whose prompt stage is host code
// (rules::host_prompt): it runs on a host copy of the prompt once per prefill, so the decode path never reads
// anything back.
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
#include <utility>
#include <vector>

#include <kvtrim/config.hpp>
#include <kvtrim/error.hpp>
#include <kvtrim/head_store.hpp>
#include <kvtrim/memory.hpp>
#include <kvtrim/policy.hpp>
#include <kvtrim/simhash.hpp>

#include "check.hpp"
#include "kernels.cuh"
#include "status.hpp"

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
 public:
  using Meta = typename P::SlotMeta;
  using State = typename P::State;
  using Head = gpu::DevHead<T, Meta, State>;
  static constexpr bool kProbs = has(P::kSignals, Signals::kAttention);
  static constexpr bool kHash = rules::simhash<P>();
  static constexpr bool kStructured = rules::structured<P>();
  static constexpr bool kMerges = rules::merges<P>();
  static constexpr bool kHostPrompt = rules::host_prompt<P>();
  static constexpr bool kNeverEvicts = never_evicts_in_prefill<P>();
  static constexpr bool kProjects = requires(const P& p) { p.key_width(0); };
  static_assert(!(kHostPrompt && kHash), "kvtrim::CudaBackend: a host prompt stage with SimHash codes is not supported");

 private:
  // Everything the head views point at lives here, on the heap, so Impl (and KVCache) can move.
  struct Store {
    int L = 0, H = 0, Hq = 0, g = 0, d = 0;  // d: head_dim (inputs and outputs)
    int max_cap = 0, max_splits = 0, max_width = 0;
    std::vector<int> splits;  // per layer
    // Stored width of the keys and values of each layer: head_dim, or for low-rank storage (kProjects) the
    // layer's largest key or value rank rounded up to a multiple of 4, the bases padded with zero columns (zero
    // coordinates change no dot product), so one decode kernel serves keys and values of one width.
    std::vector<int> width;
    gpu::DeviceBuffer low;    // kProjects: projected q, k, v and the output before unprojection
    gpu::DeviceBuffer bases;  // kProjects: per layer [2 x H x d x width] column-major: key bases, value bases
    std::vector<std::size_t> basis_at;  // per layer, offset into bases (floats)
    cudaStream_t stream = nullptr;
    bool own_stream = false;
    cublasHandle_t blas = nullptr;
    gpu::DeviceBuffer slab, heads, io, part_ml, part_o, logits, stats, error;
    gpu::DeviceBuffer proj, codes;  // kHash: per-layer projections [L x bits x d]; step codes [Hq + H]
    gpu::DeviceBuffer fit_ints, fit_meta;  // kStructured: fit_kernel scratch [H x 4 x max_cap], [H x max_cap]
    int bits = 0;
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
    float* q_low() const { return low.as<float>(); }
    float* k_low() const { return q_low() + static_cast<std::size_t>(Hq) * max_width; }
    float* v_low() const { return k_low() + static_cast<std::size_t>(H) * max_width; }
    float* o_low() const { return v_low() + static_cast<std::size_t>(H) * max_width; }
    const float* key_basis(int layer) const { return bases.as<float>() + basis_at[static_cast<std::size_t>(layer)]; }
    const float* value_basis(int layer) const {
      return key_basis(layer) + static_cast<std::size_t>(H) * d * width[static_cast<std::size_t>(layer)];
    }
    Head* layer_heads(int layer) const { return heads.as<Head>() + static_cast<std::size_t>(layer) * H; }
    const float* layer_proj(int layer) const {
      return proj.as<float>() + static_cast<std::size_t>(layer) * bits * d;
    }

    void invalidate(int layer) {
      mirror_valid = false;
      for (int h = 0; h < H; ++h) pos_valid[static_cast<std::size_t>(layer) * H + h] = 0;
    }
    // Waits for the stream, then turns a status a kernel reported into kvtrim::Error (and clears it).
    void sync_and_check() const {
      KVTRIM_CUDA_CHECK(cudaStreamSynchronize(stream));
      int code = 0;
      KVTRIM_CUDA_CHECK(cudaMemcpy(&code, error.as<int>(), sizeof(int), cudaMemcpyDeviceToHost));
      if (code == 0) return;
      KVTRIM_CUDA_CHECK(cudaMemsetAsync(error.as<int>(), 0, sizeof(int), stream));
      KVTRIM_CUDA_CHECK(cudaStreamSynchronize(stream));
      mirror_valid = false;
      std::fill(pos_valid.begin(), pos_valid.end(), 0);
      detail::throw_error("CudaBackend<", P::kName, ">: ", gpu::to_string(static_cast<gpu::Status>(code)),
                          " (status ", code, "; the cache state is no longer reliable: call reset())");
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
    int key_dim() const { return width(); }  // stored width (padded rank under low-rank storage)
    int value_dim() const { return width(); }
    std::span<const std::int64_t> positions() const { return s_->positions(i_); }  // a host copy
    const T* key_data() const { return s_->record(i_).k; }  // device memory
    const T* value_data() const { return s_->record(i_).v; }
    std::int64_t newest_pos() const { return s_->record(i_).newest; }
    std::uint64_t evictions() const { return s_->record(i_).evictions; }
    std::uint64_t merges() const { return s_->record(i_).merges; }
    std::size_t bytes_per_slot() const {
      return sizeof(T) * 2 * static_cast<std::size_t>(width()) + sizeof(std::int64_t) + sizeof(Meta);
    }
    std::size_t bytes_used() const { return static_cast<std::size_t>(size()) * bytes_per_slot(); }
    std::size_t bytes_reserved() const { return static_cast<std::size_t>(capacity()) * bytes_per_slot(); }

   private:
    int width() const { return s_->width[i_ / static_cast<std::size_t>(s_->H)]; }
    const Store* s_;
    std::size_t i_;
  };

  Impl(const CacheConfig& cfg, const typename P::Params& params) : cfg_(cfg), st_(std::make_unique<Store>()) {
    gpu::require_device("CudaBackend");
    const int L = cfg.n_layers, H = cfg.n_kv_heads, d = cfg.head_dim, g = cfg.group_size();
    KVTRIM_CHECK(d % 4 == 0 && d <= 256, "CudaBackend: head_dim is ", d,
                 "; the decode kernel expects a multiple of 4 of at most 256");
    // the per-head host records come first: refuse a head count this machine cannot even list
    detail::require_bytes(ByteCount{}.add(double(L) * H, sizeof(Head) + 2 * sizeof(std::size_t)), physical_memory(),
                          P::kName.data(), "this machine");
    policies_.reserve(static_cast<std::size_t>(L));
    Store& s = *st_;
    s.L = L, s.H = H, s.Hq = cfg.n_q_heads, s.g = g, s.d = d;
    s.splits.resize(static_cast<std::size_t>(L));
    s.width.resize(static_cast<std::size_t>(L));
    // slab layout per head: keys, values, positions, metadata (each 256-byte aligned)
    auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
    std::vector<std::size_t> offset;
    std::size_t total = 0;
    for (int l = 0; l < L; ++l) {
      LayerContext ctx{l, L, H, g, d, {}};
      for (int h = 0; h < H; ++h) ctx.budgets.push_back(cfg.budget_of(l, h));
      policies_.emplace_back(params, ctx);
      int w = d;
      if constexpr (kProjects) {
        int rank = 1;
        for (int h = 0; h < H; ++h)
          rank = std::max({rank, policies_.back().key_width(h), policies_.back().value_width(h)});
        w = (rank + 3) / 4 * 4;  // <= head_dim, itself a multiple of 4
      }
      s.width[static_cast<std::size_t>(l)] = w;
      s.max_width = std::max(s.max_width, w);
      int layer_cap = 0;
      for (int h = 0; h < H; ++h) {
        const int budget = cfg.budget_of(l, h), cap = budget + 1 + cfg.chunk_capacity;
        Head r;
        r.cap = cap;
        r.budget = budget;
        r.limit = rules::keep_limit(policies_.back(), budget);
        r.prompt_limit = rules::prompt_limit(policies_.back(), budget);
        KVTRIM_CHECK(r.limit >= 1 && r.limit <= budget && r.prompt_limit >= 1 && r.prompt_limit <= budget,
                     "CudaBackend: ", P::kName, " keeps ", r.limit, " tokens after a decode step and ",
                     r.prompt_limit, " after a prompt in layer ", l, " KV head ", h, "; expected 1..budget (",
                     budget, ")");
        r.state = policies_.back().initial(h, budget);
        offset.push_back(total);
        total += align(sizeof(T) * static_cast<std::size_t>(cap) * w) * 2 +
                 align(sizeof(std::int64_t) * static_cast<std::size_t>(cap)) +
                 align(sizeof(Meta) * static_cast<std::size_t>(cap));
        s.initial.push_back(r);
        layer_cap = std::max(layer_cap, cap);
      }
      s.splits[static_cast<std::size_t>(l)] = gpu::plan_splits(layer_cap);
      s.max_cap = std::max(s.max_cap, layer_cap);
      s.max_splits = std::max(s.max_splits, s.splits[static_cast<std::size_t>(l)]);
    }
    std::size_t free_bytes = 0, device_bytes = 0;
    KVTRIM_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &device_bytes));
    detail::require_bytes(ByteCount{}.add(double(total), 1.0), double(free_bytes), P::kName.data(),
                          "the device's free memory");
    s.slab.allocate(total);
    for (std::size_t i = 0; i < s.initial.size(); ++i) {
      Head& r = s.initial[i];
      auto* base = s.slab.template as<unsigned char>() + offset[i];
      const int w = s.width[i / static_cast<std::size_t>(H)];
      const std::size_t kv = align(sizeof(T) * static_cast<std::size_t>(r.cap) * w);
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
    s.part_o.allocate(sizeof(float) * Hq * s.max_splits * s.max_width);
    if constexpr (kProjects) {
      s.low.allocate(sizeof(float) * (2 * Hq + 2 * static_cast<std::size_t>(H)) * s.max_width);
      upload_bases();
    }
    if constexpr (kProbs) {
      s.logits.allocate(sizeof(float) * Hq * s.max_cap);
      s.stats.allocate(sizeof(float) * Hq * 2);
    }
    s.error.allocate(sizeof(int));
    if constexpr (kHash) {
      // one projection per layer, as the CPU policy draws it; uploaded once
      s.bits = policies_.front().projection(d).bits();
      std::vector<float> all;
      for (const P& pol : policies_) {
        const SimHashProjection pr = pol.projection(d);
        KVTRIM_CHECK(pr.dim() == d && pr.bits() == s.bits, "CudaBackend: ", P::kName, " projection is ", pr.bits(),
                     " x ", pr.dim(), "; expected ", s.bits, " x head_dim (", d, ")");
        all.insert(all.end(), pr.data(), pr.data() + static_cast<std::size_t>(pr.bits()) * pr.dim());
      }
      s.proj.allocate(sizeof(float) * all.size());
      KVTRIM_CUDA_CHECK(
          cudaMemcpy(s.proj.template as<void>(), all.data(), sizeof(float) * all.size(), cudaMemcpyHostToDevice));
      KVTRIM_CUDA_CHECK(cudaDeviceSynchronize());  // the copy is complete before any stream reads it
      s.codes.allocate(sizeof(std::uint64_t) * (Hq + static_cast<std::size_t>(H)));
    }
    if constexpr (kStructured) {
      s.fit_ints.allocate(sizeof(int) * 4 * static_cast<std::size_t>(H) * s.max_cap);
      s.fit_meta.allocate(sizeof(Meta) * static_cast<std::size_t>(H) * s.max_cap);
    }
    KVTRIM_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    s.own_stream = true;
    KVTRIM_CUBLAS_CHECK(cublasCreate(&s.blas));
    KVTRIM_CUBLAS_CHECK(cublasSetStream(s.blas, s.stream));
    KVTRIM_CUBLAS_CHECK(cublasSetMathMode(s.blas, CUBLAS_DEFAULT_MATH));  // true fp32 GEMMs (no TF32)
    for (int w : s.width) KVTRIM_CUDA_CHECK((gpu::kernels::prepare_decode_attention<T, Head>(g, w)));
    for (std::size_t i = 0; i < s.initial.size(); ++i) views_.emplace_back(st_.get(), i);
    upload_initial();
  }

  const HeadView& head(int layer, int kv) const { return views_[index(layer, kv)]; }
  // Whether p points into device memory (KVCache never reads such inputs on the host).
  bool is_device_memory(const void* p) const { return gpu::is_device_pointer(p); }
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
    chunk(layer, q, k, v, out, 1, pos, Step::kDecode);
  }
  // T tokens after the ones held, eviction after the chunk (KVCache::append); at most 1 + chunk_capacity.
  void append(int layer, const float* Q, const float* K, const float* V, float* out, int count, std::int64_t first_pos) {
    chunk(layer, Q, K, V, out, count, first_pos, Step::kAppend);
  }
  // The outputs append() would write; the heads' records are restored afterwards and no policy rule runs.
  void verify(int layer, const float* Q, const float* K, const float* V, float* out, int count, std::int64_t first_pos) {
    chunk(layer, Q, K, V, out, count, first_pos, Step::kVerify);
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
    // from here on rows are w wide: head_dim, or the layer's stored width under low-rank storage
    const int w = s.width[static_cast<std::size_t>(layer)];
    float* O_stored = O;
    gpu::DeviceBuffer low_buf;
    if constexpr (kProjects) {  // Q and O: [T x Hq x w]; K and V: [T x H x w]
      low_buf.allocate(sizeof(float) * Tz * (2 * static_cast<std::size_t>(Hq) + 2 * H) * w);
      float* ql = low_buf.as<float>();
      float* kl = ql + Tz * Hq * w;
      float* vl = kl + Tz * H * w;
      O_stored = vl + Tz * H * w;
      project(s.key_basis(layer), w, Q, g, d, static_cast<long long>(g) * d, NT, ql, static_cast<long long>(g) * w,
              static_cast<long long>(Hq) * d, static_cast<long long>(Hq) * w);
      project(s.key_basis(layer), w, K, 1, d, d, NT, kl, w, static_cast<long long>(H) * d,
              static_cast<long long>(H) * w);
      project(s.value_basis(layer), w, V, 1, d, d, NT, vl, w, static_cast<long long>(H) * d,
              static_cast<long long>(H) * w);
      Q = ql, K = kl, V = vl;
    }
    const int window = std::clamp(rules::prompt_window(policy(layer)), 0, NT);
    const int vote_window = std::clamp(rules::vote_window(policy(layer)), 0, NT);
    const bool need_sums = kProbs || vote_window > 0;

    // ---- exact causal attention, one KV head (and its query group) at a time, in blocks of query rows
    gpu::DeviceBuffer sums;  // col, win, vote: [H x g x NT] each
    float* col = nullptr;
    float* win = nullptr;
    float* vote = nullptr;
    if (need_sums) {
      const std::size_t one = static_cast<std::size_t>(H) * g * Tz;
      sums.allocate(sizeof(float) * 3 * one);
      KVTRIM_CUDA_CHECK(cudaMemsetAsync(sums.as<float>(), 0, sums.bytes(), s.stream));
      col = sums.as<float>();
      win = col + one;
      vote = win + one;
    }
    constexpr std::size_t kScoreBytes = std::size_t{256} << 20;  // bound on the score block
    const int B = static_cast<int>(std::clamp<std::size_t>(kScoreBytes / (sizeof(float) * g * Tz), 1, 1024));
    const int rows = std::min(B, NT);
    gpu::DeviceBuffer S(sizeof(float) * static_cast<std::size_t>(g) * rows * Tz);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d)), one = 1.0f, zero = 0.0f;
    for (int kv = 0; kv < H; ++kv) {
      for (int t0 = 0; t0 < NT; t0 += rows) {
        const int b = std::min(rows, NT - t0), width = t0 + b;
        // S^NT (col-major width x b) = K_kv (width x w) * Q^NT; the g query heads of the group share K (stride 0)
        KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
            s.blas, CUBLAS_OP_T, CUBLAS_OP_N, width, b, w, &scale, K + static_cast<std::size_t>(kv) * w, H * w, 0,
            Q + (static_cast<std::size_t>(t0) * Hq + static_cast<std::size_t>(kv) * g) * w, Hq * w, w, &zero,
            S.as<float>(), width, static_cast<long long>(b) * width, g));
        const dim3 grid(static_cast<unsigned>(b), static_cast<unsigned>(g));
        const std::size_t at = static_cast<std::size_t>(kv) * g * Tz;
        if (need_sums)
          gpu::kernels::prompt_softmax_kernel<true><<<grid, 256, 0, s.stream>>>(
              S.as<float>(), b, width, t0, NT, window, col + at, win + at, vote_window, vote + at);
        else
          gpu::kernels::prompt_softmax_kernel<false>
              <<<grid, 256, 0, s.stream>>>(S.as<float>(), b, width, t0, NT, 0, nullptr, nullptr, 0, nullptr);
        KVTRIM_CUDA_CHECK(cudaGetLastError());
        // O^NT (col-major w x b, ld Hq*w) = V_kv^NT (w x width) * P^NT (width x b)
        KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
            s.blas, CUBLAS_OP_N, CUBLAS_OP_N, w, b, width, &one, V + static_cast<std::size_t>(kv) * w, H * w, 0,
            S.as<float>(), width, static_cast<long long>(b) * width, &zero,
            O_stored + (static_cast<std::size_t>(t0) * Hq + static_cast<std::size_t>(kv) * g) * w, Hq * w, w, g));
      }
    }
    if constexpr (kProjects)
      unproject(s.value_basis(layer), w, O_stored, g, static_cast<long long>(g) * w, NT, O,
                static_cast<long long>(g) * d, static_cast<long long>(Hq) * w, static_cast<long long>(Hq) * d);

    if constexpr (kHostPrompt) {
      host_prompt(layer, K, V, NT, first_pos, col, window > 0 ? win : nullptr);
    } else {
      // ---- the policy's selection: metadata and scores per prompt token, stable sort, keep marks, store
      Head* heads = s.layer_heads(layer);
      int* err = s.error.template as<int>();
      const std::size_t HT = static_cast<std::size_t>(H) * Tz;
      gpu::DeviceBuffer meta_tmp(sizeof(Meta) * HT), keys(sizeof(std::uint64_t) * 2 * HT), keep(HT),
          offsets(sizeof(int) * (static_cast<std::size_t>(H) + 1));
      std::uint64_t* keys_in = keys.as<std::uint64_t>();
      std::uint64_t* keys_out = keys_in + HT;
      gpu::DeviceBuffer prompt_codes;  // kHash: [T x H] key codes, then the last token's [Hq] query codes
      const std::uint64_t* k_codes = nullptr;
      const std::uint64_t* q_codes = nullptr;
      if constexpr (kHash) {
        prompt_codes.allocate(sizeof(std::uint64_t) * (Tz * H + static_cast<std::size_t>(Hq)));
        std::uint64_t* c = prompt_codes.as<std::uint64_t>();
        hash(layer, K, NT * H, c);
        hash(layer, Q + (Tz - 1) * Hq * w, Hq, c + Tz * H);
        k_codes = c, q_codes = c + Tz * H;
      }
      gpu::kernels::PromptArgs pa;
      pa.K = K, pa.n_kv = H, pa.d = w, pa.T = NT, pa.group = g, pa.first_pos = first_pos;
      pa.col = kProbs ? col : nullptr;
      pa.win = kProbs && window > 0 ? win : nullptr;
      pa.vote = vote_window > 0 ? vote : nullptr;
      pa.k_codes = k_codes, pa.last_q_codes = q_codes;
      gpu::kernels::prompt_meta_kernel<P, Head><<<H, 256, 0, s.stream>>>(heads, meta_tmp.as<Meta>(), keys_in, pa);
      KVTRIM_CUDA_CHECK(cudaGetLastError());
      if constexpr (kStructured) {
        gpu::DeviceBuffer fit_ints(sizeof(int) * 6 * HT), fit_meta(sizeof(Meta) * 3 * HT),
            fit_pos(sizeof(std::int64_t) * 2 * HT);
        gpu::kernels::prompt_fit_kernel<P, Head, Meta><<<H, gpu::kernels::kFitThreads, 0, s.stream>>>(
            heads, meta_tmp.as<Meta>(), keep.as<unsigned char>(), NT, first_pos, fit_ints.as<int>(),
            fit_meta.as<Meta>(), fit_pos.as<std::int64_t>(), err);
        KVTRIM_CUDA_CHECK(cudaGetLastError());
        KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // the scratch is freed when this scope ends
      } else {
        select_prompt(layer, NT, keys_in, keys_out, offsets.as<int>(), keep.as<unsigned char>());
      }
      gpu::kernels::prompt_store_kernel<T, Head, Meta><<<H, gpu::kernels::kStoreThreads, 0, s.stream>>>(
          heads, K, V, H, w, NT, first_pos, keep.as<unsigned char>(), meta_tmp.as<Meta>(), err);
      KVTRIM_CUDA_CHECK(cudaGetLastError());
    }
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
    a.d = s.width[static_cast<std::size_t>(layer)];
    a.scale = 1.0f / std::sqrt(static_cast<float>(s.d));  // head_dim's scale, also in the low-rank space
    a.n_splits = s.splits[static_cast<std::size_t>(layer)];
    a.part_ml = s.part_ml.template as<float>();
    a.part_o = s.part_o.template as<float>();
    a.logits = kProbs ? s.logits.template as<float>() : nullptr;
    a.logits_stride = s.max_cap;
    gpu::kernels::launch_decode_attention<T, Head>(heads, s.H, a, out, s.stats.template as<float>(), s.stream);
  }

 public:
  // Decide-only steps (KVCache::insert / observe): the token joins (and a policy that evicts before attention
  // evicts); later the engine's probabilities [n_q_heads x stride] (host or device memory) come back for the
  // policy's attention rule and the eviction after attention.
  void insert_step(int layer, const float* q, const float* k, const float* v, std::int64_t pos) {
    Store& s = *st_;
    const int H = s.H, d = s.d;
    const bool dev = same_memory_kind({q, k, v}, "insert");
    if (!dev) {
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.q_in(), q, sizeof(float) * s.Hq * d, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.k_in(), k, sizeof(float) * H * d, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.v_in(), v, sizeof(float) * H * d, cudaMemcpyHostToDevice, s.stream));
      q = s.q_in(), k = s.k_in(), v = s.v_in();
    }
    Head* heads = s.layer_heads(layer);
    const auto [q_codes, k_codes] = step_codes(layer, q, k);
    gpu::kernels::append_kernel<T, P><<<H, 128, 0, s.stream>>>(
        heads, gpu::kernels::AppendArgs{k, v, d, s.g, k_codes, q_codes, pos, s.error.template as<int>()});
    if constexpr (P::kTiming == EvictTiming::kBeforeAttention) evict(heads, d);
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    if constexpr (kNeverEvicts)
      for (int h = 0; h < H; ++h) ++s.host_n[index(layer, h)];
    s.invalidate(layer);
    s.sync_and_check();  // the engine reads the view next
  }
  void observe_step(int layer, const float* probs, int stride) {
    Store& s = *st_;
    Head* heads = s.layer_heads(layer);
    if constexpr (kProbs) {
      const bool dev = gpu::is_device_pointer(probs);
      // A head holds at most budget + 1 <= stride slots during a step; the rows are as wide as the caller's.
      const std::size_t width = static_cast<std::size_t>(std::min(stride, s.max_cap));
      KVTRIM_CUDA_CHECK(cudaMemcpy2DAsync(s.logits.template as<float>(), sizeof(float) * s.max_cap, probs,
                                          sizeof(float) * stride, sizeof(float) * width, s.Hq,
                                          dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice, s.stream));
      const dim3 grid(static_cast<unsigned>((s.max_cap + 127) / 128), static_cast<unsigned>(s.H));
      gpu::kernels::on_attention_kernel<P, Head>
          <<<grid, 128, 0, s.stream>>>(heads, s.logits.template as<float>(), s.max_cap, s.g);
    } else {
      (void)probs, (void)stride;
    }
    if constexpr (P::kTiming == EvictTiming::kAfterAttention) evict(heads, s.d);
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    s.invalidate(layer);
    s.sync_and_check();
  }

 private:
  enum class Step { kDecode, kAppend, kVerify };

  // SimHash codes of one token's queries [n_q_heads] and keys [n_kv_heads] (device memory), for policies that
  // read them; null pointers otherwise.
  std::pair<const std::uint64_t*, const std::uint64_t*> step_codes(int layer, const float* q, const float* k) {
    if constexpr (kHash) {
      Store& s = *st_;
      std::uint64_t* c = s.codes.template as<std::uint64_t>();
      hash(layer, q, s.Hq, c);
      hash(layer, k, s.H, c + s.Hq);
      return {c, c + s.Hq};
    } else {
      (void)layer, (void)q, (void)k;
      return {nullptr, nullptr};
    }
  }

  // T tokens of one layer, one after the other: append (with the policy's on_insert unless verifying),
  // [eviction before attention: decode only], attention, the attention rule, [eviction after attention: decode,
  // or once after the chunk for append]. Verify restores the layer's records at the end.
  void chunk(int layer, const float* Q, const float* K, const float* V, float* out, int count, std::int64_t first_pos,
             Step mode) {
    Store& s = *st_;
    const int H = s.H, d = s.d;
    KVTRIM_CHECK(count <= 1 + cfg_.chunk_capacity, "CudaBackend: a chunk of ", count, " tokens needs ",
                 "CacheConfig::chunk_capacity >= ", count - 1, " (it is ", cfg_.chunk_capacity,
                 "): the device heads are allocated once");
    const bool dev = same_memory_kind({Q, K, V, out}, mode == Step::kDecode ? "decode" : "append/verify");
    const std::size_t qn = static_cast<std::size_t>(s.Hq) * d, kn = static_cast<std::size_t>(H) * d;
    const std::size_t Tz = static_cast<std::size_t>(count);
    gpu::DeviceBuffer chunk_io;  // host inputs of a chunk of more than one token; a single token uses the io buffer
    if (!dev) {
      float *q = s.q_in(), *k = s.k_in(), *v = s.v_in();
      if (count > 1) {
        chunk_io.allocate(sizeof(float) * Tz * (2 * qn + 2 * kn));
        q = chunk_io.as<float>(), k = q + Tz * qn, v = k + Tz * kn;
      }
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(q, Q, sizeof(float) * Tz * qn, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(k, K, sizeof(float) * Tz * kn, cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(v, V, sizeof(float) * Tz * kn, cudaMemcpyHostToDevice, s.stream));
      Q = q, K = k, V = v;
    }
    float* O = dev ? out : count > 1 ? chunk_io.as<float>() + Tz * (qn + 2 * kn) : s.out();
    Head* heads = s.layer_heads(layer);
    int* err = s.error.template as<int>();
    const int w = s.width[static_cast<std::size_t>(layer)];
    gpu::DeviceBuffer saved;  // verify: the layer's records as they were
    if (mode == Step::kVerify) {
      saved.allocate(sizeof(Head) * H);
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(saved.as<Head>(), heads, sizeof(Head) * H, cudaMemcpyDeviceToDevice, s.stream));
    }
    for (int t = 0; t < count; ++t) {
      const float* q = Q + static_cast<std::size_t>(t) * qn;
      const float* k = K + static_cast<std::size_t>(t) * kn;
      const float* v = V + static_cast<std::size_t>(t) * kn;
      float* o = O + static_cast<std::size_t>(t) * qn;
      float* o_stored = o;  // the attention output in the stored space
      if constexpr (kProjects) {  // everything below runs in the low-rank space
        project(s.key_basis(layer), w, q, s.g, d, s.g * d, 1, s.q_low(), s.g * w, 0);
        project(s.key_basis(layer), w, k, 1, d, d, 1, s.k_low(), w, 0);
        project(s.value_basis(layer), w, v, 1, d, d, 1, s.v_low(), w, 0);
        q = s.q_low(), k = s.k_low(), v = s.v_low();
        o_stored = s.o_low();
      }
      const auto [q_codes, k_codes] = step_codes(layer, q, k);
      gpu::kernels::AppendArgs a{k, v, w, s.g, k_codes, q_codes, first_pos + t, err};
      a.rules = mode != Step::kVerify;
      gpu::kernels::append_kernel<T, P><<<H, 128, 0, s.stream>>>(heads, a);
      if (mode == Step::kDecode && P::kTiming == EvictTiming::kBeforeAttention) evict(heads, w);
      attend(layer, heads, q, o_stored);
      if constexpr (kProjects) unproject(s.value_basis(layer), w, o_stored, s.g, s.g * w, 1, o, s.g * d, 0);
      if constexpr (kProbs) {
        if (mode != Step::kVerify) {
          const dim3 grid(static_cast<unsigned>((s.max_cap + 127) / 128), static_cast<unsigned>(H));
          gpu::kernels::on_attention_kernel<P, Head>
              <<<grid, 128, 0, s.stream>>>(heads, s.logits.template as<float>(), s.max_cap, s.g);
        }
      }
      if (mode == Step::kDecode && P::kTiming == EvictTiming::kAfterAttention) evict(heads, w);
      KVTRIM_CUDA_CHECK(cudaGetLastError());
    }
    if (mode == Step::kAppend) evict(heads, w);
    if (mode == Step::kVerify)
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(heads, saved.as<Head>(), sizeof(Head) * H, cudaMemcpyDeviceToDevice, s.stream));
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    if constexpr (kNeverEvicts)
      if (mode != Step::kVerify)
        for (int h = 0; h < H; ++h) s.host_n[index(layer, h)] += count;
    if (mode != Step::kVerify) s.invalidate(layer);
    if (!dev) KVTRIM_CUDA_CHECK(cudaMemcpyAsync(out, O, sizeof(float) * Tz * qn, cudaMemcpyDeviceToHost, s.stream));
    // a chunk's temporaries are freed when this function returns; a host caller waits for `out` anyway
    if (!dev || count > 1 || mode == Step::kVerify) s.sync_and_check();
  }

  // Keep marks of a prompt by the policy's sort keys: the lowest T - prompt_limit of each head are dropped.
  void select_prompt(int layer, int NT, const std::uint64_t* keys_in, std::uint64_t* keys_out, int* offsets,
                     unsigned char* keep) {
    Store& s = *st_;
    const int H = s.H;
    const std::size_t HT = static_cast<std::size_t>(H) * NT;
    bool select = false;
    for (int h = 0; h < H; ++h) select = select || NT > s.initial[index(layer, h)].prompt_limit;
    if (!select) {
      KVTRIM_CUDA_CHECK(cudaMemsetAsync(keep, 1, HT, s.stream));
      return;
    }
    std::vector<int> off(static_cast<std::size_t>(H) + 1);
    for (int h = 0; h <= H; ++h) off[static_cast<std::size_t>(h)] = h * NT;
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(offsets, off.data(), sizeof(int) * off.size(), cudaMemcpyHostToDevice, s.stream));
    std::size_t temp_bytes = 0;
    KVTRIM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, temp_bytes, keys_in, keys_out,
                                                              static_cast<int>(HT), H, offsets, offsets + 1, 0, 64,
                                                              s.stream));
    gpu::DeviceBuffer temp(std::max<std::size_t>(temp_bytes, 1));
    KVTRIM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp.as<void>(), temp_bytes, keys_in, keys_out,
                                                              static_cast<int>(HT), H, offsets, offsets + 1, 0, 64,
                                                              s.stream));
    const dim3 grid(static_cast<unsigned>((NT + 255) / 256), static_cast<unsigned>(H));
    gpu::kernels::prompt_mark_kernel<Head>
        <<<grid, 256, 0, s.stream>>>(s.layer_heads(layer), keys_out, keep, NT, s.error.template as<int>());
    KVTRIM_CUDA_CHECK(cudaGetLastError());
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // off and temp are freed when this function returns
  }

  // One decode step's eviction: one victim at a time (arg-min, or with merges), or the policy's structured fit.
  void evict(Head* heads, int w) {
    Store& s = *st_;
    int* err = s.error.template as<int>();
    if constexpr (kMerges)
      gpu::kernels::merge_evict_kernel<T, P><<<s.H, gpu::kernels::kMergeThreads, 0, s.stream>>>(heads, w, err);
    else if constexpr (kStructured)
      gpu::kernels::fit_kernel<T, P><<<s.H, gpu::kernels::kFitThreads, 0, s.stream>>>(
          heads, w, s.max_cap, s.fit_ints.template as<int>(), s.fit_meta.template as<Meta>(), err);
    else
      gpu::kernels::evict_kernel<T, P><<<s.H, 256, 0, s.stream>>>(heads, w, err);
  }

  // kHostPrompt: the policy's on_insert and host prompt stage over a host copy of the prompt (with the attention
  // sums computed on the device), then the kept tokens, the counters, the state and the limit go to the device.
  // K, V, col, win are device pointers; runs once per prefill (the decode path never comes here).
  void host_prompt(int layer, const float* K, const float* V, int NT, std::int64_t first_pos,
                   const float* col, const float* win) {
    Store& s = *st_;
    const int H = s.H, d = s.width[static_cast<std::size_t>(layer)], g = s.g;  // stored width
    const std::size_t Tz = static_cast<std::size_t>(NT), sums = static_cast<std::size_t>(H) * g * Tz;
    std::vector<float> k(Tz * H * d), v(Tz * H * d), c(sums), w(win != nullptr ? sums : 0);
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(k.data(), K, sizeof(float) * k.size(), cudaMemcpyDeviceToHost, s.stream));
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(v.data(), V, sizeof(float) * v.size(), cudaMemcpyDeviceToHost, s.stream));
    if (col != nullptr)
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(c.data(), col, sizeof(float) * sums, cudaMemcpyDeviceToHost, s.stream));
    if (win != nullptr)
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(w.data(), win, sizeof(float) * sums, cudaMemcpyDeviceToHost, s.stream));
    std::vector<Head> recs(static_cast<std::size_t>(H));
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(recs.data(), s.layer_heads(layer), sizeof(Head) * recs.size(),
                                      cudaMemcpyDeviceToHost, s.stream));
    s.sync_and_check();
    P& pol = policy(layer);
    gpu::DeviceBuffer rows(sizeof(float) * 2 * static_cast<std::size_t>(s.max_cap) * d);
    for (int kv = 0; kv < H; ++kv) {
      Head& r = recs[static_cast<std::size_t>(kv)];
      HeadStore<Meta> hs(d, d, r.budget);
      hs.reserve(NT + 1);
      State hst = r.state;
      for (int t = 0; t < NT; ++t) {
        const std::size_t row = static_cast<std::size_t>(t) * H + kv;
        const int slot = hs.append(k.data() + row * d, v.data() + row * d, first_pos + t);
        P::on_insert(hst, hs.meta(slot), first_pos + t, TokenInputs{k.data() + row * d, d, g, true});
      }
      const std::size_t at = static_cast<std::size_t>(kv) * g * Tz;
      const PromptSums sums{AttentionRows{col != nullptr ? c.data() + at : nullptr, NT, g, NT},
                            AttentionRows{win != nullptr ? w.data() + at : nullptr, NT, g, NT}, AttentionRows{}};
      const int limit = pol.host_prompt(hst, hs, sums);
      KVTRIM_CHECK(hs.size() <= r.budget, P::kName, " left ", hs.size(), " prompt tokens in layer ", layer,
                   " KV head ", kv, " over its budget of ", r.budget);
      const int n = hs.size();
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(rows.as<float>(), hs.keys().data(), sizeof(float) * n * d,
                                        cudaMemcpyHostToDevice, s.stream));
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(rows.as<float>() + static_cast<std::size_t>(n) * d, hs.values().data(),
                                        sizeof(float) * n * d, cudaMemcpyHostToDevice, s.stream));
      const std::size_t count = static_cast<std::size_t>(n) * d;
      if (count > 0) {
        const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((count + 255) / 256, 4096));
        gpu::kernels::convert_rows_kernel<T><<<blocks, 256, 0, s.stream>>>(r.k, rows.as<float>(), count);
        gpu::kernels::convert_rows_kernel<T><<<blocks, 256, 0, s.stream>>>(r.v, rows.as<float>() + count, count);
        KVTRIM_CUDA_CHECK(cudaGetLastError());
      }
      KVTRIM_CUDA_CHECK(cudaMemcpyAsync(r.pos, hs.positions().data(), sizeof(std::int64_t) * n, cudaMemcpyHostToDevice,
                                        s.stream));
      std::vector<Meta> meta(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) meta[static_cast<std::size_t>(i)] = hs.meta(i);
      KVTRIM_CUDA_CHECK(
          cudaMemcpyAsync(r.meta, meta.data(), sizeof(Meta) * meta.size(), cudaMemcpyHostToDevice, s.stream));
      r.n = n;
      r.newest = std::max(r.newest, hs.newest_pos());
      r.evictions += hs.evictions();
      r.merges += hs.merges();
      r.state = hst;
      r.limit = limit;
      KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // rows and meta are reused or freed next
    }
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.layer_heads(layer), recs.data(), sizeof(Head) * recs.size(),
                                      cudaMemcpyHostToDevice, s.stream));
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));  // recs is freed when this function returns
  }

  // Low-rank storage (kProjects), on the backend's stream with cuBLAS (fp32 GEMMs). For each KV head h (and,
  // in a batch of `batch`, each token): `cols` consecutive input rows of d floats starting at
  // x + h * head_stride (rows `batch_stride` apart per token) map to `cols` rows of w floats at
  // y + h * out_head_stride: y = U_hᵀ x, U_h the head's padded basis (d x w column-major).
  void project(const float* U, int w, const float* x, int cols, int d, long long head_stride, int batch,
               float* y, long long out_head_stride, long long batch_stride, long long out_batch_stride = 0) {
    Store& s = *st_;
    const float one = 1.0f, zero = 0.0f;
    for (int h = 0; h < s.H; ++h)
      KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
          s.blas, CUBLAS_OP_T, CUBLAS_OP_N, w, cols, d, &one, U + static_cast<std::size_t>(h) * d * w, d, 0,
          x + h * head_stride, d, batch_stride, &zero, y + h * out_head_stride, w, out_batch_stride, batch));
  }
  // The way back: `cols` rows of w floats at y + h * in_head_stride become rows of head_dim floats at
  // x + h * out_head_stride: x = U_h y (the value basis).
  void unproject(const float* U, int w, const float* y, int cols, long long in_head_stride, int batch, float* x,
                 long long out_head_stride, long long batch_stride, long long out_batch_stride = 0) {
    Store& s = *st_;
    const float one = 1.0f, zero = 0.0f;
    const int d = s.d;
    for (int h = 0; h < s.H; ++h)
      KVTRIM_CUBLAS_CHECK(cublasSgemmStridedBatched(
          s.blas, CUBLAS_OP_N, CUBLAS_OP_N, d, cols, w, &one, U + static_cast<std::size_t>(h) * d * w, d, 0,
          y + h * in_head_stride, w, batch_stride, &zero, x + h * out_head_stride, d, out_batch_stride, batch));
  }
  // The policy's bases, padded with zero columns to each layer's width, column-major (see Store::width).
  void upload_bases() {
    Store& s = *st_;
    const int d = s.d;
    std::vector<float> all;
    for (int l = 0; l < s.L; ++l) {
      const P& pol = policies_[static_cast<std::size_t>(l)];
      const int w = s.width[static_cast<std::size_t>(l)];
      s.basis_at.push_back(all.size());
      for (int which = 0; which < 2; ++which)
        for (int h = 0; h < s.H; ++h) {
          const Eigen::MatrixXf& U = which == 0 ? pol.basis().key(l, h) : pol.basis().value(l, h);
          const int r = static_cast<int>(U.cols());
          for (int j = 0; j < w; ++j)
            for (int i = 0; i < d; ++i) all.push_back(j < r ? U(i, j) : 0.0f);
        }
    }
    s.bases.allocate(sizeof(float) * all.size());
    KVTRIM_CUDA_CHECK(cudaMemcpy(s.bases.template as<void>(), all.data(), sizeof(float) * all.size(),
                                 cudaMemcpyHostToDevice));
    KVTRIM_CUDA_CHECK(cudaDeviceSynchronize());  // the copy is complete before any stream reads it
  }

  // SimHash codes of n vectors of head_dim floats (contiguous rows) with the layer's projection, on the stream.
  void hash(int layer, const float* x, int n, std::uint64_t* codes) {
    const Store& s = *st_;
    gpu::kernels::simhash_kernel<<<static_cast<unsigned>(n), gpu::kernels::kHashThreads, 0, s.stream>>>(
        s.layer_proj(layer), s.d, s.bits, x, static_cast<std::size_t>(s.d), codes);
  }

  void upload_initial() {
    Store& s = *st_;
    // on the backend's stream (non-blocking: it does not wait for the legacy default stream), then waited for
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(s.heads.template as<Head>(), s.initial.data(), sizeof(Head) * s.initial.size(),
                                      cudaMemcpyHostToDevice, s.stream));
    KVTRIM_CUDA_CHECK(cudaMemsetAsync(s.error.template as<int>(), 0, sizeof(int), s.stream));
    KVTRIM_CUDA_CHECK(cudaStreamSynchronize(s.stream));
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
