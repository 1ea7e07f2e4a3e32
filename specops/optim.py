"""Stiefel-manifold optimisers: StiefelSGD, CayleyAdam, StiefelAdam (torch.optim.Optimizer).

Every parameter is a matrix (or a batch of matrices) X (..., n, p) with n >= p and X^T X = I;
G = df/dX is its Euclidean gradient. One step, per matrix:

StiefelSGD — Cayley SGD with momentum (Li, Fuxin & Todorovic, ICLR 2020), q = 0.5, s = 2:
    M <- beta M - G
    W <- W_hat - W_hat^T,  W_hat = M X^T - X (X^T M X^T) / 2     (skew n x n generator)
    M <- W X                                                     (momentum kept in the tangent space)
    alpha <- min(lr, 2q / (||W||_F + eps))
    Y <- X + alpha M;  s times: Y <- X + (alpha/2) W (X + Y)     (fixed-point Cayley)
CayleyAdam — the same paper's Adam variant, with a scalar second moment per matrix:
    m <- b1 m + (1-b1) G;  v <- b2 v + (1-b2) ||G||_F^2;  m^ = m/(1-b1^t), v^ = v/(1-b2^t)
    W from m^ as above, divided by r = sqrt(v^ + eps);  alpha as above
    Y <- X - alpha W X;  s times: Y <- X - (alpha/2) W (X + Y);  m <- (W X) r (1-b1^t)
StiefelAdam — Kong, Wang & Tao (ICLR 2023), what the SODA authors train their rotations with.
    Square part (Lie algebra): A = X^T G, xi = A - A^T;
        Y <- b1 Y - (1-b1) xi;  P <- b2 P + (1-b2) xi*xi
        xi^ = lr/(1-b1^t) * Y / (sqrt(P/(1-b2^t)) + eps)
    Tall part (n > p), the normal component N = G - X A with its own moments:
        V <- b1 V - (1-b1) N;  Q <- b2 Q + (1-b2) N*N
        nu = lr/(1-b1^t) * V / (sqrt(Q/(1-b2^t)) + eps),  nu <- nu - X (X^T nu)
    Y <- X + X xi^ + nu, then the polar retraction; V <- V - X' (X'^T V) at the new point X'.

All three finish with the polar retraction/correction X <- Y (Y^T Y)^{-1/2} by Newton-Schulz,
stopped at round-off (specops.stiefel.polar_ns): for StiefelAdam it is the paper's retraction;
for the Cayley methods it is a no-op unless the two fixed-point iterations left an error above
round-off (they are orthogonal only to O(alpha^4 ||W||^4); Li et al. re-orthonormalise by QR
now and then instead). So ||X^T X - I|| stays at round-off for any number of steps.

fused=True (default): matrices of equal (shape, dtype, device, hyper-parameters) — across param
groups — are stepped together by ONE call of a registered op (torch.ops.specops.stiefel_sgd_step,
cayley_adam_step, stiefel_adam_step) that mutates the stacked parameters and state in place:
cpp (parallel over matrices, each in a per-thread L1/L2 scratch), triton (one program per matrix,
in registers), cuda (one thread block per matrix, in shared memory), or a batched torch fallback
for matrices too large for those. The optimiser state lives in ONE persistent stacked (S, ...)
buffer per state entry and (shape, dtype, device); each parameter's state entries are views into
its rows, so state_dict()/load_state_dict() see ordinary per-parameter tensors and the state
exists once. When every parameter has a gradient (the common case) each launch steps a slice of
the buffers in place; when only some have, their rows are gathered, stepped and scattered back.
The buffers are rebuilt from the per-parameter tensors only when a parameter gets its first state
or after a load, and the old ones are freed. Parameters are gathered with one torch.stack and
written back with one torch._foreach_copy_: about 2 x 4 bytes per element, negligible next to the
step itself, and unlike re-pointing parameters into a shared buffer it never changes what a user's
tensor is.
fused=False is the per-parameter path, written plainly from the papers with dense torch ops.

skip_nonfinite=True (all three, both paths): a parameter whose gradient holds a NaN or Inf is not
stepped; it and its state (moments, step count) stay bit-identical, exactly as if its gradient
were None, and the others step as they would have. Each skip adds 1 to `opt.skipped_steps` and to
`opt.skipped_by_param[param]` (a collections.Counter; neither is part of the state_dict). The fused
path tests each bucket's stacked gradients with one isfinite reduction and launches the finite
ones only. torch.amp.GradScaler needs no flag: its step() skips the whole optimiser on an inf.
"""
from __future__ import annotations

