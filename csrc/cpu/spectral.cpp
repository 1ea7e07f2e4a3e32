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
//
// Low-rank linear out = y + ((x A^T) diag(s)) B^T, A (r, n), B (m, r), r small (AdaLoRA's and LoRA's
// update on its base layer's output), fp32 / fp64. At r <= 64 a library GEMM of these shapes (one
// dimension r) runs far below the machine's FMA rate (measured 3-80 GFLOP/s, non-monotonic in r,
// against 115 for a square GEMM on an AVX2 EPYC), and the two GEMMs, the scaling and the add each
// make their own pass over a (T, n) or (T, m) operand. Here one pass per block of rows does all of
// it while the rows are in cache, with register tiles whose work is proportional to r:
//  * forward: h = x_blk A^T (row dot products), out_blk = y_blk + h (diag(s) B^T);
//  * backward, G = dL/dout: u = G_blk B, h = x_blk A^T (recomputed from the rows already read),
//    grad_s += colsum(u ⊙ h), grad_B^T += h^T G_blk, g = u diag(s), grad_x_blk = g A,
//    grad_A += g^T x_blk; G and x are each read once, grad_x written once; the (r, n) and (r, m)
//    accumulators are per thread and summed at the end. grad_y is G itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

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


// ----------------------------------------------------------------------------- low-rank linear

constexpr int64_t kLowrankRows = 32;  // rows per block: x, y and G rows of a block stay in L2

// Blocks per task: ~32k multiply-adds (a block row costs r (n + m)), so a small layer's call stays on one
// thread instead of paying a parallel region for a few microseconds of work.
inline int64_t block_grain(int64_t r, int64_t n, int64_t m) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kLowrankRows * r * (n + m)));
}

