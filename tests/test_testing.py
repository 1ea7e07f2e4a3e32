"""specops.testing: the manifold gradient check passes on the real Riemannian gradient and fails on
wrong ones, the step check follows StiefelSGD's direction and catches another, check_op reports."""
import pytest
import torch

import specops
from specops import stiefel, testing

F64 = torch.float64


def _setup(n=6, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=F64))[0]
    A = torch.randn(n, n, generator=g, dtype=F64)
    B = torch.randn(n, p, generator=g, dtype=F64)
    # a Brockett-like cost with a non-quadratic term, so the gradient depends on X in every direction
    return X, (lambda Y: (Y.mT @ A @ Y).diagonal().sum() + (Y * B).sum().sin()), g


@pytest.mark.parametrize("metric", stiefel.METRICS)
@pytest.mark.parametrize("retraction", stiefel.RETRACTIONS)
def test_manifold_gradcheck_passes_on_the_riemannian_gradient(metric, retraction):
    X, fn, g = _setup()
    assert testing.manifold_gradcheck(fn, X, metric=metric, retraction=retraction, generator=g)


def test_manifold_gradcheck_catches_a_wrong_tangent_projection():
    X, fn, g = _setup()
    # tangent, but without the X·skew(X^T G) part of the projection
    normal_only = lambda X, G: G - X @ (X.mT @ G)  # noqa: E731
    with pytest.raises(AssertionError, match="directional derivative"):
        testing.manifold_gradcheck(fn, X, riemannian_grad=normal_only, generator=g)
    # the canonical-metric gradient paired with the Euclidean inner product
    wrong_metric = lambda X, G: stiefel.project(X, G, "canonical")  # noqa: E731
    with pytest.raises(AssertionError, match="directional derivative"):
        testing.manifold_gradcheck(fn, X, riemannian_grad=wrong_metric, metric="euclidean", generator=g)
    # not a tangent vector at all
    with pytest.raises(AssertionError, match="not tangent"):
        testing.manifold_gradcheck(fn, X, riemannian_grad=lambda X, G: G, generator=g)


def test_manifold_gradcheck_refuses_a_point_off_the_manifold():
    X, fn, _ = _setup()
    with pytest.raises(ValueError, match="not on the manifold"):
        testing.manifold_gradcheck(fn, 1.01 * X)


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_check_step_follows_stiefel_sgd(fused):
    X, fn, _ = _setup(7, 3, seed=1)
    leaf = X.clone().requires_grad_()
    (G,) = torch.autograd.grad(fn(leaf), leaf)

    def sgd(params, lr):
        return specops.StiefelSGD(params, lr=lr, momentum=0.0, fused=fused)

    assert testing.check_step(sgd, X, G)
    with pytest.raises(AssertionError, match="direction"):
        testing.check_step(sgd, X, G, direction=lambda X, G: stiefel.project(X, G, "canonical"))


def test_check_op_reports_every_check():
    report = testing.check_op("kron_matmul")
    assert report == {c: "passed" for c in testing.CHECKS}
    step = testing.check_op("stiefel_sgd_step", checks=("gradcheck", "vmap"))
    assert all(v.startswith("does not apply") for v in step.values())
    with pytest.raises(ValueError, match="unknown"):
        testing.check_op("kron_matmul", checks=("hessian",))
