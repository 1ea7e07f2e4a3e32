"""One matrix of a batch never affects another: a NaN or Inf fed into one slot of a batch leaves
every other slot of every output bit-identical (torch.equal) to a clean run of the same batch.

Covered: the three fused Stiefel optimiser steps (the registered ops and the optimisers that call
them) on every CPU backend in fp32 and fp64, and every op that takes a batch of independent
matrices, rows or layers: grouped kron_matmul / kron, kron_matmul and scaled_matmul rows, the
spectral layers' token rows, zip_lora_linear rows, merger_penalty layers, and the Stiefel ops
(cayley, retract, project, orthogonality_error) over batch dims, forward and backward.
"""
import math

import pytest
import torch
from helpers import CPU_BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

import specops
from specops import _registry, stiefel
from specops.optim import CayleyAdam, StiefelAdam, StiefelSGD

POISONS = (float("nan"), float("inf"), float("-inf"))
# The Triton interpreter's numpy warns about the poisoned program's NaN arithmetic.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("one_thread")]
DTYPES = (torch.float64, torch.float32)


def _equal_except(clean, dirty, dim, slot, what):
    """Every slot but `slot` along `dim` bit-identical."""
    assert clean.shape == dirty.shape, what
    keep = torch.tensor([i for i in range(clean.shape[dim]) if i != slot], dtype=torch.long)
    a, b = clean.index_select(dim, keep), dirty.index_select(dim, keep)
    assert torch.equal(a, b), f"{what}: slot {slot}'s non-finite input changed other slots (max |diff| " \
                              f"{(a.double() - b.double()).abs().nan_to_num(math.inf).max().item():.3g})"


def _poison(t, dim, gen, value):
    """A copy of t with one random element of one random slot along `dim` set to `value`."""
    t = t.detach().clone()
    idx = [int(torch.randint(s, (1,), generator=gen)) for s in t.shape]
    t[tuple(idx)] = value
    return t, idx[dim]


# ----------------------------------------------------------------------------- fused steps (ops)


def _step_state(op, B, n, p, dtype, S):
    """Zero state as the optimisers create it; step (S,) float64."""
    z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    step = torch.zeros(S, dtype=torch.float64)
    if op == "stiefel_sgd_step":
        return {"M": z(B, n, p)}
    if op == "cayley_adam_step":
        return {"m": z(B, n, p), "v": z(B), "step": step}
    tall = n > p
    return {"Y": z(B, p, p), "P": z(B, p, p), "V": z(B, n, p) if tall else z(0), "Q": z(B, n, p) if tall else z(0),
            "step": step}


def _call_step(op, X, G, s):
    if op == "stiefel_sgd_step":
        torch.ops.specops.stiefel_sgd_step(X, G, s["M"], 0.05, 0.9, 0.5, 2, 1e-8)
    elif op == "cayley_adam_step":
        torch.ops.specops.cayley_adam_step(X, G, s["m"], s["v"], s["step"], 0.05, 0.9, 0.999, 1e-8, 0.5, 2)
    else:
        torch.ops.specops.stiefel_adam_step(X, G, s["Y"], s["P"], s["V"], s["Q"], s["step"], 0.01, 0.9, 0.999,
                                            1e-5)


STEP_OPS = ("stiefel_sgd_step", "cayley_adam_step", "stiefel_adam_step")


def _run_steps(op, X0, grads, dtype, backend):
    """Two steps of `op` on the (B, n, p) stack; returns X and every state tensor with a batch dim."""
    B, n, p = X0.shape
    X = X0.clone()
    s = _step_state(op, B, n, p, dtype, B)
    with specops.backend(backend):
        for G in grads:
            _call_step(op, X, G, s)
    assert specops.last_backend(op) == backend
    return {"X": X, **{k: v for k, v in s.items() if v.numel() and k != "step"}}


def _check_step_isolation(op, B, n, p, dtype, backend, seed, value):
    gen = torch.Generator().manual_seed(seed)
    X0 = torch.linalg.qr(torch.randn(B, n, p, generator=gen, dtype=torch.float64))[0].to(dtype).contiguous()
    grads = [torch.randn(B, n, p, generator=gen, dtype=dtype) for _ in range(2)]
    clean = _run_steps(op, X0, grads, dtype, backend)
    g0, slot = _poison(grads[0], 0, gen, value)
    dirty = _run_steps(op, X0, [g0, grads[1]], dtype, backend)
    assert not all(t[slot].isfinite().all() for t in dirty.values()), "the poison did not reach the step"
    for k in clean:
        _equal_except(clean[k], dirty[k], 0, slot, f"{op} {backend} {n}x{p} {dtype} {value}: {k}")


