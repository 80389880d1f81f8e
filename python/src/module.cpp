// kvtrim._kvtrim: the nanobind module under the kvtrim Python package.
//
// It binds the runtime-chosen cache (any_cache.hpp) and the policy registry (registry.hpp): a policy added to
// the registry is available here with no code of its own. Tensors cross without copies as nb::ndarray (DLPack:
// NumPy arrays, PyTorch CPU tensors, and CUDA tensors when the CUDA factory is built). Every array is checked
// by hand (dtype, shape, device, C-contiguity) so that a bad one raises kvtrim.Error (a ValueError) naming the
// argument and what was expected; kvtrim::Error from the C++ side becomes the same exception with the same text.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <kvtrim/any_batch.hpp>
#include <kvtrim/any_cache.hpp>
#include <kvtrim/kvtrim.hpp>
#include <kvtrim/registry.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "factory.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtrim_py {

using In = nb::ndarray<nb::ro>;  // any dtype, shape and device: checked below, so errors are kvtrim.Error
using Out = nb::ndarray<>;

#ifdef KVTRIM_PYTHON_CUDA
inline constexpr bool kHasCuda = true;
#else
inline constexpr bool kHasCuda = false;
inline CacheHandle make_cuda_cache(std::string_view, const kvtrim::CacheConfig&, const kvtrim::PolicyOptions&,
                                   std::string_view, int) {
  kvtrim::detail::throw_error("this kvtrim module was built without CUDA (rebuild with KVTRIM_PYTHON_CUDA=ON: "
                              "see python/README.md)");
}
#endif

std::string dtype_name(nb::dlpack::dtype t) {
  const char* kind = t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Int)      ? "int"
                     : t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::UInt)   ? "uint"
                     : t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float)  ? "float"
                     : t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bfloat) ? "bfloat"
                     : t.code == static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bool)   ? "bool"
                                                                                           : "dtype code ";
  std::string s = kind;
  if (s == "dtype code ") s += std::to_string(t.code) + " of ";
  return s + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : "");
}

