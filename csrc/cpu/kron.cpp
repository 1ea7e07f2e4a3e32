// Kronecker-factored matmul on the CPU: y = x @ (A_1 ⊗ ... ⊗ A_k), never building the product.
//
// A row of x is a tensor of shape (p_1, ..., p_k); y = x ×_1 A_1 ×_2 ... ×_k A_k, k mode
// products. A block of R rows goes through all k of them while it stays in L2: it is held
// TRANSPOSED (element w of row r at buf[w * R + r]) so that every mode product, viewed as
// out[a, j, l] = Σ_p in[a, p, l] · A[p, j], runs over a contiguous inner length L = c · R that is a
// multiple of the vector width whatever the factor sizes (primes, 1s waste no lanes).
//
// Backward, in one sweep per block: S_i = x ×_{l>i} A_l (suffix products, kept),
// B_i = g ×_{l<i} A_l^T (prefix products, rolling); grad A_i[p, j] = Σ S_i[a, p, l] B_i[a, j, l];
// B_k is grad_x. Factor gradients are reduced per fixed chunk of blocks, then summed in chunk
// order, so results do not depend on thread scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace specops {
namespace cpu {
namespace {

// Shapes of one call. Widths are in elements of a row.
struct KronPlan {
  int64_t G, M, P, Q, k, R, wmax;
  std::vector<int64_t> p, q;
};

template <typename acc_t>
KronPlan make_plan(int64_t G, int64_t M, at::TensorList factors) {
  KronPlan pl;
  pl.G = G;
  pl.M = M;
  pl.k = static_cast<int64_t>(factors.size());
  pl.P = 1;
  pl.Q = 1;
  for (const auto& f : factors) {
    pl.p.push_back(f.size(1));
    pl.q.push_back(f.size(2));
    pl.P *= f.size(1);
    pl.Q *= f.size(2);
  }
  // Widths met on the way (last mode first): prod_{l<i} p_l * prod_{l>=i} q_l, i = k..0.
  pl.wmax = pl.P;
  int64_t w = pl.P;
  for (int64_t i = pl.k - 1; i >= 0; --i) {
    w = w / pl.p[i] * pl.q[i];
    pl.wmax = std::max(pl.wmax, w);
  }
  // Rows per block: as many vectors of rows as keep two buffers within ~256 KiB (measured: smaller
  // blocks beat 512 KiB and 1 MiB ones for SODA's widths now that the transposes are cheap).
  constexpr int64_t lanes = Simd<acc_t>::kLanes;
  const int64_t budget = 256 * 1024;
  int64_t R = 64;
  while (R > lanes && 2 * R * pl.wmax * static_cast<int64_t>(sizeof(acc_t)) > budget) R /= 2;
  const int64_t m_round = ((std::max<int64_t>(M, 1) + lanes - 1) / lanes) * lanes;
  pl.R = std::max(lanes, std::min(R, m_round));
  return pl;
}

// Rows [0, rows) of a (rows, W) row-major matrix with row stride ld -> buf (W, R), zero padded.
// Full kLanes x kLanes tiles go through transpose_tile straight from x; tiles with missing rows
// or another dtype are widened row by row into a local tile first; ragged columns go element by element.
template <typename scalar_t, typename acc_t>
void load_block(const scalar_t* x, int64_t ld, int64_t rows, int64_t W, int64_t R, acc_t* buf) {
  using S = Simd<acc_t>;
  constexpr int64_t N = S::kLanes;
  const int64_t wfull = W - W % N;
  alignas(64) acc_t t[N * N];
  for (int64_t r0 = 0; r0 < R; r0 += N) {
    const int64_t nr = std::min(N, rows - r0);  // <= 0 past the last row
    const bool direct = std::is_same_v<scalar_t, acc_t> && nr == N;
    for (int64_t w0 = 0; w0 < wfull; w0 += N) {
      acc_t* dst = buf + w0 * R + r0;
      if (direct) {
        transpose_tile<acc_t>(reinterpret_cast<const acc_t*>(x + r0 * ld + w0), ld, dst, R);
        continue;
      }
      for (int64_t i = 0; i < N; ++i)
        S::store(t + i * N, i < nr ? Widen<scalar_t, acc_t>::load(x + (r0 + i) * ld + w0) : typename S::vec{});
      transpose_tile<acc_t>(t, N, dst, R);
    }
  }
  for (int64_t w = wfull; w < W; ++w)
    for (int64_t r = 0; r < R; ++r) buf[w * R + r] = r < rows ? static_cast<acc_t>(x[r * ld + w]) : acc_t(0);
}

// buf (W, R) -> rows [0, rows) of y, the inverse of load_block. With stream, whole aligned
// lines of y are written non-temporally (see stream_output); the caller fences once at the end.
template <typename scalar_t, typename acc_t>
void store_block(const acc_t* buf, int64_t W, int64_t R, int64_t rows, scalar_t* y, int64_t ld,
                 bool stream = false) {
  using S = Simd<acc_t>;
  constexpr int64_t N = S::kLanes;
  const int64_t wfull = W - W % N;
  stream = stream && std::is_same_v<scalar_t, acc_t> && ld % N == 0 &&
           reinterpret_cast<uintptr_t>(y) % 64 == 0;
  alignas(64) acc_t t[N * N];
  for (int64_t r0 = 0; r0 < rows; r0 += N) {
    const int64_t nr = std::min(N, rows - r0);
    const bool direct = std::is_same_v<scalar_t, acc_t> && nr == N && !stream;
    for (int64_t w0 = 0; w0 < wfull; w0 += N) {
      const acc_t* src = buf + w0 * R + r0;
      acc_t* dst = reinterpret_cast<acc_t*>(y + r0 * ld + w0);
      if (direct) {
        transpose_tile<acc_t>(src, R, dst, ld);
        continue;
      }
      transpose_tile<acc_t>(src, R, t, N);
      for (int64_t i = 0; i < nr; ++i) {
        if (stream)
          S::stream(dst + i * ld, S::load(t + i * N));
        else
          Widen<scalar_t, acc_t>::store(y + (r0 + i) * ld + w0, S::load(t + i * N));
      }
    }
  }
  for (int64_t w = wfull; w < W; ++w)
    for (int64_t r = 0; r < rows; ++r) y[r * ld + w] = static_cast<scalar_t>(buf[w * R + r]);
}

// Whether an output of `bytes` is written past the caches (non-temporal stores): it pays when
// the output is too large to stay in the last-level cache (over 16 MiB, half the L3 one Zen 4
// core complex shares; sysconf reports the socket's 320 MB, which no core sees) and its pages
// are recycled ones, whose lines write-allocate would first read. glibc mmaps every allocation
// of 32 MiB or more afresh (its largest mmap threshold), and a fresh page is zeroed into the cache
// by the kernel, so there streaming only evicts. Measured (2 threads, fp32, M=4096): (4,16,20),
// 21 MB, 3.3 -> 3.0 ms; (4,8,64), 32 MiB, 19.2 -> 20.8 ms; M=1024 (4,16,20), 5 MB, 4% slower.
inline bool stream_output(int64_t bytes) {
  return bytes > (int64_t(16) << 20) && bytes < (int64_t(32) << 20);
}

// JB output columns of one mode product over NV vectors of the inner length:
// dst[jb * L + v] = Σ_i A[i, jb] · src[i * L + v]. JB x NV accumulators hide the FMA latency, and
// each broadcast factor entry serves NV vectors (with NV = 1 the broadcasts, one load per FMA,
// held the kernel at the load ports).
template <typename acc_t, int JB, int NV>
inline void mode_tile(const acc_t* src, acc_t* dst, const acc_t* A, int64_t p, int64_t q,
                      int64_t L) {
  using S = Simd<acc_t>;
  constexpr int64_t W = S::kLanes;
  // Every loop over jb and v unrolled, so that acc lives in registers (GCC left it on the stack
  // otherwise: the whole forward took 6.2 instead of 5.5 ms single-threaded at (4,16,20)).
  typename S::vec acc[NV][JB];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
    for (int jb = 0; jb < JB; ++jb) acc[v][jb] = typename S::vec{};
  for (int64_t i = 0; i < p; ++i) {
    typename S::vec x[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) x[v] = S::load(src + i * L + v * W);
    const acc_t* a = A + i * q;
#pragma GCC unroll 8
    for (int jb = 0; jb < JB; ++jb) {
      const acc_t w = a[jb];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[v][jb] += w * x[v];
    }
  }
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
    for (int jb = 0; jb < JB; ++jb) S::store(dst + jb * L + v * W, acc[v][jb]);
}

// Every output column j of one mode product over NV vectors at src, dst (tiles of 8, then the rest).
template <typename acc_t, int NV>
inline void mode_columns(const acc_t* src, acc_t* dst, const acc_t* A, int64_t p, int64_t q, int64_t L) {
  int64_t j = 0;
  for (; j + 8 <= q; j += 8) mode_tile<acc_t, 8, NV>(src, dst + j * L, A + j, p, q, L);
  acc_t* d = dst + j * L;
  const acc_t* Aj = A + j;
  switch (q - j) {
    case 7: mode_tile<acc_t, 7, NV>(src, d, Aj, p, q, L); break;
    case 6: mode_tile<acc_t, 6, NV>(src, d, Aj, p, q, L); break;
    case 5: mode_tile<acc_t, 5, NV>(src, d, Aj, p, q, L); break;
    case 4: mode_tile<acc_t, 4, NV>(src, d, Aj, p, q, L); break;
    case 3: mode_tile<acc_t, 3, NV>(src, d, Aj, p, q, L); break;
    case 2: mode_tile<acc_t, 2, NV>(src, d, Aj, p, q, L); break;
    case 1: mode_tile<acc_t, 1, NV>(src, d, Aj, p, q, L); break;
    default: break;
  }
}

// out (a, q, L) = in (a, p, L) contracted with A (p, q) over p.
template <typename acc_t>
void mode_product(const acc_t* in, acc_t* out, const acc_t* A, int64_t a, int64_t p, int64_t q,
                  int64_t L) {
  constexpr int64_t W = Simd<acc_t>::kLanes;
  for (int64_t ai = 0; ai < a; ++ai) {
    const acc_t* src = in + ai * p * L;
    acc_t* dst = out + ai * q * L;
    int64_t l = 0;
    for (; l + 2 * W <= L; l += 2 * W) mode_columns<acc_t, 2>(src + l, dst + l, A, p, q, L);
    if (l < L) mode_columns<acc_t, 1>(src + l, dst + l, A, p, q, L);
  }
}

// g[pb, jb] += Σ_{a, l} S[a, pb, l] · B[a, jb, l] for a PB x JB tile (S, B, g at the tile origin).
template <typename acc_t, int PB, int JB>
void contract_tile(const acc_t* S, const acc_t* B, int64_t a, int64_t sS, int64_t sB, int64_t L,
                   acc_t* g, int64_t ldg) {
  using V = Simd<acc_t>;
  typename V::vec acc[PB][JB];  // in registers only with every loop over i, j unrolled
#pragma GCC unroll 4
  for (int i = 0; i < PB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < JB; ++j) acc[i][j] = typename V::vec{};
  for (int64_t ai = 0; ai < a; ++ai) {
    const acc_t* s = S + ai * sS;
    const acc_t* b = B + ai * sB;
    for (int64_t l = 0; l < L; l += V::kLanes) {
      typename V::vec sv[PB], bv[JB];
#pragma GCC unroll 4
      for (int i = 0; i < PB; ++i) sv[i] = V::load(s + i * L + l);
#pragma GCC unroll 4
      for (int j = 0; j < JB; ++j) bv[j] = V::load(b + j * L + l);
#pragma GCC unroll 4
      for (int i = 0; i < PB; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < JB; ++j) acc[i][j] += sv[i] * bv[j];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < PB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < JB; ++j) g[i * ldg + j] += V::sum(acc[i][j]);
}

template <typename acc_t>
using ContractFn = void (*)(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, int64_t,
                            acc_t*, int64_t);

template <typename acc_t, int PB>
ContractFn<acc_t> contract_pick_j(int64_t jb) {
  switch (jb) {
    case 1: return &contract_tile<acc_t, PB, 1>;
    case 2: return &contract_tile<acc_t, PB, 2>;
    case 3: return &contract_tile<acc_t, PB, 3>;
    default: return &contract_tile<acc_t, PB, 4>;
  }
}

template <typename acc_t>
ContractFn<acc_t> contract_pick(int64_t pb, int64_t jb) {
  switch (pb) {
    case 1: return contract_pick_j<acc_t, 1>(jb);
    case 2: return contract_pick_j<acc_t, 2>(jb);
    case 3: return contract_pick_j<acc_t, 3>(jb);
    default: return contract_pick_j<acc_t, 4>(jb);
  }
}

// g (p, q) += Σ_{a, l} S (a, p, L)[a, i, l] · B (a, q, L)[a, j, l], in 4 x 4 register tiles.
template <typename acc_t>
void contract(const acc_t* S, const acc_t* B, int64_t a, int64_t p, int64_t q, int64_t L,
              acc_t* g) {
  for (int64_t i = 0; i < p; i += 4) {
    const int64_t pb = std::min<int64_t>(4, p - i);
    for (int64_t j = 0; j < q; j += 4) {
      const int64_t jb = std::min<int64_t>(4, q - j);
      contract_pick<acc_t>(pb, jb)(S + i * L, B + j * L, a, p * L, q * L, L, g + i * q + j, q);
    }
  }
}

// Factors as (G, p, q) contiguous tensors of the accumulation type (transposed on request).
template <typename acc_t>
std::vector<at::Tensor> factors_as(at::TensorList factors, bool transpose) {
  std::vector<at::Tensor> out;
  for (const auto& f : factors) {
    auto t = transpose ? f.transpose(1, 2) : f;
    out.push_back(t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous());
  }
  return out;
}

// y (G, M, Q) = x (G, M, P) @ kron(A), A given as (G, p_i, q_i) acc_t tensors; x and y are not
// empty (the entry points return early for empty ones).
template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& x, const std::vector<at::Tensor>& A, at::Tensor& y) {
  const KronPlan pl = make_plan<acc_t>(x.size(0), x.size(1), A);
  const int64_t nbm = (pl.M + pl.R - 1) / pl.R;
  const int64_t nblocks = pl.G * nbm;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t sxg = x.stride(0), sxm = x.stride(1);
  std::vector<const acc_t*> ap;
  for (const auto& t : A) ap.push_back(t.const_data_ptr<acc_t>());
  const bool stream = stream_output(y.numel() * y.element_size());

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch<acc_t> buf0(pl.wmax * pl.R), buf1(pl.wmax * pl.R);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / nbm, m0 = (b % nbm) * pl.R;
      const int64_t rows = std::min(pl.R, pl.M - m0);
      acc_t* cur = buf0.get();
      acc_t* nxt = buf1.get();
      load_block(xp + g * sxg + m0 * sxm, sxm, rows, pl.P, pl.R, cur);
      int64_t a = pl.P, c = 1;
      for (int64_t i = pl.k - 1; i >= 0; --i) {
        a /= pl.p[i];
        mode_product(cur, nxt, ap[i] + g * pl.p[i] * pl.q[i], a, pl.p[i], pl.q[i], c * pl.R);
        c *= pl.q[i];
        std::swap(cur, nxt);
      }
      store_block(cur, pl.Q, pl.R, rows, yp + (g * pl.M + m0) * pl.Q, pl.Q, stream);
    }
    if (stream) Simd<acc_t>::fence();
  });
}

