"""The device axis: every op x every backend it implements x every device, against the reference.

Devices come from helpers.DEVICES: cpu always, cuda when torch.cuda.is_available(), or the list in
SPECOPS_TEST_DEVICES (e.g. "cpu,cuda": `pytest --collect-only tests/test_devices.py` then shows the cases
a GPU run executes; without a GPU they skip with one reason). Backends are the ones each op declares
in the registry, restricted to those that can run on the device: a forced backend the op lacks is
never collected, and each case asserts that the op ran the backend its id names. The oracle is always the float64 reference on CPU tensors, so a GPU run compares
against the same numbers as a CPU run. The per-family files hold the exhaustive CPU matrices; this file
keeps one compact case list per op so the same checks run on every device; gradcheck, opcheck and
compile of every op are in tests/test_ops.py (the registry's matrix).
"""
import copy
import functools
import math

import pytest
import torch
from helpers import DEVICES, REL_TOL, assert_rel, run_on
from torch import nn

import specops
from specops import _registry, stiefel
from specops.adapters import make_adapter

F64 = torch.float64
DEVICE_BACKENDS = {"cpu": ("torch", "cpp", "triton"), "cuda": ("torch", "triton", "cuda")}


def _pairs(*ops):
    """(device, backend) for every device under test and every backend all of `ops` declare."""
    declared = set.intersection(*(set(_registry.OPS[o].kernels) for o in ops))
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in DEVICE_BACKENDS[d] if b in declared]


KRON = _pairs("kron_matmul")
SMM = _pairs("scaled_matmul")
ZIP = _pairs("zip_lora_linear")
PENALTY = _pairs("merger_penalty")
STEPS = _pairs("stiefel_sgd_step", "cayley_adam_step", "stiefel_adam_step")
TORCH_ONLY = [pytest.param(d, "torch", id=f"{d}-torch") for d in DEVICES]  # Stiefel ops, adapters' composites


def _to(device, *ts, dtype=None, grad=False):
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(grad) for t in ts]


def _check(fn, ref, inputs, device, dtype, scale=1.0):
    """fn(*inputs on device in dtype) and its gradients vs ref(*inputs in float64 on CPU)."""
    xs = _to(device, *inputs, dtype=dtype, grad=True)
    y = fn(*xs)
    assert y.device.type == device and y.dtype == dtype
    x64 = _to("cpu", *inputs, dtype=F64, grad=True)
    y64 = ref(*x64)
    assert_rel(y.cpu(), y64, dtype, scale)
    gy = torch.randn(y64.shape, dtype=F64)
    grads = torch.autograd.grad(y, xs, gy.to(device, dtype), allow_unused=True)
    refs = torch.autograd.grad(y64, x64, gy, allow_unused=True)
    for g, r in zip(grads, refs):
        if r is not None:
            assert_rel(g.cpu(), r, dtype, 2 * scale)


