// Decode attention bandwidth of the CUDA backend's kernels versus the device's measured copy bandwidth, and the
// cost of an accumulated-attention policy's per-step bookkeeping (the registry's "h2o": probabilities from the
// attention kernel, score update, masked arg-min eviction) relative to the attention step.
//
//   bench_cuda_decode [kv_heads=8] [group=4] [head_dim=128] [iterations=50] [--csv FILE]
//
// For each kept length N (4K .. 128K) and storage type (half, float): N slots per KV head filled with random
// data directly on the device (no prefill), then timed with CUDA events over `iterations` steps:
//   attention  = pass 1 + pass 2 of the flash-decoding kernels over N slots (no probabilities);
//   bandwidth  = bytes of K and V read (N * kv_heads * head_dim * 2 * sizeof(T)) / attention time, also as
//                a % of the copy bandwidth (cudaMemcpyAsync device-to-device of 1 GiB, read + write bytes);
//   h2o step   = attention with probabilities over N + 1 slots + on_attention + eviction of one slot,
//                reported as the % over attention alone.
// The steps of a measurement are queued behind a spin kernel (kvbench::StreamBlocker) and released together, so
// the event times are GPU time without the host's launch gaps; each step reads the same K/V, so K+V that fit in
// the L2 cache (50 MB on an H100) are read from L2 at the small N.
// --csv FILE writes one line per (type, N): type, N, kv_heads, group, head_dim, attention_us, gbs, pct_of_copy,
// h2o_step_us, copy_gbs, device (the input of sdpa_compare.py). The table goes to stdout either way.
// Without a device it prints a message and exits 0; a bad argument or a CUDA error exits 1 with a message, and
// a kernel-reported error (the error word of the eviction kernel) makes the exit status 1 after the table.
#include "bench_cuda_util.cuh"

#include <kvtrim/registry.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using kvtrim::gpu::DeviceBuffer;
namespace kk = kvtrim::gpu::kernels;

__global__ void iota64(std::int64_t* p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = i;
}
template <class Head>
__global__ void set_count(Head* heads, int n) {
  heads[threadIdx.x].n = n;
}

constexpr int kBatch = 32;  // steps queued behind the blocker at once (<= 6 launches each)

double copy_bandwidth_gbs(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1) {
  const std::size_t bytes = std::size_t{1} << 30;
  DeviceBuffer a(bytes), b(bytes);
  KVTRIM_CUDA_CHECK(cudaMemsetAsync(a.as<void>(), 1, bytes, st));
  for (int i = 0; i < 3; ++i) KVTRIM_CUDA_CHECK(cudaMemcpyAsync(b.as<void>(), a.as<void>(), bytes, cudaMemcpyDeviceToDevice, st));
  const int reps = 10;
  KVTRIM_CUDA_CHECK(cudaEventRecord(e0, st));
  for (int i = 0; i < reps; ++i)
    KVTRIM_CUDA_CHECK(cudaMemcpyAsync(b.as<void>(), a.as<void>(), bytes, cudaMemcpyDeviceToDevice, st));
  KVTRIM_CUDA_CHECK(cudaEventRecord(e1, st));
  KVTRIM_CUDA_CHECK(cudaEventSynchronize(e1));
  return 2.0 * bytes * reps / (kvbench::elapsed_ms(e0, e1) * 1e-3) / 1e9;
}

struct Shape {
  int H, group, d, iters;
};