// Factor gradients (and grad_x when need_x) in one sweep per block; see the file comment.
template <typename scalar_t, typename acc_t>
void backward(const at::Tensor& gy, const at::Tensor& x, const std::vector<at::Tensor>& A,
              const std::vector<at::Tensor>& At, bool need_x, at::Tensor& gx,
              std::vector<at::Tensor>& gA) {
  const KronPlan pl = make_plan<acc_t>(x.size(0), x.size(1), A);
  const int64_t k = pl.k, R = pl.R;
  const int64_t nbm = (pl.M + R - 1) / R;
  const int64_t nblocks = pl.G * nbm;
  // Offsets of S_i in the suffix scratch and of grad A_i in a chunk's accumulator.
  std::vector<int64_t> s_off(k + 1, 0), g_off(k + 1, 0);
  {
    int64_t w = pl.P;  // width of S_{k-1} = x
    for (int64_t i = k - 1; i >= 0; --i) {
      s_off[i] = w;  // temporarily the width of S_i
      if (i > 0) w = w / pl.p[i] * pl.q[i];
    }
    int64_t acc = 0;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t width = s_off[i];
      s_off[i] = acc;
      acc += width * R;
    }
    s_off[k] = acc;
    for (int64_t i = 0; i < k; ++i) g_off[i + 1] = g_off[i] + pl.G * pl.p[i] * pl.q[i];
  }
  const int64_t gsize = g_off[k];
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  Scratch<acc_t> gacc(nchunks * gsize);
  std::fill(gacc.get(), gacc.get() + nchunks * gsize, acc_t(0));

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  const bool stream = need_x && stream_output(gx.numel() * gx.element_size());
  std::vector<const acc_t*> ap, atp;
  for (int64_t i = 0; i < k; ++i) {
    ap.push_back(A[i].const_data_ptr<acc_t>());
    atp.push_back(At[i].const_data_ptr<acc_t>());
  }

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch<acc_t> sbuf(s_off[k]), buf0(pl.wmax * R), buf1(pl.wmax * R);
    for (int64_t ch = c0; ch < c1; ++ch) {
      acc_t* gch = gacc.get() + ch * gsize;
      for (int64_t b = ch * nblocks / nchunks; b < (ch + 1) * nblocks / nchunks; ++b) {
        const int64_t g = b / nbm, m0 = (b % nbm) * R;
        const int64_t rows = std::min(R, pl.M - m0);
        acc_t* S = sbuf.get();
        load_block(xp + g * x.stride(0) + m0 * x.stride(1), x.stride(1), rows, pl.P, R,
                   S + s_off[k - 1]);
        int64_t a = pl.P, c = 1;  // S_i viewed as (prod_{l<i} p_l, p_i, prod_{l>i} q_l)
        for (int64_t i = k - 1; i >= 1; --i) {
          a /= pl.p[i];
          mode_product(S + s_off[i], S + s_off[i - 1], ap[i] + g * pl.p[i] * pl.q[i], a,
                       pl.p[i], pl.q[i], c * R);
          c *= pl.q[i];
        }
        acc_t* cur = buf0.get();
        acc_t* nxt = buf1.get();
        load_block(gp + g * gy.stride(0) + m0 * gy.stride(1), gy.stride(1), rows, pl.Q, R, cur);
        int64_t before = 1, after = pl.Q;  // B_i viewed as (before, q_i, after)
        for (int64_t i = 0; i < k; ++i) {
          after /= pl.q[i];
          contract(S + s_off[i], cur, before, pl.p[i], pl.q[i], after * R,
                   gch + g_off[i] + g * pl.p[i] * pl.q[i]);
          if (i + 1 < k || need_x) {
            mode_product(cur, nxt, atp[i] + g * pl.p[i] * pl.q[i], before, pl.q[i], pl.p[i],
                         after * R);
            std::swap(cur, nxt);
          }
          before *= pl.p[i];
        }
        if (need_x) store_block(cur, pl.P, R, rows, gxp + (g * pl.M + m0) * pl.P, pl.P, stream);
      }
    }
    if (stream) Simd<acc_t>::fence();
  });

  for (int64_t ch = 1; ch < nchunks; ++ch)
    for (int64_t e = 0; e < gsize; ++e) gacc.get()[e] += gacc.get()[ch * gsize + e];
  for (int64_t i = 0; i < k; ++i) {
    auto out = at::empty({pl.G, pl.p[i], pl.q[i]}, gy.options());
    out.copy_(at::from_blob(gacc.get() + g_off[i], {pl.G, pl.p[i], pl.q[i]}, A[i].options()));
    gA.push_back(out);
  }
}

