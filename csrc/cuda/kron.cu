// Kronecker-factored matmul y = x @ (A_1 ⊗ ... ⊗ A_k) without forming the product.
// Pure CUDA (no torch headers): the torch glue lives in kron_glue.cpp.
//
// A row of x is a tensor (p_1, ..., p_k) in row-major order; y = x ×_1 A_1 ... ×_k A_k and the mode
// products commute. A thread block takes `rows` consecutive rows of one group, keeps them in shared
// memory in the accumulation type and applies the factors one mode at a time (ping-pong buffers).
// Rows too wide for shared memory use the same block code with the buffers in a global scratch
// ("wide" mode). The block-level code is __host__ __device__ and takes the barrier as a functor so
// that it can be exercised on the host.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace specops {
namespace cuda {

constexpr int kKronMaxFactors = 8;

namespace kron_detail {

#define KRON_HD __host__ __device__ __forceinline__
// Host compilers would warn about the pragma in the host pass of __host__ __device__ code.
#ifdef __CUDA_ARCH__
#define KRON_UNROLL _Pragma("unroll")
#else
#define KRON_UNROLL
#endif

constexpr int kThreads = 256;
// Register tile of mode_product: each thread computes kTileRows x kTileCols outputs, so one
// shared-memory load feeds several FMAs.
constexpr int kTileRows = 2;
constexpr int kTileCols = 4;
// Rows per block are sized for the soft budget (several blocks per SM); the hard budget only
// applies when a single row needs more.
constexpr size_t kSoftSmemBytes = 48 * 1024;
constexpr size_t kMaxSmemBytes = 96 * 1024;
// All in-block index arithmetic is 32-bit; widths stay well below INT_MAX.
constexpr int64_t kMaxWidth = int64_t(1) << 30;
constexpr int kMaxGridY = 65535;

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

KRON_HD float to_acc(float v) { return v; }
KRON_HD double to_acc(double v) { return v; }
KRON_HD float to_acc(__half v) { return __half2float(v); }
KRON_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

KRON_HD void store(float& d, float v) { d = v; }
KRON_HD void store(double& d, double v) { d = v; }
KRON_HD void store(__half& d, float v) { d = __float2half_rn(v); }
KRON_HD void store(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }

// Shape-only description of one launch, computed on the host by kron_plan.
// Step s of the forward applies mode step_mode[s] to a row tensor viewed as (a, p, c) with
// a = step_a[s], c = step_c[s]. The factor-grad kernel uses one table for its three uses of
// position s (suffix sweep, reduction, prefix sweep): modes earlier in the order have size p,
// later ones size q.
struct KronGeometry {
  int k;
  int rows;        // rows per unit (block iteration)
  int fac_total;   // sum_i p_i q_i
  int p[kKronMaxFactors], q[kKronMaxFactors];
  int fac_off[kKronMaxFactors];
  int step_mode[kKronMaxFactors], step_a[kKronMaxFactors], step_c[kKronMaxFactors];
  int buf_off[kKronMaxFactors + 2];  // per-row element offsets of the block's buffers
  int64_t groups, M, P, Q;
  int64_t nrb;            // row blocks per group
  int64_t scratch_block;  // wide mode: scratch elements owned by one block
};

template <class T, class Acc>
struct KronArgs {
  KronGeometry geo;
  const T* x;         // (G, M, P)
  const T* gy;        // (G, M, Q), factor grads only
  T* y;               // (G, M, Q), forward only
  Acc* partial;       // [G, gridDim.x, fac_total], factor grads only
  Acc* scratch;       // wide mode only
  const T* fac[kKronMaxFactors];  // (G, p_i, q_i) contiguous
};

// out[r, j, c] = sum_p in[r, p, c] * F[p, j] for r < outer, F[p, j] = fac[p * f_in + j * f_out].
// Tiles take rows r, r + nrt and columns j, j + njt, ... (strided) so that neighbouring threads
// touch neighbouring factor columns and output elements.
template <class Acc, class In, class Out, class F>
KRON_HD void mode_product(const In* __restrict__ in, Out* __restrict__ out,
                          const F* __restrict__ fac, int f_in, int f_out, int outer, int p, int q,
                          int c, int tid, int nthr) {
  const int nrt = (outer + kTileRows - 1) / kTileRows;
  const int njt = (q + kTileCols - 1) / kTileCols;
  const int items = nrt * njt * c;
  const int pc = p * c;
  const int qc = q * c;
  for (int t = tid; t < items; t += nthr) {
    const int cc = t % c;
    const int u = t / c;
    const int jt = u % njt;
    const int rt = u / njt;
    Acc acc[kTileRows][kTileCols] = {};
    for (int pp = 0; pp < p; ++pp) {
      Acc v[kTileRows];
      Acc f[kTileCols];
      KRON_UNROLL
      for (int r = 0; r < kTileRows; ++r) {
        const int ra = rt + r * nrt;
        v[r] = ra < outer ? to_acc(in[ra * pc + pp * c + cc]) : Acc(0);
      }
      KRON_UNROLL
      for (int jj = 0; jj < kTileCols; ++jj) {
        const int j = jt + jj * njt;
        f[jj] = j < q ? to_acc(fac[pp * f_in + j * f_out]) : Acc(0);
      }
      KRON_UNROLL
      for (int r = 0; r < kTileRows; ++r)
        KRON_UNROLL
        for (int jj = 0; jj < kTileCols; ++jj) acc[r][jj] += v[r] * f[jj];
    }
    KRON_UNROLL
    for (int r = 0; r < kTileRows; ++r) {
      const int ra = rt + r * nrt;
      KRON_UNROLL
      for (int jj = 0; jj < kTileCols; ++jj) {
        const int j = jt + jj * njt;
        if (ra < outer && j < q) store(out[ra * qc + j * c + cc], acc[r][jj]);
      }
    }
  }
}

// dst[pp * q + qq] (+)= sum_{r, c} S[r, pp, c] * B[r, qq, c]. Each entry is owned by `nsl`
// consecutive threads striding over (r, c); their partial sums are added in a fixed order, so the
// result does not depend on scheduling. Ends with a barrier.
template <class Acc, class SIn, class BIn, class Sync>
KRON_HD void factor_grad_reduce(const SIn* __restrict__ S, const BIn* __restrict__ B, int outer,
                                int p, int q, int c, Acc* red, Acc* dst, bool accumulate, int tid,
                                int nthr, Sync& sync) {
  const int E = p * q;
  const int N = outer * c;
  int nsl = 1;
  while (2 * nsl <= nthr / E) nsl *= 2;  // largest power of two with nsl * E <= nthr
  const int per = nthr / nsl;
  const int pc = p * c;
  const int qc = q * c;
  const int dra = nsl / c;
  const int dcc = nsl % c;
  for (int e0 = 0; e0 < E; e0 += per) {
    const int e = e0 + tid / nsl;
    const int sl = tid % nsl;
    Acc sum = Acc(0);
    if (tid < per * nsl && e < E) {
      const SIn* s = S + (e / q) * c;
      const BIn* b = B + (e % q) * c;
      int ra = sl / c;
      int cc = sl % c;
      for (int n = sl; n < N; n += nsl) {
        sum += to_acc(s[ra * pc + cc]) * to_acc(b[ra * qc + cc]);
        ra += dra;
        cc += dcc;
        if (cc >= c) {
          cc -= c;
          ++ra;
        }
      }
    }
    red[tid] = sum;
    sync();
    if (tid < per && e0 + tid < E) {
      Acc tot = Acc(0);
      for (int i = 0; i < nsl; ++i) tot += red[tid * nsl + i];
      Acc& d = dst[e0 + tid];
      d = accumulate ? d + tot : tot;
    }
    sync();
  }
}

template <class T, class Acc>
KRON_HD void stage_factors(const KronArgs<T, Acc>& a, Acc* fs, int64_t grp, int tid, int nthr) {
  for (int m = 0; m < a.geo.k; ++m) {
    const int n = a.geo.p[m] * a.geo.q[m];
    const T* src = a.fac[m] + grp * n;
    Acc* dst = fs + a.geo.fac_off[m];
    for (int i = tid; i < n; i += nthr) dst[i] = to_acc(src[i]);
  }
}

template <class T, class Acc>
KRON_HD void load_rows(const T* src, Acc* dst, int n, int tid, int nthr) {
  for (int i = tid; i < n; i += nthr) dst[i] = to_acc(src[i]);
}

// Applies factor m (or its transpose) to `outer` x (size, c) slices of src.
template <bool kStageF, class T, class Acc, class In, class Out>
KRON_HD void apply_factor(const KronArgs<T, Acc>& a, const Acc* fs, int64_t grp, int m,
                          bool transposed, const In* src, Out* dst, int outer, int c, int tid,
                          int nthr) {
  const int p = a.geo.p[m];
  const int q = a.geo.q[m];
  const int f_in = transposed ? 1 : q;
  const int f_out = transposed ? q : 1;
  const int n_in = transposed ? q : p;
  const int n_out = transposed ? p : q;
  if constexpr (kStageF) {
    mode_product<Acc>(src, dst, fs + a.geo.fac_off[m], f_in, f_out, outer, n_in, n_out, c, tid,
                      nthr);
  } else {
    mode_product<Acc>(src, dst, a.fac[m] + grp * p * q, f_in, f_out, outer, n_in, n_out, c, tid,
                      nthr);
  }
}

// Everything one thread block of the forward kernel does; (bx, by) of a (gx, gy) grid.
template <bool kWide, bool kStageF, class T, class Acc, class Sync>
KRON_HD void kron_fwd_block(const KronArgs<T, Acc>& a, Acc* smem, int bx, int by, int gx, int gy,
                            int tid, int nthr, Sync& sync) {
  const KronGeometry& g = a.geo;
  Acc* const fs = smem;
  Acc* const region = kWide ? a.scratch + (int64_t(by) * gx + bx) * g.scratch_block
                            : smem + (kStageF ? g.fac_total : 0);
  Acc* const buf0 = region;
  Acc* const buf1 = region + g.rows * g.buf_off[1];
  for (int64_t grp = by; grp < g.groups; grp += gy) {
    for (int64_t rb = bx; rb < g.nrb; rb += gx) {
      const int64_t row0 = rb * g.rows;
      const int rows = int(g.M - row0 < g.rows ? g.M - row0 : g.rows);
      const T* x = a.x + (grp * g.M + row0) * g.P;
      T* y = a.y + (grp * g.M + row0) * g.Q;
      sync();  // the previous unit may still read the buffers / staged factors
      if (kStageF && rb == bx) stage_factors(a, fs, grp, tid, nthr);
      if (!kWide) load_rows(x, buf0, rows * int(g.P), tid, nthr);
      sync();
      for (int s = 0; s < g.k; ++s) {
        const int m = g.step_mode[s];
        const int outer = rows * g.step_a[s];
        const int c = g.step_c[s];
        const bool last = s + 1 == g.k;
        Acc* const src = (s & 1) ? buf1 : buf0;
        Acc* const dst = (s & 1) ? buf0 : buf1;
        bool from_x = false;
        if constexpr (kWide) from_x = s == 0;
        if (from_x) {
          if (last) apply_factor<kStageF>(a, fs, grp, m, false, x, y, outer, c, tid, nthr);
          else apply_factor<kStageF>(a, fs, grp, m, false, x, dst, outer, c, tid, nthr);
        } else {
          if (last) apply_factor<kStageF>(a, fs, grp, m, false, src, y, outer, c, tid, nthr);
          else apply_factor<kStageF>(a, fs, grp, m, false, src, dst, outer, c, tid, nthr);
        }
        if (!last) sync();
      }
    }
  }
}

// Factor gradients of one block. With the modes in order m_0..m_{k-1}:
//   S_s = x with modes after position s multiplied by their factor   (suffix sweep, all kept),
//   B_s = grad_y with modes before s multiplied by their transpose    (prefix sweep),
//   grad A_{m_s}[p, q] = sum S_s[r, a, p, c] B_s[r, a, q, c].
// S_{k-1} = x and B_0 = grad_y; B_{s+1} has the shape of S_s and overwrites it once grad s is done,
// so the block needs sum_{s<k-1} |S_s| + P + Q elements per row.
template <bool kWide, bool kStageF, class T, class Acc, class Sync>
KRON_HD void kron_factor_grad_block(const KronArgs<T, Acc>& a, Acc* smem, int bx, int by, int gx,
                                    int gy, int tid, int nthr, Sync& sync) {
  const KronGeometry& g = a.geo;
  const int k = g.k;
  Acc* const fs = smem;
  Acc* const red = smem + (kStageF ? g.fac_total : 0);
  Acc* const region = kWide ? a.scratch + (int64_t(by) * gx + bx) * g.scratch_block
                            : red + kThreads;
  for (int64_t grp = by; grp < g.groups; grp += gy) {
    for (int64_t rb = bx; rb < g.nrb; rb += gx) {
      const int64_t row0 = rb * g.rows;
      const int rows = int(g.M - row0 < g.rows ? g.M - row0 : g.rows);
      const T* x = a.x + (grp * g.M + row0) * g.P;
      const T* gyr = a.gy + (grp * g.M + row0) * g.Q;
      Acc* const part = a.partial + (grp * gx + bx) * g.fac_total;
      const bool accumulate = rb != bx;
      sync();
      if (kStageF && rb == bx) stage_factors(a, fs, grp, tid, nthr);
      if (!kWide) {
        load_rows(x, region + g.rows * g.buf_off[k - 1], rows * int(g.P), tid, nthr);
        load_rows(gyr, region + g.rows * g.buf_off[k], rows * int(g.Q), tid, nthr);
      }
      sync();
      for (int s = k - 1; s >= 1; --s) {
        const int m = g.step_mode[s];
        const int outer = rows * g.step_a[s];
        const int c = g.step_c[s];
        Acc* const dst = region + g.rows * g.buf_off[s - 1];
        Acc* const src = region + g.rows * g.buf_off[s];
        bool from_x = false;
        if constexpr (kWide) from_x = s == k - 1;
        if (from_x) apply_factor<kStageF>(a, fs, grp, m, false, x, dst, outer, c, tid, nthr);
        else apply_factor<kStageF>(a, fs, grp, m, false, src, dst, outer, c, tid, nthr);
        sync();
      }
      for (int s = 0; s < k; ++s) {
        const int m = g.step_mode[s];
        const int outer = rows * g.step_a[s];
        const int c = g.step_c[s];
        const int p = g.p[m];
        const int q = g.q[m];
        Acc* const sbuf = region + g.rows * g.buf_off[s];
        Acc* const bbuf = region + g.rows * g.buf_off[s == 0 ? k : s - 1];
        Acc* const dst = part + g.fac_off[m];
        bool s_is_x = false;
        bool b_is_gy = false;
        if constexpr (kWide) {
          s_is_x = s == k - 1;
          b_is_gy = s == 0;
        }
        if (s_is_x && b_is_gy)
          factor_grad_reduce(x, gyr, outer, p, q, c, red, dst, accumulate, tid, nthr, sync);
        else if (s_is_x)
          factor_grad_reduce(x, bbuf, outer, p, q, c, red, dst, accumulate, tid, nthr, sync);
        else if (b_is_gy)
          factor_grad_reduce(sbuf, gyr, outer, p, q, c, red, dst, accumulate, tid, nthr, sync);
        else
          factor_grad_reduce(sbuf, bbuf, outer, p, q, c, red, dst, accumulate, tid, nthr, sync);
        if (s + 1 < k) {
          if (b_is_gy) apply_factor<kStageF>(a, fs, grp, m, true, gyr, sbuf, outer, c, tid, nthr);
          else apply_factor<kStageF>(a, fs, grp, m, true, bbuf, sbuf, outer, c, tid, nthr);
          sync();
        }
      }
    }
  }
}

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

// minBlocksPerSM = 2 caps registers at 128: without it ptxas picked tighter register targets for
// the wide variants on sm_80 and spilled.
template <class T, bool kWide, bool kStageF>
__global__ void __launch_bounds__(kThreads, 2)
    kron_fwd_kernel(const __grid_constant__ KronArgs<T, acc_t<T>> a) {
  extern __shared__ __align__(16) unsigned char kron_smem[];
  BlockSync sync;
  kron_fwd_block<kWide, kStageF>(a, reinterpret_cast<acc_t<T>*>(kron_smem), blockIdx.x, blockIdx.y,
                                 gridDim.x, gridDim.y, threadIdx.x, blockDim.x, sync);
}

template <class T, bool kWide, bool kStageF>
__global__ void __launch_bounds__(kThreads, 2)
    kron_factor_grad_kernel(const __grid_constant__ KronArgs<T, acc_t<T>> a) {
  extern __shared__ __align__(16) unsigned char kron_smem[];
  BlockSync sync;
  kron_factor_grad_block<kWide, kStageF>(a, reinterpret_cast<acc_t<T>*>(kron_smem), blockIdx.x,
                                         blockIdx.y, gridDim.x, gridDim.y, threadIdx.x,
                                         blockDim.x, sync);
}

// ---------------------------------------------------------------------------------------------
// Host-side planning.

struct KronLimits {
  int sms;
  size_t smem_optin;
};

struct KronPlan {
  KronGeometry geo;
  bool empty;    // nothing to compute (a zero-sized dimension)
  bool wide;     // buffers in global scratch
  bool stage_f;  // factors staged in shared memory
  unsigned gx, gy;
  size_t smem_bytes;
  size_t scratch_bytes;
};

inline int64_t sat_mul(int64_t a, int64_t b) {
  constexpr int64_t kBig = int64_t(1) << 62;
  if (a == 0 || b == 0) return 0;
  return a > kBig / b ? kBig : a * b;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Deterministic for given shapes and limits: the workspace query and the launch must agree.
// Forward: modes sorted by q/p ascending keep every intermediate within max(P, Q) wide.
// Factor grads: descending q/p makes both sweeps' intermediates as narrow as possible.
inline cudaError_t kron_plan(int64_t G, int64_t M, int k, const int64_t* p, const int64_t* q,
                             bool grads, size_t acc_bytes, const KronLimits& lim, KronPlan* out) {
  KronPlan plan{};
  KronGeometry& geo = plan.geo;
  if (k < 1 || k > kKronMaxFactors || G < 0 || M < 0 || lim.sms < 1) return cudaErrorInvalidValue;
  int64_t P = 1, Q = 1, F = 0;
  for (int i = 0; i < k; ++i) {
    if (p[i] < 0 || q[i] < 0 || p[i] > kMaxWidth || q[i] > kMaxWidth) return cudaErrorInvalidValue;
    P = sat_mul(P, p[i]);
    Q = sat_mul(Q, q[i]);
    F += sat_mul(p[i], q[i]);
    if (F > kMaxWidth) return cudaErrorInvalidValue;
  }
  if (P > kMaxWidth || Q > kMaxWidth) return cudaErrorInvalidValue;
  geo.k = k;
  geo.groups = G;
  geo.M = M;
  geo.P = P;
  geo.Q = Q;
  geo.fac_total = int(F);
  for (int i = 0, off = 0; i < k; ++i) {
    geo.p[i] = int(p[i]);
    geo.q[i] = int(q[i]);
    geo.fac_off[i] = off;
    off += int(p[i] * q[i]);
  }
  if (G == 0 || M == 0 || P == 0 || Q == 0) {
    plan.empty = true;
    *out = plan;
    return cudaSuccess;
  }

  int order[kKronMaxFactors];
  int pos[kKronMaxFactors];
  for (int i = 0; i < k; ++i) order[i] = i;
  // Stable insertion sort by q/p (ascending for the forward, descending for factor grads).
  for (int i = 1; i < k; ++i) {
    for (int j = i; j > 0; --j) {
      const int u = order[j - 1], v = order[j];
      const int64_t lhs = q[v] * p[u], rhs = q[u] * p[v];
      if (grads ? lhs > rhs : lhs < rhs) std::swap(order[j - 1], order[j]);
      else break;
    }
  }
  for (int s = 0; s < k; ++s) pos[order[s]] = s;

  // width_in[s] / width_out[s]: row width before / after step s (forward), or |S_s| / |B_s|.
  int64_t width_in[kKronMaxFactors], width_out[kKronMaxFactors];
  for (int s = 0; s < k; ++s) {
    const int m = order[s];
    int64_t a = 1, c = 1;
    for (int l = 0; l < k; ++l) {
      if (l == m) continue;
      const bool before = pos[l] < s;
      const int64_t w = grads ? (before ? p[l] : q[l]) : (before ? q[l] : p[l]);
      if (l < m) a = sat_mul(a, w);
      else c = sat_mul(c, w);
    }
    width_in[s] = sat_mul(sat_mul(a, p[m]), c);
    width_out[s] = sat_mul(sat_mul(a, q[m]), c);
    if (width_in[s] > kMaxWidth || width_out[s] > kMaxWidth) return cudaErrorInvalidValue;
    geo.step_mode[s] = m;
    geo.step_a[s] = int(a);
    geo.step_c[s] = int(c);
  }

  // Per-row buffer layouts for the shared-memory (staged x) and wide (x read in place) variants.
  int64_t off_smem[kKronMaxFactors + 2] = {0}, off_wide[kKronMaxFactors + 2] = {0};
  int nbuf;
  if (!grads) {
    int64_t w_smem[2] = {0, 0}, w_wide[2] = {0, 0};
    for (int s = 0; s < k; ++s) {
      w_smem[s & 1] = std::max(w_smem[s & 1], width_in[s]);
      if (s > 0) w_wide[s & 1] = std::max(w_wide[s & 1], width_in[s]);
    }
    nbuf = 2;
    for (int b = 0; b < 2; ++b) {
      off_smem[b + 1] = off_smem[b] + w_smem[b];
      off_wide[b + 1] = off_wide[b] + w_wide[b];
    }
  } else {
    nbuf = k + 1;
    for (int s = 0; s + 1 < k; ++s) off_smem[s + 1] = off_smem[s] + width_in[s];
    off_smem[k] = off_smem[k - 1] + P;
    off_smem[k + 1] = off_smem[k] + Q;
    for (int s = 0; s < k; ++s) off_wide[s] = off_smem[s];
  }
  const int64_t row_smem = off_smem[nbuf];
  const int64_t row_wide = grads ? off_wide[k - 1] : off_wide[2];

  const int64_t ab = int64_t(acc_bytes);
  const int64_t hard = int64_t(std::min(kMaxSmemBytes, lim.smem_optin)) / ab;
  const int64_t soft = int64_t(std::min(kSoftSmemBytes, lim.smem_optin)) / ab;
  const int64_t fixed = grads ? kThreads : 0;
  if (fixed + F + row_smem <= hard) {
    plan.stage_f = true;
  } else if (fixed + row_smem <= hard) {
    plan.stage_f = false;
  } else {
    plan.wide = true;
    plan.stage_f = fixed + F <= hard;
  }
  const int64_t base = fixed + (plan.stage_f ? F : 0);
  int64_t rows = 1;
  if (!plan.wide) {
    if (base + row_smem <= soft) rows = (soft - base) / row_smem;
    // Keep at least ~2 blocks per SM busy when there are few rows.
    rows = std::max<int64_t>(1, std::min({rows, M, ceil_div(G * M, 2 * int64_t(lim.sms))}));
  }
  geo.rows = int(rows);
  geo.nrb = ceil_div(M, rows);
  const int64_t* off = plan.wide ? off_wide : off_smem;
  for (int b = 0; b <= nbuf; ++b) geo.buf_off[b] = int(off[b]);

  if (!grads && !plan.wide) {
    plan.gy = unsigned(std::min<int64_t>(G, kMaxGridY));
    plan.gx = unsigned(std::min<int64_t>(geo.nrb, INT_MAX));
  } else {
    // Grid-stride blocks: bounded scratch / partial-sum rows, enough blocks to fill the GPU.
    const int64_t target = 4 * int64_t(lim.sms);
    plan.gy = unsigned(std::min<int64_t>({G, kMaxGridY, target}));
    plan.gx = unsigned(std::max<int64_t>(1, std::min(geo.nrb, ceil_div(target, plan.gy))));
  }
  if (plan.wide) {
    geo.scratch_block = row_wide;
    plan.scratch_bytes = size_t(plan.gx) * plan.gy * size_t(row_wide) * acc_bytes;
  }
  plan.smem_bytes = size_t(base + (plan.wide ? 0 : rows * row_smem)) * acc_bytes;
  *out = plan;
  return cudaSuccess;
}

inline cudaError_t query_limits(KronLimits* lim) {
  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  lim->sms = sms;
  lim->smem_optin = size_t(optin);
  return err;
}

template <class T>
cudaError_t plan_for_device(int64_t G, int64_t M, int k, const int64_t* p, const int64_t* q,
                            bool grads, KronPlan* plan) {
  KronLimits lim;
  const cudaError_t err = query_limits(&lim);
  if (err != cudaSuccess) return err;
  return kron_plan(G, M, k, p, q, grads, sizeof(acc_t<T>), lim, plan);
}

template <class T>
KronArgs<T, acc_t<T>> make_args(const KronPlan& plan, const T* x, const T* const* factors,
                                void* scratch) {
  KronArgs<T, acc_t<T>> a{};
  a.geo = plan.geo;
  a.x = x;
  a.scratch = static_cast<acc_t<T>*>(scratch);
  for (int i = 0; i < plan.geo.k; ++i) a.fac[i] = factors[i];
  return a;
}

template <class Kernel, class Args>
cudaError_t launch(Kernel kernel, const KronPlan& plan, const Args& args, cudaStream_t stream) {
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(plan.gx, plan.gy), kThreads, plan.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kron_detail

// Workspace the caller must allocate before a launch with the same arguments on the current
// device. scratch_bytes: device scratch (non-zero only for rows too wide for shared memory).
// partial_blocks: for factor_grads, the partial sums are [groups, partial_blocks, sum_i p_i q_i]
// in the accumulation type (float; double for T = double), factor i at offset sum_{l<i} p_l q_l
// as a row-major (p_i, q_i) block; the caller sums over dim 1. For grad_x pass the transposed
// dims (p and q swapped) with factor_grads = false.
template <typename T>
cudaError_t kron_matmul_workspace(int64_t groups, int64_t rows, int k, const int64_t* p,
                                  const int64_t* q, bool factor_grads, size_t* scratch_bytes,
                                  int64_t* partial_blocks) {
  kron_detail::KronPlan plan;
  const cudaError_t err =
      kron_detail::plan_for_device<T>(groups, rows, k, p, q, factor_grads, &plan);
  if (err != cudaSuccess) return err;
  *scratch_bytes = plan.scratch_bytes;
  *partial_blocks = (factor_grads && !plan.empty) ? int64_t(plan.gx) : 0;
  return cudaSuccess;
}

// y (G, M, Q) = x (G, M, P) @ kron(factors[0][g], ..., factors[k-1][g]); factors[i] is a device
// pointer to (G, p_i, q_i), all contiguous. grad_x is this call with grad_y as x and the factors
// pre-transposed to (G, q_i, p_i).
template <typename T>
cudaError_t kron_matmul_fwd(const T* x, const T* const* factors, T* y, int64_t groups,
                            int64_t rows, int k, const int64_t* p, const int64_t* q,
                            void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  using namespace kron_detail;
  KronPlan plan;
  cudaError_t err = plan_for_device<T>(groups, rows, k, p, q, false, &plan);
  if (err != cudaSuccess) return err;
  if (plan.empty) {
    const size_t n = size_t(groups) * size_t(rows) * size_t(plan.geo.Q);
    return n == 0 ? cudaSuccess : cudaMemsetAsync(y, 0, n * sizeof(T), stream);
  }
  if (scratch_bytes < plan.scratch_bytes) return cudaErrorInvalidValue;
  KronArgs<T, acc_t<T>> args = make_args(plan, x, factors, scratch);
  args.y = y;
  if (plan.wide)
    return plan.stage_f ? launch(kron_fwd_kernel<T, true, true>, plan, args, stream)
                        : launch(kron_fwd_kernel<T, true, false>, plan, args, stream);
  return plan.stage_f ? launch(kron_fwd_kernel<T, false, true>, plan, args, stream)
                      : launch(kron_fwd_kernel<T, false, false>, plan, args, stream);
}

// Per-block partial sums of the factor gradients of y = x @ kron(factors) given grad_y; see
// kron_matmul_workspace for the layout of `partials`. Acc is float (double for T = double).
template <typename T, typename Acc>
cudaError_t kron_matmul_factor_grads(const T* x, const T* grad_y, const T* const* factors,
                                     Acc* partials, int64_t groups, int64_t rows, int k,
                                     const int64_t* p, const int64_t* q, void* scratch,
                                     size_t scratch_bytes, cudaStream_t stream) {
  using namespace kron_detail;
  static_assert(std::is_same<Acc, acc_t<T>>::value, "partials must use the accumulation type");
  KronPlan plan;
  cudaError_t err = plan_for_device<T>(groups, rows, k, p, q, true, &plan);
  if (err != cudaSuccess || plan.empty) return err;
  if (scratch_bytes < plan.scratch_bytes) return cudaErrorInvalidValue;
  KronArgs<T, Acc> args = make_args(plan, x, factors, scratch);
  args.gy = grad_y;
  args.partial = partials;
  if (plan.wide)
    return plan.stage_f ? launch(kron_factor_grad_kernel<T, true, true>, plan, args, stream)
                        : launch(kron_factor_grad_kernel<T, true, false>, plan, args, stream);
  return plan.stage_f ? launch(kron_factor_grad_kernel<T, false, true>, plan, args, stream)
                      : launch(kron_factor_grad_kernel<T, false, false>, plan, args, stream);
}

#define SPECOPS_KRON_INSTANTIATE(T, ACC)                                                       \
  template cudaError_t kron_matmul_workspace<T>(int64_t, int64_t, int, const int64_t*,         \
                                                const int64_t*, bool, size_t*, int64_t*);      \
  template cudaError_t kron_matmul_fwd<T>(const T*, const T* const*, T*, int64_t, int64_t, int, \
                                          const int64_t*, const int64_t*, void*, size_t,       \
                                          cudaStream_t);                                       \
  template cudaError_t kron_matmul_factor_grads<T, ACC>(                                       \
      const T*, const T*, const T* const*, ACC*, int64_t, int64_t, int, const int64_t*,        \
      const int64_t*, void*, size_t, cudaStream_t);

SPECOPS_KRON_INSTANTIATE(float, float)
SPECOPS_KRON_INSTANTIATE(double, double)
SPECOPS_KRON_INSTANTIATE(__half, float)
SPECOPS_KRON_INSTANTIATE(__nv_bfloat16, float)

#undef SPECOPS_KRON_INSTANTIATE

}  // namespace cuda
}  // namespace specops
