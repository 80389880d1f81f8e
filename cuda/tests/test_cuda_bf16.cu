// CudaBackend<bfloat16> against the CPU backend (a translation unit of its own: the storage types build in parallel).
#include "backend_vs_cpu.cuh"

TEST_CASE("CudaBackend<bfloat16> matches the CPU backend within its bound", "[cuda][gpu][bf16]") {
  kvtest::all_policies<__nv_bfloat16>();
}
