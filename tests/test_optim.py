"""Stiefel optimisers: fused vs per-parameter paths, manifold kept, Procrustes, optimiser features."""
import copy

import pytest
import torch
from helpers import CPU_BACKENDS

import specops
from specops import optim
from specops.stiefel import orthogonality_error

OPTIMIZERS = {
    "StiefelSGD": (optim.StiefelSGD, dict(lr=5e-3, momentum=0.9)),
    "CayleyAdam": (optim.CayleyAdam, dict(lr=1e-2)),
    "StiefelAdam": (optim.StiefelAdam, dict(lr=1e-2)),
}
# Mixed shapes: square, tall, 1x1, repeated shapes (stacked), a batched (2, 5, 4) parameter.
MIXED = [(7, 3), (7, 3), (16, 16), (1, 1), (2, 2), (2, 2), (64, 64), (100, 20), (2, 5, 4)]
# The Triton interpreter runs every program in Python: a smaller mixed set.
MIXED_TRITON = [(7, 3), (7, 3), (2, 4, 4)]  # tall, stacked; square, batched (per-parameter step)


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: on a loaded 2-core machine, OpenMP barriers make every small torch
    GEMM of the per-parameter path take milliseconds. test_cpp_threads_agree covers threading."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(shapes, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(s, generator=g, dtype=torch.float64))[0].to(dtype).requires_grad_()
            for s in shapes]


