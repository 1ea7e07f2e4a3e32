"""Stiefel manifold ops (project, cayley, retract, orthogonality_error) against float64 oracles."""
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import CPU_BACKENDS, REL_TOL, assert_rel

from specops import _registry, stiefel

SHAPES = [(1, 1), (2, 2), (7, 3), (16, 16), (64, 64), (100, 20)]
BATCHES = [(), (3,), (2, 1)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


def _point(shape, batch=(), dtype=torch.float64):
    X = torch.linalg.qr(torch.randn(*batch, *shape, dtype=torch.float64))[0]
    return X.to(dtype)


def _tangent(X, scale=0.3):
    return stiefel.project_reference(X, scale * torch.randn_like(X))


def _np(t):
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------- project


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", stiefel.METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_project_matches_numpy(shape, metric, dtype):
    batch = BATCHES[len(shape) % 3]
    X = _point(shape, batch, dtype)
    G = torch.randn(*batch, *shape, dtype=dtype)
    P = stiefel.project(X, G, metric)
    assert P.dtype == dtype and P.shape == G.shape
    x, g = _np(X), _np(G)
    xt = np.swapaxes(x, -1, -2)
    if metric == "euclidean":
        a = xt @ g
        want = g - x @ (0.5 * (a + np.swapaxes(a, -1, -2)))
    else:
        want = g - x @ np.swapaxes(g, -1, -2) @ x
    assert_rel(P, torch.from_numpy(want), dtype, scale=4.0)
    if dtype == torch.float64:  # tangent: X^T P is skew
        a = X.mT @ P
        assert (a + a.mT).abs().max() < 1e-12


def test_project_broadcasts_batches():
    X = _point((7, 3), (1, 4))
    G = torch.randn(5, 1, 7, 3, dtype=torch.float64)
    P = stiefel.project(X, G, "canonical")
    assert P.shape == (5, 4, 7, 3)
    assert_rel(P, stiefel.project_reference(X, G, "canonical"), torch.float64)


@pytest.mark.parametrize("metric", stiefel.METRICS)
def test_project_gradcheck(metric):
    X = _point((7, 3), (2,)).requires_grad_()
    G = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: stiefel.project(x, g, metric), (X, G))
    # broadcast batch dims reduce back in the backward
    X1 = _point((5, 2), (1,)).requires_grad_()
    G1 = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: stiefel.project(x, g, metric), (X1, G1))


# ----------------------------------------------------------------------------- cayley


def _skew(n, batch=(), dtype=torch.float64):
    A = torch.randn(*batch, n, n, dtype=torch.float64)
    return (A - A.mT).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64, 97, 160])  # above 32: the cpp kernel's block recursion
def test_cayley_matches_scipy(n, dtype):
    A = _skew(n, (3,), dtype)
    Y = stiefel.cayley(A)
    assert Y.dtype == dtype
    I = np.eye(n)
    want = np.stack([scipy.linalg.solve(I - 0.5 * a, I + 0.5 * a) for a in _np(A)])
    assert_rel(Y, torch.from_numpy(want), dtype, scale=4.0 * n**0.5)
    if dtype == torch.float64:
        assert stiefel.orthogonality_error(Y).max() < 1e-12


def test_cayley_gradcheck():
    A = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)  # general A: full gradient
    assert torch.autograd.gradcheck(stiefel.cayley, (A,))
    S = _skew(4).requires_grad_()
    assert torch.autograd.gradcheck(stiefel.cayley, (S,))


# ----------------------------------------------------------------------------- retract


def _retract_oracle(x, v, method):
    """scipy/numpy in float64, matrix by matrix."""
    if x.ndim == 3:
        return np.stack([_retract_oracle(a, b, method) for a, b in zip(x, v)])
    n = x.shape[0]
    pv = v - 0.5 * x @ (x.T @ v)
    W = pv @ x.T - x @ pv.T
    if method == "cayley":
        return scipy.linalg.solve(np.eye(n) - 0.5 * W, (np.eye(n) + 0.5 * W) @ x)
    if method == "cayley_iter":
        y = x + W @ x
        for _ in range(2):
            y = x + 0.5 * W @ (x + y)
        return y
    if method == "polar":
        return scipy.linalg.polar(x + v)[0]
    q, r = np.linalg.qr(x + v)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", stiefel.RETRACTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_retract_matches_scipy(shape, method, dtype):
    X = _point(shape, (3,))
    V = _tangent(X)
    Y = stiefel.retract(X.to(dtype), V.to(dtype), method)
    assert Y.dtype == dtype and Y.shape == X.shape
    want = torch.from_numpy(_retract_oracle(_np(X), _np(V), method))
    n, p = shape
    # inputs are rounded to dtype first; the retraction amplifies that by at most ~sqrt(n p)
    assert_rel(Y, want, dtype, scale=8.0 * (n * p) ** 0.25 * (4 if dtype == torch.bfloat16 else 1))
    if method != "cayley_iter" and dtype == torch.float64:
        assert stiefel.orthogonality_error(Y).max() < 1e-12


