"""Stiefel optimisers: fused vs per-parameter paths, manifold kept, Procrustes, optimiser features."""
import contextlib
import copy
import gc
import types

import pytest
import torch
from helpers import CPU_BACKENDS
from torch import nn

import specops
from specops import optim
from specops.adapters import make_adapter
from specops.sdxl import param_groups
from specops.stiefel import orthogonality_error, orthogonality_error_reference

OPTIMIZERS = {
    "StiefelSGD": (optim.StiefelSGD, dict(lr=5e-3, momentum=0.9)),
    "CayleyAdam": (optim.CayleyAdam, dict(lr=1e-2)),
    "StiefelAdam": (optim.StiefelAdam, dict(lr=1e-2)),
}
STEP_OP = {"StiefelSGD": "stiefel_sgd_step", "CayleyAdam": "cayley_adam_step", "StiefelAdam": "stiefel_adam_step"}
# Mixed shapes: square, tall, 1x1, repeated shapes (stacked), a batched (2, 5, 4) parameter.
MIXED = [(7, 3), (7, 3), (16, 16), (1, 1), (2, 2), (2, 2), (64, 64), (100, 20), (2, 5, 4)]
# The Triton interpreter runs every program in Python: a smaller mixed set.
MIXED_TRITON = [(7, 3), (7, 3), (2, 4, 4)]  # tall, stacked; square, batched (per-parameter step)


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


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
        assert specops.last_backend(STEP_OP[name]) == backend
        plain.step()
    assert _max_diff(pa, pb) <= 1e-5
    for p in pa:  # the reference: the torch-only op would refuse the forced backend
        assert orthogonality_error_reference(p.detach()).max() <= 1e-5


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
    for it in range(3):
        _set_grads([pa], gen)
        if it == 1:
            pa[1].grad = None  # the fused state is then stepped through a gather of its rows
        a.step()
    pb = [p.detach().clone().requires_grad_() for p in pa]
    b = cls(pb, fused=dst_fused, **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for it in range(5):
        _set_grads([pa, pb], gen)
        if it == 2:
            pa[0].grad = pb[0].grad = None
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
def test_triton_refuses_beyond_its_tile():
    """n > 32 does not fit one program's register tile: forced triton refuses the stack (BackendError);
    with fallback=True the device default steps it, and the step is right."""
    pa, pb = _params([(260, 3)]), _params([(260, 3)])
    a, b = optim.StiefelAdam(pa, lr=1e-2), optim.StiefelAdam(pb, lr=1e-2, fused=False)
    gen = torch.Generator().manual_seed(11)
    _set_grads([pa], gen)
    with specops.backend("triton"), pytest.raises(specops.BackendError, match=r"260 x 3 matrices exceed"):
        a.step()
    assert a.state[pa[0]]["step"].item() == 0  # refused before anything was written
    default = "cpp" if "cpp" in CPU_BACKENDS else "torch"
    with specops.backend("triton", fallback=True):
        for _ in range(3):
            _set_grads([pa, pb], gen)
            a.step()
            assert specops.last_backend("stiefel_adam_step") == default
            b.step()
    assert _max_diff(pa, pb) <= 1e-5


# ----------------------------------------------------------------------------- non-finite gradients

# Stacked shapes and a batched parameter: a skip is per parameter, one bad matrix skips all of (2, 8, 4).
FINITE_SHAPES = [(8, 4), (8, 4), (8, 4), (16, 8), (16, 8), (2, 8, 4)]
BAD = {1: (0, 0), 5: (1, 3, 2)}  # parameter -> the gradient entry made non-finite (5: its second matrix)
PATHS = ["plain"] + [f"fused-{b}" for b in CPU_BACKENDS if b != "triton"]  # the interpreter adds nothing here


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), i


def _run_with_bad_step(name, path, treatment, skip=True):
    """Six steps of random gradients; at step 3 the BAD parameters get `treatment`: a NaN/Inf entry
    ("nan"/"inf"), no gradient ("none") or their finite one ("clean"). Returns the parameters, the
    optimiser and snapshots (parameters, state) from before and after step 3."""
    cls, kw = OPTIMIZERS[name]
    params = _params(FINITE_SHAPES)
    opt = cls(params, fused=path != "plain", skip_nonfinite=skip, **kw)
    gen = torch.Generator().manual_seed(12)
    with specops.backend(path.removeprefix("fused-")) if path != "plain" else contextlib.nullcontext():
        for it in range(6):
            _set_grads([params], gen)
            if it == 3:
                before = _snapshot(params, opt)
                for i, idx in BAD.items():
                    if treatment == "none":
                        params[i].grad = None
                    elif treatment != "clean":
                        params[i].grad[idx] = float(treatment)
            opt.step()
            if it == 3:
                at_bad = _snapshot(params, opt)
    return params, opt, before, at_bad


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skip_nonfinite_leaves_parameter_and_state(name, path, bad):
    params, opt, before, at_bad = _run_with_bad_step(name, path, bad)
    # the bad parameters and their state are bit-identical across the bad step
    for i in BAD:
        assert torch.equal(at_bad[0][i], before[0][i])
        for k, v in before[1][i].items():
            assert torch.equal(at_bad[1][i][k], v), (i, k)
    assert opt.skipped_steps == len(BAD)
    assert all(opt.skipped_by_param[params[i]] == 1 for i in BAD)
    assert all(params[i] not in opt.skipped_by_param for i in range(len(params)) if i not in BAD)
    # a skip is exactly a step without those gradients, and training goes on from there ...
    ref_params, ref_opt, _, _ = _run_with_bad_step(name, path, "none", skip=False)
    _assert_same(_snapshot(params, opt), _snapshot(ref_params, ref_opt))
    # ... and the other parameters step as in a clean run
    _, _, _, clean = _run_with_bad_step(name, path, "clean", skip=False)
    for i in range(len(params)):
        if i not in BAD:
            assert torch.equal(at_bad[0][i], clean[0][i]), i
            assert all(torch.equal(at_bad[1][i][k], clean[1][i][k]) for k in clean[1][i]), i


