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

void check(const at::Tensor& x, const at::Tensor& B_c, const at::Tensor& A_c, const at::Tensor& m_c,
           const at::Tensor& B_s, const at::Tensor& A_s, const at::Tensor& m_s) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_cuda(), "x: expected a (tokens, in) CUDA matrix, got ", x.sizes());
  const int64_t in = x.size(1), out = B_c.size(0);
  TORCH_CHECK_VALUE(A_c.dim() == 2 && A_c.size(1) == in, "A_c: expected (r_c, ", in, "), got ", A_c.sizes());
  TORCH_CHECK_VALUE(A_s.dim() == 2 && A_s.size(1) == in, "A_s: expected (r_s, ", in, "), got ", A_s.sizes());
  TORCH_CHECK_VALUE(B_c.dim() == 2 && B_c.size(1) == A_c.size(0), "B_c: expected (out, r_c), got ", B_c.sizes());
  TORCH_CHECK_VALUE(B_s.dim() == 2 && B_s.size(0) == out && B_s.size(1) == A_s.size(0),
                    "B_s: expected (", out, ", r_s), got ", B_s.sizes());
  TORCH_CHECK_VALUE(m_c.numel() == in && m_s.numel() == in, "m_c, m_s: expected (", in, ",) vectors");
  for (const auto* t : {&B_c, &A_c, &m_c, &B_s, &A_s, &m_s})
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                      "zip_lora_linear: every tensor must match x's dtype and device");
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
  check(x, B_c, A_c, m_c, B_s, A_s, m_s);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto Ap = pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s);
  const auto Bp = at::cat({B_c, B_s}, 1);
  const auto h = at::mm(x, Ap.t());
  if (weight.has_value()) {
    auto y = bias.has_value() ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    return y.addmm_(h, Bp.t());
  }
  return bias.has_value() ? at::addmm(*bias, h, Bp.t()) : at::mm(h, Bp.t());
}

std::vector<at::Tensor> zip_lora_linear_bwd_cuda(
    const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& B_c, const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s,
    const at::Tensor& A_s, const at::Tensor& m_s, double scale_c, double scale_s,
    std::array<bool, 9> need) {
  check(x, B_c, A_c, m_c, B_s, A_s, m_s);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t r_c = A_c.size(0), r_s = A_s.size(0), in = x.size(1);
  std::vector<at::Tensor> out(9);
  for (auto& t : out) t = at::empty({0}, x.options());
  const auto Ap = pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s);
  const auto Bp = at::cat({B_c, B_s}, 1);
  const bool need_lora_a = need[4] || need[5] || need[7] || need[8];
  if (need[0] || need_lora_a) {
    const auto u = at::mm(g, Bp);
    if (need[0]) out[0] = weight.has_value() ? at::mm(g, *weight).addmm_(u, Ap) : at::mm(u, Ap);
    if (need_lora_a) {
      const auto G = at::mm(u.t(), x);  // (r_c + r_s, in): the token reduction, by cuBLAS
      if (need[4]) out[4] = at::empty({r_c, in}, x.options());
      if (need[5]) out[5] = at::empty({in}, x.options());
      if (need[7]) out[7] = at::empty({r_s, in}, x.options());
      if (need[8]) out[8] = at::empty({in}, x.options());
      auto Ac = A_c.contiguous(), As = A_s.contiguous(), mc = m_c.contiguous(), ms = m_s.contiguous();
      const auto stream = c10::cuda::getCurrentCUDAStream().stream();
      dispatch(x.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const auto err = specops::cuda::zip_merger_grads<T>(
            cptr<T>(G), cptr<T>(Ac), cptr<T>(mc), scale_c, r_c, mptr<T>(out[5]), mptr<T>(out[4]),
            cptr<T>(As), cptr<T>(ms), scale_s, r_s, mptr<T>(out[8]), mptr<T>(out[7]), in, stream);
        TORCH_CHECK(err == cudaSuccess, "zip_merger_grads: ", cudaGetErrorString(err));
      });
    }
  }
  if (need[3] || need[6]) {
    const auto gBp = at::mm(g.t(), at::mm(x, Ap.t()));
    if (need[3]) out[3] = gBp.narrow(1, 0, r_c).contiguous();
    if (need[6]) out[6] = gBp.narrow(1, r_c, r_s).contiguous();
  }
  if (need[1]) out[1] = at::mm(g.t(), x);
  if (need[2]) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    out[2] = g.sum(0, false, acc).to(x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(specops_ext, CUDA, m) {
  m.impl("zip_lora_linear_fwd", &zip_lora_linear_fwd_cuda);
  m.impl("zip_lora_linear_bwd", &zip_lora_linear_bwd_cuda);
}