@pytest.mark.parametrize("method", stiefel.RETRACTIONS)
def test_retract_is_first_order(method):
    """R_X(tV) = X + tV + O(t^2) for tangent V."""
    X = _point((9, 4))
    V = _tangent(X, 1.0)
    errs = [(stiefel.retract(X, t * V, method) - X - t * V).norm().item() for t in (1e-2, 1e-3)]
    assert errs[1] < errs[0] / 50  # quadratic: 100x smaller


def test_polar_rescales_large_inputs():
    X = _point((12, 5))
    Z = 10.0 * X + torch.randn_like(X)  # singular values ~10: outside Newton-Schulz's basin
    Y = stiefel.retract(X, Z - X, "polar")
    assert_rel(Y, torch.from_numpy(scipy.linalg.polar(_np(Z))[0]), torch.float64, scale=100)


def test_woodbury_cayley_costs_no_n_by_n():
    """Tall X takes the 2p x 2p Woodbury route and agrees with the dense n x n transform."""
    X = _point((300, 4))
    V = _tangent(X)
    assert_rel(stiefel.retract(X, V, "cayley"), stiefel.retract_reference(X, V, "cayley"), torch.float64, 10)


# ----------------------------------------------------------------------------- orthogonality error


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonality_error(dtype):
    X = torch.randn(4, 9, 5, dtype=dtype)
    e = stiefel.orthogonality_error(X)
    assert e.shape == (4,) and e.dtype == dtype
    x = _np(X)
    want = np.linalg.norm(np.swapaxes(x, 1, 2) @ x - np.eye(5), axis=(1, 2))
    assert_rel(e, torch.from_numpy(want), dtype, scale=4.0)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    X = _point((5, 3))
    with pytest.raises(ValueError, match=r"X: expected .* n >= p.*\(3, 5\)"):
        stiefel.project(X.mT, X.mT)
    with pytest.raises(ValueError, match=r"G: expected \(\.\.\., 5, 3\)"):
        stiefel.project(X, torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="metric"):
        stiefel.project(X, X, "riemann")
    with pytest.raises(ValueError, match=r"A: expected square"):
        stiefel.cayley(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"X: expected a \(\.\.\., n, p\)"):
        stiefel.orthogonality_error(torch.randn(4))
    with pytest.raises(ValueError, match="method"):
        stiefel.retract(X, X, "exp")
    with pytest.raises(ValueError, match=r"V: batch dims"):
        stiefel.retract(torch.stack([X, X]), torch.randn(3, 5, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- op checks, compile


def test_opcheck():
    X = _point((7, 3), (2,))
    G = torch.randn(2, 7, 3, dtype=torch.float64)
    A = _skew(4, (2,))
    for metric in stiefel.METRICS:
        torch.library.opcheck(torch.ops.specops.stiefel_project, (X.requires_grad_(), G.requires_grad_(), metric))
        X, G = X.detach(), G.detach()
        torch.library.opcheck(torch.ops.specops.stiefel_project_backward, (G, X, G, metric))
    torch.library.opcheck(torch.ops.specops.cayley, (A.requires_grad_(),))
    torch.library.opcheck(torch.ops.specops.cayley_backward, (A.detach(), A.detach()))
    for method in stiefel.RETRACTIONS:
        torch.library.opcheck(torch.ops.specops.stiefel_retract, (X, _tangent(X), method))
    torch.library.opcheck(torch.ops.specops.orthogonality_error, (X,))


def test_compile_fullgraph():
    X = _point((7, 3), (2,)).requires_grad_()
    G = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    A = _skew(5).requires_grad_()

    def f(X, G, A):
        P = stiefel.project(X, G, "canonical")
        R = stiefel.cayley(A)
        Y = stiefel.retract(X.detach(), P.detach(), "cayley")
        return P.square().sum() + R.sum() + stiefel.orthogonality_error(Y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, want = compiled(X, G, A), f(X, G, A)
    assert torch.allclose(out, want)
    g1 = torch.autograd.grad(out, (X, G, A))
    g2 = torch.autograd.grad(want, (X, G, A))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b)


# ----------------------------------------------------------------------------- no batched LU


CAYLEY_BACKENDS = [b for b in CPU_BACKENDS if b in _registry.OPS["cayley"].kernels]  # forced by conftest's fixture


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS, indirect=True)
def test_cayley_skew_batch_large_norm(backend):
    """The SPD (Cholesky) path with its refinement step keeps LU accuracy for large skew A."""
    for scale in (0.01, 1.0, 30.0):
        A = scale * _skew(48, (3,))
        I = np.eye(48)
        want = np.stack([scipy.linalg.solve(I - 0.5 * a, I + 0.5 * a) for a in _np(A)])
        Y = stiefel.cayley(A)
        assert_rel(Y, torch.from_numpy(want), torch.float64, scale=20.0)
        assert (Y.mT @ Y - torch.from_numpy(I)).abs().max() < 1e-12


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS, indirect=True)
def test_cayley_general_matrices_one_by_one(backend):
    """A matrix that is not exactly skew is solved on its own and does not change the others."""
    A = _skew(6, (4,))
    general = A.clone()
    general[1] += torch.randn(6, 6, dtype=torch.float64)  # not skew: LU, unbatched
    Y, Yg = stiefel.cayley(A), stiefel.cayley(general)
    assert torch.equal(Yg[[0, 2, 3]], Y[[0, 2, 3]])
    assert_rel(Yg[1], stiefel.cayley_reference(general[1]), torch.float64, scale=10.0)
    with pytest.raises(ValueError, match=r"A: I - A/2 is singular for matrix 2"):
        stiefel.cayley(torch.stack([A[0], A[1], 2 * torch.eye(6, dtype=torch.float64)]))


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS, indirect=True)
def test_cayley_path_chosen_matrix_by_matrix(backend):
    """Past the cpp kernel's leaf size: skew, general and non-finite matrices in one batch each take
    their own path, and each result is that matrix transformed alone (to rounding: batched GEMMs may
    sum in another order for another batch size)."""
    A = _skew(70, (4,))
    A[1] += 0.1 * torch.randn(70, 70, dtype=torch.float64)  # not skew
    A[2, 3, 5], A[2, 5, 3] = float("inf"), float("-inf")  # skew, not finite
    Y = stiefel.cayley(A)
    for b in (0, 1, 3):
        assert_rel(Y[b], stiefel.cayley_reference(A[b]), torch.float64, scale=20.0)
        assert_rel(Y[b], stiefel.cayley(A[b : b + 1])[0], torch.float64, scale=2.0)
    assert Y[2].isnan().all()


