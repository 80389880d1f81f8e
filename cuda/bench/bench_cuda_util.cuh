// Shared pieces of the CUDA benchmarks (bench_cuda_decode.cu, bench_cuda_policies.cu):
//
//  fill_random          deterministic pseudo-random values in [-1, 1) written on the device (no host copy)
//  StreamBlocker        holds a stream with a spin kernel while the host queues work behind it, so that the
//                       timed work then runs back to back: CUDA-event times measure the GPU, not the host's
//                       launch rate (the method of NVIDIA's nvbench "blocking kernel"; the spin gives up after
//                       a timeout, which is reported, so a full launch queue cannot deadlock the program)
//  time_blocked         times `iterations` calls of a function that queues one step, in held batches
//  Options              the command line both benchmarks share: positional integers and --csv FILE
//  CsvFile              a CSV output file whose open/write/close failures are reported by name
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvtrim/cuda/cuda_backend.cuh>

namespace kvbench {

namespace kk = kvtrim::gpu::kernels;

// ---- random data on the device ---------------------------------------------------------------------------

template <class T>
__global__ void fill_random_kernel(T* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    unsigned x = static_cast<unsigned>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = kk::from_f<T>(static_cast<float>(x & 0xffff) / 32768.0f - 1.0f);
  }
}

// n values of T in [-1, 1), queued on `stream`.
template <class T>
void fill_random(T* p, std::size_t n, unsigned seed, cudaStream_t stream) {
  fill_random_kernel<T><<<1024, 256, 0, stream>>>(p, n, seed);
  KVTRIM_CUDA_CHECK(cudaGetLastError());
}

// ---- timing ------------------------------------------------------------------------------------------------

inline float elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  KVTRIM_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

// Host-written flags the spin kernel polls (mapped pinned memory).
struct BlockerFlags {
  int release;
  int timed_out;
};

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin_until_released(volatile BlockerFlags* f, unsigned long long timeout_ns) {
  const unsigned long long start = global_ns();
  while (f->release == 0) {
    if (global_ns() - start > timeout_ns) {
      f->timed_out = 1;
      return;
    }
#if __CUDA_ARCH__ >= 700
    __nanosleep(1000);  // poll the host's flag over PCIe about once a microsecond
#endif
  }
}

class StreamBlocker {
 public:
  StreamBlocker() {
    KVTRIM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(BlockerFlags), cudaHostAllocMapped));
    KVTRIM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_), host_, 0));
    host_->release = 1;
    host_->timed_out = 0;
  }
  StreamBlocker(const StreamBlocker&) = delete;
  StreamBlocker& operator=(const StreamBlocker&) = delete;
  ~StreamBlocker() {
    if (host_ != nullptr) (void)cudaFreeHost(host_);
  }

  // Queues the spin kernel on `stream`: later work on the stream waits until release() (or the timeout).
  void hold(cudaStream_t stream, double timeout_s = 2.0) {
    flags()->release = 0;
    flags()->timed_out = 0;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    spin_until_released<<<1, 1, 0, stream>>>(dev_, static_cast<unsigned long long>(timeout_s * 1e9));
    KVTRIM_CUDA_CHECK(cudaGetLastError());
  }
  void release() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    flags()->release = 1;
  }
  // After the held work finished: whether the spin kernel gave up before release() (the host took longer
  // than the timeout to queue the batch, or blocked on a full launch queue; the times then include gaps).
  bool timed_out() const { return flags()->timed_out != 0; }

 private:
  volatile BlockerFlags* flags() const { return host_; }
  BlockerFlags* host_ = nullptr;
  BlockerFlags* dev_ = nullptr;
};

struct StepTiming {
  double gpu_us = 0;   // per step: CUDA-event time of the queued steps running back to back
  double host_us = 0;  // per step: host (wall-clock) time to queue one step
  bool timed_out = false;
};

// Calls queue_step() `iterations` times in batches of at most `batch` steps. Each batch is queued behind a
// StreamBlocker's spin kernel with events around it, then released; the event times add up. `batch` keeps the
// queued launches (batch x launches per step) well under the driver's launch queue.
template <class F>
StepTiming time_blocked(cudaStream_t stream, StreamBlocker& blocker, cudaEvent_t e0, cudaEvent_t e1, int iterations,
                        int batch, F&& queue_step) {
  StepTiming t;
  double gpu_ms = 0, host_s = 0;
  for (int done = 0; done < iterations;) {
    const int b = std::min(batch, iterations - done);
    blocker.hold(stream);
    KVTRIM_CUDA_CHECK(cudaEventRecord(e0, stream));
    const auto h0 = std::chrono::steady_clock::now();
    try {
      for (int i = 0; i < b; ++i) queue_step();
    } catch (...) {
      blocker.release();  // let the stream drain before the error propagates (and buffers are freed)
      throw;
    }
    const auto h1 = std::chrono::steady_clock::now();
    KVTRIM_CUDA_CHECK(cudaEventRecord(e1, stream));
    blocker.release();
    KVTRIM_CUDA_CHECK(cudaEventSynchronize(e1));
    gpu_ms += elapsed_ms(e0, e1);
    host_s += std::chrono::duration<double>(h1 - h0).count();
    t.timed_out = t.timed_out || blocker.timed_out();
    done += b;
  }
  t.gpu_us = gpu_ms * 1e3 / iterations;
  t.host_us = host_s * 1e6 / iterations;
  return t;
}

