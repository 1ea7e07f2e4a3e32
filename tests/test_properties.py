"""Property tests: every op, on every CPU backend it implements, against its float64 reference.

Hypothesis draws shapes (sizes 1, primes, non-square, batch dims, empty batches), dtypes (fp64,
fp32, bf16) and layouts (transposed, sliced with step 2 with NaN in the gaps, expanded); each
example checks the forward and the gradients for a random cotangent against the op's pure-torch
`*_reference` evaluated in float64 on the same (already rounded) inputs. Examples are
derandomised, so every run draws the same ones; SPECOPS_HYPOTHESIS_EXAMPLES=N draws N per test.

Errors are measured as ||actual - expected||_F <= REL_TOL[dtype] * scale * ||bound||_F. For ops
that are multilinear in their inputs the bound is the reference evaluated on |inputs| (and its
gradients for |cotangent|): the classical rounding-error bound of a sum of products, which
survives cancellation, where a plain relative error would fail on a lucky near-zero result.

Each test forces one backend and checks, through the registry's last_backend, that every op it
watches ran that backend and that a non-torch one really ran, so no test id names a backend that
did not run. Ops with only a torch kernel or none (kron, zip_merge, zip_merge_lora, the Stiefel ops)
run once.
"""
import contextlib
import functools
import math
import os

import pytest
import torch
from helpers import CPU_BACKENDS, REL_TOL
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import specops
from specops import _registry
from specops._constants import ZIP_COS_EPS
from specops import spectral as spectral_mod
from specops import stiefel
from specops import zip as zip_mod


DTYPES = (torch.float64, torch.float32, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "step2", "expanded")
SIZES = (1, 2, 3, 5, 7)  # 1, primes, and (drawn per dim) non-square shapes
BATCH = (1, 2, 3, 0)  # batch dims, 0 = an empty batch; 17 (more rows than a vector) but for Triton

KRON_TABLES = ("kron_matmul", "kron_matmul_backward")
SMM_TABLES = ("scaled_matmul", "scaled_matmul_backward")
SPECTRAL_TABLES = KRON_TABLES + SMM_TABLES  # the spectral ops are scaled_matmul + kron_matmul
ZIP_TABLES = ("zip_lora_linear", "zip_lora_linear_backward")
PENALTY_TABLES = ("merger_penalty", "merger_penalty_backward")


def _implemented(ops):
    """The CPU backends every op of `ops` declares (a forced backend outside them raises)."""
    return [b for b in CPU_BACKENDS if all(b in _registry.OPS[o].kernels for o in ops)]


def _examples(backend: str) -> int:
    """Examples per test: the Triton interpreter runs kernels in numpy, so it gets fewer."""
    n = int(os.environ.get("SPECOPS_HYPOTHESIS_EXAMPLES", "0"))
    return n if n > 0 else (15 if backend == "triton" else 40)


