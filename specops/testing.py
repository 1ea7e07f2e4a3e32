"""Checks for people who test gradients: what torch.testing lacks for this field.

- REL_TOL, rel_err, assert_rel: the per-dtype relative-error table the project's own tests use
  (||actual - expected||_F / ||expected||_F, in float64).
- check_op(name): gradcheck, gradgradcheck, a vmap-against-a-loop check, a jvp-against-finite-
  differences check and torch.library.opcheck on any registered specops op, with inputs generated
  from the op's declared samples; the single checks (check_gradcheck, ...) take arguments of your own.
- manifold_gradcheck(fn, X): the gradient check on the Stiefel manifold St(n, p) = {X : X^T X = I}.
  A function on the manifold has no Euclidean directional derivative to compare with; what must hold
  is, for tangent directions V at X (X^T V + V^T X = 0) and a retraction R,
      d/dt fn(R_X(t V)) |_{t=0} = <grad_R fn(X), V>_metric,
  with grad_R fn(X) = project(X, ∇fn(X), metric) the Riemannian gradient (Euclidean metric:
  <A, B> = tr(A^T B); canonical: tr(A^T (I - X X^T / 2) B)). The left side is central differences
  along the retraction, so a wrong projection, a non-tangent "gradient" or a retraction that is not
  first-order (R_X(t V) = X + t V + O(t^2)) all fail it.
- check_step(make_optimizer, X, G): one step of a Stiefel optimiser stays on the manifold and, to
  first order in the learning rate, moves along -direction(X, G) (for StiefelSGD without momentum the
  Euclidean-metric Riemannian gradient, the default).

Every check raises AssertionError naming what failed and returns True when it passes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _registry, stiefel

F64 = torch.float64
# Relative Frobenius-norm error allowed against a float64 oracle, per input dtype (an op scales it by
# its declared tol_scale for deeper accumulation). bf16 keeps 8 mantissa bits (2^-8 = 3.9e-3 per
# rounding); inputs and output are each rounded once, accumulation is fp32. fp32: sums over up to
# ~10^4 terms (factor gradients) lose ~sqrt(n) ulps.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
CHECKS = ("gradcheck", "gradgradcheck", "vmap", "jvp", "opcheck")


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected||_F / max(||expected||_F, tiny), computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_rel(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """Relative error within REL_TOL[dtype] * scale (dtype: actual's by default)."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_err(actual, expected)
    assert err <= REL_TOL[dtype] * scale, f"relative error {err:.3g} > {REL_TOL[dtype] * scale:.3g} ({dtype})"


# ----------------------------------------------------------------------------- registered ops


def leaves(args) -> list[Tensor]:
    """The floating tensors of `args`, Tensor[] arguments flattened, in order."""
    return [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))
            if isinstance(t, Tensor) and t.is_floating_point()]


def rebuild(args, new: Sequence[Tensor]) -> tuple:
    """`args` with its floating tensors replaced, in order, by `new`."""
    it = iter(new)

    def swap(t):
        return next(it) if isinstance(t, Tensor) and t.is_floating_point() else t

    return tuple([swap(t) for t in a] if isinstance(a, (list, tuple)) else swap(a) for a in args)