// H[i, j] = Σ_k X[i, k] A[j, k] for R rows of X (stride ldx) and J rows of A (stride n).
template <typename T, int R, int J>
inline void dots_tile(const T* X, int64_t ldx, const T* A, int64_t n, T* H, int64_t ldh) {
  using V = Simd<T>;
  constexpr int64_t W = V::kLanes;
  typename V::vec acc[R][J] = {};
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    typename V::vec a[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) a[j] = V::load(A + j * n + k);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const typename V::vec xv = V::load(X + i * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc[i][j] += xv * a[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) {
      T sum = V::sum(acc[i][j]);
      for (int64_t kk = k; kk < n; ++kk) sum += X[i * ldx + kk] * A[j * n + kk];
      H[i * ldh + j] = sum;
    }
}

// f(std::integral_constant<int, k>) for the runtime count 1 <= k <= K: the tail of a register tile.
template <int K, typename F>
inline void with_count(int64_t k, F&& f) {
  if constexpr (K > 0) {
    if (k == K)
      f(std::integral_constant<int, K>{});
    else
      with_count<K - 1>(k, f);
  }
}

// Register tiles (rows x columns of accumulators): 8 to 12 vectors, so the FMA latency is hidden
// within AVX2's 16 registers.
constexpr int kDotRows = 4, kDotCols = 2, kAxpyRows = 4, kOuterRows = 4;

template <typename T, int R>
inline void dots_rows(const T* X, int64_t ldx, const T* A, int64_t r, int64_t n, T* H) {
  int64_t j = 0;
  for (; j + kDotCols <= r; j += kDotCols) dots_tile<T, R, kDotCols>(X, ldx, A + j * n, n, H + j, r);
  with_count<kDotCols - 1>(r - j, [&](auto J) { dots_tile<T, R, J>(X, ldx, A + j * n, n, H + j, r); });
}

// H (rows, r) = X A^T: row tiles, so each tile's rows stay in L1 while A streams from L2.
template <typename T>
void dots(const T* X, int64_t ldx, int64_t rows, const T* A, int64_t r, int64_t n, T* H) {
  int64_t i = 0;
  for (; i + kDotRows <= rows; i += kDotRows) dots_rows<T, kDotRows>(X + i * ldx, ldx, A, r, n, H + i * r);
  with_count<kDotRows - 1>(rows - i, [&](auto R) { dots_rows<T, R>(X + i * ldx, ldx, A, r, n, H + i * r); });
}

// Out[i, o] = (Y ? Y[i, o] : 0) + Σ_j H[i, j] Bt[j, o] for R rows and C vectors of columns at o.
template <typename T, int R, int C>
inline void axpy_tile(const T* H, int64_t r, const T* Bt, int64_t m, const T* Y, int64_t ldy, T* Out,
                      int64_t ldo, int64_t o) {
  using V = Simd<T>;
  constexpr int64_t W = V::kLanes;
  typename V::vec acc[R][C] = {};
  if (Y != nullptr)
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = V::load(Y + i * ldy + o + c * W);
  for (int64_t j = 0; j < r; ++j) {
    typename V::vec b[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) b[c] = V::load(Bt + j * m + o + c * W);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const T h = H[i * r + j];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[i][c] += h * b[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) V::store(Out + i * ldo + o + c * W, acc[i][c]);
}

template <typename T, int R>
inline void axpy_rows(const T* H, int64_t r, const T* Bt, int64_t m, const T* Y, int64_t ldy, T* Out,
                      int64_t ldo) {
  constexpr int64_t W = Simd<T>::kLanes;
  int64_t o = 0;
  for (; o + 2 * W <= m; o += 2 * W) axpy_tile<T, R, 2>(H, r, Bt, m, Y, ldy, Out, ldo, o);
  for (; o + W <= m; o += W) axpy_tile<T, R, 1>(H, r, Bt, m, Y, ldy, Out, ldo, o);
  for (; o < m; ++o)
    for (int i = 0; i < R; ++i) {
      T sum = Y != nullptr ? Y[i * ldy + o] : T(0);
      for (int64_t j = 0; j < r; ++j) sum += H[i * r + j] * Bt[j * m + o];
      Out[i * ldo + o] = sum;
    }
}

// Out (rows, m) = Y + H Bt (Y == nullptr: H Bt), H (rows, r), Bt (r, m) contiguous.
template <typename T>
void axpy(const T* H, int64_t rows, int64_t r, const T* Bt, int64_t m, const T* Y, int64_t ldy, T* Out,
          int64_t ldo) {
  auto run = [&](auto R, int64_t i) {
    axpy_rows<T, R>(H + i * r, r, Bt, m, Y != nullptr ? Y + i * ldy : nullptr, ldy, Out + i * ldo, ldo);
  };
  int64_t i = 0;
  for (; i + kAxpyRows <= rows; i += kAxpyRows) run(std::integral_constant<int, kAxpyRows>{}, i);
  with_count<kAxpyRows - 1>(rows - i, [&](auto R) { run(R, i); });
}

// Acc[j, o] += Σ_i H[i, j] Y[i, o] over `rows` rows, for J rows of Acc (from j) and C vectors at o.
template <typename T, int J, int C>
inline void outer_tile(const T* H, int64_t rows, int64_t r, int64_t j0, const T* Y, int64_t ldy, T* Acc,
                       int64_t m, int64_t o) {
  using V = Simd<T>;
  constexpr int64_t W = V::kLanes;
  typename V::vec acc[J][C];
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = V::load(Acc + (j0 + j) * m + o + c * W);
  for (int64_t i = 0; i < rows; ++i) {
    typename V::vec y[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) y[c] = V::load(Y + i * ldy + o + c * W);
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      const T h = H[i * r + j0 + j];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[j][c] += h * y[c];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) V::store(Acc + (j0 + j) * m + o + c * W, acc[j][c]);
}

template <typename T, int C>
inline void outer_cols(const T* H, int64_t rows, int64_t r, const T* Y, int64_t ldy, T* Acc, int64_t m,
                       int64_t o) {
  int64_t j = 0;
  for (; j + kOuterRows <= r; j += kOuterRows) outer_tile<T, kOuterRows, C>(H, rows, r, j, Y, ldy, Acc, m, o);
  with_count<kOuterRows - 1>(r - j, [&](auto J) { outer_tile<T, J, C>(H, rows, r, j, Y, ldy, Acc, m, o); });
}

// Acc (r, m) += H^T Y, H (rows, r), Y (rows, m) with row stride ldy: column strips of Y stay in L1
// while every group of Acc rows is updated from them.
template <typename T>
void outer(const T* H, int64_t rows, int64_t r, const T* Y, int64_t ldy, T* Acc, int64_t m) {
  constexpr int64_t W = Simd<T>::kLanes;
  int64_t o = 0;
  for (; o + 2 * W <= m; o += 2 * W) outer_cols<T, 2>(H, rows, r, Y, ldy, Acc, m, o);
  for (; o + W <= m; o += W) outer_cols<T, 1>(H, rows, r, Y, ldy, Acc, m, o);
  for (; o < m; ++o)
    for (int64_t j = 0; j < r; ++j) {
      T sum = 0;
      for (int64_t i = 0; i < rows; ++i) sum += H[i * r + j] * Y[i * ldy + o];
      Acc[j * m + o] += sum;
    }
}

void check_lowrank(const at::Tensor& x, const at::Tensor& A, const at::Tensor& s, const at::Tensor& B) {
  TORCH_CHECK_VALUE(x.dim() == 2 && A.dim() == 2 && s.dim() == 1 && B.dim() == 2 && A.size(1) == x.size(1) &&
                        s.size(0) == A.size(0) && B.size(1) == A.size(0),
                    "lowrank_linear: expected x (T, n), A (r, n), s (r), B (m, r); got x ", x.sizes(), ", A ",
                    A.sizes(), ", s ", s.sizes(), ", B ", B.sizes());
  for (const at::Tensor* t : {&A, &s, &B})
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), "lowrank_linear: x, A, s and B must share a dtype");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "lowrank_linear (cpp): float32 or float64 only");
}