def _set_grads(params_list, gen, scale=1.0):
    for ps in zip(*params_list):
        gr = scale * torch.randn(ps[0].shape, generator=gen, dtype=ps[0].dtype)
        for p in ps:
            p.grad = gr.clone()


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- acceptance 3


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_matches_per_parameter(backend, name):
    cls, kw = OPTIMIZERS[name]
    shapes = MIXED_TRITON if backend == "triton" else MIXED
    pa, pb = _params(shapes), _params(shapes)
    # two groups with equal hyper-parameters: the fused path stacks across them
    fused = cls([{"params": pa[::2]}, {"params": pa[1::2]}], fused=True, **kw)
    plain = cls([{"params": pb[::2]}, {"params": pb[1::2]}], fused=False, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(100):
        _set_grads([pa, pb], gen)
        fused.step()  # the `backend` fixture forces the fused op's kernel
        plain.step()
    assert _max_diff(pa, pb) <= 1e-5
    for p in pa:
        assert orthogonality_error(p.detach().double()).max() <= 1e-5


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cpp_threads_agree(name):
    """The cpp kernel splits the stack over threads; the result must not depend on how."""
    cls, kw = OPTIMIZERS[name]
    shapes = [(5, 5)] * 7 + [(12, 4)] * 5
    pa, pb = _params(shapes), _params(shapes)
    a, b = cls(pa, **kw), cls(pb, **kw)
    gen = torch.Generator().manual_seed(10)
    with specops.backend("cpp"):
        for _ in range(5):
            _set_grads([pa, pb], gen)
            a.step()
            torch.set_num_threads(2)
            b.step()
            torch.set_num_threads(1)
    assert _max_diff(pa, pb) == 0


# ----------------------------------------------------------------------------- acceptance 2


# Steps of moderate size (the accumulated motion is checked): the point is 10,000 of them.
LONG_RUN = {
    "StiefelSGD": (dict(lr=1e-2, momentum=0.9), 1e-2),  # (hyper-parameters, gradient scale)
    "CayleyAdam": (dict(lr=1e-2), 1.0),
    "StiefelAdam": (dict(lr=1e-3), 1.0),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_10000_steps_stay_on_manifold(name, dtype, tol):
    cls = OPTIMIZERS[name][0]
    kw, scale = LONG_RUN[name]
    shapes = [(64, 64), (256, 16)]
    params = _params(shapes, dtype)
    start = [p.detach().double().clone() for p in params]
    opt = cls(params, **kw)  # fused, default backend (cpp when built)
    gen = torch.Generator().manual_seed(3)
    grads = [scale * torch.randn((101, *s), generator=gen, dtype=dtype) for s in shapes]
    for it in range(10_000):
        for p, g in zip(params, grads):
            p.grad = g[(it * 37) % 101]  # a prime cycle, so the sequence hardly repeats
        opt.step()
    errs = [orthogonality_error(p.detach().double()).item() for p in params]
    assert max(errs) <= tol, errs
    moved = [(p.detach().double() - s).norm().item() for p, s in zip(params, start)]
    assert min(moved) > 0.1, moved  # the steps were not negligible


# ----------------------------------------------------------------------------- acceptance 4


def _procrustes(n, p, batch, gen, cond=1.0):
    """min_X 1/2 ||A X - B||^2 over St(n, p), A (m, n) with orthonormal columns: the optimum is the
    polar factor of A^T B (||A X||^2 = p for every X), exactly."""
    m = n + 3
    A = torch.linalg.qr(torch.randn(batch, m, n, generator=gen, dtype=torch.float64))[0]
    U = torch.linalg.qr(torch.randn(batch, n, p, generator=gen, dtype=torch.float64))[0]
    Vh = torch.linalg.qr(torch.randn(batch, p, p, generator=gen, dtype=torch.float64))[0]
    s = torch.linspace(1.0, cond, p, dtype=torch.float64)
    B = A @ (U * s) @ Vh + 0.1 * torch.randn(batch, m, p, generator=gen, dtype=torch.float64)
    Us, _, Vhs = torch.linalg.svd(A.mT @ B, full_matrices=False)
    X_star = Us @ Vhs

    def f(X):
        return 0.5 * (A @ X - B).square().sum((-2, -1))

    return f, f(X_star), X_star


def _start_near_component(X_star, gen):
    """A random start in X*'s connected component: square St(n, n) = O(n) has two (det = +-1)
    and no retraction step crosses between them."""
    X = torch.linalg.qr(torch.randn(X_star.shape, generator=gen, dtype=torch.float64))[0]
    if X.shape[-1] == X.shape[-2]:
        flip = torch.linalg.det(X).sign() != torch.linalg.det(X_star).sign()
        X[..., :, 0] = torch.where(flip[..., None], -X[..., :, 0], X[..., :, 0])
    return X.requires_grad_()


# (hyper-parameters, ExponentialLR gamma, steps). CayleyAdam's scalar second moment also counts
# the normal part of G, so its tangent steps are shorter: a larger lr.
PROCRUSTES = {
    "StiefelSGD": (dict(lr=0.05, momentum=0.9), 0.99, 300),
    "CayleyAdam": (dict(lr=0.2), 0.995, 500),
    "StiefelAdam": (dict(lr=0.05), 0.99, 300),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_procrustes_reaches_optimum(name, fused):
    cls = OPTIMIZERS[name][0]
    gen = torch.Generator().manual_seed(4)
    problems = [_procrustes(8, 8, 3, gen), _procrustes(20, 5, 2, gen)]
    params = [_start_near_component(x_star, gen) for _, _, x_star in problems]
    kw, gamma, steps = PROCRUSTES[name]
    opt = cls(params, fused=fused, **kw)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)  # Adam needs a decaying lr to settle

    def closure():
        opt.zero_grad()
        loss = sum(f(X).sum() for (f, _, _), X in zip(problems, params))
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        sched.step()
    with torch.no_grad():
        for (f, fstar, _), X in zip(problems, params):
            gap = (f(X) - fstar).max().item()
            assert -1e-9 <= gap <= 1e-4, gap
            assert orthogonality_error(X).max() < 1e-12


def _steps_to(momentum, tol=1e-6, max_steps=3000):
    gen = torch.Generator().manual_seed(5)
    f, fstar, X_star = _procrustes(10, 10, 1, gen, cond=0.05)  # ill-conditioned: where momentum pays
    X = _start_near_component(X_star, gen)
    opt = optim.StiefelSGD([X], lr=0.02, momentum=momentum)
    for k in range(max_steps):
        opt.zero_grad()
        loss = f(X).sum()
        if loss.item() - fstar.item() <= tol:
            return k
        loss.backward()
        opt.step()
    return max_steps


def test_momentum_speeds_up_stiefel_sgd():
    plain, heavy = _steps_to(0.0), _steps_to(0.9)
    assert heavy < 0.5 * plain, (heavy, plain)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_momentum_changes_the_trajectory(fused):
    """Li et al.'s code never writes its momentum back; ours keeps it (projected) and uses it."""
    runs = []
    for momentum in (0.0, 0.9):
        (X,) = _params([(6, 3)], torch.float64)
        opt = optim.StiefelSGD([X], lr=0.01, momentum=momentum, fused=fused)
        gen = torch.Generator().manual_seed(6)
        for _ in range(5):
            _set_grads([[X]], gen)
            X_prev = X.detach().clone()
            opt.step()
        M = opt.state[X]["momentum_buffer"]
        # the kept buffer is W X_prev with W skew: a tangent vector at the previous point
        A = X_prev.mT @ M
        assert M.norm() > 0.1 and (A + A.mT).abs().max() < 1e-12
        runs.append(X.detach().clone())
    assert (runs[0] - runs[1]).norm() > 1e-3


# ----------------------------------------------------------------------------- optimiser features


@pytest.mark.parametrize("src_fused,dst_fused", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip(name, src_fused, dst_fused):
    cls, kw = OPTIMIZERS[name]
    shapes = [(7, 3), (7, 3), (4, 4), (2, 5, 4)]
    pa = _params(shapes)
    a = cls(pa, fused=src_fused, **kw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        _set_grads([pa], gen)
        a.step()
    pb = [p.detach().clone().requires_grad_() for p in pa]
    b = cls(pb, fused=dst_fused, **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(5):
        _set_grads([pa, pb], gen)
        a.step()
        b.step()
    assert _max_diff(pa, pb) <= 1e-6
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.allclose(sa[i][k], sb[i][k], atol=1e-6), (i, k)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_groups_none_grads_closure(fused):
    pa = _params([(5, 3), (5, 3), (5, 3)])
    before = [p.detach().clone() for p in pa]
    opt = optim.StiefelAdam([{"params": pa[:2], "lr": 1e-2}, {"params": pa[2:], "lr": 0.0}], fused=fused)
    pa[0].grad = torch.randn(5, 3)  # pa[1] has no gradient: skipped
    pa[2].grad = torch.randn(5, 3)
    loss = opt.step(lambda: torch.tensor(3.0))
    assert loss.item() == 3.0
    assert not torch.equal(pa[0], before[0])
    assert torch.equal(pa[1], before[1]) and len(opt.state[pa[1]]) == 0
    assert torch.allclose(pa[2], before[2], atol=1e-6)  # lr 0: only round-off from the retraction
    assert opt.state[pa[2]]["step"].item() == 1


def test_lr_scheduler_changes_steps():
    pa, pb = _params([(6, 2)]), _params([(6, 2)])
    a = optim.CayleyAdam(pa, lr=1e-2)
    b = optim.CayleyAdam(pb, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(b, step_size=1, gamma=0.1)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        _set_grads([pa, pb], gen)
        a.step()
        b.step()
        sched.step()
    assert b.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert _max_diff(pa, pb) > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_half_precision_params(name, dtype):
    cls, kw = OPTIMIZERS[name]
    pa = _params([(8, 8), (12, 4)], dtype)
    pb = _params([(8, 8), (12, 4)], dtype)
    fused, plain = cls(pa, fused=True, **kw), cls(pb, fused=False, **kw)
    gen = torch.Generator().manual_seed(9)
    for _ in range(10):
        _set_grads([pa, pb], gen)
        fused.step()
        plain.step()
    for p in pa:
        assert p.dtype == dtype
        assert orthogonality_error(p.detach().double()).max() < 3e-2
    assert _max_diff(pa, pb) < 3e-2


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_parameters_raise(name):
    cls = OPTIMIZERS[name][0]
    ok = torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"params'\]\[1\] has shape \(3, 5\).*n >= p"):
        cls([ok, torch.zeros(3, 5, requires_grad=True)])
    with pytest.raises(ValueError, match=r"params'\]\[0\] has shape \(4,\)"):
        cls([torch.zeros(4, requires_grad=True)])
    opt = cls([ok])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] has shape \(2, 3, 4\)"):
        opt.add_param_group({"params": [torch.zeros(2, 3, 4, requires_grad=True)]})


def test_step_ops_opcheck():
    X = torch.linalg.qr(torch.randn(4, 6, 3, dtype=torch.float64))[0].contiguous()
    G = torch.randn(4, 6, 3, dtype=torch.float64)
    step = torch.zeros(2, dtype=torch.float64)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    for be in CPU_BACKENDS:
        with specops.backend(be):
            torch.library.opcheck(torch.ops.specops.stiefel_sgd_step, (X.clone(), G, z(4, 6, 3), 0.1, 0.9, 0.5, 2, 1e-8))
            torch.library.opcheck(torch.ops.specops.cayley_adam_step,
                                  (X.clone(), G, z(4, 6, 3), z(4), step.clone(), 0.1, 0.9, 0.999, 1e-8, 0.5, 2))
            torch.library.opcheck(torch.ops.specops.stiefel_adam_step,
                                  (X.clone(), G, z(4, 3, 3), z(4, 3, 3), z(4, 6, 3), z(4, 6, 3), step.clone(), 0.1,
                                   0.9, 0.999, 1e-5))
    with pytest.raises(ValueError, match=r"step: expected a float64 \(S,\) tensor"):
        torch.ops.specops.cayley_adam_step(X.clone(), G, z(4, 6, 3), z(4), z(3), 0.1, 0.9, 0.999, 1e-8, 0.5, 2)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not available")
def test_triton_falls_back_beyond_its_tile():
    """n > 256 does not fit one program's register tile: the batched torch kernel steps it."""
    pa, pb = _params([(260, 3)]), _params([(260, 3)])
    a, b = optim.StiefelAdam(pa, lr=1e-2), optim.StiefelAdam(pb, lr=1e-2, fused=False)
    gen = torch.Generator().manual_seed(11)
    with specops.backend("triton"):
        for _ in range(3):
            _set_grads([pa, pb], gen)
            a.step()
            b.step()
    assert _max_diff(pa, pb) <= 1e-5
