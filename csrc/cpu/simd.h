// Small SIMD helpers shared by the CPU kernels.
//
// GCC/Clang vector extensions give explicit vectors of the target's register width, with no
// intrinsics: 64 bytes under AVX-512, 32 under AVX/AVX2, 16 otherwise. (A 64-byte vector on an AVX2
// target is split by GCC through the stack: a 64 x 64 fp64 product ran at 3.5 GFLOP/s that way and
// 19 GFLOP/s with 32-byte vectors, g++ -O3 -march=native on an AMD EPYC with AVX2.)
#pragma once

#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <type_traits>
#include <utility>

namespace specops {
namespace cpu {

#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif

template <typename acc_t>
struct Simd {
  static constexpr int64_t kLanes = kVectorBytes / sizeof(acc_t);
  // aligned(sizeof(acc_t)): loads and stores may be unaligned; the compiler emits vmovu*.
  typedef acc_t vec __attribute__((vector_size(kVectorBytes), aligned(sizeof(acc_t))));

  static inline vec load(const acc_t* p) { return *reinterpret_cast<const vec*>(p); }
  static inline void store(acc_t* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
  // Under AVX-512, a non-temporal store of one whole 64-byte-aligned cache line: no
  // read-for-ownership, no cache pollution (a plain store otherwise). Callers end their writes
  // with fence().
  static inline void stream(acc_t* p, vec v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(acc_t) == 4)
      _mm512_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m512>(v));
    else
      _mm512_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m512d>(v));
#else
    store(p, v);
#endif
  }
  static inline void fence() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
  }
  static inline acc_t sum(vec v) {
    acc_t s = 0;
    for (int64_t i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
};

// kLanes values of scalar_t widened to one vector of acc_t, and narrowed back with round-to-nearest-even
// as c10's conversions do (a NaN stays a NaN). BFloat16 is fp32's upper half, so both ways are integer
// shifts; Half goes through the AVX-512 converts where present. A scalar loop per element, the fallback,
// held the kron kernel's bf16 loads and stores at 38% of its forward.
template <typename scalar_t, typename acc_t>
struct Widen {
  using S = Simd<acc_t>;
  using vec = typename S::vec;
  static inline vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return S::load(p);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      const u16 h = *reinterpret_cast<const u16*>(p);
      return reinterpret_cast<vec>(__builtin_convertvector(h, u32) << 16);
#if defined(__AVX512F__)
    } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
      // the maskz forms: GCC 12 warns on the plain ones' undefined-source idiom
      return reinterpret_cast<vec>(
          _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
    } else {
      vec v;
      for (int64_t i = 0; i < S::kLanes; ++i) v[i] = static_cast<acc_t>(p[i]);
      return v;
    }
  }
  static inline void store(scalar_t* p, vec v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      S::store(p, v);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      const u32 u = reinterpret_cast<u32>(v);
      const u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      const u32 bits = ((u & 0x7fffffffu) > 0x7f800000u) ? u32{} + 0x7fc0u : rounded;
      *reinterpret_cast<u16*>(p) = __builtin_convertvector(bits, u16);
#if defined(__AVX512F__)
    } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_maskz_cvtps_ph(0xffff, reinterpret_cast<__m512>(v),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    } else {
      for (int64_t i = 0; i < S::kLanes; ++i) p[i] = static_cast<scalar_t>(v[i]);
    }
  }

 private:
  typedef uint32_t u32 __attribute__((vector_size(kVectorBytes)));
  typedef uint16_t u16 __attribute__((vector_size(kVectorBytes / 2), aligned(2)));
};

// In-register transpose of a kLanes x kLanes tile held as kLanes row vectors: log2(kLanes)
// butterfly stages, each swapping the off-diagonal b x b blocks of every 2b x 2b block with
// two-source permutes (one vpermt2ps/pd each under AVX-512). Transposes are what the CPU
// kernels that keep blocks of rows transposed spend their memory passes on. Masks are built at
// compile time and every loop is unrolled, so the tile stays in registers.
template <typename acc_t>
struct Transpose {
  static constexpr int64_t N = Simd<acc_t>::kLanes;
  typedef std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t> idx_t;
  typedef idx_t ivec __attribute__((vector_size(kVectorBytes)));
  using vec = typename Simd<acc_t>::vec;

