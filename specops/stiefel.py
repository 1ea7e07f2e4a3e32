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
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kron import _FLOAT_DTYPES, _acc_dtype

__all__ = [
    "project",
    "cayley",
    "retract",
    "orthogonality_error",
    "project_reference",
    "cayley_reference",
    "retract_reference",
    "orthogonality_error_reference",
    "polar_ns",
    "POLAR_MAX_ITER",
]

METRICS = ("euclidean", "canonical")
METHODS = ("cayley", "cayley_iter", "qr", "polar")
# Newton-Schulz converges quadratically from ||Y^T Y - I|| < 1; 30 also covers a start rescaled
# from a nearly rank-deficient Y (the slow phase grows small singular values by 1.5x per step).
POLAR_MAX_ITER = 30
CAYLEY_ITERS = 2  # fixed-point iterations of Li et al. (s = 2)


# ----------------------------------------------------------------------------- checks


def _check_matrix(name: str, X: Tensor, tall: bool = True) -> None:
    if not isinstance(X, Tensor) or X.dim() < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"{name}: expected a (..., n, p) matrix batch, got shape {shape}")
    if X.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {X.dtype}")
    if tall and X.shape[-2] < X.shape[-1]:
        raise ValueError(
            f"{name}: expected (..., n, p) with n >= p (orthonormal columns), got shape {tuple(X.shape)}"
        )


def _check_pair(X: Tensor, V: Tensor, vname: str) -> None:
    _check_matrix("X", X)
    _check_matrix(vname, V, tall=False)
    if V.shape[-2:] != X.shape[-2:]:
        raise ValueError(
            f"{vname}: expected (..., {X.shape[-2]}, {X.shape[-1]}) like X, got shape {tuple(V.shape)}"
        )
    if V.dtype != X.dtype or V.device != X.device:
        raise ValueError(f"{vname}: dtype/device {V.dtype}/{V.device} != X's {X.dtype}/{X.device}")
    try:
        torch.broadcast_shapes(X.shape[:-2], V.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{vname}: batch dims {tuple(V.shape[:-2])} do not broadcast with X's {tuple(X.shape[:-2])}"
        ) from None


def _pair_shape(X: Tensor, V: Tensor) -> list[int]:
    return [*torch.broadcast_shapes(X.shape[:-2], V.shape[:-2]), *X.shape[-2:]]


def _acc(t: Tensor) -> Tensor:
    """Half precision computes in fp32 (linalg has no bf16/fp16 kernels)."""
    return t.to(_acc_dtype(t.dtype))


def _eye(p: int, like: Tensor) -> Tensor:
    return torch.eye(p, dtype=like.dtype, device=like.device)


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.mT)


def polar_tol(n: int, p: int, dtype: torch.dtype) -> float:
    """Round-off level of ||Y^T Y - I||_F for an (n, p) matrix computed in `dtype`."""
    return torch.finfo(dtype).eps * (n * p) ** 0.5


# ----------------------------------------------------------------------------- references


def project_reference(X: Tensor, G: Tensor, metric: str = "euclidean") -> Tensor:
    """Pure-torch tangent projection (see the module docstring); differentiable by autograd."""
    if metric == "euclidean":
        return G - X @ _sym(X.mT @ G)
    if metric == "canonical":
        return G - X @ G.mT @ X
    raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


def cayley_reference(A: Tensor) -> Tensor:
    """(I - A/2)^{-1} (I + A/2) by dense solves, one matrix at a time (never a batched LU)."""
    n = A.shape[-1]
    I = _eye(n, A)
    flat = A.reshape(math.prod(A.shape[:-2]), n, n)
    out = [torch.linalg.solve(I - 0.5 * a, I + 0.5 * a) for a in flat]
    return (torch.stack(out) if out else flat.clone()).reshape(A.shape)


def orthogonality_error_reference(X: Tensor) -> Tensor:
    """||X^T X - I||_F per matrix, in float64."""
    X = X.double()
    return torch.linalg.matrix_norm(X.mT @ X - _eye(X.shape[-1], X))


def retract_reference(X: Tensor, V: Tensor, method: str = "cayley") -> Tensor:
    """Dense forms of the retractions: n x n Cayley solve, SVD polar factor, sign-fixed QR."""
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
    if method == "qr":
        return _qr_pos(X + V)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------------------- kernels (torch)


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
    stops when that error is <= tol (default: eps sqrt(n p) of the computing dtype) or would
    not decrease; the optimisers' fused kernels follow exactly this rule.
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


def _retract_impl(X: Tensor, V: Tensor, method: str) -> Tensor:
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


# ----------------------------------------------------------------------------- project


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


@torch.library.custom_op("specops::stiefel_project", mutates_args=())
def _project_op(X: Tensor, G: Tensor, metric: str) -> Tensor:
    _check_pair(X, G, "G")
    _check_metric(metric)
    out = project_reference(_acc(X), _acc(G), metric)
    return out.expand(_pair_shape(X, G)).to(X.dtype).contiguous()


@_project_op.register_fake
def _(X, G, metric):
    _check_pair(X, G, "G")
    _check_metric(metric)
    return X.new_empty(_pair_shape(X, G))


def _sum_to(t: Tensor, shape) -> Tensor:
    """Reduce broadcast batch dims of a gradient back to `shape`."""
    if tuple(t.shape) == tuple(shape):
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


