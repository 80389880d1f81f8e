// kvtrim: portability macros.
// KVTRIM_HOST_DEVICE marks per-token policy math that the CPU backend calls directly and the CUDA backend calls
// from kernels, so each formula is written once (the EIGEN_DEVICE_FUNC idea).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVTRIM_HOST_DEVICE __host__ __device__
#else
#define KVTRIM_HOST_DEVICE
#endif
