"""What both integrations share: the instance-attribute forward they install on a peer's layer, and
the version gate."""
from __future__ import annotations

import warnings

from torch import nn


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