def outputs(y) -> list[Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


def _op(op) -> _registry.Op:
    return op if isinstance(op, _registry.Op) else _registry._op(op)


def differentiable(op) -> bool:
    """Whether `op` has derivatives (every op but the optimiser steps, which write their inputs)."""
    op = _op(op)
    return (op.autograd is not None or op.composite) and not op.mutated()


def samples(op, device="cpu", dtype: torch.dtype = F64, requires_grad: bool = True) -> list[tuple]:
    """The op's declared sample arguments (drawn with seed 0) on `device`: floating tensors in `dtype`
    (but those the op keeps in a fixed dtype), leaves that require grad when asked and differentiable."""
    op = _op(op)
    torch.manual_seed(0)
    grad = requires_grad and differentiable(op)
    out = []
    for sample in op.samples("cpu", F64):
        args = []
        for spec, a in zip(op.overload._schema.arguments, sample):
            keep = spec.name in op.fixed_dtype
            moved = [t.detach().to(device=device, dtype=t.dtype if keep else dtype, copy=True)
                     .requires_grad_(grad and not keep) for t in leaves([a])]
            args.append(rebuild([a], moved)[0])
        out.append(tuple(args))
    return out


def check_gradcheck(op, args, **kwargs) -> bool:
    """torch.autograd.gradcheck through the op in its floating arguments (float64 ones: pass samples())."""
    op = _op(op)
    return torch.autograd.gradcheck(lambda *ts: op.overload(*rebuild(args, ts)), leaves(args), **kwargs)


def check_gradgradcheck(op, args, **kwargs) -> bool:
    """torch.autograd.gradgradcheck (fast mode unless told otherwise): the op's second derivative."""
    op = _op(op)
    kwargs.setdefault("fast_mode", True)
    return torch.autograd.gradgradcheck(lambda *ts: op.overload(*rebuild(args, ts)), leaves(args), **kwargs)


def check_vmap(op, args, batch: int = 3, tol: float = 1e-12) -> bool:
    """torch.func.vmap over `batch` perturbed copies of every floating argument equals a loop of calls."""
    op = _op(op)
    base = [t.detach() for t in leaves(args)]
    gen = torch.Generator().manual_seed(1)
    batched = [torch.stack([t * (1 + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))
                            for _ in range(batch)]) for t in base]

    def fn(*ts):
        return op.overload(*rebuild(args, ts))

    got = torch.func.vmap(fn)(*batched)
    for i in range(batch):
        for a, b in zip(outputs(got), outputs(fn(*[t[i] for t in batched]))):
            torch.testing.assert_close(a[i], b, rtol=tol, atol=tol, msg=lambda m: f"{op.name} vmap, entry {i}: {m}")
    return True


def check_jvp(op, args, eps: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-7) -> bool:
    """torch.func.jvp through the op's public function equals central finite differences (float64)."""
    op = _op(op)
    base = [t.detach() for t in leaves(args)]
    gen = torch.Generator().manual_seed(2)
    tangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in base]

    def fn(*ts):
        return tuple(outputs(op.public(*rebuild(args, ts))))

    _, got = torch.func.jvp(fn, tuple(base), tuple(tangents))
    plus = fn(*[t + eps * d for t, d in zip(base, tangents)])
    minus = fn(*[t - eps * d for t, d in zip(base, tangents)])
    for g, p, m in zip(got, plus, minus):
        torch.testing.assert_close(g, (p - m) / (2 * eps), rtol=rtol, atol=atol, msg=lambda s: f"{op.name} jvp: {s}")
    return True


def check_opcheck(op, args) -> bool:
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""
    torch.library.opcheck(_op(op).overload, args)
    return True


CHECK_FNS = {"gradcheck": check_gradcheck, "gradgradcheck": check_gradgradcheck, "vmap": check_vmap,
              "jvp": check_jvp, "opcheck": check_opcheck}


def check_op(name: str, checks: Sequence[str] = CHECKS, device="cpu") -> dict[str, str]:
    """Run `checks` on op `name` with its first declared sample (float64, on `device`), on whatever
    backend it chooses there (force one with specops.backend). Returns {check: "passed" or why it does
    not apply}; raises AssertionError (or torch's GradcheckError) on a failure."""
    op = _op(name)
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"checks: unknown {sorted(unknown)}; expected some of {CHECKS}")
    if op.samples is None:
        raise ValueError(f"{op.name} declares no samples (a backward op: check the op it differentiates)")
    report = {}
    for check in checks:
        if check == "vmap" and op.mutated() or check in ("gradcheck", "gradgradcheck", "jvp") and not differentiable(op):
            report[check] = "does not apply: the op writes its inputs and has no derivative"
        elif check == "opcheck" and op.composite:
            report[check] = "does not apply: a composite op (its body is torch ops and other specops ops)"
        else:
            args = samples(op, device, requires_grad=check in ("gradcheck", "gradgradcheck", "opcheck"))[0]
            assert CHECK_FNS[check](op, args), f"{op.name}: {check} failed"
            report[check] = "passed"
    return report


# ----------------------------------------------------------------------------- the Stiefel manifold


