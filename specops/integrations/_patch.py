"""What both integrations share: the instance-attribute forward they install on a peer's layer, the
version gate, and LoHa's ΔW from the parameters both peers name alike."""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from ..adapters import hadamard_delta


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