def _dtypes(device, backend):
    # the Triton interpreter is slow on CPU: its cases run fp32 only
    return [torch.float32] if (device, backend) == ("cpu", "triton") else [F64, torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- kron_matmul

KRON_SHAPES = [[(3, 5)], [(7, 2), (5, 1)], [(2, 2), (3, 5), (4, 4)], [(8, 8), (8, 8), (10, 10)]]


@pytest.mark.parametrize("device,backend", KRON)
@pytest.mark.parametrize("shapes", KRON_SHAPES, ids=lambda s: "x".join(f"{p}.{q}" for p, q in s))
@pytest.mark.parametrize("group", [None, 3], ids=["plain", "G3"])
def test_kron_matmul(device, backend, shapes, group):
    if (device, backend) == ("cpu", "triton") and math.prod(p for p, _ in shapes) >= 64:
        pytest.skip("the Triton interpreter is slow: tests/test_kron.py runs its large CPU shapes")
    with run_on(device, backend, "kron_matmul", "kron_matmul_backward"):
        lead = (group,) if group else ()
        x = torch.randn(*lead, 5, math.prod(p for p, _ in shapes))
        fs = [torch.randn(*lead, p, q) for p, q in shapes]
        for dtype in _dtypes(device, backend):
            _check(lambda x, *f: specops.kron_matmul(x, f), lambda x, *f: specops.kron_matmul_reference(x, f),
                   [x, *fs], device, dtype)


# ----------------------------------------------------------------------------- scaled_matmul, spectral layers


@pytest.mark.parametrize("device,backend", SMM)
@pytest.mark.parametrize("shape", [(7, 3, 5), (1, 1, 1), (64, 33, 17)], ids=lambda s: "x".join(map(str, s)))
def test_scaled_matmul(device, backend, shape):
    m, k, n = shape
    with run_on(device, backend, "scaled_matmul", "scaled_matmul_backward"):
        A, s, B = torch.randn(m, k), torch.randn(k), torch.randn(k, n)
        for dtype in _dtypes(device, backend):
            _check(specops.scaled_matmul, specops.scaled_matmul_reference, [A, s, B], device, dtype)


@pytest.mark.parametrize("device,backend", SMM)
@pytest.mark.parametrize("path", ["materialise", "factored"])
@pytest.mark.parametrize("side", ["input", "basis"])
def test_spectral_linear(device, backend, path, side):
    out_f, in_f = 12, 20
    U, S, Vh, _ = specops.decompose(torch.randn(out_f, in_f, dtype=F64), "svd")
    rot_dims = (4, 5) if side == "input" else (3, 4)
    rot = [torch.linalg.qr(torch.randn(p, p, dtype=F64))[0] for p in rot_dims]
    delta, bias, x = 0.1 * torch.randn(S.shape, dtype=F64), torch.randn(out_f, dtype=F64), torch.randn(3, in_f)

    def fn(x, U, S, Vh, d, b, *r):
        return specops.spectral_linear(x, U, S, Vh, d, b, rotation=r, side=side, activation="softplus", path=path)

    def ref(x, U, S, Vh, d, b, *r):
        return specops.spectral_linear_reference(x, U, S, Vh, d, b, rotation=r, side=side, activation="softplus")

    with run_on(device, backend, "scaled_matmul", "kron_matmul"):
        for dtype in _dtypes(device, backend)[:2]:
            _check(fn, ref, [x, U, S, Vh, delta, bias, *rot], device, dtype, scale=4)


# ----------------------------------------------------------------------------- ZipLoRA


def _zip_inputs(T=6, n=10, m=8, rc=3, rs=2):
    return [torch.randn(T, n), torch.randn(m, n), torch.randn(m), torch.randn(m, rc), torch.randn(rc, n),
            torch.rand(n), torch.randn(m, rs), torch.randn(rs, n), torch.rand(n)]


@pytest.mark.parametrize("device,backend", ZIP)
def test_zip_lora_linear(device, backend):
    def fn(*a):
        return specops.zip_lora_linear(*a, scale_c=0.7, scale_s=1.3)

    def ref(*a):
        return specops.zip_lora_linear_reference(*a, scale_c=0.7, scale_s=1.3)

    with run_on(device, backend, "zip_lora_linear", "zip_lora_linear_backward"):
        for dtype in _dtypes(device, backend):
            _check(fn, ref, _zip_inputs(), device, dtype, scale=2)
        args = _to(device, *_zip_inputs(T=3, n=4, m=3, rc=2, rs=1), dtype=F64, grad=True)
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device,backend", PENALTY)
@pytest.mark.parametrize("kind", ["abs_product", "dot", "cosine"])
def test_merger_penalty(device, backend, kind):
    sizes = (5, 2, 17)  # not 1: the cosine of two scalars is +-1, its gradient exactly 0
    mc, ms = [torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes]
    with run_on(device, backend, "merger_penalty", "merger_penalty_backward"):
        for dtype in (F64, torch.float32):
            _check(lambda *m: specops.merger_penalty(m[:3], m[3:], kind),
                   lambda *m: specops.merger_penalty_reference(m[:3], m[3:], kind), [*mc, *ms], device, dtype)


# ----------------------------------------------------------------------------- Stiefel ops and optimisers


@pytest.mark.parametrize("device,backend", TORCH_ONLY)
@pytest.mark.parametrize("method", ["cayley", "cayley_iter", "qr", "polar"])
def test_stiefel_ops(device, backend, method):
    X = torch.linalg.qr(torch.randn(2, 9, 4, dtype=F64))[0]
    G, A = torch.randn(2, 9, 4, dtype=F64), torch.randn(3, 5, 5, dtype=F64)
    A = A - A.mT
    with run_on(device, backend):
        V = stiefel.project(*_to(device, X, G))
        assert_rel(V.cpu(), stiefel.project_reference(X, G), F64)
        assert_rel(stiefel.cayley(*_to(device, A)).cpu(), stiefel.cayley_reference(A), F64)
        Y = stiefel.retract(*_to(device, X, 0.1 * V.cpu()), method=method)
        assert_rel(Y.cpu(), stiefel.retract_reference(X, 0.1 * V.cpu(), method=method), F64, scale=1e3)
        if method != "cayley_iter":  # the fixed-point Cayley is orthogonal only to O(||V||^3)
            assert stiefel.orthogonality_error(Y).max() < 1e-12


OPTIMISERS = {"StiefelSGD": dict(lr=0.1), "CayleyAdam": dict(lr=0.05), "StiefelAdam": dict(lr=0.05)}
_STEP_OPS = {"StiefelSGD": "stiefel_sgd", "CayleyAdam": "cayley_adam", "StiefelAdam": "stiefel_adam"}


@pytest.mark.parametrize("device,backend", STEPS)
@pytest.mark.parametrize("name", OPTIMISERS)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_fused_optimiser(device, backend, name, dtype):
    """Three fused steps on the device vs the per-parameter float64 path on the CPU."""
    shapes = [(12, 4), (12, 4), (7, 7), (16, 8)]  # within every kernel's tile: no backend falls back
    X0 = [torch.linalg.qr(torch.randn(s, dtype=F64))[0] for s in shapes]
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(3)]

    def run(device, dtype, fused):
        X = _to(device, *X0, dtype=dtype, grad=True)
        opt = getattr(specops.optim, name)(X, fused=fused, **OPTIMISERS[name])
        for step in grads:
            for x, g in zip(X, step):
                x.grad = g.to(device, dtype)
            opt.step()
        return X

    with run_on(device, backend, f"{_STEP_OPS[name]}_step"):
        got = run(device, dtype, True)
    for x, r in zip(got, run("cpu", F64, False)):
        assert_rel(x.detach().cpu(), r.detach(), dtype, scale=10)
        assert stiefel.orthogonality_error(x.detach()).item() < 10 * REL_TOL[dtype]


