"""The fused Stiefel optimiser steps: one call steps every matrix of a (B, n, p) stack in place.

Every matrix X (n, p), n >= p, has orthonormal columns (X^T X = I) and G = df/dX is its Euclidean
gradient. One step, per matrix:

stiefel_sgd_step — Cayley SGD with momentum (Li, Fuxin & Todorovic, ICLR 2020), q = 0.5, s = 2:
    M <- beta M - G
    W <- W_hat - W_hat^T,  W_hat = M X^T - X (X^T M X^T) / 2     (skew n x n generator)
    M <- W X                                                     (momentum kept in the tangent space)
    alpha <- min(lr, 2q / (||W||_F + eps))
    Y <- X + alpha M;  s times: Y <- X + (alpha/2) W (X + Y)     (fixed-point Cayley)
cayley_adam_step — the same paper's Adam variant, with a scalar second moment per matrix:
    m <- b1 m + (1-b1) G;  v <- b2 v + (1-b2) ||G||_F^2;  m^ = m/(1-b1^t), v^ = v/(1-b2^t)
    W from m^ as above, divided by r = sqrt(v^ + eps);  alpha as above
    Y <- X - alpha W X;  s times: Y <- X - (alpha/2) W (X + Y);  m <- (W X) r (1-b1^t)
stiefel_adam_step — Kong, Wang & Tao (ICLR 2023), what the SODA authors train their rotations with.
    Square part (Lie algebra): A = X^T G, xi = A - A^T;
        Y <- b1 Y - (1-b1) xi;  P <- b2 P + (1-b2) xi*xi
        xi^ = lr/(1-b1^t) * Y / (sqrt(P/(1-b2^t)) + eps)
    Tall part (n > p), the normal component N = G - X A with its own moments:
        V <- b1 V - (1-b1) N;  Q <- b2 Q + (1-b2) N*N
        nu = lr/(1-b1^t) * V / (sqrt(Q/(1-b2^t)) + eps),  nu <- nu - X (X^T nu)
    Y <- X + X xi^ + nu, then the polar retraction; V <- V - X' (X'^T V) at the new point X'.

All three finish with the polar retraction/correction X <- Y (Y^T Y)^{-1/2} by Newton-Schulz,
stopped at round-off (specops.stiefel.polar_ns; every kernel is passed the same tolerance
specops._constants.polar_tol and iteration limit POLAR_MAX_ITER): for StiefelAdam it is the
paper's retraction; for the Cayley methods it is a no-op unless the two fixed-point iterations left
an error above round-off (they are orthogonal only to O(alpha^4 ||W||^4); Li et al.
re-orthonormalise by QR now and then instead). So ||X^T X - I|| stays at round-off for any number
of steps.

The Adam variants keep one float64 step counter per parameter: step (S,), matrix b belongs to
parameter b // (B/S); the op increments it first. Kernels: cpp (parallel over matrices, each in a
per-thread L1/L2 scratch), triton (one program per matrix, in registers: n <= 32, p <= 16), cuda
(one thread block per matrix, in shared memory: what the device allows per block), torch (batched,
any size; the generator W applied in low-rank form W Z = PM (X^T Z) - X (PM^T Z),
PM = M - X (X^T M)/2). The reference and the optimisers' per-parameter path are the dense formulas
above (cayley_sgd_update, cayley_adam_update, stiefel_adam_update). No autograd: the optimisers
call the ops under no_grad on tensors outside the graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._constants import FLOAT_DTYPES, POLAR_MAX_ITER, acc_dtype, polar_tol
from ._registry import Kernel, declare, triton_module
from .stiefel import _require, polar_ns

__all__ = ["stiefel_sgd_step", "cayley_adam_step", "stiefel_adam_step", "cayley_sgd_update",
           "cayley_adam_update", "stiefel_adam_update"]


# ----------------------------------------------------------------------------- the dense per-matrix steps


def _generator(X: Tensor, M: Tensor) -> Tensor:
    """Li et al.'s skew generator W = W_hat - W_hat^T, W_hat = M X^T - X (X^T M X^T) / 2 (n x n)."""
    W_hat = M @ X.mT - 0.5 * X @ (X.mT @ M @ X.mT)
    return W_hat - W_hat.mT


