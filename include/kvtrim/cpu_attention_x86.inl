// kvtrim: the x86 decode attention kernel (see cpu_attention.hpp), written once and compiled once per
// instruction set: cpu_attention.hpp includes this file inside namespace avx2 and again inside namespace avx512,
// with KVTRIM_SIMD_TARGET naming the instruction set and KVTRIM_SIMD_WIDE 0 or 1. GCC and Clang take a target
// only per function, so a kernel for two instruction sets is two sets of functions; including the one text twice
// keeps it one text.
//
// Both builds compute bit for bit the same result: the wide one moves the same per-lane arithmetic into 512-bit
// registers and never reorders a sum. Scores of 16-bit rows: two keys' 8-column partial sums share a 16-lane
// register (each half is the narrow build's register for that key) and meet the same addition tree. Values: every
// output column accumulates the same rows in the same order, 16 columns per register. exp and the softmax
// passes: the same per-lane arithmetic 16 lanes at a time, their sums still accumulated 8 lanes at a time. What
// the wide build changes is the instruction count: half the multiply-adds, which is what bounds 16-bit storage
// (4 per stored element at group 4) on CPUs whose multiply-add units are 512 bits wide (e.g. AMD Zen 5).
// No include guard: included once per instruction set.

#if !defined(KVTRIM_SIMD_TARGET) || !defined(KVTRIM_SIMD_WIDE)
#error "cpu_attention_x86.inl is included by cpu_attention.hpp, which defines KVTRIM_SIMD_TARGET and KVTRIM_SIMD_WIDE"
#endif

#define KVTRIM_SIMD_FN __attribute__((target(KVTRIM_SIMD_TARGET)))
#define KVTRIM_SIMD_INLINE __attribute__((target(KVTRIM_SIMD_TARGET), always_inline)) inline
#define KVTRIM_SIMD_LAMBDA __attribute__((target(KVTRIM_SIMD_TARGET)))
#define KVTRIM_SIMD_LAMBDA_INLINE __attribute__((target(KVTRIM_SIMD_TARGET), always_inline))
#if defined(__clang__)
#define KVTRIM_UNROLL _Pragma("unroll")
#else
#define KVTRIM_UNROLL _Pragma("GCC unroll 16")
#endif

inline constexpr bool kWide = KVTRIM_SIMD_WIDE != 0;

// Eight stored elements as eight floats (exact conversions).
KVTRIM_SIMD_FN inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
KVTRIM_SIMD_FN inline __m256 load8(const half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KVTRIM_SIMD_FN inline __m256 load8(const bfloat16* p) {  // bf16 is the upper half of a float
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// Horizontal sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
KVTRIM_SIMD_FN inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: partial sums of a, b, c, d
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// [sum(a0), sum(a1), sum(a2), sum(a3) | sum(b0), sum(b1), sum(b2), sum(b3)].
KVTRIM_SIMD_INLINE __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 b0, __m256 b1, __m256 b2,
                                __m256 b3) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit lane
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Keeps a value in a register: the compiler would otherwise fold its load into every FMA that uses it,
// which costs a load per FMA.
KVTRIM_SIMD_INLINE __m256 in_register(__m256 x) {
  __asm__("" : "+x"(x));
  return x;
}

// Registers of W floats, 8 (AVX2) and, in the wide build, 16: the lane-wise operations that the value sums,
// exp and the softmax passes are written with, so that each is written once for both widths. Every operation
// is exact or correctly rounded per lane, so a computation gives the same lanes at either width.
template <int W>
struct Lanes;
template <>
struct Lanes<8> {
  using V = __m256;
  using Mask = __m256;
  KVTRIM_SIMD_INLINE static V load(const float* p) { return _mm256_loadu_ps(p); }
  template <class T>
  KVTRIM_SIMD_INLINE static V load_stored(const T* p) {
    return load8(p);
  }
  KVTRIM_SIMD_INLINE static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  KVTRIM_SIMD_INLINE static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  KVTRIM_SIMD_INLINE static V splat(float x) { return _mm256_set1_ps(x); }
  KVTRIM_SIMD_INLINE static V add(V a, V b) { return _mm256_add_ps(a, b); }
  KVTRIM_SIMD_INLINE static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  KVTRIM_SIMD_INLINE static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  KVTRIM_SIMD_INLINE static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  KVTRIM_SIMD_INLINE static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  KVTRIM_SIMD_INLINE static V clamp(V x, V lo, V hi) { return _mm256_min_ps(_mm256_max_ps(x, lo), hi); }
  KVTRIM_SIMD_INLINE static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  KVTRIM_SIMD_INLINE static Mask less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  KVTRIM_SIMD_INLINE static V zero_where(Mask m, V x) { return _mm256_andnot_ps(m, x); }
  // 2^k for integral k in [-126, 127]: k + 127 in the exponent field.
  KVTRIM_SIMD_INLINE static V pow2(V k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
  }
};

#if KVTRIM_SIMD_WIDE
// The 512-bit operations below that GCC 12 implements from an "undefined" register (which -Wuninitialized then
// reports: GCC bug 105593) are spelled with an all-ones zero-mask; the instructions are the same. The halves of a
// register are taken with __builtin_shufflevector for the same reason.
constexpr __mmask16 kAll16 = 0xFFFF;
constexpr __mmask8 kAll8 = 0xFF;

KVTRIM_SIMD_INLINE __m512 in_register(__m512 x) {
  __asm__("" : "+v"(x));
  return x;
}

// Sixteen bf16 values as sixteen floats (bf16 is the upper half of a float).
KVTRIM_SIMD_INLINE __m512 widen_bf16(__m256i x) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, x), 16));
}

