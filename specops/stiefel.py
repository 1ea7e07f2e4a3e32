"""Operations on the Stiefel manifold St(n, p) = {X in R^{n x p} : X^T X = I_p}, n >= p.

Matrices are (..., n, p) with orthonormal columns (batches broadcast over the leading dims).

- project(X, G, metric): the tangent projection of an ambient G at X,
      euclidean:  G - X sym(X^T G),   sym(A) = (A + A^T) / 2
      canonical:  G - X G^T X          (the Riemannian gradient under the canonical metric)
- cayley(A) = (I - A/2)^{-1} (I + A/2) = 2 (I - A/2)^{-1} - I: orthogonal for skew A (OFT's
  parametrisation). No path factors I - A/2 by a batched LU (on some CPUs MKL's batched LU never
  returns for n >= ~160 with several threads). For exactly skew A (A^T = -A, as Q - Q^T is),
  (I - A/2)^{-1} = (I + A/2) C^{-1} with C = (I - A/2)(I + A/2) = I + A^T A / 4 symmetric positive
  definite: one batched Cholesky, then one step of iterative refinement on M Z = B (M = I - A/2),
  which brings back the accuracy that forming C (condition number squared) costs. Other matrices
  of a batch are solved one by one (unbatched LU).
- matrix_polynomial(A, c) = sum_k c_k A^k (c_0 multiplies I), by Horner's scheme: the truncated
  Neumann series (I + A)(I - A)^{-1} ~ I + 2 A + 2 A^2 + ... that PEFT's OFT takes for its Cayley
  transform, as one op on thousands of tiny blocks instead of a chain of batched GEMMs.
- retract(X, V, method): a point of St(n, p) near X + V whose derivative along V at V = 0 is V.
      "cayley":      Cay(W) X with the canonical generator W = (P V) X^T - X (P V)^T,
                     P V = V - X (X^T V) / 2, so W X = V for tangent V (Li, Fuxin & Todorovic 2020).
                     W lives in span(X, P V): with A = X^T P V and Q2 R2 the QR factors of
                     P V - X A, Q = [X, Q2] and W = Q What Q^T, What = [[A - A^T, -R2^T], [R2, 0]]
                     (2p x 2p, exactly skew), so Cay(W) X = Q Cay(What)[:, :p]: O(n p^2), not
                     O(n^3) (used when n > 2p; else the dense n x n skew solve above).
      "cayley_iter": the paper's fixed-point form, Y = X + W X, twice Y <- X + W (X + Y) / 2.
      "qr":          the Q factor of X + V with a non-negative diagonal of R.
      "polar":       (X + V) ((X + V)^T (X + V))^{-1/2} by Newton-Schulz iterations
                     Y <- Y (3 I - Y^T Y) / 2, stopped when ||Y^T Y - I||_F reaches round-off
                     (<= eps sqrt(n p)) or stops decreasing.
- orthogonality_error(X) = ||X^T X - I||_F per matrix.

Gradients: project and cayley are differentiable (their backward is itself a registered op):
    project (euclidean), P = G - X S, S = sym(X^T G), T = sym(X^T dP):
        dG = dP - X T,          dX = -dP S - G T
    project (canonical), P = G - X G^T X:
        dG = dP - X dP^T X,     dX = -dP X^T G - G X^T dP
    cayley, Y = 2 M^{-1} - I with M = I - A/2:   dA = M^{-T} dY M^{-T} = (I + Y)^T dY (I + Y)^T / 4
        (M^{-1} = (I + Y)/2: the backward needs Y only, no solve).
    matrix_polynomial, H_d = c_d I, H_k = c_k I + A H_{k+1}, P = H_0:
        dA = sum_{k<d} dH_k H_{k+1}^T with dH_0 = dP, dH_{k+1} = A^T dH_k (H_k recomputed from A)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._constants import CAYLEY_ITERS, FLOAT_DTYPES, POLAR_MAX_ITER, acc_dtype, polar_tol
from ._registry import declare

__all__ = [
    "project",
    "cayley",
    "matrix_polynomial",
    "retract",
    "orthogonality_error",
    "project_reference",
    "cayley_reference",
    "matrix_polynomial_reference",
    "retract_reference",
    "orthogonality_error_reference",
    "polar_ns",
    "POLAR_MAX_ITER",
]

METRICS = ("euclidean", "canonical")
RETRACTIONS = ("cayley", "cayley_iter", "qr", "polar")


# ----------------------------------------------------------------------------- checks


def _require(cond, msg) -> None:
    """torch._check_with(ValueError, cond, msg), skipped when cond is a plain True: free on real
    tensors (the step ops run thousands of times a second), while a relation between symbolic
    shapes (torch.compile) is still recorded or refused."""
    if cond is not True:
        torch._check_with(ValueError, cond, msg)


def _check_matrix(name: str, X: Tensor, tall: bool = True) -> None:
    if not isinstance(X, Tensor) or X.dim() < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{name}: expected a (..., n, p) matrix batch, got shape {shape}")
    if X.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {X.dtype}")
    if tall:
        _require(X.shape[-2] >= X.shape[-1], lambda: (
            f"{name}: expected (..., n, p) with n >= p (orthonormal columns), got shape {tuple(X.shape)}"))


def _check_pair(X: Tensor, V: Tensor, vname: str) -> None:
    _check_matrix("X", X)
    _check_matrix(vname, V, tall=False)
    for d in (-2, -1):
        _require(V.shape[d] == X.shape[d], lambda: (
            f"{vname}: expected (..., {X.shape[-2]}, {X.shape[-1]}) like X, got shape {tuple(V.shape)}"))
    if V.dtype != X.dtype or V.device != X.device:
        raise ValueError(f"{vname}: dtype/device {V.dtype}/{V.device} != X's {X.dtype}/{X.device}")
    try:
        torch.broadcast_shapes(X.shape[:-2], V.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{vname}: batch dims {tuple(V.shape[:-2])} do not broadcast with X's {tuple(X.shape[:-2])}"
        ) from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_square(A: Tensor, name: str = "A") -> None:
    _check_matrix(name, A, tall=False)
    _require(A.shape[-1] == A.shape[-2], lambda: (
        f"{name}: expected square (..., n, n) matrices, got shape {tuple(A.shape)}"))


def _pair_shape(X: Tensor, V: Tensor) -> list[int]:
    return [*torch.broadcast_shapes(X.shape[:-2], V.shape[:-2]), *X.shape[-2:]]


def _acc(t: Tensor) -> Tensor:
    """Half precision computes in fp32 (linalg has no bf16/fp16 kernels)."""
    return t.to(acc_dtype(t.dtype))


def _eye(p: int, like: Tensor) -> Tensor:
    return torch.eye(p, dtype=like.dtype, device=like.device)


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.mT)


# ----------------------------------------------------------------------------- references


def project_reference(X: Tensor, G: Tensor, metric: str = "euclidean") -> Tensor:
    """Pure-torch tangent projection (see the module docstring); differentiable by autograd."""
    _check_choice("metric", metric, METRICS)
    if metric == "euclidean":
        return G - X @ _sym(X.mT @ G)
    return G - X @ G.mT @ X


def cayley_reference(A: Tensor) -> Tensor:
    """(I - A/2)^{-1} (I + A/2) by dense solves, one matrix at a time (never a batched LU)."""
    n = A.shape[-1]
    I = _eye(n, A)
    flat = A.reshape(math.prod(A.shape[:-2]), n, n)
    out = [torch.linalg.solve(I - 0.5 * a, I + 0.5 * a) for a in flat]
    return (torch.stack(out) if out else flat.clone()).reshape(A.shape)


def matrix_polynomial_reference(A: Tensor, coeffs: list[float]) -> Tensor:
    """sum_k c_k A^k from the powers of A (not Horner's scheme)."""
    P = coeffs[0] * _eye(A.shape[-1], A).expand(A.shape)
    for k, c in enumerate(coeffs[1:], start=1):
        P = P + c * torch.linalg.matrix_power(A, k)
    return P


def orthogonality_error_reference(X: Tensor) -> Tensor:
    """||X^T X - I||_F per matrix, in float64."""
    X = X.double()
    return torch.linalg.matrix_norm(X.mT @ X - _eye(X.shape[-1], X))


def retract_reference(X: Tensor, V: Tensor, method: str = "cayley") -> Tensor:
    """Dense forms of the retractions: n x n Cayley solve, SVD polar factor, sign-fixed QR."""
    _check_choice("method", method, RETRACTIONS)
    if method in ("cayley", "cayley_iter"):
        PV = V - 0.5 * X @ (X.mT @ V)
        W = PV @ X.mT - X @ PV.mT
        if method == "cayley":
            return cayley_reference(W) @ X
        Y = X + W @ X
        for _ in range(CAYLEY_ITERS):
            Y = X + 0.5 * W @ (X + Y)
        return Y
    if method == "polar":
        U, _, Vh = torch.linalg.svd(X + V, full_matrices=False)
        return U @ Vh
    return _qr_pos(X + V)


# ----------------------------------------------------------------------------- torch kernels


def _qr_pos(Y: Tensor) -> Tensor:
    Q, R = torch.linalg.qr(Y)
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    return Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)