def _prop(backend, tables, cases, check):
    """Run `check(case)` over `cases` (a strategy) with `backend` forced and its tables watched."""

    @settings(
        max_examples=_examples(backend),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(cases)
    def run(case):
        with _forced(backend, tables):
            check(case)

    run()


@contextlib.contextmanager
def _forced(backend, ops):
    """Force `backend`; fail when an op of `ops` last ran another backend or, for a kernel backend,
    none of them ran."""
    for name in ops:
        _registry.OPS[name].last = None
    with specops.backend(backend):
        yield
    ran = {specops.last_backend(name) for name in ops} - {None}
    assert ran <= {backend}, f"forced {backend!r}, but {sorted(ran)} ran"
    assert backend == "torch" or ran, f"forced {backend!r}, but no kernel of it ran"


# ----------------------------------------------------------------------------- tensors


def _gen(case) -> torch.Generator:
    return torch.Generator().manual_seed(case["seed"])


def _layout(values: torch.Tensor, dtype, layout: str, grad: bool, expand_ok: bool = True) -> torch.Tensor:
    """`values` (float64) rounded to dtype, laid out in memory as asked, as a view of a leaf.

    transposed: the last two dims swapped in memory; step2: every other element of a buffer
    whose gaps hold NaN (a kernel that ignores the stride poisons its output); expanded: dim 0
    broadcast from size 1 (stride 0), i.e. the first slice repeated.
    """
    if layout == "transposed" and values.dim() >= 2:
        base = values.mT.contiguous().to(dtype).requires_grad_(grad)
        return base.mT
    if layout == "step2" and values.dim() >= 1:
        buf = torch.full((*values.shape[:-1], 2 * values.shape[-1]), float("nan"), dtype=torch.float64)
        buf[..., ::2] = values
        return buf.to(dtype).requires_grad_(grad)[..., ::2]
    if layout == "expanded" and expand_ok and values.dim() >= 2 and values.shape[0] != 1:
        base = values[:1].contiguous().to(dtype).requires_grad_(grad)
        return base.expand(values.shape)
    return values.to(dtype).requires_grad_(grad)


def _randn(gen, *shape):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _norm(t) -> float:
    return 0.0 if t is None else t.detach().double().norm().item()


def _assert_close(actual, expected, bound, dtype, scale, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = (actual.detach().double() - expected.detach().double()).norm().item()
    tol = REL_TOL[dtype] * scale * _norm(bound)
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g} ({dtype}, |bound| {_norm(bound):.3g})"


def _as_tuple(y):
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _check(fn, ref, inputs, dtype, *, scale=2.0, bound_ref=None, bound=None, gen=None):
    """fn(*inputs) and its gradients against ref on float64 copies of the same inputs.

    Gradients: of every input that requires grad, for a random cotangent. The error bound is, by
    default, `bound_ref` (default: ref) evaluated on |inputs| with |cotangent| (see the module
    docstring); `bound(ins64, cot64, outs64, grads64) -> (output bounds, gradient bounds)` replaces
    it for ops that are not multilinear. None inputs (optional arguments) pass through.
    """
    outs = _as_tuple(fn(*inputs))
    diff = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    live = [j for j, o in enumerate(outs) if o.requires_grad]  # outputs that depend on them
    ins64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    outs64 = _as_tuple(ref(*ins64))
    assert len(outs) == len(outs64)
    cot64 = [_randn(gen, *o.shape) for o in outs64]
    grads, grads64 = [], []
    if diff:
        grads = torch.autograd.grad([outs[j] for j in live], [inputs[i] for i in diff],
                                    [cot64[j].to(dtype) for j in live])
        grads64 = torch.autograd.grad([outs64[j] for j in live], [ins64[i] for i in diff], [cot64[j] for j in live])
    if bound is not None:
        out_bounds, grad_bounds = bound(ins64, cot64, outs64, grads64)
    else:
        abs64 = [None if t is None else t.detach().abs().requires_grad_(t.requires_grad) for t in ins64]
        out_bounds = _as_tuple((bound_ref or ref)(*abs64))
        grad_bounds = []
        if diff:
            grad_bounds = torch.autograd.grad([out_bounds[j] for j in live], [abs64[i] for i in diff],
                                              [cot64[j].abs() for j in live])
    for j, (o, e, b) in enumerate(zip(outs, outs64, out_bounds)):
        _assert_close(o, e, b, dtype, scale, f"output {j}")
    for i, g, e, b in zip(diff, grads, grads64, grad_bounds):
        _assert_close(g, e, b, dtype, scale, f"gradient of input {i}")


# ----------------------------------------------------------------------------- strategies

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


def batches(backend="torch"):
    sizes = BATCH if backend == "triton" else (*BATCH, 17)
    return st.lists(st.sampled_from(sizes), max_size=2).map(tuple)


def _cases(**fields):
    """A strategy of dicts: every field drawn from its strategy (the dict Hypothesis reports)."""
    return st.fixed_dictionaries({"seed": seeds, "dtype": dtypes, **fields})


# ----------------------------------------------------------------------------- kron_matmul


def kron_cases(backend):
    dims = st.tuples(st.sampled_from(SIZES[:4]), st.sampled_from(SIZES[:4]))
    return _cases(
        factors=st.lists(st.tuples(dims, layouts, st.booleans()), min_size=1, max_size=2 if backend == "triton" else 3),
        group=st.sampled_from((None, 1, 3, 0)),
        batch=batches(backend),
        x_layout=layouts,
        x_grad=st.booleans(),
    )


def check_kron(case):
    gen, dtype, group = _gen(case), case["dtype"], case["group"]
    lead = () if group is None else (group,)
    P = math.prod(p for (p, _), _, _ in case["factors"])
    x = _layout(_randn(gen, *lead, *case["batch"], P), dtype, case["x_layout"], case["x_grad"])
    fs = [_layout(_randn(gen, *lead, p, q), dtype, lay, g) for (p, q), lay, g in case["factors"]]
    _check(lambda x, *fs: specops.kron_matmul(x, fs), lambda x, *fs: specops.kron_matmul_reference(x, fs),
           [x, *fs], dtype, gen=gen)


@pytest.mark.parametrize("backend", _implemented(KRON_TABLES))
def test_kron_matmul(backend):
    _prop(backend, KRON_TABLES, kron_cases(backend), check_kron)


def check_kron_materialised(case):
    gen, dtype, group = _gen(case), case["dtype"], case["group"]
    lead = () if group is None else (group,)
    fs = [_layout(_randn(gen, *lead, p, q), dtype, lay, g) for (p, q), lay, g in case["factors"]]
    _check(lambda *fs: specops.kron(fs), lambda *fs: specops.kron_reference(fs), fs, dtype, gen=gen)


def test_kron():
    """The materialised product is one composite (no backends)."""
    _prop("torch", (), kron_cases("torch"), check_kron_materialised)


# ----------------------------------------------------------------------------- scaled_matmul


def check_scaled_matmul(case):
    gen, dtype = _gen(case), case["dtype"]
    r, k, c = case["rkc"]
    (la, ga), (ls, gs), (lb, gb) = case["inputs"]
    A = _layout(_randn(gen, r, k), dtype, la, ga)
    s = _layout(_randn(gen, k), dtype, ls, gs)
    B = _layout(_randn(gen, k, c), dtype, lb, gb)
    _check(specops.scaled_matmul, specops.scaled_matmul_reference, [A, s, B], dtype, gen=gen)


@pytest.mark.parametrize("backend", _implemented(SMM_TABLES))
def test_scaled_matmul(backend):
    sizes = st.sampled_from((0, *SIZES, 16))
    cases = _cases(rkc=st.tuples(sizes, sizes, sizes), inputs=st.tuples(*[st.tuples(layouts, st.booleans())] * 3))
    _prop(backend, SMM_TABLES, cases, check_scaled_matmul)


# ----------------------------------------------------------------------------- spectral


@st.composite
def spectral_cases(draw, backend, lq, linear):
    """(out, in, k) with k <= min(out, in) and a rotation whose sizes multiply to in or k."""
    side = draw(st.sampled_from(spectral_mod.SIDES))
    # Without a rotation the LQ ops call no backend's kernel, so kernel backends always rotate.
    rot = draw(st.lists(st.sampled_from((1, 2, 3)), min_size=int(lq and backend != "torch"), max_size=2))
    extra = st.integers(0, 3)
    if side == "basis" and rot:
        k = math.prod(rot)
        out, n = k + draw(extra), k + draw(extra)
    else:
        n = math.prod(rot) if rot else draw(st.sampled_from(SIZES))
        out = draw(st.sampled_from(SIZES))
        k = draw(st.integers(1, min(out, n)))
    return {
        "seed": draw(seeds),
        "dtype": draw(dtypes),
        "dims": (out, n, k),
        "side": side,
        "rotation": [(p, draw(layouts), draw(st.booleans())) for p in rot],
        "activation": None if lq else draw(st.sampled_from(spectral_mod.ACTIVATIONS)),
        "layouts": [draw(layouts) for _ in range(4)],
        "grads": [draw(st.booleans()) for _ in range(4)],
        "batch": draw(batches(backend)) + (draw(st.sampled_from((1, 2, 5))),) if linear else None,
        "bias": draw(st.booleans()) if linear else None,
        "path": draw(st.sampled_from(spectral_mod.PATHS)) if linear else None,
    }


def _spectral_inputs(case, lq):
    """[x (linear ops only), U or L, (S,) Vh or Qh, delta, bias (linear only), *rotation factors]."""
    gen, dtype = _gen(case), case["dtype"]
    out, n, k = case["dims"]
    shapes = [(out, k), (k,), (k, n), (k,)]
    if lq:
        del shapes[1]
    ins = [_layout(_randn(gen, *s), dtype, lay, g) for s, lay, g in zip(shapes, case["layouts"], case["grads"])]
    rot = [_layout(_randn(gen, p, p), dtype, lay, g) for p, lay, g in case["rotation"]]
    if case["path"] is None:
        return gen, ins, rot
    x = _layout(_randn(gen, *case["batch"], n), dtype, case["layouts"][0], case["grads"][-1])
    bias = _layout(_randn(gen, out), dtype, "step2", case["grads"][0]) if case["bias"] else None
    return gen, [x, *ins, bias], rot


def check_spectral(case, lq, linear):
    gen, ins, rot = _spectral_inputs(case, lq)
    opts = {"side": case["side"]}
    if not lq:
        opts["activation"] = case["activation"]
    name = ("spectral_linear" if linear else "spectral_shift") + ("_lq" if lq else "")
    op, ref = getattr(specops, name), getattr(specops, name + "_reference")
    narg = len(ins)
    path = {"path": case["path"]} if linear else {}

    def call(f, extra):
        return lambda *a: f(*a[:narg], rotation=list(a[narg:]) or None, **opts, **extra)

    _check(call(op, path), call(ref, {}), [*ins, *rot], case["dtype"], gen=gen)


SPECTRAL_OPS = [(lq, linear) for linear in (False, True) for lq in (False, True)]
SPECTRAL_IDS = ["spectral_shift", "spectral_shift_lq", "spectral_linear", "spectral_linear_lq"]


@pytest.mark.parametrize("lq,linear", SPECTRAL_OPS, ids=SPECTRAL_IDS)
@pytest.mark.parametrize("backend", _implemented(SPECTRAL_TABLES))
def test_spectral(backend, lq, linear):
    _prop(backend, SPECTRAL_TABLES, spectral_cases(backend, lq, linear), functools.partial(check_spectral, lq=lq, linear=linear))


# ----------------------------------------------------------------------------- ZipLoRA


def zip_cases(backend):
    ranks = st.sampled_from((1, 2, 3, 0))
    return _cases(
        dims=st.tuples(st.sampled_from(SIZES), st.sampled_from(SIZES), ranks, ranks),
        batch=batches(backend),
        weight=st.booleans(),
        bias=st.booleans(),
        scales=st.tuples(st.sampled_from((1.0, 0.5)), st.sampled_from((2.0, -0.25))),
        layouts=st.lists(layouts, min_size=9, max_size=9),
        grads=st.lists(st.booleans(), min_size=9, max_size=9),
    )


def _zip_shapes(case):
    out, n, rc, rs = case["dims"]
    shapes = [(*case["batch"], n), (out, n), (out,), (out, rc), (rc, n), (n,), (out, rs), (rs, n), (n,)]
    keep = [True, case["weight"], case["bias"], *[True] * 6]
    return [s if k else None for s, k in zip(shapes, keep)]


def check_zip_lora_linear(case):
    gen, dtype = _gen(case), case["dtype"]
    ins = [None if s is None else _layout(_randn(gen, *s), dtype, lay, g)
           for s, lay, g in zip(_zip_shapes(case), case["layouts"], case["grads"])]
    sc, ss = case["scales"]
    _check(lambda *a: specops.zip_lora_linear(*a, sc, ss), lambda *a: specops.zip_lora_linear_reference(*a, sc, ss),
           ins, dtype, gen=gen, bound_ref=lambda *a: specops.zip_lora_linear_reference(*a, abs(sc), abs(ss)))


@pytest.mark.parametrize("backend", _implemented(ZIP_TABLES))
def test_zip_lora_linear(backend):
    _prop(backend, ZIP_TABLES, zip_cases(backend), check_zip_lora_linear)


def check_zip_merge(case):
    gen, dtype = _gen(case), case["dtype"]
    out, n, rc, rs = case["dims"]
    lay, g = case["layouts"], case["grads"]
    sc, ss = case["scales"]
    merge = [_layout(_randn(gen, *s), dtype, l_, g_) for s, l_, g_ in zip([(out, n), (out, n), (n,), (n,)], lay, g)]
    _check(specops.zip_merge, specops.zip_merge_reference, merge, dtype, gen=gen)
    shapes = [(out, rc), (rc, n), (out, rs), (rs, n), (n,), (n,)]
    lora = [_layout(_randn(gen, *s), dtype, l_, g_) for s, l_, g_ in zip(shapes, lay[3:], g[3:])]
    _check(lambda *a: specops.zip_merge_lora(*a, sc, ss), lambda *a: specops.zip_merge_lora_reference(*a, sc, ss),
           lora, dtype, gen=gen, bound_ref=lambda *a: specops.zip_merge_lora_reference(*a, abs(sc), abs(ss)))


def test_zip_merge():
    """zip_merge and zip_merge_lora are composites (no backends)."""
    _prop("torch", (), zip_cases("torch"), check_zip_merge)


def _penalty_bound(kind, mc, ms, cot, outs64, grads64):
    """Bounds for merger_penalty (not multilinear: |.|, a quotient): the value's own size, and
    per element the size of the terms its gradient sums (cosine: m_s/den and cos m_c/|m_c|^2)."""
    if kind != "cosine":
        return outs64, grads64
    g = cot[0].abs()
    bounds_c, bounds_s = [], []
    for a, b in zip(mc, ms):
        na, nb = a.detach().norm(), b.detach().norm()
        den = (na * nb).clamp_min(ZIP_COS_EPS)
        bounds_c.append(g * (b.detach().abs() / den + a.detach().abs() / na.square().clamp_min(1e-300)))
        bounds_s.append(g * (a.detach().abs() / den + b.detach().abs() / nb.square().clamp_min(1e-300)))
    return outs64, bounds_c + bounds_s


def check_merger_penalty(case):
    gen, dtype, kind = _gen(case), case["dtype"], case["kind"]
    L = len(case["layers"])
    # m_c of every layer, then m_s of every layer
    ms = [_layout(_randn(gen, n), dtype, lay, True) for n, lay in case["layers"] * 2]
    if kind != "abs_product":
        # |dot| and cos have a kink at 0: keep every layer's sum clear of cancellation, so that
        # the rounding of the inputs cannot flip its sign (and the gradient with it).
        r = [m.detach().double() for m in ms]
        if not all(a.numel() == 0 or (a * b).sum().abs() >= 0.1 * (a * b).abs().sum() for a, b in zip(r[:L], r[L:])):
            assume(False)  # (called only on a miss: the fixed cases below satisfy it)
    _check(lambda *m: specops.merger_penalty(m[:L], m[L:], kind),
           lambda *m: specops.merger_penalty_reference(m[:L], m[L:], kind), ms, dtype, gen=gen,
           bound=lambda ins, cot, o, g: _penalty_bound(kind, ins[:L], ins[L:], cot, o, g))


@pytest.mark.parametrize("backend", _implemented(PENALTY_TABLES))
def test_merger_penalty(backend):
    layer = st.tuples(st.sampled_from((*SIZES, 0)), layouts)  # (columns, layout)
    cases = _cases(kind=st.sampled_from(zip_mod.PENALTY_KINDS), layers=st.lists(layer, min_size=1, max_size=4))
    _prop(backend, PENALTY_TABLES, cases, check_merger_penalty)


# ----------------------------------------------------------------------------- Stiefel (one composite each)


@st.composite
def stiefel_cases(draw):
    n = draw(st.sampled_from(SIZES))
    return {
        "seed": draw(seeds),
        "dtype": draw(dtypes),
        "np": (n, draw(st.integers(1, n))),
        "batch_x": draw(batches()),
        "batch_v": draw(st.sampled_from(("same", "broadcast"))),
        "layouts": (draw(layouts), draw(layouts)),
        "grads": (draw(st.booleans()), draw(st.booleans())),
        "metric": draw(st.sampled_from(stiefel.METRICS)),
        "method": draw(st.sampled_from(stiefel.RETRACTIONS)),
    }


def _stiefel_pair(case):
    """X (batch, n, p) with orthonormal columns and V (batch or (1,)*len(batch), n, p)."""
    gen, dtype = _gen(case), case["dtype"]
    n, p = case["np"]
    bx = case["batch_x"]
    bv = bx if case["batch_v"] == "same" else (1,) * len(bx)
    X64 = torch.linalg.qr(_randn(gen, *bx, n, p))[0]
    V64 = 0.3 * _randn(gen, *bv, n, p)
    (lx, lv), (gx, gv) = case["layouts"], case["grads"]
    # Expanding a single matrix would repeat its rows (no longer orthonormal): only batch dims.
    X = _layout(X64, dtype, lx, gx, expand_ok=len(bx) > 0)
    V = _layout(V64, dtype, lv, gv, expand_ok=len(bv) > 0)
    return gen, X, V


def check_stiefel(case):
    gen, X, V = _stiefel_pair(case)
    dtype, metric = case["dtype"], case["metric"]

    def project_bound(X, G):  # the projection with every sign +: its |.| bounds the rounding
        if metric == "euclidean":
            return G + X @ (0.5 * (X.mT @ G + G.mT @ X))
        return G + X @ G.mT @ X

    _check(lambda X, G: stiefel.project(X, G, metric), lambda X, G: stiefel.project_reference(X, G, metric),
           [X, V], dtype, gen=gen, bound_ref=project_bound)

    X0, V0 = X.detach(), V.detach()
    tangent = stiefel.project_reference(X0.double(), V0.double()).to(dtype)
    Y = stiefel.retract(X0, tangent, case["method"])
    want = stiefel.retract_reference(X0.double(), tangent.double(), case["method"])
    _assert_close(Y, want, want, dtype, 2.0, f"retract {case['method']}")

    err = stiefel.orthogonality_error(V0)
    want = stiefel.orthogonality_error_reference(V0)
    gram = (V0.double().mT @ V0.double()).norm(dim=(-2, -1)) + V0.shape[-1] ** 0.5
    _assert_close(err, want, gram, dtype, 2.0, "orthogonality_error")

    # cayley of a skew A (I - A/2 has singular values >= 1): error relative to ||Y|| and ||dY||.
    B64 = _randn(gen, *X0.shape[:-2], X0.shape[-1], X0.shape[-1])
    A64 = B64 - B64.mT
    A = _layout(A64, dtype, case["layouts"][0], case["grads"][0], expand_ok=A64.dim() > 2)
    _check(stiefel.cayley, stiefel.cayley_reference, [A], dtype, gen=gen, bound=lambda ins, cot, o, g: (o, cot))


def test_stiefel():
    """project, retract, orthogonality_error, cayley: one composite each (no backend table)."""
    _prop("torch", (), stiefel_cases(), check_stiefel)


# ----------------------------------------------------------------------------- empty batches


def _kron_case(batch, factors, group=None, dtype=torch.float32):
    return {"seed": 0, "dtype": dtype, "group": group, "batch": batch, "x_layout": "contiguous", "x_grad": True,
            "factors": [(pq, "contiguous", True) for pq in factors]}


KRON_EMPTY = {
    "rows0": _kron_case((0,), [(3, 4), (5, 2)]),
    "rows0x3": _kron_case((0, 3), [(3, 4), (5, 2), (1, 2)]),
    "one_factor_rows0": _kron_case((0,), [(3, 4)]),
    "groups0": _kron_case((2,), [(3, 4), (5, 2)], group=0),
    "group_rows0": _kron_case((0,), [(3, 4), (5, 2)], group=3),
    "P0": _kron_case((4,), [(0, 3), (2, 2)]),
    "Q0": _kron_case((4,), [(2, 0), (3, 3)]),
}


@pytest.mark.parametrize("case", KRON_EMPTY.values(), ids=KRON_EMPTY.keys())
@pytest.mark.parametrize("backend", _implemented(KRON_TABLES))
def test_kron_matmul_empty(backend, case):
    """Empty batches give empty results and zero factor gradients; a zero-width factor gives zeros."""
    with _forced(backend, KRON_TABLES):
        check_kron(case)


@pytest.mark.parametrize("rkc", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (0, 0, 0)], ids=str)
@pytest.mark.parametrize("backend", _implemented(SMM_TABLES))
def test_scaled_matmul_empty(backend, rkc):
    case = {"seed": 0, "dtype": torch.float32, "rkc": rkc, "inputs": [("contiguous", True)] * 3}
    with _forced(backend, SMM_TABLES):
        check_scaled_matmul(case)
    for need in [(True, False, False), (False, True, False), (False, False, True)]:  # each path alone
        case["inputs"] = [("contiguous", n) for n in need]
        with _forced(backend, SMM_TABLES):
            check_scaled_matmul(case)