  // Lane j of the low (high) output of a pair: from a (lanes < N) or c (lanes >= N).
  template <int64_t B, bool Hi, size_t... J>
  static constexpr ivec mask(std::index_sequence<J...>) {
    return ivec{static_cast<idx_t>((J & B) == 0 ? (Hi ? int64_t(J) + B : int64_t(J))
                                                : (Hi ? N + int64_t(J) : N + int64_t(J) - B))...};
  }

  template <int64_t B>
  static inline void stage(vec* v) {
    constexpr ivec lo = mask<B, false>(std::make_index_sequence<N>{});
    constexpr ivec hi = mask<B, true>(std::make_index_sequence<N>{});
#pragma GCC unroll 16
    for (int64_t i = 0; i < N; ++i) {
      if (i & B) continue;
      const vec a = v[i], c = v[i + B];
      v[i] = __builtin_shuffle(a, c, lo);
      v[i + B] = __builtin_shuffle(a, c, hi);
    }
    if constexpr (B > 1) stage<B / 2>(v);
  }
};

#if defined(__AVX__)
// dst[j * ld + i] = src[i * ls + j] for an 8 x 8 fp32 tile in 256-bit registers. The loads put
// rows i and i + 4 in the two 128-bit halves, which leaves two in-lane shuffle stages.
inline void transpose8_f32(const float* s, int64_t ls, float* d, int64_t ld) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int64_t i = 0; i < 8; ++i) {
    // r[i]: columns 4 (i / 4) .. 4 (i / 4) + 3 of rows i % 4 (low half) and i % 4 + 4 (high half).
    const float* row = s + (i & 3) * ls + (i >> 2) * 4;
    const __m128 lo = _mm_loadu_ps(row), hi = _mm_loadu_ps(row + 4 * ls);
    r[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
#pragma GCC unroll 4
  for (int64_t h = 0; h < 8; h += 4) {
    t[h] = _mm256_unpacklo_ps(r[h], r[h + 1]);
    t[h + 1] = _mm256_unpackhi_ps(r[h], r[h + 1]);
    t[h + 2] = _mm256_unpacklo_ps(r[h + 2], r[h + 3]);
    t[h + 3] = _mm256_unpackhi_ps(r[h + 2], r[h + 3]);
    _mm256_storeu_ps(d + (h + 0) * ld, _mm256_shuffle_ps(t[h], t[h + 2], 0x44));
    _mm256_storeu_ps(d + (h + 1) * ld, _mm256_shuffle_ps(t[h], t[h + 2], 0xee));
    _mm256_storeu_ps(d + (h + 2) * ld, _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44));
    _mm256_storeu_ps(d + (h + 3) * ld, _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee));
  }
}
#endif

// dst[j * ld + i] = src[i * ls + j] for a kLanes x kLanes tile. fp32 under AVX goes as 8 x 8 tiles
// in 256-bit registers (four a tile under AVX-512: twice as fast as the 512-bit butterfly on AMD Zen 4, whose
// 512-bit shuffles take both 256-bit halves of the pipe (17.6 vs 34 ns a 16 x 16 tile, measured
// here in a g++ -O3 -march=native loop over L1-resident tiles).
template <typename acc_t>
inline void transpose_tile(const acc_t* src, int64_t ls, acc_t* dst, int64_t ld) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t bi = 0; bi < Simd<acc_t>::kLanes; bi += 8)
      for (int64_t bj = 0; bj < Simd<acc_t>::kLanes; bj += 8)
        transpose8_f32(src + bi * ls + bj, ls, dst + bj * ld + bi, ld);
    return;
  }
#endif
  using S = Simd<acc_t>;
  typename S::vec v[S::kLanes];
#pragma GCC unroll 16
  for (int64_t i = 0; i < S::kLanes; ++i) v[i] = S::load(src + i * ls);
  Transpose<acc_t>::template stage<Transpose<acc_t>::N / 2>(v);
#pragma GCC unroll 16
  for (int64_t j = 0; j < S::kLanes; ++j) S::store(dst + j * ld, v[j]);
}

// Scratch for one thread, 64-byte aligned, freed on scope exit. Taken from torch's CPU allocator
// so that the profiler's memory accounting (and so the benchmarks' peak bytes) sees it.
template <typename T>
struct Scratch {
  c10::DataPtr ptr;
  explicit Scratch(int64_t n) : ptr(c10::GetCPUAllocator()->allocate(n * sizeof(T))) {}
  T* get() const { return static_cast<T*>(ptr.get()); }
};

}  // namespace cpu
}  // namespace specops