// Sixteen stored elements as sixteen floats (exact conversions).
KVTRIM_SIMD_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
KVTRIM_SIMD_INLINE __m512 load16(const half* p) {
  return _mm512_maskz_cvtph_ps(kAll16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
KVTRIM_SIMD_INLINE __m512 load16(const bfloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Eight 16-bit elements at a and eight at b (two rows) as one register, a in the low half (score_pairs runs for
// 16-bit rows only).
KVTRIM_SIMD_INLINE __m256i load128x2(const void* a, const void* b) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(a))),
                                 _mm_loadu_si128(static_cast<const __m128i*>(b)), 1);
}
KVTRIM_SIMD_INLINE __m512 load8x2(const half* a, const half* b) {
  return _mm512_maskz_cvtph_ps(kAll16, load128x2(a, b));
}
KVTRIM_SIMD_INLINE __m512 load8x2(const bfloat16* a, const bfloat16* b) { return widen_bf16(load128x2(a, b)); }
KVTRIM_SIMD_INLINE __m256 low_half(__m512 x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
KVTRIM_SIMD_INLINE __m256 high_half(__m512 x) {
  return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
}

template <>
struct Lanes<16> {
  using V = __m512;
  using Mask = __mmask16;
  KVTRIM_SIMD_INLINE static V load(const float* p) { return _mm512_loadu_ps(p); }
  template <class T>
  KVTRIM_SIMD_INLINE static V load_stored(const T* p) {
    return load16(p);
  }
  KVTRIM_SIMD_INLINE static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  KVTRIM_SIMD_INLINE static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  KVTRIM_SIMD_INLINE static V splat(float x) { return _mm512_set1_ps(x); }
  KVTRIM_SIMD_INLINE static V add(V a, V b) { return _mm512_add_ps(a, b); }
  KVTRIM_SIMD_INLINE static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  KVTRIM_SIMD_INLINE static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  KVTRIM_SIMD_INLINE static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  KVTRIM_SIMD_INLINE static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  KVTRIM_SIMD_INLINE static V clamp(V x, V lo, V hi) {
    return _mm512_maskz_min_ps(kAll16, _mm512_maskz_max_ps(kAll16, x, lo), hi);
  }
  KVTRIM_SIMD_INLINE static V round(V x) {
    return _mm512_maskz_roundscale_ps(kAll16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  KVTRIM_SIMD_INLINE static Mask less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  KVTRIM_SIMD_INLINE static V zero_where(Mask m, V x) { return _mm512_maskz_mov_ps(static_cast<Mask>(~m), x); }
  KVTRIM_SIMD_INLINE static V pow2(V k) {
    const __m512i e = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(kAll16, k), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, e, 23));
  }
};
#endif

// exp(x) for x <= 88 (Cephes-style: x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1-2 ulp).
// Inputs below ln(FLT_MIN) give 0 (so -inf gives 0).
template <int W>
KVTRIM_SIMD_INLINE typename Lanes<W>::V exp_lanes(typename Lanes<W>::V x) {
  using L = Lanes<W>;
  const typename L::V lo = L::splat(-87.3365478515625f);
  const typename L::Mask under = L::less(x, lo);
  x = L::clamp(x, lo, L::splat(88.0f));
  const typename L::V k = L::round(L::mul(x, L::splat(1.44269504088896341f)));
  typename L::V r = L::fnma(k, L::splat(0.693359375f), x);
  r = L::fnma(k, L::splat(-2.12194440e-4f), r);
  typename L::V p = L::splat(1.9875691500e-4f);
  p = L::fma(p, r, L::splat(1.3981999507e-3f));
  p = L::fma(p, r, L::splat(8.3334519073e-3f));
  p = L::fma(p, r, L::splat(4.1665795894e-2f));
  p = L::fma(p, r, L::splat(1.6666665459e-1f));
  p = L::fma(p, r, L::splat(5.0000001201e-1f));
  p = L::fma(p, L::mul(r, r), L::add(r, L::splat(1.0f)));
  return L::zero_where(under, L::mul(p, L::pow2(k)));
}
KVTRIM_SIMD_INLINE __m256 exp(__m256 x) { return exp_lanes<8>(x); }
#if KVTRIM_SIMD_WIDE
KVTRIM_SIMD_INLINE __m512 exp(__m512 x) { return exp_lanes<16>(x); }
#endif

// The widest registers of this build.
inline constexpr int kLanes = kWide ? 16 : 8;

// How far ahead of the tile being computed the keys and values are prefetched, per stream. Far enough to
// cover DRAM latency under load (a tile takes ~0.5-1 us), near enough that the lines are still in L1 when
// their tile comes (two streams x (tile + distance) fill most of the 32 KiB L1 already).
inline constexpr std::size_t kPrefetchAhead = 8192;

// A byte range to prefetch in equal slices while a tile is computed: a burst of a whole tile's prefetches
// would occupy every L1 miss buffer at once and stall the tile's own loads.
struct Prefetch {
  const char* p = nullptr;
  std::size_t len = 0, slice = 0, done = 0;
  KVTRIM_SIMD_INLINE void next() {
    const std::size_t end = std::min(len, done + slice);
    for (std::size_t o = done; o < end; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    done = end;
  }
};

// The rows of X (n rows of `row` bytes) kPrefetchAhead bytes past tile t (TL rows per tile), in `parts` slices.
template <int TL>
inline Prefetch prefetch_tile(const void* X, int n, std::size_t row, int t, int parts) {
  Prefetch f;
  const std::size_t total = static_cast<std::size_t>(n) * row;
  const std::size_t from = static_cast<std::size_t>(t) * TL * row + kPrefetchAhead;
  if (from >= total) return f;
  const std::size_t k = static_cast<std::size_t>(parts);
  f.p = static_cast<const char*>(X) + from;
  f.len = std::min(static_cast<std::size_t>(TL) * row, total - from);
  f.slice = ((f.len + k - 1) / k + 63) & ~std::size_t(63);
  return f;
}

// acc[4 * j + a] = the 8-lane partial dot products of query a < QB (rows of Q, stride d) with key j < KB
// (consecutive rows at K, stride d); the lanes of queries a >= QB stay 0. D > 0: d == D at compile time.
// Returns the first column not covered (d rounded down to a multiple of 8).
template <int D, int QB, int KB, class T>
KVTRIM_SIMD_INLINE int dot_block(const float* Q, const T* K, int d, __m256 (&acc)[4 * KB]) {
  const int dd = D > 0 ? D : d;
  KVTRIM_UNROLL for (int x = 0; x < 4 * KB; ++x) acc[x] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 <= dd; c += 8) {
    __m256 kv[KB];
    KVTRIM_UNROLL for (int j = 0; j < KB; ++j) kv[j] = load8(K + static_cast<std::size_t>(j) * dd + c);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const __m256 q = in_register(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * dd + c));
      KVTRIM_UNROLL for (int j = 0; j < KB; ++j) acc[4 * j + a] = _mm256_fmadd_ps(q, kv[j], acc[4 * j + a]);
    }
  }
  return c;
}

