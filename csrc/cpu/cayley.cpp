// Batched Cayley transform on the CPU: Y = 2 M^{-1} - I with M = I - A/2, per matrix of an (..., n, n)
// stack, and its backward dA = H^T G H^T / 4 with H = I + Y. No LAPACK call and no batched factorisation.
//
// Forward, per matrix, by its own entries (so no matrix's path depends on the others):
// - exactly skew and finite, n > kLeafN: 2 x 2 block inversion, M^{-1} from M11^{-1} and the Schur
//   complement S = M22 - M21 M11^{-1} M12, recursively, with batched GEMMs in the compute type (fp32 for
//   fp32 / bf16 / fp16): 2 n^3 flops, most of them in GEMMs. No pivoting is needed: M's symmetric part is
//   I (x^T M x = |x|^2), so every leading block and every Schur complement has a positive-definite
//   symmetric part and is invertible with bounded growth.
// - otherwise, and for the blocks at the leaves: Gauss-Jordan elimination with partial pivoting on
//   [M | I] in double, in a per-thread scratch of 2 n^2 doubles (exact for any invertible A). A zero pivot
//   is a singular M: the first such matrix (in batch order) is reported. A non-finite matrix gives an
//   all-NaN result for itself only.
// Backward: two n x n products per matrix in the accumulation type, as loops for small n, else batched GEMMs.
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

constexpr int64_t kLeafN = 32;  // block inversion above this size (per-matrix elimination is faster below)
constexpr int64_t kLoopN = 16;  // backward: loops up to this size, batched GEMMs above

// Gauss-Jordan with partial pivoting on W = [M | I] (n x 2n, row-major): W's right half becomes M^{-1};
// false when M is singular.
bool gauss_jordan(double* W, int64_t n) {
  const int64_t w = 2 * n;
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
  return true;
}

// Out = a M^{-1} + b I for one n x n row-major matrix M = I - A/2 (cayley: a = 2, b = -1, from A) or
// M itself (inverse: a = 1, b = 0); false when M is singular. A non-finite input gives all NaN.
template <typename in_t, typename out_t>
bool invert_one(const in_t* in, out_t* Out, int64_t n, bool from_A, double a, double b, double* W) {
  const int64_t w = 2 * n;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double v = static_cast<double>(in[i * n + j]);
      finite = finite && std::isfinite(v);
      W[i * w + j] = from_A ? (i == j ? 1.0 : 0.0) - 0.5 * v : v;
      W[i * w + n + j] = i == j ? 1.0 : 0.0;
    }
  if (!finite) {  // its own result only (elimination could turn an Inf into a finite limit)
    std::fill(Out, Out + n * n, static_cast<out_t>(std::numeric_limits<double>::quiet_NaN()));
    return true;
  }
  if (!gauss_jordan(W, n)) return false;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Out[i * n + j] = static_cast<out_t>(a * W[i * w + n + j] + (i == j ? b : 0.0));
  return true;
}

// Matrices per task: enough work (~64k flops) that a task outweighs its scheduling.
int64_t grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * n * n)); }

// M^{-1} for a contiguous (B, n, n) stack of matrices with a positive-definite symmetric part.
at::Tensor block_inverse(const at::Tensor& M) {
  const int64_t count = M.size(0), n = M.size(1);
  if (n <= kLeafN) {
    at::Tensor out = at::empty_like(M);
    AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "cayley_leaf", [&] {
      const scalar_t* m = M.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, count, grain(n), [&](int64_t b0, int64_t b1) {
        std::vector<double> W(2 * n * n);
        for (int64_t b = b0; b < b1; ++b) invert_one(m + b * n * n, o + b * n * n, n, false, 1.0, 0.0, W.data());
      });
    });
    return out;
  }
  const int64_t h = n / 2, k = n - h;
  const at::Tensor top = M.narrow(1, 0, h), bottom = M.narrow(1, h, k);
  const at::Tensor M12 = top.narrow(2, h, k), M21 = bottom.narrow(2, 0, h);
  const at::Tensor i11 = block_inverse(top.narrow(2, 0, h).contiguous());
  const at::Tensor X = at::bmm(i11, M12), Yt = at::bmm(M21, i11);  // M11^{-1} M12, M21 M11^{-1}
  const at::Tensor iS = block_inverse(at::baddbmm(bottom.narrow(2, h, k), M21, X, 1, -1));
  const at::Tensor XiS = at::bmm(X, iS);
  at::Tensor out = at::empty_like(M);
  out.narrow(1, 0, h).narrow(2, 0, h).copy_(at::baddbmm(i11, XiS, Yt));
  out.narrow(1, 0, h).narrow(2, h, k).copy_(XiS).neg_();
  out.narrow(1, h, k).narrow(2, 0, h).copy_(at::bmm(iS, Yt)).neg_();
  out.narrow(1, h, k).narrow(2, h, k).copy_(iS);
  return out;
}

