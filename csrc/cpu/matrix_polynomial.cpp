// Matrix polynomial P(A) = sum_k c_k A^k (c_0 multiplies I) per matrix of an (..., n, n) stack, and its
// backward, on the CPU: the truncated Neumann series of the Cayley transform that PEFT's OFT uses on
// thousands of tiny blocks per model, where a chain of batched GEMMs costs far more than its flops.
//
// Horner's scheme, degree d: H_d = c_d I, H_k = c_k I + A H_{k+1}, P = H_0 (d - 1 products; A H_d is
// c_d A). Backward from G = dP: with dH_0 = G, dA = sum_{k<d} dH_k H_{k+1}^T and dH_{k+1} = A^T dH_k,
// H_1 .. H_{d-1} recomputed from A. Accumulation in the op-math type (fp32 for bf16 / fp16).
// n <= kLoopN: per-matrix loops in a thread's scratch; larger n: batched GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace specops {
namespace cpu {
namespace {

constexpr int64_t kLoopN = 16;  // loops up to this size, batched GEMMs above

void check(const at::Tensor& A, at::ArrayRef<double> c, const char* name) {
  TORCH_CHECK_VALUE(A.dim() >= 2 && A.size(-1) == A.size(-2), name, ": expected (..., n, n), got ", A.sizes());
  TORCH_CHECK_VALUE(!c.empty(), name, ": expected at least one coefficient");
}

// Matrices per task: ~64k flops of work per task, as the other per-matrix kernels.
int64_t grain(int64_t n, int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d * n * n * n)); }

// Out = A B (row-major n x n), or Out = A^T B with `at`.
template <typename t>
void product(const t* A, const t* B, t* Out, int64_t n, bool at) {
  std::fill(Out, Out + n * n, t(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < n; ++k) {
      const t a = at ? A[k * n + i] : A[i * n + k];
      for (int64_t j = 0; j < n; ++j) Out[i * n + j] += a * B[k * n + j];
    }
}

// H = c I + s A (the first Horner step, no product)
template <typename t>
void affine(const t* A, t* H, int64_t n, double c, double s) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) H[i * n + j] = t(s) * A[i * n + j] + (i == j ? t(c) : t(0));
}

template <typename t>
void add_diag(t* H, int64_t n, double c) {
  for (int64_t i = 0; i < n; ++i) H[i * n + i] += t(c);
}

// The batched form for n > kLoopN: P(A) by Horner with bmm, (count, n, n) in the op-math type.
at::Tensor horner(const at::Tensor& A, at::ArrayRef<double> c, std::vector<at::Tensor>* steps) {
  const int64_t d = static_cast<int64_t>(c.size()) - 1, n = A.size(-1);
  const at::Tensor I = at::eye(n, A.options());
  at::Tensor H = c[d] * I.expand(A.sizes());
  if (d == 0) return H.contiguous();
  H = c[d] * A + c[d - 1] * I;
  for (int64_t k = d - 2; k >= 0; --k) {
    if (steps) steps->push_back(H);
    H = at::baddbmm(I.expand(A.sizes()), A, H, c[k], 1);
  }
  return H;
}

at::Tensor polynomial_fwd_cpu(const at::Tensor& A_in, at::ArrayRef<double> c) {
  check(A_in, c, "matrix_polynomial");
  const at::Tensor A = A_in.contiguous();
  const int64_t n = A.size(-1), count = n ? A.numel() / (n * n) : 0, d = static_cast<int64_t>(c.size()) - 1;
  if (n > kLoopN) {
    const auto acc = at::toOpMathType(A.scalar_type());
    return horner(A.view({count, n, n}).to(acc), c, nullptr).to(A.scalar_type()).view(A.sizes());
  }
  at::Tensor P = at::empty(A.sizes(), A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "matrix_polynomial", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* out = P.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain(n, d), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> Am(n * n), H(n * n), T(n * n);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < n * n; ++i) Am[i] = static_cast<acc_t>(a[b * n * n + i]);
        if (d == 0) {
          affine(Am.data(), H.data(), n, c[0], 0.0);
        } else {
          affine(Am.data(), H.data(), n, c[d - 1], c[d]);
          for (int64_t k = d - 2; k >= 0; --k) {
            product(Am.data(), H.data(), T.data(), n, false);
            add_diag(T.data(), n, c[k]);
            std::swap(H, T);
          }
        }
        for (int64_t i = 0; i < n * n; ++i) out[b * n * n + i] = static_cast<scalar_t>(H[i]);
      }
    });
  });
  return P;
}

