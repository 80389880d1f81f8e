// A second translation unit including the CUDA backend, linked into test_cuda_backend with
// test_cuda_backend.cu: a header-only library must link from several .cu files of one program, so no header
// may define a non-template, non-inline symbol (a plain __global__ function in a header is one).
#include <kvtrim/cuda/cuda_backend.cuh>
#include <kvtrim/kvtrim.hpp>

namespace kvtest {

// Builds (and drops) a cache whose kernels this unit instantiates too; throws without a GPU.
void second_unit_construct(const kvtrim::CacheConfig& cfg) {
  kvtrim::KVCache<kvtrim::H2O, kvtrim::CudaBackend<__half>> cache(cfg);
  (void)cache;
}

}  // namespace kvtest
