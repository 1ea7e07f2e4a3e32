"""The CUDA Stiefel optimiser kernels' math, run on the host (no GPU is lent to this project).

csrc/cuda/stiefel_math.cuh holds everything a thread block of csrc/cuda/stiefel.cu does for one
matrix; its barrier is a functor. A small harness compiled here with g++ runs that code with a
block of real std::threads (the thread count the kernel launches with, and an odd one) over a
shared-memory work area that starts as NaN, and the results are compared with the batched torch
kernels of specops/stiefel_steps.py, passed the same polar stopping rule (specops._constants). A non-finite gradient in one matrix
must leave the others bit-identical, also when the next blocks inherit its work area (shared
memory is not cleared between the blocks an SM runs).
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from specops import stiefel_steps
from specops._constants import POLAR_MAX_ITER, polar_tol

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda"

HARNESS = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "stiefel_math.cuh"

using namespace specops::cuda::stiefel_detail;

namespace {

struct BF16 {
  uint16_t bits;
};

// bfloat16 storage as torch rounds it (to nearest even; finite values only).
struct BF16IO {
  using S = BF16;
  using T = float;
  static float load(BF16 v) {
    const uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static BF16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return BF16{uint16_t(u >> 16)};
  }
};

struct HostSync {
  std::barrier<>* bar;
  void operator()() const { bar->arrive_and_wait(); }
};

// Every matrix b as one block of nthr threads, as the kernel's grid does. The work area starts
// as NaN; with `inherit` each block gets the previous block's work area as it left it.
template <StepOp kOp, class IO>
void run(const StepArgs<typename IO::S>& a, int64_t B, int nthr, bool inherit) {
  using T = typename IO::T;
  std::vector<T> smem(nthr + work_elems(kOp, a.n, a.p), std::numeric_limits<T>::quiet_NaN());
  for (int64_t b = 0; b < B; ++b) {
    if (!inherit) std::fill(smem.begin(), smem.end(), std::numeric_limits<T>::quiet_NaN());
    std::barrier<> bar(nthr);
    std::vector<std::thread> threads;
    for (int t = 0; t < nthr; ++t)
      threads.emplace_back([&, t] { step_matrix<kOp, IO>(a, smem.data(), b, t, nthr, HostSync{&bar}); });
    for (auto& th : threads) th.join();
  }
}

template <class IO>
void host_step(int op, void* X, const void* G, void* m, void* v, void* Y, void* P, void* V, void* Q,
               const double* step, int64_t S, int64_t B, int n, int p, double lr, double beta1, double beta2,
               double eps, double q, int64_t iters, double tol, int64_t max_iter, int nthr, int inherit) {
  using St = typename IO::S;
  StepArgs<St> a{};
  a.X = static_cast<St*>(X);
  a.G = static_cast<const St*>(G);
  a.m = static_cast<St*>(m);
  a.v = static_cast<St*>(v);
  a.Y = static_cast<St*>(Y);
  a.P = static_cast<St*>(P);
  a.V = static_cast<St*>(V);
  a.Q = static_cast<St*>(Q);
  a.step = step;
  a.per = S > 0 ? B / S : 1;
  a.n = n;
  a.p = p;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.q = q;
  a.iters = iters;
  a.tol = tol;
  a.max_iter = max_iter;
  if (op == 0) run<StepOp::kSgd, IO>(a, B, nthr, inherit != 0);
  else if (op == 1) run<StepOp::kCayleyAdam, IO>(a, B, nthr, inherit != 0);
  else run<StepOp::kStiefelAdam, IO>(a, B, nthr, inherit != 0);
}

}  // namespace

#define HOST_STEP_ARGS                                                                                         \
  int op, void *X, const void *G, void *m, void *v, void *Y, void *P, void *V, void *Q, const double *step,   \
      int64_t S, int64_t B, int n, int p, double lr, double beta1, double beta2, double eps, double q,        \
      int64_t iters, double tol, int64_t max_iter, int nthr, int inherit
#define HOST_STEP_CALL \
  op, X, G, m, v, Y, P, V, Q, step, S, B, n, p, lr, beta1, beta2, eps, q, iters, tol, max_iter, nthr, inherit

extern "C" {
void step_float32(HOST_STEP_ARGS) { host_step<PlainIO<float>>(HOST_STEP_CALL); }
void step_float64(HOST_STEP_ARGS) { host_step<PlainIO<double>>(HOST_STEP_CALL); }
void step_bfloat16(HOST_STEP_ARGS) { host_step<BF16IO>(HOST_STEP_CALL); }
int threads_for(int64_t n, int64_t p) { return block_threads(n, p); }
size_t smem_bytes(int op, int64_t n, int64_t p, int acc_double) {
  return step_smem_bytes(StepOp(op), n, p, acc_double != 0);
}
}
"""

