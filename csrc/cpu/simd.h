// Small SIMD helpers shared by the CPU kernels.
//
// GCC/Clang vector extensions give explicit 64-byte vectors: one AVX-512 register when the
// compiler may use AVX-512, two AVX2 registers (or four SSE) otherwise, with no intrinsics.
#pragma once

#include <c10/core/CPUAllocator.h>

#include <cstdint>

namespace specops {
namespace cpu {

template <typename acc_t>
struct Simd {
  static constexpr int64_t kLanes = 64 / sizeof(acc_t);
  // aligned(sizeof(acc_t)): loads and stores may be unaligned; the compiler emits vmovu*.
  typedef acc_t vec __attribute__((vector_size(64), aligned(sizeof(acc_t))));

  static inline vec load(const acc_t* p) { return *reinterpret_cast<const vec*>(p); }
  static inline void store(acc_t* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
  static inline acc_t sum(vec v) {
    acc_t s = 0;
    for (int64_t i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
};

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
