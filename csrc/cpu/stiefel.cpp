// Fused Stiefel-manifold optimiser steps on the CPU: every matrix of a (B, n, p) stack in one call.
//
// One task per matrix (at::parallel_for over the stack, several small matrices per task): the
// matrix, its gradient and state are converted to the accumulation type into a per-thread scratch
// of ~7 n p + 6 p^2 values (~200 KiB for 64 x 64 fp32: L2; 7 KiB for 8 x 8: L1), stepped, and
// written back. Rows are padded to whole vectors, and every product keeps a 4-row block
// of its output in vector registers. The formulas are those of specops/stiefel_steps.py (its module
// docstring): the canonical generator W = PM X^T - X PM^T is never formed for tall X
// (W Z = PM (X^T Z) - X (PM^T Z), O(n p^2)), and every step ends with the Newton-Schulz polar
// correction with the stopping rule of specops.stiefel.polar_ns, whose tolerance and iteration limit
// (specops._constants) every op is passed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "simd.h"
#include "stiefel_checks.h"

namespace specops {
namespace cpu {
namespace {

// Every matrix in the scratch has rows padded to ld = a multiple of the vector width: products
// run over whole vectors. Padding columns only ever feed padding columns (a product reads its left
// operand's real columns only), and every reduction reads real columns only, so what the padding
// holds never reaches a result. It is still zeroed at each load: a scratch is reused for the next
// matrix, and NaN * 0 would otherwise carry a non-finite matrix's values into its padding.

// C (n x ld) = alpha A (n x k) B (k x ld), or C += ... when accumulate. Four rows of C per pass
// keep 4 vector accumulators in registers while B's row vector is reused four times.
template <typename T>
void mm_nn(const T* A, const T* B, T* C, int64_t n, int64_t k, int64_t ld, T alpha, bool accumulate) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int64_t L = S::kLanes;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T *a0 = A + i * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;
    for (int64_t j = 0; j < ld; j += L) {
      V c0{}, c1{}, c2{}, c3{};
      for (int64_t l = 0; l < k; ++l) {
        const V b = S::load(B + l * ld + j);
        c0 += a0[l] * b;
        c1 += a1[l] * b;
        c2 += a2[l] * b;
        c3 += a3[l] * b;
      }
      T* c = C + i * ld + j;
      if (accumulate) {
        S::store(c, S::load(c) + alpha * c0);
        S::store(c + ld, S::load(c + ld) + alpha * c1);
        S::store(c + 2 * ld, S::load(c + 2 * ld) + alpha * c2);
        S::store(c + 3 * ld, S::load(c + 3 * ld) + alpha * c3);
      } else {
        S::store(c, alpha * c0);
        S::store(c + ld, alpha * c1);
        S::store(c + 2 * ld, alpha * c2);
        S::store(c + 3 * ld, alpha * c3);
      }
    }
  }
  for (; i < n; ++i) {
    const T* a = A + i * ld;
    for (int64_t j = 0; j < ld; j += L) {
      V c0{};
      for (int64_t l = 0; l < k; ++l) c0 += a[l] * S::load(B + l * ld + j);
      T* c = C + i * ld + j;
      S::store(c, accumulate ? S::load(c) + alpha * c0 : alpha * c0);
    }
  }
}

// C (p x ld) = A^T B with A (n x p) and B (n x ld), four rows of C per pass.
template <typename T>
void mm_tn(const T* A, const T* B, T* C, int64_t n, int64_t p, int64_t ld) {
  using S = Simd<T>;
  using V = typename S::vec;
  constexpr int64_t L = S::kLanes;
  int64_t i = 0;
  for (; i + 4 <= p; i += 4) {
    for (int64_t j = 0; j < ld; j += L) {
      V c0{}, c1{}, c2{}, c3{};
      for (int64_t l = 0; l < n; ++l) {
        const V b = S::load(B + l * ld + j);
        const T* a = A + l * ld + i;
        c0 += a[0] * b;
        c1 += a[1] * b;
        c2 += a[2] * b;
        c3 += a[3] * b;
      }
      T* c = C + i * ld + j;
      S::store(c, c0);
      S::store(c + ld, c1);
      S::store(c + 2 * ld, c2);
      S::store(c + 3 * ld, c3);
    }
  }
  for (; i < p; ++i) {
    for (int64_t j = 0; j < ld; j += L) {
      V c0{};
      for (int64_t l = 0; l < n; ++l) c0 += A[l * ld + i] * S::load(B + l * ld + j);
      S::store(C + i * ld + j, c0);
    }
  }
  for (; i < ld; ++i) std::fill(C + i * ld, C + (i + 1) * ld, T(0));  // padding rows of a p x p
}

// ||S - I||_F for a p x p S (row stride ld).
template <typename T>
T dev_from_identity(const T* S, int64_t p, int64_t ld) {
  T s = 0;
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < p; ++j) {
      const T d = S[i * ld + j] - (i == j ? T(1) : T(0));
      s += d * d;
    }
  return std::sqrt(s);
}