template <class A>
std::string shape_text(const A& a) {
  std::string s = "(";
  for (std::size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

enum class Memory { kHost, kDevice };

// One argument of a call: where it lives and its rows. `rows`: a leading token dimension [T, heads, d] or
// [T, heads*d] (prefill, append); otherwise [heads, d] or [heads*d] (decode), leading dimensions of size 1
// allowed. Returns T (1 without rows).
struct Arg {
  const float* data;
  std::size_t rows;
  Memory memory;
};

template <class A>
Arg check_array(const A& a, const char* op, const char* name, int heads, int d, bool rows, const CacheHandle& h) {
  const auto fail = [&](const auto&... parts) {
    kvtrim::detail::throw_error(op, ": ", name, " ", parts...);
  };
  if (a.dtype() != nb::dtype<float>())
    fail("has dtype ", dtype_name(a.dtype()), "; kvtrim takes float32 (the C++ API computes on float spans: convert "
         "with .float() / .astype(numpy.float32))");
  Memory memory = Memory::kHost;
  const int dev = a.device_type();
  if (dev == nb::device::cuda::value) {
    if (!h.on_device)
      fail("is a CUDA tensor but this cache uses the CPU backend (make the cache with device='cuda', or pass CPU "
           "tensors)");
    if (a.device_id() != h.device)
      fail("is on CUDA device ", a.device_id(), " but this cache lives on CUDA device ", h.device);
    memory = Memory::kDevice;
  } else if (dev != nb::device::cpu::value && dev != nb::device::cuda_host::value) {
    fail("lives on DLPack device type ", dev, "; kvtrim takes CPU", h.on_device ? " or CUDA" : "", " memory");
  }
  // Shape: [rows?] + [heads, d] or [heads * d].
  const std::size_t nd = a.ndim();
  const std::size_t width = static_cast<std::size_t>(heads) * static_cast<std::size_t>(d);
  std::size_t T = 1, first = 0;
  bool ok = false;
  if (rows) {
    if (nd >= 2) T = a.shape(0), first = 1;
  } else {
    while (first + 1 < nd && a.shape(first) == 1 && nd - first > 2) ++first;  // drop leading size-1 dims
  }
  const std::size_t rest = nd - first;
  if (rest == 2) ok = a.shape(first) == static_cast<std::size_t>(heads) && a.shape(first + 1) == static_cast<std::size_t>(d);
  if (rest == 1) ok = a.shape(first) == width;
  if (!ok || (rows && nd < 2))
    fail("has shape ", shape_text(a), "; expected ", rows ? "(T, " : "(", heads, ", ", d, ") or ", rows ? "(T, " : "(",
         width, rows ? ")" : ",)", rows ? " with T tokens" : "");
  if (rows && T == 0) fail("has no rows (T = 0)");
  // C-contiguous (size-1 dimensions may have any stride).
  std::int64_t expect = 1;
  for (std::size_t i = nd; i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect)
      fail("is not C-contiguous (shape ", shape_text(a), ", strides in elements ", [&] {
        std::string s = "(";
        for (std::size_t j = 0; j < nd; ++j) s += (j ? ", " : "") + std::to_string(a.stride(j));
        return s + ")";
      }(), "); pass a contiguous copy (.contiguous() / numpy.ascontiguousarray)");
    expect *= static_cast<std::int64_t>(a.shape(i));
  }
  return {static_cast<const float*>(a.data()), T, memory};
}

std::span<const float> span_of(const Arg& a, std::size_t n) { return {a.data, n}; }
std::span<float> span_out(const Arg& a, std::size_t n) { return {const_cast<float*>(a.data), n}; }

// The [T, ...] arguments of a multi-token call, checked: same rows, same memory.
struct Rows {
  Arg q, k, v, o;
};
void same_memory(const char* op, const Arg& q, const Arg& k, const Arg& v, const Arg& o, bool check_finite) {
  KVTRIM_CHECK(k.memory == q.memory && v.memory == q.memory && o.memory == q.memory, op,
               ": q, k, v and out must all be host memory or all CUDA device memory");
  KVTRIM_CHECK(q.memory == Memory::kHost || !check_finite, op,
               ": CUDA tensors need a cache made with check_finite=False (the finiteness check reads inputs on "
               "the host)");
}
Rows check_rows(const char* op, const kvtrim::CacheConfig& c, const In& Q, const In& K, const In& V, const Out& out,
                const CacheHandle& h) {
  const Rows r{check_array(Q, op, "Q", c.n_q_heads, c.head_dim, true, h),
               check_array(K, op, "K", c.n_kv_heads, c.head_dim, true, h),
               check_array(V, op, "V", c.n_kv_heads, c.head_dim, true, h),
               check_array(out, op, "out", c.n_q_heads, c.head_dim, true, h)};
  KVTRIM_CHECK(r.k.rows == r.q.rows && r.v.rows == r.q.rows && r.o.rows == r.q.rows, op, ": Q, K, V and out must have "
               "the same number of rows (tokens); got ", r.q.rows, ", ", r.k.rows, ", ", r.v.rows, " and ", r.o.rows);
  same_memory(op, r.q, r.k, r.v, r.o, c.check_finite);
  return r;
}

// Kept positions as a NumPy int64 array that owns them.
using Positions = nb::ndarray<nb::numpy, std::int64_t, nb::ndim<1>>;
Positions positions_array(std::vector<std::int64_t> positions) {
  auto* p = new std::vector<std::int64_t>(std::move(positions));
  nb::capsule owner(p, [](void* x) noexcept { delete static_cast<std::vector<std::int64_t>*>(x); });
  return {p->data(), {p->size()}, owner};
}

// One multi-token call of a cache over checked rows.
enum class Chunk { kPrefill, kAppend, kVerify };
void run_chunk(kvtrim::AnyCache& cache, Chunk kind, int layer, const Rows& r) {
  const auto& c = cache.config();
  const std::size_t qw = static_cast<std::size_t>(c.n_q_heads) * c.head_dim;
  const std::size_t kw = static_cast<std::size_t>(c.n_kv_heads) * c.head_dim;
  const auto q = span_of(r.q, r.q.rows * qw), k = span_of(r.k, r.k.rows * kw), v = span_of(r.v, r.v.rows * kw);
  const auto o = span_out(r.o, r.o.rows * qw);
  if (kind == Chunk::kPrefill)
    cache.prefill(layer, q, k, v, o);
  else if (kind == Chunk::kAppend)
    cache.append(layer, q, k, v, o);
  else
    cache.verify(layer, q, k, v, o);
}

kvtrim::CacheConfig config_of(int n_layers, int n_kv_heads, int n_q_heads, int head_dim, int budget,
                              std::vector<int> head_budgets, int threads, bool check_finite) {
  return {.n_layers = n_layers, .n_kv_heads = n_kv_heads, .n_q_heads = n_q_heads, .head_dim = head_dim,
          .budget = budget, .head_budgets = std::move(head_budgets), .check_finite = check_finite, .threads = threads};
}

class Cache {
 public:
  Cache(const std::string& policy, int n_layers, int n_kv_heads, int n_q_heads, int head_dim, int budget,
        std::vector<int> head_budgets, std::vector<std::pair<std::string, std::string>> params,
        std::shared_ptr<kvtrim::EigenBasis> basis, int threads, bool check_finite, const std::string& device,
        int device_index, const std::string& storage) {
    const kvtrim::CacheConfig cfg =
        config_of(n_layers, n_kv_heads, n_q_heads, head_dim, budget, std::move(head_budgets), threads, check_finite);
    kvtrim::PolicyOptions opt{std::move(params), std::move(basis)};
    if (device == "cpu") {
      h_ = make_cpu_cache(policy, cfg, opt, storage);
    } else if (device == "cuda") {
      h_ = make_cuda_cache(policy, cfg, opt, storage, device_index);
    } else {
      kvtrim::detail::throw_error("Cache: device '", device, "'; expected 'cpu' or 'cuda'");
    }
    const auto& c = h_.cache->config();
    qw_ = static_cast<std::size_t>(c.n_q_heads) * c.head_dim;
    kw_ = static_cast<std::size_t>(c.n_kv_heads) * c.head_dim;
  }

  void prefill(int layer, const In& Q, const In& K, const In& V, const Out& out) {
    chunk(layer, Q, K, V, out, Chunk::kPrefill);
  }

  void decode(int layer, const In& q_, const In& k_, const In& v_, const Out& out, std::int64_t position) {
    const auto& c = h_.cache->config();
    const Arg q = check_array(q_, "decode", "q", c.n_q_heads, c.head_dim, false, h_);
    const Arg k = check_array(k_, "decode", "k", c.n_kv_heads, c.head_dim, false, h_);
    const Arg v = check_array(v_, "decode", "v", c.n_kv_heads, c.head_dim, false, h_);
    const Arg o = check_array(out, "decode", "out", c.n_q_heads, c.head_dim, false, h_);
    same_memory("decode", q, k, v, o, c.check_finite);
    idle();
    h_.cache->decode(layer, span_of(q, qw_), span_of(k, kw_), span_of(v, kw_), span_out(o, qw_), position);
  }

  // T new tokens of one layer, each through decode in order (token i attends to the kept tokens and tokens < i
  // of this call, as if decoded one by one), at positions position, position+1, ... (or the next ones).
  // A rejected row i leaves rows < i applied; the error names the row.
  void decode_rows(int layer, const In& Q, const In& K, const In& V, const Out& out, std::int64_t position) {
    const Rows r = check_rows("decode_rows", h_.cache->config(), Q, K, V, out, h_);
    KVTRIM_CHECK(position >= kvtrim::kNextPosition, "decode_rows: position ", position,
                 " must be >= 0 (or -1 for the next position)");
    Busy busy(*this);
    nb::gil_scoped_release release;
    for (std::size_t t = 0; t < r.q.rows; ++t) {
      const std::int64_t pos = position == kvtrim::kNextPosition ? kvtrim::kNextPosition
                                                                 : position + static_cast<std::int64_t>(t);
      try {
        h_.cache->decode(layer, {r.q.data + t * qw_, qw_}, {r.k.data + t * kw_, kw_}, {r.v.data + t * kw_, kw_},
                         {const_cast<float*>(r.o.data) + t * qw_, qw_}, pos);
      } catch (const kvtrim::Error& e) {
        if (r.q.rows == 1) throw;
        std::string what = e.what();
        if (what.rfind("kvtrim: ", 0) == 0) what.erase(0, 8);
        kvtrim::detail::throw_error("decode_rows: row ", t, " of ", r.q.rows, " (rows before it were applied): ", what);
      }
    }
  }

  // KVCache::append (a chunk: causal attention over the kept tokens plus the chunk, the decode rule once after
  // it) and KVCache::verify (the same outputs, nothing kept).
  void append(int layer, const In& Q, const In& K, const In& V, const Out& out) {
    chunk(layer, Q, K, V, out, Chunk::kAppend);
  }
  void verify(int layer, const In& Q, const In& K, const In& V, const Out& out) {
    chunk(layer, Q, K, V, out, Chunk::kVerify);
  }

  void reset() {
    idle();
    h_.cache->reset();
  }

  const kvtrim::AnyCache& any() const {
    idle();
    return *h_.cache;
  }
  const CacheHandle& handle() const { return h_; }

  Positions positions(int layer, int kv_head) const { return positions_array(any().positions(layer, kv_head)); }

  std::vector<std::pair<std::string, std::string>> params() const {
    std::vector<std::pair<std::string, std::string>> out;
    std::istringstream in(any().params());
    for (std::string item; in >> item;) {
      const std::size_t eq = item.find('=');
      out.emplace_back(item.substr(0, eq), eq == std::string::npos ? "" : item.substr(eq + 1));
    }
    return out;
  }

  void set_stream(std::uintptr_t stream) {
    idle();
    KVTRIM_CHECK(h_.set_stream != nullptr, "set_stream: this cache uses the CPU backend (no CUDA stream)");
    h_.set_stream(stream);
  }
  void synchronize() {
    if (h_.synchronize) {
      Busy busy(*this);
      nb::gil_scoped_release release;
      h_.synchronize();
    }
  }

 private:
  // prefill, append and synchronize run without the GIL: while they do, the cache refuses other calls (a cache
  // serves one thread at a time) instead of racing. The flag is set and tested with the GIL held.
  struct Busy {
    explicit Busy(Cache& c) : c_(c) {
      c_.idle();
      c_.busy_.store(true);
    }
    ~Busy() { c_.busy_.store(false); }
    Cache& c_;
  };
  void idle() const {
    KVTRIM_CHECK(!busy_.load(), "this cache is in use by another thread (a cache serves one thread at a time)");
  }

  // prefill, append, verify: checked, then run without the GIL.
  void chunk(int layer, const In& Q, const In& K, const In& V, const Out& out, Chunk kind) {
    const char* op = kind == Chunk::kPrefill ? "prefill" : kind == Chunk::kAppend ? "append" : "verify";
    const Rows r = check_rows(op, h_.cache->config(), Q, K, V, out, h_);
    Busy busy(*this);
    nb::gil_scoped_release release;
    run_chunk(*h_.cache, kind, layer, r);
  }

  CacheHandle h_;
  std::size_t qw_ = 0, kw_ = 0;
  std::atomic<bool> busy_{false};
};

// kvtrim::KVBatch of the registered policy `policy` on the CPU (any_batch.hpp): sequences by id, one token of many
// sequences per decode call on the batch's threads. Calls hold the GIL (a batch serves one Python thread).
class Batch {
 public:
  Batch(const std::string& policy, int n_layers, int n_kv_heads, int n_q_heads, int head_dim, int budget,
        std::vector<int> head_budgets, std::vector<std::pair<std::string, std::string>> params,
        std::shared_ptr<kvtrim::EigenBasis> basis, int threads, bool check_finite, const std::string& storage) {
    const kvtrim::CacheConfig shape =
        config_of(n_layers, n_kv_heads, n_q_heads, head_dim, budget, std::move(head_budgets), 1, check_finite);
    const kvtrim::PolicyOptions opt{std::move(params), std::move(basis)};
    const kvtrim::BatchOptions bo{.threads = threads};
    if (storage == "float32")
      b_ = kvtrim::make_batch<kvtrim::CpuBackend<float>>(policy, shape, opt, bo);
    else if (storage == "float16")
      b_ = kvtrim::make_batch<kvtrim::CpuBackend<kvtrim::half>>(policy, shape, opt, bo);
    else if (storage == "bfloat16")
      b_ = kvtrim::make_batch<kvtrim::CpuBackend<kvtrim::bfloat16>>(policy, shape, opt, bo);
    else
      kvtrim::detail::throw_error("Batch: storage '", storage, "'; expected float32, float16 or bfloat16");
  }

  // A new sequence with the batch's budgets, or its own (budget > 0 or head_budgets given).
  int add(int budget, std::vector<int> head_budgets) {
    if (budget <= 0 && head_budgets.empty()) return b_->add();
    kvtrim::CacheConfig own = b_->shape();
    own.budget = budget;
    own.head_budgets = std::move(head_budgets);
    return b_->add(own);
  }
  void remove(int id) { b_->remove(id); }
  std::vector<int> ids() const { return b_->ids(); }
  kvtrim::AnyCache& sequence(int id) { return b_->sequence(id); }
  const kvtrim::CacheConfig& shape() const { return b_->shape(); }
  std::string_view policy() const { return b_->policy_name(); }

  // Row r of Q [B, n_q_heads, head_dim], K and V [B, n_kv_heads, head_dim], out like Q belongs to ids[r].
  void decode(int layer, const std::vector<int>& ids, const In& Q, const In& K, const In& V, const Out& out,
              const std::vector<std::int64_t>& positions) {
    const Rows r = check_rows("Batch.decode", b_->shape(), Q, K, V, out, host_);
    KVTRIM_CHECK(r.q.rows == ids.size(), "Batch.decode: Q has ", r.q.rows, " rows for ", ids.size(),
                 " sequence ids; expected one row per id");
    const auto& c = b_->shape();
    const std::size_t qw = static_cast<std::size_t>(c.n_q_heads) * c.head_dim * ids.size();
    const std::size_t kw = static_cast<std::size_t>(c.n_kv_heads) * c.head_dim * ids.size();
    b_->decode(layer, ids, span_of(r.q, qw), span_of(r.k, kw), span_of(r.v, kw), span_out(r.o, qw), positions);
  }
  // prefill, append, verify of one sequence.
  void chunk(int id, int layer, const In& Q, const In& K, const In& V, const Out& out, Chunk kind) {
    const char* op = kind == Chunk::kPrefill ? "Batch.prefill" : kind == Chunk::kAppend ? "Batch.append" : "Batch.verify";
    kvtrim::AnyCache& cache = b_->sequence(id);
    run_chunk(cache, kind, layer, check_rows(op, cache.config(), Q, K, V, out, host_));
  }

 private:
  std::unique_ptr<kvtrim::AnyBatch> b_;
  CacheHandle host_;  // host memory only
};

// Each registered policy's default parameters (registry entry defaults over Params{}), as text.
std::vector<std::pair<std::string, std::string>> policy_params(const std::string& name) {
  std::vector<std::pair<std::string, std::string>> out;
  kvtrim::with_policy(name, [&](const auto& entry) { out = kvtrim::list_params(entry.params()); });
  return out;
}

bool never_evicts(const std::string& name) {
  bool never = false;
  kvtrim::with_policy(name, [&](const auto& entry) {
    using P = typename std::remove_cvref_t<decltype(entry)>::Policy;
    never = kvtrim::never_evicts_in_decode<P>();
  });
  return never;
}

bool needs_basis(const std::string& name) {
  bool needs = false;
  kvtrim::with_policy(name, [&](const auto& entry) {
    needs = std::remove_cvref_t<decltype(entry)>::kNeedsBasis;
  });
  return needs;
}

}  // namespace kvtrim_py