@pytest.mark.parametrize("path", spectral_mod.PATHS)
@pytest.mark.parametrize("side", spectral_mod.SIDES)
@pytest.mark.parametrize("lq", [False, True], ids=["svd", "lq"])
@pytest.mark.parametrize("backend", _implemented(SPECTRAL_TABLES))
def test_spectral_linear_no_tokens(backend, lq, side, path):
    """0 tokens: an empty output, and zero gradients for every weight-side input."""
    case = {"seed": 0, "dtype": torch.float32, "dims": (6, 4, 4), "side": side, "activation": "relu",
            "rotation": [(2, "contiguous", True), (2, "contiguous", True)], "layouts": ["contiguous"] * 4,
            "grads": [True] * 4, "batch": (0, 3), "bias": True, "path": path}
    with _forced(backend, SPECTRAL_TABLES):
        check_spectral(case, lq=lq, linear=True)


ZIP_EDGES = {  # (out, in, r_c, r_s), token batch, weight
    "tokens0": ((5, 7, 2, 3), (0,), True),
    "rank_c0": ((5, 7, 0, 3), (4,), True),
    "ranks0": ((5, 7, 0, 0), (4,), True),
    "out1": ((1, 3, 1, 2), (4,), True),  # the B gradients, slices of one buffer, look contiguous
    "one_token_no_weight": ((4, 3, 1, 2), (1,), False),  # y starts as the bias broadcast to 1 row
}


