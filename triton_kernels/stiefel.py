"""Triton kernels for the fused Stiefel optimiser steps: one program per matrix of a (B, n, p) stack.

A program holds its matrix as one (BN, BP) register tile (BN, BP powers of two >= 16, padding
zero-filled, so padded rows/columns stay zero through every product) and does the whole step in
registers: the products are tl.dot in IEEE precision (no TF32), the canonical generator
W = PM X^T - X PM^T is applied in low-rank form W Z = PM (X^T Z) - X (PM^T Z), and the step ends
with the Newton-Schulz polar correction under the stopping rule of specops.stiefel.polar_ns
(rescale when ||Y^T Y||_inf > 2; iterate while ||Y^T Y - I||_F > tol and decreasing, at most
max_iter times; the launchers are passed both). The formulas are those of specops/stiefel_steps.py.
Sizes up to n <= 32, p <= 16 (see MAX_N, MAX_P): larger register tiles spill on sm_80/sm_90
(gpu-check), so `supports` refuses larger matrices, which then take another kernel.
"""
import math

import torch
import triton
import triton.language as tl

from specops._constants import POLAR_MAX_ITER

MAX_N = 32
MAX_P = 16

_TL_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dev(S, eye):
    """||S - I||_F."""
    d = S - eye
    return tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0))


@triton.jit
def _polar_ns(Y, eye, tol, MAX_ITER: tl.constexpr):
    S = _dot(tl.trans(Y), Y)
    rmax = tl.max(tl.sum(tl.abs(S), axis=1), axis=0)
    c = tl.where(rmax > 2.0, 1.0 / tl.sqrt(rmax), 1.0).to(Y.dtype)
    Y = Y * c
    S = S * (c * c)
    err = _dev(S, eye)
    go = err > tol
    it = 0
    while go:
        Yn = _dot(Y, 1.5 * eye - 0.5 * S)
        Sn = _dot(tl.trans(Yn), Yn)
        errn = _dev(Sn, eye)
        better = errn < err
        Y = tl.where(better, Yn, Y)
        S = tl.where(better, Sn, S)
        err = tl.where(better, errn, err)
        it += 1
        go = better & (err > tol) & (it < MAX_ITER)
    return Y


@triton.jit
def _generator(X, M):
    """PM = M - X (X^T M)/2 and ||W||_F, W = PM X^T - X PM^T (X^T X = I)."""
    PM = M - 0.5 * _dot(X, _dot(tl.trans(X), M))
    Bm = _dot(tl.trans(X), PM)
    w2 = 2.0 * tl.sum(tl.sum(PM * PM, axis=1), axis=0) - 2.0 * tl.sum(tl.sum(Bm * tl.trans(Bm), axis=1), axis=0)
    return PM, tl.sqrt(tl.maximum(w2, 0.0))


@triton.jit
def _apply_w(X, PM, Z):
    return _dot(PM, _dot(tl.trans(X), Z)) - _dot(X, _dot(tl.trans(PM), Z))


@triton.jit
def _tiles(n, p, BN: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr):
    """Offsets and mask of an (n, p) matrix in a (BN, BP) tile, offsets/mask of a (p, p) one, I_p."""
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BP)
    offs = rows[:, None] * p + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < p)
    prow = tl.arange(0, BP)
    offs_pp = prow[:, None] * p + cols[None, :]
    mask_pp = (prow[:, None] < p) & (cols[None, :] < p)
    if F64:
        one = tl.full([BP, BP], 1.0, tl.float64)
    else:
        one = tl.full([BP, BP], 1.0, tl.float32)
    eye = tl.where((prow[:, None] == cols[None, :]) & (prow[:, None] < p), one, 0.0)
    return offs, mask, offs_pp, mask_pp, eye


