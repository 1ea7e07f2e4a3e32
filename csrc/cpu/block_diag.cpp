// Block-diagonal matmul on the CPU: y = x @ blockdiag(B_0, ..., B_{k-1}), x (..., k·b), B (k, b, b);
// row block i of y is y_i = x_i B_i (x_i: the i-th b columns of a row). With a permutation perm of the
// columns, y = x P^T blockdiag(B) P: the columns perm[i b .. i b + b) form block i, read and written there
// (one butterfly stage of BOFT in one pass).
//
// Forward (and grad_x, the same with the blocks transposed): a tile of rows at a time; for each block,
// its output vectors are accumulated in registers over the block's b inputs, one broadcast of x and
// one FMA with a row of B_i each. B is packed once (rows padded to whole vectors, zeros beyond b), so
// the weights load as full vectors whatever b is; outputs of a partial vector go through a local copy.
// grad_B[i] = Σ_t x_i[t]^T g_i[t] accumulates per thread, while the tile that grad_x just read is
// still in L2: one pass over x and the output gradient for both gradients.
//
// bf16 / fp16 tiles are staged to fp32 and back (accumulation in fp32).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "simd.h"

namespace specops {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 32;  // rows per tile: a 1280-wide fp32 tile of x and of g is 160 KiB each
constexpr int64_t kRegRows = 4;    // rows per register tile of the forward

// 32-byte vectors: 8 fp32 / 4 fp64 lanes, which divide the usual block sizes (4, 8, 16, ...).
template <typename T>
struct V32 {
  static constexpr int64_t L = 32 / sizeof(T);
  typedef T vec __attribute__((vector_size(32), aligned(sizeof(T))));
  static inline vec load(const T* p) { return *reinterpret_cast<const vec*>(p); }
  static inline void store(T* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
  static inline vec load_part(const T* p, int64_t n) {  // the first n < L lanes, zeros after
    vec v = {};
    std::memcpy(&v, p, n * sizeof(T));
    return v;
  }
  static inline void store_part(T* p, vec v, int64_t n) { std::memcpy(p, &v, n * sizeof(T)); }
};

inline int64_t padded(int64_t b, int64_t L) { return (b + L - 1) / L * L; }

// Tiles per task: ~32k multiply-adds (a tile row costs n b), so a small layer's call stays on one thread
// instead of paying a parallel region for a few microseconds of work.
inline int64_t tile_grain(int64_t n, int64_t b) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, kTileRows * n * b));
}

// y[r, i b + c] = Σ_j x[r, i b + j] Bp[i, j, c] for R rows, block i, C vectors of its columns from c0.
template <typename T, int R, int C>
inline void fwd_cols(const T* x, int64_t ldx, const T* Bp, int64_t k, int64_t b, int64_t bp, T* y, int64_t ldy,
                     int64_t i, int64_t c0) {
  using S = V32<T>;
  constexpr int64_t L = S::L;
  const int64_t rem = b - c0;  // the block's columns left from c0: the last vector may be partial
  const T* xi = x + i * b;
  const T* Bi = Bp + i * b * bp + c0;
  typename S::vec acc[R][C] = {};
  for (int64_t j = 0; j < b; ++j) {
    typename S::vec w[C];
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) w[c] = S::load(Bi + j * bp + c * L);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T xv = xi[r * ldx + j];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) acc[r][c] += xv * w[c];
    }
  }
  T* yi = y + i * b + c0;
  // A partial vector may spill into the next blocks' columns, which they write afterwards (blocks go in
  // order, each whole), but never past the row's end.
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t n = std::min<int64_t>(L, rem - c * L);
      if (n == L || i * b + c0 + c * L + L <= k * b)
        S::store(yi + r * ldy + c * L, acc[r][c]);
      else
        S::store_part(yi + r * ldy + c * L, acc[r][c], n);
    }
}

