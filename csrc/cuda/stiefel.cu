// Fused Stiefel optimiser steps on CUDA: one thread block per matrix of a (B, n, p) stack.
// Pure CUDA (no torch headers): the torch glue lives in stiefel_glue.cpp.
//
// A block loads its matrix, gradient and state into shared memory in the accumulation type,
// runs the whole step there (stiefel_math.cuh, the code the host harness of
// tests/test_stiefel_cuda_math.py checks against the torch reference) and writes back.
// Shared memory per block: block_threads(n, p) reduction slots plus 3 n p + 2 p^2 values
// (StiefelAdam: 2 n p + 2 p^2 when square, 4 n p + 2 p^2 when tall), e.g. 82 KB for 64 x 64 and
// 50 KB for 256 x 16 in fp32. A stack whose matrices need more than the device allows per block
// is refused (cudaErrorInvalidValue); specops_ext::stiefel_step_refusal says so beforehand, so
// that the registry runs such stacks on another kernel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "stiefel_math.cuh"

namespace specops {
namespace cuda {
namespace stiefel_detail {

struct HalfIO {
  using S = __half;
  using T = float;
  static __device__ __forceinline__ T load(S v) { return __half2float(v); }
  static __device__ __forceinline__ S store(T v) { return __float2half_rn(v); }
};

struct BFloat16IO {
  using S = __nv_bfloat16;
  using T = float;
  static __device__ __forceinline__ T load(S v) { return __bfloat162float(v); }
  static __device__ __forceinline__ S store(T v) { return __float2bfloat16_rn(v); }
};

template <class S> struct IOFor { using type = PlainIO<S>; };
template <> struct IOFor<__half> { using type = HalfIO; };
template <> struct IOFor<__nv_bfloat16> { using type = BFloat16IO; };

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

template <StepOp kOp, class IO>
__device__ __forceinline__ void run_block(const StepArgs<typename IO::S>& a) {
  extern __shared__ __align__(16) unsigned char stiefel_smem[];
  step_matrix<kOp, IO>(a, reinterpret_cast<typename IO::T*>(stiefel_smem), blockIdx.x, threadIdx.x, blockDim.x,
                       BlockSync{});
}

// One kernel name per op, so that gpu-check's rows say which step they are.
template <class IO>
__global__ void __launch_bounds__(kMaxThreads) sgd_kernel(const __grid_constant__ StepArgs<typename IO::S> a) {
  run_block<StepOp::kSgd, IO>(a);
}
template <class IO>
__global__ void __launch_bounds__(kMaxThreads)
    cayley_adam_kernel(const __grid_constant__ StepArgs<typename IO::S> a) {
  run_block<StepOp::kCayleyAdam, IO>(a);
}
template <class IO>
__global__ void __launch_bounds__(kMaxThreads)
    stiefel_adam_kernel(const __grid_constant__ StepArgs<typename IO::S> a) {
  run_block<StepOp::kStiefelAdam, IO>(a);
}

template <class S, class Kernel>
cudaError_t launch(StepOp op, Kernel kernel, const StepArgs<S>& a, int64_t B, size_t limit, cudaStream_t stream) {
  using IO = typename IOFor<S>::type;
  const size_t bytes = step_smem_bytes(op, a.n, a.p, sizeof(typename IO::T) == sizeof(double));
  if (bytes > limit || B > INT32_MAX) return cudaErrorInvalidValue;
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<unsigned(B), block_threads(a.n, a.p), bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace stiefel_detail

// The current device's dynamic shared memory limit per block (after opting in).
cudaError_t stiefel_smem_limit(size_t* limit) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  *limit = size_t(optin);
  return err;
}

// One step of `op` for the B matrices of `a` on `stream`; cudaErrorInvalidValue when a block's
// shared memory (step_smem_bytes) exceeds the device limit or B > 2^31 - 1.
template <typename S>
cudaError_t stiefel_step(stiefel_detail::StepOp op, const stiefel_detail::StepArgs<S>& a, int64_t B,
                         cudaStream_t stream) {
  using namespace stiefel_detail;
  using IO = typename IOFor<S>::type;
  size_t limit = 0;
  const cudaError_t err = stiefel_smem_limit(&limit);
  if (err != cudaSuccess || B == 0) return err;
  switch (op) {
    case StepOp::kSgd: return launch(op, sgd_kernel<IO>, a, B, limit, stream);
    case StepOp::kCayleyAdam: return launch(op, cayley_adam_kernel<IO>, a, B, limit, stream);
    default: return launch(op, stiefel_adam_kernel<IO>, a, B, limit, stream);
  }
}

template cudaError_t stiefel_step<float>(stiefel_detail::StepOp, const stiefel_detail::StepArgs<float>&, int64_t,
                                         cudaStream_t);
template cudaError_t stiefel_step<double>(stiefel_detail::StepOp, const stiefel_detail::StepArgs<double>&, int64_t,
                                          cudaStream_t);
template cudaError_t stiefel_step<__half>(stiefel_detail::StepOp, const stiefel_detail::StepArgs<__half>&, int64_t,
                                          cudaStream_t);
template cudaError_t stiefel_step<__nv_bfloat16>(stiefel_detail::StepOp,
                                                 const stiefel_detail::StepArgs<__nv_bfloat16>&, int64_t,
                                                 cudaStream_t);

}  // namespace cuda
}  // namespace specops
