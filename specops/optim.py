"""Stiefel-manifold optimisers: StiefelSGD, CayleyAdam, StiefelAdam (torch.optim.Optimizer).

Every parameter is a matrix (or a batch of matrices) X (..., n, p) with n >= p and X^T X = I;
G = df/dX is its Euclidean gradient. The steps, per matrix (formulas in specops.stiefel_steps):
StiefelSGD — Cayley SGD with momentum (Li, Fuxin & Todorovic, ICLR 2020); CayleyAdam — the same
paper's Adam variant, with a scalar second moment per matrix; StiefelAdam — Kong, Wang & Tao
(ICLR 2023), what the SODA authors train their rotations with. All three finish with the
Newton-Schulz polar retraction/correction stopped at round-off, so ||X^T X - I|| stays at
round-off for any number of steps.

fused=True (default): matrices of equal (shape, dtype, device, hyper-parameters) — across param
groups — are stepped together by ONE call of a registered op (torch.ops.specops.stiefel_sgd_step,
cayley_adam_step, stiefel_adam_step; specops.stiefel_steps) that mutates the stacked parameters
and state in place, with the kernel that the device and the matrices' size choose. The optimiser
state lives in ONE persistent stacked (S, ...) buffer per state entry and (shape, dtype, device);
each parameter's state entries are views into its rows, so state_dict()/load_state_dict() see
ordinary per-parameter tensors and the state exists once. When every parameter has a gradient
(the common case) each launch steps a slice of the buffers in place; when only some have, their
rows are gathered, stepped and scattered back. The buffers are rebuilt from the per-parameter
tensors only when a parameter gets its first state or after a load, and the old ones are freed.
Parameters are gathered with one torch.stack and written back with one torch._foreach_copy_:
about 2 x 4 bytes per element, negligible next to the step itself, and unlike re-pointing
parameters into a shared buffer it never changes what a user's tensor is.
fused=False is the per-parameter path, written plainly from the papers with dense torch ops
(stiefel_steps.cayley_sgd_update, cayley_adam_update, stiefel_adam_update).

skip_nonfinite=True (all three, both paths): a parameter whose gradient holds a NaN or Inf is not
stepped; it and its state (moments, step count) stay bit-identical, exactly as if its gradient
were None, and the others step as they would have. Each skip adds 1 to `opt.skipped_steps` and to
`opt.skipped_by_param[param]` (a collections.Counter; neither is part of the state_dict). The fused
path tests each bucket's stacked gradients with one isfinite reduction and launches the finite
ones only. torch.amp.GradScaler needs no flag: its step() skips the whole optimiser on an inf.
"""
from __future__ import annotations

import collections

import torch
from torch import Tensor

from ._constants import CAYLEY_ITERS, FLOAT_DTYPES
from .stiefel_steps import (cayley_adam_step, cayley_adam_update, cayley_sgd_update, copy_back, stiefel_adam_step,
                            stiefel_adam_update, stiefel_sgd_step)

__all__ = ["StiefelSGD", "CayleyAdam", "StiefelAdam"]


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
            if p.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"{type(self).__name__}: param_groups[{gi}]['params'][{i}] has dtype {p.dtype}; "
                    f"expected one of {FLOAT_DTYPES}"
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
        stiefel_sgd_step(X, G, bufs["momentum_buffer"].view(X.shape), h["lr"], h["momentum"], h["q"], h["iters"],
                         h["eps"])

    def _step_param(self, param, grad, st, group):
        M = st["momentum_buffer"]
        copy_back((param, M), cayley_sgd_update(param, grad, M, group["lr"], group["momentum"], group["q"],
                                                group["iters"], group["eps"]))


class CayleyAdam(_StiefelOptimizer):
    """Cayley Adam on the Stiefel manifold (Li, Fuxin & Todorovic, ICLR 2020).

    Adam's first moment as a matrix, its second moment as one scalar per matrix (||G||_F^2), the
    generator W built from the bias-corrected first moment and divided by sqrt(v^ + eps), the same
    step cap and fixed-point Cayley iterations as StiefelSGD (specops.stiefel_steps).
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
        cayley_adam_step(X, G, bufs["exp_avg"].view(X.shape), bufs["exp_avg_sq"].view(-1), bufs["step"], h["lr"],
                         h["beta1"], h["beta2"], h["eps"], h["q"], h["iters"])

    def _step_param(self, param, grad, st, group):
        b1, b2 = group["beta1"], group["beta2"]
        st["step"] += 1
        t = st["step"].item()
        m, v = st["exp_avg"], st["exp_avg_sq"]
        copy_back((param, m, v), cayley_adam_update(param, grad, m, v, 1 - b1**t, 1 - b2**t, group["lr"], b1, b2,
                                                    group["eps"], group["q"], group["iters"]))


class StiefelAdam(_StiefelOptimizer):
    """The momentum Stiefel Adam of Kong, Wang & Tao (ICLR 2023); SODA's rotation optimiser.

    Adaptive moments of the skew (Lie-algebra) gradient xi = X^T G - G^T X and, for tall
    matrices, of the normal component N = (I - X X^T) G; an Euler step X + X xi^ + nu, then the
    polar retraction by Newton-Schulz (specops.stiefel_steps). Defaults are the SODA authors'.
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
        stiefel_adam_step(
            X, G, bufs["exp_avg"].view(B, p, p), bufs["exp_avg_sq"].view(B, p, p),
            bufs["exp_avg_normal"].view(B, n, p) if tall else empty,
            bufs["exp_avg_sq_normal"].view(B, n, p) if tall else empty,
            bufs["step"], h["lr"], h["beta1"], h["beta2"], h["eps"])

    def _step_param(self, param, grad, st, group):
        b1, b2 = group["beta1"], group["beta2"]
        st["step"] += 1
        t = st["step"].item()
        moments = [st.get(k) for k in self._MOMENTS]
        copy_back((param, *moments), stiefel_adam_update(param, grad, *moments, 1 - b1**t, 1 - b2**t, group["lr"],
                                                         b1, b2, group["eps"]))


def _check_adam(lr, betas, eps):
    if lr < 0:
        raise ValueError(f"lr: expected >= 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
    if eps < 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