template <typename T, int R>
inline void fwd_rows(const T* x, int64_t ldx, const T* Bp, int64_t k, int64_t b, int64_t bp, T* y, int64_t ldy) {
  constexpr int64_t L = V32<T>::L;
  for (int64_t i = 0; i < k; ++i) {
    int64_t c0 = 0;
    for (; c0 + L < b; c0 += 2 * L) fwd_cols<T, R, 2>(x, ldx, Bp, k, b, bp, y, ldy, i, c0);
    if (c0 < b) fwd_cols<T, R, 1>(x, ldx, Bp, k, b, bp, y, ldy, i, c0);
  }
}

// y (rows, k b) = x blockdiag(Bp), both with unit column stride.
template <typename T>
void fwd_tile(const T* x, int64_t ldx, int64_t rows, const T* Bp, int64_t k, int64_t b, int64_t bp, T* y,
              int64_t ldy) {
  int64_t r = 0;
  for (; r + kRegRows <= rows; r += kRegRows) fwd_rows<T, kRegRows>(x + r * ldx, ldx, Bp, k, b, bp, y + r * ldy, ldy);
  for (; r < rows; ++r) fwd_rows<T, 1>(x + r * ldx, ldx, Bp, k, b, bp, y + r * ldy, ldy);
}

// Acc[i, j, c] += Σ_r x[r, i b + j] g[r, i b + c] over a tile of rows (Acc (k, b, bp)).
template <typename T>
void grad_blocks(const T* x, int64_t ldx, const T* g, int64_t ldg, int64_t rows, int64_t k, int64_t b, int64_t bp,
                 T* Acc) {
  using S = V32<T>;
  constexpr int64_t L = S::L;
  constexpr int64_t J = 8;  // rows of Acc held in registers
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c0 = 0; c0 < b; c0 += L) {
      const int64_t n = std::min<int64_t>(L, b - c0);
      const bool full = n == L || i * b + c0 + L <= k * b;
      const T* gi = g + i * b + c0;
      for (int64_t j0 = 0; j0 < b; j0 += J) {
        const int64_t nj = std::min<int64_t>(J, b - j0);
        T* A = Acc + (i * b + j0) * bp + c0;
        typename S::vec a[J];
        for (int64_t jj = 0; jj < nj; ++jj) a[jj] = S::load(A + jj * bp);
        const T* xi = x + i * b + j0;
        for (int64_t r = 0; r < rows; ++r) {
          // a partial vector reads on into the next blocks while within the row (lanes past b land in Acc's
          // padding, never used)
          const typename S::vec gv = full ? S::load(gi + r * ldg) : S::load_part(gi + r * ldg, n);
          if (nj == J) {
#pragma GCC unroll 8
            for (int64_t jj = 0; jj < J; ++jj) a[jj] += xi[r * ldx + jj] * gv;
          } else {
            for (int64_t jj = 0; jj < nj; ++jj) a[jj] += xi[r * ldx + jj] * gv;
          }
        }
        for (int64_t jj = 0; jj < nj; ++jj) S::store(A + jj * bp, a[jj]);
      }
    }
}

// (k, b, b) blocks (transposed if asked) -> (k, b, bp) in acc_t, rows zero padded to whole vectors.
template <typename acc_t>
at::Tensor pack(const at::Tensor& B, bool transpose) {
  const int64_t b = B.size(1), bp = padded(b, V32<acc_t>::L);
  at::Tensor src = (transpose ? B.transpose(1, 2) : B).to(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor out = at::zeros({B.size(0), b, bp}, src.options());
  out.narrow(2, 0, b).copy_(src);
  return out;
}

// A tile's rows [t0, t0 + rows) of a (T, n) matrix as acc_t with unit column stride, columns gathered by
// perm (nullptr: in order): the tensor's own memory when it already is that, else a staged copy in `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as(const at::Tensor& t, int64_t t0, int64_t rows, const int64_t* perm, acc_t* buf, int64_t* ld) {
  const int64_t n = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  const scalar_t* p = t.const_data_ptr<scalar_t>() + t0 * s0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (s1 == 1 && perm == nullptr) {
      *ld = s0;
      return p;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * s0;
    acc_t* out = buf + r * n;
    if (perm != nullptr && s1 == 1) {  // the common gathered case: one index, one load, one store per element
      for (int64_t c = 0; c < n; ++c) out[c] = static_cast<acc_t>(row[perm[c]]);
    } else {
      for (int64_t c = 0; c < n; ++c) out[c] = static_cast<acc_t>(row[(perm ? perm[c] : c) * s1]);
    }
  }
  *ld = n;
  return buf;
}

