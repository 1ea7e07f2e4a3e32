// Scaled matmul C = A diag(s) B on the CPU and its fused backward (spectral shift, SVDiff / SODA).
//
// The GEMMs go through at::mm (MKL / oneDNN); what is ours is what surrounds them:
//  * forward: s is folded into the smaller of A (r, k) and B (k, c) in one vectorised pass (fp32
//    for bf16/fp16, rounded once), so no diag(s) matrix and no extra k x k product exist;
//  * backward, with G = dL/dC (r, c):
//      grad_B wanted: T = A^T G (k, c) once; one pass per row gives grad_s[i] = Σ_j T[i,j] B[i,j]
//                     and overwrites T with diag(s) T = grad_B (no second (k, c) buffer);
//      grad_A wanted: P = G B^T (r, k) once; one pass gives grad_s[i] = Σ_r P[r,i] A[r,i] (when
//                     not already known) and overwrites P with P diag(s) = grad_A;
//      only grad_s:   diag(A^T G B^T) is reduced over blocks of kb directions: each block's product
//                     (kb x c or r x kb, whichever is smaller) lives in one L2-sized scratch buffer
//                     and is reduced against B (or A) right away, so no (k, c) intermediate exists.
// Reductions run in the accumulation type (fp32 for bf16/fp16, fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "simd.h"

namespace specops {
namespace cpu {
namespace {

// Σ_j t[j] * b[j * sb] over n elements, t contiguous acc_t (vectorised when b is contiguous).
template <typename scalar_t, typename acc_t>
acc_t dot(const acc_t* t, const scalar_t* b, int64_t sb, int64_t n) {
  using V = Simd<acc_t>;
  constexpr int64_t W = V::kLanes;
  typename V::vec acc0{}, acc1{};
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sb == 1) {
      for (; j + 2 * W <= n; j += 2 * W) {
        acc0 += V::load(t + j) * V::load(b + j);
        acc1 += V::load(t + j + W) * V::load(b + j + W);
      }
    }
  }
  acc_t sum = V::sum(acc0 + acc1);
  for (; j < n; ++j) sum += t[j] * static_cast<acc_t>(b[j * sb]);
  return sum;
}

// T (rows x c, acc_t row-major): gs[i] = Σ_j T[i, j] B[i, j] (B with strides sbr, sbc; when
// gs != nullptr); then T[i, :] *= s[i] (when scale).
template <typename scalar_t, typename acc_t>
void rowdot_scale(acc_t* T, const scalar_t* B, int64_t sbr, int64_t sbc, const acc_t* s, int64_t rows,
                  int64_t c, acc_t* gs, bool scale) {
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* t = T + i * c;
      if (gs != nullptr) gs[i] = dot<scalar_t, acc_t>(t, B + i * sbr, sbc, c);
      if (scale) {
        const acc_t si = s[i];
        for (int64_t j = 0; j < c; ++j) t[j] *= si;
      }
    }
  });
}

// P (r x k, acc_t row-major): gs[i] = Σ_r P[r, i] A[r, i] (A with strides sar, sac; when
// gs != nullptr); then P[:, i] *= s[i] (when scale). Columns are split between threads.
template <typename scalar_t, typename acc_t>
void coldot_scale(acc_t* P, const scalar_t* A, int64_t sar, int64_t sac, const acc_t* s, int64_t r,
                  int64_t k, acc_t* gs, bool scale) {
  constexpr int64_t CB = 256;  // column block: the running sums stay in L1
  at::parallel_for(0, (k + CB - 1) / CB, 1, [&](int64_t b0, int64_t b1) {
    acc_t sums[CB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * CB, j1 = std::min(k, j0 + CB);
      std::fill(sums, sums + CB, acc_t(0));
      for (int64_t row = 0; row < r; ++row) {
        acc_t* p = P + row * k;
        const scalar_t* a = A + row * sar;
        if (gs != nullptr)
          for (int64_t j = j0; j < j1; ++j) sums[j - j0] += p[j] * static_cast<acc_t>(a[j * sac]);
        if (scale)
          for (int64_t j = j0; j < j1; ++j) p[j] *= s[j];
      }
      if (gs != nullptr) std::copy(sums, sums + (j1 - j0), gs + j0);
    }
  });
}