void check_inputs(const at::Tensor& x, at::TensorList factors, const char* name) {
  // A last dim of size 1, or an empty tensor, may carry any stride (.contiguous() leaves such
  // tensors as they are).
  TORCH_CHECK_VALUE(x.dim() == 3 && (x.stride(2) == 1 || x.size(2) == 1 || x.numel() == 0), name,
                    ": expected a (G, M, P) tensor with a contiguous last dim, got shape ",
                    x.sizes(), " strides ", x.strides());
  TORCH_CHECK_VALUE(!factors.empty(), "factors: expected at least one factor");
  int64_t P = 1;
  for (const auto& f : factors) {
    TORCH_CHECK_VALUE(f.dim() == 3 && f.size(0) == x.size(0), "factors: expected (G=", x.size(0),
                      ", p, q) tensors, got ", f.sizes());
    TORCH_CHECK_VALUE(f.scalar_type() == x.scalar_type(), "factors: dtype ", f.scalar_type(),
                      " differs from ", name, " dtype ", x.scalar_type());
    P *= f.size(1);
  }
  TORCH_CHECK_VALUE(P == x.size(2), name, ": last dim ", x.size(2),
                    " != product of factor rows ", P);
}

at::Tensor kron_matmul_fwd_cpu(const at::Tensor& x, at::TensorList factors) {
  check_inputs(x, factors, "x");
  int64_t Q = 1;
  for (const auto& f : factors) Q *= f.size(2);
  // Nothing to read or nothing to write (the plan divides by every p_i and q_i): y is all zeros.
  if (x.numel() == 0 || Q == 0) return at::zeros({x.size(0), x.size(1), Q}, x.options());
  // One factor is a plain (batched) GEMM, which nothing here beats.
  if (factors.size() == 1) return at::bmm(x, factors[0]);
  auto y = at::empty({x.size(0), x.size(1), Q}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kron_matmul_fwd",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    forward<scalar_t, acc_t>(x, factors_as<acc_t>(factors, false),
                                                             y);
                                  });
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> kron_matmul_bwd_cpu(const at::Tensor& gy,
                                                                    const at::Tensor& x,
                                                                    at::TensorList factors,
                                                                    bool need_x,
                                                                    bool need_factors) {
  check_inputs(x, factors, "x");
  int64_t Q = 1;
  for (const auto& f : factors) Q *= f.size(2);
  TORCH_CHECK_VALUE(gy.dim() == 3 && (gy.stride(2) == 1 || gy.size(2) == 1 || gy.numel() == 0) &&
                        gy.size(0) == x.size(0) &&
                        gy.size(1) == x.size(1) && gy.size(2) == Q &&
                        gy.scalar_type() == x.scalar_type(),
                    "grad_y: expected a (", x.size(0), ", ", x.size(1), ", ", Q, ") ",
                    x.scalar_type(), " tensor with a contiguous last dim, got ", gy.sizes(), " ",
                    gy.scalar_type());
  std::vector<at::Tensor> gA;
  if (x.numel() == 0 || Q == 0) {  // an empty sum: every gradient is zero, as in the forward
    if (need_factors)
      for (const auto& f : factors) gA.push_back(at::zeros(f.sizes(), f.options()));
    return {need_x ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options()), gA};
  }
  if (factors.size() == 1) {  // GEMMs, as in the forward
    const auto& A = factors[0];
    if (need_factors) gA.push_back(at::bmm(x.transpose(1, 2), gy));
    return {need_x ? at::bmm(gy, A.transpose(1, 2)) : at::empty({0}, x.options()), gA};
  }
  at::Tensor gx = at::empty({0}, x.options());
  if (need_x) gx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kron_matmul_bwd",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    auto At = factors_as<acc_t>(factors, true);
                                    if (!need_factors) {
                                      if (need_x) forward<scalar_t, acc_t>(gy, At, gx);
                                      return;
                                    }
                                    auto A = factors_as<acc_t>(factors, false);
                                    backward<scalar_t, acc_t>(gy, x, A, At, need_x, gx, gA);
                                  });
  return {gx, gA};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("kron_matmul_fwd(Tensor x, Tensor[] factors) -> Tensor");
  m.def(
      "kron_matmul_bwd(Tensor grad_y, Tensor x, Tensor[] factors, bool need_x, "
      "bool need_factors) -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("kron_matmul_fwd", &kron_matmul_fwd_cpu);
  m.impl("kron_matmul_bwd", &kron_matmul_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
