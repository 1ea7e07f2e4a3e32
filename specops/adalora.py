"""AdaLoRA: SVD-form adapters whose rank budget is reallocated by importance during training.

Layer: specops.adapters.AdaLoRA (W = W0 + c · P diag(λ) Q on a Linear or Conv2d, PEFT's conventions),
injected like every adapter: specops.sdxl.inject(model, "adalora", init_r=12, targets=...).

Regulariser: the mean over adapted layers of ||QQᵀ - I||_F and ||PᵀP - I||_F (both counted), to add to
the loss with a weight (PEFT's orth_reg_weight).

Importance (RankAllocator.update_and_allocate, after backward, before zero_grad), for every entry w of
P, λ and Q: I = |w · ∂L/∂w|, Ī <- β1 Ī + (1 - β1) I, U <- β2 U + (1 - β2) |I - Ī|, score s = Ī · U;
triplet i's importance = s(λ_i) + mean_o s(Q[i, :]) + mean_o s(P[:, i]).
Budget b(t) over total_step T (tinit warm-up, tfinal final phase, all layers' ranks together, b0 =
Σ r_init, b_T = target_r · layers):
    t <= tinit: b0, no masking;  tinit < t <= T - tfinal: int((b0 - b_T) (1 - (t - tinit)/(T - tfinal - tinit))³ + b_T),
    masking when t % deltaT == 0;  t = T - tfinal: masked to b_T and the pattern frozen (EMAs reset);
    t > T - tfinal: that pattern re-applied every step.
Masking sets λ_i = 0 for every triplet whose importance is <= the (b0 - b)-th smallest over all layers
(a masked λ may regrow until the next masking, as in PEFT). The EMAs and the frozen pattern are
buffers of each layer, so they are in the model's state_dict and a resumed run continues exactly.
The allocator computes all of this per group of layers of one shape (a few batched ops per group,
not a loop over layers): it binds each group's EMA and frozen-mask buffers as views of one stacked
tensor, so one in-place op updates the whole group.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._constants import FLOAT_DTYPES, acc_dtype
from ._registry import declare
from .adapters import ADALORA_EMAS, ADALORA_MEAN_DIM, AdaLoRA


# ----------------------------------------------------------------------------- the regulariser op


def _check_orthogonality(P_list, Q_list) -> None:
    if not isinstance(P_list, (list, tuple)) or len(P_list) == 0:
        raise ValueError("P_list: expected a non-empty list of (out_l, r_l) matrices")
    if not isinstance(Q_list, (list, tuple)) or len(Q_list) != len(P_list):
        n = len(Q_list) if isinstance(Q_list, (list, tuple)) else type(Q_list).__name__
        raise ValueError(f"Q_list: expected {len(P_list)} matrices like P_list, got {n}")
    ref = P_list[0]
    if ref.dtype not in FLOAT_DTYPES:
        raise ValueError(f"P_list[0]: expected a floating dtype {FLOAT_DTYPES}, got {ref.dtype}")
    for i, (P, Q) in enumerate(zip(P_list, Q_list)):
        for name, t in ((f"P_list[{i}]", P), (f"Q_list[{i}]", Q)):
            if t.dim() != 2 or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{name}: expected a matrix of P_list[0]'s dtype {ref.dtype} and device "
                                 f"{ref.device}, got shape {tuple(t.shape)}, {t.dtype}, {t.device}")
        torch._check_with(ValueError, P.shape[1] == Q.shape[0],
                          lambda: f"layer {i}: P (out, r) and Q (r, in) disagree on r: {tuple(P.shape)}, {tuple(Q.shape)}")


def _gram_deviations(mats: list[Tensor]) -> Tensor:
    """Σ ||M Mᵀ - I||_F over `mats` (each (r, k)), one batched product per distinct shape."""
    groups: dict[tuple, list[Tensor]] = {}
    for M in mats:
        groups.setdefault(tuple(int(d) for d in M.shape), []).append(M)  # (int: symbolic shapes too)
    total = mats[0].new_zeros((), dtype=acc_dtype(mats[0].dtype))
    for (r, _), group in groups.items():
        G = torch.stack(group).to(total.dtype)
        eye = torch.eye(r, dtype=total.dtype, device=G.device)
        total = total + torch.linalg.matrix_norm(G @ G.mT - eye).sum()
    return total


def _orthogonality_torch(P_list, Q_list) -> Tensor:
    total = _gram_deviations([P.mT for P in P_list]) + _gram_deviations(list(Q_list))
    return (total / (2 * len(P_list))).to(P_list[0].dtype)


def _orthogonality_reference(P_list, Q_list) -> Tensor:
    terms = []
    for P, Q in zip(P_list, Q_list):
        r = P.shape[1]
        eye = torch.eye(r, dtype=torch.float64)
        terms += [torch.linalg.matrix_norm(Q.double() @ Q.double().mT - eye),
                  torch.linalg.matrix_norm(P.double().mT @ P.double() - eye)]
    return (torch.stack(terms).sum() / (2 * len(P_list))).to(P_list[0].dtype)


def _orthogonality_samples(device, dtype):
    """Layers of equal and of different shapes (grouped and not), rank 1, near-orthonormal factors."""
    def layer(out_f, r, in_f):
        P = torch.linalg.qr(torch.randn(out_f, r, dtype=torch.float64))[0] + 0.1 * torch.randn(out_f, r, dtype=torch.float64)
        Q = torch.linalg.qr(torch.randn(in_f, r, dtype=torch.float64))[0].mT + 0.1 * torch.randn(r, in_f, dtype=torch.float64)
        return P.to(device, dtype), Q.to(device, dtype)

    out = []
    for shapes in ([(6, 3, 5)], [(6, 3, 5), (6, 3, 5), (4, 1, 7), (5, 2, 5)]):
        Ps, Qs = zip(*(layer(*s) for s in shapes))
        out.append((list(Ps), list(Qs)))
    return out


orthogonality = declare(
    "adalora_orthogonality",
    "(Tensor[] P_list, Tensor[] Q_list) -> Tensor",
    kernels={"torch": _orthogonality_torch},
    check=_check_orthogonality,
    fake=lambda P_list, Q_list: P_list[0].new_empty(()),
    reference=_orthogonality_reference,
    samples=_orthogonality_samples,
    torch_autograd=True,
    doc="""AdaLoRA's regulariser over L layers: (1 / 2L) Σ_l (||P_lᵀ P_l - I||_F + ||Q_l Q_lᵀ - I||_F).

    P_list[l] (out_l, r_l), Q_list[l] (r_l, in_l); one batched product per distinct shape, accumulated
    in float32 (float64 for float64), returned as a 0-dim tensor of the inputs' dtype. Differentiable
    (any order). Raises ValueError on empty or unequal lists, non-matrices, mixed dtypes/devices or
    an r mismatch.
    """,
)


# ----------------------------------------------------------------------------- the allocator

_IPT, _UNC = ADALORA_EMAS


class _Group:
    """Layers whose factors have one shape, dtype and device; their EMA and frozen-mask buffers are
    views of the stacked tensors in `state` (key: buffer name), layer l's at index l."""

    def __init__(self, names: list[str], mods: list[AdaLoRA]):
        self.names, self.mods, self.factors = names, mods, mods[0].factors
        self.state, self._views = {}, {}
        for key in [kind + f for kind in ADALORA_EMAS for f in self.factors] + ["frozen_mask"]:
            self.state[key] = torch.stack([m._buffers[key] for m in mods])
            self._views[key] = self.state[key].unbind(0)
            for m, view in zip(mods, self._views[key]):
                setattr(m, key, view)

    def bound(self) -> bool:
        """Whether every layer still holds this group's views (not so after compact(), .to(), ...)."""
        return all(m._buffers[key] is view for key, views in self._views.items() for m, view in zip(self.mods, views))

    def params(self, f: str) -> list[Tensor]:
        return [getattr(m, f) for m in self.mods]

    def lams(self) -> list[Tensor]:
        return self.params("lam")

    def scores(self) -> Tensor:
        """(layers, r): s(λ_i) + mean s(Q[i, :]) + mean s(P[:, i]), s = Ī · U."""
        s = {f: self.state[_IPT + f] * self.state[_UNC + f] for f in self.factors}
        P, lam, Q = self.factors
        return s[lam] + (s[Q].mean(1 + ADALORA_MEAN_DIM[Q]) + s[P].mean(1 + ADALORA_MEAN_DIM[P]))

    def mask(self, keep: Tensor) -> None:
        """λ = 0 wherever `keep` (layers, r) is False."""
        lams = self.lams()
        torch._foreach_copy_(lams, torch.stack(lams).masked_fill_(~keep, 0.0).unbind(0))