// Y <- polar factor of Y (n x p) by Newton-Schulz, the rule of specops.stiefel.polar_ns:
// rescale when ||Y^T Y||_inf > 2, then Y <- Y (3I - Y^T Y)/2 while the error is above tol and
// decreasing, at most max_iter times. Work: S, Sn (p x p), Yn (n x p).
template <typename T>
void polar_ns(T* Y, int64_t n, int64_t p, int64_t ld, T tol, int64_t max_iter, T* S, T* Sn, T* Yn) {
  mm_tn(Y, Y, S, n, p, ld);
  T rmax = 0;
  for (int64_t i = 0; i < p; ++i) {
    T r = 0;
    for (int64_t j = 0; j < p; ++j) r += std::abs(S[i * ld + j]);
    rmax = std::max(rmax, r);
  }
  if (rmax > T(2)) {
    const T c = T(1) / std::sqrt(rmax);
    for (int64_t e = 0; e < n * ld; ++e) Y[e] *= c;
    for (int64_t e = 0; e < p * ld; ++e) S[e] *= c * c;
  }
  T err = dev_from_identity(S, p, ld);
  for (int64_t it = 0; it < max_iter && err > tol; ++it) {
    for (int64_t e = 0; e < p * ld; ++e) Sn[e] = T(-0.5) * S[e];
    for (int64_t i = 0; i < p; ++i) Sn[i * ld + i] += T(1.5);
    mm_nn(Y, Sn, Yn, n, p, ld, T(1), false);
    mm_tn(Yn, Yn, Sn, n, p, ld);
    const T errn = dev_from_identity(Sn, p, ld);
    if (!(errn < err)) break;
    std::copy(Yn, Yn + n * ld, Y);
    std::swap(S, Sn);
    err = errn;
  }
}

// rows x p matrix (row stride p) <-> scratch (row stride ld); load zeroes the padding.
template <typename scalar_t, typename T>
inline void load(const scalar_t* src, T* dst, int64_t rows, int64_t p, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < p; ++j) dst[i * ld + j] = static_cast<T>(src[i * p + j]);
    std::fill(dst + i * ld + p, dst + (i + 1) * ld, T(0));
  }
}

// sum of squares of the real columns of a rows x p block (row stride ld).
template <typename T>
T sum_sq(const T* A, int64_t rows, int64_t p, int64_t ld) {
  T s = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < p; ++j) s += A[i * ld + j] * A[i * ld + j];
  return s;
}

template <typename scalar_t, typename T>
inline void store(const T* src, scalar_t* dst, int64_t rows, int64_t p, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < p; ++j) dst[i * p + j] = static_cast<scalar_t>(src[i * ld + j]);
}

// The canonical generator of a matrix M at X in low-rank form: PM = M - X (X^T M)/2,
// W = PM X^T - X PM^T, ||W||_F^2 = 2 ||PM||^2 - 2 tr(B B), B = X^T PM (X^T X = I).
template <typename T>
struct Generator {
  const T* X;
  T* PM;
  T* t1;  // p x p
  T* t2;  // p x p
  int64_t n, p, ld;

