// CudaBackend<half> against the CPU backend (a translation unit of its own: the storage types build in parallel).
#include "backend_vs_cpu.cuh"

TEST_CASE("CudaBackend<half> matches the CPU backend within its bound", "[cuda][gpu][half]") {
  kvtest::all_policies<__half>();
}
