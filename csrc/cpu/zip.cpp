// ZipLoRA on the CPU: y = x W^T + b + s_c·B_c A_c (m_c ⊙ x) + s_s·B_s A_s (m_s ⊙ x), without (out, in).
//
// The mergers and scales are folded into one packed A' = [s_c A_c diag(m_c); s_s A_s diag(m_s)]
// (r x in values instead of scaling T x in activations), so both LoRAs and the column scaling go
// through ONE GEMM over x: h = x A'^T, then y += h B'^T with B' = [B_c | B_s]. GEMMs go to torch's
// BLAS (MKL / oneDNN): the only dense work is T x r thin products, which it runs near peak.
//
// Backward (g = grad_y): u = g B'; the merger gradient reduces over tokens inside the GEMM
// G = u^T x (r x in), then ONE fused pass over G gives both
//   grad_m_c[j] = s_c Σ_k A_c[k, j] G_c[k, j]   and   grad_A_c[k, j] = s_c m_c[j] G_c[k, j].
//
// merger_penalty: one parallel pass over the list of layers (no concatenation), per-layer
// statistics in the accumulation type, summed in layer order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "zip_common.h"

namespace specops {
namespace cpu {
namespace {

constexpr int64_t kCols = 256;       // column chunk of the packing / reduction passes (stays in L1)
constexpr int64_t kSerial = 1 << 16;  // elements below which a pass runs on one thread: an OpenMP
                                      // fork/join costs more than it saves (and far more when the
                                      // cores are oversubscribed)

// Grain for at::parallel_for over `n` items of `per_item` elements: all inline when small.
int64_t grain(int64_t n, int64_t per_item) {
  return n * per_item < kSerial ? std::max<int64_t>(n, 1) : std::max<int64_t>(1, kSerial / std::max<int64_t>(per_item, 1));
}

// A' = [s_c A_c diag(m_c); s_s A_s diag(m_s)]  (r_c + r_s, in), both LoRAs in one pass.
template <typename scalar_t, typename acc_t>
void pack_scaled(const scalar_t* A_c, const scalar_t* m_c, acc_t s_c, int64_t r_c, const scalar_t* A_s,
                 const scalar_t* m_s, acc_t s_s, int64_t r_s, int64_t in, scalar_t* dst) {
  const int64_t nchunks = (in + kCols - 1) / kCols;
  const int64_t r = r_c + r_s;
  at::parallel_for(0, r * nchunks, grain(r * nchunks, kCols), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k = b / nchunks, j0 = (b % nchunks) * kCols;
      const int64_t j1 = std::min(in, j0 + kCols);
      const bool content = k < r_c;
      const scalar_t* a = content ? A_c + k * in : A_s + (k - r_c) * in;
      const scalar_t* m = content ? m_c : m_s;
      const acc_t s = content ? s_c : s_s;
      scalar_t* d = dst + k * in;
      for (int64_t j = j0; j < j1; ++j)
        d[j] = static_cast<scalar_t>(s * static_cast<acc_t>(m[j]) * static_cast<acc_t>(a[j]));
    }
  });
}

at::Tensor pack_a(const at::Tensor& A_c, const at::Tensor& m_c, double s_c, const at::Tensor& A_s,
                  const at::Tensor& m_s, double s_s) {
  const int64_t r_c = A_c.size(0), r_s = A_s.size(0), in = A_c.size(1);
  auto out = at::empty({r_c + r_s, in}, A_c.options());
  auto Ac = A_c.contiguous(), As = A_s.contiguous(), mc = m_c.contiguous(), ms = m_s.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A_c.scalar_type(), "zip_pack", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pack_scaled<scalar_t, acc_t>(Ac.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
                                 static_cast<acc_t>(s_c), r_c, As.const_data_ptr<scalar_t>(),
                                 ms.const_data_ptr<scalar_t>(), static_cast<acc_t>(s_s), r_s, in,
                                 out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// One LoRA's slice of the merger-gradient pass: rows [row0, row0 + r) of G (r_c + r_s, in).
template <typename scalar_t>
struct Side {
  const scalar_t* A;  // (r, in)
  const scalar_t* m;  // (in,)
  double s;
  int64_t row0, r;
  scalar_t* gm;  // (in,) or nullptr
  scalar_t* gA;  // (r, in) or nullptr
};

// One pass over G for both LoRAs: grad_m[j] = s Σ_k A[k, j] G[k, j] (accumulated in acc_t) and
// gA[k, j] = s m[j] G[k, j], column chunk by column chunk (the chunk's sums stay in L1).
template <typename scalar_t, typename acc_t>
void merger_grads(const scalar_t* G, int64_t in, const Side<scalar_t> (&sides)[2]) {
  const int64_t nchunks = (in + kCols - 1) / kCols;
  const int64_t rows = sides[0].r + sides[1].r;
  at::parallel_for(0, nchunks, grain(nchunks, kCols * rows), [&](int64_t c0, int64_t c1) {
    acc_t sum[kCols];
    acc_t sm[kCols];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * kCols, n = std::min(kCols, in - j0);
      for (const auto& sd : sides) {
        if (sd.gm == nullptr && sd.gA == nullptr) continue;
        const acc_t s = static_cast<acc_t>(sd.s);
        for (int64_t j = 0; j < n; ++j) {
          sum[j] = acc_t(0);
          sm[j] = s * static_cast<acc_t>(sd.m[j0 + j]);
        }
        for (int64_t k = 0; k < sd.r; ++k) {
          const scalar_t* g = G + (sd.row0 + k) * in + j0;
          const scalar_t* a = sd.A + k * in + j0;
          for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<acc_t>(g[j]) * static_cast<acc_t>(a[j]);
          if (sd.gA != nullptr) {
            scalar_t* ga = sd.gA + k * in + j0;
            for (int64_t j = 0; j < n; ++j) ga[j] = static_cast<scalar_t>(sm[j] * static_cast<acc_t>(g[j]));
          }
        }
        if (sd.gm != nullptr)
          for (int64_t j = 0; j < n; ++j) sd.gm[j0 + j] = static_cast<scalar_t>(s * sum[j]);
      }
    }
  });
}

using specops_zip::check;
using specops_zip::Dims;

at::Tensor zip_lora_linear_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& B_c,
                                   const at::Tensor& A_c, const at::Tensor& m_c,
                                   const at::Tensor& B_s, const at::Tensor& A_s,
                                   const at::Tensor& m_s, double scale_c, double scale_s) {
  check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  return specops_zip::forward(x, weight, bias, pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s), B_c, B_s);
}