  // PM from M; returns ||W||_F.
  T build(const T* M) {
    mm_tn(X, M, t1, n, p, ld);
    std::copy(M, M + n * ld, PM);
    mm_nn(X, t1, PM, n, p, ld, T(-0.5), true);
    mm_tn(X, PM, t2, n, p, ld);
    const T pm2 = sum_sq(PM, n, p, ld);
    T tbb = 0;
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) tbb += t2[i * ld + j] * t2[j * ld + i];
    return std::sqrt(std::max(T(0), T(2) * pm2 - T(2) * tbb));
  }
  T* Wd = nullptr;  // the p x p generator, formed for square X

  // Square X: form W = PM X^T - X PM^T once (2 products) so that each W Z is one product, not
  // four. Tw is a zeroed p x ld work block (it holds X^T, then PM^T; its padding stays zero).
  void densify(T* W, T* Tw) {
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) Tw[j * ld + i] = X[i * ld + j];
    mm_nn(PM, Tw, W, n, p, ld, T(1), false);
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) Tw[j * ld + i] = PM[i * ld + j];
    mm_nn(X, Tw, W, n, p, ld, T(-1), true);
    Wd = W;
  }
  // out = W Z.
  void apply(const T* Z, T* out) {
    if (Wd != nullptr) {
      mm_nn(Wd, Z, out, n, n, ld, T(1), false);
      return;
    }
    mm_tn(X, Z, t1, n, p, ld);
    mm_tn(PM, Z, t2, n, p, ld);
    mm_nn(PM, t1, out, n, p, ld, T(1), false);
    mm_nn(X, t2, out, n, p, ld, T(-1), true);
  }
};

// Zeroed per-thread scratch: `big` blocks of n x ld, `small` blocks of ld x ld.
template <typename T>
struct Work {
  Scratch<T> mem;
  int64_t nl, ll;
  Work(int64_t n, int64_t ld, int big, int small)
      : mem(std::max<int64_t>(1, big * n * ld + small * ld * ld)), nl(n * ld), ll(ld * ld) {
    std::fill(mem.get(), mem.get() + std::max<int64_t>(1, big * n * ld + small * ld * ld), T(0));
  }
  T* big(int i) const { return mem.get() + i * nl; }
  T* small(int big_count, int i) const { return mem.get() + big_count * nl + i * ll; }
};

template <typename T>
int64_t padded(int64_t p) {
  constexpr int64_t L = Simd<T>::kLanes;
  return (p + L - 1) / L * L;
}

int64_t grain(int64_t n, int64_t p) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n * p * p)); }

// ----------------------------------------------------------------------------- the Cayley steps

// The scratch of the two Cayley steps (one per thread): 7 n x ld blocks, 6 ld x ld ones.
template <typename T>
struct CayleyScratch {
  Work<T> w;
  T *x, *m, *pm, *mt, *y, *z, *wz;  // n x ld
  T *t1, *t2, *S, *Sn, *wd, *tw;    // ld x ld
  CayleyScratch(int64_t n, int64_t ld)
      : w(n, ld, 7, 6), x(w.big(0)), m(w.big(1)), pm(w.big(2)), mt(w.big(3)), y(w.big(4)), z(w.big(5)),
        wz(w.big(6)), t1(w.small(7, 0)), t2(w.small(7, 1)), S(w.small(7, 2)), Sn(w.small(7, 3)),
        wd(w.small(7, 4)), tw(w.small(7, 5)) {}

  // The generator of matrix `mm` (m, or m^ for Adam) at x; returns it with ||W||_F in *wnorm.
  Generator<T> generator(const T* mm, int64_t n, int64_t p, int64_t ld, T* wnorm) {
    Generator<T> W{x, pm, t1, t2, n, p, ld};
    *wnorm = W.build(mm);
    if (n == p) W.densify(wd, tw);
    return W;
  }