at::Tensor cayley_fwd_cpu(const at::Tensor& A_in) {
  TORCH_CHECK_VALUE(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2), "cayley: expected (..., n, n), got ",
                    A_in.sizes());
  const at::Tensor A = A_in.contiguous();
  at::Tensor Y = at::empty(A.sizes(), A.options());
  const int64_t n = A.size(-1), count = n ? A.numel() / (n * n) : 0;
  std::vector<char> blocked(count, 0);  // exactly skew and finite, n > kLeafN
  std::atomic<int64_t> singular{std::numeric_limits<int64_t>::max()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "cayley_fwd", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, count, grain(n), [&](int64_t b0, int64_t b1) {
      std::vector<double> W;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* ab = a + b * n * n;
        bool skew = n > kLeafN;
        for (int64_t i = 0; i < n && skew; ++i)
          for (int64_t j = i; j < n && skew; ++j)
            skew = std::isfinite(static_cast<double>(ab[i * n + j])) && ab[i * n + j] == -ab[j * n + i];
        if (skew) {
          blocked[b] = 1;
          continue;
        }
        W.resize(2 * n * n);
        if (!invert_one(ab, y + b * n * n, n, true, 2.0, -1.0, W.data())) {
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
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < count; ++b)
    if (blocked[b]) rows.push_back(b);
  if (!rows.empty()) {
    const at::Tensor flat = A.view({count, n, n}), Yf = Y.view({count, n, n});
    const bool all = static_cast<int64_t>(rows.size()) == count;
    const at::Tensor idx = at::tensor(rows, A.options().dtype(at::kLong));
    const at::Tensor As = (all ? flat : flat.index_select(0, idx)).to(at::toOpMathType(A.scalar_type()));
    const at::Tensor I = at::eye(n, As.options());
    const at::Tensor Yb = (2.0 * block_inverse(I - 0.5 * As) - I).to(A.scalar_type());
    if (all) {
      Yf.copy_(Yb);
    } else {
      Yf.index_copy_(0, idx, Yb);
    }
  }
  return Y;
}

// dA = H^T G H^T / 4, H = I + Y, per matrix: T = H^T G, then T H^T.
at::Tensor cayley_bwd_cpu(const at::Tensor& G_in, const at::Tensor& Y_in) {
  TORCH_CHECK_VALUE(G_in.sizes() == Y_in.sizes() && G_in.scalar_type() == Y_in.scalar_type(),
                    "cayley_backward: grad ", G_in.sizes(), " ", G_in.scalar_type(), " does not match Y ",
                    Y_in.sizes(), " ", Y_in.scalar_type());
  const at::Tensor G = G_in.contiguous(), Y = Y_in.contiguous();
  const int64_t n = Y.size(-1), count = n ? Y.numel() / (n * n) : 0;
  if (n > kLoopN) {
    const auto acc = at::toOpMathType(Y.scalar_type());
    const at::Tensor Ht = (Y.view({count, n, n}).to(acc) + at::eye(n, Y.options().dtype(acc))).transpose(1, 2);
    return (0.25 * at::bmm(at::bmm(Ht, G.view({count, n, n}).to(acc)), Ht)).to(Y.scalar_type()).view(Y.sizes());
  }
  at::Tensor dA = at::empty(Y.sizes(), Y.options());
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
