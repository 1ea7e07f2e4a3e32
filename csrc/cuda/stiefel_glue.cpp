// CUDA kernels of specops_ext::stiefel_sgd_step, cayley_adam_step and stiefel_adam_step (schemas
// in csrc/cpu/stiefel.cpp), plus stiefel_step_refusal, which tells specops/stiefel_steps.py why a
// stack does not fit the kernels' shared memory ("" when it does: the cuda kernel's supports
// predicate). Thin glue: the CPU kernels' argument checks, then one launch (stiefel.cu) on the
// current stream.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "stiefel_checks.h"
#include "stiefel_math.cuh"

namespace specops::cuda {
// Defined in stiefel.cu (S = float, double, __half, __nv_bfloat16).
cudaError_t stiefel_smem_limit(size_t* limit);
template <typename S>
cudaError_t stiefel_step(stiefel_detail::StepOp op, const stiefel_detail::StepArgs<S>& a, int64_t B,
                         cudaStream_t stream);
}  // namespace specops::cuda

namespace {

using specops::cuda::stiefel_detail::StepArgs;
using specops::cuda::stiefel_detail::StepOp;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "specops_ext::", op, " (CUDA) failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// Why the kernels refuse X's stack on its device (X's device is current), or "" when they take it.
std::string refusal(StepOp op, const at::Tensor& X, const char* name) {
  size_t limit = 0;
  check_cuda(specops::cuda::stiefel_smem_limit(&limit), name);
  const size_t need =
      specops::cuda::stiefel_detail::step_smem_bytes(op, X.size(1), X.size(2), X.scalar_type() == at::kDouble);
  if (need > limit)
    return c10::str("specops_ext::", name, " (CUDA): ", X.size(1), " x ", X.size(2), " ", X.scalar_type(),
                    " matrices need ", need, " bytes of shared memory per block, the device allows ", limit);
  if (X.size(0) > INT32_MAX)
    return c10::str("specops_ext::", name, " (CUDA): at most 2^31 - 1 matrices per call, got ", X.size(0));
  return "";
}

// Calls f(S{}) with the CUDA storage type of X.
template <class F>
void dispatch(const at::Tensor& X, F&& f) {
  switch (X.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "X: expected float32, float64, float16 or bfloat16, got ", X.scalar_type());
  }
}

template <class S>
S* ptr(const at::Tensor& t) {
  return t.numel() > 0 ? static_cast<S*>(t.data_ptr()) : nullptr;
}

// Fills the pointers and the polar stopping rule common to every op, then `set` the op's state;
// refuses stacks too large.
template <class Set>
void run(StepOp op, const char* name, const at::Tensor& X, const at::Tensor& G, const at::Tensor* step, double tol,
         int64_t max_iter, Set&& set) {
  specops_stiefel::check_polar(tol, max_iter);
  if (X.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(X.device());
  const std::string why = refusal(op, X, name);
  TORCH_CHECK_VALUE(why.empty(), why);
  dispatch(X, [&](auto tag) {
    using S = decltype(tag);
    StepArgs<S> a{};
    a.X = ptr<S>(X);
    a.G = ptr<S>(G);
    a.n = int(X.size(1));
    a.p = int(X.size(2));
    a.tol = tol;
    a.max_iter = max_iter;
    if (step != nullptr) {
      a.step = step->const_data_ptr<double>();
      a.per = X.size(0) / step->size(0);
    }
    set(a);
    check_cuda(specops::cuda::stiefel_step<S>(op, a, X.size(0), c10::cuda::getCurrentCUDAStream()), name);
  });
}

void stiefel_sgd_step_cuda(const at::Tensor& X, const at::Tensor& G, const at::Tensor& M, double lr,
                           double momentum, double q, int64_t iters, double eps, double tol, int64_t max_iter) {
  specops_stiefel::check_sgd(X, G, M);
  run(StepOp::kSgd, "stiefel_sgd_step", X, G, nullptr, tol, max_iter, [&](auto& a) {
    using S = std::remove_pointer_t<decltype(a.X)>;
    a.m = ptr<S>(M);
    a.lr = lr;
    a.beta1 = momentum;
    a.q = q;
    a.iters = iters;
    a.eps = eps;
  });
}

void cayley_adam_step_cuda(const at::Tensor& X, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
                           const at::Tensor& step, double lr, double beta1, double beta2, double eps, double q,
                           int64_t iters, double tol, int64_t max_iter) {
  specops_stiefel::check_cayley_adam(X, G, m, v, step);
  run(StepOp::kCayleyAdam, "cayley_adam_step", X, G, &step, tol, max_iter, [&](auto& a) {
    using S = std::remove_pointer_t<decltype(a.X)>;
    a.m = ptr<S>(m);
    a.v = ptr<S>(v);
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
    a.q = q;
    a.iters = iters;
  });
}

void stiefel_adam_step_cuda(const at::Tensor& X, const at::Tensor& G, const at::Tensor& Y, const at::Tensor& P,
                            const at::Tensor& V, const at::Tensor& Q, const at::Tensor& step, double lr,
                            double beta1, double beta2, double eps, double tol, int64_t max_iter) {
  specops_stiefel::check_stiefel_adam(X, G, Y, P, V, Q, step);
  run(StepOp::kStiefelAdam, "stiefel_adam_step", X, G, &step, tol, max_iter, [&](auto& a) {
    using S = std::remove_pointer_t<decltype(a.X)>;
    a.Y = ptr<S>(Y);
    a.P = ptr<S>(P);
    if (X.size(1) > X.size(2)) {  // tall: the normal moments exist
      a.V = ptr<S>(V);
      a.Q = ptr<S>(Q);
    }
    a.lr = lr;
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = eps;
  });
}

// Why step op `op` refuses X's stack on its device, "" when it takes it.
std::string stiefel_step_refusal_cuda(c10::string_view op, const at::Tensor& X) {
  const std::string name(op);
  StepOp kind = StepOp::kSgd;
  if (name == "cayley_adam_step") kind = StepOp::kCayleyAdam;
  else if (name == "stiefel_adam_step") kind = StepOp::kStiefelAdam;
  else TORCH_CHECK_VALUE(name == "stiefel_sgd_step", "stiefel_step_refusal: unknown op ", name);
  TORCH_CHECK_VALUE(X.dim() == 3, "X: expected a (B, n, p) tensor, got ", X.sizes());
  const c10::cuda::CUDAGuard guard(X.device());
  return refusal(kind, X, name.c_str());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("stiefel_step_refusal(str op, Tensor X) -> str");
}

TORCH_LIBRARY_IMPL(specops_ext, CUDA, m) {
  m.impl("stiefel_sgd_step", &stiefel_sgd_step_cuda);
  m.impl("cayley_adam_step", &cayley_adam_step_cuda);
  m.impl("stiefel_adam_step", &stiefel_adam_step_cuda);
  m.impl("stiefel_step_refusal", &stiefel_step_refusal_cuda);
}
