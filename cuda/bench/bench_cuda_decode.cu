// Decode attention bandwidth of the CUDA backend's kernels versus the device's measured copy bandwidth, and the
// cost of H2O's per-step bookkeeping (probabilities from the attention kernel, score update, masked arg-min
// eviction) relative to the attention step.
//
//   bench_cuda_decode [kv_heads=8] [group=4] [head_dim=128] [iterations=50]
//
// For each kept length N (4K .. 128K) and storage type (half, float): N slots per KV head filled with random
// data directly on the device (no prefill), then timed with CUDA events over `iterations` steps:
//   attention  = pass 1 + pass 2 of the flash-decoding kernels over N slots (no probabilities);
//   bandwidth  = bytes of K and V read (N * kv_heads * head_dim * 2 * sizeof(T)) / attention time, also as
//                a % of the copy bandwidth (cudaMemcpyAsync device-to-device of 1 GiB, read + write bytes);
//   h2o step   = attention with probabilities over N + 1 slots + on_attention + eviction of one slot,
//                reported as the % over attention alone.
// Without a device it prints a message and exits 0.
#include <kvtrim/cuda/cuda_backend.cuh>

#include <cstdio>
#include <cstdlib>

namespace {

using kvtrim::gpu::DeviceBuffer;
namespace kk = kvtrim::gpu::kernels;

template <class T>
__global__ void fill_random(T* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    unsigned x = static_cast<unsigned>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    p[i] = kk::from_f<T>(static_cast<float>(x & 0xffff) / 32768.0f - 1.0f);
  }
}
__global__ void iota64(std::int64_t* p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = i;
}
template <class Head>
__global__ void set_count(Head* heads, int n) {
  heads[threadIdx.x].n = n;
}

float time_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0;
  KVTRIM_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

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
  return 2.0 * bytes * reps / (time_ms(e0, e1) * 1e-3) / 1e9;
}

template <class T>
void run(const char* type, int N, int H, int group, int d, int iters, double copy_gbs, cudaStream_t st,
         cudaEvent_t e0, cudaEvent_t e1) {
  using DP = kvtrim::gpu::DevicePolicy<kvtrim::H2O>;
  using Meta = kvtrim::H2O::SlotMeta;
  using Head = kvtrim::gpu::DevHead<T, Meta, DP::State>;
  const int cap = N + 1, Hq = H * group, splits = kvtrim::gpu::plan_splits(cap);
  const std::size_t rows = static_cast<std::size_t>(cap) * d;
  DeviceBuffer kv(sizeof(T) * rows * 2 * H), pos(sizeof(std::int64_t) * cap * H), meta(sizeof(Meta) * cap * H),
      heads(sizeof(Head) * H), q(sizeof(float) * Hq * d), out(sizeof(float) * Hq * d),
      part_ml(sizeof(float) * Hq * splits * 2), part_o(sizeof(float) * Hq * splits * d),
      logits(sizeof(float) * Hq * cap), stats(sizeof(float) * Hq * 2), err(sizeof(int));
  fill_random<T><<<1024, 256, 0, st>>>(kv.as<T>(), rows * 2 * H, 1u);
  fill_random<float><<<64, 256, 0, st>>>(q.as<float>(), static_cast<std::size_t>(Hq) * d, 2u);
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
    kk::on_attention_kernel<DP, Head>
        <<<dim3((cap + 127) / 128, H), 128, 0, st>>>(heads.as<Head>(), ap.logits, cap, group);
    kk::evict_kernel<T, Meta, DP::State, DP><<<H, 256, 0, st>>>(heads.as<Head>(), d, err.as<int>());
  };
  for (int i = 0; i < 5; ++i) attention(), h2o_step();
  KVTRIM_CUDA_CHECK(cudaGetLastError());
  KVTRIM_CUDA_CHECK(cudaEventRecord(e0, st));
  for (int i = 0; i < iters; ++i) attention();
  KVTRIM_CUDA_CHECK(cudaEventRecord(e1, st));
  KVTRIM_CUDA_CHECK(cudaEventSynchronize(e1));
  const double t_attn = time_ms(e0, e1) / iters;
  KVTRIM_CUDA_CHECK(cudaEventRecord(e0, st));
  for (int i = 0; i < iters; ++i) h2o_step();
  KVTRIM_CUDA_CHECK(cudaEventRecord(e1, st));
  KVTRIM_CUDA_CHECK(cudaEventSynchronize(e1));
  const double t_h2o = time_ms(e0, e1) / iters;
  int code = 0;
  KVTRIM_CUDA_CHECK(cudaMemcpy(&code, err.as<int>(), sizeof(int), cudaMemcpyDeviceToHost));
  const double bytes = static_cast<double>(N) * H * d * 2 * sizeof(T);
  const double gbs = bytes / (t_attn * 1e-3) / 1e9;
  std::printf("%-5s N=%7d  attention %8.1f us  %7.1f GB/s  %5.1f%% of copy  | h2o step %8.1f us (+%.1f%%)%s\n", type,
              N, t_attn * 1e3, gbs, 100.0 * gbs / copy_gbs, t_h2o * 1e3, 100.0 * (t_h2o - t_attn) / t_attn,
              code != 0 ? "  [device error]" : "");
}

}  // namespace

int main(int argc, char** argv) {
  if (kvtrim::gpu::device_count() == 0) {
    std::printf("bench_cuda_decode: no CUDA device; nothing to measure\n");
    return 0;
  }
  const int H = argc > 1 ? std::atoi(argv[1]) : 8, group = argc > 2 ? std::atoi(argv[2]) : 4,
            d = argc > 3 ? std::atoi(argv[3]) : 128, iters = argc > 4 ? std::atoi(argv[4]) : 50;
  cudaDeviceProp prop{};
  KVTRIM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t st = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  KVTRIM_CUDA_CHECK(cudaStreamCreate(&st));
  KVTRIM_CUDA_CHECK(cudaEventCreate(&e0));
  KVTRIM_CUDA_CHECK(cudaEventCreate(&e1));
  const double copy = copy_bandwidth_gbs(st, e0, e1);
  std::printf("device: %s; kv_heads %d, group %d, head_dim %d; copy bandwidth %.1f GB/s (read + write)\n", prop.name,
              H, group, d, copy);
  for (int N : {4096, 16384, 65536, 131072}) {
    run<__half>("half", N, H, group, d, iters, copy, st, e0, e1);
    run<float>("float", N, H, group, d, iters, copy, st, e0, e1);
  }
  KVTRIM_CUDA_CHECK(cudaEventDestroy(e0));
  KVTRIM_CUDA_CHECK(cudaEventDestroy(e1));
  KVTRIM_CUDA_CHECK(cudaStreamDestroy(st));
  return 0;
}