// Rows with unit column stride (a copy only for inputs that lack it).
at::Tensor rows_of(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// out = y + ((x A^T) diag(s)) B^T by row blocks; out may be y itself (each tile is read before it is written).
void lowrank_rows(const at::Tensor& x, const at::Tensor& A, const at::Tensor& s, const at::Tensor& B,
                  const at::Tensor& y, at::Tensor& out) {
  const at::Tensor Ac = A.contiguous(), Bts = (B.t() * s.unsqueeze(1)).contiguous();  // diag(s) B^T (r, m)
  const int64_t T = x.size(0), n = x.size(1), r = A.size(0), m = B.size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_linear_fwd", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t *ap = Ac.const_data_ptr<scalar_t>(), *bp = Bts.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (T + kLowrankRows - 1) / kLowrankRows;
    at::parallel_for(0, blocks, block_grain(r, n, m), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> H(kLowrankRows * r);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * kLowrankRows, rows = std::min(kLowrankRows, T - t0);
        dots(xp + t0 * x.stride(0), x.stride(0), rows, ap, r, n, H.data());
        axpy(H.data(), rows, r, bp, m, yp + t0 * y.stride(0), y.stride(0), op + t0 * out.stride(0), out.stride(0));
      }
    });
  });
}

at::Tensor lowrank_linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& s,
                                  const at::Tensor& B, const at::Tensor& y_in) {
  check_lowrank(x_in, A, s, B);
  TORCH_CHECK_VALUE(y_in.dim() == 2 && y_in.size(0) == x_in.size(0) && y_in.size(1) == B.size(0) &&
                        y_in.scalar_type() == x_in.scalar_type(),
                    "lowrank_linear: y must be (", x_in.size(0), ", ", B.size(0), ") of x's dtype, got ",
                    y_in.sizes());
  const at::Tensor x = rows_of(x_in), y = rows_of(y_in);
  at::Tensor out = at::empty({x.size(0), B.size(0)}, x.options());
  lowrank_rows(x, A, s, B, y, out);
  return out;
}