// t[4 * j + a] = the dot products over the columns [c, d) past the last multiple of 8, for dot_block's pairs.
template <int QB, int KB, class T>
inline void dot_tail(const float* Q, const T* K, int c, int d, float* t) {
  for (int j = 0; j < KB; ++j)
    for (int a = 0; a < 4; ++a) {
      float s = 0.0f;
      if (a < QB)
        for (int e = c; e < d; ++e)
          s += Q[static_cast<std::size_t>(a) * d + e] * to_float(K[static_cast<std::size_t>(j) * d + e]);
      t[4 * j + a] = s;
    }
}

// Scaled scores of QB queries against KB consecutive keys: S[4 * j + a] (lanes a >= QB get 0).
template <int D, int QB, int KB, class T>
KVTRIM_SIMD_INLINE void score_rows(const float* Q, const T* K, int d, float scale, float* S) {
  __m256 acc[4 * KB];
  const int c = dot_block<D, QB, KB>(Q, K, d, acc);
  alignas(16) float t[4 * KB];
  const bool tail = D <= 0 && c < d;
  if (tail) dot_tail<QB, KB>(Q, K, c, d, t);
  KVTRIM_UNROLL for (int j = 0; j < KB; ++j) {
    __m128 s = hsum4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    if (tail) s = _mm_add_ps(s, _mm_load_ps(t + 4 * j));
    _mm_store_ps(S + 4 * j, _mm_mul_ps(s, _mm_set1_ps(scale)));
  }
}

// Scaled scores of 4 queries against two consecutive keys, as one 8-lane vector at S (S[4 * j + a]).
template <int D, class T>
KVTRIM_SIMD_INLINE void score_pair(const float* Q, const T* K, int d, float scale, float* S) {
  __m256 acc[8];
  const int c = dot_block<D, 4, 2>(Q, K, d, acc);
  __m256 s = hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  if (D <= 0 && c < d) {
    alignas(32) float t[8];
    dot_tail<4, 2>(Q, K, c, d, t);
    s = _mm256_add_ps(s, _mm256_load_ps(t));
  }
  _mm256_store_ps(S, _mm256_mul_ps(s, _mm256_set1_ps(scale)));
}

