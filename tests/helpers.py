"""Shared test helpers: which devices and backends run here, per-dtype tolerances."""
import contextlib
import os

import pytest
import torch

import specops
from specops import _registry
from specops._backend import _why_not
from specops.testing import REL_TOL, assert_rel, rel_err  # noqa: F401 (the tests' tolerances are the kit's)

# Backends that can run on CPU tensors in this install (triton: through TRITON_INTERPRET=1).
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if _why_not(b, "cpu") is None]

# The device axis: cpu always, cuda when a GPU is visible; SPECOPS_TEST_DEVICES=cpu,cuda forces the list
# (to collect, and so count, the cases a GPU run executes).
DEVICES = [d for d in os.environ.get("SPECOPS_TEST_DEVICES", "").split(",") if d] or (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
NO_GPU = "no CUDA device here (torch.cuda.is_available() is False)"


@contextlib.contextmanager
def run_on(device: str, backend: str, *ops: str):
    """Skip unless `backend` can run on `device` tensors here; else run the block with it forced and
    check that each registered op named in `ops` ran it (at least once, and nothing else last)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    why = _why_not(backend, device)
    if why is not None:
        pytest.skip(f"{backend} on {device}: {why}")
    for name in ops:
        _registry.OPS[name].last = None
    with specops.backend(backend):
        yield
    for name in ops:
        assert specops.last_backend(name) == backend, f"{name}: forced {backend!r}, ran {specops.last_backend(name)!r}"

def saved_for_backward(run, exclude) -> int:
    """Bytes autograd keeps for the backward of run() (storages of the tensors in `exclude`, e.g.
    inputs and parameters, not counted)."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


@contextlib.contextmanager
def factored_calls(monkeypatch, integration):
    """The answers of `integration`'s lokr_conv_factored while the block runs (True: the factored path)."""
    calls = []
    decide = integration.lokr_conv_factored

    def spy(*args):
        calls.append(decide(*args))
        return calls[-1]

    with monkeypatch.context() as mp:
        mp.setattr(integration, "lokr_conv_factored", spy)
        yield calls


@contextlib.contextmanager
def loha_path(monkeypatch, factored: bool):
    """LoHa's factored-or-merged choice (specops.adapters.hadamard_factored, read by specops's LoHa and by
    both integrations) forced to `factored` while the block runs; yields the list of its calls."""
    import specops.adapters
    import specops.integrations._patch

    calls = []

    def forced(*args):
        calls.append(args)
        return factored

    with monkeypatch.context() as mp:
        for module in (specops.adapters, specops.integrations._patch):
            mp.setattr(module, "hadamard_factored", forced)
        yield calls


def case_id(case) -> str:
    """Test id of a (method, options) adapter case: "oft-blocks=4"."""
    method, options = case
    return "-".join([method, *(f"{k}={v}" for k, v in options.items())])


class TwoLayerNet(torch.nn.Module):
    """A Linear (24 -> 36) and a 3x3 conv (6 -> 8, padded): the layers the integration tests adapt."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(24, 36)
        self.conv = torch.nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x, z):
        return self.lin(x), self.conv(z)


class WideConvNet(TwoLayerNet):
    """TwoLayerNet with a 32 -> 32 conv (stride 2): wide enough that a low-rank or small dense LoKr
    there runs factored (specops.adapters._kron_conv_factored)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)


class GeomNet(torch.nn.Module):
    """A width with a prime factor, no bias, a strided, dilated, grouped conv."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(21, 35, bias=False)
        self.conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2)

    def forward(self, x, z):
        return self.lin(x), self.conv(z)