def _step_cap(W: Tensor, q: float, lr: float, eps: float) -> Tensor:
    """alpha = min(lr, 2q / (||W||_F + eps)) per matrix, shaped (..., 1, 1)."""
    wnorm = torch.linalg.matrix_norm(W)[..., None, None]
    return (2 * q / (wnorm + eps)).clamp(max=lr)


def cayley_sgd_update(X, G, M, lr, momentum, q, iters, eps):
    """One Cayley SGD step of every matrix of (..., n, p) X, by the dense formulas of the module
    docstring, in the accumulation dtype. Returns the new (X, M). The optimisers' per-parameter
    path and the reference of stiefel_sgd_step."""
    acc = acc_dtype(X.dtype)
    X, G, M = X.to(acc), G.to(acc), M.to(acc)
    M = momentum * M - G
    W = _generator(X, M)
    M = W @ X
    alpha = _step_cap(W, q, lr, eps)
    Y = X + alpha * M
    for _ in range(iters):
        Y = X + 0.5 * alpha * (W @ (X + Y))
    return polar_ns(Y), M


def cayley_adam_update(X, G, m, v, bc1, bc2, lr, beta1, beta2, eps, q, iters):
    """One Cayley Adam step of every matrix of (..., n, p) X (dense formulas, accumulation dtype);
    v (...) the scalar second moments, bc1, bc2 = 1 - beta^t as Python floats or tensors broadcasting
    over (..., 1, 1). Returns the new (X, m, v). The per-parameter path and the reference."""
    acc = acc_dtype(X.dtype)
    X, G = X.to(acc), G.to(acc)
    m = beta1 * m.to(acc) + (1 - beta1) * G
    v = beta2 * v.to(acc) + (1 - beta2) * (G * G).sum((-2, -1))
    r = (v[..., None, None] / bc2 + eps).sqrt()
    W = _generator(X, m / bc1) / r
    M = W @ X
    alpha = _step_cap(W, q, lr, eps)
    Y = X - alpha * M
    for _ in range(iters):
        Y = X - 0.5 * alpha * (W @ (X + Y))
    return polar_ns(Y), M * r * bc1, v


def stiefel_adam_update(X, G, Y, P, V, Q, bc1, bc2, lr, beta1, beta2, eps):
    """The StiefelAdam step of every matrix of (..., n, p) X in the accumulation dtype, shared by the
    op's torch kernel, its reference and the per-parameter path. Y, P (..., p, p) are the skew
    moments, V, Q (..., n, p) the normal ones (unused when n == p); bc1, bc2 are 1 - beta^t, Python
    floats or tensors broadcasting over the batch. Returns the new (X, Y, P, V, Q), V and Q None
    when n == p."""
    acc = acc_dtype(X.dtype)
    n, p = X.shape[-2:]
    Xa, Ga = X.to(acc), G.to(acc)
    A = Xa.mT @ Ga
    xi = A - A.mT
    Ya = beta1 * Y.to(acc) - (1 - beta1) * xi
    Pa = beta2 * P.to(acc) + (1 - beta2) * xi * xi
    step_xi = (lr / bc1) * Ya / ((Pa / bc2).sqrt() + eps)
    Z = Xa + Xa @ step_xi
    Va = Qa = None
    if n > p:
        N = Ga - Xa @ A
        Va = beta1 * V.to(acc) - (1 - beta1) * N
        Qa = beta2 * Q.to(acc) + (1 - beta2) * N * N
        nu = (lr / bc1) * Va / ((Qa / bc2).sqrt() + eps)
        Z = Z + (nu - Xa @ (Xa.mT @ nu))
    Xn = polar_ns(Z)
    if n > p:
        Va = Va - Xn @ (Xn.mT @ Va)  # the normal momentum, projected at the new point
    return Xn, Ya, Pa, Va, Qa


def copy_back(dst, src):
    """Write an update's results into the tensors they replace (None: a tall-only moment, square X)."""
    for d, s in zip(dst, src):
        if s is not None:
            d.copy_(s)