import collections
import functools
import math

import torch
from torch import Tensor

from . import _backend
from .kron import _FLOAT_DTYPES, _acc_dtype
from .stiefel import CAYLEY_ITERS, polar_ns

__all__ = ["StiefelSGD", "CayleyAdam", "StiefelAdam"]


# ----------------------------------------------------------------------------- fused ops: checks


def _check_step_inputs(X: Tensor, G: Tensor, states: dict[str, tuple[Tensor, tuple]], step: Tensor | None):
    """X (B, n, p) contiguous, G like X, states {name: (tensor, expected shape)}, step (S,) f64."""
    if X.dim() != 3 or not X.is_contiguous() or X.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"X: expected a contiguous floating (B, n, p) tensor, got shape {tuple(X.shape)} {X.dtype}")
    B, n, p = X.shape
    if n < p:
        raise ValueError(f"X: expected (B, n, p) with n >= p, got shape {tuple(X.shape)}")
    for name, (t, shape) in {"G": (G, (B, n, p)), **states}.items():
        if tuple(t.shape) != tuple(shape) or not t.is_contiguous() or t.dtype != X.dtype or t.device != X.device:
            raise ValueError(
                f"{name}: expected a contiguous {X.dtype} tensor of shape {tuple(shape)} on {X.device}, "
                f"got {tuple(t.shape)} {t.dtype} {t.device}"
            )
    if step is not None:
        S = step.shape[0] if step.dim() == 1 else -1
        if step.dim() != 1 or step.dtype != torch.float64 or step.device != X.device or S == 0 or B % S:
            raise ValueError(
                f"step: expected a float64 (S,) tensor on {X.device} with S dividing B={B}, "
                f"got {tuple(step.shape)} {step.dtype}"
            )


# ----------------------------------------------------------------------------- fused ops: torch