// dst (contiguous) = src diag(s) (rows=false: columns scaled) or diag(s) src (rows=true); src
// with any strides (LAPACK's factors are column-major), s contiguous.
template <typename scalar_t, typename acc_t>
void scale_copy(const at::Tensor& src, const at::Tensor& s, bool rows, at::Tensor& dst) {
  const int64_t R = src.size(0), C = src.size(1), sr = src.stride(0), sc = src.stride(1);
  const scalar_t* x = src.const_data_ptr<scalar_t>();
  const scalar_t* sv = s.const_data_ptr<scalar_t>();
  scalar_t* y = dst.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* xi = x + i * sr;
      scalar_t* yi = y + i * C;
      if (rows) {
        const acc_t si = static_cast<acc_t>(sv[i]);
        for (int64_t j = 0; j < C; ++j) yi[j] = static_cast<scalar_t>(static_cast<acc_t>(xi[j * sc]) * si);
      } else {
        for (int64_t j = 0; j < C; ++j)
          yi[j] = static_cast<scalar_t>(static_cast<acc_t>(xi[j * sc]) * static_cast<acc_t>(sv[j]));
      }
    }
  });
}

void check(const at::Tensor& A, const at::Tensor& s, const at::Tensor& B) {
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2 && s.dim() == 1 && A.size(1) == s.size(0) &&
                        B.size(0) == s.size(0),
                    "scaled_matmul: expected A (r, k), s (k), B (k, c); got A ", A.sizes(), ", s ",
                    s.sizes(), ", B ", B.sizes());
  TORCH_CHECK_VALUE(A.scalar_type() == s.scalar_type() && A.scalar_type() == B.scalar_type(),
                    "scaled_matmul: A, s and B must share a dtype");
}

at::Tensor scaled_matmul_fwd_cpu(const at::Tensor& A, const at::Tensor& s, const at::Tensor& B) {
  check(A, s, B);
  const bool scale_a = A.size(0) <= B.size(1);  // fold s into the smaller operand
  const at::Tensor& src = scale_a ? A : B;
  const at::Tensor sc = s.contiguous();
  at::Tensor scaled = at::empty(src.sizes(), src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "scaled_matmul_fwd", [&] {
    scale_copy<scalar_t, at::opmath_type<scalar_t>>(src, sc, !scale_a, scaled);
  });
  return scale_a ? at::mm(scaled, B) : at::mm(A, scaled);
}