def _bias(step: Tensor, beta: float, B: int, dtype: torch.dtype) -> Tensor:
    """1 - beta^t per matrix, (B, 1, 1), from per-parameter steps (S,)."""
    t = step.repeat_interleave(B // step.shape[0])
    return (1.0 - torch.pow(beta, t)).view(B, 1, 1).to(dtype)


# ----------------------------------------------------------------------------- torch kernels (batched)


def _lowrank_generator(X: Tensor, M: Tensor):
    """PM = M - X (X^T M)/2 with W = PM X^T - X PM^T; returns (W Z callable, ||W||_F (B, 1, 1))."""
    PM = M - 0.5 * X @ (X.mT @ M)
    Bm = X.mT @ PM
    # ||PM X^T - X PM^T||_F^2 = 2 ||PM||^2 - 2 tr(B B), B = X^T PM, using X^T X = I.
    w2 = 2.0 * (PM * PM).sum((-2, -1)) - 2.0 * (Bm * Bm.mT).sum((-2, -1))
    wnorm = w2.clamp_min(0).sqrt().view(-1, 1, 1)

    def W(Z):
        return PM @ (X.mT @ Z) - X @ (PM.mT @ Z)

    return W, wnorm


def _sgd_torch(X, G, M, lr, momentum, q, iters, eps):
    acc = acc_dtype(X.dtype)
    Xa, Ga, Ma = X.to(acc), G.to(acc), M.to(acc)
    Ma = momentum * Ma - Ga
    W, wnorm = _lowrank_generator(Xa, Ma)
    Mt = W(Xa)
    alpha = (2.0 * q / (wnorm + eps)).clamp(max=lr)
    Y = Xa + alpha * Mt
    for _ in range(iters):
        Y = Xa + 0.5 * alpha * W(Xa + Y)
    X.copy_(polar_ns(Y))
    M.copy_(Mt)


def _cayley_adam_torch(X, G, m, v, step, lr, beta1, beta2, eps, q, iters):
    acc = acc_dtype(X.dtype)
    B = X.shape[0]
    Xa, Ga = X.to(acc), G.to(acc)
    ma = beta1 * m.to(acc) + (1 - beta1) * Ga
    va = beta2 * v.to(acc) + (1 - beta2) * (Ga * Ga).sum((-2, -1))
    bc1, bc2 = _bias(step, beta1, B, acc), _bias(step, beta2, B, acc)
    r = (va.view(B, 1, 1) / bc2 + eps).sqrt()
    W, wnorm = _lowrank_generator(Xa, ma / bc1)
    # W was built from m^; dividing the generator by r divides W Z and ||W|| by r.
    Mt = W(Xa) / r
    alpha = (2.0 * q / (wnorm / r + eps)).clamp(max=lr)
    Y = Xa - alpha * Mt
    for _ in range(iters):
        Y = Xa - 0.5 * alpha / r * W(Xa + Y)
    X.copy_(polar_ns(Y))
    m.copy_(Mt * r * bc1)
    v.copy_(va)


def _stiefel_adam_torch(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps):
    acc, B = acc_dtype(X.dtype), X.shape[0]
    bc1, bc2 = _bias(step, beta1, B, acc), _bias(step, beta2, B, acc)
    copy_back((X, Y, P, V, Q), stiefel_adam_update(X, G, Y, P, V, Q, bc1, bc2, lr, beta1, beta2, eps))


# ----------------------------------------------------------------------------- references (dense)


def _sgd_reference(X, G, M, lr, momentum, q, iters, eps):
    copy_back((X, M), cayley_sgd_update(X, G, M, lr, momentum, q, iters, eps))


def _cayley_adam_reference(X, G, m, v, step, lr, beta1, beta2, eps, q, iters):
    step.add_(1)
    acc, B = acc_dtype(X.dtype), X.shape[0]
    bc1, bc2 = _bias(step, beta1, B, acc), _bias(step, beta2, B, acc)
    copy_back((X, m, v), cayley_adam_update(X, G, m, v, bc1, bc2, lr, beta1, beta2, eps, q, iters))


def _stiefel_adam_reference(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps):
    step.add_(1)
    _stiefel_adam_torch(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps)


# ----------------------------------------------------------------------------- checks


def _check_stack(X: Tensor, t: Tensor, name: str, shape) -> None:
    """t: a contiguous tensor of `shape` with X's dtype and device."""
    def msg():
        return (f"{name}: expected a contiguous {X.dtype} tensor of shape {tuple(shape)} on {X.device}, "
                f"got {tuple(t.shape)} {t.dtype} {t.device}")

    if t.dim() != len(shape) or not t.is_contiguous() or t.dtype != X.dtype or t.device != X.device:
        raise ValueError(msg())
    for a, b in zip(t.shape, shape):
        _require(a == b, msg)


def _check_x(X: Tensor, G: Tensor) -> None:
    if X.dim() != 3 or not X.is_contiguous() or X.dtype not in FLOAT_DTYPES:
        raise ValueError(f"X: expected a contiguous floating (B, n, p) tensor, got shape {tuple(X.shape)} {X.dtype}")
    _require(X.shape[1] >= X.shape[2], lambda: (
        f"X: expected (B, n, p) with n >= p, got shape {tuple(X.shape)}"))
    _check_stack(X, G, "G", X.shape)


def _check_step(X: Tensor, step: Tensor) -> None:
    """step (S,) float64 on X's device, S dividing B."""
    def msg():
        return (f"step: expected a float64 (S,) tensor on {X.device} with S dividing B={X.shape[0]}, "
                f"got {tuple(step.shape)} {step.dtype}")

    if step.dim() != 1 or step.dtype != torch.float64 or step.device != X.device or not step.is_contiguous():
        raise ValueError(msg())
    _require(step.shape[0] > 0, msg)
    _require(X.shape[0] % step.shape[0] == 0, msg)


def _check_sgd(X, G, M, lr, momentum, q, iters, eps):
    _check_x(X, G)
    _check_stack(X, M, "M", X.shape)


def _check_cayley_adam(X, G, m, v, step, lr, beta1, beta2, eps, q, iters):
    _check_x(X, G)
    _check_stack(X, m, "m", X.shape)
    _check_stack(X, v, "v", X.shape[:1])
    _check_step(X, step)


def _check_stiefel_adam(X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step, lr, beta1, beta2,
                        eps):
    _check_x(X, G)
    B, n, p = X.shape
    _check_stack(X, exp_avg, "exp_avg", (B, p, p))
    _check_stack(X, exp_avg_sq, "exp_avg_sq", (B, p, p))
    # the normal moments exist for tall matrices only: (0,) placeholders when n == p
    nshape = (B, n, p) if n > p else (0,)
    _check_stack(X, exp_avg_normal, "exp_avg_normal", nshape)
    _check_stack(X, exp_avg_sq_normal, "exp_avg_sq_normal", nshape)
    _check_step(X, step)


# ----------------------------------------------------------------------------- kernels


def _polar_args(X: Tensor) -> tuple[float, int]:
    """The Newton-Schulz stopping rule every non-torch kernel is passed: (tol, max_iter)."""
    return polar_tol(X.shape[1], X.shape[2], X.dtype), POLAR_MAX_ITER


def _triton_supports(X, *args):
    return triton_module("stiefel").supports(X.shape[1], X.shape[2])


def _cuda_supports(name):
    def supports(X, *args):
        return torch.ops.specops_ext.stiefel_step_refusal(name, X) or None

    return supports


def _kernels(name: str, torch_fn, step_at: int | None) -> dict[str, Kernel]:
    """Every backend's kernel of step op `name`. Each advances the step counters (argument `step_at`
    of the Adam variants) first and launches nothing for an empty stack."""
    def ext(*args):
        getattr(torch.ops.specops_ext, name)(*args, *_polar_args(args[0]))

    def triton(*args):
        getattr(triton_module("stiefel"), name)(*args, *_polar_args(args[0]))

    def launch(fn):
        def run(*args):
            if step_at is not None:
                args[step_at].add_(1)
            if args[0].numel():
                fn(*args)

        return run

    return {"torch": Kernel(launch(torch_fn)), "cpp": Kernel(launch(ext)),
            "cuda": Kernel(launch(ext), supports=_cuda_supports(name)),
            "triton": Kernel(launch(triton), supports=_triton_supports)}


# ----------------------------------------------------------------------------- samples


# (B, n, p, S): tall, square, 1 x 1, two parameters of three matrices, beyond the Triton tile
# (n > 32), an empty stack.
_STACKS = [(3, 5, 3, 1), (2, 4, 4, 2), (2, 1, 1, 1), (6, 7, 2, 2), (2, 40, 6, 1), (0, 3, 2, 1)]


def _stack_samples(device, dtype, state):
    """(X, G, *state(B, n, p, S, randn)) per stack of _STACKS: X orthonormal, G ~ N(0, 1)."""
    out = []
    for B, n, p, S in _STACKS:
        def randn(*shape):
            return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)

        X = torch.linalg.qr(torch.randn(B, n, p, dtype=torch.float64))[0].to(device=device, dtype=dtype)
        out.append((X.contiguous(), randn(B, n, p), *state(B, n, p, S, randn)))
    return out