#if KVTRIM_SIMD_WIDE
// Lane i of the result: a[2i] + a[2i + 1] for i < 8, b[2i - 16] + b[2i - 15] above (fp addition commutes, so
// these are the sums hadd forms).
KVTRIM_SIMD_INLINE __m512 pair_sums(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

// Scaled scores of 4 queries against 2 * NP consecutive keys (NP even), S[4 * j + a], bit for bit as score_pair
// computes them. The two keys of a pair share a 16-lane register (lanes 0-7 key 2p, 8-15 key 2p + 1), so each
// half accumulates exactly what score_pair's 8-lane register for that key does. The horizontal sums then form
// hsum8's tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), in three rounds of pair_sums: 4 queries x
// 2 keys of a pair after two rounds, 16 scores of two pairs after the third.
template <int D, int NP, class T>
KVTRIM_SIMD_INLINE void score_pairs(const float* Q, const T* K, int d, float scale, float* S) {
  static_assert(NP % 2 == 0, "the last round of sums takes two pairs");
  const int dd = D > 0 ? D : d;
  __m512 acc[4 * NP];
  KVTRIM_UNROLL for (int x = 0; x < 4 * NP; ++x) acc[x] = _mm512_setzero_ps();
  int c = 0;
  for (; c + 8 <= dd; c += 8) {
    __m512 kv[NP];
    KVTRIM_UNROLL for (int p = 0; p < NP; ++p) kv[p] =
        load8x2(K + static_cast<std::size_t>(2 * p) * dd + c, K + static_cast<std::size_t>(2 * p + 1) * dd + c);
    KVTRIM_UNROLL for (int a = 0; a < 4; ++a) {
      const __m512 q = in_register(_mm512_castpd_ps(_mm512_maskz_broadcast_f64x4(
          kAll8, _mm256_castps_pd(_mm256_loadu_ps(Q + static_cast<std::size_t>(a) * dd + c)))));
      KVTRIM_UNROLL for (int p = 0; p < NP; ++p) acc[4 * p + a] = _mm512_fmadd_ps(q, kv[p], acc[4 * p + a]);
    }
  }
  // After two rounds, pair p: lanes 4a + 2j + h = query a, key 2p + j, half h of hsum8's tree.
  __m512 z[NP];
  KVTRIM_UNROLL for (int p = 0; p < NP; ++p) {
    const __m512* x = acc + 4 * p;
    z[p] = pair_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));
  }
  // The third round takes the halves of pairs p and p + 1 into S's order: lane 4k + a = key k, query a.
  const __m512i lo = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 16, 20, 24, 28, 18, 22, 26, 30);
  const __m512i hi = _mm512_setr_epi32(1, 5, 9, 13, 3, 7, 11, 15, 17, 21, 25, 29, 19, 23, 27, 31);
  KVTRIM_UNROLL for (int p = 0; p < NP; p += 2) {
    __m512 s = _mm512_add_ps(_mm512_permutex2var_ps(z[p], lo, z[p + 1]), _mm512_permutex2var_ps(z[p], hi, z[p + 1]));
    if (D <= 0 && c < d) {
      alignas(64) float t[16];
      dot_tail<4, 2>(Q, K + static_cast<std::size_t>(2 * p) * dd, c, d, t);
      dot_tail<4, 2>(Q, K + static_cast<std::size_t>(2 * p + 2) * dd, c, d, t + 8);
      s = _mm512_add_ps(s, _mm512_load_ps(t));
    }
    _mm512_storeu_ps(S + 8 * p, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
  }
}
#endif

// Register blocking of a tile that is not Full: keys per score block and 8-column chunks per value block,
// by the number of queries in the block (registers: QB x blocks accumulators + operands <= 16).
constexpr int score_keys(int qb) { return qb >= 3 ? 3 : 4; }
constexpr int value_chunks(int qb) { return qb >= 3 ? 2 : qb == 2 ? 4 : 8; }

// Scaled scores of a tile's `rows` keys (Full: rows == TL and QB == 4): S[4 * r + a], and a zero row after
// an odd last row (the softmax reads rows in pairs). Each block of keys issues the next slice of pk.
template <int D, int TL, int QB, bool Full, class T>
KVTRIM_SIMD_FN inline void score_tile(const float* Q, const T* K, int dk, int rows, float scale, float* S,
                                      Prefetch& pk) {
  const int ddk = D > 0 ? D : dk;
  if constexpr (Full) {
#if KVTRIM_SIMD_WIDE
    // 16-bit rows: 4 key pairs per block in 16 lanes. Float rows keep the 8-lane pairs: the same bits, and
    // measured faster at DRAM sizes, where float storage is bound by bandwidth and not by multiply-adds.
    if constexpr (sizeof(T) == 2) {
      constexpr int NP = 4;
      static_assert(TL % (2 * NP) == 0, "a tile holds whole blocks of key pairs");
      KVTRIM_UNROLL for (int r = 0; r < TL; r += 2 * NP) {
        KVTRIM_UNROLL for (int p = 0; p < NP; ++p) pk.next();
        score_pairs<D, NP>(Q, K + static_cast<std::size_t>(r) * ddk, dk, scale, S + 4 * r);
      }
      return;
    }
#endif
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 2) {
      pk.next();
      score_pair<D>(Q, K + static_cast<std::size_t>(r) * ddk, dk, scale, S + 4 * r);
    }
  } else {
    constexpr int KB = score_keys(QB);
    int j = 0;
    for (; j + KB <= rows; j += KB) {
      pk.next();
      score_rows<D, QB, KB>(Q, K + static_cast<std::size_t>(j) * ddk, dk, scale, S + 4 * j);
    }
    for (; j < rows; ++j) score_rows<D, QB, 1>(Q, K + static_cast<std::size_t>(j) * ddk, dk, scale, S + 4 * j);
    if (rows & 1) _mm_store_ps(S + 4 * rows, _mm_setzero_ps());
  }
}