at::Tensor polynomial_bwd_cpu(const at::Tensor& G_in, const at::Tensor& A_in, at::ArrayRef<double> c) {
  check(A_in, c, "matrix_polynomial_backward");
  TORCH_CHECK_VALUE(G_in.sizes() == A_in.sizes() && G_in.scalar_type() == A_in.scalar_type(),
                    "matrix_polynomial_backward: grad ", G_in.sizes(), " ", G_in.scalar_type(),
                    " does not match A ", A_in.sizes(), " ", A_in.scalar_type());
  const at::Tensor A = A_in.contiguous(), G = G_in.contiguous();
  const int64_t n = A.size(-1), count = n ? A.numel() / (n * n) : 0, d = static_cast<int64_t>(c.size()) - 1;
  if (d == 0) return at::zeros_like(A);
  if (n > kLoopN) {
    const auto acc = at::toOpMathType(A.scalar_type());
    const at::Tensor Af = A.view({count, n, n}).to(acc);
    std::vector<at::Tensor> H;  // H_{d-1} .. H_1
    horner(Af, c, &H);
    // dH_k = (A^T)^k G, walked upwards; H_{k+1} = H[d - 2 - k]
    at::Tensor dH = G.view({count, n, n}).to(acc), dA = at::zeros_like(Af);
    for (int64_t k = 0; k < d; ++k) {
      if (k + 1 < d) {
        dA.baddbmm_(dH, H[d - 2 - k].transpose(1, 2));
        dH = at::bmm(Af.transpose(1, 2), dH);
      } else {
        dA.add_(dH, c[d]);
      }
    }
    return dA.to(A.scalar_type()).view(A.sizes());
  }
  at::Tensor dA = at::empty(A.sizes(), A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "matrix_polynomial_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* out = dA.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain(n, 3 * d), [&](int64_t b0, int64_t b1) {
      const int64_t nn = n * n;
      // H holds H_1 .. H_{d-1} (H_k at (k - 1) n^2), then dH, its next value, the product and dA
      std::vector<acc_t> Am(nn), H(std::max<int64_t>(d - 1, 1) * nn), dH(nn), nx(nn), T(nn), D(nn);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < nn; ++i) {
          Am[i] = static_cast<acc_t>(a[b * nn + i]);
          dH[i] = static_cast<acc_t>(g[b * nn + i]);
        }
        if (d >= 2) {
          affine(Am.data(), H.data() + (d - 2) * nn, n, c[d - 1], c[d]);
          for (int64_t k = d - 2; k >= 1; --k) {
            product(Am.data(), H.data() + k * nn, H.data() + (k - 1) * nn, n, false);
            add_diag(H.data() + (k - 1) * nn, n, c[k]);
          }
        }
        std::fill(D.begin(), D.end(), acc_t(0));
        for (int64_t k = 0; k < d; ++k) {
          if (k + 1 < d) {
            const acc_t* Hn = H.data() + k * nn;  // H_{k+1}
            for (int64_t i = 0; i < n; ++i)  // D += dH H_{k+1}^T
              for (int64_t j = 0; j < n; ++j) {
                acc_t s = 0;
                for (int64_t l = 0; l < n; ++l) s += dH[i * n + l] * Hn[j * n + l];
                D[i * n + j] += s;
              }
            product(Am.data(), dH.data(), nx.data(), n, true);
            std::swap(dH, nx);
          } else {
            for (int64_t i = 0; i < nn; ++i) D[i] += acc_t(c[d]) * dH[i];
          }
        }
        for (int64_t i = 0; i < nn; ++i) out[b * nn + i] = static_cast<scalar_t>(D[i]);
      }
    });
  });
  return dA;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("matrix_polynomial_fwd(Tensor A, float[] coeffs) -> Tensor");
  m.def("matrix_polynomial_bwd(Tensor grad, Tensor A, float[] coeffs) -> Tensor");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("matrix_polynomial_fwd", &polynomial_fwd_cpu);
  m.impl("matrix_polynomial_bwd", &polynomial_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
