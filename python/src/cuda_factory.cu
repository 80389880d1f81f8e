// kvtrim Python module, CUDA side: caches on CudaBackend<T> for every registered policy (nvcc; no nanobind here).
// Built only with KVTRIM_PYTHON_CUDA=ON. The module hands over host or CUDA device pointers (all of one kind);
// set_stream() makes the cache follow torch's current stream.
#include <kvtrim/cuda/cuda_backend.cuh>  // first: it keeps Eigen host-only under nvcc

#include <kvtrim/any_cache.hpp>

#include <memory>
#include <string_view>
#include <type_traits>

#include "factory.hpp"

namespace kvtrim_py {

namespace {

template <class T>
CacheHandle make_on(std::string_view name, const kvtrim::CacheConfig& cfg, const kvtrim::PolicyOptions& opt,
                    int device) {
  CacheHandle h;
  kvtrim::with_policy(name, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    auto typed = std::make_unique<kvtrim::AnyCacheOf<P, kvtrim::CudaBackend<T>>>(cfg, kvtrim::policy_params(entry, opt));
    auto* raw = typed.get();
    h.set_stream = [raw](std::uintptr_t stream) {
      raw->typed().backend().set_stream(reinterpret_cast<cudaStream_t>(stream));
    };
    h.synchronize = [raw] { raw->typed().backend().synchronize(); };
    h.cache = std::move(typed);
  });
  h.on_device = true;
  h.device = device;
  return h;
}

}  // namespace

CacheHandle make_cuda_cache(std::string_view name, const kvtrim::CacheConfig& cfg, const kvtrim::PolicyOptions& opt,
                            std::string_view storage, int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    kvtrim::detail::throw_error("Cache: device 'cuda' but no CUDA device is available");
  }
  KVTRIM_CHECK(device >= 0 && device < count, "Cache: CUDA device ", device, " out of range 0..", count - 1);
  KVTRIM_CUDA_CHECK(cudaSetDevice(device));
  if (storage == "float32") return make_on<float>(name, cfg, opt, device);
  if (storage == "float16") return make_on<__half>(name, cfg, opt, device);
  if (storage == "bfloat16") return make_on<__nv_bfloat16>(name, cfg, opt, device);
  kvtrim::detail::throw_error("Cache: storage '", storage, "'; expected float32, float16 or bfloat16 (inputs and "
                              "outputs stay float32; attention accumulates in float32)");
}

}  // namespace kvtrim_py