def _steps(S, device):
    """Step counters at 0, 4, ... (the first step and later ones)."""
    return torch.arange(S, dtype=torch.float64, device=device) * 4


def _sgd_samples(device, dtype):
    return _stack_samples(device, dtype, lambda B, n, p, S, randn: (0.1 * randn(B, n, p), 0.1, 0.9, 0.5, 2, 1e-8))


def _cayley_adam_samples(device, dtype):
    return _stack_samples(device, dtype, lambda B, n, p, S, randn: (
        0.1 * randn(B, n, p), (randn(B).abs() * n * p), _steps(S, device), 0.05, 0.9, 0.999, 1e-8, 0.5, 2))


def _stiefel_adam_samples(device, dtype):
    def state(B, n, p, S, randn):
        A = 0.01 * randn(B, p, p)
        tall = n > p
        normal = [0.01 * randn(B, n, p), 1e-3 * randn(B, n, p).abs()] if tall else [randn(0), randn(0)]
        return (A - A.mT, 1e-3 * randn(B, p, p).abs(), *normal, _steps(S, device), 0.05, 0.9, 0.999, 1e-5)

    return _stack_samples(device, dtype, state)


# ----------------------------------------------------------------------------- the ops


def _declare_step(name, schema, torch_kernel, step_at, check, reference, samples, doc):
    """A step op: it writes its (a!)-annotated arguments and returns nothing (no fake output, no autograd)."""
    return declare(name, schema, kernels=_kernels(name, torch_kernel, step_at), check=check, fake=lambda *args: None,
                   reference=reference, samples=samples, tol_scale=4.0, fixed_dtype=("step",), doc=doc)


