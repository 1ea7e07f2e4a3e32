"""kron_matmul and kron: every CPU-runnable backend against torch.kron + matmul in float64."""
import functools
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU_BACKENDS, assert_rel

import specops

# Factor shapes (p_i, q_i): k = 1..5, sizes 1, primes, non-square, SODA's 640 = 8 x 8 x 10, 64x64.
FACTOR_SHAPES = [
    [(3, 5)],
    [(64, 64)],
    [(7, 2), (5, 1)],
    [(1, 1), (2, 2)],
    [(2, 2), (3, 5), (4, 4)],
    [(8, 8), (8, 8), (10, 10)],
    [(2, 3), (3, 2), (1, 4), (5, 1)],
    [(2, 2), (3, 1), (1, 3), (2, 2), (3, 3)],
]
BATCHES = [(), (3,), (2, 3)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _ids(shapes):
    return "x".join(f"{p}.{q}" for p, q in shapes)


def _inputs(shapes, batch, group, dtype, requires_grad=False):
    lead = (group,) if group else ()
    P = math.prod(p for p, _ in shapes)
    x = torch.randn(*lead, *batch, P, dtype=dtype, requires_grad=requires_grad)
    fs = [torch.randn(*lead, p, q, dtype=dtype, requires_grad=requires_grad) for p, q in shapes]
    return x, fs


def _oracle(x, fs):
    """x @ kron(factors) in float64 with torch.kron, per group for grouped factors."""
    x, fs = x.double(), [f.double() for f in fs]
    if fs[0].dim() == 3:
        return torch.stack([_oracle(x[g], [f[g] for f in fs]) for g in range(fs[0].shape[0])])
    return x @ functools.reduce(torch.kron, fs)


def _check_against_oracle(x, fs, dtype):
    """kron_matmul and its gradients (random grad_y) against the float64 oracle; returns y."""
    y = specops.kron_matmul(x, fs)
    assert y.dtype == dtype
    assert_rel(y, _oracle(x, fs), dtype)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *fs], gy)
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in fs]
    ref = torch.autograd.grad(_oracle(x64, f64), [x64, *f64], gy.double())
    for g, r in zip(grads, ref):
        assert g.dtype == dtype
        assert_rel(g, r, dtype, scale=2.0)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [None, 1, 4], ids=["plain", "G1", "G4"])
@pytest.mark.parametrize(
    "shapes,batch",
    [(s, BATCHES[i % 3]) for i, s in enumerate(FACTOR_SHAPES)],
    ids=[_ids(s) for s in FACTOR_SHAPES],
)
def test_forward_backward_match_dense(backend, shapes, batch, group, dtype):
    if backend == "triton" and math.prod(p for p, _ in shapes) >= 64 and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow: its large shapes run in fp32 only")
    if backend == "triton" and math.prod(p for p, _ in shapes) >= 512 and group:
        pytest.skip("the Triton interpreter is slow: grouped factors run on the smaller shapes")
    x, fs = _inputs(shapes, batch, group, dtype, requires_grad=True)
    _check_against_oracle(x, fs, dtype)


def test_one_row_and_empty(backend):
    fs = [torch.randn(3, 4), torch.randn(5, 2)]
    x = torch.randn(15)
    assert_rel(specops.kron_matmul(x, fs), _oracle(x, fs), torch.float32)
    empty = specops.kron_matmul(torch.randn(0, 15), fs)
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("layout", ["strided_rows", "strided_cols", "transposed_batch"])
def test_non_contiguous_x(backend, layout):
    fs = [torch.randn(4, 3), torch.randn(5, 5)]
    if layout == "strided_rows":
        x = torch.randn(14, 20)[::2]
    elif layout == "strided_cols":
        x = torch.randn(7, 40)[:, ::2]
    else:
        x = torch.randn(20, 6, 3).permute(1, 2, 0)
    assert not x.is_contiguous()
    assert_rel(specops.kron_matmul(x, fs), _oracle(x, fs), torch.float32)


@pytest.mark.parametrize("need", ["x", "factors", "both"])
def test_partial_gradients(backend, need):
    x, fs = _inputs([(2, 3), (3, 2)], (5,), None, torch.float64)
    x.requires_grad_(need in ("x", "both"))
    for f in fs:
        f.requires_grad_(need in ("factors", "both"))
    specops.kron_matmul(x, fs).sum().backward()
    assert (x.grad is not None) == (need in ("x", "both"))
    assert all((f.grad is not None) == (need in ("factors", "both")) for f in fs)


@pytest.mark.parametrize("group", [None, 3])
@pytest.mark.parametrize("shapes", [[(3, 2)], [(2, 3), (1, 2), (3, 3)]], ids=_ids)
def test_gradcheck(backend, shapes, group):
    if backend == "triton" and group and len(shapes) > 1:
        pytest.skip("the Triton interpreter is slow: grouped gradcheck runs on one factor")
    x, fs = _inputs(shapes, (4,), group, torch.float64, requires_grad=True)
    # The interpreter runs one program at a time: its Jacobian is checked along random directions here
    # (fast mode); tests/test_ops.py checks it column by column on a smaller case.
    assert torch.autograd.gradcheck(lambda x, *fs: specops.kron_matmul(x, fs), (x, *fs),
                                    fast_mode=backend == "triton")