def _ns_tol(n: int, p: int, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps * math.sqrt(n * p)


def _bias(step: Tensor, beta: float, B: int) -> Tensor:
    """1 - beta^t per matrix, (B, 1, 1), from per-parameter steps (S,)."""
    t = step.repeat_interleave(B // step.shape[0])
    return (1.0 - torch.pow(beta, t)).view(B, 1, 1)


def _lowrank_generator(X: Tensor, M: Tensor):
    """PM = M - X (X^T M)/2 with W = PM X^T - X PM^T; returns (PM, W Z callable, ||W||_F)."""
    PM = M - 0.5 * X @ (X.mT @ M)
    Bm = X.mT @ PM
    # ||PM X^T - X PM^T||_F^2 = 2 ||PM||^2 - 2 tr(B B), B = X^T PM, using X^T X = I.
    w2 = 2.0 * (PM * PM).sum((-2, -1)) - 2.0 * (Bm * Bm.mT).sum((-2, -1))
    wnorm = w2.clamp_min(0).sqrt().view(-1, 1, 1)

    def W(Z):
        return PM @ (X.mT @ Z) - X @ (PM.mT @ Z)

    return PM, W, wnorm


def _sgd_step_torch(X, G, M, lr, momentum, q, iters, eps):
    acc = _acc_dtype(X.dtype)
    Xa, Ga, Ma = X.to(acc), G.to(acc), M.to(acc)
    Ma = momentum * Ma - Ga
    _, W, wnorm = _lowrank_generator(Xa, Ma)
    Mt = W(Xa)
    alpha = (2.0 * q / (wnorm + eps)).clamp(max=lr)
    Y = Xa + alpha * Mt
    for _ in range(iters):
        Y = Xa + 0.5 * alpha * W(Xa + Y)
    X.copy_(polar_ns(Y, _ns_tol(*X.shape[1:], acc)))
    M.copy_(Mt)


def _cayley_adam_step_torch(X, G, m, v, step, lr, beta1, beta2, eps, q, iters):
    acc = _acc_dtype(X.dtype)
    B = X.shape[0]
    Xa, Ga = X.to(acc), G.to(acc)
    ma = beta1 * m.to(acc) + (1 - beta1) * Ga
    va = beta2 * v.to(acc) + (1 - beta2) * (Ga * Ga).sum((-2, -1))
    bc1 = _bias(step, beta1, B).to(acc)
    bc2 = _bias(step, beta2, B).to(acc)
    r = (va.view(B, 1, 1) / bc2 + eps).sqrt()
    PM, W, wnorm = _lowrank_generator(Xa, ma / bc1)
    # W was built from m^; dividing the generator by r divides PM, W Z and ||W|| by r.
    Mt = W(Xa) / r
    wnorm = wnorm / r
    alpha = (2.0 * q / (wnorm + eps)).clamp(max=lr)
    Y = Xa - alpha * Mt
    for _ in range(iters):
        Y = Xa - 0.5 * alpha / r * W(Xa + Y)
    X.copy_(polar_ns(Y, _ns_tol(*X.shape[1:], acc)))
    m.copy_(Mt * r * bc1)
    v.copy_(va)


def _stiefel_adam_update(X, G, Y, P, V, Q, bc1, bc2, lr, beta1, beta2, eps):
    """The StiefelAdam step of every matrix of (..., n, p) X in the accumulation dtype, shared by the
    fused op's torch kernel and the per-parameter path. Y, P (..., p, p) are the skew moments, V, Q
    (..., n, p) the normal ones (unused when n == p); bc1, bc2 are 1 - beta^t, Python floats or
    tensors broadcasting over the batch. Returns the new (X, Y, P, V, Q), V and Q None when n == p."""
    acc = _acc_dtype(X.dtype)
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
    Xn = polar_ns(Z, _ns_tol(n, p, acc))
    if n > p:
        Va = Va - Xn @ (Xn.mT @ Va)  # the normal momentum, projected at the new point
    return Xn, Ya, Pa, Va, Qa


def _copy_back(dst, src):
    """Write the update's results into the tensors they replace (None: a tall-only moment, square X)."""
    for d, s in zip(dst, src):
        if s is not None:
            d.copy_(s)


def _stiefel_adam_step_torch(X, G, Y, P, V, Q, step, lr, beta1, beta2, eps):
    acc = _acc_dtype(X.dtype)
    B = X.shape[0]
    bc1 = _bias(step, beta1, B).to(acc)
    bc2 = _bias(step, beta2, B).to(acc)
    _copy_back((X, Y, P, V, Q), _stiefel_adam_update(X, G, Y, P, V, Q, bc1, bc2, lr, beta1, beta2, eps))


# ----------------------------------------------------------------------------- fused ops: other backends


@functools.cache
def _triton():
    from .triton_kernels import stiefel as mod

    return mod


def _ext(name):
    return lambda *args: getattr(torch.ops.specops_ext, name)(*args)


def _tri(name, fallback):
    """The Triton launcher; matrices beyond its register tile (triton_kernels.stiefel.supports) run `fallback`."""

    def run(X, *args):
        mod = _triton()
        if mod.supports(X.shape[1], X.shape[2]):
            getattr(mod, name)(X, *args)
        else:
            fallback(X, *args)

    return run


def _cu(name, fallback):
    """The CUDA kernel (csrc/cuda/stiefel.cu); CPU tensors, builds without it and matrices beyond the
    device's shared memory per block (specops_ext.stiefel_step_fits) run `fallback`."""

    def run(X, *args):
        if (X.is_cuda and _backend._why_not("cuda", "cuda") is None
                and torch.ops.specops_ext.stiefel_step_fits(name, X)):
            getattr(torch.ops.specops_ext, name)(X, *args)
        else:
            fallback(X, *args)

    return run


def _table(name, torch_fn):
    cuda = _cu(name, torch_fn)
    return {"torch": torch_fn, "cpp": _ext(name), "cuda": cuda, "triton": _tri(name, cuda)}


# CUDA tensors: Triton's register tile for n <= 32, p <= 16, else the CUDA shared-memory kernel when
# built and the matrix fits, else the batched torch kernel (forcing "cuda" skips the Triton stage).
_SGD = _table("stiefel_sgd_step", _sgd_step_torch)
_CADAM = _table("cayley_adam_step", _cayley_adam_step_torch)
_SADAM = _table("stiefel_adam_step", _stiefel_adam_step_torch)


def _run(table, X, *args):
    if X.numel() == 0:
        return
    table[_backend.choose(X.device.type, table)](X, *args)


# The step ops are declared with explicit schemas (alias annotations mark what they mutate) and
# registered per device key: the dispatcher then calls the Python kernel directly, ~4 us per call
# instead of the ~40 us of a torch.library.custom_op wrapper, which matters for small models
# stepped thousands of times. The optimiser calls them under no_grad on tensors outside autograd.
_STEP_SCHEMAS = {
    "stiefel_sgd_step": "(Tensor(a!) X, Tensor G, Tensor(b!) M, float lr, float momentum, float q, int iters, "
                        "float eps) -> ()",
    "cayley_adam_step": "(Tensor(a!) X, Tensor G, Tensor(b!) m, Tensor(c!) v, Tensor(d!) step, float lr, "
                        "float beta1, float beta2, float eps, float q, int iters) -> ()",
    "stiefel_adam_step": "(Tensor(a!) X, Tensor G, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
                         "Tensor(d!) exp_avg_normal, Tensor(e!) exp_avg_sq_normal, Tensor(f!) step, float lr, "
                         "float beta1, float beta2, float eps) -> ()",
}
for _name, _schema in _STEP_SCHEMAS.items():
    torch.library.define(f"specops::{_name}", _schema)


def _check_sgd(X, G, M):
    _check_step_inputs(X, G, {"M": (M, tuple(X.shape))}, None)


def _check_cadam(X, G, m, v, step):
    _check_step_inputs(X, G, {"m": (m, tuple(X.shape)), "v": (v, tuple(X.shape[:1]))}, step)


def _check_sadam(X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step):
    B, n, p = X.shape if X.dim() == 3 else (0, 0, 0)
    nshape = (B, n, p) if n > p else (0,)
    _check_step_inputs(X, G, {"exp_avg": (exp_avg, (B, p, p)), "exp_avg_sq": (exp_avg_sq, (B, p, p)),
                              "exp_avg_normal": (exp_avg_normal, nshape),
                              "exp_avg_sq_normal": (exp_avg_sq_normal, nshape)}, step)


@torch.library.impl("specops::stiefel_sgd_step", ("cpu", "cuda"))
def stiefel_sgd_step(X: Tensor, G: Tensor, M: Tensor, lr: float, momentum: float, q: float, iters: int,
                     eps: float) -> None:
    """One Cayley SGD step (module docstring) for every matrix of X (B, n, p), in place; M momentum."""
    _check_sgd(X, G, M)
    _run(_SGD, X, G, M, lr, momentum, q, iters, eps)


@torch.library.register_fake("specops::stiefel_sgd_step")
def _(X, G, M, lr, momentum, q, iters, eps):
    _check_sgd(X, G, M)


@torch.library.impl("specops::cayley_adam_step", ("cpu", "cuda"))
def cayley_adam_step(X: Tensor, G: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float,
                     beta2: float, eps: float, q: float, iters: int) -> None:
    """One Cayley Adam step for every matrix of X (B, n, p), in place; m (B, n, p), v (B,),
    step (S,) float64 (matrix b belongs to parameter b // (B/S)), incremented first."""
    _check_cadam(X, G, m, v, step)
    step.add_(1)
    _run(_CADAM, X, G, m, v, step, lr, beta1, beta2, eps, q, iters)


@torch.library.register_fake("specops::cayley_adam_step")
def _(X, G, m, v, step, lr, beta1, beta2, eps, q, iters):
    _check_cadam(X, G, m, v, step)


@torch.library.impl("specops::stiefel_adam_step", ("cpu", "cuda"))
def stiefel_adam_step(X: Tensor, G: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_normal: Tensor,
                      exp_avg_sq_normal: Tensor, step: Tensor, lr: float, beta1: float, beta2: float,
                      eps: float) -> None:
    """One StiefelAdam step for every matrix of X (B, n, p), in place. exp_avg/exp_avg_sq (B, p, p)
    are the skew moments Y, P; exp_avg_normal/exp_avg_sq_normal (B, n, p) the normal ones V, Q
    (empty (0,) tensors when n == p); step (S,) float64 as in cayley_adam_step."""
    _check_sadam(X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step)
    step.add_(1)
    _run(_SADAM, X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step, lr, beta1, beta2, eps)


@torch.library.register_fake("specops::stiefel_adam_step")
def _(X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step, lr, beta1, beta2, eps):
    _check_sadam(X, G, exp_avg, exp_avg_sq, exp_avg_normal, exp_avg_sq_normal, step)


# ----------------------------------------------------------------------------- optimiser base


class _Stack:
    """The state of one (shape, dtype, device) of a fused optimiser, stacked: bufs[k] is (S, ...) and
    its row i IS state[params[i]][k] (a view), so the state exists once however it is stepped."""

    def __init__(self, params: list[Tensor], bufs: dict[str, Tensor], state):
        self.params = params
        self.ids = tuple(map(id, params))
        self.row = {i: r for r, i in enumerate(self.ids)}
        self.bufs = bufs
        for k, buf in bufs.items():
            views = buf.unbind(0)
            for q, v in zip(params, views):
                state[q][k] = v
        self.first = next(iter(bufs))
        self.views = [state[q][self.first] for q in params]  # to tell when an entry was replaced

    def locate(self, params, state) -> slice | Tensor | None:
        """Where `params` are: a slice when they are consecutive rows in order (their state is then
        stepped in place), else an index tensor (gathered, stepped, scattered back); None when one
        has no row or its state entry was replaced (a load): the stack must be rebuilt."""
        if tuple(map(id, params)) == self.ids:  # the common case: every parameter, in order
            ok = all(state[q].get(self.first) is v for q, v in zip(params, self.views))
            return slice(0, len(params)) if ok else None
        rows = []
        for q in params:
            i = self.row.get(id(q))
            if i is None or state[q].get(self.first) is not self.views[i]:
                return None
            rows.append(i)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.bufs[self.first].device)

    def select(self, rows: slice | Tensor) -> dict[str, Tensor]:
        if isinstance(rows, slice) and rows == slice(0, len(self.params)):
            return self.bufs  # every row: no view to make
        return {k: b[rows] for k, b in self.bufs.items()}


class _StiefelOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, closure, non-finite skips, per-parameter and fused stepping."""

    _HYPER: tuple[str, ...] = ()  # group keys that select the fused launch

    def __init__(self, params, defaults, fused: bool, skip_nonfinite: bool):
        self.fused = bool(fused)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0
        self.skipped_by_param: collections.Counter = collections.Counter()
        self._fused_cache: dict[tuple, _Stack] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if p.dim() < 2 or p.shape[-2] < p.shape[-1]:
                raise ValueError(
                    f"{type(self).__name__}: param_groups[{gi}]['params'][{i}] has shape {tuple(p.shape)}; "
                    f"expected a (..., n, p) matrix (batch) with n >= p (orthonormal columns)"
                )
            if p.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{type(self).__name__}: param_groups[{gi}]['params'][{i}] has dtype {p.dtype}; "
                    f"expected one of {_FLOAT_DTYPES}"
                )

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._fused_cache.clear()  # the loaded per-parameter tensors are re-stacked on the next step

    # per-matrix state: name -> shape given (batch, n, p); "step" is one float64 scalar per parameter
    def _state_shapes(self, batch, n, p) -> dict[str, tuple]:
        raise NotImplementedError

    def _init_state(self, param: Tensor) -> dict:
        batch, (n, p) = tuple(param.shape[:-2]), param.shape[-2:]
        st = {k: torch.zeros(s, dtype=param.dtype, device=param.device)
              for k, s in self._state_shapes(batch, n, p).items()}
        if "step" in self._state_keys_with_step():
            st["step"] = torch.zeros((), dtype=torch.float64, device=param.device)
        return st

    def _state_keys_with_step(self) -> tuple[str, ...]:
        return ()

    def _count_skip(self, param: Tensor) -> None:
        self.skipped_steps += 1
        self.skipped_by_param[param] += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fused:
            self._step_fused()
        else:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    if self.skip_nonfinite and not bool(torch.isfinite(p.grad).all()):
                        self._count_skip(p)
                        continue
                    st = self.state[p]
                    if not st:
                        st.update(self._init_state(p))
                    self._step_param(p, p.grad, st, group)
        return loss

    # --- fused path

    def _step_fused(self):
        buckets: dict = {}  # (shape, dtype, device) -> {hyper-parameters: [params]}
        for group in self.param_groups:
            hyper = tuple(group[k] for k in self._HYPER)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                buckets.setdefault((tuple(p.shape), p.dtype, p.device), {}).setdefault(hyper, []).append(p)
        for key, by_hyper in buckets.items():
            shape = key[0]
            n, p = shape[-2:]
            launches = []
            for hyper, params in by_hyper.items():
                G = torch.stack([q.grad for q in params])
                if self.skip_nonfinite:
                    params, G = self._finite_only(params, G)
                if params:
                    launches.append((hyper, params, G))
            if not launches:
                continue
            stack = self._fused_cache.get(key)
            where = [stack.locate(ps, self.state) for _, ps, _ in launches] if stack is not None else [None]
            if any(w is None for w in where):
                stack = self._restack(key, [q for _, ps, _ in launches for q in ps])
                where = [stack.locate(ps, self.state) for _, ps, _ in launches]
            for (hyper, params, G), rows in zip(launches, where):
                bufs = stack.select(rows)
                X = torch.stack(params).view(-1, n, p)
                self._launch(X, G.view(-1, n, p), bufs, dict(zip(self._HYPER, hyper)))
                if isinstance(rows, Tensor):
                    for k, b in stack.bufs.items():
                        b.index_copy_(0, rows, bufs[k])
                torch._foreach_copy_(params, list(X.view(len(params), *shape).unbind(0)))

    def _finite_only(self, params, G):
        """The parameters whose gradient is finite and their stacked gradients: one isfinite reduction
        over the bucket's stacked G and one device-to-host sync per bucket; the per-parameter flags
        come to the host only when some gradient is not finite."""
        ok = torch.isfinite(G.flatten(1)).all(1)
        if bool(ok.all()):
            return params, G
        keep = ok.tolist()
        for q, k in zip(params, keep):
            if not k:
                self._count_skip(q)
        return [q for q, k in zip(params, keep) if k], G[ok]

    def _restack(self, key, params) -> _Stack:
        """A new stacked state for `key` (the old one is freed): `params` first, in order, so that each
        launch of this step is a slice, then the old stack's other parameters that have state."""
        stack = self._fused_cache.get(key)
        stepped = set(map(id, params))
        order = params + [q for q in (stack.params if stack else ()) if id(q) not in stepped and self.state[q]]
        for q in params:
            if not self.state[q]:
                self.state[q].update(self._init_state(q))
        bufs = {k: torch.stack([self.state[q][k].to(q.device) for q in order]) for k in self.state[params[0]]}
        stack = self._fused_cache[key] = _Stack(order, bufs, self.state)
        return stack

    def _launch(self, X, G, bufs, h):
        raise NotImplementedError

    def _step_param(self, p, grad, st, group):
        raise NotImplementedError


def _plain_generator(X: Tensor, M: Tensor) -> Tensor:
    """Li et al.'s skew generator W = W_hat - W_hat^T, W_hat = M X^T - X (X^T M X^T) / 2 (n x n)."""
    W_hat = M @ X.mT - 0.5 * X @ (X.mT @ M @ X.mT)
    return W_hat - W_hat.mT


class StiefelSGD(_StiefelOptimizer):
    """Cayley SGD with momentum on the Stiefel manifold (Li, Fuxin & Todorovic, ICLR 2020).

    Args:
        params: (..., n, p) parameters with n >= p and orthonormal columns (or param groups).
        lr: learning rate (the step is also capped by 2q / ||W||_F).
        momentum: beta; the momentum buffer is projected to the tangent space (M <- W X) and kept.
        q: the step-size cap factor (0.5 in the paper).
        iters: fixed-point Cayley iterations s (2 in the paper).
        eps: guards the norm division.
        fused: step all same-shape matrices in one kernel launch (see the module docstring).
        skip_nonfinite: leave a parameter whose gradient holds a NaN or Inf untouched, it and its
            state bit-identical, and count the skip in `skipped_steps` (total) and
            `skipped_by_param[param]`; False (default) steps it like torch.optim.Adam would.
    State per parameter: "momentum_buffer" (..., n, p).
    """

    _HYPER = ("lr", "momentum", "q", "iters", "eps")

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, q: float = 0.5, iters: int = CAYLEY_ITERS,
                 eps: float = 1e-8, *, fused: bool = True, skip_nonfinite: bool = False):
        if lr < 0:
            raise ValueError(f"lr: expected >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum: expected in [0, 1), got {momentum}")
        if q <= 0 or iters < 0 or eps < 0:
            raise ValueError(f"q > 0, iters >= 0, eps >= 0 expected, got q={q}, iters={iters}, eps={eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, q=q, iters=int(iters), eps=eps), fused,
                         skip_nonfinite)

    def _state_shapes(self, batch, n, p):
        return {"momentum_buffer": (*batch, n, p)}

    def _launch(self, X, G, bufs, h):
        torch.ops.specops.stiefel_sgd_step(X, G, bufs["momentum_buffer"].view(X.shape), h["lr"], h["momentum"], h["q"],
                                           h["iters"], h["eps"])

    def _step_param(self, param, grad, st, group):
        acc = _acc_dtype(param.dtype)
        X, G, M = param.to(acc), grad.to(acc), st["momentum_buffer"].to(acc)
        M = group["momentum"] * M - G
        W = _plain_generator(X, M)
        M = W @ X
        wnorm = torch.linalg.matrix_norm(W).unsqueeze(-1).unsqueeze(-1)
        alpha = (2 * group["q"] / (wnorm + group["eps"])).clamp(max=group["lr"])
        Y = X + alpha * M
        for _ in range(group["iters"]):
            Y = X + 0.5 * alpha * (W @ (X + Y))
        param.copy_(polar_ns(Y, _ns_tol(*param.shape[-2:], acc)))
        st["momentum_buffer"].copy_(M)