def _dev(S: Tensor) -> Tensor:
    """||S - I||_F per matrix."""
    return torch.linalg.matrix_norm(S - _eye(S.shape[-1], S))


def polar_ns(Y: Tensor, tol: float | None = None, max_iter: int = POLAR_MAX_ITER) -> Tensor:
    """Polar factor Y (Y^T Y)^{-1/2} of full-rank (..., n, p) Y by Newton-Schulz, per matrix.

    A matrix whose Y^T Y has max-row-sum norm > 2 is first scaled by its inverse square root
    (the polar factor is scale invariant), so every singular value is <= sqrt(2); from there each
    iteration Y <- Y (3I - Y^T Y)/2 strictly decreases ||Y^T Y - I||_F until round-off. A matrix
    stops when that error is <= tol (default: specops._constants.polar_tol, eps sqrt(n p)) or would
    not decrease, after at most max_iter iterations; the optimisers' fused kernels follow exactly
    this rule (they are passed the same tol and max_iter).
    """
    n, p = Y.shape[-2:]
    if tol is None:
        tol = polar_tol(n, p, Y.dtype)
    I = _eye(p, Y)
    S = Y.mT @ Y
    rmax = S.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    c = torch.where(rmax > 2, rmax.rsqrt(), torch.ones_like(rmax))
    Y, S = Y * c, S * (c * c)
    err = _dev(S)
    active = err > tol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Yn = Y @ (1.5 * I - 0.5 * S)
        Sn = Yn.mT @ Yn
        errn = _dev(Sn)
        upd = active & (errn < err)
        u = upd[..., None, None]
        Y, S, err = torch.where(u, Yn, Y), torch.where(u, Sn, S), torch.where(upd, errn, err)
        active = upd & (err > tol)
    return Y