def test_opcheck():
    for group in (None, 2):
        x, fs = _inputs([(2, 3), (3, 2)], (4,), group, torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.specops.kron_matmul, (x, fs))
        gy = torch.randn(*x.shape[:-1], 6, dtype=torch.float64)
        for need_x, need_f in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(
                torch.ops.specops.kron_matmul_backward, (gy, x.detach(), [f.detach() for f in fs], need_x, need_f)
            )
        torch.library.opcheck(torch.ops.specops.kron, ([f.detach() for f in fs],))


def test_compile_fullgraph():
    x, fs = _inputs([(2, 3), (4, 4), (3, 1)], (5,), None, torch.float32, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, a, b, c):
        return (specops.kron_matmul(x, [a, b, c]) ** 2).sum()

    loss = step(x, *fs)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in fs]
    ref = (_oracle(x64, f64) ** 2).sum()
    ref.backward()
    assert_rel(loss, ref, torch.float32)
    for a, b in zip([x, *fs], [x64, *f64]):
        assert_rel(a.grad, b.grad, torch.float32, scale=2.0)


@pytest.mark.parametrize("group", [None, 3])
def test_kron_materialised(group):
    shapes = [(2, 3), (1, 2), (3, 3)]
    _, fs = _inputs(shapes, (), group, torch.float64)
    ref = specops.kron_reference(fs)
    assert ref.shape == ((group,) if group else ()) + (6, 18)
    assert torch.equal(specops.kron(fs), ref)
    x = torch.randn(*((group,) if group else ()), 4, 6, dtype=torch.float64)
    assert_rel(specops.kron_matmul(x, fs), x @ specops.kron(fs), torch.float64)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(6), []), "non-empty"),
        (lambda: (torch.randn(6), [torch.randn(6)]), "2-D"),
        (lambda: (torch.randn(6), [torch.randn(2, 3), torch.randn(1, 3, 3)]), "factors\\[1\\]"),
        (lambda: (torch.randn(4, 7), [torch.randn(2, 2), torch.randn(3, 3)]), "2 x 3 = 6"),
        (lambda: (torch.randn(6), [torch.randn(2, 2), torch.randn(3, 3, dtype=torch.float64)]), "dtype"),
        (lambda: (torch.randn(6, dtype=torch.float64), [torch.randn(6, 6)]), "dtype"),
        (lambda: (torch.randn(3, 5, 6), [torch.randn(2, 2, 2), torch.randn(2, 3, 3)]), "G=2"),
        (lambda: (torch.randn(2, 6), [torch.randn(2, 2, 2), torch.randn(3, 3, 3)]), "G=3"),
        (lambda: (torch.randint(0, 3, (4, 6)), [torch.ones(6, 6, dtype=torch.int64)]), "floating"),
    ],
    ids=["empty", "1d", "mixed_ndim", "product", "factor_dtype", "x_dtype", "group_count", "x_group", "int"],
)
def test_errors(make, match):
    x, fs = make()
    with pytest.raises(ValueError, match=match):
        specops.kron_matmul(x, fs)


def test_errors_kron():
    with pytest.raises(ValueError, match="non-empty"):
        specops.kron([])
    with pytest.raises(ValueError, match="factors\\[1\\]"):
        specops.kron([torch.randn(2, 2), torch.randn(2)])


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_import_is_lean_and_works_without_extension():
    code = (
        "import torch, specops\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(specops.available_backends()['cpp'])\n"
        "x, a = torch.randn(3, 4), torch.randn(4, 2)\n"
        "assert torch.allclose(specops.kron_matmul(x, [a]), x @ a, atol=1e-6)\n"
    )
    out = _run(code, SPECOPS_NO_EXT="1")
    assert out.returncode == 0, out.stderr
    assert "SPECOPS_NO_EXT" in out.stdout


