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
void merger_pass(const scalar_t* G, int64_t in, const Side<scalar_t> (&sides)[2]) {
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

// The element-wise kernels of specops_zip::fwd / bwd on CPU tensors.
struct Cpu {
  static void pack(const specops_zip::Lora& c, const specops_zip::Lora& s, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "zip_pack", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pack_scaled<scalar_t, acc_t>(c.A.const_data_ptr<scalar_t>(), c.m.const_data_ptr<scalar_t>(),
                                   static_cast<acc_t>(c.s), c.A.size(0), s.A.const_data_ptr<scalar_t>(),
                                   s.m.const_data_ptr<scalar_t>(), static_cast<acc_t>(s.s), s.A.size(0),
                                   c.A.size(1), out.mutable_data_ptr<scalar_t>());
    });
  }

  static void merger_grads(const at::Tensor& G, const specops_zip::Lora& c, const specops_zip::Lora& s,
                           const specops_zip::Dims& d, specops_zip::LoraGrads& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.scalar_type(), "zip_merger_grads", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto ptr = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
      const Side<scalar_t> sides[2] = {
          {c.A.const_data_ptr<scalar_t>(), c.m.const_data_ptr<scalar_t>(), c.s, 0, d.r_c, ptr(out.m_c), ptr(out.A_c)},
          {s.A.const_data_ptr<scalar_t>(), s.m.const_data_ptr<scalar_t>(), s.s, d.r_c, d.r_s, ptr(out.m_s),
           ptr(out.A_s)}};
      merger_pass<scalar_t, acc_t>(G.const_data_ptr<scalar_t>(), d.in, sides);
    });
  }
};

// ----------------------------------------------------------------------------- merger_penalty
// Layer l adds |S| / D, with p = m_c ⊙ m_s over its n columns: S = Σ_j |p[j]| (abs_terms) or Σ_j p[j];
// D = max(n, 1) (mean), times max(|m_c|·|m_s|, norm_eps) when norm_eps is given. The caller (specops/zip.py)
// maps each penalty kind to these arguments.

struct PenaltyMath {
  bool abs_terms, mean;
  std::optional<double> norm_eps;
};

// norm_eps^2 in acc_t (computed in double, as the Python kernel does).
template <typename acc_t>
acc_t eps2(const PenaltyMath& pm) {
  return static_cast<acc_t>(*pm.norm_eps * *pm.norm_eps);
}

template <typename acc_t>
struct LayerStats {
  acc_t S, nc, ns, D;  // S, |m_c|^2, |m_s|^2 (with norm_eps only), D
};

