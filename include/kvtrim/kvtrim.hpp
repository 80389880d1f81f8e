// kvtrim: umbrella header for the CPU library (the CUDA backend adds kvtrim/cuda/cuda_backend.cuh).
#pragma once

#include "config.hpp"
#include "cpu_backend.hpp"
#include "error.hpp"
#include "head_store.hpp"
#include "kv_cache.hpp"
#include "policies/full_cache.hpp"
#include "policies/streaming_llm.hpp"
#include "policy.hpp"
#include "select.hpp"
#include "signals.hpp"