  // Li et al.'s fixed-point iterations y <- x + c W (x + y) (c = alpha/2 for SGD, -alpha/(2 r) for
  // Adam), then the polar correction of y, in place.
  void finish(Generator<T>& W, int64_t n, int64_t p, int64_t ld, T c, int64_t iters, T tol, int64_t max_iter) {
    const int64_t nl = n * ld;
    for (int64_t s = 0; s < iters; ++s) {
      for (int64_t e = 0; e < nl; ++e) z[e] = x[e] + y[e];
      W.apply(z, wz);
      for (int64_t e = 0; e < nl; ++e) y[e] = x[e] + c * wz[e];
    }
    polar_ns(y, n, p, ld, tol, max_iter, S, Sn, z);
  }
};

template <typename scalar_t>
void sgd_kernel(const at::Tensor& Xt, const at::Tensor& Gt, const at::Tensor& Mt, double lr, double momentum,
                double q, int64_t iters, double eps, double tol, int64_t max_iter) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = Xt.size(0), n = Xt.size(1), p = Xt.size(2), np = n * p, ld = padded<T>(p), nl = n * ld;
  scalar_t* Xp = Xt.mutable_data_ptr<scalar_t>();
  const scalar_t* Gp = Gt.const_data_ptr<scalar_t>();
  scalar_t* Mp = Mt.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B, grain(n, p), [&](int64_t b0, int64_t b1) {
    CayleyScratch<T> w(n, ld);
    for (int64_t b = b0; b < b1; ++b) {
      load(Xp + b * np, w.x, n, p, ld);
      load(Mp + b * np, w.m, n, p, ld);
      load(Gp + b * np, w.z, n, p, ld);
      for (int64_t e = 0; e < nl; ++e) w.m[e] = T(momentum) * w.m[e] - w.z[e];
      T wnorm;
      Generator<T> W = w.generator(w.m, n, p, ld, &wnorm);
      W.apply(w.x, w.mt);  // the momentum, projected: M <- W X
      const T alpha = std::min(T(lr), T(2 * q) / (wnorm + T(eps)));
      for (int64_t e = 0; e < nl; ++e) w.y[e] = w.x[e] + alpha * w.mt[e];
      w.finish(W, n, p, ld, T(0.5) * alpha, iters, T(tol), max_iter);
      store(w.y, Xp + b * np, n, p, ld);
      store(w.mt, Mp + b * np, n, p, ld);
    }
  });
}

template <typename scalar_t>
void cayley_adam_kernel(const at::Tensor& Xt, const at::Tensor& Gt, const at::Tensor& mt_, const at::Tensor& vt,
                        const at::Tensor& stept, double lr, double beta1, double beta2, double eps, double q,
                        int64_t iters, double tol, int64_t max_iter) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = Xt.size(0), n = Xt.size(1), p = Xt.size(2), np = n * p, ld = padded<T>(p), nl = n * ld;
  const int64_t per = B / stept.size(0);
  scalar_t* Xp = Xt.mutable_data_ptr<scalar_t>();
  const scalar_t* Gp = Gt.const_data_ptr<scalar_t>();
  scalar_t* mp = mt_.mutable_data_ptr<scalar_t>();
  scalar_t* vp = vt.mutable_data_ptr<scalar_t>();
  const double* stp = stept.const_data_ptr<double>();
  at::parallel_for(0, B, grain(n, p), [&](int64_t b0, int64_t b1) {
    CayleyScratch<T> w(n, ld);
    for (int64_t b = b0; b < b1; ++b) {
      const double t = stp[b / per];
      const T bc1 = T(1.0 - std::pow(beta1, t)), bc2 = T(1.0 - std::pow(beta2, t));
      load(Xp + b * np, w.x, n, p, ld);
      load(mp + b * np, w.m, n, p, ld);
      load(Gp + b * np, w.z, n, p, ld);
      const T g2 = sum_sq(w.z, n, p, ld);
      for (int64_t e = 0; e < nl; ++e) w.m[e] = T(beta1) * w.m[e] + T(1 - beta1) * w.z[e];
      const T v = T(beta2) * static_cast<T>(vp[b]) + T(1 - beta2) * g2;
      const T r = std::sqrt(v / bc2 + T(eps));
      for (int64_t e = 0; e < nl; ++e) w.z[e] = w.m[e] / bc1;  // m^
      T wnorm;
      Generator<T> W = w.generator(w.z, n, p, ld, &wnorm);
      wnorm /= r;
      W.apply(w.x, w.mt);
      for (int64_t e = 0; e < nl; ++e) w.mt[e] /= r;
      const T alpha = std::min(T(lr), T(2 * q) / (wnorm + T(eps)));
      for (int64_t e = 0; e < nl; ++e) w.y[e] = w.x[e] - alpha * w.mt[e];
      w.finish(W, n, p, ld, -(T(0.5) * alpha / r), iters, T(tol), max_iter);
      store(w.y, Xp + b * np, n, p, ld);
      for (int64_t e = 0; e < nl; ++e) w.mt[e] = w.mt[e] * r * bc1;
      store(w.mt, mp + b * np, n, p, ld);
      vp[b] = static_cast<scalar_t>(v);
    }
  });
}