# ----------------------------------------------------------------------------- adapters

_LORA = [torch.randn(12, r, dtype=F64, generator=torch.Generator().manual_seed(r)) for r in (2, 3)]
ADAPTERS = [("lora", {"rank": 3}), ("loha", {"rank": 2}), ("lokr", {}), ("oft", {"blocks": 2}),
            ("boft", {"block_size": 4}), ("koft", {}), ("svdiff", {}), ("soda-svd", {}), ("soda-lq", {}),
            ("ziplora", {"content": (_LORA[0], _LORA[0].mT.repeat(1, 8)[:, :16] / 16),
                         "style": (_LORA[1], _LORA[1].mT.repeat(1, 8)[:, :16] / 16, 0.7)})]


@functools.cache
def _base_weights():
    base = nn.Linear(16, 12, dtype=F64)
    torch.nn.init.normal_(base.weight)
    return base


def _base():
    """A fresh copy: an adapter wraps its base, and .to(device) would move a shared one for every test."""
    return copy.deepcopy(_base_weights())


@pytest.mark.parametrize("device,backend", TORCH_ONLY)
@pytest.mark.parametrize("method,options", ADAPTERS, ids=[m for m, _ in ADAPTERS])
def test_adapter(device, backend, method, options):
    """An adapter on the device computes what the same adapter (same parameters) computes on the CPU."""
    torch.manual_seed(1)
    cpu = make_adapter(method, _base(), **options)
    with torch.no_grad():
        for p in cpu.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # away from the identity start
    x = torch.randn(5, 16, dtype=F64)
    with run_on(device, backend):
        dev = make_adapter(method, _base(), **options).to(device)
        dev.load_state_dict(cpu.state_dict())
        y = dev(x.to(device))
        y.square().sum().backward()
    ref = cpu(x)
    ref.square().sum().backward()
    assert_rel(y.cpu(), ref, F64, scale=1e3)
    for (name, p), q in zip(dev.named_parameters(), cpu.parameters()):
        if q.grad is not None:
            assert_rel(p.grad.cpu(), q.grad, F64, scale=1e3), name
