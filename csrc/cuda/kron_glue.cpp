// CUDA kernels of specops_ext::kron_matmul_{fwd,bwd} (schemas defined in csrc/cpu/kron.cpp).
// Thin glue: argument checks, workspace allocation and the final reduction of the per-block
// factor-gradient partial sums; the kernels are in kron.cu.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

namespace specops::cuda {
// Defined and instantiated in kron.cu (float, double, __half, __nv_bfloat16; Acc = float, or
// double for double).
template <typename T>
cudaError_t kron_matmul_workspace(int64_t groups, int64_t rows, int k, const int64_t* p,
                                  const int64_t* q, bool factor_grads, size_t* scratch_bytes,
                                  int64_t* partial_blocks);
template <typename T>
cudaError_t kron_matmul_fwd(const T* x, const T* const* factors, T* y, int64_t groups,
                            int64_t rows, int k, const int64_t* p, const int64_t* q,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream);
template <typename T, typename Acc>
cudaError_t kron_matmul_factor_grads(const T* x, const T* grad_y, const T* const* factors,
                                     Acc* partials, int64_t groups, int64_t rows, int k,
                                     const int64_t* p, const int64_t* q, void* scratch,
                                     size_t scratch_bytes, cudaStream_t stream);
}  // namespace specops::cuda

namespace {

constexpr int64_t kMaxFactors = 8;

struct KronShape {
  int64_t G, M, P, Q;
  std::vector<int64_t> p, q;
};

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Calls f(T{}) with the CUDA storage type of t (checked by check_args).
template <class F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err != cudaErrorInvalidValue, "specops_ext::", op, " (CUDA): ", what,
              " failed with an invalid argument; the kernels need every row width (including "
              "intermediates) and the total factor size to be at most 2^30 elements");
  TORCH_CHECK(err == cudaSuccess, "specops_ext::", op, " (CUDA): ", what, " failed: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

KronShape check_args(const char* op, const at::Tensor& x, at::TensorList factors) {
  TORCH_CHECK_VALUE(x.dim() == 3, "specops_ext::", op, ": x must have shape (G, M, P), got ",
                    x.sizes());
  TORCH_CHECK_VALUE(supported(x.scalar_type()), "specops_ext::", op, ": x has dtype ",
                    x.scalar_type(), "; expected float32, float64, float16 or bfloat16");
  const int64_t k = int64_t(factors.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxFactors, "specops_ext::", op, ": expected 1 to ",
                    kMaxFactors, " factors, got ", k);
  KronShape s{x.size(0), x.size(1), 1, 1, {}, {}};
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& f = factors[i];
    TORCH_CHECK_VALUE(f.dim() == 3 && f.size(0) == s.G, "specops_ext::", op, ": factors[", i,
                      "] must have shape (G, p_i, q_i) with G = ", s.G, ", got ", f.sizes());
    TORCH_CHECK_VALUE(f.scalar_type() == x.scalar_type(), "specops_ext::", op, ": factors[", i,
                      "] has dtype ", f.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(f.device() == x.device(), "specops_ext::", op, ": factors[", i,
                      "] is on ", f.device(), " but x is on ", x.device());
    s.p.push_back(f.size(1));
    s.q.push_back(f.size(2));
    s.P *= f.size(1);
    s.Q *= f.size(2);
  }
  TORCH_CHECK_VALUE(x.size(2) == s.P, "specops_ext::", op,
                    ": x must have shape (G, M, P) with P = prod_i p_i = ", s.P, ", got ",
                    x.sizes());
  return s;
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

template <class T>
std::array<const T*, kMaxFactors> factor_ptrs(const std::vector<at::Tensor>& factors) {
  std::array<const T*, kMaxFactors> ptrs{};
  for (size_t i = 0; i < factors.size(); ++i)
    ptrs[i] = static_cast<const T*>(factors[i].const_data_ptr());
  return ptrs;
}

// y (G, M, prod q) = x (G, M, prod p) @ kron(factors), all contiguous.
void run_fwd(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& factors,
             const std::vector<int64_t>& p, const std::vector<int64_t>& q, at::Tensor& y) {
  const int64_t G = x.size(0), M = x.size(1);
  const int k = int(factors.size());
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    size_t scratch_bytes = 0;
    int64_t partial_blocks = 0;
    check_cuda(specops::cuda::kron_matmul_workspace<T>(G, M, k, p.data(), q.data(), false,
                                                       &scratch_bytes, &partial_blocks),
               op, "workspace query");
    at::Tensor scratch = at::empty({int64_t(scratch_bytes)}, x.options().dtype(at::kByte));
    const auto ptrs = factor_ptrs<T>(factors);
    check_cuda(specops::cuda::kron_matmul_fwd<T>(
                   static_cast<const T*>(x.const_data_ptr()), ptrs.data(),
                   static_cast<T*>(y.mutable_data_ptr()), G, M, k, p.data(), q.data(),
                   scratch.mutable_data_ptr(), scratch_bytes, at::cuda::getCurrentCUDAStream()),
               op, "forward kernel");
  });
}

