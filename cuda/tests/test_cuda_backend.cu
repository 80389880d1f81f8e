// CudaBackend<float> against the CPU backend, the naive reference, device pointers and streams, construction
// errors (the half and bfloat16 comparisons are test_cuda_half.cu and test_cuda_bf16.cu).
#include "backend_vs_cpu.cuh"

using namespace kvtest;
using Streaming = kvtrim::RegisteredPolicy<kvtrim::policy_index("streaming")>;

TEST_CASE("CudaBackend<float> matches the CPU backend", "[cuda][gpu][float]") { all_policies<float>(); }

TEST_CASE("CudaBackend decode output equals a naive double-precision reference", "[cuda][gpu]") {
  if (!have_gpu()) return;
  const auto cfg = shape(4, 64, 600);
  kvtrim::KVCache<kvtrim::FullCache, kvtrim::CudaBackend<float>> gpu(cfg);
  kvtest::Tokens tok(cfg, 600, 4);
  std::vector<float> out(static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim);
  for (int t = 0; t < 600; ++t) {
    gpu.decode(0, tok.q[t], tok.k[t], tok.v[t], out);
    if (t % 97 != 0 && t != 599) continue;  // 600 slots = 3 splits at the end
    for (int qh = 0; qh < cfg.n_q_heads; ++qh) {
      const int kv = qh / cfg.group_size();
      std::vector<const float*> keys, values;
      for (int j = 0; j <= t; ++j) {
        keys.push_back(tok.k[j].data() + kv * cfg.head_dim);
        values.push_back(tok.v[j].data() + kv * cfg.head_dim);
      }
      const auto want = kvtest::naive_attention(tok.q[t].data() + qh * cfg.head_dim, keys, values, cfg.head_dim);
      for (int e = 0; e < cfg.head_dim; ++e) REQUIRE(out[qh * cfg.head_dim + e] == Approx(want[e]).margin(1e-5));
    }
  }
}

TEST_CASE("CudaBackend accepts device pointers and an explicit stream", "[cuda][gpu]") {
  if (!have_gpu()) return;
  auto cfg = shape(4, 64, 32);
  cfg.check_finite = false;  // device inputs: KVCache cannot read them on the host
  kvtrim::KVCache<Streaming, kvtrim::CudaBackend<__half>> dev(cfg, {.sinks = 2});
  kvtrim::KVCache<Streaming, kvtrim::CudaBackend<__half>> host(cfg, {.sinks = 2});
  cudaStream_t stream = nullptr;
  KVTRIM_CUDA_CHECK(cudaStreamCreate(&stream));
  dev.backend().set_stream(stream);
  REQUIRE(dev.backend().stream() == stream);
  kvtest::Tokens tok(cfg, 80, 9);
  const std::size_t qw = static_cast<std::size_t>(cfg.n_q_heads) * cfg.head_dim;
  const std::size_t kw = static_cast<std::size_t>(cfg.n_kv_heads) * cfg.head_dim;
  float *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  KVTRIM_CUDA_CHECK(cudaMalloc(&q, qw * sizeof(float)));
  KVTRIM_CUDA_CHECK(cudaMalloc(&k, kw * sizeof(float)));
  KVTRIM_CUDA_CHECK(cudaMalloc(&v, kw * sizeof(float)));
  KVTRIM_CUDA_CHECK(cudaMalloc(&o, qw * sizeof(float)));
  std::vector<float> a(qw), b(qw);
  for (int t = 0; t < 80; ++t) {
    KVTRIM_CUDA_CHECK(cudaMemcpy(q, tok.q[t].data(), qw * sizeof(float), cudaMemcpyHostToDevice));
    KVTRIM_CUDA_CHECK(cudaMemcpy(k, tok.k[t].data(), kw * sizeof(float), cudaMemcpyHostToDevice));
    KVTRIM_CUDA_CHECK(cudaMemcpy(v, tok.v[t].data(), kw * sizeof(float), cudaMemcpyHostToDevice));
    dev.decode(0, {q, qw}, {k, kw}, {v, kw}, {o, qw});
    dev.backend().synchronize();
    KVTRIM_CUDA_CHECK(cudaMemcpy(a.data(), o, qw * sizeof(float), cudaMemcpyDeviceToHost));
    host.decode(0, tok.q[t], tok.k[t], tok.v[t], b);
    REQUIRE(a == b);  // same kernels, same inputs: bit-identical
  }
  REQUIRE(dev.positions(0, 0) == host.positions(0, 0));
  SECTION("device inputs with check_finite on are refused, not read on the host") {
    auto checked = cfg;
    checked.check_finite = true;
    kvtrim::KVCache<Streaming, kvtrim::CudaBackend<__half>> strict(checked, {.sinks = 2});
    REQUIRE_THROWS_WITH(strict.decode(0, {q, qw}, {k, kw}, {v, kw}, {o, qw}),
                        Catch::Matchers::Contains("set check_finite = false"));
    REQUIRE(strict.size(0, 0) == 0);
  }
  SECTION("mixing host and device buffers is refused") {
    REQUIRE_THROWS_WITH(dev.decode(0, {q, qw}, tok.k[0], {v, kw}, {o, qw}),
                        Catch::Matchers::Contains("host memory or all in device memory"));
  }
  cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(o);
  dev.backend().set_stream(nullptr);
  KVTRIM_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_CASE("CudaBackend construction errors", "[cuda][errors]") {
  const auto cfg = shape(2, 64, 16);
  if (kvtrim::gpu::device_count() == 0) {
    // runs on machines without a GPU: the backend refuses clearly instead of failing later
    REQUIRE_THROWS_WITH((kvtrim::KVCache<kvtrim::FullCache, kvtrim::CudaBackend<float>>(cfg)),
                        Catch::Matchers::Contains("no CUDA device available"));
    return;
  }
  REQUIRE_THROWS_WITH((kvtrim::KVCache<kvtrim::FullCache, kvtrim::CudaBackend<float>>(shape(2, 6, 16))),
                      Catch::Matchers::Contains("head_dim is 6"));
  REQUIRE_THROWS_WITH((kvtrim::KVCache<Streaming, kvtrim::CudaBackend<float>>(cfg, {.sinks = 16})),
                      Catch::Matchers::Contains("sinks"));
}