@triton.jit
def _bias_corrections(step_ptr, b, per, log_beta1, log_beta2, eye):
    """1 - beta1^t and 1 - beta2^t for the step count t of matrix b's parameter (step[b // per])."""
    t = tl.load(step_ptr + b // per).to(eye.dtype)
    return 1.0 - tl.exp(t * log_beta1), 1.0 - tl.exp(t * log_beta2)


@triton.jit
def _sgd_kernel(X_ptr, G_ptr, M_ptr, n, p, lr: tl.float64, momentum: tl.float64, q: tl.float64, eps: tl.float64,
                tol: tl.float64, iters,
                BN: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr, MAX_ITER: tl.constexpr):
    """Cayley SGD with momentum for matrix program_id(0)."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask, _, _, eye = _tiles(n, p, BN, BP, F64)
    base = b * n * p
    X = tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    G = tl.load(G_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    M = tl.load(M_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    # (float arguments come as fp64, which Triton would otherwise round to fp32; computed in eye's type)
    M = tl.cast(momentum, eye.dtype) * M - G
    PM, wnorm = _generator(X, M)
    Mt = _apply_w(X, PM, X)
    alpha = tl.minimum(tl.cast(lr, eye.dtype), 2.0 * tl.cast(q, eye.dtype) / (wnorm + tl.cast(eps, eye.dtype)))
    Y = X + alpha * Mt
    tl.store(M_ptr + base + offs, Mt.to(M_ptr.dtype.element_ty), mask=mask)  # (here: Mt's registers are free after)
    for _ in range(iters):
        Y = X + 0.5 * alpha * _apply_w(X, PM, X + Y)
    Y = _polar_ns(Y, eye, tl.cast(tol, eye.dtype), MAX_ITER)
    tl.store(X_ptr + base + offs, Y.to(X_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cayley_adam_kernel(X_ptr, G_ptr, m_ptr, v_ptr, step_ptr, per, n, p, lr: tl.float64, beta1: tl.float64,
                        beta2: tl.float64, log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64,
                        q: tl.float64, tol: tl.float64, iters, BN: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr,
                        MAX_ITER: tl.constexpr):
    """Cayley Adam for matrix program_id(0); its parameter's step count is step[b // per]."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask, _, _, eye = _tiles(n, p, BN, BP, F64)
    # (float arguments come as fp64, which Triton would otherwise round to fp32; computed in eye's type)
    lr, beta1, beta2 = tl.cast(lr, eye.dtype), tl.cast(beta1, eye.dtype), tl.cast(beta2, eye.dtype)
    q, eps, tol = tl.cast(q, eye.dtype), tl.cast(eps, eye.dtype), tl.cast(tol, eye.dtype)
    log_beta1, log_beta2 = tl.cast(log_beta1, eye.dtype), tl.cast(log_beta2, eye.dtype)
    base = b * n * p
    bc1, bc2 = _bias_corrections(step_ptr, b, per, log_beta1, log_beta2, eye)
    X = tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    G = tl.load(G_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    m = beta1 * m + (1.0 - beta1) * G
    v = beta2 * tl.load(v_ptr + b).to(eye.dtype) + (1.0 - beta2) * tl.sum(tl.sum(G * G, axis=1), axis=0)
    r = tl.sqrt(v / bc2 + eps)
    PM, wnorm = _generator(X, m / bc1)
    wnorm = wnorm / r
    Mt = _apply_w(X, PM, X) / r
    alpha = tl.minimum(lr, 2.0 * q / (wnorm + eps))
    Y = X - alpha * Mt
    for _ in range(iters):
        Y = X - 0.5 * alpha / r * _apply_w(X, PM, X + Y)
    Y = _polar_ns(Y, eye, tol, MAX_ITER)
    tl.store(X_ptr + base + offs, Y.to(X_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + base + offs, (Mt * r * bc1).to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + b, v.to(v_ptr.dtype.element_ty))


@triton.jit
def _stiefel_adam_kernel(X_ptr, G_ptr, Y_ptr, P_ptr, V_ptr, Q_ptr, step_ptr, per, n, p, lr: tl.float64,
                         beta1: tl.float64, beta2: tl.float64, log_beta1: tl.float64, log_beta2: tl.float64,
                         eps: tl.float64, tol: tl.float64, BN: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr,
                         TALL: tl.constexpr, MAX_ITER: tl.constexpr):
    """StiefelAdam (Kong, Wang & Tao) for matrix program_id(0)."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask, offs_pp, mask_pp, eye = _tiles(n, p, BN, BP, F64)
    lr, beta1, beta2 = tl.cast(lr, eye.dtype), tl.cast(beta1, eye.dtype), tl.cast(beta2, eye.dtype)
    eps, tol = tl.cast(eps, eye.dtype), tl.cast(tol, eye.dtype)
    log_beta1, log_beta2 = tl.cast(log_beta1, eye.dtype), tl.cast(log_beta2, eye.dtype)
    base = b * n * p
    base_pp = b * p * p
    bc1, bc2 = _bias_corrections(step_ptr, b, per, log_beta1, log_beta2, eye)
    X = tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    G = tl.load(G_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype)
    A = _dot(tl.trans(X), G)
    xi = A - tl.trans(A)
    Y = beta1 * tl.load(Y_ptr + base_pp + offs_pp, mask=mask_pp, other=0.0).to(eye.dtype) - (1.0 - beta1) * xi
    P = beta2 * tl.load(P_ptr + base_pp + offs_pp, mask=mask_pp, other=0.0).to(eye.dtype) + (1.0 - beta2) * xi * xi
    tl.store(Y_ptr + base_pp + offs_pp, Y.to(Y_ptr.dtype.element_ty), mask=mask_pp)
    tl.store(P_ptr + base_pp + offs_pp, P.to(P_ptr.dtype.element_ty), mask=mask_pp)
    step = lr / bc1
    Z = X + _dot(X, step * Y / (tl.sqrt(P / bc2) + eps))
    if TALL:
        N = G - _dot(X, A)
        V = beta1 * tl.load(V_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype) - (1.0 - beta1) * N
        Q = beta2 * tl.load(Q_ptr + base + offs, mask=mask, other=0.0).to(eye.dtype) + (1.0 - beta2) * N * N
        tl.store(Q_ptr + base + offs, Q.to(Q_ptr.dtype.element_ty), mask=mask)
        nu = step * V / (tl.sqrt(Q / bc2) + eps)
        Z = Z + (nu - _dot(X, _dot(tl.trans(X), nu)))
        Z = _polar_ns(Z, eye, tol, MAX_ITER)
        V = V - _dot(Z, _dot(tl.trans(Z), V))
        tl.store(V_ptr + base + offs, V.to(V_ptr.dtype.element_ty), mask=mask)
    else:
        Z = _polar_ns(Z, eye, tol, MAX_ITER)
    tl.store(X_ptr + base + offs, Z.to(X_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _blocks(n: int, p: int) -> tuple[int, int]:
    bp = max(16, triton.next_power_of_2(p))
    return max(bp, triton.next_power_of_2(n)), bp


def _warps(bn: int, bp: int) -> int:
    """Warps per program: enough threads that the (BN, BP) tiles fit the registers."""
    return 4 if bn * bp <= 2048 else 8


def supports(n: int, p: int) -> str | None:
    """None when the kernels take (n, p) matrices, else why not (the register tile must fit one program)."""
    if n <= MAX_N and p <= MAX_P:
        return None
    return f"{n} x {p} matrices exceed the register tile of one program (n <= {MAX_N}, p <= {MAX_P})"


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


# The launchers step X (B, n, p) in place; tol and max_iter are the polar stopping rule
# (specops._constants.polar_tol, POLAR_MAX_ITER).


def stiefel_sgd_step(X, G, M, lr, momentum, q, iters, eps, tol, max_iter):
    """In place over X and M (B, n, p); see _sgd_kernel."""
    B, n, p = X.shape
    bn, bp = _blocks(n, p)
    _sgd_kernel[(B,)](X, G, M, n, p, lr, momentum, q, eps, tol, iters, BN=bn, BP=bp,
                      F64=X.dtype == torch.float64, MAX_ITER=max_iter, num_warps=_warps(bn, bp))


def cayley_adam_step(X, G, m, v, step, lr, beta1, beta2, eps, q, iters, tol, max_iter):
    """In place over X, m (B, n, p), v (B,); step (S,) float64 already incremented."""
    B, n, p = X.shape
    bn, bp = _blocks(n, p)
    _cayley_adam_kernel[(B,)](X, G, m, v, step, B // step.shape[0], n, p, lr, beta1, beta2, _log(beta1),
                              _log(beta2), eps, q, tol, iters, BN=bn, BP=bp,
                              F64=X.dtype == torch.float64, MAX_ITER=max_iter, num_warps=_warps(bn, bp))


def stiefel_adam_step(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps, tol, max_iter):
    """In place over X (B, n, p), Y, P (B, p, p), V, Q (B, n, p) (unused when n == p)."""
    B, n, p = X.shape
    bn, bp = _blocks(n, p)
    tall = n > p
    _stiefel_adam_kernel[(B,)](X, G, Y, P, V if tall else X, Q if tall else X, step, B // step.shape[0], n, p, lr,
                               beta1, beta2, _log(beta1), _log(beta2), eps, tol, BN=bn, BP=bp,
                               F64=X.dtype == torch.float64, TALL=tall, MAX_ITER=max_iter,
                               num_warps=_warps(bn, bp))


# (BN, BP) tiles the launchers use for n <= MAX_N, p <= MAX_P.
_AOT_TILES = [(16, 16), (32, 16)]


def aot_specs() -> list[tuple[str, "triton.JITFunction", dict, dict]]:
    """Every (name, kernel, signature, constexprs) the launchers can use, for ahead-of-time compiles."""
    specs = []
    for dtype, ty in _TL_TYPE.items():
        ptr = "*" + ty
        f64 = dtype == torch.float64
        for bn, bp in _AOT_TILES:
            base = {"BN": bn, "BP": bp, "F64": f64, "MAX_ITER": POLAR_MAX_ITER}
            opts = {"num_warps": _warps(bn, bp)}
            sig = {"X_ptr": ptr, "G_ptr": ptr, "M_ptr": ptr, "n": "i32", "p": "i32", "lr": "fp64",
                   "momentum": "fp64", "q": "fp64", "eps": "fp64", "tol": "fp64", "iters": "i32"}
            specs.append((f"stiefel_sgd_{ty}_{bn}x{bp}", _sgd_kernel, sig, dict(base), opts))
            sig = {"X_ptr": ptr, "G_ptr": ptr, "m_ptr": ptr, "v_ptr": ptr, "step_ptr": "*fp64", "per": "i32",
                   "n": "i32", "p": "i32", "lr": "fp64", "beta1": "fp64", "beta2": "fp64", "log_beta1": "fp64",
                   "log_beta2": "fp64", "eps": "fp64", "q": "fp64", "tol": "fp64", "iters": "i32"}
            specs.append((f"cayley_adam_{ty}_{bn}x{bp}", _cayley_adam_kernel, sig, dict(base), opts))
            for tall in (False, True):
                sig = {"X_ptr": ptr, "G_ptr": ptr, "Y_ptr": ptr, "P_ptr": ptr, "V_ptr": ptr, "Q_ptr": ptr,
                       "step_ptr": "*fp64", "per": "i32", "n": "i32", "p": "i32", "lr": "fp64", "beta1": "fp64",
                       "beta2": "fp64", "log_beta1": "fp64", "log_beta2": "fp64", "eps": "fp64", "tol": "fp64"}
                specs.append((f"stiefel_adam_{ty}_{bn}x{bp}{'_tall' if tall else ''}", _stiefel_adam_kernel, sig,
                               dict(base, TALL=tall), opts))
    return specs