// ----------------------------------------------------------------------------- StiefelAdam

template <typename scalar_t>
void stiefel_adam_kernel(const at::Tensor& Xt, const at::Tensor& Gt, const at::Tensor& Yt, const at::Tensor& Pt,
                         const at::Tensor& Vt, const at::Tensor& Qt, const at::Tensor& stept, double lr,
                         double beta1, double beta2, double eps, double tol, int64_t max_iter) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = Xt.size(0), n = Xt.size(1), p = Xt.size(2), np = n * p, pp = p * p;
  const int64_t ld = padded<T>(p), nl = n * ld;
  const bool tall = n > p;
  const int64_t per = B / stept.size(0);
  scalar_t* Xp = Xt.mutable_data_ptr<scalar_t>();
  const scalar_t* Gp = Gt.const_data_ptr<scalar_t>();
  scalar_t* Yp = Yt.mutable_data_ptr<scalar_t>();
  scalar_t* Pp = Pt.mutable_data_ptr<scalar_t>();
  scalar_t* Vp = tall ? Vt.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* Qp = tall ? Qt.mutable_data_ptr<scalar_t>() : nullptr;
  const double* stp = stept.const_data_ptr<double>();
  at::parallel_for(0, B, grain(n, p), [&](int64_t b0, int64_t b1) {
    constexpr int kBig = 6, kSmall = 6;
    Work<T> w(n, ld, kBig, kSmall);
    T *x = w.big(0), *g = w.big(1), *z = w.big(2), *vn = w.big(3), *nu = w.big(4), *yn = w.big(5);
    T *A = w.small(kBig, 0), *Y = w.small(kBig, 1), *P = w.small(kBig, 2), *sx = w.small(kBig, 3),
      *S = w.small(kBig, 4), *Sn = w.small(kBig, 5);
    for (int64_t b = b0; b < b1; ++b) {
      const double t = stp[b / per];
      const T bc1 = T(1.0 - std::pow(beta1, t)), bc2 = T(1.0 - std::pow(beta2, t));
      const T step = T(lr) / bc1;
      load(Xp + b * np, x, n, p, ld);
      load(Gp + b * np, g, n, p, ld);
      load(Yp + b * pp, Y, p, p, ld);
      load(Pp + b * pp, P, p, p, ld);
      mm_tn(x, g, A, n, p, ld);  // A = X^T G
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < p; ++j) {
          const int64_t e = i * ld + j;
          const T xi = A[e] - A[j * ld + i];
          Y[e] = T(beta1) * Y[e] - T(1 - beta1) * xi;
          P[e] = T(beta2) * P[e] + T(1 - beta2) * xi * xi;
          sx[e] = step * Y[e] / (std::sqrt(P[e] / bc2) + T(eps));
        }
      std::copy(x, x + nl, z);
      mm_nn(x, sx, z, n, p, ld, T(1), true);  // Z = X + X xi^
      if (tall) {
        load(Vp + b * np, vn, n, p, ld);
        load(Qp + b * np, yn, n, p, ld);  // yn holds Q until the retraction needs it
        mm_nn(x, A, g, n, p, ld, T(-1), true);  // N = G - X A, in place of G
        for (int64_t e = 0; e < nl; ++e) {
          vn[e] = T(beta1) * vn[e] - T(1 - beta1) * g[e];
          yn[e] = T(beta2) * yn[e] + T(1 - beta2) * g[e] * g[e];
          nu[e] = step * vn[e] / (std::sqrt(yn[e] / bc2) + T(eps));
        }
        store(yn, Qp + b * np, n, p, ld);
        mm_tn(x, nu, A, n, p, ld);
        mm_nn(x, A, nu, n, p, ld, T(-1), true);  // nu <- nu - X (X^T nu)
        for (int64_t e = 0; e < nl; ++e) z[e] += nu[e];
      }
      polar_ns(z, n, p, ld, T(tol), max_iter, S, Sn, yn);
      store(z, Xp + b * np, n, p, ld);
      store(Y, Yp + b * pp, p, p, ld);
      store(P, Pp + b * pp, p, p, ld);
      if (tall) {
        mm_tn(z, vn, A, n, p, ld);
        mm_nn(z, A, vn, n, p, ld, T(-1), true);  // V <- V - X' (X'^T V)
        store(vn, Vp + b * np, n, p, ld);
      }
    }
  });
}

