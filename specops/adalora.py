"""AdaLoRA: SVD-form adapters whose rank budget is reallocated by importance during training.

Layer (AdaLoRALinear): W = W0 + c · P diag(λ) Q, P (out, r), λ (r,), Q (r, in), c = scale·alpha /
(r_init + 1e-5) (alpha = r_init when not given), λ = 0 and P, Q ~ N(0, 0.02²) at the start, so a fresh
layer is W0. Forward: y = base(x) + c · ((x Qᵀ) diag(λ)) Pᵀ through specops.scaled_matmul; ΔW is
never formed. These are PEFT's AdaLoRA conventions (its lora_B, lora_E, lora_A and scaling / ranknum),
so one model's numbers carry over to the other.

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
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._constants import FLOAT_DTYPES, acc_dtype
from ._registry import declare
from .spectral import scaled_matmul

EPS_RANKNUM = 1e-5  # PEFT's ranknum + 1e-5 in the scaling
ORTHOGONAL = (None, "stiefel")
# per factor: the dim that indexes triplets, and the dim an importance is averaged over
_TRIPLET_DIM = {"P": 1, "lam": 0, "Q": 0, "Qt": 1}
_MEAN_DIM = {"P": 0, "Q": 1, "Qt": 0}


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


# ----------------------------------------------------------------------------- the layer and the allocator


class AdaLoRALinear(nn.Module):
    """W0 + c · P diag(λ) Q on a frozen nn.Linear (module docstring); r = init_r triplets.

    orthogonal="stiefel" keeps P and Q exactly orthonormal instead of regularising them: P (out, r)
    and Qt = Qᵀ (in, r) start as random orthonormal columns (init_r <= min(out, in)) and are trained
    by a Stiefel optimiser (orthogonal_parameters(): specops.StiefelSGD / StiefelAdam), λ by any.
    The importance, budget and masks are the same."""

    method = "adalora"

    def __init__(self, base: nn.Linear, *, init_r: int = 12, alpha: float | None = None, scale: float = 1.0,
                 orthogonal: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not isinstance(init_r, int) or init_r < 1:
            raise ValueError(f"init_r: expected a positive int, got {init_r!r}")
        if orthogonal not in ORTHOGONAL:
            raise ValueError(f"orthogonal: expected one of {ORTHOGONAL}, got {orthogonal!r}")
        base.requires_grad_(False)
        self.base, self.init_r, self.scale, self.orthogonal = base, init_r, float(scale), orthogonal
        self.alpha = float(init_r if alpha is None else alpha)
        W0 = base.weight
        out_f, in_f = W0.shape
        like = dict(dtype=W0.dtype, device=W0.device)
        self.lam = nn.Parameter(W0.new_zeros(init_r))
        if orthogonal == "stiefel":
            if init_r > min(out_f, in_f):
                raise ValueError(f"init_r: {init_r} orthonormal triplets need init_r <= min(out, in) = {min(out_f, in_f)}")
            onb = lambda n: torch.linalg.qr(torch.randn(n, init_r, dtype=torch.float64))[0].to(**like)  # noqa: E731
            self.P, self.Qt = nn.Parameter(onb(out_f)), nn.Parameter(onb(in_f))
            self.factors = ("P", "lam", "Qt")
        else:
            self.P = nn.Parameter(torch.randn(out_f, init_r, **like) * 0.02)
            self.Q = nn.Parameter(torch.randn(init_r, in_f, **like) * 0.02)
            self.factors = ("P", "lam", "Q")
        for f in self.factors:  # the allocator's smoothed sensitivity and uncertainty, per entry
            p = getattr(self, f)
            self.register_buffer(f"ema_ipt_{f}", torch.zeros_like(p))
            self.register_buffer(f"ema_unc_{f}", torch.zeros_like(p))
        # the final phase's kept triplets (all until then): a buffer, so a run resumed there keeps them
        self.register_buffer("frozen_mask", torch.ones(init_r, dtype=torch.bool, device=W0.device))

    def c(self) -> float:
        return self.scale * self.alpha / (self.init_r + EPS_RANKNUM)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = self.base(x2) + self.c() * scaled_matmul(x2 @ self.q().mT, self.lam, self.P.mT)
        return y.view(*x.shape[:-1], y.shape[-1])

    def delta_weight(self) -> Tensor:
        """ΔW = c · P diag(λ) Q (out, in), differentiable."""
        return self.c() * scaled_matmul(self.P, self.lam, self.q())

    def q(self) -> Tensor:
        """Q (r, in) (a transposed view of the parameter Qt under orthogonal="stiefel")."""
        return self.Qt.mT if self.orthogonal == "stiefel" else self.Q

    def orthogonal_parameters(self) -> list[nn.Parameter]:
        """[P, Qt] under orthogonal="stiefel" (for a Stiefel optimiser), else []."""
        return [self.P, self.Qt] if self.orthogonal == "stiefel" else []

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) with B @ A == delta_weight(): the kept triplets only (an exact LoRA of the kept rank)."""
        keep = self.lam != 0
        return self.c() * self.P[:, keep] * self.lam[keep], self.q()[keep]

    @property
    def rank(self) -> int:
        """Triplets computed (init_r until compact())."""
        return self.lam.numel()

    @torch.no_grad()
    def compact(self) -> None:
        """Drop the pruned triplets (λ = 0, or outside the final phase's pattern) from P, λ, Q and their
        state, so compute follows the kept rank; the output is unchanged (c keeps init_r, as the
        layer's scale; the regulariser then covers the kept triplets only). The parameters are new
        tensors: build (or rebuild) the optimiser after."""
        keep = (self.lam != 0) & self.frozen_mask
        idx = keep.nonzero().view(-1)
        for f in self.factors:
            dim = _TRIPLET_DIM[f]
            setattr(self, f, nn.Parameter(getattr(self, f).index_select(dim, idx)))
            for kind in ("ema_ipt_", "ema_unc_"):
                setattr(self, kind + f, getattr(self, kind + f).index_select(dim, idx))
        self.frozen_mask = self.frozen_mask[keep]

    def extra_repr(self) -> str:
        return (f"init_r={self.init_r}, rank={self.rank}, alpha={self.alpha}, scale={self.scale}, "
                f"orthogonal={self.orthogonal!r}")


