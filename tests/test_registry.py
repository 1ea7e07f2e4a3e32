"""The registry itself: a toy op declared here (declaration + torch kernel, nothing else) gets its
registration, wrapper, fake, autograd and test-matrix rows; declaration errors; per-op backends."""
import inspect

import pytest
import torch
from matrix import CHECK_FNS, cases, check_forced_undeclared_raises

import specops
from specops import _registry
from specops._registry import Kernel, declare


def _check(x, w, alpha):
    if x.dtype != w.dtype:
        raise ValueError(f"w: dtype {w.dtype} != x's {x.dtype}")
    torch._check_with(ValueError, x.shape[-1] == w.shape[0], lambda: f"w: expected ({x.shape[-1]},), got {tuple(w.shape)}")


def _toy_backward(grad, x, w, alpha):
    return [grad * w * alpha, (grad * x * alpha).reshape(-1, w.shape[0]).sum(0)]


declare("specops_toy::scale_backward", "(Tensor grad, Tensor x, Tensor w, float alpha) -> Tensor[]",
        kernels={"torch": _toy_backward, "cpp": Kernel(_toy_backward, supports=lambda g, x, w, a: None if x.dim() == 1 else "1-D x only")}, check=lambda g, x, w, alpha: _check(x, w, alpha),
        fake=lambda g, x, w, alpha: [torch.empty_like(x), torch.empty_like(w)])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.alpha = inputs[2]


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    gx, gw = torch.ops.specops_toy.scale_backward(grad, x, w, ctx.alpha)
    return gx, gw, None


toy_scale = declare(
    "specops_toy::scale", "(Tensor x, Tensor w, float alpha=2.0) -> Tensor",
    kernels={"torch": lambda x, w, alpha: x * w * alpha,
             # a second backend that takes only 1-D inputs, to exercise the supports predicate
             "cpp": Kernel(lambda x, w, alpha: x * w * alpha, supports=lambda x, w, alpha: None if x.dim() == 1 else "1-D x only")},
    check=_check, fake=lambda x, w, alpha: torch.empty_like(x),
    reference=lambda x, w, alpha: x * w * alpha, backward="specops_toy::scale_backward",
    setup_context=_setup, backward_fn=_backward,
    samples=lambda device, dtype: [(torch.randn(3, 4, device=device, dtype=dtype), torch.randn(4, device=device, dtype=dtype), 0.5),
                                   (torch.randn(4, device=device, dtype=dtype), torch.randn(4, device=device, dtype=dtype), 2.0)],
    doc="x * w * alpha, broadcast over the rows of x.")
TOY = _registry.OPS["specops_toy::scale"]


@pytest.mark.parametrize("op,backend,device,check", cases([TOY]))
def test_toy_op_matrix(op, backend, device, check):
    CHECK_FNS[check](op, backend, device)


def test_toy_op_is_registered_with_wrapper_fake_and_autograd():
    assert torch.ops.specops_toy.scale.default._schema.arguments[2].default_value == 2.0
    assert str(inspect.signature(toy_scale)) == "(x, w, alpha=2.0)"
    assert toy_scale.__doc__.startswith("x * w * alpha")
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    toy_scale(x, w).sum().backward()
    assert torch.equal(x.grad, (2 * w).expand(2, 3).detach())
    assert specops.last_backend("specops_toy::scale") == "torch"  # the cpp kernel refuses 2-D x
    with pytest.raises(ValueError, match=r"w: expected \(3,\)"):
        toy_scale(x, torch.randn(4))
    with torch._subclasses.FakeTensorMode(), pytest.raises(ValueError, match=r"w: expected \(3,\)"):
        toy_scale(torch.empty(2, 3), torch.empty(4))
    assert cases([TOY]), "the toy op has rows in the matrix"
    assert set(specops.available_backends("specops_toy::scale")) == {"torch", "cpp"}