// O[a, c .. c + W*DB) += sum over the tile's rows r of Wt[4 * r + a] * V[r, c ..), for QB queries (O rows of
// stride dv), in registers of W lanes. Full: rows == TL. Every kPrefetchRows rows issue the next slice of pf.
inline constexpr int kPrefetchRows = 4;
template <int W, int TL, int QB, int DB, bool Full, class T>
KVTRIM_SIMD_INLINE void value_block(const float* Wt, const T* V, int dv, int rows, int c, float* O, Prefetch& pf) {
  using L = Lanes<W>;
  typename L::V acc[QB * DB];
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] =
      L::load(O + static_cast<std::size_t>(a) * dv + c + W * b);
  auto row = [&](int r) KVTRIM_SIMD_LAMBDA_INLINE {
    if (r % kPrefetchRows == 0) pf.next();
    const T* vr = V + static_cast<std::size_t>(r) * dv + c;
    typename L::V v[DB];
    KVTRIM_UNROLL for (int b = 0; b < DB; ++b) v[b] = L::load_stored(vr + W * b);
    KVTRIM_UNROLL for (int a = 0; a < QB; ++a) {
      const typename L::V p = L::broadcast(Wt + 4 * r + a);
      KVTRIM_UNROLL for (int b = 0; b < DB; ++b) acc[a * DB + b] = L::fma(p, v[b], acc[a * DB + b]);
    }
  };
  if constexpr (Full) {
    KVTRIM_UNROLL for (int r = 0; r < TL; ++r) row(r);
  } else {
    for (int r = 0; r < rows; ++r) row(r);
  }
  KVTRIM_UNROLL for (int a = 0; a < QB; ++a) KVTRIM_UNROLL for (int b = 0; b < DB; ++b)
      L::store(O + static_cast<std::size_t>(a) * dv + c + W * b, acc[a * DB + b]);
}

// The 16-lane build's value blocks: 128 bytes of each stored row (64 16-bit or 32 float columns: at most 4
// registers, so 32 hold 4 x 4 accumulators and the operands for any QB).
template <class T>
inline constexpr int kWideValueRegs = 128 / (16 * static_cast<int>(sizeof(T)));

// Slices of a tile's value prefetch, given the head dim and the first block's queries: the 8-lane build issues
// one per column block (as the registers allow for QB queries); the 16-lane build one per kPrefetchRows rows of
// each block, since a whole block's slice at once would be a burst.
template <int TL, class T>
constexpr int value_prefetch_parts(int dv, int qb) {
  return kWide ? std::max(1, dv / (16 * kWideValueRegs<T>)) * ((TL + kPrefetchRows - 1) / kPrefetchRows)
               : std::max(1, dv / (8 * value_chunks(qb)));
}

// O[a, :] += sum over the tile's rows r of W[4 * r + a] * V[r, :] for QB queries. The tile is read in
// column blocks (every row of a block meets all QB queries in registers), issuing slices of pv.
template <int D, int TL, int QB, bool Full, class T>
KVTRIM_SIMD_FN inline void value_tile(const float* W, const T* V, int dv, int rows, float* O, Prefetch& pv) {
  const int dd = D > 0 ? D : dv;
  int c = 0;
  Prefetch none;
#if KVTRIM_SIMD_WIDE
  constexpr int DW = kWideValueRegs<T>;
  for (; c + 16 * DW <= dd; c += 16 * DW) value_block<16, TL, QB, DW, Full>(W, V, dd, rows, c, O, pv);
  for (; c + 16 <= dd; c += 16) value_block<16, TL, QB, 1, Full>(W, V, dd, rows, c, O, none);
#else
  constexpr int DB = value_chunks(QB);
  for (; c + 8 * DB <= dd; c += 8 * DB) {
    pv.next();
    value_block<8, TL, QB, DB, Full>(W, V, dd, rows, c, O, none);
  }
#endif
  for (; c + 8 <= dd; c += 8) value_block<8, TL, QB, 1, Full>(W, V, dd, rows, c, O, none);
  for (; c < dd; ++c)  // columns past the last multiple of 8
    for (int a = 0; a < QB; ++a) {
      float s = O[static_cast<std::size_t>(a) * dd + c];
      for (int r = 0; r < rows; ++r) s += W[4 * r + a] * to_float(V[static_cast<std::size_t>(r) * dd + c]);
      O[static_cast<std::size_t>(a) * dd + c] = s;
    }
}