// ----------------------------------------------------------------------------- entry points
// tol, max_iter: the Newton-Schulz stopping rule (specops._constants.polar_tol, POLAR_MAX_ITER).

void stiefel_sgd_step_cpu(const at::Tensor& X, const at::Tensor& G, const at::Tensor& M, double lr,
                          double momentum, double q, int64_t iters, double eps, double tol, int64_t max_iter) {
  specops_stiefel::check_sgd(X, G, M);
  specops_stiefel::check_polar(tol, max_iter);
  if (X.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "stiefel_sgd_step", [&] {
    sgd_kernel<scalar_t>(X, G, M, lr, momentum, q, iters, eps, tol, max_iter);
  });
}

void cayley_adam_step_cpu(const at::Tensor& X, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
                          const at::Tensor& step, double lr, double beta1, double beta2, double eps, double q,
                          int64_t iters, double tol, int64_t max_iter) {
  specops_stiefel::check_cayley_adam(X, G, m, v, step);
  specops_stiefel::check_polar(tol, max_iter);
  if (X.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "cayley_adam_step", [&] {
    cayley_adam_kernel<scalar_t>(X, G, m, v, step, lr, beta1, beta2, eps, q, iters, tol, max_iter);
  });
}

void stiefel_adam_step_cpu(const at::Tensor& X, const at::Tensor& G, const at::Tensor& Y, const at::Tensor& P,
                           const at::Tensor& V, const at::Tensor& Q, const at::Tensor& step, double lr,
                           double beta1, double beta2, double eps, double tol, int64_t max_iter) {
  specops_stiefel::check_stiefel_adam(X, G, Y, P, V, Q, step);
  specops_stiefel::check_polar(tol, max_iter);
  if (X.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "stiefel_adam_step", [&] {
    stiefel_adam_kernel<scalar_t>(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps, tol, max_iter);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def(
      "stiefel_sgd_step(Tensor(a!) X, Tensor G, Tensor(b!) M, float lr, float momentum, float q, int iters, "
      "float eps, float tol, int max_iter) -> ()");
  m.def(
      "cayley_adam_step(Tensor(a!) X, Tensor G, Tensor(b!) m, Tensor(c!) v, Tensor step, float lr, float beta1, "
      "float beta2, float eps, float q, int iters, float tol, int max_iter) -> ()");
  m.def(
      "stiefel_adam_step(Tensor(a!) X, Tensor G, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) exp_avg_normal, Tensor(e!) exp_avg_sq_normal, Tensor step, float lr, float beta1, "
      "float beta2, float eps, float tol, int max_iter) -> ()");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("stiefel_sgd_step", &stiefel_sgd_step_cpu);
  m.impl("cayley_adam_step", &cayley_adam_step_cpu);
  m.impl("stiefel_adam_step", &stiefel_adam_step_cpu);
}

}  // namespace cpu
}  // namespace specops