// Gradients as specops_zip::backward orders them; the merger/A gradients by merger_grads above.
std::vector<at::Tensor> zip_lora_linear_bwd_cpu(
    const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& B_c, const at::Tensor& A_c, const at::Tensor& m_c, const at::Tensor& B_s,
    const at::Tensor& A_s, const at::Tensor& m_s, double scale_c, double scale_s,
    std::array<bool, 9> need) {
  const Dims d = check(x, weight, B_c, A_c, m_c, B_s, A_s, m_s);
  const auto Ap = pack_a(A_c, m_c, scale_c, A_s, m_s, scale_s);
  return specops_zip::backward(g, x, weight, Ap, B_c, B_s, d, need, [&](const at::Tensor& G, std::vector<at::Tensor>& out) {
    const auto Ac = A_c.contiguous(), As = A_s.contiguous(), mc = m_c.contiguous(), ms = m_s.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "zip_merger_grads", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto ptr = [&](int i) { return need[i] ? out[i].mutable_data_ptr<scalar_t>() : nullptr; };
      const Side<scalar_t> sides[2] = {
          {Ac.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(), scale_c, 0, d.r_c, ptr(5), ptr(4)},
          {As.const_data_ptr<scalar_t>(), ms.const_data_ptr<scalar_t>(), scale_s, d.r_c, d.r_s, ptr(8), ptr(7)}};
      merger_grads<scalar_t, acc_t>(G.const_data_ptr<scalar_t>(), d.in, sides);
    });
  });
}