void check_base(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == x.size(1) && W.scalar_type() == x.scalar_type(),
                    "lora_linear: expected W (m, ", x.size(1), ") of x's dtype, got ", W.sizes());
  TORCH_CHECK_VALUE(!bias || (bias->dim() == 1 && bias->size(0) == W.size(0) && bias->scalar_type() == x.scalar_type()),
                    "lora_linear: expected bias (", W.size(0), ") of x's dtype");
}

// x W^T + bias + ((x A^T) diag(s)) B^T: the base GEMM allocates the output, the update is added into it.
at::Tensor lora_linear_fwd_cpu(const at::Tensor& x_in, const at::Tensor& W, const std::optional<at::Tensor>& bias,
                               const at::Tensor& A, const at::Tensor& s, const at::Tensor& B) {
  check_lowrank(x_in, A, s, B);
  check_base(x_in, W, bias);
  TORCH_CHECK_VALUE(B.size(0) == W.size(0), "lora_linear: B has ", B.size(0), " rows, W ", W.size(0));
  const at::Tensor x = rows_of(x_in);
  at::Tensor out = bias ? at::addmm(*bias, x, W.t()) : at::mm(x, W.t());
  lowrank_rows(x, A, s, B, out, out);
  return out;
}

// The backward of the update; with gx_into defined, grad_x is added into it (and returned as it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_backward(
    const at::Tensor& G_in, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& s, const at::Tensor& B,
    bool need_x, bool need_A, bool need_s, bool need_B, const at::Tensor& gx_into) {
  TORCH_CHECK_VALUE(G_in.dim() == 2 && G_in.size(0) == x_in.size(0) && G_in.size(1) == B.size(0) &&
                        G_in.scalar_type() == x_in.scalar_type(),
                    "grad: expected a (", x_in.size(0), ", ", B.size(0), ") tensor of x's dtype, got ", G_in.sizes());
  const at::Tensor x = rows_of(x_in), G = rows_of(G_in), Ac = A.contiguous(), Bt = B.t().contiguous();
  const int64_t T = x.size(0), n = x.size(1), r = A.size(0), m = B.size(0);
  const int64_t threads = at::get_num_threads();
  const auto opt = x.options();
  const bool into = gx_into.defined();
  at::Tensor gx = !need_x ? at::empty({0}, opt) : into ? gx_into : at::empty({T, n}, opt);
  // Per-thread accumulators: grad_A (r, n), h^T G (r, m), grad_s (r).
  at::Tensor accA = at::zeros({need_A ? threads : 0, r, n}, opt), accB = at::zeros({need_B ? threads : 0, r, m}, opt);
  at::Tensor accS = at::zeros({need_s ? threads : 0, r}, opt);
  const bool need_u = need_x || need_A || need_s, need_h = need_s || need_B;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_linear_bwd", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *gp = G.const_data_ptr<scalar_t>();
    const scalar_t *ap = Ac.const_data_ptr<scalar_t>(), *btp = Bt.const_data_ptr<scalar_t>();
    const at::Tensor sc = s.contiguous();
    const scalar_t* sp = sc.const_data_ptr<scalar_t>();
    const int64_t blocks = (T + kLowrankRows - 1) / kLowrankRows;
    at::parallel_for(0, blocks, block_grain(r, n, m), [&](int64_t b0, int64_t b1) {
      const int64_t tid = at::get_thread_num();
      std::vector<scalar_t> U(kLowrankRows * r), H(kLowrankRows * r);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * kLowrankRows, rows = std::min(kLowrankRows, T - t0);
        const scalar_t *xb = xp + t0 * x.stride(0), *gb = gp + t0 * G.stride(0);
        if (need_u) dots(gb, G.stride(0), rows, btp, r, m, U.data());
        if (need_h) dots(xb, x.stride(0), rows, ap, r, n, H.data());
        if (need_s) {
          scalar_t* gs = accS.mutable_data_ptr<scalar_t>() + tid * r;
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < r; ++j) gs[j] += U[i * r + j] * H[i * r + j];
        }
        if (need_B) outer(H.data(), rows, r, gb, G.stride(0), accB.mutable_data_ptr<scalar_t>() + tid * r * m, m);
        if (need_x || need_A) {
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < r; ++j) U[i * r + j] *= sp[j];
          if (need_x) {
            scalar_t* gxb = gx.mutable_data_ptr<scalar_t>() + t0 * n;
            axpy<scalar_t>(U.data(), rows, r, ap, n, into ? gxb : nullptr, n, gxb, n);
          }
          if (need_A) outer(U.data(), rows, r, xb, x.stride(0), accA.mutable_data_ptr<scalar_t>() + tid * r * n, n);
        }
      }
    });
  });
  const at::Tensor none = at::empty({0}, opt);
  return {gx, need_A ? accA.sum(0) : none, need_s ? accS.sum(0) : none,
          need_B ? (accB.sum(0) * s.unsqueeze(1)).t().contiguous() : none};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_bwd_cpu(
    const at::Tensor& G_in, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& s, const at::Tensor& B,
    bool need_x, bool need_A, bool need_s, bool need_B) {
  check_lowrank(x_in, A, s, B);
  return lowrank_backward(G_in, x_in, A, s, B, need_x, need_A, need_s, need_B, at::Tensor());
}

