// What the CPU kernels (csrc/cpu/zip.cpp) and the CUDA glue (csrc/cuda/zip_glue.cpp) of
// zip_lora_linear share: the shape/dtype/device checks and the GEMM compositions of forward and backward.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

namespace specops_zip {

inline void check_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
                    name, ": expected shape (", rows, ", ", cols, "), got ", t.sizes());
}

// Shapes of one call (the Python op has already checked them with messages for users).
struct Dims {
  int64_t T, in, out, r_c, r_s;
};

inline Dims check(const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& B_c,
                  const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s, const at::Tensor& A_s,
                  const at::Tensor& m_s) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a (tokens, in_features) matrix, got ", x.sizes());
  Dims d{x.size(0), x.size(1), B_c.size(0), A_c.size(0), A_s.size(0)};
  check_2d(A_c, "A_c", -1, d.in);
  check_2d(A_s, "A_s", -1, d.in);
  check_2d(B_c, "B_c", d.out, d.r_c);
  check_2d(B_s, "B_s", d.out, d.r_s);
  if (weight.has_value()) check_2d(*weight, "weight", d.out, d.in);
  TORCH_CHECK_VALUE(m_c.dim() == 1 && m_c.size(0) == d.in, "m_c: expected (", d.in, ",), got ", m_c.sizes());
  TORCH_CHECK_VALUE(m_s.dim() == 1 && m_s.size(0) == d.in, "m_s: expected (", d.in, ",), got ", m_s.sizes());
  for (const auto* t : {&B_c, &A_c, &m_c, &B_s, &A_s, &m_s})
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                      "zip_lora_linear: every tensor must match x's dtype ", x.scalar_type(), " and device ",
                      x.device(), ", got ", t->scalar_type(), " on ", t->device());
  return d;
}

// y = x W^T + b + (x Ap^T) Bp^T with the packed Ap = [s_c A_c diag(m_c); s_s A_s diag(m_s)],
// Bp = [B_c | B_s]: two thin GEMMs for the adapter, never an (out, in) intermediate.
inline at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& Ap, const at::Tensor& B_c,
                          const at::Tensor& B_s) {
  const auto Bp = at::cat({B_c, B_s}, 1);
  const auto h = at::mm(x, Ap.t());
  if (weight.has_value()) {
    auto y = bias.has_value() ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    return y.addmm_(h, Bp.t());
  }
  return bias.has_value() ? at::addmm(*bias, h, Bp.t()) : at::mm(h, Bp.t());
}

// Gradients in the order (x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s); empty where !need. All but
// the merger/A gradients are GEMMs; `merger_grads(G, Ap, out)` is the device kernel that turns the
// token-reduced G = (g Bp)^T x (r_c + r_s, in) into out[4], out[5], out[7], out[8] where needed.
template <class MergerGrads>
std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& Ap, const at::Tensor& B_c, const at::Tensor& B_s,
                                 const Dims& d, const std::array<bool, 9>& need, MergerGrads&& merger_grads) {
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == d.T && g.size(1) == d.out && g.scalar_type() == x.scalar_type(),
                    "grad_y: expected a (", d.T, ", ", d.out, ") ", x.scalar_type(), " matrix, got ", g.sizes(),
                    " ", g.scalar_type());
  TORCH_CHECK_VALUE(!need[1] || weight.has_value(), "weight: a gradient was asked for but weight is None");
  std::vector<at::Tensor> out(9);
  for (auto& t : out) t = at::empty({0}, x.options());
  const auto Bp = at::cat({B_c, B_s}, 1);
  const bool need_lora_a = need[4] || need[5] || need[7] || need[8];
  if (need[0] || need_lora_a) {
    const auto u = at::mm(g, Bp);  // (T, r)
    if (need[0]) out[0] = weight.has_value() ? at::mm(g, *weight).addmm_(u, Ap) : at::mm(u, Ap);
    if (need_lora_a) {
      if (need[4]) out[4] = at::empty({d.r_c, d.in}, x.options());
      if (need[5]) out[5] = at::empty({d.in}, x.options());
      if (need[7]) out[7] = at::empty({d.r_s, d.in}, x.options());
      if (need[8]) out[8] = at::empty({d.in}, x.options());
      merger_grads(at::mm(u.t(), x), out);  // (r, in): the sum over tokens, by the BLAS
    }
  }
  if (need[3] || need[6]) {
    const auto gBp = at::mm(g.t(), at::mm(x, Ap.t()));  // h recomputed, not kept from the forward
    if (need[3]) out[3] = gBp.narrow(1, 0, d.r_c).contiguous();
    if (need[6]) out[6] = gBp.narrow(1, d.r_c, d.r_s).contiguous();
  }
  if (need[1]) out[1] = at::mm(g.t(), x);
  if (need[2]) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    out[2] = g.sum(0, false, acc).to(x.scalar_type());
  }
  return out;
}

}  // namespace specops_zip
