"""The test matrix built from the op registry: op x declared backend x device, six checks each.

A case is (op, backend, device) for every op that declares `samples`, every backend it declares
("composite" for a composite op) and every device under test whose backends include it; a backend
the op does not declare is never collected. Each check forces the backend and asserts, after the
call, that the op (and its backward op) ran exactly that backend, so no case claims a backend it
did not run. The checks:
  reference — forward (and gradients for a random cotangent) vs the op's reference in float64 on
              CPU, fed the same rounded inputs; mutating ops compare what they wrote;
  gradcheck — float64 finite differences through the op (differentiable ops);
  gradgradcheck — float64 finite differences through the op's backward (its second derivative: the
              backward op's torch-op autograd, or a composite's decomposition), fast mode;
  vmap      — torch.func.vmap over a batch of 3 perturbed copies of every floating input (in float64)
              against a Python loop of calls (1e-12; ops that write their inputs are not vmapped);
  jvp       — torch.func.jvp through the public wrapper (the op's autograd.Function and its jvp)
              against central finite differences in float64 (differentiable ops);
  opcheck   — torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch);
  compile   — torch.compile(fullgraph=True, dynamic=True, backend="aot_eager") against eager.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import DEVICES, NO_GPU, assert_rel

import specops
from specops import _backend, _registry, testing

F64 = torch.float64
# The backends that run on each device's tensors ("composite" ops run everywhere).
DEVICE_BACKENDS = {"cpu": ("torch", "cpp", "triton", "composite"), "cuda": ("torch", "triton", "cuda", "composite")}
CHECKS = ("reference", "gradcheck", "gradgradcheck", "vmap", "jvp", "opcheck", "compile")


def backends_of(op) -> tuple[str, ...]:
    return ("composite",) if op.composite else tuple(op.kernels)


def _applies(op, check) -> bool:
    differentiable = testing.differentiable(op)
    return {"gradcheck": differentiable, "gradgradcheck": differentiable, "jvp": differentiable, "vmap": not op.mutated(),
            "opcheck": not op.composite}.get(check, True)


def cases(ops=None) -> list:
    """pytest params (op, backend, device, check) for `ops` (default: every registered op with samples):
    the checks that apply to the op (no gradcheck of a mutating op, no opcheck of a composite)."""
    ops = [o for o in (ops or _registry.OPS.values()) if o.samples is not None]
    return [pytest.param(op, b, d, c, id=f"{op.name.split('::')[-1]}-{b}-{d}-{c}")
            for op in ops for d in DEVICES for b in backends_of(op) if b in DEVICE_BACKENDS[d]
            for c in CHECKS if _applies(op, c)]


def _skip_unless_runs(backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    why = None if backend == "composite" else _backend._why_not(backend, device)
    if why is not None:
        pytest.skip(f"{backend} on {device}: {why}")


def _forced(backend):
    return specops.backend(backend) if backend != "composite" else contextlib.nullcontext()


def _convert(op, args, device, dtype, grad):
    """args on `device`: floating tensors cast to `dtype` (but those the op names in fixed_dtype), as
    leaves that require grad when `grad`; other tensors (a permutation, say) moved as they are."""
    def other(t):
        return t.to(device) if isinstance(t, torch.Tensor) and not t.is_floating_point() else t

    out = []
    for spec, a in zip(op.overload._schema.arguments, args):
        keep = spec.name in op.fixed_dtype
        moved = [t.detach().to(device=device, dtype=t.dtype if keep else dtype, copy=True).requires_grad_(grad and not keep)
                 for t in testing.leaves([a])]
        a = testing.rebuild([a], moved)[0]
        out.append([other(t) for t in a] if isinstance(a, (list, tuple)) else other(a))
    return tuple(out)


def _dtypes(op, backend, device):
    # the Triton interpreter is slow on CPU: its cases run fp32 (gradcheck: fp64) only
    if (backend, device) == ("triton", "cpu"):
        return [d for d in op.dtypes if d == torch.float32] or list(op.dtypes[:1])
    return list(op.dtypes)


def _samples(op):
    """The op's samples, drawn once in float64 on CPU from a fixed seed."""
    torch.manual_seed(0)
    return op.samples("cpu", F64)


def _assert_ran(op, backend):
    if backend == "composite":
        return
    assert op.last == backend, f"{op.name}: forced {backend!r}, but {op.last!r} ran"


def _refused(op, backend, device, args):
    """The reason the forced kernel refuses these inputs, or None (then it must run them)."""
    if backend == "composite":
        return None
    kernel = op.kernels[backend]
    return None if kernel.supports is None else kernel.supports(*args)