@pytest.mark.parametrize("backend", CAYLEY_BACKENDS, indirect=True)
def test_cayley_gradcheck_skew_path(backend):
    """Q -> cayley(Q - Q^T) stays on the skew (Cholesky) path under gradcheck's perturbations."""
    for n in (5, 37):  # 37: the cpp kernel's block recursion
        Q = 0.5 * torch.randn(2, n, n, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q: stiefel.cayley(q - q.mT), (Q,))


_LU = ("solve", "solve_ex", "inv", "inv_ex", "lu", "lu_factor", "lu_factor_ex", "lu_solve", "det", "slogdet")


@pytest.fixture
def no_batched_lu(monkeypatch):
    """Any batched LU (the factorisation that hangs MKL on some CPUs) fails the test."""
    for name in _LU:
        real = getattr(torch.linalg, name)

        def guard(A, *args, _real=real, _name=name, **kwargs):
            assert A.dim() == 2, f"torch.linalg.{_name} on a batch {tuple(A.shape)}"
            return _real(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, guard)
    monkeypatch.setattr(torch, "inverse", lambda A, *a, **k: pytest.fail("torch.inverse"))


def test_no_batched_lu_on_the_hot_path(no_batched_lu):
    from specops.adapters import make_adapter

    A = _skew(7, (3,)).requires_grad_()
    stiefel.cayley(A).sum().backward()
    X = _point((9, 3), (2,))
    for method in stiefel.RETRACTIONS:
        for shape in [(9, 3), (5, 3)]:  # Woodbury and dense Cayley
            X = _point(shape, (2,))
            stiefel.retract(X, _tangent(X), method)
    ad = make_adapter("oft", torch.nn.Linear(12, 12))
    ad(torch.randn(2, 12)).sum().backward()
    assert ad.Q.grad is not None