def _skew_solve(A: Tensor, B: Tensor | None = None) -> Tensor:
    """(I - A/2)^{-1} B (B = None: the identity) for exactly skew (..., n, n) A, by the SPD form
    in the module docstring. A non-finite matrix gives a non-finite result for itself only
    (cholesky_ex does not raise)."""
    I = _eye(A.shape[-1], A)
    N, M = I + 0.5 * A, I - 0.5 * A
    L = torch.linalg.cholesky_ex(I + 0.25 * (A.mT @ A))[0]
    if B is None:  # C^{-1} once, then GEMMs: faster than triangular solves with n right-hand sides
        Ci = torch.cholesky_inverse(L)
        Z = Ci @ N
        return Z + Ci @ (N @ (I - M @ Z))  # one refinement step
    Z = torch.cholesky_solve(N @ B, L)
    return Z + torch.cholesky_solve(N @ (B - M @ Z), L)


def _cayley_retract(X: Tensor, V: Tensor) -> Tensor:
    n, p = X.shape[-2:]
    X, V = torch.broadcast_tensors(X, V)
    A = X.mT @ V
    PV = V - 0.5 * X @ A
    if n <= 2 * p:  # the dense n x n solve is no more expensive than the 2p x 2p one
        Wh = PV @ X.mT
        return 2.0 * _skew_solve(Wh - Wh.mT, X) - X
    A = 0.5 * A  # X^T P V = X^T V / 2 (X^T X = I)
    Q2, R2 = torch.linalg.qr(PV - X @ A)
    S = A - A.mT
    Wh = torch.cat([torch.cat([S, -R2.mT], -1), torch.cat([R2, torch.zeros_like(R2)], -1)], -2)
    E = torch.cat([_eye(p, X).expand_as(S), torch.zeros_like(S)], -2)  # Q^T X = [I; 0]
    Z = _skew_solve(Wh, E)
    return 2.0 * (X @ Z[..., :p, :] + Q2 @ Z[..., p:, :]) - X