class RankAllocator:
    """The budget schedule, importance scores and masks of every AdaLoRALinear in `model` (module
    docstring; PEFT's AdaLoraConfig names). Call update_and_allocate(step) after backward and the
    optimiser step, before zero_grad, with step counting from 0 or 1 as the schedule's t."""

    def __init__(self, model: nn.Module, *, target_r: int = 8, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, total_step: int):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
        if not self.layers:
            raise ValueError("RankAllocator: the model has no AdaLoRALinear layer")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1, beta2: expected in (0, 1), got {beta1}, {beta2}")
        if not total_step > tinit + tfinal:
            raise ValueError(f"total_step: expected > tinit + tfinal = {tinit + tfinal}, got {total_step}")
        if deltaT < 1:
            raise ValueError(f"deltaT: expected >= 1, got {deltaT}")
        self.target_r, self.tinit, self.tfinal, self.deltaT = target_r, tinit, tfinal, deltaT
        self.beta1, self.beta2, self.total_step = beta1, beta2, total_step
        self.init_budget = sum(m.init_r for m in self.layers.values())
        self.target_budget = target_r * len(self.layers)
        self._collect()

    def _collect(self) -> None:
        mods = list(self.layers.values())
        self._params = [getattr(m, f) for m in mods for f in m.factors]
        self._ipt = [getattr(m, f"ema_ipt_{f}") for m in mods for f in m.factors]
        self._unc = [getattr(m, f"ema_unc_{f}") for m in mods for f in m.factors]

    def compact(self) -> None:
        """AdaLoRALinear.compact() on every layer, once the final phase has begun (before it, the budget
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
        # one foreach pass over every factor of every layer (no per-layer Python arithmetic)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        ipt = torch._foreach_abs(torch._foreach_mul(self._params, grads))
        torch._foreach_mul_(self._ipt, self.beta1)
        torch._foreach_add_(self._ipt, ipt, alpha=1 - self.beta1)
        dev = torch._foreach_abs(torch._foreach_sub(ipt, self._ipt))
        torch._foreach_mul_(self._unc, self.beta2)
        torch._foreach_add_(self._unc, dev, alpha=1 - self.beta2)

    @torch.no_grad()
    def scores(self) -> dict[str, Tensor]:
        """{layer: importance of each triplet (r,)} from the current EMAs."""
        s = torch._foreach_mul(self._ipt, self._unc)
        out = {}
        for i, (name, m) in enumerate(self.layers.items()):
            sP, slam, sQ = s[3 * i: 3 * i + 3]
            out[name] = slam + (sQ.mean(_MEAN_DIM[m.factors[2]]) + sP.mean(0))
        return out

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> dict[str, Tensor]:
        scores = self.scores()
        k = self.init_budget - budget
        keep = {}
        if k <= 0:
            return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        for name, s in scores.items():
            keep[name] = s > threshold
            self.layers[name].lam.masked_fill_(~keep[name], 0.0)
        return keep

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
            keep = self._mask_to_budget(self.budget_schedule(step)[0])
            for name, m in self.layers.items():
                m.frozen_mask.copy_(keep[name])
            torch._foreach_zero_(self._ipt)
            torch._foreach_zero_(self._unc)
            return self.target_budget
        for m in self.layers.values():
            m.lam.masked_fill_(~m.frozen_mask, 0.0)
        return self.target_budget

    def regularizer(self) -> Tensor:
        """The mean over layers and over P and Q of the Gram deviation (module docstring): one
        specops.adalora.orthogonality call over every layer, differentiable."""
        mods = list(self.layers.values())
        return orthogonality([m.P for m in mods], [m.q() for m in mods])

    def ranks(self) -> dict[str, int]:
        """{layer: triplets kept (λ != 0)}."""
        return {n: int(torch.count_nonzero(m.lam)) for n, m in self.layers.items()}


def inject(model: nn.Module, targets, **options) -> dict[str, AdaLoRALinear]:
    """Replace each nn.Linear of `model` whose qualified name ends with one of `targets` by an
    AdaLoRALinear(**options) around it; returns {name: layer}."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(f"inject: no nn.Linear named like {targets}")
    out = {}
    for name, lin in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        out[name] = AdaLoRALinear(lin, **options)
        setattr(parent, child, out[name])
    return out


__all__ = ["AdaLoRALinear", "RankAllocator", "inject", "orthogonality", "EPS_RANKNUM"]
