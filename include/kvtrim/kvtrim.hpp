// kvtrim: umbrella header for the CPU library: the cache, the CPU backend and every policy.
// The CUDA backend adds <kvtrim/cuda/cuda_backend.cuh> (target kvtrim::cuda).
#pragma once

#include "config.hpp"
#include "cpu_backend.hpp"
#include "error.hpp"
#include "head_store.hpp"
#include "kv_cache.hpp"
#include "params.hpp"
#include "policy.hpp"
#include "registry.hpp"
#include "select.hpp"
#include "signals.hpp"
#include "simhash.hpp"

#include "policies/buzz.hpp"
#include "policies/eigen_attention.hpp"
#include "policies/ems.hpp"
#include "policies/full_cache.hpp"
#include "policies/h2o.hpp"
#include "policies/hash_evict.hpp"
#include "policies/l2_norm.hpp"
#include "policies/snapkv.hpp"
#include "policies/streaming_llm.hpp"
#include "policies/tova.hpp"
