// CUDA kernels of specops_ext::zip_lora_linear_{fwd,bwd} (schemas defined in csrc/cpu/zip.cpp).
// Same algorithm as the CPU file (specops_zip::fwd / bwd in zip_common.h): GEMMs through at::mm
// (cuBLAS), the packing of A' and the fused merger-gradient pass in zip.cu. merger_penalty has no
// CUDA kernel: on CUDA tensors it runs the torch kernel (a handful of launches over the
// concatenated mergers).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "zip_common.h"

namespace specops::cuda {
// Defined and instantiated in zip.cu (float, double, __half, __nv_bfloat16).
template <typename T>
cudaError_t zip_pack(const T* A_c, const T* m_c, double s_c, int64_t r_c, const T* A_s,
                     const T* m_s, double s_s, int64_t r_s, int64_t in, T* out,
                     cudaStream_t stream);
template <typename T>
cudaError_t zip_merger_grads(const T* G, const T* A_c, const T* m_c, double s_c, int64_t r_c,
                             T* gm_c, T* gA_c, const T* A_s, const T* m_s, double s_s,
                             int64_t r_s, T* gm_s, T* gA_s, int64_t in, cudaStream_t stream);
}  // namespace specops::cuda

namespace {

// The CUDA type of ATen's scalar_t (the same bits: c10::Half is __half, c10::BFloat16 __nv_bfloat16).
template <typename S>
using cuda_t = std::conditional_t<std::is_same_v<S, at::Half>, __half,
                                  std::conditional_t<std::is_same_v<S, at::BFloat16>, __nv_bfloat16, S>>;

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {  // null for an output not asked for (or empty)
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

// The element-wise kernels of specops_zip::fwd / bwd on CUDA tensors (the device guard is set there).
struct Cuda {
  static void pack(const specops_zip::Lora& c, const specops_zip::Lora& s, at::Tensor& out) {
    const auto stream = c10::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "zip_pack", [&] {
      using T = cuda_t<scalar_t>;
      check_launch(specops::cuda::zip_pack<T>(cptr<T>(c.A), cptr<T>(c.m), c.s, c.A.size(0), cptr<T>(s.A),
                                              cptr<T>(s.m), s.s, s.A.size(0), c.A.size(1), mptr<T>(out), stream),
                   "zip_pack");
    });
  }

  static void merger_grads(const at::Tensor& G, const specops_zip::Lora& c, const specops_zip::Lora& s,
                           const specops_zip::Dims& d, specops_zip::LoraGrads& out) {
    const auto stream = c10::cuda::getCurrentCUDAStream().stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), "zip_merger_grads", [&] {
      using T = cuda_t<scalar_t>;
      check_launch(specops::cuda::zip_merger_grads<T>(cptr<T>(G), cptr<T>(c.A), cptr<T>(c.m), c.s, d.r_c,
                                                      mptr<T>(out.m_c), mptr<T>(out.A_c), cptr<T>(s.A), cptr<T>(s.m),
                                                      s.s, d.r_s, mptr<T>(out.m_s), mptr<T>(out.A_s), d.in, stream),
                   "zip_merger_grads");
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(specops_ext, CUDA, m) {
  m.impl("zip_lora_linear_fwd", &specops_zip::fwd<Cuda>);
  m.impl("zip_lora_linear_bwd", &specops_zip::bwd<Cuda>);
}