def test_toy_forced_backend_rules():
    check_forced_undeclared_raises(TOY)
    x, w = torch.randn(2, 3), torch.randn(3)
    with specops.backend("cpp"), pytest.raises(specops.BackendError, match="refuses these inputs: 1-D x only"):
        toy_scale(x, w)
    with specops.backend("cpp", fallback=True):
        toy_scale(x, w)
    assert specops.last_backend("specops_toy::scale") == "torch"
    with specops.backend("cpp"):
        toy_scale(x[0], w)
    assert specops.last_backend("specops_toy::scale") == "cpp"


def test_declaration_errors():
    with pytest.raises(ValueError, match="already declared"):
        declare("specops_toy::scale", "(Tensor x) -> Tensor", kernels={"torch": lambda x: x})
    with pytest.raises(ValueError, match="needs a 'torch' kernel"):
        declare("specops_toy::no_torch", "(Tensor x) -> Tensor", kernels={"cpp": lambda x: x})
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        declare("specops_toy::fortran", "(Tensor x) -> Tensor", kernels={"torch": lambda x: x, "fortran": lambda x: x})
    with pytest.raises(ValueError, match=r"backward op 'specops_toy::scale_backward' lacks the backends \['triton'\]"):
        declare("specops_toy::other", "(Tensor x, Tensor w, float alpha) -> Tensor", backward="specops_toy::scale_backward",
                kernels={"torch": lambda *a: a[0], "cpp": lambda *a: a[0], "triton": lambda *a: a[0]})
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        specops.last_backend("nope")


def test_kernels_run_in_the_inputs_dtype_under_autocast():
    """No op has an autocast kernel, so its kernels run with autocast off: the output dtype is the one
    its fake kernel promises, not autocast's."""
    x, f = torch.randn(4, 6), [torch.randn(2, 3), torch.randn(3, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = specops.kron_matmul(x, f)
        assert torch.is_autocast_enabled("cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, specops.kron_matmul(x, f))


def test_eager_calls_skip_the_dispatcher_and_match_it():
    """A plain eager call runs the kernel through the op's own autograd.Function (no torch.ops.specops.*
    frame), with the same values and gradients as the dispatcher's path; under a dispatch mode or the
    profiler the wrapper goes through torch.ops.specops.* again, so both see the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    g = torch.randn(2, 3)
    y = toy_scale(x, w, 0.5)
    assert type(y.grad_fn).__name__ == "scale_eagerBackward"
    gx, gw = torch.autograd.grad(y, (x, w), g)
    y2 = torch.ops.specops_toy.scale(x, w, 0.5)
    assert type(y2.grad_fn).__name__ != type(y.grad_fn).__name__
    assert torch.equal(y, y2) and all(map(torch.equal, (gx, gw), torch.autograd.grad(y2, (x, w), g)))
    with torch.no_grad():
        assert toy_scale(x, w).grad_fn is None and torch.equal(toy_scale(x, w), 2 * x * w)
    with Seen() as seen:
        toy_scale(x.detach(), w.detach())
    assert "specops_toy.scale.default" in seen.ops
    with torch.profiler.profile() as prof:
        toy_scale(x, w)
    assert any(e.name == "specops_toy::scale" for e in prof.events())


@pytest.mark.parametrize("path", ["eager", "dispatcher"])
def test_forced_backend_reaches_a_backward_run_on_another_thread(path):
    """Autograd runs the backward of CUDA tensors on a device thread of its own, outside the caller's
    specops.backend block: the forward's forced backend must still choose the backward op's kernel.
    Shown on the CPU with the backward run from a fresh thread (no context variables set there)."""
    import threading

    x, f = torch.randn(4, 6, requires_grad=True), [torch.randn(2, 3), torch.randn(3, 2)]
    call = specops.kron_matmul if path == "eager" else torch.ops.specops.kron_matmul
    with specops.backend("torch"):
        y = call(x, f)
    _registry.OPS["kron_matmul_backward"].last = None
    thread = threading.Thread(target=lambda: y.sum().backward())
    thread.start()
    thread.join()
    assert specops.last_backend("kron_matmul_backward") == "torch"
    torch.testing.assert_close(x.grad, torch.ones(4, 6) @ torch.kron(*f).mT)
