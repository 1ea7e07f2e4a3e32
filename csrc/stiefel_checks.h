// Argument checks of the fused Stiefel step ops (specops_ext::*_step), shared by the CPU kernels
// (csrc/cpu/stiefel.cpp) and the CUDA glue (csrc/cuda/stiefel_glue.cpp) so both refuse the same inputs
// with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace specops_stiefel {

inline void check_stack(const at::Tensor& X, const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape && t.is_contiguous() && t.scalar_type() == X.scalar_type() &&
                        t.device() == X.device(),
                    name, ": expected a contiguous ", X.scalar_type(), " tensor of shape ", shape, " on ",
                    X.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

inline void check_x(const at::Tensor& X) {
  TORCH_CHECK_VALUE(X.dim() == 3 && X.is_contiguous() && X.size(1) >= X.size(2),
                    "X: expected a contiguous (B, n, p) tensor with n >= p, got ", X.sizes());
}

// The Newton-Schulz stopping rule every step is passed (specops._constants.polar_tol, POLAR_MAX_ITER).
inline void check_polar(double tol, int64_t max_iter) {
  TORCH_CHECK_VALUE(tol >= 0 && max_iter >= 0, "tol, max_iter: expected >= 0, got ", tol, ", ", max_iter);
}

// step (S,) float64: one counter per parameter; matrix b belongs to parameter b / (B / S).
inline void check_step(const at::Tensor& X, const at::Tensor& step) {
  TORCH_CHECK_VALUE(step.dim() == 1 && step.is_contiguous() && step.scalar_type() == at::kDouble &&
                        step.device() == X.device() && step.size(0) > 0 && X.size(0) % step.size(0) == 0,
                    "step: expected a contiguous float64 (S,) tensor on ", X.device(), " with S dividing B=",
                    X.size(0), ", got ", step.sizes(), " ", step.scalar_type(), " on ", step.device());
}

inline void check_sgd(const at::Tensor& X, const at::Tensor& G, const at::Tensor& M) {
  check_x(X);
  check_stack(X, G, "G", X.sizes());
  check_stack(X, M, "M", X.sizes());
}

inline void check_cayley_adam(const at::Tensor& X, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
                              const at::Tensor& step) {
  check_x(X);
  check_stack(X, G, "G", X.sizes());
  check_stack(X, m, "m", X.sizes());
  check_stack(X, v, "v", {X.size(0)});
  check_step(X, step);
}

// Y, P (B, p, p) skew moments; V, Q (B, n, p) normal moments, used (and checked) only when n > p.
inline void check_stiefel_adam(const at::Tensor& X, const at::Tensor& G, const at::Tensor& Y, const at::Tensor& P,
                               const at::Tensor& V, const at::Tensor& Q, const at::Tensor& step) {
  check_x(X);
  const int64_t B = X.size(0), n = X.size(1), p = X.size(2);
  check_stack(X, G, "G", X.sizes());
  check_stack(X, Y, "exp_avg", {B, p, p});
  check_stack(X, P, "exp_avg_sq", {B, p, p});
  if (n > p) {
    check_stack(X, V, "exp_avg_normal", X.sizes());
    check_stack(X, Q, "exp_avg_sq_normal", X.sizes());
  }
  check_step(X, step);
}

}  // namespace specops_stiefel