def _cayley_iter_retract(X: Tensor, V: Tensor) -> Tensor:
    PV = V - 0.5 * X @ (X.mT @ V)

    def W(Z):  # W Z without forming the n x n generator
        return PV @ (X.mT @ Z) - X @ (PV.mT @ Z)

    Y = X + W(X)
    for _ in range(CAYLEY_ITERS):
        Y = X + 0.5 * W(X + Y)
    return Y


def _retract_torch(X: Tensor, V: Tensor, method: str) -> Tensor:
    dtype = X.dtype
    X, V = _acc(X), _acc(V)
    if method == "cayley":
        Y = _cayley_retract(X, V)
    elif method == "cayley_iter":
        Y = _cayley_iter_retract(X, V)
    elif method == "qr":
        Y = _qr_pos(X + V)
    else:
        Y = polar_ns(X + V)
    return Y.expand(_pair_shape(X, V)).to(dtype).contiguous()


def _project_torch(X: Tensor, G: Tensor, metric: str) -> Tensor:
    out = project_reference(_acc(X), _acc(G), metric)
    return out.expand(_pair_shape(X, G)).to(X.dtype).contiguous()


def _sum_to(t: Tensor, shape) -> Tensor:
    """Reduce broadcast batch dims of a gradient back to `shape`."""
    if tuple(t.shape) == tuple(shape):
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _project_backward_torch(grad: Tensor, X: Tensor, G: Tensor, metric: str) -> list[Tensor]:
    """[dX, dG] of P = project(X, G, metric) (formulas in the module docstring)."""
    dP, X_, G_ = _acc(grad), _acc(X), _acc(G)
    if metric == "euclidean":
        S = _sym(X_.mT @ G_)
        T = _sym(X_.mT @ dP)
        dG = dP - X_ @ T
        dX = -dP @ S - G_ @ T
    else:
        dG = dP - X_ @ dP.mT @ X_
        dX = -dP @ (X_.mT @ G_) - G_ @ (X_.mT @ dP)
    return [_sum_to(dX, X.shape).to(X.dtype).contiguous(), _sum_to(dG, G.shape).to(G.dtype).contiguous()]


def _cayley_solve(A: Tensor) -> Tensor:
    """2 (I - A/2)^{-1} - I per matrix of (..., n, n) A: the SPD path for every matrix, then the
    matrices that are not exactly skew recomputed one by one (so no matrix's path or result
    depends on the others)."""
    n = A.shape[-1]
    flat = A.reshape(math.prod(A.shape[:-2]), n, n)
    I = _eye(n, flat)
    Y = 2.0 * _skew_solve(flat) - I
    general = (flat != -flat.mT).flatten(1).any(1)
    if bool(general.any()):
        bad = []
        for b in general.nonzero().flatten().tolist():
            a = flat[b]
            Y[b], info = torch.linalg.solve_ex(I - 0.5 * a, I + 0.5 * a)
            if info.item() > 0 and bool(a.isfinite().all()):
                bad.append(b)
        if bad:
            raise ValueError(
                f"A: I - A/2 is singular for matrix {bad[0]} of the flattened batch {tuple(A.shape[:-2])}; "
                f"the Cayley transform needs it invertible (always so for skew-symmetric A)"
            )
    return Y.reshape(A.shape)


def _cayley_torch(A: Tensor) -> Tensor:
    return _cayley_solve(_acc(A)).to(A.dtype).contiguous()


def _cayley_backward_torch(grad: Tensor, Y: Tensor) -> Tensor:
    """dA = M^{-T} dY M^{-T} = (I + Y)^T dY (I + Y)^T / 4 from the output Y = cayley(A)."""
    Y_ = _acc(Y)
    Ht = (Y_ + _eye(Y.shape[-1], Y_)).mT
    return (0.25 * (Ht @ _acc(grad) @ Ht)).to(Y.dtype).contiguous()


def _horner(A: Tensor, coeffs: list[float]) -> list[Tensor]:
    """[H_d, H_{d-1}, ..., H_0] of Horner's scheme (module docstring) for (..., n, n) A."""
    I = _eye(A.shape[-1], A)
    H = [coeffs[-1] * I.expand(A.shape)]
    for c in reversed(coeffs[:-1]):
        H.append(A @ H[-1] + c * I)
    return H