// Returns false when a kernel reported an error.
template <class T>
bool run(const char* type, int N, const Shape& sh, double copy_gbs, const std::string& device, cudaStream_t st,
         cudaEvent_t e0, cudaEvent_t e1, kvbench::StreamBlocker& blocker, kvbench::CsvFile& csv) {
  using P = kvtrim::RegisteredPolicy<kvtrim::policy_index("h2o")>;
  using Meta = P::SlotMeta;
  using Head = kvtrim::gpu::DevHead<T, Meta, P::State>;
  const int H = sh.H, group = sh.group, d = sh.d, iters = sh.iters;
  const int cap = N + 1, Hq = H * group, splits = kvtrim::gpu::plan_splits(cap);
  const std::size_t rows = static_cast<std::size_t>(cap) * d;
  DeviceBuffer kv(sizeof(T) * rows * 2 * H), pos(sizeof(std::int64_t) * cap * H), meta(sizeof(Meta) * cap * H),
      heads(sizeof(Head) * H), q(sizeof(float) * Hq * d), out(sizeof(float) * Hq * d),
      part_ml(sizeof(float) * Hq * splits * 2), part_o(sizeof(float) * Hq * splits * d),
      logits(sizeof(float) * Hq * cap), stats(sizeof(float) * Hq * 2), err(sizeof(int));
  kvbench::fill_random<T>(kv.as<T>(), rows * 2 * H, 1u, st);
  kvbench::fill_random<float>(q.as<float>(), static_cast<std::size_t>(Hq) * d, 2u, st);
  KVTRIM_CUDA_CHECK(cudaMemsetAsync(meta.as<void>(), 0, meta.bytes(), st));
  KVTRIM_CUDA_CHECK(cudaMemsetAsync(err.as<void>(), 0, sizeof(int), st));
  std::vector<Head> host(static_cast<std::size_t>(H));
  for (int h = 0; h < H; ++h) {
    Head& r = host[h];
    r.k = kv.as<T>() + rows * (2 * h);
    r.v = kv.as<T>() + rows * (2 * h + 1);
    r.pos = pos.as<std::int64_t>() + static_cast<std::size_t>(cap) * h;
    r.meta = meta.as<Meta>() + static_cast<std::size_t>(cap) * h;
    iota64<<<(cap + 255) / 256, 256, 0, st>>>(r.pos, cap);
    r.cap = cap;
    r.budget = r.limit = N;
    r.n = N;
    r.newest = N;
    r.state.protect = kvtrim::Protection{4, 64};
  }
  KVTRIM_CUDA_CHECK(cudaMemcpyAsync(heads.as<Head>(), host.data(), sizeof(Head) * H, cudaMemcpyHostToDevice, st));
  KVTRIM_CUDA_CHECK((kk::prepare_decode_attention<T, Head>(group, d)));
  kk::DecodeArgs a;
  a.q = q.as<float>();
  a.group = group;
  a.d = d;
  a.scale = 1.0f / std::sqrt(static_cast<float>(d));
  a.n_splits = splits;
  a.part_ml = part_ml.as<float>();
  a.part_o = part_o.as<float>();
  a.logits_stride = cap;

  auto attention = [&] { kk::launch_decode_attention<T, Head>(heads.as<Head>(), H, a, out.as<float>(), nullptr, st); };
  kk::DecodeArgs ap = a;
  ap.logits = logits.as<float>();
  auto h2o_step = [&] {
    set_count<Head><<<1, H, 0, st>>>(heads.as<Head>(), N + 1);  // the appended token
    kk::launch_decode_attention<T, Head>(heads.as<Head>(), H, ap, out.as<float>(), stats.as<float>(), st);
    kk::on_attention_kernel<P, Head>
        <<<dim3((cap + 127) / 128, H), 128, 0, st>>>(heads.as<Head>(), ap.logits, cap, group);
    kk::evict_kernel<T, P><<<H, 256, 0, st>>>(heads.as<Head>(), d, err.as<int>());
  };
  for (int i = 0; i < 5; ++i) attention(), h2o_step();
  KVTRIM_CUDA_CHECK(cudaGetLastError());
  KVTRIM_CUDA_CHECK(cudaStreamSynchronize(st));
  const kvbench::StepTiming t_attn = kvbench::time_blocked(st, blocker, e0, e1, iters, kBatch, attention);
  const kvbench::StepTiming t_h2o = kvbench::time_blocked(st, blocker, e0, e1, iters, kBatch, h2o_step);
  KVTRIM_CUDA_CHECK(cudaGetLastError());
  int code = 0;
  KVTRIM_CUDA_CHECK(cudaMemcpy(&code, err.as<int>(), sizeof(int), cudaMemcpyDeviceToHost));
  const double bytes = static_cast<double>(N) * H * d * 2 * sizeof(T);
  const double gbs = bytes / (t_attn.gpu_us * 1e-6) / 1e9;
  const double pct = 100.0 * gbs / copy_gbs;
  std::printf("%-5s N=%7d  attention %8.1f us  %7.1f GB/s  %5.1f%% of copy  | h2o step %8.1f us (+%.1f%%)%s%s\n", type,
              N, t_attn.gpu_us, gbs, pct, t_h2o.gpu_us, 100.0 * (t_h2o.gpu_us - t_attn.gpu_us) / t_attn.gpu_us,
              code != 0 ? "  [device error]" : "",
              t_attn.timed_out || t_h2o.timed_out ? "  [blocker timed out: times include host gaps]" : "");
  std::fflush(stdout);
  if (code != 0)
    std::fprintf(stderr, "bench_cuda_decode: %s N=%d: the eviction kernel reported error code %d\n", type, N, code);
  csv.line(kvbench::format("%s,%d,%d,%d,%d,%.3f,%.2f,%.2f,%.3f,%.2f,", type, N, H, group, d, t_attn.gpu_us, gbs, pct,
                           t_h2o.gpu_us, copy_gbs) +
           kvbench::csv_field(device));
  return code == 0;
}

