// kvtrim: portability macros.
// KVTRIM_HOST_DEVICE marks per-token policy math that the CPU backend calls directly and the CUDA backend calls
// from kernels, so each formula is written once (the EIGEN_DEVICE_FUNC idea).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVTRIM_HOST_DEVICE __host__ __device__
#else
#define KVTRIM_HOST_DEVICE
#endif

// Host functions that hot loops compiled for a wider instruction set (cpu_selection.hpp's dispatch) must inline,
// so that they are vectorised for that instruction set too.
#if defined(__GNUC__) || defined(__clang__)
#define KVTRIM_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define KVTRIM_ALWAYS_INLINE inline
#endif