def _polynomial_torch(A: Tensor, coeffs: list[float]) -> Tensor:
    return _horner(_acc(A), coeffs)[-1].to(A.dtype).contiguous()


def _polynomial_backward_torch(grad: Tensor, A: Tensor, coeffs: list[float]) -> Tensor:
    A_ = _acc(A)
    H = _horner(A_, coeffs)[::-1]  # H[k] = H_k
    dH, dA = _acc(grad), torch.zeros_like(A_)
    for k in range(len(coeffs) - 1):
        dA = dA + dH @ H[k + 1].mT
        dH = A_.mT @ dH
    return dA.to(A.dtype).contiguous()


def _orthogonality_error_torch(X: Tensor) -> Tensor:
    X_ = _acc(X)
    return _dev(X_.mT @ X_).to(X.dtype)


# ----------------------------------------------------------------------------- samples


def _point(device, dtype, *shape) -> Tensor:
    """A random point of St(n, p) (orthonormal columns), drawn in float64."""
    return torch.linalg.qr(torch.randn(*shape, dtype=torch.float64))[0].to(device=device, dtype=dtype)


def _randn(device, dtype, *shape) -> Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def _skew(device, dtype, *shape) -> Tensor:
    A = torch.randn(*shape, dtype=torch.float64)
    return (A - A.mT).to(device=device, dtype=dtype)


# (X batch, V batch, n, p): tall (Woodbury Cayley: n > 2p), tall dense, square, 1 x 1, broadcast
# batch dims, an empty batch.
_PAIRS = [((3,), (3,), 9, 3), ((), (), 5, 3), ((2,), (2,), 4, 4), ((), (), 1, 1), ((1, 2), (3, 1), 6, 2),
          ((0,), (0,), 5, 2)]


def _project_samples(device, dtype):
    return [(_point(device, dtype, *bx, n, p), _randn(device, dtype, *bv, n, p), METRICS[i % 2])
            for i, (bx, bv, n, p) in enumerate(_PAIRS)]


def _cayley_samples(device, dtype):
    """Exactly skew batches (the Cholesky path; 37 x 37: the cpp kernel's block recursion), 1 x 1, a
    general (not skew) matrix among skew ones (solved on its own), an empty batch."""
    mixed = _skew(device, dtype, 3, 4, 4)
    mixed[1] += 0.3 * _randn(device, dtype, 4, 4)
    return [(_skew(device, dtype, 2, 5, 5),), (_skew(device, dtype, 2, 37, 37),), (_skew(device, dtype, 1, 1),),
            (mixed,), (_skew(device, dtype, 0, 3, 3),)]


def _polynomial_samples(device, dtype):
    """PEFT's 5-term Neumann series on small skew blocks (the cpp kernel's loops) and on 20 x 20 ones (its
    batched GEMMs), a general matrix batch with two batch dims, a linear term, 1 x 1, empty."""
    neumann = [1.0, 2.0, 2.0, 2.0, 1.0]
    return [(0.3 * _skew(device, dtype, 6, 4, 4), neumann), (0.1 * _skew(device, dtype, 3, 20, 20), neumann),
            (0.5 * _randn(device, dtype, 2, 3, 5, 5), [0.5, -1.0, 0.25]), (_randn(device, dtype, 2, 3, 3), [1.0, 2.0]), (_randn(device, dtype, 1, 1), [1.0, 2.0, 2.0, 1.0]),
            (_randn(device, dtype, 0, 3, 3), neumann)]


def _retract_samples(device, dtype):
    out = []
    for i, (bx, bv, n, p) in enumerate(_PAIRS):
        X = _point(device, dtype, *bx, n, p)
        V = project_reference(X, 0.3 * _randn(device, dtype, *bv, n, p))
        out += [(X, V, RETRACTIONS[(i + k) % len(RETRACTIONS)]) for k in range(2)]
    return out


def _orthogonality_error_samples(device, dtype):
    """Near-orthonormal and random matrices, 1 x 1, wide (p > n allowed), an empty batch."""
    X = _point(device, dtype, 3, 7, 3)
    return [(X + 0.01 * _randn(device, dtype, *X.shape),), (_randn(device, dtype, 2, 3, 4, 2),),
            (_randn(device, dtype, 1, 1),), (_randn(device, dtype, 2, 5),), (_randn(device, dtype, 0, 4, 3),)]


