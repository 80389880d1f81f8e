// kvtrim CUDA backend: error checking.
//
// Every CUDA runtime and cuBLAS call goes through KVTRIM_CUDA_CHECK / KVTRIM_CUBLAS_CHECK, which turn a
// failure into kvtrim::Error naming the call, the error and the place. require_device() is what the backend
// calls at construction: no usable device (no GPU, no driver) is a clear kvtrim::Error, not a later crash.
// Compiles with the host compiler too (only the runtime API headers are needed).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <kvtrim/error.hpp>

namespace kvtrim::gpu {

namespace detail {
inline void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so the next call does not report it again
  ::kvtrim::detail::throw_error("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") from ", expr,
                                " at ", file, ":", line);
}
inline void check_cublas(cublasStatus_t s, const char* expr, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  ::kvtrim::detail::throw_error("cuBLAS error ", cublasGetStatusName(s), " (", cublasGetStatusString(s),
                                ") from ", expr, " at ", file, ":", line);
}
}  // namespace detail

// Number of usable CUDA devices; 0 when there is none or no driver (never throws).
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// Throws kvtrim::Error when no CUDA device can be used; `who` names the caller in the message.
inline void require_device(const char* who) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) (void)cudaGetLastError();
  KVTRIM_CHECK(e == cudaSuccess && n > 0, who, ": no CUDA device available (cudaGetDeviceCount: ",
               e == cudaSuccess ? "0 devices" : cudaGetErrorString(e),
               "); run on a machine with an NVIDIA GPU and driver, or use kvtrim::CpuBackend");
}

}  // namespace kvtrim::gpu

#define KVTRIM_CUDA_CHECK(expr) ::kvtrim::gpu::detail::check_cuda((expr), #expr, __FILE__, __LINE__)
#define KVTRIM_CUBLAS_CHECK(expr) ::kvtrim::gpu::detail::check_cublas((expr), #expr, __FILE__, __LINE__)
