// kvtrim CUDA backend: what a kernel can report.
//
// Kernels never throw: a failure is a Status the kernel leaves in the backend's error word (the first one wins),
// and the host turns it into kvtrim::Error when it next synchronises. to_string() works on host and device.
#pragma once

#include <kvtrim/macros.hpp>

namespace kvtrim::gpu {

enum class Status : int {
  kOk = 0,
  kHeadFull = 1,       // a token arrived at a head with no free slot
  kAllProtected = 2,   // a head over its limit holds only protected tokens
  kNoProgress = 3,     // a structured eviction pass kept every token of a head that must shrink (a policy bug)
};

KVTRIM_HOST_DEVICE inline const char* to_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kHeadFull: return "a token arrived at a KV head with no free slot";
    case Status::kAllProtected: return "every remaining token is protected but a head is over its limit";
    case Status::kNoProgress: return "a structured eviction pass kept every token of a head that must shrink";
  }
  return "unknown device status";
}

}  // namespace kvtrim::gpu