@pytest.mark.parametrize("dims,batch,weight", ZIP_EDGES.values(), ids=ZIP_EDGES.keys())
@pytest.mark.parametrize("backend", _implemented(ZIP_TABLES))
def test_zip_lora_linear_edges(backend, dims, batch, weight):
    """0 tokens (zero gradients for the weights and LoRAs), LoRAs of rank 0 (no update), and the
    shapes where an output could alias another output or an input."""
    case = {"seed": 0, "dtype": torch.float32, "dims": dims, "batch": batch, "weight": weight, "bias": True,
            "scales": (0.5, 2.0), "layouts": ["contiguous"] * 9, "grads": [True] * 9}
    with _forced(backend, ZIP_TABLES):
        check_zip_lora_linear(case)
    case["grads"] = [False] * 5 + [True, False, False, True]  # merger training: only m_c, m_s
    with _forced(backend, ZIP_TABLES):
        check_zip_lora_linear(case)


@pytest.mark.parametrize("kind", zip_mod.PENALTY_KINDS)
@pytest.mark.parametrize("backend", _implemented(PENALTY_TABLES))
def test_merger_penalty_empty_layer(backend, kind):
    """A layer with no columns adds 0 to every kind (its mean counts as 0, not NaN)."""
    case = {"seed": 1, "dtype": torch.float32, "kind": kind, "layers": [(0, "contiguous"), (3, "contiguous")]}
    with _forced(backend, PENALTY_TABLES):
        check_merger_penalty(case)
        empty = [torch.zeros(0)]
        assert specops.merger_penalty(empty, empty, kind).item() == 0.0


