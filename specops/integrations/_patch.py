"""What both integrations share: the instance-attribute forward they install on a peer's layer, the
version gate, the LoHa / LoKr pieces both peers lay out alike (hada_*, lokr_* parameters), and the low-rank
update added onto a base output (PEFT LoRA / AdaLoRA, LyCORIS LoCon)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..adapters import _kron_conv_factored, hadamard_delta, hadamard_factored, hadamard_rows


class PatchedForward:
    """`module.forward` after apply(): fn(module, x, ...). A class rather than a bound method so that
    copy.deepcopy and torch.save of the whole model carry the patch along (fn is a module-level
    function, pickled by name)."""

    __slots__ = ("fn", "module")

    def __init__(self, fn, module: nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, x, *args, **kwargs):
        return self.fn(self.module, x, *args, **kwargs)

    def __getstate__(self):
        return self.fn, self.module

    def __setstate__(self, state):
        self.fn, self.module = state


def loha_delta(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, t1: Tensor | None, t2: Tensor | None,
               c, shape) -> Tensor:
    """c (w1_a w1_b) ⊙ (w2_a w2_b) in `shape`, the peers' LoHa (hada_*) parameters; with Tucker cores
    t_i (r, r, kh, kw) the w_i_a are (r, out) and each half is Σ_{p,q} t_i[p, q, h, w] w_i_a[p, o] w_i_b[q, c].
    Autograd keeps only the factors (specops.adapters.hadamard_delta)."""
    if t1 is not None:
        w1_a, w2_a = w1_a.mT, w2_a.mT
    return hadamard_delta(w1_a, w1_b, w2_a, w2_b, t1, t2, c).reshape(shape)


def loha_factored(layer: nn.Linear | nn.Conv2d, x: Tensor, w1_a: Tensor, trains: bool) -> bool:
    """Whether a LoHa (not Tucker) of w1_a's rank on `layer` is added as its rank-r² product (add_hadamard)
    rather than merged into the weight: specops.adapters.hadamard_factored's FLOP count (`trains`: a
    parameter of it requires grad, under grad mode)."""
    rows = hadamard_rows(layer, x)
    W0 = layer.weight
    return rows is not None and hadamard_factored(rows, W0.shape[0], W0[0].numel(), w1_a.shape[1],
                                                  trains and torch.is_grad_enabled())


def lokr_w2_parts(w2: Tensor | None, w2_a: Tensor | None, w2_b: Tensor | None, t2: Tensor | None) -> tuple:
    """LoKr's second factor as specops.adapters._add_kron_conv takes it (specops.adapters._kron_w2 forms it): (w2,)
    dense, (w2_a, w2_b) low rank, or with a Tucker core t2 (w2_a is then (r, m2)) (w2_a^T, t2, w2_b)."""
    if w2 is not None:
        return (w2,)
    return (w2_a, w2_b) if t2 is None else (w2_a.mT, t2, w2_b)


def lokr_conv_factored(conv: nn.Conv2d, x: Tensor, W1: Tensor, parts: tuple, trains: bool) -> bool:
    """Whether a LoKr adapter (W1, lokr_w2_parts) on `conv` is added factored to conv(x), ΔW never formed
    (specops.adapters._add_kron_conv), rather than merged into its weight: when it trains (`trains`: a
    parameter of it requires grad, under grad mode) and the FLOPs favour it (_kron_conv_factored)."""
    if not (trains and x.dim() == 4 and torch.is_grad_enabled()):
        return False
    rank = parts[-1].shape[0] if len(parts) > 1 else None
    return _kron_conv_factored(conv, *W1.shape, rank, len(parts) == 3)


def is_patched(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), PatchedForward)


def refused(peer: str, version: str, supported, names, caller: str) -> dict | None:
    """None when `peer`'s `version` lies in `supported` ((lo, hi) major.minor pairs: >= lo, < hi);
    otherwise a warning and the report of an apply() that patched nothing, every name skipped."""
    from packaging.version import Version

    if supported[0] <= Version(version).release[:2] < supported[1]:
        return None
    lo, hi = (".".join(map(str, v)) for v in supported)
    why = f"{peer} {version} is outside the supported range >={lo},<{hi}"
    warnings.warn(f"{caller}: {why}; nothing is patched", stacklevel=3)
    return {"patched": [], "skipped": {n: why for n in names}, "notes": {}}


def patch(items, why_not, install) -> dict:
    """apply()'s loop over (name, module) `items`: a patched module stays patched, why_not(module)
    gives the reason to skip one or None, install(module) patches it and returns a note or None.
    Returns the report {"patched": [names], "skipped": {name: why}, "notes": {name: note}}."""
    report: dict = {"patched": [], "skipped": {}, "notes": {}}
    for name, module in items:
        if not is_patched(module):
            why = why_not(module)
            if why is not None:
                report["skipped"][name] = why
                continue
            note = install(module)
            if note:
                report["notes"][name] = note
        report["patched"].append(name)
    return report