# Large shapes in a subprocess with 2 threads (the setting in which a batched LU hangs), under a
# timeout: the script asserts correctness against float64 references computed matrix by matrix.
_LARGE_SCRIPT = r"""
import sys
import torch
from torch import nn
import specops
from specops import _registry, stiefel
torch.set_num_threads(2)
torch.manual_seed(0)
what = sys.argv[1]

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def block_diag_oft(x, W0, b, R):
    return x @ (W0 @ torch.block_diag(*R)).mT + b

def oft(n):
    ad = specops.adapters.make_adapter("oft", nn.Linear(n, n))
    with torch.no_grad():
        ad.Q.normal_(std=0.02)
    x = torch.randn(3, n)
    y = ad(x)
    (y * y).sum().backward()
    R = ad.rotation_blocks()
    assert stiefel.orthogonality_error(R).max() < 1e-4, stiefel.orthogonality_error(R)
    Q = ad.Q.detach().double().requires_grad_()
    R64 = stiefel.cayley_reference(Q - Q.mT)
    y64 = block_diag_oft(x.double(), ad.base.weight.double(), ad.base.bias.double(), R64)
    (y64 * y64).sum().backward()
    assert rel(y, y64) < 1e-5, rel(y, y64)
    assert rel(ad.Q.grad, Q.grad) < 1e-4, rel(ad.Q.grad, Q.grad)

def retract(method):
    for n, p in [(400, 160), (320, 160)]:  # Woodbury (n > 2p) and dense
        X = torch.linalg.qr(torch.randn(2, n, p, dtype=torch.float64))[0]
        V = stiefel.project_reference(X, 0.3 * torch.randn_like(X))
        Y = stiefel.retract(X, V, method)
        err = rel(Y, stiefel.retract_reference(X, V, method))
        assert err < 1e-11, (n, p, err)

for item in sys.argv[1:]:
    print("start", item, flush=True)
    oft(int(item[3:])) if item.startswith("oft") else retract(item)
    print("done", item, flush=True)
"""


@pytest.mark.parametrize("items", [["oft640", "oft1280"], list(stiefel.RETRACTIONS)], ids=["oft", "retract"])
def test_large_shapes_finish_with_two_threads(items):
    """OFT at SDXL widths (default 4 blocks of 160 / 320) forward and backward, and every
    retraction on shapes past the size at which a batched LU hangs, finish and are right."""
    try:
        out = subprocess.run([sys.executable, "-c", _LARGE_SCRIPT, *items], capture_output=True, text=True,
                             timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"did not finish in {e.timeout} s; progress: {e.stdout}")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.split() == [w for it in items for w in ("start", it, "done", it)]


# ----------------------------------------------------------------------------- matrix_polynomial


POLY_BACKENDS = [b for b in CPU_BACKENDS if b in _registry.OPS["matrix_polynomial"].kernels]


@pytest.mark.parametrize("backend", POLY_BACKENDS, indirect=True)
@pytest.mark.parametrize("n", [3, 16, 17, 40])
def test_matrix_polynomial_neumann_cayley(backend, n):
    """The truncated Neumann series I + 2 sum_{k=1}^{d} Q^k of the Cayley transform (I + Q)(I - Q)^{-1} =
    cayley(2 Q) is off by at most 2 q^{d+1} / (1 - q), q = ||Q||_2 (both sides of the cpp kernel's loop size)."""
    Q = _skew(n, (3,))
    Q = 0.2 * Q / torch.linalg.matrix_norm(Q, 2)[:, None, None]
    exact = stiefel.cayley(2.0 * Q)
    for d in (1, 2, 4, 6):
        err = (stiefel.matrix_polynomial(Q, [1.0] + [2.0] * d) - exact).abs().amax()
        assert 0.2 ** (d + 1) / 100 < err <= 2 * 0.2 ** (d + 1) / 0.8


@pytest.mark.parametrize("backend", POLY_BACKENDS, indirect=True)
def test_matrix_polynomial_constant_and_bad_coefficients(backend):
    A = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    P = stiefel.matrix_polynomial(A, [1.5])
    assert torch.equal(P.detach(), 1.5 * torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    (gA,) = torch.autograd.grad(P.sum(), A)
    assert torch.equal(gA, torch.zeros_like(A))
    with pytest.raises(ValueError, match="coeffs: expected at least one coefficient"):
        stiefel.matrix_polynomial(A, [])
    with pytest.raises(ValueError, match="square"):
        stiefel.matrix_polynomial(torch.randn(3, 4), [1.0, 1.0])