// grad_x = G W + (G B diag(s)) A (the update's part added into G W), grad_W = G^T x, grad_bias = colsum G,
// and the update's grad_A, grad_s, grad_B; gradients not asked for are empty.
std::vector<at::Tensor> lora_linear_bwd_cpu(const at::Tensor& G_in, const at::Tensor& x_in, const at::Tensor& W,
                                            const at::Tensor& A, const at::Tensor& s, const at::Tensor& B,
                                            bool need_x, bool need_W, bool need_bias, bool need_A, bool need_s,
                                            bool need_B) {
  check_lowrank(x_in, A, s, B);
  check_base(x_in, W, std::nullopt);
  const at::Tensor G = rows_of(G_in), x = rows_of(x_in), none = at::empty({0}, x.options());
  const at::Tensor gx = need_x ? at::mm(G, W) : at::Tensor();
  auto [gX, gA, gs, gB] = lowrank_backward(G, x, A, s, B, need_x, need_A, need_s, need_B, gx);
  return {gX, need_W ? at::mm(G.t(), x) : none, need_bias ? G.sum(0) : none, gA, gs, gB};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("scaled_matmul_fwd(Tensor A, Tensor s, Tensor B) -> Tensor");
  m.def(
      "scaled_matmul_bwd(Tensor grad, Tensor A, Tensor s, Tensor B, bool need_A, bool need_s, "
      "bool need_B) -> (Tensor, Tensor, Tensor)");
  m.def("lowrank_linear_fwd(Tensor x, Tensor A, Tensor s, Tensor B, Tensor y) -> Tensor");
  m.def(
      "lowrank_linear_bwd(Tensor grad, Tensor x, Tensor A, Tensor s, Tensor B, bool need_x, bool need_A, "
      "bool need_s, bool need_B) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_linear_fwd(Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor s, Tensor B) -> Tensor");
  m.def(
      "lora_linear_bwd(Tensor grad, Tensor x, Tensor W, Tensor A, Tensor s, Tensor B, bool need_x, bool need_W, "
      "bool need_bias, bool need_A, bool need_s, bool need_B) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("scaled_matmul_fwd", &scaled_matmul_fwd_cpu);
  m.impl("scaled_matmul_bwd", &scaled_matmul_bwd_cpu);
  m.impl("lowrank_linear_fwd", &lowrank_linear_fwd_cpu);
  m.impl("lowrank_linear_bwd", &lowrank_linear_bwd_cpu);
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
