// What the CPU kernels (csrc/cpu/zip.cpp) and the CUDA glue (csrc/cuda/zip_glue.cpp) of
// zip_lora_linear share: the specops_ext schemas, the shape/dtype/device checks, and the forward and
// backward ops, GEMM compositions around two device kernels (see `fwd`).
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>

namespace specops_zip {

// The backward takes one flag and returns one output per gradient, each named after the argument of
// specops::zip_lora_linear it belongs to (need_x -> grad_x, ...): callers pass the flags and read the
// outputs by name, so none depends on their order.
constexpr const char* kFwdSchema =
    "zip_lora_linear_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor B_c, Tensor A_c, Tensor m_c, "
    "Tensor B_s, Tensor A_s, Tensor m_s, float scale_c, float scale_s) -> Tensor";
constexpr const char* kBwdSchema =
    "zip_lora_linear_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor B_c, Tensor A_c, Tensor m_c, "
    "Tensor B_s, Tensor A_s, Tensor m_s, float scale_c, float scale_s, bool need_x, bool need_weight, "
    "bool need_bias, bool need_B_c, bool need_A_c, bool need_m_c, bool need_B_s, bool need_A_s, "
    "bool need_m_s) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_B_c, "
    "Tensor grad_A_c, Tensor grad_m_c, Tensor grad_B_s, Tensor grad_A_s, Tensor grad_m_s)";

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

// One LoRA (contiguous A (r, in) and m (in,)) with its scale, as the device kernels see it.
struct Lora {
  at::Tensor A, m;
  double s;
};

inline Lora lora(const at::Tensor& A, const at::Tensor& m, double s) { return {A.contiguous(), m.contiguous(), s}; }

// The gradients of the merger-gradient pass; undefined where not asked for.
struct LoraGrads {
  at::Tensor m_c, A_c, m_s, A_s;
};

// y = x W^T + b + (x Ap^T) Bp^T with the packed Ap = [s_c A_c diag(m_c); s_s A_s diag(m_s)],
// Bp = [B_c | B_s]: two thin GEMMs for the adapter, never an (out, in) intermediate. The device
// supplies the two element-wise kernels:
//   Device::pack(c, s, out):              out (r_c + r_s, in) = Ap;
//   Device::merger_grads(G, c, s, d, out): from G = (g Bp)^T x ((r_c + r_s, in), the sum over tokens
//       done by the GEMM), out.m_c[j] = s_c Σ_k A_c[k, j] G[k, j] and out.A_c[k, j] = s_c m_c[j] G[k, j]
//       (G's first r_c rows; the style LoRA likewise with the rest), for the defined outputs.
template <class Device>
at::Tensor pack_a(const Lora& c, const Lora& s) {
  auto out = at::empty({c.A.size(0) + s.A.size(0), c.A.size(1)}, c.A.options());
  Device::pack(c, s, out);
  return out;
}

template <class Device>
at::Tensor fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
               const at::Tensor& B_c, const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s,
               const at::Tensor& A_s, const at::Tensor& m_s, double scale_c, double scale_s) {
  check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  const auto Ap = pack_a<Device>(lora(A_c, m_c, scale_c), lora(A_s, m_s, scale_s));
  const auto Bp = at::cat({B_c, B_s}, 1);
  const auto h = at::mm(x, Ap.t());
  if (weight.has_value()) {
    auto y = bias.has_value() ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    return y.addmm_(h, Bp.t());
  }
  return bias.has_value() ? at::addmm(*bias, h, Bp.t()) : at::mm(h, Bp.t());
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;

// The gradients kBwdSchema names, empty (0,) where not needed.
template <class Device>
Grads bwd(const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& B_c,
          const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s, const at::Tensor& A_s,
          const at::Tensor& m_s, double scale_c, double scale_s, bool need_x, bool need_weight, bool need_bias,
          bool need_B_c, bool need_A_c, bool need_m_c, bool need_B_s, bool need_A_s, bool need_m_s) {
  const Dims d = check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == d.T && g.size(1) == d.out && g.scalar_type() == x.scalar_type(),
                    "grad_y: expected a (", d.T, ", ", d.out, ") ", x.scalar_type(), " matrix, got ", g.sizes(),
                    " ", g.scalar_type());
  TORCH_CHECK_VALUE(!need_weight || weight.has_value(), "weight: a gradient was asked for but weight is None");
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  const Lora c = lora(A_c, m_c, scale_c), s = lora(A_s, m_s, scale_s);
  const auto Ap = pack_a<Device>(c, s);
  const auto Bp = at::cat({B_c, B_s}, 1);
  at::Tensor gx, gW, gb, gB_c, gB_s;  // undefined where not needed, like the merger-pass outputs
  LoraGrads lg;
  if (need_x || need_A_c || need_m_c || need_A_s || need_m_s) {
    const auto u = at::mm(g, Bp);  // (T, r)
    if (need_x) gx = weight.has_value() ? at::mm(g, *weight).addmm_(u, Ap) : at::mm(u, Ap);
    if (need_A_c || need_m_c || need_A_s || need_m_s) {
      if (need_A_c) lg.A_c = at::empty({d.r_c, d.in}, x.options());
      if (need_m_c) lg.m_c = at::empty({d.in}, x.options());
      if (need_A_s) lg.A_s = at::empty({d.r_s, d.in}, x.options());
      if (need_m_s) lg.m_s = at::empty({d.in}, x.options());
      Device::merger_grads(at::mm(u.t(), x), c, s, d, lg);
    }
  }
  if (need_B_c || need_B_s) {
    const auto gBp = at::mm(g.t(), at::mm(x, Ap.t()));  // h recomputed, not kept from the forward
    if (need_B_c) gB_c = gBp.narrow(1, 0, d.r_c).contiguous();
    if (need_B_s) gB_s = gBp.narrow(1, d.r_c, d.r_s).contiguous();
  }
  if (need_weight) gW = at::mm(g.t(), x);
  if (need_bias) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    gb = g.sum(0, false, acc).to(x.scalar_type());
  }
  const auto out = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return {out(gx), out(gW), out(gb), out(gB_c), out(lg.A_c), out(lg.m_c), out(gB_s), out(lg.A_s), out(lg.m_s)};
}

}  // namespace specops_zip