@pytest.mark.parametrize("path", ["plain", "fused-torch"])
def test_nonfinite_steps_by_default(path):
    """skip_nonfinite=False keeps torch.optim's behaviour: the bad gradient is stepped with."""
    params, opt, _, at_bad = _run_with_bad_step("StiefelAdam", path, "nan", skip=False)
    assert not torch.isfinite(at_bad[0][1]).all()
    assert opt.skipped_steps == 0


# ----------------------------------------------------------------------------- torch.amp.GradScaler


def _quadratic_loss(params, targets):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler(name, fused):
    """GradScaler on CPU: unscale_ sees the grads, an inf step is skipped (parameters and state
    unchanged, the scale backs off), finite steps equal plain unscaled steps."""
    cls, kw = OPTIMIZERS[name]
    shapes = [(8, 4), (8, 4), (16, 8)]
    params, ref = _params(shapes), _params(shapes)
    targets = [torch.randn(s, generator=torch.Generator().manual_seed(13)) for s in shapes]
    opt, ref_opt = cls(params, fused=fused, **kw), cls(ref, fused=fused, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # powers of two: unscaling is exact
    for it in range(4):
        opt.zero_grad()
        scaler.scale(_quadratic_loss(params, targets)).backward()
        if it == 1:
            params[2].grad[3, 5] = float("inf")
        scaler.unscale_(opt)
        if it != 1:
            ref_opt.zero_grad()
            _quadratic_loss(ref, targets).backward()
            assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref))
        before, scale = _snapshot(params, opt), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if it == 1:
            _assert_same(_snapshot(params, opt), before)
            assert scaler.get_scale() == scale / 2
        else:
            ref_opt.step()
            assert not torch.equal(params[0], before[0][0])
            assert all(torch.equal(p, r) for p, r in zip(params, ref))


def test_grad_scaler_bf16_soda_training():
    """GradScaler training of a SODA model with bf16 autocast on CPU runs and skips inf steps."""
    torch.manual_seed(14)
    head = nn.Linear(8, 8)  # a plain layer: autocast runs it in bf16
    model = nn.Sequential(make_adapter("soda-svd", nn.Linear(16, 24)), nn.GELU(),
                          make_adapter("soda-svd", nn.Linear(24, 8)), head)
    groups = param_groups(model, lr=1e-2, stiefel_lr=1e-2)
    opts = [torch.optim.AdamW([*groups.euclidean, {"params": list(head.parameters())}]),
            optim.StiefelAdam(groups.orthogonal)]
    factors = groups.orthogonal[0]["params"]
    assert len(factors) == 6
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for it in range(20):
        for o in opts:
            o.zero_grad()
        inp = x.clone()
        if it == 5:
            inp[0, 0] = float("inf")  # an overflow in the forward pass: every gradient is non-finite
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inp)
            loss = nn.functional.mse_loss(out.float(), y)
        assert out.dtype == torch.bfloat16
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        for o in opts:
            scaler.step(o)
        scaler.update()
        changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        if it == 5:
            assert not torch.isfinite(loss)
            assert not any(changed)  # every optimiser skipped the step
        else:
            losses.append(loss.item())
            assert all(c for c, p in zip(changed, model.parameters()) if p.requires_grad)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for f in factors:
        assert orthogonality_error(f.detach().double()) <= 1e-5


# ----------------------------------------------------------------------------- state memory


def _reachable_tensors(root):
    """Every tensor reachable from `root` through containers and plain objects (not modules,
    types or functions)."""
    seen, out, todo = set(), [], [root]
    skip = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
        else:
            todo.extend(gc.get_referents(o))
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_state_memory_equals_live_state(name):
    """Gradients on changing subsets of the parameters (and across two groups of one shape): the
    optimiser holds one copy of each parameter's state, its state entries are that copy, and it
    steps like the per-parameter path."""
    cls, kw = OPTIMIZERS[name]
    shapes = [(8, 4)] * 5 + [(16, 8)] * 3 + [(2, 8, 4)] * 2
    pa, pb = _params(shapes), _params(shapes)
    lr2 = dict(kw, lr=kw["lr"] / 2)
    fused = cls([{"params": pa[:7]}, {"params": pa[7:], **lr2}], fused=True, **kw)
    plain = cls([{"params": pb[:7]}, {"params": pb[7:], **lr2}], fused=False, **kw)
    gen = torch.Generator().manual_seed(15)
    for _ in range(30):
        _set_grads([pa, pb], gen)
        drop = torch.rand(len(shapes), generator=gen) < 0.4
        for i in drop.nonzero().flatten().tolist():
            pa[i].grad = pb[i].grad = None
        fused.step()
        plain.step()
    assert _max_diff(pa, pb) <= 1e-5
    live = sum(v.numel() * v.element_size() for st in fused.state.values() for v in st.values())
    assert live == sum(v.numel() * v.element_size() for st in plain.state.values() for v in st.values())
    not_state = {t.untyped_storage().data_ptr() for p in pa for t in (p, p.grad) if t is not None}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _reachable_tensors(fused)}
    held = sum(n for ptr, n in storages.items() if ptr not in not_state)
    assert held == live, (held, live)
