// kvtrim: memory a cache needs, known before it allocates.
//
// KVCache<P, B>::bytes_required(cfg, params) is what a cache of that configuration reserves (slots of every
// head at budget + 1, per-head state, per-thread scratch), computed without allocating it. A backend refuses a
// configuration that cannot fit (more than the machine's physical memory, or the device's free memory) with a
// kvtrim::Error naming the size, before it allocates anything; an allocation that fails anyway becomes the same
// kind of error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>

#include "error.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace kvtrim {

// Bytes as a sum of products that may exceed 64 bits (2^32 heads x 2^28 slots): accumulated in double, which is
// exact below 2^53 and only has to tell "too large" apart beyond.
struct ByteCount {
  double bytes = 0;
  ByteCount& add(double count, double each) {
    bytes += count * each;
    return *this;
  }
  std::size_t value() const {
    return bytes >= static_cast<double>(std::numeric_limits<std::size_t>::max())
               ? std::numeric_limits<std::size_t>::max()
               : static_cast<std::size_t>(bytes);
  }
};

// "3.2 GiB" style, for messages.
inline double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

// The machine's physical memory in bytes (0 when unknown).
inline double physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<double>(pages) * static_cast<double>(page);
#endif
  return 0;
}

namespace detail {
// Refuses `need` bytes when more than `available` (0 = unknown: no check); `where` names the memory.
inline void require_bytes(const ByteCount& need, double available, const char* what, const char* where) {
  KVTRIM_CHECK(available <= 0 || need.bytes <= available, what, " needs ", need.value(), " bytes (",
               gib(need.bytes), " GiB) but ", where, " has ", static_cast<std::size_t>(available), " bytes (",
               gib(available), " GiB); lower the budgets, layers or heads");
}

// Runs `make` (the allocations); std::bad_alloc becomes kvtrim::Error naming the size.
template <class F>
void allocate_or_throw(const ByteCount& need, const char* what, F&& make) {
  try {
    make();
  } catch (const std::bad_alloc&) {
    throw_error(what, ": allocating ", need.value(), " bytes (", gib(need.bytes), " GiB) failed");
  }
}
}  // namespace detail

}  // namespace kvtrim
