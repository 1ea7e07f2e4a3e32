"""Second derivatives, vmap and per-sample gradients beyond the registry matrix (tests/matrix.py runs
gradgradcheck and vmap-against-a-loop on every op and backend): kron_matmul's own batching rule over
x, over the factors and over grouped factors, a Hessian-vector product through the cpp kernel, the
refusal of forward-mode AD, and per-sample gradients through torch.func."""
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


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    """torch.library registers no jvp: torch.func.jvp would return a zero tangent and forward_ad none."""
    x = torch.randn(3, 6, dtype=F64)
    fs = [torch.randn(2, 2, dtype=F64), torch.randn(3, 3, dtype=F64)]
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda f: specops.kron_matmul(x, [f, fs[1]]), (fs[0],), (fs[0],))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        specops.kron_matmul(forward_ad.make_dual(x, torch.ones_like(x)), fs)
    torch.func.vmap(specops.kron_matmul, in_dims=(0, None))(x[None].expand(2, -1, -1), fs)  # vmap alone is fine


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


def test_per_sample_gradients_of_lokr_through_torch_func():
    """vmap(grad) of a LoKr adapter's loss over samples equals one autograd.grad per sample. (Adapters
    whose hot path calls a registered op, e.g. SODA's kron_matmul, cannot run under torch.func.grad:
    torch.library's autograd is not functorch-compatible in torch 2.13.)"""
    method, options = "lokr", {"rank": 2}
    torch.manual_seed(3)
    base = nn.Linear(12, 8).double()
    layer = adapters.make_adapter(method, base, **options)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    assert params
    xs = torch.randn(5, 3, 12, dtype=F64)

    def loss(ps, x):
        return torch.func.functional_call(layer, ps, (x,)).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        want = torch.autograd.grad(loss(leaves, xs[i]), list(leaves.values()))
        for (n, w) in zip(leaves, want):
            torch.testing.assert_close(got[n][i], w, rtol=1e-10, atol=1e-12, msg=n)