template <typename scalar_t, typename acc_t>
LayerStats<acc_t> layer_stats(const at::Tensor& mc, const at::Tensor& ms, const PenaltyMath& pm) {
  const scalar_t* a = mc.const_data_ptr<scalar_t>();
  const scalar_t* b = ms.const_data_ptr<scalar_t>();
  const int64_t n = mc.size(0), sa = mc.stride(0), sb = ms.stride(0);
  LayerStats<acc_t> st{0, 0, 0, pm.mean ? static_cast<acc_t>(std::max<int64_t>(n, 1)) : acc_t(1)};
  auto at_a = [&](int64_t j) { return static_cast<acc_t>(a[j * sa]); };
  auto at_b = [&](int64_t j) { return static_cast<acc_t>(b[j * sb]); };
  if (pm.abs_terms) {
    for (int64_t j = 0; j < n; ++j) st.S += std::abs(at_a(j) * at_b(j));
  } else {
    for (int64_t j = 0; j < n; ++j) st.S += at_a(j) * at_b(j);
  }
  if (pm.norm_eps.has_value()) {
    for (int64_t j = 0; j < n; ++j) {
      st.nc += at_a(j) * at_a(j);
      st.ns += at_b(j) * at_b(j);
    }
    st.D *= std::sqrt(std::max<acc_t>(st.nc * st.ns, eps2<acc_t>(pm)));
  }
  return st;
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

void check_lists(at::TensorList mc, at::TensorList ms) {
  TORCH_CHECK_VALUE(!mc.empty() && mc.size() == ms.size(), "m_c_list, m_s_list: expected equally long non-empty lists");
  for (size_t l = 0; l < mc.size(); ++l)
    TORCH_CHECK_VALUE(mc[l].dim() == 1 && ms[l].sizes() == mc[l].sizes() &&
                          mc[l].scalar_type() == mc[0].scalar_type() &&
                          ms[l].scalar_type() == mc[0].scalar_type(),
                      "m_s_list[", l, "]: expected a ", mc[0].scalar_type(), " vector of shape ",
                      mc[l].sizes(), ", got ", ms[l].sizes(), " ", ms[l].scalar_type());
}

at::Tensor merger_penalty_fwd_cpu(at::TensorList mc, at::TensorList ms, bool abs_terms, bool mean,
                                  std::optional<double> norm_eps) {
  check_lists(mc, ms);
  const PenaltyMath pm{abs_terms, mean, norm_eps};
  const int64_t L = static_cast<int64_t>(mc.size());
  const auto acc_type = mc[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({}, mc[0].options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mc[0].scalar_type(), "merger_penalty_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> per(L);
    at::parallel_for(0, L, layer_grain(mc), [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        const auto st = layer_stats<scalar_t, acc_t>(mc[l], ms[l], pm);
        per[l] = std::abs(st.S) / st.D;
      }
    });
    acc_t total = 0;
    for (int64_t l = 0; l < L; ++l) total += per[l];
    *out.mutable_data_ptr<acc_t>() = total;
  });
  return out;
}

// grad times d(|S| / D) per layer, written into the flat outputs at the layer's offset:
// sign(S) / D dS (dS/dm_c[j] = sign(p[j]) m_s[j], or m_s[j]) minus |S| / D^2 dD, where the norm factor
// gives dD/dm_c = D m_c / |m_c|^2 (zero where it is clamped at norm_eps).
std::tuple<at::Tensor, at::Tensor> merger_penalty_bwd_cpu(const at::Tensor& grad, at::TensorList mc,
                                                         at::TensorList ms, bool abs_terms, bool mean,
                                                         std::optional<double> norm_eps) {
  check_lists(mc, ms);
  const PenaltyMath pm{abs_terms, mean, norm_eps};
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
        const auto st = layer_stats<scalar_t, acc_t>(mc[l], ms[l], pm);
        const scalar_t* a = mc[l].const_data_ptr<scalar_t>();
        const scalar_t* b = ms[l].const_data_ptr<scalar_t>();
        const int64_t n = mc[l].size(0), sa = mc[l].stride(0), sb = ms[l].stride(0);
        // grad_c = w_j (m_s - kc m_c), grad_s = w_j (m_c - ks m_s)
        const acc_t w = gr * sgn(st.S) / st.D;
        acc_t kc = 0, ks = 0;
        if (pm.norm_eps.has_value() && st.nc * st.ns >= eps2<acc_t>(pm)) {
          kc = st.S / st.nc;
          ks = st.S / st.ns;
        }
        for (int64_t j = 0; j < n; ++j) {
          const acc_t x = static_cast<acc_t>(a[j * sa]), y = static_cast<acc_t>(b[j * sb]);
          const acc_t wj = pm.abs_terms ? w * sgn(x * y) : w;
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
  m.def(specops_zip::kFwdSchema);
  m.def(specops_zip::kBwdSchema);
  m.def("merger_penalty_fwd(Tensor[] m_c, Tensor[] m_s, bool abs_terms, bool mean, float? norm_eps) -> Tensor");
  m.def(
      "merger_penalty_bwd(Tensor grad, Tensor[] m_c, Tensor[] m_s, bool abs_terms, bool mean, float? norm_eps)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("zip_lora_linear_fwd", &specops_zip::fwd<Cpu>);
  m.impl("zip_lora_linear_bwd", &specops_zip::bwd<Cpu>);
  m.impl("merger_penalty_fwd", &merger_penalty_fwd_cpu);
  m.impl("merger_penalty_bwd", &merger_penalty_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