class CayleyAdam(_StiefelOptimizer):
    """Cayley Adam on the Stiefel manifold (Li, Fuxin & Todorovic, ICLR 2020).

    Adam's first moment as a matrix, its second moment as one scalar per matrix (||G||_F^2), the
    generator W built from the bias-corrected first moment and divided by sqrt(v^ + eps), the same
    step cap and fixed-point Cayley iterations as StiefelSGD (module docstring).
    fused, skip_nonfinite: as in StiefelSGD (a skipped parameter's step count does not advance).
    State per parameter: "exp_avg" (..., n, p), "exp_avg_sq" (...), "step" (float64 scalar).
    """

    _HYPER = ("lr", "beta1", "beta2", "eps", "q", "iters")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, q: float = 0.5,
                 iters: int = CAYLEY_ITERS, *, fused: bool = True, skip_nonfinite: bool = False):
        _check_adam(lr, betas, eps)
        if q <= 0 or iters < 0:
            raise ValueError(f"q > 0 and iters >= 0 expected, got q={q}, iters={iters}")
        super().__init__(params, dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, q=q, iters=int(iters)),
                         fused, skip_nonfinite)

    def _state_shapes(self, batch, n, p):
        return {"exp_avg": (*batch, n, p), "exp_avg_sq": batch}

    def _state_keys_with_step(self):
        return ("step",)

    def _launch(self, X, G, bufs, h):
        torch.ops.specops.cayley_adam_step(X, G, bufs["exp_avg"].view(X.shape), bufs["exp_avg_sq"].view(-1),
                                           bufs["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["q"],
                                           h["iters"])

    def _step_param(self, param, grad, st, group):
        acc = _acc_dtype(param.dtype)
        b1, b2, eps = group["beta1"], group["beta2"], group["eps"]
        st["step"] += 1
        t = st["step"].item()
        X, G = param.to(acc), grad.to(acc)
        m = b1 * st["exp_avg"].to(acc) + (1 - b1) * G
        v = b2 * st["exp_avg_sq"].to(acc) + (1 - b2) * (G * G).sum((-2, -1))
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        r = (v_hat + eps).sqrt().unsqueeze(-1).unsqueeze(-1)
        W = _plain_generator(X, m_hat) / r
        M = W @ X
        wnorm = torch.linalg.matrix_norm(W).unsqueeze(-1).unsqueeze(-1)
        alpha = (2 * group["q"] / (wnorm + eps)).clamp(max=group["lr"])
        Y = X - alpha * M
        for _ in range(group["iters"]):
            Y = X - 0.5 * alpha * (W @ (X + Y))
        param.copy_(polar_ns(Y, _ns_tol(*param.shape[-2:], acc)))
        st["exp_avg"].copy_(M * r * (1 - b1**t))
        st["exp_avg_sq"].copy_(v)


class StiefelAdam(_StiefelOptimizer):
    """The momentum Stiefel Adam of Kong, Wang & Tao (ICLR 2023); SODA's rotation optimiser.

    Adaptive moments of the skew (Lie-algebra) gradient xi = X^T G - G^T X and, for tall
    matrices, of the normal component N = (I - X X^T) G; an Euler step X + X xi^ + nu, then the
    polar retraction by Newton-Schulz (module docstring). Defaults are the SODA authors'.
    fused, skip_nonfinite: as in StiefelSGD (a skipped parameter's step count does not advance).
    State per parameter: "exp_avg", "exp_avg_sq" (..., p, p); for n > p also "exp_avg_normal",
    "exp_avg_sq_normal" (..., n, p); "step" (float64 scalar).
    """

    _HYPER = ("lr", "beta1", "beta2", "eps")
    _MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_normal", "exp_avg_sq_normal")  # Y, P, V, Q

    def __init__(self, params, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-5, *, fused: bool = True,
                 skip_nonfinite: bool = False):
        _check_adam(lr, betas, eps)
        super().__init__(params, dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps), fused, skip_nonfinite)

    def _state_shapes(self, batch, n, p):
        out = {"exp_avg": (*batch, p, p), "exp_avg_sq": (*batch, p, p)}
        if n > p:
            out.update(exp_avg_normal=(*batch, n, p), exp_avg_sq_normal=(*batch, n, p))
        return out

    def _state_keys_with_step(self):
        return ("step",)

    def _launch(self, X, G, bufs, h):
        B, n, p = X.shape
        empty = X.new_empty(0)
        tall = n > p
        torch.ops.specops.stiefel_adam_step(
            X, G, bufs["exp_avg"].view(B, p, p), bufs["exp_avg_sq"].view(B, p, p),
            bufs["exp_avg_normal"].view(B, n, p) if tall else empty,
            bufs["exp_avg_sq_normal"].view(B, n, p) if tall else empty,
            bufs["step"], h["lr"], h["beta1"], h["beta2"], h["eps"])

    def _step_param(self, param, grad, st, group):
        b1, b2 = group["beta1"], group["beta2"]
        st["step"] += 1
        t = st["step"].item()
        moments = [st.get(k) for k in self._MOMENTS]
        _copy_back((param, *moments), _stiefel_adam_update(param, grad, *moments, 1 - b1**t, 1 - b2**t, group["lr"],
                                                           b1, b2, group["eps"]))


def _check_adam(lr, betas, eps):
    if lr < 0:
        raise ValueError(f"lr: expected >= 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
