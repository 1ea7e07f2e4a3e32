// Per-matrix math of the fused Stiefel optimiser steps (specops_ext::stiefel_sgd_step,
// cayley_adam_step, stiefel_adam_step) as thread-block code shared by the CUDA kernels
// (stiefel.cu) and a host harness (tests/test_stiefel_cuda_math.py): no CUDA or torch headers,
// and the barrier is a functor, so the same code runs on std::threads and is checked there.
//
// One block steps one matrix. Every operand lives in a shared-memory work area in the
// accumulation type T (float; double for double); rows are p wide (no padding). The formulas,
// their order of operations and the polar stopping rule are those of csrc/cpu/stiefel.cpp and
// specops/stiefel_steps.py (the rule's tolerance and iteration limit come in StepArgs, from
// specops._constants): the canonical generator W = PM X^T - X PM^T is applied in low-rank form
// W Z = PM (X^T Z) - X (PM^T Z) (the CPU kernel forms W for square X instead: equal up to
// round-off), and every step ends with Newton-Schulz polar under specops.stiefel.polar_ns' rule.
// Every reduction is summed by every thread in the same order, so all threads take the same
// branches (stopping rule, rescaling) and barriers stay uniform.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define STF_HD __host__ __device__ __forceinline__
#else
#define STF_HD inline
#endif
// The K x K register tiles below must be fully unrolled to stay in registers; host compilers
// would warn about the pragma in the host pass.
#ifdef __CUDA_ARCH__
#define STF_UNROLL _Pragma("unroll")
#else
#define STF_UNROLL
#endif

