// CUDA kernels of specops_ext::zip_lora_linear_{fwd,bwd} (schemas defined in csrc/cpu/zip.cpp).
// Same algorithm as the CPU file: GEMMs through at::mm (cuBLAS), the packing of A' and the fused
// merger-gradient pass in zip.cu. merger_penalty has no CUDA kernel: on CUDA tensors it runs the
// torch composite (a handful of launches over the concatenated mergers).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

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

// Calls f(T{}) with the CUDA storage type of t.
template <class F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "zip_lora_linear: unsupported dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return t.numel() > 0 ? reinterpret_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

specops_zip::Dims check(const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& B_c,
                        const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s, const at::Tensor& A_s,
                        const at::Tensor& m_s) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  return specops_zip::check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
}

at::Tensor pack_a(const at::Tensor& A_c, const at::Tensor& m_c, double s_c, const at::Tensor& A_s,
                  const at::Tensor& m_s, double s_s) {
  const int64_t r_c = A_c.size(0), r_s = A_s.size(0), in = A_c.size(1);
  auto out = at::empty({r_c + r_s, in}, A_c.options());
  auto Ac = A_c.contiguous(), As = A_s.contiguous(), mc = m_c.contiguous(), ms = m_s.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch(A_c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto err = specops::cuda::zip_pack<T>(cptr<T>(Ac), cptr<T>(mc), s_c, r_c, cptr<T>(As),
                                                cptr<T>(ms), s_s, r_s, in, mptr<T>(out), stream);
    TORCH_CHECK(err == cudaSuccess, "zip_pack: ", cudaGetErrorString(err));
  });
  return out;
}

at::Tensor zip_lora_linear_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& B_c,
                                    const at::Tensor& A_c, const at::Tensor& m_c,
                                    const at::Tensor& B_s, const at::Tensor& A_s,
                                    const at::Tensor& m_s, double scale_c, double scale_s) {
  check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  const c10::cuda::CUDAGuard guard(x.device());
  return specops_zip::forward(x, weight, bias, pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s), B_c, B_s);
}

std::vector<at::Tensor> zip_lora_linear_bwd_cuda(
    const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& B_c, const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s,
    const at::Tensor& A_s, const at::Tensor& m_s, double scale_c, double scale_s,
    std::array<bool, 9> need) {
  const auto d = check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto Ap = pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s);
  return specops_zip::backward(g, x, weight, Ap, B_c, B_s, d, need, [&](const at::Tensor& G, std::vector<at::Tensor>& out) {
    auto Ac = A_c.contiguous(), As = A_s.contiguous(), mc = m_c.contiguous(), ms = m_s.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream().stream();
    dispatch(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const auto err = specops::cuda::zip_merger_grads<T>(
          cptr<T>(G), cptr<T>(Ac), cptr<T>(mc), scale_c, d.r_c, mptr<T>(out[5]), mptr<T>(out[4]),
          cptr<T>(As), cptr<T>(ms), scale_s, d.r_s, mptr<T>(out[8]), mptr<T>(out[7]), d.in, stream);
      TORCH_CHECK(err == cudaSuccess, "zip_merger_grads: ", cudaGetErrorString(err));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(specops_ext, CUDA, m) {
  m.impl("zip_lora_linear_fwd", &zip_lora_linear_fwd_cuda);
  m.impl("zip_lora_linear_bwd", &zip_lora_linear_bwd_cuda);
}