class RankAllocator:
    """The budget schedule, importance scores and masks of every AdaLoRA adapter in `model` (module
    docstring; PEFT's AdaLoraConfig names). Call update_and_allocate(step) after backward and the
    optimiser step, before zero_grad, with step counting from 0 or 1 as the schedule's t."""

    def __init__(self, model: nn.Module, *, target_r: int = 8, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, total_step: int):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRA)}
        if not self.layers:
            raise ValueError("RankAllocator: the model has no AdaLoRA adapter (specops.sdxl.inject(model, \"adalora\", ...))")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1, beta2: expected in (0, 1), got {beta1}, {beta2}")
        if not total_step > tinit + tfinal:
            raise ValueError(f"total_step: expected > tinit + tfinal = {tinit + tfinal}, got {total_step}")
        if deltaT < 1:
            raise ValueError(f"deltaT: expected >= 1, got {deltaT}")
        if not isinstance(target_r, int) or target_r < 0:
            raise ValueError(f"target_r: expected a non-negative int, got {target_r!r}")
        self.target_r, self.tinit, self.tfinal, self.deltaT = target_r, tinit, tfinal, deltaT
        self.beta1, self.beta2, self.total_step = beta1, beta2, total_step
        self.init_budget = sum(m.init_r for m in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self._collect()

    def _collect(self) -> None:
        by_shape: dict[tuple, list[str]] = {}
        for name, m in self.layers.items():
            key = (m.factors, tuple(getattr(m, f).shape for f in m.factors), m.lam.dtype, m.lam.device)
            by_shape.setdefault(key, []).append(name)
        self._groups = [_Group(names, [self.layers[n] for n in names]) for names in by_shape.values()]

    def _current(self) -> list[_Group]:
        """The groups, rebuilt (from the layers' current values) when a layer's buffers were replaced."""
        if not all(g.bound() for g in self._groups):
            self._collect()
        return self._groups

    def compact(self) -> None:
        """AdaLoRA.compact() on every layer, once the final phase has begun (before it, the budget
        schedule still counts every init_r triplet); rebuild the optimiser after."""
        for m in self.layers.values():
            m.compact()
        self._collect()

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether this step masks) at step t (module docstring)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((self.init_budget - self.target_budget) * mul ** 3 + self.target_budget), step % self.deltaT == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.beta1, self.beta2
        for g in self._current():
            for f in g.factors:
                params = g.params(f)
                w = torch.stack(params)
                grad = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                ipt = w.mul_(grad).abs_()
                ema, unc = g.state[_IPT + f], g.state[_UNC + f]
                ema.mul_(b1).add_(ipt, alpha=1 - b1)
                unc.mul_(b2).add_(ipt.sub_(ema).abs_(), alpha=1 - b2)

    @torch.no_grad()
    def scores(self) -> dict[str, Tensor]:
        """{layer: importance of each triplet (r,)} from the current EMAs, in module order."""
        found = {n: s for g in self._current() for n, s in zip(g.names, g.scores().unbind(0))}
        return {n: found[n] for n in self.layers}

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> list[Tensor]:
        """Mask to `budget`; returns each group's keep mask (layers, r)."""
        groups = self._current()
        scores = [g.scores() for g in groups]
        k = self.init_budget - budget
        if k <= 0:
            return [torch.ones_like(s, dtype=torch.bool) for s in scores]
        threshold = torch.kthvalue(torch.cat([s.flatten() for s in scores]), k).values
        keeps = [s > threshold for s in scores]
        for g, keep in zip(groups, keeps):
            g.mask(keep)
        return keeps

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> int:
        """Update the importance, mask to the step's budget (module docstring); returns the budget."""
        end = self.total_step - self.tfinal
        if step < end:
            self._update_importance()
            budget, masks = self.budget_schedule(step)
            if masks:
                self._mask_to_budget(budget)
            return budget
        if step == end:
            keeps = self._mask_to_budget(self.budget_schedule(step)[0])
            for g, keep in zip(self._groups, keeps):
                g.state["frozen_mask"].copy_(keep)
                for kind in ADALORA_EMAS:
                    for f in g.factors:
                        g.state[kind + f].zero_()
            return self.target_budget
        for g in self._current():
            g.mask(g.state["frozen_mask"])
        return self.target_budget

    def regularizer(self) -> Tensor:
        """The mean over layers and over P and Q of the Gram deviation (module docstring): one
        specops.adalora.orthogonality call over every layer, differentiable."""
        mods = list(self.layers.values())
        return orthogonality([m.P for m in mods], [m.q() for m in mods])

    @torch.no_grad()
    def ranks(self) -> dict[str, int]:
        """{layer: triplets kept (λ != 0)}, in module order."""
        found = {n: int(c) for g in self._current()
                 for n, c in zip(g.names, torch.count_nonzero(torch.stack(g.lams()), dim=1).tolist())}
        return {n: found[n] for n in self.layers}


__all__ = ["RankAllocator", "orthogonality"]
