// kvtrim CUDA backend: every policy's device side (DevicePolicy specialisations, one header per policy).
#pragma once

#include "device_policy.hpp"
#include "policies/full_cache.hpp"
#include "policies/streaming_llm.hpp"
#include "policies/h2o.hpp"
#include "policies/tova.hpp"
#include "policies/l2_norm.hpp"
#include "policies/hash_evict.hpp"
#include "policies/snapkv.hpp"
#include "policies/buzz.hpp"
#include "policies/ems.hpp"
#include "policies/eigen_attention.hpp"