stiefel_sgd_step = _declare_step(
    "stiefel_sgd_step",
    "(Tensor(a!) X, Tensor G, Tensor(b!) M, float lr, float momentum, float q, int iters, float eps) -> ()",
    _sgd_torch, None, _check_sgd, _sgd_reference, _sgd_samples,
    """One Cayley SGD step (module docstring) for every matrix of X (B, n, p), in place; M
    (B, n, p) the momentum, overwritten with the projected one. Raises ValueError for a non-contiguous
    or non-(B, n, p) X with n >= p, or state of another shape, dtype or device.""",
)

cayley_adam_step = _declare_step(
    "cayley_adam_step",
    "(Tensor(a!) X, Tensor G, Tensor(b!) m, Tensor(c!) v, Tensor(d!) step, float lr, float beta1, float beta2, "
    "float eps, float q, int iters) -> ()",
    _cayley_adam_torch, 4, _check_cayley_adam, _cayley_adam_reference, _cayley_adam_samples,
    """One Cayley Adam step for every matrix of X (B, n, p), in place; m (B, n, p), v (B,),
    step (S,) float64 (matrix b belongs to parameter b // (B/S)), incremented first.""",
)

stiefel_adam_step = _declare_step(
    "stiefel_adam_step",
    "(Tensor(a!) X, Tensor G, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) exp_avg_normal, "
    "Tensor(e!) exp_avg_sq_normal, Tensor(f!) step, float lr, float beta1, float beta2, float eps) -> ()",
    _stiefel_adam_torch, 6, _check_stiefel_adam, _stiefel_adam_reference, _stiefel_adam_samples,
    """One StiefelAdam step for every matrix of X (B, n, p), in place. exp_avg/exp_avg_sq (B, p, p)
    are the skew moments Y, P; exp_avg_normal/exp_avg_sq_normal (B, n, p) the normal ones V, Q
    (empty (0,) tensors when n == p); step (S,) float64 as in cayley_adam_step.""",
)