def test_stiefel_empty_batch():
    """A batch of 0 matrices: empty results and empty gradients."""
    for method in stiefel.RETRACTIONS:
        case = {"seed": 0, "dtype": torch.float32, "np": (5, 3), "batch_x": (0,), "batch_v": "same",
                "layouts": ("contiguous", "contiguous"), "grads": (True, True), "metric": "euclidean", "method": method}
        check_stiefel(case)


def test_empty_inputs_still_validated():
    """Empty batches are not a way around the checks: wrong widths still raise ValueErrors."""
    with pytest.raises(ValueError, match="x: last dim"):
        specops.kron_matmul(torch.randn(0, 7), [torch.randn(2, 2), torch.randn(3, 3)])
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 4\)"):
        specops.spectral_linear(torch.randn(0, 5), torch.randn(6, 4), torch.rand(4), torch.randn(4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="x: expected shape"):
        specops.zip_lora_linear(torch.randn(0, 5), None, None, torch.randn(3, 2), torch.randn(2, 7), torch.ones(7),
                                torch.randn(3, 1), torch.randn(1, 7), torch.ones(7))
    with pytest.raises(ValueError, match="s: expected shape"):
        specops.scaled_matmul(torch.randn(0, 3), torch.randn(2), torch.randn(3, 0))