// dst rows (n wide, contiguous) from a staged tile, column c to perm[c] (nullptr: in order).
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, int64_t rows, int64_t n, const int64_t* perm, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* in = src + r * n;
    scalar_t* row = dst + r * n;
    if (perm != nullptr) {
      for (int64_t c = 0; c < n; ++c) row[perm[c]] = static_cast<scalar_t>(in[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) row[c] = static_cast<scalar_t>(in[c]);
    }
  }
}

// out = x P^T blockdiag(Bp) P for every row of x (T, n) (Bp packed; x P^T = x[:, perm]): a tile is
// gathered, multiplied and scattered back to the same columns.
template <typename scalar_t, typename acc_t>
void forward(const at::Tensor& x, const at::Tensor& Bp, int64_t b, const int64_t* perm, at::Tensor& out) {
  const int64_t T = x.size(0), n = x.size(1), k = Bp.size(0), bp = Bp.size(2);
  const acc_t* bpp = Bp.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool staged = !std::is_same_v<scalar_t, acc_t> || perm != nullptr;
  at::parallel_for(0, (T + kTileRows - 1) / kTileRows, tile_grain(n, b), [&](int64_t q0, int64_t q1) {
    Scratch<acc_t> xbuf(kTileRows * n), ybuf(staged ? kTileRows * n : 0);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t t0 = q * kTileRows, rows = std::min(kTileRows, T - t0);
      int64_t ldx;
      const acc_t* xs = rows_as<scalar_t, acc_t>(x, t0, rows, perm, xbuf.get(), &ldx);
      if (staged) {
        fwd_tile(xs, ldx, rows, bpp, k, b, bp, ybuf.get(), n);
        store_rows(ybuf.get(), rows, n, perm, op + t0 * n);
      } else {  // scalar_t is acc_t here (another dtype is always staged)
        fwd_tile(xs, ldx, rows, bpp, k, b, bp, reinterpret_cast<acc_t*>(op) + t0 * n, n);
      }
    }
  });
}

// grad_x (when need_x: into gx) and grad_B (returned) in one pass over tiles of rows of g and x.
template <typename scalar_t, typename acc_t>
at::Tensor backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& B, const int64_t* perm, bool need_x,
                    at::Tensor& gx) {
  const int64_t T = x.size(0), n = x.size(1), k = B.size(0), b = B.size(1);
  const bool staged = !std::is_same_v<scalar_t, acc_t> || perm != nullptr;
  const int64_t bp = padded(b, V32<acc_t>::L);
  const at::Tensor Bt = pack<acc_t>(B, true);
  const acc_t* btp = Bt.const_data_ptr<acc_t>();
  const int64_t threads = at::get_num_threads();
  at::Tensor acc = at::zeros({threads, k, b, bp}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* accp = acc.mutable_data_ptr<acc_t>();
  scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, (T + kTileRows - 1) / kTileRows, tile_grain(n, b), [&](int64_t q0, int64_t q1) {
    acc_t* A = accp + at::get_thread_num() * k * b * bp;
    Scratch<acc_t> xbuf(kTileRows * n), gbuf(kTileRows * n), obuf(staged && need_x ? kTileRows * n : 0);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t t0 = q * kTileRows, rows = std::min(kTileRows, T - t0);
      int64_t ldx, ldg;
      const acc_t* gs = rows_as<scalar_t, acc_t>(g, t0, rows, perm, gbuf.get(), &ldg);
      if (need_x) {
        if (staged) {
          fwd_tile(gs, ldg, rows, btp, k, b, bp, obuf.get(), n);
          store_rows(obuf.get(), rows, n, perm, gxp + t0 * n);
        } else {
          fwd_tile(gs, ldg, rows, btp, k, b, bp, reinterpret_cast<acc_t*>(gxp) + t0 * n, n);
        }
      }
      const acc_t* xs = rows_as<scalar_t, acc_t>(x, t0, rows, perm, xbuf.get(), &ldx);
      grad_blocks(xs, ldx, gs, ldg, rows, k, b, bp, A);
    }
  });
  return acc.sum(0).narrow(2, 0, b).to(x.scalar_type()).contiguous();
}