def test_env_var_and_context_manager_choose_backend():
    from types import SimpleNamespace

    from specops import _registry

    op = _registry.OPS["kron_matmul"]
    args = (torch.randn(2, 4), [torch.randn(4, 4)])
    torch_only = SimpleNamespace(name="torch_only", qualname="specops::torch_only",
                                 kernels={"torch": _registry.Kernel(None)})
    with specops.backend("torch"):
        assert _registry.choose(op, args) == "torch"
        with specops.backend("cpp"):
            inner = _registry.choose(op, args)
    if "cpp" in CPU_BACKENDS:
        assert inner == "cpp"
        assert _registry.choose(op, args) == "cpp"  # the CPU default
    with specops.backend("cpp"):  # an op without the forced kernel: an error, or the default on request
        with pytest.raises(specops.BackendError, match="torch_only: backend 'cpp' is not implemented"):
            _registry.choose(torch_only, args)
    with specops.backend("cpp", fallback=True):
        assert _registry.choose(torch_only, args) == "torch"
    code = ("import torch, specops, specops._registry as r\n"
            "print(r.choose(r.OPS['kron_matmul'], (torch.randn(2, 4), [torch.randn(4, 4)])))")
    out = _run(code, SPECOPS_BACKEND="torch")
    assert out.stdout.strip() == "torch", out.stderr
    out = _run(code, SPECOPS_BACKEND="triton", TRITON_INTERPRET="0")  # triton cannot run on CPU tensors
    assert out.returncode != 0 and "backend 'triton' cannot run on cpu" in out.stderr
    out = _run(code, SPECOPS_BACKEND="triton", TRITON_INTERPRET="0", SPECOPS_BACKEND_FALLBACK="1")
    assert out.stdout.strip() == ("cpp" if "cpp" in CPU_BACKENDS else "torch"), out.stderr
    with pytest.raises(ValueError, match="unknown backend"):
        with specops.backend("fortran"):
            pass


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_on_cpu_needs_the_interpreter():
    code = (
        "import torch, specops\n"
        "with specops.backend('triton'):\n"
        "    specops.kron_matmul(torch.randn(2, 4), [torch.randn(4, 4)])\n"
    )
    out = _run(code, TRITON_INTERPRET="0")
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr


def test_available_backends_reports_every_backend():
    report = specops.available_backends()
    assert set(report) == {"torch", "cpp", "triton", "cuda"}
    assert report["torch"].startswith("available")
    assert "CUDA tensors" in report["cuda"] or report["cuda"].startswith("available")


def test_large_rows_cross_blocks(backend):
    """Many rows (several row blocks, a ragged last one) and a 4-factor product."""
    if backend == "triton":
        pytest.skip("covered by the smaller cases; the interpreter is slow")
    x, fs = _inputs([(4, 4), (2, 3), (3, 2), (5, 5)], (203,), None, torch.float32, requires_grad=True)
    assert _check_against_oracle(x, fs, torch.float32).shape == (203, 120)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_outputs_written_past_the_cache(dtype):
    """cpp writes outputs of 16-32 MiB with non-temporal stores (a ragged last row block too):
    y, and grad_x from the grad_x-only and the full backward, against the float64 torch chain."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp backend not built")
    rows = (17 << 20) // (1280 * dtype.itemsize) + 5
    x = torch.randn(rows, 1280, dtype=dtype, requires_grad=True)
    fs = [torch.randn(p, p, dtype=dtype, requires_grad=True) for p in (4, 16, 20)]
    gy = torch.randn(rows, 1280, dtype=dtype)
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in fs]
    with specops.backend("torch"):
        y_ref = specops.kron_matmul(x64, f64)
        grads_ref = torch.autograd.grad(y_ref, [x64, *f64], gy.double())
    with specops.backend("cpp"):
        y = specops.kron_matmul(x, fs)
        gx_only = torch.autograd.grad(y, x, gy, retain_graph=True)[0]
        grads = torch.autograd.grad(y, [x, *fs], gy)
    assert_rel(y, y_ref, dtype)
    assert_rel(gx_only, grads_ref[0], dtype)
    for g, r in zip(grads, grads_ref):
        assert_rel(g, r, dtype, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_16bit_rounds_once_as_torch_does(dtype):
    """cpp computes a 16-bit call in fp32 from its widened inputs and rounds each output once, as
    torch's .to does: bit-equal to its own fp32 call on the same values rounded with .to(dtype), NaN,
    inf and a value halfway between two 16-bit numbers included, on ragged rows and columns."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("cpp backend not built")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5 * 7 * 3, generator=gen).to(dtype)
    x[3, 4], x[5, 9], x[30, 0] = float("nan"), float("inf"), -float("inf")
    fs = [torch.randn(p, q, generator=gen).to(dtype) for p, q in ((5, 4), (7, 7), (3, 5))]
    gy = torch.randn(37, 4 * 7 * 5, generator=gen).to(dtype)
    with specops.backend("cpp"):
        y = specops.kron_matmul(x, fs)
        y32 = specops.kron_matmul(x.float(), [f.float() for f in fs])
        xr, *fr = (t.requires_grad_() for t in (x.clone(), *fs))
        grads = torch.autograd.grad(specops.kron_matmul(xr, fr), [xr, *fr], gy)
        xr32, *fr32 = (t.float().requires_grad_() for t in (x, *fs))
        grads32 = torch.autograd.grad(specops.kron_matmul(xr32, fr32), [xr32, *fr32], gy.float())
    assert y.isnan().any() and y.isinf().any()
    # (1 + eps) * 1.5 = 1.5 + 1.5 eps, halfway between 1.5 + eps and 1.5 + 2 eps: to even, 1.5 + 2 eps
    eps = torch.finfo(dtype).eps
    with specops.backend("cpp"):
        tie = specops.kron_matmul(torch.ones(20, 1, dtype=dtype), [torch.tensor([[1 + eps]], dtype=dtype),
                                                                      torch.tensor([[1.5]], dtype=dtype)])
    assert (tie == 1.5 + 2 * eps).all()
    for got, want in zip((y, *grads), (y32, *grads32)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0, equal_nan=True)
