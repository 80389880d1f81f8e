// kvtrim Python module: how a cache is made for a backend, behind one small interface.
//
// The nanobind glue (module.cpp) is compiled by the host compiler and never sees CUDA headers; the CUDA
// factory (cuda_factory.cu, built only with KVTRIM_PYTHON_CUDA) is compiled by nvcc and never sees nanobind.
// Both build their caches from the one policy registry (registry.hpp) through AnyCacheOf<P, Backend>.
#pragma once

#include <kvtrim/any_cache.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace kvtrim_py {

// A runtime-chosen cache plus what only its backend can do.
struct CacheHandle {
  std::unique_ptr<kvtrim::AnyCache> cache;
  bool on_device = false;  // slots live in CUDA device memory
  int device = -1;         // CUDA device ordinal (on_device only)
  // CUDA only: make the cache run on this cudaStream_t (as an integer); the previous stream's work is finished
  // first. Empty for the CPU backend.
  std::function<void(std::uintptr_t)> set_stream;
  // CUDA only: wait for the queued work and report a kernel-side error as kvtrim::Error.
  std::function<void()> synchronize;
};

// CpuBackend<T>: the registered policy `name` with its options (kvtrim::Error for an unknown name or parameter),
// keys and values stored as `storage` ("float32", "float16" or "bfloat16").
inline CacheHandle make_cpu_cache(std::string_view name, const kvtrim::CacheConfig& cfg,
                                  const kvtrim::PolicyOptions& opt, std::string_view storage) {
  CacheHandle h;
  if (storage == "float32")
    h.cache = kvtrim::make_cache<kvtrim::CpuBackend<float>>(name, cfg, opt);
  else if (storage == "float16")
    h.cache = kvtrim::make_cache<kvtrim::CpuBackend<kvtrim::half>>(name, cfg, opt);
  else if (storage == "bfloat16")
    h.cache = kvtrim::make_cache<kvtrim::CpuBackend<kvtrim::bfloat16>>(name, cfg, opt);
  else
    kvtrim::detail::throw_error("Cache: storage '", storage, "'; expected float32, float16 or bfloat16 (inputs and "
                                "outputs stay float32; attention accumulates in float32)");
  return h;
}

// CudaBackend<T> with T named by `storage` ("float32", "float16" or "bfloat16"), on CUDA device `device`.
// Defined in cuda_factory.cu; only declared when the module is built with CUDA.
CacheHandle make_cuda_cache(std::string_view name, const kvtrim::CacheConfig& cfg, const kvtrim::PolicyOptions& opt,
                            std::string_view storage, int device);

}  // namespace kvtrim_py