void check_inputs(const at::Tensor& x, const at::Tensor& B, const std::optional<at::Tensor>& perm) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && B.dim() == 3 && B.size(1) == B.size(2) && B.size(0) * B.size(1) == x.size(-1),
                    "block_diag_matmul: expected x (..., k b) and blocks (k, b, b); got x ", x.sizes(), ", blocks ",
                    B.sizes());
  TORCH_CHECK_VALUE(B.scalar_type() == x.scalar_type(), "block_diag_matmul: blocks dtype ", B.scalar_type(),
                    " != x dtype ", x.scalar_type());
  if (perm)
    TORCH_CHECK_VALUE(perm->dim() == 1 && perm->size(0) == x.size(-1) && perm->scalar_type() == at::kLong,
                      "block_diag_matmul: perm must be an int64 (", x.size(-1), ",) permutation, got ", perm->sizes(),
                      " ", perm->scalar_type());
}

// x (..., n) as (T, n) rows (a copy only where the leading dims do not flatten).
at::Tensor rows_of(const at::Tensor& x) {
  const int64_t n = x.size(-1);
  int64_t T = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) T *= x.size(d);
  return x.reshape({T, n});
}

// Outputs are allocated in x's shape (never a view of a (T, n) buffer, so callers may write them in place).
at::Tensor block_diag_matmul_fwd_cpu(const at::Tensor& x_in, const at::Tensor& B, const std::optional<at::Tensor>& perm) {
  check_inputs(x_in, B, perm);
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (x_in.numel() == 0) return out;
  const at::Tensor x = rows_of(x_in);
  const at::Tensor idx = perm ? perm->contiguous() : at::Tensor();
  const int64_t* pp = perm ? idx.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "block_diag_matmul_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward<scalar_t, acc_t>(x, pack<acc_t>(B, false), B.size(1), pp, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> block_diag_matmul_bwd_cpu(const at::Tensor& g_in, const at::Tensor& x_in,
                                                             const at::Tensor& B, const std::optional<at::Tensor>& perm,
                                                             bool need_x, bool need_B) {
  check_inputs(x_in, B, perm);
  TORCH_CHECK_VALUE(g_in.sizes() == x_in.sizes() && g_in.scalar_type() == x_in.scalar_type(), "grad: expected a ",
                    x_in.sizes(), " ", x_in.scalar_type(), " tensor, got ", g_in.sizes(), " ", g_in.scalar_type());
  const at::Tensor x = rows_of(x_in), g = rows_of(g_in);
  const at::Tensor idx = perm ? perm->contiguous() : at::Tensor();
  const int64_t* pp = perm ? idx.const_data_ptr<int64_t>() : nullptr;
  const int64_t b = B.size(1);
  const auto opt = x.options();
  at::Tensor gx = need_x ? at::empty(x_in.sizes(), opt) : at::empty({0}, opt);
  at::Tensor gB = at::empty({0}, opt);
  if (!need_B) {
    if (need_x && x.numel() > 0)
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "block_diag_matmul_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward<scalar_t, acc_t>(g, pack<acc_t>(B, true), b, pp, gx);
      });
    return {gx, gB};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "block_diag_matmul_bwd", [&] {
    gB = backward<scalar_t, at::opmath_type<scalar_t>>(g, x, B, pp, need_x, gx);
  });
  return {gx, gB};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(specops_ext, m) {
  m.def("block_diag_matmul_fwd(Tensor x, Tensor blocks, Tensor? perm) -> Tensor");
  m.def(
      "block_diag_matmul_bwd(Tensor grad, Tensor x, Tensor blocks, Tensor? perm, bool need_x, bool need_blocks) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(specops_ext, CPU, m) {
  m.impl("block_diag_matmul_fwd", &block_diag_matmul_fwd_cpu);
  m.impl("block_diag_matmul_bwd", &block_diag_matmul_bwd_cpu);
}

}  // namespace cpu
}  // namespace specops