# ----------------------------------------------------------------------------- the ops


def _check_project(X, G, metric):
    _check_pair(X, G, "G")
    _check_choice("metric", metric, METRICS)


_stiefel_project_backward = declare(
    "stiefel_project_backward",
    "(Tensor grad, Tensor X, Tensor G, str metric) -> Tensor[]",
    kernels={"torch": _project_backward_torch},
    check=lambda grad, X, G, metric: _check_project(X, G, metric),
    fake=lambda grad, X, G, metric: [X.new_empty(X.shape), G.new_empty(G.shape)],
)


def _project_setup(ctx, inputs, output):
    X, G, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(X, G)


def _project_backward(ctx, grad):
    X, G = ctx.saved_tensors
    dX, dG = _stiefel_project_backward(grad, X, G, ctx.metric)
    return dX, dG, None


project = declare(
    "stiefel_project",
    "(Tensor X, Tensor G, str metric=\"euclidean\") -> Tensor",
    kernels={"torch": _project_torch},
    check=_check_project,
    fake=lambda X, G, metric: X.new_empty(_pair_shape(X, G)),
    reference=lambda X, G, metric: project_reference(X, G, metric),
    backward="stiefel_project_backward",
    setup_context=_project_setup,
    backward_fn=_project_backward,
    samples=_project_samples,
    tol_scale=4.0,
    doc="""Tangent projection of G at X on St(n, p).

    euclidean: G - X sym(X^T G) (orthogonal projection onto {V : X^T V + V^T X = 0});
    canonical: G - X G^T X (the Riemannian gradient under the canonical metric).
    X (..., n, p) with n >= p, G (..., n, p); batch dims broadcast. Differentiable in X and G.
    Raises ValueError for non-matrices, n < p, mismatched shapes/dtypes, or an unknown metric.
    """,
)


_cayley_backward = declare(
    "cayley_backward",
    "(Tensor grad, Tensor Y) -> Tensor",
    kernels={"torch": _cayley_backward_torch,
             "cpp": lambda grad, Y: torch.ops.specops_ext.cayley_bwd(grad, Y)},
    check=lambda grad, Y: _check_square(Y, "Y"),
    fake=lambda grad, Y: Y.new_empty(Y.shape),
)


def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_grad(ctx, grad):
    (Y,) = ctx.saved_tensors
    return _cayley_backward(grad, Y)


cayley = declare(
    "cayley",
    "(Tensor A) -> Tensor",
    kernels={"torch": _cayley_torch, "cpp": lambda A: torch.ops.specops_ext.cayley_fwd(A)},
    check=_check_square,
    fake=lambda A: A.new_empty(A.shape),
    reference=cayley_reference,
    backward="cayley_backward",
    setup_context=_cayley_setup,
    backward_fn=_cayley_grad,
    samples=_cayley_samples,
    tol_scale=10.0,
    doc="""Cayley transform (I - A/2)^{-1} (I + A/2) of (..., n, n) matrices.

    Orthogonal (determinant +1) when A is skew-symmetric; defined whenever I - A/2 is invertible,
    which a skew A guarantees. The cpp kernel calls no LAPACK: an exactly skew, finite matrix larger
    than 32 x 32 is inverted by 2 x 2 block recursion (M^{-1} from M11^{-1} and the Schur complement
    M22 - M21 M11^{-1} M12, batched GEMMs in fp32 / fp64; no pivoting needed, as M = I - A/2 has
    symmetric part I), any other matrix and the leaf blocks by Gauss-Jordan elimination with partial
    pivoting in float64, one matrix per task. The torch kernel takes a batched Cholesky path for
    exactly skew matrices (A^T == -A elementwise, e.g. Q - Q^T) and solves any other matrix on its
    own by LU (slower, same result).
    Differentiable: dA = M^{-T} dY M^{-T} with M = I - A/2 (the full gradient, not projected onto
    skew matrices), computed from Y without a solve. bf16/fp16 compute in fp32.
    Raises ValueError for non-square input or a finite A whose I - A/2 is singular.
    """,
)


def _check_polynomial(A, coeffs):
    _check_square(A)
    if len(coeffs) < 1:
        raise ValueError("coeffs: expected at least one coefficient (c_0, the multiple of I)")