# 40x6 and 8x8 (fp32) are the widths whose padded rows exposed the CPU kernel's scratch reuse;
# odd primes; the Triton kernels take n <= 32, p <= 16 (they refuse 40x6).
STEP_SHAPES = [(40, 6), (8, 8), (13, 5), (31, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", STEP_OPS)
def test_fused_step_isolates_slots(backend, op, dtype):
    supports = _registry.OPS[op].kernels[backend].supports
    for i, (n, p) in enumerate(STEP_SHAPES):
        if supports is not None and supports(torch.empty(3, n, p)) is not None:
            with pytest.raises(specops.BackendError, match="refuses these inputs"):
                _check_step_isolation(op, 3, n, p, dtype, backend, seed=i, value=POISONS[i % 3])
            continue
        _check_step_isolation(op, 3, n, p, dtype, backend, seed=i, value=POISONS[i % 3])


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(STEP_OPS), dtype=st.sampled_from(DTYPES), n=st.integers(1, 48),
       p_frac=st.floats(0.0, 1.0), B=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       value=st.sampled_from(POISONS))
def test_cpp_step_isolates_slots_any_shape(op, dtype, n, p_frac, B, seed, value):
    """The C++ kernels (one scratch per thread, reused across matrices) over random shapes."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("the C++ extension is not built")
    p = max(1, round(p_frac * n))
    _check_step_isolation(op, B, n, p, dtype, "cpp", seed, value)


# ----------------------------------------------------------------------------- the optimisers


OPTIMISERS = {"StiefelSGD": (StiefelSGD, "stiefel_sgd_step"), "CayleyAdam": (CayleyAdam, "cayley_adam_step"),
              "StiefelAdam": (StiefelAdam, "stiefel_adam_step")}


def _repro(name, dtype, backend, nan, shape):
    """Two parameters of `shape` stepped together; the first one's gradient has a NaN when `nan`."""
    cls, op = OPTIMISERS[name]
    torch.manual_seed(0)
    X = [torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0].to(dtype).requires_grad_() for _ in range(2)]
    opt = cls(X, lr=0.05)
    X[0].grad = torch.randn(shape, dtype=dtype)
    if nan:
        X[0].grad[0, 0] = float("nan")
    X[1].grad = torch.randn(shape, dtype=dtype)
    with specops.backend(backend):
        opt.step()
    assert specops.last_backend(op) == backend
    return X[1].detach(), opt.state[X[1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMISERS)
def test_nan_gradient_leaves_other_parameter_alone(backend, name, dtype):
    """A NaN in one parameter's gradient: the other parameter of the same fused launch, and its
    state, are finite and exactly what a clean step gives. 40 x 6 (the cpp kernel's padded rows);
    the Triton kernels, which refuse n > 32, step 24 x 6."""
    shape = (24, 6) if backend == "triton" else (40, 6)
    x_clean, st_clean = _repro(name, dtype, backend, nan=False, shape=shape)
    x_dirty, st_dirty = _repro(name, dtype, backend, nan=True, shape=shape)
    assert x_dirty.isfinite().all()
    assert torch.equal(x_dirty, x_clean)
    for k, v in st_clean.items():
        assert st_dirty[k].isfinite().all(), k
        assert torch.equal(st_dirty[k], v), k


# ----------------------------------------------------------------------------- batched ops


def _weights(outputs, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs]


def _forward_backward(fn, inputs, grad_names):
    """fn's outputs and the gradients of a fixed random projection of them w.r.t. grad_names."""
    leaves = {k: (v.clone().requires_grad_() if k in grad_names else v) for k, v in inputs.items()}
    outs = fn(leaves)
    loss = sum((o * w).sum() for o, w in zip(outs, _weights(outs)))
    grads = torch.autograd.grad(loss, [leaves[k] for k in grad_names]) if grad_names else []
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _check_op(fn, inputs, grad_names, target, out_dims, grad_dims, seed, values=POISONS):
    """Poison input `target` (name, slot dim) with each value; every other slot of every output
    (slot dim out_dims[i]) and gradient (grad_dims[i], None: not per-slot) must stay identical."""
    outs, grads = _forward_backward(fn, inputs, grad_names)
    name, dim = target
    gen = torch.Generator().manual_seed(seed)
    for value in values:
        bad, slot = _poison(inputs[name], dim, gen, value)
        outs2, grads2 = _forward_backward(fn, {**inputs, name: bad}, grad_names)
        assert not outs2[0].select(out_dims[0], slot).isfinite().all(), "the poison did not reach the output"
        for i, (a, b) in enumerate(zip(outs, outs2)):
            _equal_except(a, b, out_dims[i], slot, f"output {i} ({name} = {value})")
        for g_name, d, a, b in zip(grad_names, grad_dims, grads, grads2):
            if d is not None:
                _equal_except(a, b, d, slot, f"grad {g_name} ({name} = {value})")


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _point(gen, batch, n, p, dtype):
    return torch.linalg.qr(_rand(gen, *batch, n, p, dtype=torch.float64))[0].to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_kron_matmul(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    G = 3
    inputs = {"x": _rand(gen, G, 5, 12, dtype=dtype), "A": _rand(gen, G, 3, 2, dtype=dtype),
              "B": _rand(gen, G, 4, 5, dtype=dtype)}
    fn = lambda t: [specops.kron_matmul(t["x"], [t["A"], t["B"]])]  # noqa: E731
    for i, target in enumerate(["x", "A", "B"]):  # one value each: the Triton interpreter is slow
        _check_op(fn, inputs, ["x", "A", "B"], (target, 0), [0], [0, 0, 0], seed=i, values=POISONS[i:i + 1])
    kron = lambda t: [specops.kron([t["A"], t["B"]])]  # noqa: E731
    _check_op(kron, inputs, ["A", "B"], ("A", 0), [0], [0, 0], seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kron_matmul_rows(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    inputs = {"x": _rand(gen, 2, 7, 30, dtype=dtype), "A": _rand(gen, 5, 5, dtype=dtype),
              "B": _rand(gen, 6, 6, dtype=dtype)}
    fn = lambda t: [specops.kron_matmul(t["x"], [t["A"], t["B"]])]  # noqa: E731
    _check_op(fn, inputs, ["x"], ("x", 1), [1], [1], seed=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_matmul_rows_and_columns(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    inputs = {"A": _rand(gen, 9, 5, dtype=dtype), "s": _rand(gen, 5, dtype=dtype), "B": _rand(gen, 5, 11, dtype=dtype)}
    fn = lambda t: [specops.scaled_matmul(t["A"], t["s"], t["B"])]  # noqa: E731
    _check_op(fn, inputs, ["A"], ("A", 0), [0], [0], seed=0)
    _check_op(fn, inputs, ["B"], ("B", 1), [1], [1], seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in _registry.OPS["merger_penalty"].kernels])
def test_merger_penalty_layers(backend, dtype):
    """Layers are the slots: the total is non-finite, every other layer's gradient is not."""
    with specops.backend(backend):
        _merger_penalty_layers(dtype)
    assert specops.last_backend("merger_penalty_backward") == backend


def _merger_penalty_layers(dtype):
    gen = torch.Generator().manual_seed(4)
    sizes = (5, 8, 3)
    mc = [_rand(gen, n, dtype=dtype) for n in sizes]
    ms = [_rand(gen, n, dtype=dtype) for n in sizes]
    for kind in ("abs_product", "dot", "cosine"):
        for layer, value in zip(range(len(sizes)), POISONS):
            def grads(mc_list):
                leaves = [m.clone().requires_grad_() for m in mc_list + ms]
                total = specops.merger_penalty(leaves[:len(sizes)], leaves[len(sizes):], kind)
                return total, torch.autograd.grad(total, leaves)

            bad = [m.clone() for m in mc]
            bad[layer][int(torch.randint(sizes[layer], (1,), generator=gen))] = value
            (t_clean, g_clean), (t_bad, g_bad) = grads(mc), grads(bad)
            assert not t_bad.isfinite()
            for i, (a, b) in enumerate(zip(g_clean, g_bad)):
                if i % len(sizes) != layer:
                    assert torch.equal(a, b), f"{kind}: layer {layer} = {value} changed gradient {i}"


@pytest.mark.parametrize("path", ["materialise", "factored"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spectral_linear_rows(backend, dtype, path):
    gen = torch.Generator().manual_seed(5)
    out, n = 10, 12
    W = _rand(gen, out, n, dtype=dtype)
    U, S, Vh, _ = specops.decompose(W, "svd", dtype=dtype)
    L, Qh, _ = specops.decompose(W, "lq", dtype=dtype)
    rot = [_point(gen, (), k, k, dtype) for k in (3, 4)]
    inputs = {"x": _rand(gen, 2, 6, n, dtype=dtype), "delta": 0.1 * _rand(gen, min(out, n), dtype=dtype)}

    def svd(t):
        return [specops.spectral_linear(t["x"], U, S, Vh, t["delta"], rotation=rot, path=path)]

    def lq(t):
        return [specops.spectral_linear_lq(t["x"], L, Qh, t["delta"], rotation=rot, path=path)]

    for i, fn in enumerate((svd, lq)):
        _check_op(fn, inputs, ["x"], ("x", 1), [1], [1], seed=i)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zip_lora_linear_rows(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    out, n, r = 9, 11, 3
    lora = {name: _rand(gen, *shape, dtype=dtype) for name, shape in
            [("W", (out, n)), ("b", (out,)), ("Bc", (out, r)), ("Ac", (r, n)), ("mc", (n,)), ("Bs", (out, r)),
             ("As", (r, n)), ("ms", (n,))]}
    inputs = {"x": _rand(gen, 3, 4, n, dtype=dtype)}

    def fn(t):
        return [specops.zip_lora_linear(t["x"], lora["W"], lora["b"], lora["Bc"], lora["Ac"], lora["mc"],
                                        lora["Bs"], lora["As"], lora["ms"], 0.5, 2.0)]

    _check_op(fn, inputs, ["x"], ("x", 1), [1], [1], seed=0)


# ----------------------------------------------------------------------------- Stiefel ops (torch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in _registry.OPS["cayley"].kernels], indirect=True)
def test_cayley_batch(backend, dtype):  # (backend: conftest's fixture forces it)
    gen = torch.Generator().manual_seed(8)
    for n in (1, 6, 13):
        A = _rand(gen, 4, n, n, dtype=dtype)
        inputs = {"A": A - A.mT}
        _check_op(lambda t: [stiefel.cayley(t["A"])], inputs, ["A"], ("A", 0), [0], [0], seed=n)
        # an Inf pair that keeps the matrix exactly skew: the batched Cholesky path itself
        if n > 1:
            bad = inputs["A"].clone()
            bad[2, 0, 1], bad[2, 1, 0] = math.inf, -math.inf
            clean, dirty = stiefel.cayley(inputs["A"]), stiefel.cayley(bad)
            assert not dirty[2].isfinite().all()
            _equal_except(clean, dirty, 0, 2, f"cayley skew inf {n}")
    assert specops.last_backend("cayley") == backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", stiefel.RETRACTIONS)
def test_retract_batch(method, dtype):
    gen = torch.Generator().manual_seed(9)
    for n, p in [(11, 3), (6, 4), (5, 5)]:  # Woodbury (n > 2p) and dense
        X = _point(gen, (4,), n, p, dtype)
        inputs = {"X": X, "V": stiefel.project_reference(X, 0.3 * _rand(gen, 4, n, p, dtype=dtype))}
        fn = lambda t: [stiefel.retract(t["X"], t["V"], method)]  # noqa: E731
        _check_op(fn, inputs, [], ("V", 0), [0], [], seed=n)
        _check_op(fn, inputs, [], ("X", 0), [0], [], seed=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_and_orthogonality_error_batch(dtype):
    gen = torch.Generator().manual_seed(10)
    X = _point(gen, (2, 3), 9, 4, dtype)  # batch dims (2, 3): slots along dim 1
    inputs = {"X": X, "G": _rand(gen, 2, 3, 9, 4, dtype=dtype)}
    for metric in stiefel.METRICS:
        fn = lambda t: [stiefel.project(t["X"], t["G"], metric)]  # noqa: E731
        _check_op(fn, inputs, ["X", "G"], ("G", 1), [1], [1, 1], seed=0)
        _check_op(fn, inputs, ["X", "G"], ("X", 1), [1], [1, 1], seed=1)
    _check_op(lambda t: [stiefel.orthogonality_error(t["X"])], inputs, [], ("X", 1), [1], [], seed=2)