namespace specops {
namespace cuda {
namespace stiefel_detail {

enum class StepOp : int { kSgd = 0, kCayleyAdam = 1, kStiefelAdam = 2 };

constexpr int kMaxThreads = 256;

// Pointers to matrix 0 of each (B, ...) stack, all contiguous in the storage type S.
template <class S>
struct StepArgs {
  S* X;
  const S* G;
  S* m;  // SGD: momentum M; Cayley Adam: first moment m. (n, p) each
  S* v;  // Cayley Adam: second moment, one per matrix
  S* Y;  // StiefelAdam skew moments Y, P: (p, p) each
  S* P;
  S* V;  // StiefelAdam normal moments V, Q: (n, p) each, n > p only
  S* Q;
  const double* step;  // Adam variants: matrix b uses step[b / per] (already incremented)
  int64_t per;
  int n, p;
  double lr, beta1, beta2, eps, q;  // SGD: beta1 is the momentum
  int64_t iters;                    // Cayley fixed-point iterations
  double tol;                       // Newton-Schulz: stop at ||Y^T Y - I||_F <= tol ...
  int64_t max_iter;                 // ... or after max_iter iterations
};

// Storage <-> accumulation conversion for float and double (half types: see stiefel.cu).
template <class S_>
struct PlainIO {
  using S = S_;
  using T = S_;
  static STF_HD T load(S v) { return v; }
  static STF_HD S store(T v) { return v; }
};

STF_HD float sq_root(float x) { return sqrtf(x); }
STF_HD double sq_root(double x) { return sqrt(x); }
STF_HD float absval(float x) { return fabsf(x); }
STF_HD double absval(double x) { return fabs(x); }
template <class T> STF_HD T min_of(T a, T b) { return b < a ? b : a; }  // std::min's NaN behaviour
template <class T> STF_HD T max_of(T a, T b) { return a < b ? b : a; }

// ---------------------------------------------------------------------------------------------
// Launch geometry and shared memory (host and device agree by calling the same functions).

// Threads per block: about one 4x4 output tile of an (n, p) product per thread, whole warps,
// at most kMaxThreads (small matrices get small blocks so that many share an SM).
STF_HD int block_threads(int64_t n, int64_t p) {
  const int64_t tiles = ((n + 3) / 4) * ((p + 3) / 4);
  const int64_t t = (tiles + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// Work-area elements of T for one matrix: (n, p) and (p, p) buffers (see the step functions).
STF_HD int64_t work_elems(StepOp op, int64_t n, int64_t p) {
  const int64_t big = op != StepOp::kStiefelAdam ? 3 : (n > p ? 4 : 2);
  return big * n * p + 2 * p * p;
}

// Dynamic shared memory per block: the reduction slots (one per thread), then the work area.
STF_HD size_t step_smem_bytes(StepOp op, int64_t n, int64_t p, bool acc_double) {
  const int64_t elems = block_threads(n, p) + work_elems(op, n, p);
  return size_t(elems) * (acc_double ? sizeof(double) : sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// Block primitives.

template <class T, class Sync>
struct Block {
  int tid, nthr;
  T* red;  // nthr slots
  Sync sync;
};

// The block-wide sum (max) of one value per thread, identical in every thread.
template <class T, class Sync>
STF_HD T block_sum(const Block<T, Sync>& blk, T v) {
  blk.red[blk.tid] = v;
  blk.sync();
  T s = 0;
  for (int i = 0; i < blk.nthr; ++i) s += blk.red[i];
  blk.sync();
  return s;
}

template <class T, class Sync>
STF_HD T block_max(const Block<T, Sync>& blk, T v) {
  blk.red[blk.tid] = v;
  blk.sync();
  T s = blk.red[0];
  for (int i = 1; i < blk.nthr; ++i) s = max_of(s, blk.red[i]);
  blk.sync();
  return s;
}

// Element (i, j) at ptr[i * rs + j * cs]: a row-major matrix or the transpose of one.
template <class T>
struct View {
  const T* ptr;
  int rs, cs;
  STF_HD T operator()(int i, int j) const { return ptr[i * rs + j * cs]; }
};
template <class T> STF_HD View<T> mat(const T* ptr, int cols) { return {ptr, cols, 1}; }
template <class T> STF_HD View<T> trans(const T* ptr, int cols) { return {ptr, 1, cols}; }

// epi(i, j, (A B)(i, j)) for every (i, j) of a rows x cols product with inner dimension k (with
// kTwo: epi(i, j, (A B)(i, j), (A2 B2)(i, j))). A thread computes a K x K tile whose rows are
// i, i + nrt, ... and columns j, j + nct, ... (strided: neighbouring threads read neighbouring
// elements); indices past the edge are clamped for the loads and skipped for the stores.
template <int K, bool kTwo, class T, class Sync, class Epi>
STF_HD void gemm_tiled(const Block<T, Sync>& blk, int rows, int cols, int k, View<T> A, View<T> B,
                       View<T> A2, View<T> B2, Epi& epi) {
  const int nrt = (rows + K - 1) / K, nct = (cols + K - 1) / K;
  for (int t = blk.tid; t < nrt * nct; t += blk.nthr) {
    const int ti = t / nct, tj = t - ti * nct;
    int ri[K], cj[K];
    STF_UNROLL
    for (int r = 0; r < K; ++r) {
      ri[r] = min_of(ti + r * nrt, rows - 1);
      cj[r] = min_of(tj + r * nct, cols - 1);
    }
    T acc[K][K], acc2[kTwo ? K : 1][kTwo ? K : 1];
    STF_UNROLL
    for (int r = 0; r < K; ++r) {
      STF_UNROLL
      for (int s = 0; s < K; ++s) acc[r][s] = 0;
    }
    if constexpr (kTwo) {
      STF_UNROLL
      for (int r = 0; r < K; ++r) {
        STF_UNROLL
        for (int s = 0; s < K; ++s) acc2[r][s] = 0;
      }
    }
    for (int l = 0; l < k; ++l) {
      T a[K], b[K];
      STF_UNROLL
      for (int r = 0; r < K; ++r) {
        a[r] = A(ri[r], l);
        b[r] = B(l, cj[r]);
      }
      STF_UNROLL
      for (int r = 0; r < K; ++r) {
        STF_UNROLL
        for (int s = 0; s < K; ++s) acc[r][s] += a[r] * b[s];
      }
      if constexpr (kTwo) {
        STF_UNROLL
        for (int r = 0; r < K; ++r) {
          a[r] = A2(ri[r], l);
          b[r] = B2(l, cj[r]);
        }
        STF_UNROLL
        for (int r = 0; r < K; ++r) {
          STF_UNROLL
          for (int s = 0; s < K; ++s) acc2[r][s] += a[r] * b[s];
        }
      }
    }
    STF_UNROLL
    for (int r = 0; r < K; ++r) {
      const int i = ti + r * nrt;
      if (i >= rows) break;
      STF_UNROLL
      for (int s = 0; s < K; ++s) {
        const int j = tj + s * nct;
        if (j >= cols) break;
        if constexpr (kTwo) epi(i, j, acc[r][s], acc2[r][s]);
        else epi(i, j, acc[r][s]);
      }
    }
  }
}

// The largest tile that still gives every thread work (a (p, p) product of a tall matrix has
// few 4x4 tiles but a long inner loop).
template <bool kTwo, class T, class Sync, class Epi>
STF_HD void gemm(const Block<T, Sync>& blk, int rows, int cols, int k, View<T> A, View<T> B, View<T> A2,
                 View<T> B2, Epi&& epi) {
  const int t4 = ((rows + 3) / 4) * ((cols + 3) / 4), t2 = ((rows + 1) / 2) * ((cols + 1) / 2);
  if (t4 >= blk.nthr) gemm_tiled<4, kTwo>(blk, rows, cols, k, A, B, A2, B2, epi);
  else if (t2 >= blk.nthr) gemm_tiled<2, kTwo>(blk, rows, cols, k, A, B, A2, B2, epi);
  else gemm_tiled<1, kTwo>(blk, rows, cols, k, A, B, A2, B2, epi);
}

template <class T, class Sync, class Epi>
STF_HD void mm(const Block<T, Sync>& blk, int rows, int cols, int k, View<T> A, View<T> B, Epi&& epi) {
  gemm<false>(blk, rows, cols, k, A, B, A, B, epi);
}

// C = A B into a row-major rows x cols buffer.
template <class T, class Sync>
STF_HD void mm_to(const Block<T, Sync>& blk, T* C, int rows, int cols, int k, View<T> A, View<T> B) {
  mm(blk, rows, cols, k, A, B, [&](int i, int j, T v) { C[i * cols + j] = v; });
}

// ||S - I||_F of a p x p S.
template <class T, class Sync>
STF_HD T dev_from_identity(const Block<T, Sync>& blk, const T* S, int p) {
  T s = 0;
  for (int e = blk.tid; e < p * p; e += blk.nthr) {
    const T d = S[e] - (e / p == e % p ? T(1) : T(0));
    s += d * d;
  }
  return sq_root(block_sum(blk, s));
}

// The polar factor of Y (n x p) by Newton-Schulz under the rule of specops.stiefel.polar_ns:
// rescale by ||Y^T Y||_inf^{-1/2} when that norm is > 2, then Y <- Y (3I - Y^T Y)/2 while
// ||Y^T Y - I||_F > tol and decreasing, at most max_iter times. Yn (n x p), S, Sn (p x p) are
// work; returns the buffer that holds the result (Y or Yn).
template <class T, class Sync>
STF_HD T* polar(const Block<T, Sync>& blk, T* Y, T* Yn, T* S, T* Sn, int n, int p, T tol, int64_t max_iter) {
  mm_to(blk, S, p, p, n, trans(Y, p), mat(Y, p));
  blk.sync();
  T rmax = 0;
  for (int i = blk.tid; i < p; i += blk.nthr) {
    T r = 0;
    for (int j = 0; j < p; ++j) r += absval(S[i * p + j]);
    rmax = max_of(rmax, r);
  }
  rmax = block_max(blk, rmax);
  if (rmax > T(2)) {
    const T c = T(1) / sq_root(rmax);
    for (int e = blk.tid; e < n * p; e += blk.nthr) Y[e] *= c;
    for (int e = blk.tid; e < p * p; e += blk.nthr) S[e] *= c * c;
    blk.sync();
  }
  T err = dev_from_identity(blk, S, p);
  for (int64_t it = 0; it < max_iter && err > tol; ++it) {
    for (int e = blk.tid; e < p * p; e += blk.nthr) {
      T v = T(-0.5) * S[e];
      if (e / p == e % p) v += T(1.5);
      Sn[e] = v;
    }
    blk.sync();
    mm_to(blk, Yn, n, p, p, mat(Y, p), mat(Sn, p));
    blk.sync();
    mm_to(blk, Sn, p, p, n, trans(Yn, p), mat(Yn, p));
    blk.sync();
    const T errn = dev_from_identity(blk, Sn, p);
    if (!(errn < err)) break;
    T* t = Y;
    Y = Yn;
    Yn = t;
    t = S;
    S = Sn;
    Sn = t;
    err = errn;
  }
  return Y;
}

// PM <- M - X (X^T M)/2 in place (M given in PM); returns ||W||_F of W = PM X^T - X PM^T as
// sqrt(2 ||PM||^2 - 2 tr(B B)), B = X^T PM (uses X^T X = I). t1, t2: p x p work.
template <class T, class Sync>
STF_HD T generator(const Block<T, Sync>& blk, const T* X, T* PM, T* t1, T* t2, int n, int p) {
  mm_to(blk, t1, p, p, n, trans(X, p), mat(PM, p));
  blk.sync();
  mm(blk, n, p, p, mat(X, p), mat(t1, p), [&](int i, int j, T v) { PM[i * p + j] += T(-0.5) * v; });
  blk.sync();
  mm_to(blk, t2, p, p, n, trans(X, p), mat(PM, p));
  blk.sync();
  T pm2 = 0, tbb = 0;
  for (int e = blk.tid; e < n * p; e += blk.nthr) pm2 += PM[e] * PM[e];
  for (int e = blk.tid; e < p * p; e += blk.nthr) tbb += t2[e] * t2[(e % p) * p + e / p];
  pm2 = block_sum(blk, pm2);
  tbb = block_sum(blk, tbb);
  return sq_root(max_of(T(0), T(2) * pm2 - T(2) * tbb));
}

// epi(i, j, (W Z)(i, j)) with W Z = PM (X^T Z) - X (PM^T Z); t1, t2: p x p work. epi may
// overwrite Z (the last product no longer reads it).
template <class T, class Sync, class Epi>
STF_HD void apply_generator(const Block<T, Sync>& blk, const T* X, const T* PM, const T* Z, T* t1, T* t2,
                            int n, int p, Epi&& epi) {
  mm_to(blk, t1, p, p, n, trans(X, p), mat(Z, p));
  mm_to(blk, t2, p, p, n, trans(PM, p), mat(Z, p));
  blk.sync();
  gemm<true>(blk, n, p, p, mat(PM, p), mat(t1, p), mat(X, p), mat(t2, p),
             [&](int i, int j, T a, T b) { epi(i, j, a - b); });
}

// ---------------------------------------------------------------------------------------------
// One step of one matrix. Work areas (n x p "big" and p x p "small" buffers) as in work_elems.

// The Cayley steps' work area — X, PM (M or m^, then the generator's PM, then polar's Yn), Y
// (n x p); t1, t2 (p x p; then polar's S, Sn) — and matrix b's rows of the global stacks.
template <class IO>
struct CayleyWork {
  using T = typename IO::T;
  using S = typename IO::S;
  int n, p, np;
  T *X, *PM, *Y, *t1, *t2;
  S* Xg;
  const S* Gg;
  S* mg;  // SGD: the momentum M; Adam: the first moment m
  STF_HD CayleyWork(T* w, const StepArgs<S>& a, int64_t b)
      : n(a.n), p(a.p), np(a.n * a.p), X(w), PM(w + np), Y(w + 2 * np), t1(w + 3 * np), t2(t1 + a.p * a.p),
        Xg(a.X + b * np), Gg(a.G + b * np), mg(a.m + b * np) {}
};

// Shared tail of Cayley SGD and Cayley Adam: Li et al.'s fixed-point iterations
// Y <- X + c W (X + Y) (c = +alpha/2 for SGD, -alpha/(2 sqrt(v^)) for Adam; W from X and PM),
// then the polar retraction, stored to the global X.
template <class IO, class Sync>
STF_HD void cayley_finish(const Block<typename IO::T, Sync>& blk, const CayleyWork<IO>& w, typename IO::T c,
                          const StepArgs<typename IO::S>& a) {
  using T = typename IO::T;
  const int n = w.n, p = w.p, np = w.np;
  for (int64_t s = 0; s < a.iters; ++s) {
    for (int e = blk.tid; e < np; e += blk.nthr) w.Y[e] = w.X[e] + w.Y[e];
    blk.sync();
    apply_generator(blk, w.X, w.PM, w.Y, w.t1, w.t2, n, p, [&](int i, int j, T wz) {
      const int e = i * p + j;
      w.Y[e] = w.X[e] + c * wz;
    });
    blk.sync();
  }
  const T* out = polar(blk, w.Y, w.PM, w.t1, w.t2, n, p, T(a.tol), a.max_iter);
  for (int e = blk.tid; e < np; e += blk.nthr) w.Xg[e] = IO::store(out[e]);
}

// Cayley SGD (PM starts as beta M - G).
template <class IO, class Sync>
STF_HD void sgd_matrix(const Block<typename IO::T, Sync>& blk, typename IO::T* work,
                       const StepArgs<typename IO::S>& a, int64_t b) {
  using T = typename IO::T;
  const CayleyWork<IO> w(work, a, b);
  const int n = w.n, p = w.p;
  for (int e = blk.tid; e < w.np; e += blk.nthr) {
    w.X[e] = IO::load(w.Xg[e]);
    w.PM[e] = T(a.beta1) * IO::load(w.mg[e]) - IO::load(w.Gg[e]);
  }
  blk.sync();
  const T wnorm = generator(blk, w.X, w.PM, w.t1, w.t2, n, p);
  const T alpha = min_of(T(a.lr), T(2 * a.q) / (wnorm + T(a.eps)));
  // The momentum, projected: M <- W X, stored now; Y <- X + alpha M.
  apply_generator(blk, w.X, w.PM, w.X, w.t1, w.t2, n, p, [&](int i, int j, T mt) {
    const int e = i * p + j;
    w.mg[e] = IO::store(mt);
    w.Y[e] = w.X[e] + alpha * mt;
  });
  blk.sync();
  cayley_finish<IO>(blk, w, T(0.5) * alpha, a);
}

// Cayley Adam (PM starts as the bias-corrected m^).
template <class IO, class Sync>
STF_HD void cayley_adam_matrix(const Block<typename IO::T, Sync>& blk, typename IO::T* work,
                               const StepArgs<typename IO::S>& a, int64_t b) {
  using T = typename IO::T;
  const CayleyWork<IO> w(work, a, b);
  const int n = w.n, p = w.p;
  const double t = a.step[b / a.per];
  const T bc1 = T(1.0 - pow(a.beta1, t)), bc2 = T(1.0 - pow(a.beta2, t));
  T g2 = 0;
  for (int e = blk.tid; e < w.np; e += blk.nthr) {
    w.X[e] = IO::load(w.Xg[e]);
    const T g = IO::load(w.Gg[e]);
    const T m = T(a.beta1) * IO::load(w.mg[e]) + T(1 - a.beta1) * g;
    g2 += g * g;
    w.PM[e] = m / bc1;
  }
  g2 = block_sum(blk, g2);  // its barriers also publish X and PM
  const T v = T(a.beta2) * IO::load(a.v[b]) + T(1 - a.beta2) * g2;
  const T r = sq_root(v / bc2 + T(a.eps));
  const T wnorm = generator(blk, w.X, w.PM, w.t1, w.t2, n, p) / r;
  const T alpha = min_of(T(a.lr), T(2 * a.q) / (wnorm + T(a.eps)));
  apply_generator(blk, w.X, w.PM, w.X, w.t1, w.t2, n, p, [&](int i, int j, T wx) {
    const int e = i * p + j;
    const T mt = wx / r;
    w.Y[e] = w.X[e] - alpha * mt;
    w.mg[e] = IO::store(mt * r * bc1);
  });
  blk.sync();
  cayley_finish<IO>(blk, w, -(T(0.5) * alpha / r), a);
  if (blk.tid == 0) a.v[b] = IO::store(v);
}

// StiefelAdam: X, G (then N, then nu), Z (= G's buffer when square), V (tall only); A, sx (then
// S, Sn). Polar's Yn is G's buffer (tall) or X's (square).
template <class IO, class Sync>
STF_HD void stiefel_adam_matrix(const Block<typename IO::T, Sync>& blk, typename IO::T* w,
                                const StepArgs<typename IO::S>& a, int64_t b) {
  using T = typename IO::T;
  using S = typename IO::S;
  const int n = a.n, p = a.p, np = n * p, pp = p * p;
  const bool tall = n > p;
  T *X = w, *G = X + np, *Z = tall ? G + np : G, *V = Z + np, *A = (tall ? V + np : G + np), *sx = A + pp;
  S* Xg = a.X + b * np;
  const S* Gg = a.G + b * np;
  S *Yg = a.Y + b * pp, *Pg = a.P + b * pp;
  const double t = a.step[b / a.per];
  const T bc1 = T(1.0 - pow(a.beta1, t)), bc2 = T(1.0 - pow(a.beta2, t));
  const T step = T(a.lr) / bc1;
  for (int e = blk.tid; e < np; e += blk.nthr) {
    X[e] = IO::load(Xg[e]);
    G[e] = IO::load(Gg[e]);
  }
  blk.sync();
  mm_to(blk, A, p, p, n, trans(X, p), mat(G, p));  // A = X^T G
  blk.sync();
  for (int e = blk.tid; e < pp; e += blk.nthr) {
    const T xi = A[e] - A[(e % p) * p + e / p];
    const T y = T(a.beta1) * IO::load(Yg[e]) - T(1 - a.beta1) * xi;
    const T pv = T(a.beta2) * IO::load(Pg[e]) + T(1 - a.beta2) * xi * xi;
    Yg[e] = IO::store(y);
    Pg[e] = IO::store(pv);
    sx[e] = step * y / (sq_root(pv / bc2) + T(a.eps));
  }
  blk.sync();
  mm(blk, n, p, p, mat(X, p), mat(sx, p), [&](int i, int j, T v) { Z[i * p + j] = X[i * p + j] + v; });
  if (tall) {
    S *Vg = a.V + b * np, *Qg = a.Q + b * np;
    mm(blk, n, p, p, mat(X, p), mat(A, p), [&](int i, int j, T v) { G[i * p + j] -= v; });  // N = G - X A
    blk.sync();
    for (int e = blk.tid; e < np; e += blk.nthr) {
      const T nv = G[e];
      V[e] = T(a.beta1) * IO::load(Vg[e]) - T(1 - a.beta1) * nv;
      const T qv = T(a.beta2) * IO::load(Qg[e]) + T(1 - a.beta2) * nv * nv;
      Qg[e] = IO::store(qv);
      G[e] = step * V[e] / (sq_root(qv / bc2) + T(a.eps));  // nu
    }
    blk.sync();
    mm_to(blk, A, p, p, n, trans(X, p), mat(G, p));
    blk.sync();
    mm(blk, n, p, p, mat(X, p), mat(A, p), [&](int i, int j, T v) {  // Z += nu - X (X^T nu)
      const int e = i * p + j;
      Z[e] += G[e] - v;
    });
  }
  blk.sync();
  const T* Xn = polar(blk, Z, tall ? G : X, A, sx, n, p, T(a.tol), a.max_iter);
  for (int e = blk.tid; e < np; e += blk.nthr) Xg[e] = IO::store(Xn[e]);
  if (tall) {  // V <- V - X' (X'^T V) at the new point
    S* Vg = a.V + b * np;
    mm_to(blk, A, p, p, n, trans(Xn, p), mat(V, p));
    blk.sync();
    mm(blk, n, p, p, mat(Xn, p), mat(A, p), [&](int i, int j, T v) {
      const int e = i * p + j;
      Vg[e] = IO::store(V[e] - v);
    });
  }
}

// Matrix b of the stack: the reduction slots at smem[0, nthr), the work area after them.
template <StepOp kOp, class IO, class Sync>
STF_HD void step_matrix(const StepArgs<typename IO::S>& a, typename IO::T* smem, int64_t b, int tid, int nthr,
                        Sync sync) {
  const Block<typename IO::T, Sync> blk{tid, nthr, smem, sync};
  typename IO::T* w = smem + nthr;
  if constexpr (kOp == StepOp::kSgd) sgd_matrix<IO>(blk, w, a, b);
  else if constexpr (kOp == StepOp::kCayleyAdam) cayley_adam_matrix<IO>(blk, w, a, b);
  else stiefel_adam_matrix<IO>(blk, w, a, b);
}

}  // namespace stiefel_detail
}  // namespace cuda
}  // namespace specops