OPS = {"stiefel_sgd_step": 0, "cayley_adam_step": 1, "stiefel_adam_step": 2}
SHAPES = [(4, 4), (10, 10), (20, 20), (64, 64), (256, 16), (7, 3), (1, 1)]
# Relative Frobenius error of each output vs the torch kernel. The step ends in Newton-Schulz
# iterations stopped at round-off, so both sides agree to a few ulps of the dtype.
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1e-3}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("stiefel_host")
    (d / "harness.cpp").write_text(HARNESS)
    so = d / "harness.so"
    cmd = [cxx, "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", f"-I{CSRC}", str(d / "harness.cpp"), "-o", str(so)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and "barrier" in out.stderr:
        pytest.skip("the C++ compiler lacks C++20 <barrier>")
    assert out.returncode == 0, out.stderr[-3000:]
    h = ctypes.CDLL(str(so))
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for name in ("step_float32", "step_float64", "step_bfloat16"):
        getattr(h, name).argtypes = [ctypes.c_int] + [ptr] * 9 + [i64, i64, ctypes.c_int, ctypes.c_int] + [dbl] * 5 + [
            i64, dbl, i64, ctypes.c_int, ctypes.c_int]
        getattr(h, name).restype = None
    h.threads_for.argtypes, h.threads_for.restype = [i64, i64], ctypes.c_int
    h.smem_bytes.argtypes, h.smem_bytes.restype = [ctypes.c_int, i64, i64, ctypes.c_int], ctypes.c_size_t
    return h


def _inputs(op, n, p, dtype, B=4, seed=0):
    """B matrices of 2 parameters (steps 1 and 7), non-trivial state, grads large enough that the
    Cayley iterations leave work for the polar correction."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    X = torch.linalg.qr(r(B, n, p))[0]
    t = {"X": X, "G": r(B, n, p)}
    if op == "stiefel_sgd_step":
        t["M"] = 0.1 * r(B, n, p)
    elif op == "cayley_adam_step":
        t.update(m=0.1 * r(B, n, p), v=r(B).abs() * n * p)
    else:
        A = 0.01 * r(B, p, p)
        t.update(Y=A - A.mT, P=1e-3 * r(B, p, p).abs(), V=0.01 * r(B, n, p), Q=1e-3 * r(B, n, p).abs())
        if n == p:
            t.update(V=torch.zeros(0), Q=torch.zeros(0))
    t = {k: v.to(dtype).contiguous() for k, v in t.items()}
    t["step"] = torch.tensor([1.0, 7.0], dtype=torch.float64)
    return t


HYPER = {
    "stiefel_sgd_step": dict(lr=0.2, beta1=0.9, beta2=0.0, eps=1e-8, q=0.5, iters=2),
    "cayley_adam_step": dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, q=0.5, iters=2),
    "stiefel_adam_step": dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-5, q=0.0, iters=0),
}


def _reference(op, t, h):
    """The batched torch kernel (its step counters already advanced, as the op does before a kernel)."""
    if op == "stiefel_sgd_step":
        stiefel_steps._sgd_torch(t["X"], t["G"], t["M"], h["lr"], h["beta1"], h["q"], h["iters"], h["eps"])
    elif op == "cayley_adam_step":
        stiefel_steps._cayley_adam_torch(t["X"], t["G"], t["m"], t["v"], t["step"], h["lr"], h["beta1"], h["beta2"],
                                         h["eps"], h["q"], h["iters"])
    else:
        stiefel_steps._stiefel_adam_torch(t["X"], t["G"], t["Y"], t["P"], t["V"], t["Q"], t["step"], h["lr"],
                                          h["beta1"], h["beta2"], h["eps"])


def _host(lib, op, t, h, nthr, inherit=False):
    X = t["X"]
    B, n, p = X.shape
    ptr = lambda k: t[k].data_ptr() if k in t and t[k].numel() else None  # noqa: E731
    fn = getattr(lib, f"step_{str(X.dtype).removeprefix('torch.')}")
    fn(OPS[op], ptr("X"), ptr("G"), ptr("M") or ptr("m"), ptr("v"), ptr("Y"), ptr("P"), ptr("V"), ptr("Q"),
       t["step"].data_ptr(), t["step"].numel(), B, n, p, h["lr"], h["beta1"], h["beta2"], h["eps"], h["q"],
       h["iters"], polar_tol(n, p, X.dtype), POLAR_MAX_ITER, nthr, int(inherit))


def _check(lib, op, n, p, dtype, nthr=None):
    h = HYPER[op]
    ref = _inputs(op, n, p, dtype)
    got = {k: v.clone() for k, v in ref.items()}
    _reference(op, ref, h)
    _host(lib, op, got, h, nthr or lib.threads_for(n, p))
    worst = 0.0
    for k in ref:
        if k in ("G", "step") or ref[k].numel() == 0:
            continue
        assert torch.isfinite(got[k]).all(), k
        err = rel_err(got[k], ref[k])
        assert err <= TOL[dtype], f"{op} {n}x{p} {dtype}: {k} relative error {err:.3g} > {TOL[dtype]:.1g}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_block_step_matches_torch(lib, op, shape, dtype):
    _check(lib, op, *shape, dtype)


@pytest.mark.parametrize("shape", [(10, 10), (256, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_block_step_bfloat16(lib, op, shape):
    """Storage rounding and state write-back of the half types (fp32 accumulation)."""
    _check(lib, op, *shape, torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
def test_block_step_any_thread_count(lib, op):
    """The block code does not depend on the launch's thread count (odd counts, fewer than tiles)."""
    for nthr in (1, 3, 37):
        _check(lib, op, 20, 12, torch.float64, nthr)


def test_supported_sizes_fit_sm80(lib):
    """fp32 square factors up to 64 and tall 256 x 16 fit 99 KB of shared memory per block (every
    sm_80+ GPU after opting in); fp64 square up to 32 fits too."""
    for op in OPS.values():
        for n, p in [(s, s) for s in range(1, 65)] + [(256, 16), (128, 32)]:
            assert lib.smem_bytes(op, n, p, 0) <= 99 * 1024, (op, n, p)
        for s in range(1, 33):
            assert lib.smem_bytes(op, s, s, 1) <= 99 * 1024, (op, s)
    assert lib.threads_for(64, 64) == 256 and lib.threads_for(4, 4) == 32


@pytest.mark.parametrize("inherit", [False, True], ids=["fresh", "inherited"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(40, 6), (8, 8), (13, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", OPS)
def test_block_step_isolates_matrices(lib, op, shape, dtype, inherit):
    """A NaN / Inf gradient in matrix 0 (whose work area the next blocks inherit) or matrix 2 leaves
    every other matrix and its state bit-identical to a clean run."""
    h = HYPER[op]
    clean = _inputs(op, *shape, dtype)
    _host(lib, op, clean, h, lib.threads_for(*shape), inherit)
    for slot, value in [(0, float("nan")), (2, float("inf"))]:
        dirty = _inputs(op, *shape, dtype)
        dirty["G"][slot, 1, 0] = value
        _host(lib, op, dirty, h, lib.threads_for(*shape), inherit)
        assert not dirty["X"][slot].isfinite().all()
        keep = [b for b in range(clean["X"].shape[0]) if b != slot]
        for k, v in clean.items():
            if k not in ("G", "step") and v.numel():
                assert torch.equal(dirty[k][keep], v[keep]), f"{op} {shape} {dtype}: {k} changed by matrix {slot}"