// ----------------------------------------------------------------------------- merger_penalty

enum Kind : int64_t { kAbsProduct = 0, kDot = 1, kCosine = 2 };
constexpr double kCosEps = 1e-8;

template <typename acc_t>
struct LayerStats {
  acc_t dot, nc, ns;  // Σ m_c m_s (Σ |m_c m_s| for abs_product), |m_c|^2, |m_s|^2
};

template <typename scalar_t, typename acc_t>
LayerStats<acc_t> layer_stats(const at::Tensor& mc, const at::Tensor& ms, int64_t kind) {
  const scalar_t* a = mc.const_data_ptr<scalar_t>();
  const scalar_t* b = ms.const_data_ptr<scalar_t>();
  const int64_t n = mc.size(0), sa = mc.stride(0), sb = ms.stride(0);
  LayerStats<acc_t> st{0, 0, 0};
  auto at_a = [&](int64_t j) { return static_cast<acc_t>(a[j * sa]); };
  auto at_b = [&](int64_t j) { return static_cast<acc_t>(b[j * sb]); };
  if (kind == kAbsProduct) {
    for (int64_t j = 0; j < n; ++j) st.dot += std::abs(at_a(j) * at_b(j));
  } else {
    for (int64_t j = 0; j < n; ++j) st.dot += at_a(j) * at_b(j);
  }
  if (kind == kCosine)
    for (int64_t j = 0; j < n; ++j) {
      st.nc += at_a(j) * at_a(j);
      st.ns += at_b(j) * at_b(j);
    }
  return st;
}

template <typename acc_t>
acc_t cos_den(const LayerStats<acc_t>& st) {
  return std::sqrt(std::max<acc_t>(st.nc * st.ns, acc_t(kCosEps * kCosEps)));
}

template <typename acc_t>
acc_t sgn(acc_t v) {
  return static_cast<acc_t>((v > 0) - (v < 0));
}

// Layers per task: one thread below ~4M merger entries (the whole penalty is then well under a
// millisecond, less than a fork/join of a busy machine).
int64_t layer_grain(at::TensorList mc) {
  int64_t total = 0;
  for (const auto& t : mc) total += t.size(0);
  const int64_t L = static_cast<int64_t>(mc.size());
  return total < (int64_t(1) << 22) ? std::max<int64_t>(L, 1) : std::max<int64_t>(1, L / 64);
}

void check_lists(at::TensorList mc, at::TensorList ms, int64_t kind) {
  TORCH_CHECK_VALUE(!mc.empty() && mc.size() == ms.size(), "m_c_list, m_s_list: expected equally long non-empty lists");
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "kind: expected 0 (abs_product), 1 (dot) or 2 (cosine)");
  for (size_t l = 0; l < mc.size(); ++l)
    TORCH_CHECK_VALUE(mc[l].dim() == 1 && ms[l].sizes() == mc[l].sizes() &&
                          mc[l].scalar_type() == mc[0].scalar_type() &&
                          ms[l].scalar_type() == mc[0].scalar_type(),
                      "m_s_list[", l, "]: expected a ", mc[0].scalar_type(), " vector of shape ",
                      mc[l].sizes(), ", got ", ms[l].sizes(), " ", ms[l].scalar_type());
}

at::Tensor merger_penalty_fwd_cpu(at::TensorList mc, at::TensorList ms, int64_t kind) {
  check_lists(mc, ms, kind);
  const int64_t L = static_cast<int64_t>(mc.size());
  const auto acc_type = mc[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({}, mc[0].options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mc[0].scalar_type(), "merger_penalty_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> per(L);
    at::parallel_for(0, L, layer_grain(mc), [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        const auto st = layer_stats<scalar_t, acc_t>(mc[l], ms[l], kind);
        const int64_t n = mc[l].size(0);
        if (kind == kAbsProduct) per[l] = n > 0 ? st.dot / static_cast<acc_t>(n) : acc_t(0);
        else if (kind == kDot) per[l] = std::abs(st.dot);
        else per[l] = std::abs(st.dot / cos_den(st));
      }
    });
    acc_t total = 0;
    for (int64_t l = 0; l < L; ++l) total += per[l];
    *out.mutable_data_ptr<acc_t>() = total;
  });
  return out;
}