KVTRIM_SIMD_FN inline void scale_row(float* x, int n, float f) {
  using L = Lanes<kLanes>;
  const typename L::V fv = L::splat(f);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) L::store(x + i, L::mul(L::load(x + i), fv));
  for (; i < n; ++i) x[i] *= f;
}

// A tile's scores S[4 * r + a] out to P (QB rows of stride n, from the tile's first token); returns the
// tile's maximum per query (lanes >= QB: 0).
template <int TL, int QB, bool Full>
KVTRIM_SIMD_INLINE __m128 scores_out(const float* S, int rows, float* P, int n) {
  if constexpr (Full) {  // per 8 rows: a (4 x 2) x 4 transpose, then the rows back in order
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 8) {
      const float* s = S + 4 * r;
      const __m256 x0 = _mm256_load_ps(s), x1 = _mm256_load_ps(s + 8), x2 = _mm256_load_ps(s + 16),
                   x3 = _mm256_load_ps(s + 24);  // rows r, r+1 | r+2, r+3 | r+4, r+5 | r+6, r+7
      mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_max_ps(x0, x1), _mm256_max_ps(x2, x3)));
      const __m256 t0 = _mm256_unpacklo_ps(x0, x1), t1 = _mm256_unpackhi_ps(x0, x1);
      const __m256 t2 = _mm256_unpacklo_ps(x2, x3), t3 = _mm256_unpackhi_ps(x2, x3);
      // query a: rows r, r+2, r+4, r+6 | r+1, r+3, r+5, r+7
      const __m256 q0 = _mm256_shuffle_ps(t0, t2, 0x44), q1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 q2 = _mm256_shuffle_ps(t1, t3, 0x44), q3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      _mm256_storeu_ps(P + r, _mm256_permutevar8x32_ps(q0, order));
      _mm256_storeu_ps(P + static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q1, order));
      _mm256_storeu_ps(P + 2 * static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q2, order));
      _mm256_storeu_ps(P + 3 * static_cast<std::size_t>(n) + r, _mm256_permutevar8x32_ps(q3, order));
    }
    return _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  } else {
    __m128 mt = _mm_set1_ps(-INFINITY);
    for (int j = 0; j < rows; ++j) mt = _mm_max_ps(mt, _mm_load_ps(S + 4 * j));
    for (int a = 0; a < QB; ++a)
      for (int j = 0; j < rows; ++j) P[static_cast<std::size_t>(a) * n + j] = S[4 * j + a];
    return mt;
  }
}

// A tile's scores S out to P; the running maxima m[0..QB) updated, and the rows of O (stride dv) whose maximum
// grew multiplied by exp(old - new) (0 while nothing has been accumulated: old = -inf); then S = exp(S - m),
// the tile's weights.
template <int TL, int QB, bool Full>
KVTRIM_SIMD_FN inline void softmax_tile(float* S, int rows, float* P, int n, float* m, float* O, int dv) {
  const __m128 mt = scores_out<TL, QB, Full>(S, rows, P, n);
  alignas(16) float old[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // lanes >= QB: scores and maxima 0
  for (int a = 0; a < QB; ++a) old[a] = m[a];
  const __m128 mo = _mm_load_ps(old), mn = _mm_max_ps(mo, mt);
  const int grew = _mm_movemask_ps(_mm_cmpgt_ps(mt, mo)) & ((1 << QB) - 1);
  if (grew != 0) {  // rare after the first tiles: the maximum grows about log(n) times
    alignas(32) float f[8];
    _mm256_store_ps(f, exp(_mm256_set_m128(_mm_setzero_ps(), _mm_sub_ps(mo, mn))));
    alignas(16) float mnew[4];
    _mm_store_ps(mnew, mn);
    for (int a = 0; a < QB; ++a)
      if ((grew >> a) & 1) {
        scale_row(O + static_cast<std::size_t>(a) * dv, dv, f[a]);
        m[a] = mnew[a];
      }
  }
  const __m256 mv = _mm256_set_m128(mn, mn);
  auto pair = [&](int r) KVTRIM_SIMD_LAMBDA_INLINE {
    _mm256_store_ps(S + 4 * r, exp(_mm256_sub_ps(_mm256_load_ps(S + 4 * r), mv)));
  };
  if constexpr (Full) {
#if KVTRIM_SIMD_WIDE
    const __m512 mv4 = _mm512_maskz_broadcast_f32x4(kAll16, mn);  // four rows at a time
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 4)
      _mm512_storeu_ps(S + 4 * r, exp(_mm512_sub_ps(_mm512_loadu_ps(S + 4 * r), mv4)));
#else
    KVTRIM_UNROLL for (int r = 0; r < TL; r += 2) pair(r);
#endif
  } else {
    for (int r = 0; r < rows; r += 2) pair(r);
  }
}