@torch.library.custom_op("specops::stiefel_project_backward", mutates_args=())
def _project_backward_op(grad: Tensor, X: Tensor, G: Tensor, metric: str) -> list[Tensor]:
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


@_project_backward_op.register_fake
def _(grad, X, G, metric):
    return [X.new_empty(X.shape), G.new_empty(G.shape)]


def _project_setup(ctx, inputs, output):
    X, G, metric = inputs
    ctx.metric = metric
    ctx.save_for_backward(X, G)


def _project_backward(ctx, grad):
    X, G = ctx.saved_tensors
    dX, dG = torch.ops.specops.stiefel_project_backward(grad, X, G, ctx.metric)
    return dX, dG, None


_project_op.register_autograd(_project_backward, setup_context=_project_setup)


def project(X: Tensor, G: Tensor, metric: str = "euclidean") -> Tensor:
    """Tangent projection of G at X on St(n, p).

    euclidean: G - X sym(X^T G) (orthogonal projection onto {V : X^T V + V^T X = 0});
    canonical: G - X G^T X (the Riemannian gradient under the canonical metric).
    X (..., n, p) with n >= p, G (..., n, p); batch dims broadcast. Differentiable in X and G.
    Raises ValueError for non-matrices, n < p, mismatched shapes/dtypes, or an unknown metric.
    """
    return torch.ops.specops.stiefel_project(X, G, metric)


# ----------------------------------------------------------------------------- cayley


def _check_square(A: Tensor) -> None:
    _check_matrix("A", A, tall=False)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square (..., n, n) matrices, got shape {tuple(A.shape)}")


def _cayley_impl(A: Tensor) -> Tensor:
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


@torch.library.custom_op("specops::cayley", mutates_args=())
def _cayley_op(A: Tensor) -> Tensor:
    _check_square(A)
    return _cayley_impl(_acc(A)).to(A.dtype).contiguous()


@_cayley_op.register_fake
def _(A):
    _check_square(A)
    return A.new_empty(A.shape)


@torch.library.custom_op("specops::cayley_backward", mutates_args=())
def _cayley_backward_op(grad: Tensor, Y: Tensor) -> Tensor:
    """dA = M^{-T} dY M^{-T} = (I + Y)^T dY (I + Y)^T / 4 from the output Y = cayley(A)."""
    Y_ = _acc(Y)
    Ht = (Y_ + _eye(Y.shape[-1], Y_)).mT
    return (0.25 * (Ht @ _acc(grad) @ Ht)).to(Y.dtype).contiguous()


@_cayley_backward_op.register_fake
def _(grad, Y):
    return Y.new_empty(Y.shape)


def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_backward(ctx, grad):
    (Y,) = ctx.saved_tensors
    return torch.ops.specops.cayley_backward(grad, Y)


_cayley_op.register_autograd(_cayley_backward, setup_context=_cayley_setup)


def cayley(A: Tensor) -> Tensor:
    """Cayley transform (I - A/2)^{-1} (I + A/2) of (..., n, n) matrices.

    Orthogonal (determinant +1) when A is skew-symmetric; defined whenever I - A/2 is invertible,
    which a skew A guarantees. Exactly skew matrices (A^T == -A elementwise, e.g. Q - Q^T) take a
    batched Cholesky path; any other matrix is solved on its own by LU (slower, same result).
    Differentiable: dA = M^{-T} dY M^{-T} with M = I - A/2 (the full gradient, not projected onto
    skew matrices), computed from Y without a solve. bf16/fp16 compute in fp32.
    Raises ValueError for non-square input or a finite A whose I - A/2 is singular.
    """
    return torch.ops.specops.cayley(A)


# ----------------------------------------------------------------------------- retract


@torch.library.custom_op("specops::stiefel_retract", mutates_args=())
def _retract_op(X: Tensor, V: Tensor, method: str) -> Tensor:
    _check_pair(X, V, "V")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return _retract_impl(X, V, method)


@_retract_op.register_fake
def _(X, V, method):
    _check_pair(X, V, "V")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return X.new_empty(_pair_shape(X, V))


def retract(X: Tensor, V: Tensor, method: str = "cayley") -> Tensor:
    """Retraction R_X(V) on St(n, p): "cayley" (exact, Woodbury form for tall X), "cayley_iter"
    (Li et al.'s two fixed-point iterations; orthogonal only to O(|V|^4)), "qr", or "polar"
    (Newton-Schulz with a stopping rule). See the module docstring for the formulas.

    X (..., n, p) on the manifold, V (..., n, p) (tangent at X for the retraction property).
    Not differentiable. Raises ValueError on bad shapes or an unknown method.
    """
    return torch.ops.specops.stiefel_retract(X, V, method)


# ----------------------------------------------------------------------------- orthogonality error


@torch.library.custom_op("specops::orthogonality_error", mutates_args=())
def _orth_error_op(X: Tensor) -> Tensor:
    _check_matrix("X", X, tall=False)
    X_ = _acc(X)
    return _dev(X_.mT @ X_).to(X.dtype)


@_orth_error_op.register_fake
def _(X):
    _check_matrix("X", X, tall=False)
    return X.new_empty(X.shape[:-2])


def orthogonality_error(X: Tensor) -> Tensor:
    """||X^T X - I_p||_F for each matrix of a (..., n, p) batch; shape X.shape[:-2]."""
    return torch.ops.specops.orthogonality_error(X)