at::Tensor kron_matmul_fwd_cuda(const at::Tensor& x_in, at::TensorList factors_in) {
  const KronShape s = check_args("kron_matmul_fwd", x_in, factors_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const std::vector<at::Tensor> factors = contiguous(factors_in);
  at::Tensor y = at::empty({s.G, s.M, s.Q}, x.options());
  run_fwd("kron_matmul_fwd", x, factors, s.p, s.q, y);
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> kron_matmul_bwd_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, at::TensorList factors_in, bool need_x,
    bool need_factors) {
  const char* op = "kron_matmul_bwd";
  const KronShape s = check_args(op, x_in, factors_in);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 3 && grad_y_in.size(0) == s.G &&
                        grad_y_in.size(1) == s.M && grad_y_in.size(2) == s.Q,
                    "specops_ext::", op, ": grad_y must have shape (", s.G, ", ", s.M, ", ", s.Q,
                    "), got ", grad_y_in.sizes());
  TORCH_CHECK_VALUE(grad_y_in.scalar_type() == x_in.scalar_type(), "specops_ext::", op,
                    ": grad_y has dtype ", grad_y_in.scalar_type(), " but x has ",
                    x_in.scalar_type());
  TORCH_CHECK_VALUE(grad_y_in.device() == x_in.device(), "specops_ext::", op,
                    ": grad_y is on ", grad_y_in.device(), " but x is on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous();
  const std::vector<at::Tensor> factors = contiguous(factors_in);
  const int k = int(factors.size());

  at::Tensor grad_x = at::empty({0}, x_in.options());
  if (need_x) {
    // grad_x = grad_y @ kron(A_i^T): the forward kernel with transposed factors.
    std::vector<at::Tensor> transposed;
    for (const at::Tensor& f : factors) transposed.push_back(f.transpose(1, 2).contiguous());
    grad_x = at::empty({s.G, s.M, s.P}, x_in.options());
    run_fwd(op, grad_y, transposed, s.q, s.p, grad_x);
  }

  std::vector<at::Tensor> grad_factors;
  if (need_factors) {
    const at::Tensor x = x_in.contiguous();
    int64_t total = 0;
    for (int i = 0; i < k; ++i) total += s.p[i] * s.q[i];
    dispatch(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
      size_t scratch_bytes = 0;
      int64_t partial_blocks = 0;
      check_cuda(specops::cuda::kron_matmul_workspace<T>(s.G, s.M, k, s.p.data(), s.q.data(),
                                                         true, &scratch_bytes, &partial_blocks),
                 op, "workspace query");
      at::Tensor scratch = at::empty({int64_t(scratch_bytes)}, x.options().dtype(at::kByte));
      at::Tensor partials =
          at::empty({s.G, partial_blocks, total},
                    x.options().dtype(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat));
      const auto ptrs = factor_ptrs<T>(factors);
      check_cuda(specops::cuda::kron_matmul_factor_grads<T, Acc>(
                     static_cast<const T*>(x.const_data_ptr()),
                     static_cast<const T*>(grad_y.const_data_ptr()), ptrs.data(),
                     static_cast<Acc*>(partials.mutable_data_ptr()), s.G, s.M, k, s.p.data(),
                     s.q.data(), scratch.mutable_data_ptr(), scratch_bytes,
                     at::cuda::getCurrentCUDAStream()),
                 op, "factor-gradient kernel");
      // Fixed-order reduction of the per-block partials (no atomics anywhere: deterministic).
      const at::Tensor sums = partials.sum(1);
      int64_t off = 0;
      for (int i = 0; i < k; ++i) {
        const int64_t n = s.p[i] * s.q[i];
        grad_factors.push_back(sums.narrow(1, off, n)
                                   .reshape({s.G, s.p[i], s.q[i]})
                                   .to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true,
                                       at::MemoryFormat::Contiguous));
        off += n;
      }
    });
  }
  return {grad_x, grad_factors};
}

}  // namespace

TORCH_LIBRARY_IMPL(specops_ext, CUDA, m) {
  m.impl("kron_matmul_fwd", TORCH_FN(kron_matmul_fwd_cuda));
  m.impl("kron_matmul_bwd", TORCH_FN(kron_matmul_bwd_cuda));
}