// row[0..n) = exp(row - m) / sum, given m = max(row): the exact softmax the policies read.
// Returns the sum (of the unnormalised exponentials).
KVTRIM_SIMD_FN inline float softmax_given_max(float* row, int n, float m) {
  const int n8 = n & ~7;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  int i = 0;
#if KVTRIM_SIMD_WIDE
  const __m512 mv16 = _mm512_set1_ps(m);
  for (; i + 16 <= n8; i += 16) {  // 16 exponentials at a time, summed 8 lanes at a time as below
    const __m512 e = exp(_mm512_sub_ps(_mm512_loadu_ps(row + i), mv16));
    _mm512_storeu_ps(row + i, e);
    vs = _mm256_add_ps(vs, low_half(e));
    vs = _mm256_add_ps(vs, high_half(e));
  }
#endif
  for (; i < n8; i += 8) {
    const __m256 e = exp(_mm256_sub_ps(_mm256_loadu_ps(row + i), mv));
    _mm256_storeu_ps(row + i, e);
    vs = _mm256_add_ps(vs, e);
  }
  if (n8 < n) {  // the tail through a padded buffer, so every value goes through the same exp
    alignas(32) float tmp[8];
    for (int t = 0; t < 8; ++t) tmp[t] = n8 + t < n ? row[n8 + t] : -INFINITY;
    const __m256 e = exp(_mm256_sub_ps(_mm256_load_ps(tmp), mv));
    _mm256_store_ps(tmp, e);
    vs = _mm256_add_ps(vs, e);
    for (int t = 0; n8 + t < n; ++t) row[n8 + t] = tmp[t];
  }
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vs), _mm256_extractf128_ps(vs, 1));
  alignas(16) float s[4];
  _mm_store_ps(s, s4);
  const float sum = (s[0] + s[2]) + (s[1] + s[3]);
  scale_row(row, n, 1.0f / sum);
  return sum;
}

// Rows per tile for head dim D and storage T: about 16 KiB of keys and values together, 16 or 32 rows.
template <int D, class T>
inline constexpr int kTileRows = D <= 0 ? 16 : std::clamp(16384 / (2 * D * static_cast<int>(sizeof(T))), 16, 32);
// Queries per sweep over K and V (the running maxima and the tiles' scores live on the stack); larger groups
// take several sweeps.
inline constexpr int kMaxSweep = 32;

// Runs CALL with QB (queries in the block) and Full (a full tile of 4 queries) as compile-time constants.
#define KVTRIM_TILE_DISPATCH(qb, full, CALL) \
  do {                                       \
    if ((qb) == 4 && (full)) {               \
      constexpr int QB = 4;                  \
      constexpr bool Full = true;            \
      CALL;                                  \
    } else if ((qb) == 4) {                  \
      constexpr int QB = 4;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else if ((qb) == 3) {                  \
      constexpr int QB = 3;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else if ((qb) == 2) {                  \
      constexpr int QB = 2;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    } else {                                 \
      constexpr int QB = 1;                  \
      constexpr bool Full = false;           \
      CALL;                                  \
    }                                        \
  } while (0)

// One sweep of g <= kMaxSweep queries over all keys and values, in tiles of TL rows and blocks of 4 queries.
// Software-pipelined: the scores of tile t + 1 are computed between tile t's softmax bookkeeping (a chain of
// dependent steps: maximum, rescale, exp) and tile t's weighted sum of values, so the out-of-order core has
// independent FMAs to run while the chain completes. Keys are prefetched while scores are computed, values
// while values are summed.
template <int D, class T>
KVTRIM_SIMD_FN inline void sweep(const T* K, const T* V, int n, int dk, int dv, const float* Q, int g, float scale,
                                 float* P, float* O) {
  constexpr int TL = kTileRows<D, T>;
  alignas(32) float S[2][kMaxSweep / 4][4 * TL];  // scores, then weights, of tiles t (index t & 1) and t + 1
  float m[kMaxSweep];
  std::fill(m, m + g, -INFINITY);
  const std::size_t krow = static_cast<std::size_t>(dk) * sizeof(T), vrow = static_cast<std::size_t>(dv) * sizeof(T);
  const int tiles = (n + TL - 1) / TL, blocks = (g + 3) / 4;
  // The first query block issues the prefetches, one slice per block of keys (columns) it computes.
  const int qb0 = std::min(4, g);
  const int vparts = value_prefetch_parts<TL, T>(D > 0 ? D : dv, qb0);
  auto scores = [&](int t) KVTRIM_SIMD_LAMBDA {
    const int i0 = t * TL, rows = std::min(TL, n - i0);
    const int kparts = qb0 == 4 && rows == TL ? TL / 2 : std::max(1, rows / score_keys(qb0));
    Prefetch pk = prefetch_tile<TL>(K, n, krow, t, kparts), none;
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (score_tile<D, TL, QB, Full>(Q + static_cast<std::size_t>(4 * b) * dk,
                                                        K + static_cast<std::size_t>(i0) * dk, dk, rows, scale,
                                                        S[t & 1][b], b == 0 ? pk : none)));
  };
  scores(0);
  for (int t = 0; t < tiles; ++t) {
    const int i0 = t * TL, rows = std::min(TL, n - i0);
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (softmax_tile<TL, QB, Full>(S[t & 1][b], rows, P + static_cast<std::size_t>(4 * b) * n + i0,
                                                       n, m + 4 * b, O + static_cast<std::size_t>(4 * b) * dv, dv)));
    if (t + 1 < tiles) scores(t + 1);
    Prefetch pv = prefetch_tile<TL>(V, n, vrow, t, vparts), none;
    for (int b = 0; b < blocks; ++b)
      KVTRIM_TILE_DISPATCH(std::min(4, g - 4 * b), rows == TL,
                           (value_tile<D, TL, QB, Full>(S[t & 1][b], V + static_cast<std::size_t>(i0) * dv, dv, rows,
                                                        O + static_cast<std::size_t>(4 * b) * dv, b == 0 ? pv : none)));
  }
  for (int a = 0; a < g; ++a) {  // exact probabilities from the stored scores; the output normalised alike
    const float sum = softmax_given_max(P + static_cast<std::size_t>(a) * n, n, m[a]);
    scale_row(O + static_cast<std::size_t>(a) * dv, dv, 1.0f / sum);
  }
}

