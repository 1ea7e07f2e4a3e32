// Batched Cayley transform on the CPU for small matrices (OFT's and BOFT's blocks): Y = 2 M^{-1} - I with
// M = I - A/2, per matrix of an (..., n, n) stack, and its backward dA = H^T G H^T / 4 with H = I + Y.
//
// Forward: Gauss-Jordan elimination with partial pivoting on [M | I] in double, one matrix per task
// (several per task when they are small), in a per-thread scratch of 2 n^2 doubles: no LAPACK call and
// no batched factorisation, so the cost is 2 n^3 flops per matrix plus one read and one write. M's
// symmetric part is I for a skew A (x^T M x = |x|^2), so elimination is stable; pivoting keeps any
// other invertible A exact too. A zero pivot is a singular M: the first such matrix (in batch order) is
// reported. A non-finite matrix gives an all-NaN result for itself only.
// Backward: two n x n products per matrix in the accumulation type (fp32 for bf16 / fp16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace specops {
namespace cpu {
namespace {

// Y (n x n, row-major, of scalar_t) = 2 (I - A/2)^{-1} - I for A (n x n, row-major); false when
// I - A/2 is singular. W: 2 n^2 doubles of scratch.
template <typename scalar_t>
bool cayley_one(const scalar_t* A, scalar_t* Y, int64_t n, double* W) {
  const int64_t w = 2 * n;  // [M | I], row-major, w columns
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    double* row = W + i * w;
    for (int64_t j = 0; j < n; ++j) {
      const double a = static_cast<double>(A[i * n + j]);
      finite = finite && std::isfinite(a);
      row[j] = (i == j ? 1.0 : 0.0) - 0.5 * a;
      row[n + j] = i == j ? 1.0 : 0.0;
    }
  }
  if (!finite) {  // its own result only, all NaN (elimination could turn an Inf into a finite limit)
    std::fill(Y, Y + n * n, static_cast<scalar_t>(std::numeric_limits<double>::quiet_NaN()));
    return true;
  }
  for (int64_t c = 0; c < n; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (std::abs(W[r * w + c]) > std::abs(W[p * w + c])) p = r;
    if (W[p * w + c] == 0.0) return false;
    if (p != c) std::swap_ranges(W + c * w, W + c * w + w, W + p * w);
    double* pr = W + c * w;
    const double inv = 1.0 / pr[c];
    for (int64_t j = c; j < w; ++j) pr[j] *= inv;
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      double* rr = W + r * w;
      const double f = rr[c];
      if (f == 0.0) continue;
      for (int64_t j = c; j < w; ++j) rr[j] -= f * pr[j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Y[i * n + j] = static_cast<scalar_t>(2.0 * W[i * w + n + j] - (i == j ? 1.0 : 0.0));
  return true;
}

// Matrices per task: enough work (~64k flops) that a task outweighs its scheduling.
int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * n * n)); }

at::Tensor cayley_fwd_cpu(const at::Tensor& A_in) {
  TORCH_CHECK_VALUE(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2), "cayley: expected (..., n, n), got ",
                    A_in.sizes());
  const at::Tensor A = A_in.contiguous();
  at::Tensor Y = at::empty(A.sizes(), A.options());
  const int64_t n = A.size(-1), count = n ? A.numel() / (n * n) : 0;
  std::atomic<int64_t> singular{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "cayley_fwd", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain(n), [&](int64_t b0, int64_t b1) {
      std::vector<double> W(2 * n * n);
      for (int64_t b = b0; b < b1; ++b) {
        if (!cayley_one(a + b * n * n, y + b * n * n, n, W.data())) {
          int64_t seen = singular.load();
          while (b < seen && !singular.compare_exchange_weak(seen, b)) {
          }
        }
      }
    });
  });
  const int64_t bad = singular.load();
  TORCH_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(), "A: I - A/2 is singular for matrix ", bad,
                    " of the flattened batch ", A.sizes().slice(0, A.dim() - 2),
                    "; the Cayley transform needs it invertible (always so for skew-symmetric A)");
  return Y;
}

// dA = H^T G H^T / 4, H = I + Y, per matrix: T = H^T G, then T H^T.
at::Tensor cayley_bwd_cpu(const at::Tensor& G_in, const at::Tensor& Y_in) {
  TORCH_CHECK_VALUE(G_in.sizes() == Y_in.sizes() && G_in.scalar_type() == Y_in.scalar_type(),
                    "cayley_backward: grad ", G_in.sizes(), " ", G_in.scalar_type(), " does not match Y ",
                    Y_in.sizes(), " ", Y_in.scalar_type());
  const at::Tensor G = G_in.contiguous(), Y = Y_in.contiguous();
  at::Tensor dA = at::empty(Y.sizes(), Y.options());
  const int64_t n = Y.size(-1), count = n ? Y.numel() / (n * n) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Y.scalar_type(), "cayley_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const scalar_t* yv = Y.const_data_ptr<scalar_t>();
    scalar_t* out = dA.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain(n), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> H(n * n), T(n * n), R(n);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yb = yv + b * n * n;
        const scalar_t* gb = g + b * n * n;
        for (int64_t i = 0; i < n; ++i)  // H^T, row-major: Ht[i][j] = H[j][i]
          for (int64_t j = 0; j < n; ++j) H[i * n + j] = static_cast<acc_t>(yb[j * n + i]) + (i == j ? acc_t(1) : acc_t(0));
        std::fill(T.begin(), T.end(), acc_t(0));
        for (int64_t i = 0; i < n; ++i)  // T = H^T G
          for (int64_t k = 0; k < n; ++k) {
            const acc_t h = H[i * n + k];
            for (int64_t j = 0; j < n; ++j) T[i * n + j] += h * static_cast<acc_t>(gb[k * n + j]);
          }
        scalar_t* ob = out + b * n * n;
        for (int64_t i = 0; i < n; ++i) {  // dA = T H^T / 4
          std::fill(R.begin(), R.end(), acc_t(0));
          for (int64_t k = 0; k < n; ++k) {
            const acc_t t = T[i * n + k];
            for (int64_t j = 0; j < n; ++j) R[j] += t * H[k * n + j];
          }
          for (int64_t j = 0; j < n; ++j) ob[i * n + j] = static_cast<scalar_t>(acc_t(0.25) * R[j]);
        }
      }
    });
  });
  return dA;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("cayley_fwd(Tensor A) -> Tensor");
  m.def("cayley_bwd(Tensor grad, Tensor Y) -> Tensor");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("cayley_fwd", &cayley_fwd_cpu);
  m.impl("cayley_bwd", &cayley_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