template <typename scalar_t>
void backward(const at::Tensor& G, const at::Tensor& A, const at::Tensor& s, const at::Tensor& B,
              bool need_A, bool need_s, bool need_B, at::Tensor& gA, at::Tensor& gs,
              at::Tensor& gB) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t r = A.size(0), k = A.size(1), c = B.size(1);
  const at::Tensor s_acc = s.to(acc_type).contiguous();
  const acc_t* sp = s_acc.const_data_ptr<acc_t>();
  at::Tensor gs_acc = at::zeros({k}, s_acc.options());
  acc_t* gsp = need_s ? gs_acc.mutable_data_ptr<acc_t>() : nullptr;
  const bool low = acc_type != A.scalar_type();
  // Products in the input dtype (oneDNN accumulates bf16 in fp32) and reduced in acc_t.
  auto product = [&](const at::Tensor& x, const at::Tensor& y) {
    return low ? at::mm(x, y).to(acc_type) : at::mm(x, y).contiguous();
  };
  if (need_B) {
    at::Tensor T = product(A.t(), G);  // (k, c)
    rowdot_scale<scalar_t, acc_t>(T.mutable_data_ptr<acc_t>(), B.const_data_ptr<scalar_t>(), B.stride(0),
                                  B.stride(1), sp, k, c, gsp, true);
    gB = T.to(A.scalar_type());
    gsp = nullptr;  // grad_s is known
  }
  if (need_A) {
    at::Tensor P = product(G, B.t());  // (r, k)
    coldot_scale<scalar_t, acc_t>(P.mutable_data_ptr<acc_t>(), A.const_data_ptr<scalar_t>(), A.stride(0),
                                  A.stride(1), sp, r, k, gsp, true);
    gA = P.to(A.scalar_type());
    gsp = nullptr;
  }
  if (gsp != nullptr) {
    // Only grad_s: blocks of kb directions, the smaller orientation, one reused scratch block.
    const bool rows_t = c <= r;  // T block (kb x c) when c <= r, else P block (r x kb)
    const int64_t width = rows_t ? c : r;
    const int64_t budget = (1 << 20) / static_cast<int64_t>(sizeof(acc_t));  // ~1 MiB per block
    const int64_t kb = std::min(k, std::max<int64_t>(64, (budget / std::max<int64_t>(width, 1)) / 16 * 16));
    at::Tensor buf = at::empty({rows_t ? kb * c : r * kb}, G.options());
    for (int64_t i0 = 0; i0 < k; i0 += kb) {
      const int64_t nb = std::min(kb, k - i0);
      if (rows_t) {
        at::Tensor blk = buf.narrow(0, 0, nb * c).view({nb, c});
        at::mm_out(blk, A.narrow(1, i0, nb).t(), G);
        at::Tensor t = low ? blk.to(acc_type) : blk;
        rowdot_scale<scalar_t, acc_t>(t.mutable_data_ptr<acc_t>(),
                                      B.const_data_ptr<scalar_t>() + i0 * B.stride(0), B.stride(0),
                                      B.stride(1), sp + i0, nb, c, gsp + i0, false);
      } else {
        at::Tensor blk = buf.narrow(0, 0, r * nb).view({r, nb});
        at::mm_out(blk, G, B.narrow(0, i0, nb).t());
        at::Tensor p = low ? blk.to(acc_type) : blk;
        coldot_scale<scalar_t, acc_t>(p.mutable_data_ptr<acc_t>(),
                                      A.const_data_ptr<scalar_t>() + i0 * A.stride(1), A.stride(0),
                                      A.stride(1), sp + i0, r, nb, gsp + i0, false);
      }
    }
  }
  if (need_s) gs = gs_acc.to(A.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scaled_matmul_bwd_cpu(const at::Tensor& G,
                                                                     const at::Tensor& A,
                                                                     const at::Tensor& s,
                                                                     const at::Tensor& B, bool need_A,
                                                                     bool need_s, bool need_B) {
  check(A, s, B);
  TORCH_CHECK_VALUE(G.dim() == 2 && G.size(0) == A.size(0) && G.size(1) == B.size(1) &&
                        G.scalar_type() == A.scalar_type(),
                    "grad: expected a (", A.size(0), ", ", B.size(1), ") ", A.scalar_type(),
                    " tensor, got ", G.sizes(), " ", G.scalar_type());
  at::Tensor gA = at::empty({0}, A.options()), gs = at::empty({0}, A.options()),
             gB = at::empty({0}, A.options());
  if (!(need_A || need_s || need_B)) return {gA, gs, gB};
  // G only feeds at::mm, which takes any strides: no copy (the weight gradient of F.linear
  // arrives transposed, and a copy would cost one more (out, in) buffer at the backward's peak).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "scaled_matmul_bwd", [&] {
    backward<scalar_t>(G, A, s, B, need_A, need_s, need_B, gA, gs, gB);
  });
  return {gA, gs, gB};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("scaled_matmul_fwd(Tensor A, Tensor s, Tensor B) -> Tensor");
  m.def(
      "scaled_matmul_bwd(Tensor grad, Tensor A, Tensor s, Tensor B, bool need_A, bool need_s, "
      "bool need_B) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("scaled_matmul_fwd", &scaled_matmul_fwd_cpu);
  m.impl("scaled_matmul_bwd", &scaled_matmul_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
