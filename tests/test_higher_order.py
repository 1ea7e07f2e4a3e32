"""Second derivatives, vmap, forward-mode AD and per-sample gradients beyond the registry matrix
(tests/matrix.py runs gradgradcheck, vmap-against-a-loop and jvp-against-finite-differences on every op
and backend): kron_matmul's own batching rule over x, over the factors and over grouped factors, dual
tensors through registered ops, compiled double backward, a Hessian-vector product through the cpp
kernel, and per-sample gradients through torch.func."""
import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import specops
from specops import _registry, adapters

F64 = torch.float64


def _loop(fn, *batched):
    return torch.stack([fn(*[b[i] for b in batched]) for i in range(batched[0].shape[0])])


@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize("over", ["x", "factors", "both"])
def test_kron_matmul_vmap_matches_a_loop(over, grouped):
    g = torch.Generator().manual_seed(0)
    G = (2,) if grouped else ()
    x = torch.randn(4, *G, 3, 6, generator=g, dtype=F64)
    fs = [torch.randn(4, *G, 2, 3, generator=g, dtype=F64), torch.randn(4, *G, 3, 2, generator=g, dtype=F64)]
    xs = x if over != "factors" else x[0]
    fss = fs if over != "x" else [f[0] for f in fs]
    dims = (0 if over != "factors" else None, [0, 0] if over != "x" else [None, None])
    got = torch.func.vmap(specops.kron_matmul, in_dims=dims)(xs, fss)
    want = torch.stack([specops.kron_matmul(xs[i] if dims[0] == 0 else xs, [f[i] if dims[1][0] == 0 else f for f in fss])
                        for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kron_matmul_vmap_is_one_call(monkeypatch):
    """Its batching rule calls the kernel once (the grouped form), not once per batch entry."""
    op = specops.kron_matmul.op
    calls = []
    kernel = op.kernels["torch"]
    monkeypatch.setitem(op.kernels, "torch", _registry.Kernel(lambda *a: calls.append(1) or kernel.fn(*a)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    fs = [torch.randn(4, 2, 2, generator=g, dtype=F64), torch.randn(4, 3, 3, generator=g, dtype=F64)]
    with specops.backend("torch"):
        y = torch.func.vmap(specops.kron_matmul, in_dims=(None, [0, 0]))(x, fs)
    assert calls == [1] and y.shape == (4, 5, 6)


def _spectral_args(g):
    """spectral_linear's arguments with a two-factor input rotation (scaled_matmul and kron_matmul inside)."""
    U, S, Vh = torch.linalg.svd(torch.randn(5, 6, generator=g, dtype=F64), full_matrices=False)
    rot = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0] for n in (2, 3)]
    return torch.randn(4, 6, generator=g, dtype=F64), U, S, Vh, 0.1 * torch.randn(5, generator=g, dtype=F64), rot


def _spectral(x, U, S, Vh, delta, rot):
    return specops.spectral_linear(x, U, S, Vh, delta, rotation=rot)


def test_forward_ad_matches_finite_differences():
    """torch.autograd.forward_ad (dual tensors) through kron_matmul and through spectral_linear, whose
    ops are registered ones: the tangent is J·t, not dropped."""
    g = torch.Generator().manual_seed(4)
    x, U, S, Vh, delta, rot = _spectral_args(g)
    fs = [torch.randn(2, 2, generator=g, dtype=F64), torch.randn(3, 3, generator=g, dtype=F64)]
    cases = [(lambda x, f0: specops.kron_matmul(x, [f0, fs[1]]), (x, fs[0])),
             (lambda delta, r0: _spectral(x, U, S, Vh, delta, [r0, rot[1]]), (delta, rot[0]))]
    for fn, primals in cases:
        tangents = [torch.randn(p.shape, generator=g, dtype=F64) for p in primals]
        with forward_ad.dual_level():
            got = forward_ad.unpack_dual(fn(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])).tangent
        eps = 1e-6
        fd = (fn(*[p + eps * t for p, t in zip(primals, tangents)]) - fn(*[p - eps * t for p, t in zip(primals, tangents)]))
        torch.testing.assert_close(got, fd / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["kron_matmul", "spectral_linear"])
def test_compiled_double_backward(name):
    """torch.compile(fullgraph=True) of a function that takes a first derivative with create_graph;
    the second derivative, through the compiled graph, equals eager."""
    g = torch.Generator().manual_seed(5)
    if name == "kron_matmul":
        args = [torch.randn(5, 6, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64),
                torch.randn(3, 3, generator=g, dtype=F64)]
        fn = lambda x, f0, f1: specops.kron_matmul(x, [f0, f1])  # noqa: E731
    else:
        x, U, S, Vh, delta, rot = _spectral_args(g)
        args = [x, delta, *rot]
        fn = lambda x, delta, r0, r1: _spectral(x, U, S, Vh, delta, [r0, r1])  # noqa: E731

    def first(*ts):
        return torch.autograd.grad(fn(*ts).square().sum(), ts, create_graph=True)

    def second(f):
        leaves = [a.clone().requires_grad_() for a in args]
        return torch.autograd.grad(sum(t.square().sum() for t in f(*leaves)), leaves)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = second(torch.compile(first, fullgraph=True, backend="aot_eager"))
    for a, b in zip(got, second(first)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_double_backward_through_the_cpp_kernel_matches_the_reference():
    """A Hessian-vector product of Σ kron_matmul(x, F)²: the first derivative from the forced kernel,
    the second through torch ops, against autograd on the pure-torch chain."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 12, generator=g, dtype=F64, requires_grad=True)
    fs = [torch.randn(3, 2, generator=g, dtype=F64, requires_grad=True),
          torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)]
    v = [torch.randn(t.shape, generator=g, dtype=F64) for t in (x, *fs)]

    def hvp(fn):
        grads = torch.autograd.grad(fn(x, fs).square().sum(), [x, *fs], create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v)), [x, *fs])

    if not specops.available_backends("kron_matmul")["cpp"].startswith("available"):
        pytest.skip("the C++ extension is not built")
    with specops.backend("cpp"):
        got = hvp(specops.kron_matmul)
    assert specops.last_backend("kron_matmul_backward") == "cpp"
    for a, b in zip(got, hvp(specops.kron_matmul_reference)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _adapter(method, conv):
    """A small float64 adapter of `method` with perturbed trainable state, and a batch of 4 inputs."""
    torch.manual_seed(3)
    base = (nn.Conv2d(4, 6, 3, padding=1) if conv else nn.Linear(12, 8)).double()
    options = {"rank": 2} if method in ("lora", "loha", "lokr") else {"block_size": 4} if method == "boft" else {}
    if method == "ziplora":
        m, n = base.weight.shape
        lora = lambda r: (torch.randn(m, r, dtype=F64), torch.randn(r, n, dtype=F64) / n)  # noqa: E731
        options = {"content": lora(2), "style": (*lora(3), 0.7)}
    layer = adapters.make_adapter(method, base, **options)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    assert params
    xs = torch.randn(4, 2, 4, 5, 5, dtype=F64) if conv else torch.randn(4, 3, 12, dtype=F64)
    return layer, params, xs


_ADAPTER_CASES = [pytest.param(m, c, id=f"{m}-{'conv' if c else 'linear'}") for m in adapters.ADAPTER_TYPES
                  for c in (False, True) if not c or m in adapters.CONV_METHODS]


@pytest.mark.parametrize("method,conv", _ADAPTER_CASES)
def test_adapters_higher_order(method, conv):
    """Every adapter's hot path (registered ops, LoHa's own autograd.Function, torch ops): per-sample
    gradients vmap(grad) equal one autograd.grad per sample, the jvp in the trainable parameters
    equals central finite differences, and gradgradcheck passes in them."""
    layer, params, xs = _adapter(method, conv)

    def out(ps, x):
        return torch.func.functional_call(layer, ps, (x,))

    def loss(ps, x):
        return out(ps, x).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        want = torch.autograd.grad(loss(leaves, xs[i]), list(leaves.values()))
        for (n, w) in zip(leaves, want):
            torch.testing.assert_close(got[n][i], w, rtol=1e-10, atol=1e-12, msg=n)
    g = torch.Generator().manual_seed(6)
    t = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    _, jt = torch.func.jvp(lambda ps: out(ps, xs[0]), (params,), (t,))
    eps = 1e-6
    shifted = [out({n: p + s * eps * t[n] for n, p in params.items()}, xs[0]) for s in (1, -1)]
    torch.testing.assert_close(jt, (shifted[0] - shifted[1]) / (2 * eps), rtol=1e-6, atol=1e-8)
    names = list(params)
    assert torch.autograd.gradgradcheck(
        lambda *ps: out(dict(zip(names, ps)), xs[0, :1]), [params[n].clone().requires_grad_() for n in names],
        fast_mode=True)