#undef KVTRIM_TILE_DISPATCH

template <class T>
KVTRIM_SIMD_FN inline void attend(const T* K, const T* V, int n, int dk, int dv, const float* Q, int g, float scale,
                                  float* P, float* O) {
  std::fill(O, O + static_cast<std::size_t>(g) * dv, 0.0f);
  if (n == 0) return;
  for (int q0 = 0; q0 < g; q0 += kMaxSweep) {
    const int gs = std::min(kMaxSweep, g - q0);
    const float* Qs = Q + static_cast<std::size_t>(q0) * dk;
    float* Ps = P + static_cast<std::size_t>(q0) * n;
    float* Os = O + static_cast<std::size_t>(q0) * dv;
    // The common head dims get kernels with the dim known at compile time (no loop tails).
    if (dk == 128 && dv == 128) sweep<128>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
    else if (dk == 64 && dv == 64) sweep<64>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
    else sweep<0>(K, V, n, dk, dv, Qs, gs, scale, Ps, Os);
  }
}

// n stored elements as floats (exact).
template <class T>
KVTRIM_SIMD_FN inline void widen(const T* in, float* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(in + i));
  for (; i < n; ++i) out[i] = to_float(in[i]);
}

// out[i] = row i of K [n x d] dotted with x [d] in fp32 (a merging policy's key similarities): 8-lane partial sums
// over the multiples of 8 columns in order, hsum8's tree, then the remaining columns in order. Eight rows per block;
// a short block at the end repeats its last row, so a row's dot never depends on where it sits. The blocks run from
// the last row down: attention has just read the rows in order, so the last ones are the likeliest still in cache.
// Only 8-lane instructions: the wide build would give the same bits, so the narrow one serves every x86 CPU with AVX2.
template <int D, class T>
KVTRIM_SIMD_FN void row_dots(const T* K, int n, int d, const float* x, float* out) {
  const int dd = D > 0 ? D : d;
  const int c8 = dd & ~7;
  for (int i0 = (n - 1) & ~7; i0 >= 0; i0 -= 8) {
    const T* row[8];
    KVTRIM_UNROLL for (int j = 0; j < 8; ++j) row[j] = K + static_cast<std::size_t>(std::min(i0 + j, n - 1)) * dd;
    __m256 acc[8];
    KVTRIM_UNROLL for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int c = 0; c < c8; c += 8) {
      const __m256 xv = in_register(_mm256_loadu_ps(x + c));
      KVTRIM_UNROLL for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(load8(row[j] + c), xv, acc[j]);
    }
    __m256 s = hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
    if (D <= 0 && c8 < dd) {
      alignas(32) float t[8];
      for (int j = 0; j < 8; ++j) {
        float u = 0.0f;
        for (int e = c8; e < dd; ++e) u += x[e] * to_float(row[j][e]);
        t[j] = u;
      }
      s = _mm256_add_ps(s, _mm256_load_ps(t));
    }
    if (i0 + 8 <= n) {
      _mm256_storeu_ps(out + i0, s);
    } else {
      alignas(32) float r[8];
      _mm256_store_ps(r, s);
      std::copy(r, r + (n - i0), out + i0);
    }
  }
}

#undef KVTRIM_SIMD_INLINE
#undef KVTRIM_SIMD_LAMBDA
#undef KVTRIM_SIMD_LAMBDA_INLINE
#undef KVTRIM_UNROLL
#undef KVTRIM_SIMD_FN
#undef KVTRIM_SIMD_TARGET
#undef KVTRIM_SIMD_WIDE