def check_reference(op, backend, device):
    _skip_unless_runs(backend, device)
    mutated = op.mutated()
    # (not torch_autograd ops: retract's formulas agree on the manifold, not their ambient derivatives)
    differentiable = (op.backward is not None or op.composite) and not mutated
    ran = 0
    for dtype in _dtypes(op, backend, device):
        for sample in _samples(op):
            args = _convert(op, sample, device, dtype, differentiable)
            ref_args = _convert(op, args, "cpu", F64, differentiable)  # the rounded inputs, in float64
            if _refused(op, backend, device, args) is not None:
                with _forced(backend), pytest.raises(_registry.BackendError, match="refuses these inputs"):
                    op.overload(*args)
                continue
            with _forced(backend):
                y = op.overload(*args)
            _assert_ran(op, backend)
            ran += 1
            y_ref = op.reference(*ref_args)
            if mutated:  # compare what was written
                for i in mutated:
                    assert_rel(args[i].cpu(), ref_args[i], dtype, op.tol_scale)
                continue
            outs, refs = testing.outputs(y), testing.outputs(y_ref)
            assert len(outs) == len(refs)
            for o, r in zip(outs, refs):
                assert o.device.type == device and o.dtype == dtype, (o.device, o.dtype)
                assert_rel(o.cpu(), r, dtype, op.tol_scale)
            if not differentiable:
                continue
            cot = [torch.randn(r.shape, dtype=F64) for r in refs]
            leaves, ref_leaves = testing.leaves(args), testing.leaves(ref_args)
            with _forced(backend):
                grads = torch.autograd.grad(outs, leaves, [c.to(device, dtype) for c in cot], allow_unused=True)
            if op.backward is not None:
                _assert_ran(_registry.OPS[op.backward], backend)
            ref_grads = torch.autograd.grad(refs, ref_leaves, cot, allow_unused=True)
            for g, r in zip(grads, ref_grads):
                if r is not None:
                    assert g is not None
                    assert_rel(g.cpu(), r, dtype, 2 * op.tol_scale)
    assert ran, f"{op.name}: no sample ran on {backend}"


def _small(op, backend, device, dtype=F64, grad=True):
    """The first sample the forced kernel accepts, on the device."""
    for sample in _samples(op):
        args = _convert(op, sample, device, dtype, grad)
        if _refused(op, backend, device, args) is None:
            return args
    pytest.fail(f"{op.name}: {backend} accepts none of the samples")


def _kit_check(name, op, backend, device):
    """One of specops.testing's checks on the first sample the forced backend accepts."""
    _skip_unless_runs(backend, device)
    args = _small(op, backend, device, grad=name in ("gradcheck", "gradgradcheck", "opcheck")
                  and not op.mutated() and testing.differentiable(op))
    with _forced(backend):
        assert testing.CHECK_FNS[name](op, args)
    _assert_ran(op, backend)
    if op.backward is not None and name in ("gradcheck", "gradgradcheck"):
        _assert_ran(_registry.OPS[op.backward], backend)


def check_gradcheck(op, backend, device):
    _kit_check("gradcheck", op, backend, device)


def check_gradgradcheck(op, backend, device):
    # fast mode (random projections): the Triton interpreter makes the full Jacobians cost a minute
    _kit_check("gradgradcheck", op, backend, device)


def check_vmap(op, backend, device):
    _kit_check("vmap", op, backend, device)


def check_jvp(op, backend, device):
    _kit_check("jvp", op, backend, device)


def check_opcheck(op, backend, device):
    _kit_check("opcheck", op, backend, device)


def check_compile(op, backend, device):
    _skip_unless_runs(backend, device)
    args = _small(op, backend, device, grad=False)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: op.overload(*a), fullgraph=True, dynamic=True, backend="aot_eager")
    mutated = op.mutated()
    if mutated:
        eager_args = _convert(op, args, device, F64, False)
        with _forced(backend):
            op.overload(*eager_args)
            fn(*args)
        _assert_ran(op, backend)
        for i in mutated:
            assert_rel(args[i], eager_args[i], F64)
        return
    with _forced(backend):
        y = fn(*args)
        _assert_ran(op, backend)
        expected = op.overload(*args)
    for a, b in zip(testing.outputs(y), testing.outputs(expected)):
        assert_rel(a, b, F64)


CHECK_FNS = {"reference": check_reference, "gradcheck": check_gradcheck, "gradgradcheck": check_gradgradcheck,
             "vmap": check_vmap, "jvp": check_jvp, "opcheck": check_opcheck, "compile": check_compile}


def check_forced_undeclared_raises(op):
    """A forced backend the op does not declare (or, when it declares all, one that cannot run on CPU
    tensors) raises BackendError naming the op; with fallback=True the device default runs."""
    args = _convert(op, _samples(op)[0], "cpu", F64, False)
    missing = [b for b in _backend.BACKENDS if b not in op.kernels]
    forced = missing[0] if missing else "cuda"
    with specops.backend(forced), pytest.raises(_registry.BackendError, match=f"{op.qualname}: backend {forced!r}"):
        op.overload(*_convert(op, args, "cpu", F64, False))
    with specops.backend(forced, fallback=True):
        op.overload(*_convert(op, args, "cpu", F64, False))
    assert op.last == _registry.choose(op, args)