const char* kUsage =
    "usage: bench_cuda_decode [kv_heads=8] [group=4] [head_dim=128] [iterations=50] [--csv FILE]\n"
    "  head_dim: a multiple of 4, at most 256; --csv FILE: one line per (type, N) for sdpa_compare.py\n";

}  // namespace

int main(int argc, char** argv) {
  Shape sh{};
  kvbench::Options opt;
  try {
    opt = kvbench::parse_options(argc, argv, 4, false);
    if (opt.help) {
      std::printf("%s", kUsage);
      return 0;
    }
    sh.H = kvbench::positional_or(opt, 0, 8, "kv_heads", 1, 1024);
    sh.group = kvbench::positional_or(opt, 1, 4, "group", 1, 64);
    sh.d = kvbench::positional_or(opt, 2, 128, "head_dim", 4, 256);
    sh.iters = kvbench::positional_or(opt, 3, 50, "iterations", 1, 100000);
    if (sh.d % 4 != 0) throw std::invalid_argument("head_dim is " + std::to_string(sh.d) + "; expected a multiple of 4");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n%s", e.what(), kUsage);
    return 1;
  }
  if (kvtrim::gpu::device_count() == 0) {
    std::printf("bench_cuda_decode: no CUDA device; nothing to measure\n");
    return 0;
  }
  bool ok = true;
  try {
    cudaDeviceProp prop{};
    KVTRIM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t st = nullptr;
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    KVTRIM_CUDA_CHECK(cudaStreamCreate(&st));
    KVTRIM_CUDA_CHECK(cudaEventCreate(&e0));
    KVTRIM_CUDA_CHECK(cudaEventCreate(&e1));
    kvbench::StreamBlocker blocker;
    kvbench::CsvFile csv(opt.csv, "type,N,kv_heads,group,head_dim,attention_us,gbs,pct_of_copy,h2o_step_us,copy_gbs,device");
    const double copy = copy_bandwidth_gbs(st, e0, e1);
    std::printf("device: %s; kv_heads %d, group %d, head_dim %d; copy bandwidth %.1f GB/s (read + write)\n", prop.name,
                sh.H, sh.group, sh.d, copy);
    for (int N : {4096, 16384, 65536, 131072}) {
      ok = run<__half>("half", N, sh, copy, prop.name, st, e0, e1, blocker, csv) && ok;
      ok = run<float>("float", N, sh, copy, prop.name, st, e0, e1, blocker, csv) && ok;
    }
    csv.close();
    if (!opt.csv.empty()) std::printf("CSV written to %s\n", opt.csv.c_str());
    KVTRIM_CUDA_CHECK(cudaEventDestroy(e0));
    KVTRIM_CUDA_CHECK(cudaEventDestroy(e1));
    KVTRIM_CUDA_CHECK(cudaStreamDestroy(st));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_decode: error: %s\n", e.what());
    return 1;
  }
  return ok ? 0 : 1;
}
