// kvtrim CUDA backend: the device side of kvtrim/policies/eigen_attention.hpp.
// The DevicePolicy contract is in ../device_policy.hpp.
#pragma once

#include <cstdint>

#include <kvtrim/policies/eigen_attention.hpp>

#include "../device_policy.hpp"

namespace kvtrim::gpu {

// EigenAttention<I>: low-rank storage is the backend's business (CudaBackend projects q, k, v and the output
// with cuBLAS and stores the projected rows); every decision is I's, on the projected keys, as on the CPU.
template <class I>
struct DevicePolicy<EigenAttention<I>> : DevicePolicy<I> {
  using Base = DevicePolicy<I>;
  using Pol = EigenAttention<I>;
  static typename Base::State initial(const Pol& pol, const typename Pol::Params& p, int budget, int group) {
    return Base::initial(pol.inner(), p.inner, budget, group);
  }
  static int keep_limit(const Pol& pol, int budget) { return Base::keep_limit(pol.inner(), budget); }
  static int prompt_limit(const Pol& pol, int budget) { return traits::prompt_limit<Base>(pol.inner(), budget); }
  static int vote_window(const Pol& pol) { return traits::vote_window<Base>(pol.inner()); }
};

}  // namespace kvtrim::gpu