_polynomial_backward = declare(
    "matrix_polynomial_backward",
    "(Tensor grad, Tensor A, float[] coeffs) -> Tensor",
    kernels={"torch": _polynomial_backward_torch,
             "cpp": lambda grad, A, coeffs: torch.ops.specops_ext.matrix_polynomial_bwd(grad, A, coeffs)},
    check=lambda grad, A, coeffs: _check_polynomial(A, coeffs),
    fake=lambda grad, A, coeffs: A.new_empty(A.shape),
)


def _polynomial_setup(ctx, inputs, output):
    A, ctx.coeffs = inputs
    ctx.save_for_backward(A)


def _polynomial_grad(ctx, grad):
    (A,) = ctx.saved_tensors
    return _polynomial_backward(grad, A, ctx.coeffs), None


matrix_polynomial = declare(
    "matrix_polynomial",
    "(Tensor A, float[] coeffs) -> Tensor",
    kernels={"torch": _polynomial_torch,
             "cpp": lambda A, coeffs: torch.ops.specops_ext.matrix_polynomial_fwd(A, coeffs)},
    check=_check_polynomial,
    fake=lambda A, coeffs: A.new_empty(A.shape),
    reference=matrix_polynomial_reference,
    backward="matrix_polynomial_backward",
    setup_context=_polynomial_setup,
    backward_fn=_polynomial_grad,
    samples=_polynomial_samples,
    tol_scale=4.0,
    doc="""P(A) = sum_k coeffs[k] A^k of (..., n, n) matrices (coeffs[0] multiplies I), by Horner's scheme.

    H_d = c_d I, H_k = c_k I + A H_{k+1}, P = H_0: d - 1 matrix products for degree d. The use it is
    made for: the truncated Neumann series of a Cayley transform, (I + Q)(I - Q)^{-1} ~ I + 2 sum_k Q^k,
    on many small skew blocks at once (PEFT's OFT rotation, coefficients [1, 2, 2, 2, 1] by default).
    The cpp kernel runs per-matrix loops up to 16 x 16 and batched GEMMs above; bf16/fp16 accumulate
    in fp32. Differentiable in A: dA = sum_{k<d} dH_k H_{k+1}^T, dH_0 = dP, dH_{k+1} = A^T dH_k.
    Raises ValueError for non-square input or an empty coefficient list.
    """,
)


def _check_retract(X, V, method):
    _check_pair(X, V, "V")
    _check_choice("method", method, RETRACTIONS)


retract = declare(
    "stiefel_retract",
    "(Tensor X, Tensor V, str method=\"cayley\") -> Tensor",
    kernels={"torch": _retract_torch},
    check=_check_retract,
    fake=lambda X, V, method: X.new_empty(_pair_shape(X, V)),
    reference=lambda X, V, method: retract_reference(X, V, method),
    samples=_retract_samples,
    tol_scale=8.0,
    torch_autograd=True,
    doc="""Retraction R_X(V) on St(n, p): "cayley" (exact, Woodbury form for tall X), "cayley_iter"
    (Li et al.'s two fixed-point iterations; orthogonal only to O(|V|^4)), "qr", or "polar"
    (Newton-Schulz with a stopping rule): the names in RETRACTIONS. See the module docstring for
    the formulas.

    X (..., n, p) on the manifold, V (..., n, p) (tangent at X for the retraction property).
    Differentiable in X and V (any order) by autograd through the torch ops above (polar: through the
    iterations taken). Raises ValueError on bad shapes or an unknown method.
    """,
)


def _check_orthogonality_error(X):
    _check_matrix("X", X, tall=False)


orthogonality_error = declare(
    "orthogonality_error",
    "(Tensor X) -> Tensor",
    kernels={"torch": _orthogonality_error_torch},
    check=_check_orthogonality_error,
    fake=lambda X: X.new_empty(X.shape[:-2]),
    reference=lambda X: orthogonality_error_reference(X).to(X.dtype),
    samples=_orthogonality_error_samples,
    tol_scale=4.0,
    torch_autograd=True,
    doc="""||X^T X - I_p||_F for each matrix of a (..., n, p) batch; shape X.shape[:-2], X's dtype.

    Differentiable (any order) by autograd through its torch ops.
    """,
)