// d/dm_c of the layer penalty times grad, written into the flat outputs at the layer's offset.
std::tuple<at::Tensor, at::Tensor> merger_penalty_bwd_cpu(const at::Tensor& grad, at::TensorList mc,
                                                         at::TensorList ms, int64_t kind) {
  check_lists(mc, ms, kind);
  const int64_t L = static_cast<int64_t>(mc.size());
  std::vector<int64_t> off(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) off[l + 1] = off[l] + mc[l].size(0);
  auto gc = at::empty({off[L]}, mc[0].options()), gs = at::empty({off[L]}, mc[0].options());
  const double g0 = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mc[0].scalar_type(), "merger_penalty_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t gr = static_cast<acc_t>(g0);
    scalar_t* pc = gc.mutable_data_ptr<scalar_t>();
    scalar_t* ps = gs.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, L, layer_grain(mc), [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        const auto st = layer_stats<scalar_t, acc_t>(mc[l], ms[l], kind);
        const scalar_t* a = mc[l].const_data_ptr<scalar_t>();
        const scalar_t* b = ms[l].const_data_ptr<scalar_t>();
        const int64_t n = mc[l].size(0), sa = mc[l].stride(0), sb = ms[l].stride(0);
        // grad_c = w (m_s - kc m_c), grad_s = w (m_c - ks m_s); abs_product: w per element.
        acc_t w = 0, kc = 0, ks = 0;
        if (kind == kDot) {
          w = gr * sgn(st.dot);
        } else if (kind == kCosine) {
          const acc_t den = cos_den(st), cos = st.dot / den;
          w = gr * sgn(cos) / den;
          if (st.nc * st.ns >= acc_t(kCosEps * kCosEps)) {  // else den is clamped: no norm term
            kc = cos * den / st.nc;
            ks = cos * den / st.ns;
          }
        }
        const acc_t w_abs = n > 0 ? gr / static_cast<acc_t>(n) : acc_t(0);
        for (int64_t j = 0; j < n; ++j) {
          const acc_t x = static_cast<acc_t>(a[j * sa]), y = static_cast<acc_t>(b[j * sb]);
          const acc_t wj = kind == kAbsProduct ? w_abs * sgn(x * y) : w;
          pc[off[l] + j] = static_cast<scalar_t>(wj * (y - kc * x));
          ps[off[l] + j] = static_cast<scalar_t>(wj * (x - ks * y));
        }
      }
    });
  });
  return {gc, gs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def(
      "zip_lora_linear_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor B_c, Tensor A_c, "
      "Tensor m_c, Tensor B_s, Tensor A_s, Tensor m_s, float scale_c, float scale_s) -> Tensor");
  m.def(
      "zip_lora_linear_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor B_c, Tensor A_c, "
      "Tensor m_c, Tensor B_s, Tensor A_s, Tensor m_s, float scale_c, float scale_s, bool[9] need)"
      " -> Tensor[]");
  m.def("merger_penalty_fwd(Tensor[] m_c, Tensor[] m_s, int kind) -> Tensor");
  m.def("merger_penalty_bwd(Tensor grad, Tensor[] m_c, Tensor[] m_s, int kind) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("zip_lora_linear_fwd", &zip_lora_linear_fwd_cpu);
  m.impl("zip_lora_linear_bwd", &zip_lora_linear_bwd_cpu);
  m.impl("merger_penalty_fwd", &merger_penalty_fwd_cpu);
  m.impl("merger_penalty_bwd", &merger_penalty_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