NB_MODULE(_kvtrim, m) {
  using namespace kvtrim_py;
  m.doc() = "kvtrim C++ core (nanobind); use the kvtrim package, not this module";
  nb::exception<kvtrim::Error>(m, "Error", PyExc_ValueError);

  m.def("policies", [] {
    std::vector<std::string> names;
    for (std::string_view n : kvtrim::policy_names()) names.emplace_back(n);
    return names;
  }, "The registered policy names, in registry order.");
  m.def("policy_params", &policy_params, "name"_a, "A policy's parameters with their default values, as text.");
  m.def("needs_basis", &needs_basis, "name"_a, "Whether the policy needs a calibrated EigenBasis.");
  m.def("never_evicts", &never_evicts, "name"_a,
        "Whether the policy never evicts while decoding (its budget must hold every token).");
  m.attr("has_cuda") = kHasCuda;
  m.attr("next_position") = kvtrim::kNextPosition;

  nb::class_<kvtrim::EigenBasis>(m, "EigenBasis", "Per-(layer, KV head) low-rank key/value bases (Eigen Attention).")
      .def_static("load", [](const std::string& path) { return std::make_shared<kvtrim::EigenBasis>(kvtrim::EigenBasis::load(path)); },
                  "path"_a)
      .def("save", &kvtrim::EigenBasis::save, "path"_a)
      .def_prop_ro("n_layers", &kvtrim::EigenBasis::n_layers)
      .def_prop_ro("n_kv_heads", &kvtrim::EigenBasis::n_kv_heads)
      .def_prop_ro("head_dim", &kvtrim::EigenBasis::head_dim)
      .def_prop_ro("floats_per_token", &kvtrim::EigenBasis::floats_per_token)
      .def("key_rank", &kvtrim::EigenBasis::key_rank, "layer"_a, "kv_head"_a)
      .def("value_rank", &kvtrim::EigenBasis::value_rank, "layer"_a, "kv_head"_a);

  nb::class_<kvtrim::EigenCalibrator>(m, "EigenCalibrator",
                                      "Collects post-RoPE keys, values (and queries) to calibrate an EigenBasis.")
      .def("__init__", [](kvtrim::EigenCalibrator* self, int n_layers, int n_kv_heads, int n_q_heads, int head_dim) {
             kvtrim::CacheConfig shape{.n_layers = n_layers, .n_kv_heads = n_kv_heads, .n_q_heads = n_q_heads,
                                       .head_dim = head_dim, .budget = 1};
             new (self) kvtrim::EigenCalibrator(shape);
           }, nb::kw_only(), "n_layers"_a, "n_kv_heads"_a, "n_q_heads"_a, "head_dim"_a)
      .def("_add", [](kvtrim::EigenCalibrator& self, int layer, int n_kv_heads, int n_q_heads, int head_dim,
                      const In& K, const In& V, const In* Q) {
             CacheHandle host;  // host memory only
             const Arg k = check_array(K, "EigenCalibrator.add", "K", n_kv_heads, head_dim, true, host);
             const Arg v = check_array(V, "EigenCalibrator.add", "V", n_kv_heads, head_dim, true, host);
             const std::size_t kw = static_cast<std::size_t>(n_kv_heads) * head_dim;
             std::span<const float> qs;
             if (Q != nullptr) {
               const Arg q = check_array(*Q, "EigenCalibrator.add", "Q", n_q_heads, head_dim, true, host);
               qs = span_of(q, q.rows * static_cast<std::size_t>(n_q_heads) * head_dim);
             }
             self.add(layer, span_of(k, k.rows * kw), span_of(v, v.rows * kw), qs);
           }, "layer"_a, "n_kv_heads"_a, "n_q_heads"_a, "head_dim"_a, "K"_a, "V"_a, "Q"_a.none())
      .def("key_rows", &kvtrim::EigenCalibrator::key_rows, "layer"_a, "kv_head"_a)
      .def("basis", [](const kvtrim::EigenCalibrator& self, double energy, int key_rank, int value_rank,
                       bool uniform_layer_rank, bool use_queries) {
             kvtrim::EigenCalibration opt;
             opt.energy = energy;
             opt.key_rank = key_rank;
             opt.value_rank = value_rank;
             opt.uniform_layer_rank = uniform_layer_rank;
             opt.use_queries = use_queries;
             return std::make_shared<kvtrim::EigenBasis>(self.basis(opt));
           }, nb::kw_only(), "energy"_a = 0.98, "key_rank"_a = 0, "value_rank"_a = 0, "uniform_layer_rank"_a = true,
           "use_queries"_a = true);

  nb::class_<Cache>(m, "Cache")
      .def(nb::init<const std::string&, int, int, int, int, int, std::vector<int>,
                    std::vector<std::pair<std::string, std::string>>, std::shared_ptr<kvtrim::EigenBasis>, int, bool,
                    const std::string&, int, const std::string&>(),
           "policy"_a, "n_layers"_a, "n_kv_heads"_a, "n_q_heads"_a, "head_dim"_a, "budget"_a, "head_budgets"_a,
           "params"_a, "basis"_a.none(), "threads"_a, "check_finite"_a, "device"_a, "device_index"_a, "storage"_a)
      .def("prefill_into", &Cache::prefill, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a,
           "Prompt of T tokens for one layer; writes causal attention into out, then the policy compresses.")
      .def("decode_into", &Cache::decode, "layer"_a, "q"_a, "k"_a, "v"_a, "out"_a, "position"_a = kvtrim::kNextPosition,
           "One new token for one layer; writes attention over the kept tokens into out.")
      .def("decode_rows_into", &Cache::decode_rows, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a,
           "position"_a = kvtrim::kNextPosition, "T new tokens of one layer, decoded one after another.")
      .def("append_into", &Cache::append, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a,
           "A chunk of T tokens: causal attention over the kept tokens plus the chunk; the policy evicts once, after it.")
      .def("verify_into", &Cache::verify, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a,
           "The outputs append would write for T draft tokens; the cache does not change.")
      .def("reset", &Cache::reset, "Forget every token (a new sequence); budgets and parameters stay.")
      .def("size", [](const Cache& c, int l, int h) { return c.any().size(l, h); }, "layer"_a, "kv_head"_a)
      .def("budget", [](const Cache& c, int l, int h) { return c.any().budget(l, h); }, "layer"_a, "kv_head"_a)
      .def("positions", &Cache::positions, "layer"_a, "kv_head"_a, "Original positions of the kept tokens, ascending.")
      .def("next_position", [](const Cache& c, int l) { return c.any().next_position(l); }, "layer"_a)
      .def_prop_ro("bytes_used", [](const Cache& c) { return c.any().bytes_used(); })
      .def_prop_ro("bytes_reserved", [](const Cache& c) { return c.any().bytes_reserved(); })
      .def_prop_ro("evictions", [](const Cache& c) { return c.any().evictions(); })
      .def_prop_ro("merges", [](const Cache& c) { return c.any().merges(); })
      .def_prop_ro("policy", [](const Cache& c) { return std::string(c.any().policy_name()); })
      .def_prop_ro("_params", &Cache::params)
      .def_prop_ro("n_layers", [](const Cache& c) { return c.any().config().n_layers; })
      .def_prop_ro("n_kv_heads", [](const Cache& c) { return c.any().config().n_kv_heads; })
      .def_prop_ro("n_q_heads", [](const Cache& c) { return c.any().config().n_q_heads; })
      .def_prop_ro("head_dim", [](const Cache& c) { return c.any().config().head_dim; })
      .def_prop_ro("check_finite", [](const Cache& c) { return c.any().config().check_finite; })
      .def_prop_ro("on_device", [](const Cache& c) { return c.handle().on_device; })
      .def("_set_stream", &Cache::set_stream, "stream"_a)
      .def("synchronize", &Cache::synchronize, "Waits for queued CUDA work (no-op on the CPU backend).");

  nb::class_<Batch>(m, "Batch")
      .def(nb::init<const std::string&, int, int, int, int, int, std::vector<int>,
                    std::vector<std::pair<std::string, std::string>>, std::shared_ptr<kvtrim::EigenBasis>, int, bool,
                    const std::string&>(),
           "policy"_a, "n_layers"_a, "n_kv_heads"_a, "n_q_heads"_a, "head_dim"_a, "budget"_a, "head_budgets"_a,
           "params"_a, "basis"_a.none(), "threads"_a, "check_finite"_a, "storage"_a)
      .def("_add", &Batch::add, "budget"_a, "head_budgets"_a)
      .def("remove", &Batch::remove, "id"_a, "The sequence leaves the batch; its id may be reused by a later add.")
      .def_prop_ro("ids", &Batch::ids, "The ids in use, ascending.")
      .def("decode_into", &Batch::decode, "layer"_a, "ids"_a, "Q"_a, "K"_a, "V"_a, "out"_a, "positions"_a,
           "One token of each listed sequence: row r of Q, K, V and out belongs to ids[r].")
      .def("prefill_into", [](Batch& b, int id, int layer, const In& Q, const In& K, const In& V, const Out& out) {
             b.chunk(id, layer, Q, K, V, out, Chunk::kPrefill);
           }, "id"_a, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a)
      .def("append_into", [](Batch& b, int id, int layer, const In& Q, const In& K, const In& V, const Out& out) {
             b.chunk(id, layer, Q, K, V, out, Chunk::kAppend);
           }, "id"_a, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a)
      .def("verify_into", [](Batch& b, int id, int layer, const In& Q, const In& K, const In& V, const Out& out) {
             b.chunk(id, layer, Q, K, V, out, Chunk::kVerify);
           }, "id"_a, "layer"_a, "Q"_a, "K"_a, "V"_a, "out"_a)
      .def("size", [](Batch& b, int id, int l, int h) { return b.sequence(id).size(l, h); }, "id"_a, "layer"_a,
           "kv_head"_a)
      .def("budget", [](Batch& b, int id, int l, int h) { return b.sequence(id).budget(l, h); }, "id"_a, "layer"_a,
           "kv_head"_a)
      .def("positions",
           [](Batch& b, int id, int l, int h) { return positions_array(b.sequence(id).positions(l, h)); }, "id"_a,
           "layer"_a, "kv_head"_a, "Original positions of the kept tokens of one sequence, ascending (int64 array).")
      .def("next_position", [](Batch& b, int id, int l) { return b.sequence(id).next_position(l); }, "id"_a, "layer"_a)
      .def("evictions", [](Batch& b, int id) { return b.sequence(id).evictions(); }, "id"_a)
      .def("bytes_used", [](Batch& b, int id) { return b.sequence(id).bytes_used(); }, "id"_a)
      .def_prop_ro("policy", [](const Batch& b) { return std::string(b.policy()); })
      .def_prop_ro("n_layers", [](const Batch& b) { return b.shape().n_layers; })
      .def_prop_ro("n_kv_heads", [](const Batch& b) { return b.shape().n_kv_heads; })
      .def_prop_ro("n_q_heads", [](const Batch& b) { return b.shape().n_q_heads; })
      .def_prop_ro("head_dim", [](const Batch& b) { return b.shape().head_dim; });
}