def _inner(A: Tensor, B: Tensor, X: Tensor, metric: str) -> Tensor:
    if metric == "canonical":
        B = B - 0.5 * X @ (X.mT @ B)
    return (A * B).sum()


def random_tangent(X: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random tangent vector at X, X Ω + (I - X X^T) K with Ω skew (built without stiefel.project,
    so that checking a projection does not use it), unit Frobenius norm."""
    A = torch.randn(X.shape[-1], X.shape[-1], generator=generator, dtype=X.dtype)
    K = torch.randn(X.shape, generator=generator, dtype=X.dtype)
    V = X @ (A - A.mT) + K - X @ (X.mT @ K)
    return V / V.norm()


def manifold_gradcheck(fn: Callable[[Tensor], Tensor], X: Tensor, *, riemannian_grad: Callable | None = None,
                       metric: str = "euclidean", retraction: str = "cayley", directions: int = 4,
                       eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8,
                       generator: torch.Generator | None = None) -> bool:
    """Gradient check of a scalar fn on St(n, p) at X (n >= p, float64, X^T X = I): see the module
    docstring. riemannian_grad(X, G) maps the Euclidean gradient G to the Riemannian one (default
    stiefel.project(X, G, metric): pass your own to check it). Asserts that it is tangent at X and that
    along `directions` random tangents V its metric inner product with V equals the central difference
    (fn(R_X(εV)) - fn(R_X(-εV))) / 2ε, R = stiefel.retract(method=retraction), which must also land on
    the manifold."""
    if X.dtype != F64 or X.dim() != 2:
        raise ValueError("manifold_gradcheck: X must be one float64 (n, p) matrix")
    err = stiefel.orthogonality_error(X).item()
    if err > 1e-10:
        raise ValueError(f"manifold_gradcheck: X is not on the manifold (||X^T X - I|| = {err:.3g})")
    riemannian_grad = riemannian_grad or functools.partial(stiefel.project, metric=metric)
    leaf = X.detach().requires_grad_()
    (G,) = torch.autograd.grad(fn(leaf), leaf)
    Gr = riemannian_grad(X, G).detach()
    off = (X.mT @ Gr + Gr.mT @ X).norm().item()
    assert off <= 1e-10 * max(Gr.norm().item(), 1.0), f"the Riemannian gradient is not tangent at X: ||X^T Γ + Γ^T X|| = {off:.3g}"
    for k in range(directions):
        V = random_tangent(X, generator)
        Xp, Xm = (stiefel.retract(X, s * eps * V, retraction) for s in (1, -1))
        for Y in (Xp, Xm):
            assert stiefel.orthogonality_error(Y).item() <= 1e-10, f"retraction {retraction!r} leaves the manifold"
        with torch.no_grad():
            fd = ((fn(Xp) - fn(Xm)) / (2 * eps)).item()
        want = _inner(Gr, V, X, metric).item()
        assert abs(fd - want) <= atol + rtol * abs(fd), (
            f"direction {k}: the directional derivative along {retraction!r} is {fd:.10g}, "
            f"<grad_R fn, V>_{metric} is {want:.10g}")
    return True


def check_step(make_optimizer: Callable[[list[Tensor], float], torch.optim.Optimizer], X: Tensor, G: Tensor, *,
               direction: Callable[[Tensor, Tensor], Tensor] | None = None, lr: float = 1e-6,
               rtol: float = 1e-4) -> bool:
    """One step of make_optimizer([param], lr) from X with gradient G: the result is on the manifold
    and (X_new - X) / lr equals -direction(X, G) to O(lr) (default: stiefel.project(X, G), StiefelSGD's
    direction with momentum 0). Float64 (n, p) X on the manifold."""
    direction = direction or stiefel.project
    param = torch.nn.Parameter(X.detach().clone())
    param.grad = G.detach().clone()
    make_optimizer([param], lr).step()
    Xn = param.detach()
    err = stiefel.orthogonality_error(Xn).item()
    assert err <= 1e-10, f"the step leaves the manifold: ||X^T X - I|| = {err:.3g}"
    want = -direction(X, G)
    got = (Xn - X) / lr
    rel = rel_err(got, want)
    assert rel <= rtol, f"(X_new - X) / lr differs from -direction(X, G) by {rel:.3g} (relative)"
    return True