// ---- command line ------------------------------------------------------------------------------------------

// Positional integers (in the order the program names them) and the options --csv FILE and, where the program
// accepts it, --lengths N1,N2,... Errors are std::invalid_argument with a message naming the argument.
struct Options {
  std::vector<long> positional;
  std::string csv;
  std::vector<int> lengths;
  bool help = false;
};

inline long parse_long(const std::string& text, const std::string& what) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || end == nullptr || *end != '\0' || errno == ERANGE)
    throw std::invalid_argument(what + ": '" + text + "' is not an integer");
  return v;
}

inline Options parse_options(int argc, char** argv, std::size_t max_positional, bool accept_lengths) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      o.help = true;
    } else if (a == "--csv") {
      if (i + 1 >= argc) throw std::invalid_argument("--csv needs a file name");
      o.csv = argv[++i];
    } else if (accept_lengths && a == "--lengths") {
      if (i + 1 >= argc) throw std::invalid_argument("--lengths needs a comma-separated list, e.g. 4096,16384");
      const std::string list = argv[++i];
      std::size_t start = 0;
      while (start <= list.size()) {
        const std::size_t comma = std::min(list.find(',', start), list.size());
        const long n = parse_long(list.substr(start, comma - start), "--lengths entry");
        if (n < 1 || n > (1L << 24)) throw std::invalid_argument("--lengths entry " + std::to_string(n) + " is outside 1..16777216");
        o.lengths.push_back(static_cast<int>(n));
        start = comma + 1;
      }
    } else if (a.size() > 1 && a[0] == '-' && (a[1] < '0' || a[1] > '9')) {
      throw std::invalid_argument("unknown option '" + a + "'");
    } else {
      if (o.positional.size() >= max_positional)
        throw std::invalid_argument("too many positional arguments (at most " + std::to_string(max_positional) +
                                    "); unexpected '" + a + "'");
      o.positional.push_back(parse_long(a, "argument " + std::to_string(o.positional.size() + 1)));
    }
  }
  return o;
}

// The i-th positional argument or `fallback`, checked to lie in [lo, hi].
inline int positional_or(const Options& o, std::size_t i, int fallback, const char* name, long lo, long hi) {
  const long v = i < o.positional.size() ? o.positional[i] : fallback;
  if (v < lo || v > hi)
    throw std::invalid_argument(std::string(name) + " is " + std::to_string(v) + "; expected " + std::to_string(lo) +
                                ".." + std::to_string(hi));
  return static_cast<int>(v);
}

// ---- CSV output ----------------------------------------------------------------------------------------

// Text as one CSV field: quoted when it holds a comma, a quote or a line break (quotes doubled).
inline std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

class CsvFile {
 public:
  CsvFile() = default;
  // Opens `path` for writing (truncating) and writes the header line; an empty path means no file.
  CsvFile(const std::string& path, const char* header) : path_(path) {
    if (path.empty()) return;
    f_ = std::fopen(path.c_str(), "w");
    if (f_ == nullptr)
      throw std::runtime_error("cannot open CSV file '" + path + "' for writing: " + std::strerror(errno));
    line(header);
  }
  CsvFile(const CsvFile&) = delete;
  CsvFile& operator=(const CsvFile&) = delete;
  ~CsvFile() {
    if (f_ != nullptr) std::fclose(f_);
  }
  bool enabled() const { return f_ != nullptr; }
  void line(const std::string& text) {
    if (f_ == nullptr) return;
    if (std::fputs(text.c_str(), f_) < 0 || std::fputc('\n', f_) == EOF)
      throw std::runtime_error("cannot write CSV file '" + path_ + "': " + std::strerror(errno));
  }
  // Flushes and closes; a failure (disk full, ...) is an error rather than a silently short file.
  void close() {
    if (f_ == nullptr) return;
    const bool bad = std::ferror(f_) != 0;
    const int rc = std::fclose(f_);
    f_ = nullptr;
    if (bad || rc != 0) throw std::runtime_error("cannot finish CSV file '" + path_ + "': " + std::strerror(errno));
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// printf into a std::string (for CSV lines).
template <class... A>
std::string format(const char* fmt, A... args) {
  const int n = std::snprintf(nullptr, 0, fmt, args...);
  if (n < 0) throw std::runtime_error("format error");
  std::string s(static_cast<std::size_t>(n) + 1, '\0');
  std::snprintf(s.data(), s.size(), fmt, args...);
  s.resize(static_cast<std::size_t>(n));
  return s;
}

}  // namespace kvbench
