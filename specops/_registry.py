"""The op registry: every specops op is declared once, with `declare`, and the rest comes from that.

A declaration gives an op's
  - schema (the torch.library schema, without the name),
  - kernels: {backend: Kernel(fn, supports)} — fn takes the op's arguments; supports(*args) returns
    None when fn handles these inputs, else the reason it does not (e.g. a register tile too small),
  - check(*args): the input validation, written with torch._check_with(ValueError, ...) so that it
    runs on fake tensors with symbolic shapes too; it runs before every real and every fake kernel,
  - fake(*args): the output allocation for fake tensors (after check),
  - reference(*args): the pure-torch oracle the test matrix compares every backend against,
  - backward: the name of the op's backward op (itself declared here) and the autograd wiring
    (setup_context, backward), registered with torch.library.register_autograd; the backward op
    gets an autograd of its own from its "torch" kernel (_register_higher_order), so every op has
    derivatives of every order: the first runs the chosen backend's backward kernel, the second and
    later autograd through the torch kernel's ops (gradgradcheck in the test matrix),
  - samples(device, dtype): example inputs, from which the test matrix is built (it casts every
    floating tensor argument to each dtype it tests, except those named in fixed_dtype, e.g. a
    float64 step counter),
  - doc: the public wrapper's docstring,
  - vmap: a torch.library batching rule (default for an op that writes no input: call the op once
    per batch entry and stack, _vmap_loop; a vmap of a composite op's body inside its rule trips a
    functorch internal assert in torch 2.13, so composites loop too).
  - torch_autograd: for an op with only a torch kernel and no backward op, autograd through it.
From it come the torch.library registration (define, one dispatch kernel for every device, the fake,
the autograd), the public wrapper (returned by `declare`), `available_backends(op)` and the rows of
tests/test_ops.py. Under forward-mode AD or a torch.func grad/jvp transform the wrapper runs the op as
an autograd.Function of its own (_function: the same forward and backward, plus a jvp), which
torch.library's autograd cannot provide there. A plain eager call (no compile, transform, dispatch mode
or profiler; plain tensors) skips the dispatcher: the same check, choice and kernel, differentiated by
the op's own autograd pair in a plain autograd.Function (_call_eager) — torch.library's Python autograd
and redispatches cost as much as a small layer's arithmetic. torch.ops.specops.* keeps the registered path.

A composite op (composite=True) has no kernels: it is written in torch ops (and other specops ops,
which choose their own backends) and registered as CompositeImplicitAutograd, so autograd, fake
tensors and torch.compile come from its decomposition and backend forcing does not apply to it.

Backend choice (`choose`): a backend forced with `specops.backend(name)` (or SPECOPS_BACKEND) must be
declared by the op, able to run on the inputs' device, and accepted by the kernel's `supports`;
otherwise a BackendError names the op, the backend and what the op has instead — unless the caller
asked for `fallback=True`, which runs the device default. The backend a call ran is kept per op:
`last_backend(name)`.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch._functorch import pyfunctorch
from torch.autograd import forward_ad
from torch.utils import _pytree as pytree

from . import _backend

NAMESPACE = "specops"
# Device defaults, in order of preference; "torch" kernels run everywhere and end every list.
# CUDA: the extension's hand-written kernels first (on an H200, kron_matmul's ran 1.6-6.5x faster than its
# Triton kernel, fp32, every benchmark shape), Triton for the ops they do not cover
DEFAULT_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendError(RuntimeError):
    """A forced backend that an op does not declare, cannot run here, or refuses for these inputs."""


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of an op: fn(*op_args), and which inputs it handles."""

    fn: Callable
    supports: Callable[..., str | None] | None = None


@dataclass
class Op:
    name: str
    schema: str
    kernels: dict[str, Kernel]
    check: Callable | None
    fake: Callable | None
    reference: Callable | None
    backward: str | None
    samples: Callable | None
    composite: bool
    tol_scale: float
    dtypes: tuple[torch.dtype, ...]
    fixed_dtype: tuple[str, ...] = ()
    # (setup_context, backward) when differentiable: the declared pair, or the torch kernel's autograd
    autograd: tuple[Callable, Callable] | None = field(default=None, repr=False)
    body: Callable | None = field(default=None, repr=False)  # a composite's checked body
    function: type | None = field(default=None, repr=False)  # its autograd.Function (_function)
    eager: type | None = field(default=None, repr=False)  # and its eager one (_eager_function)
    public: Callable | None = field(default=None, repr=False)  # the wrapper `declare` returns
    last: str | None = field(default=None, repr=False)

    @property
    def qualname(self) -> str:
        return self.name if "::" in self.name else f"{NAMESPACE}::{self.name}"

    @property
    def overload(self):
        ns, name = self.qualname.split("::")
        return getattr(getattr(torch.ops, ns), name).default

    def mutated(self) -> list[int]:
        """Positions of the arguments the op writes to (alias annotation `!` in the schema)."""
        return [i for i, a in enumerate(self.overload._schema.arguments) if a.alias_info and a.alias_info.is_write]


OPS: dict[str, Op] = {}

_FLOATS = (torch.float64, torch.float32, torch.bfloat16)


def declare(
    name: str,
    schema: str,
    *,
    kernels: dict[str, Kernel | Callable] | None = None,
    check: Callable | None = None,
    fake: Callable | None = None,
    reference: Callable | None = None,
    backward: str | None = None,
    setup_context: Callable | None = None,
    backward_fn: Callable | None = None,
    samples: Callable | None = None,
    composite: Callable | None = None,
    doc: str | None = None,
    tol_scale: float = 1.0,
    dtypes: tuple[torch.dtype, ...] = _FLOATS,
    fixed_dtype: tuple[str, ...] = (),
    vmap: Callable | None = None,
    torch_autograd: bool = False,
):
    """Declare and register op `name` (see the module docstring); returns its public wrapper.

    `composite` is the op's body for a composite op (instead of kernels and fake). `backward` names
    the backward op; `setup_context` and `backward_fn` are torch.library.register_autograd's pair.
    `torch_autograd`: an op with only a "torch" kernel and no backward op of its own, differentiated
    (to any order) by autograd through that kernel's torch ops.
    """
    if name in OPS:
        raise ValueError(f"declare: op {name!r} is already declared")
    kernels = {b: k if isinstance(k, Kernel) else Kernel(k) for b, k in (kernels or {}).items()}
    for b in kernels:
        if b not in _backend.BACKENDS:
            raise ValueError(f"declare({name!r}): unknown backend {b!r}; expected one of {_backend.BACKENDS}")
    if composite is None and "torch" not in kernels:
        raise ValueError(f"declare({name!r}): every op needs a 'torch' kernel (the fallback on every device)")
    if backward is not None:
        lacking = set(kernels) - set(_op(backward).kernels)
        if lacking:
            raise ValueError(f"declare({name!r}): its backward op {backward!r} lacks the backends {sorted(lacking)}")
    op = Op(name, schema, kernels, check, fake, reference, backward, samples, composite is not None,
            tol_scale, dtypes, fixed_dtype)
    qual = op.qualname
    torch.library.define(qual, schema)
    # The dispatcher leaves trailing arguments equal to their defaults out of a Python kernel's call.
    defaults = tuple(a.default_value if a.has_default_value() else None for a in op.overload._schema.arguments)
    if composite is not None:
        op.body = _checked(composite, check, defaults)
        torch.library.impl(qual, "CompositeImplicitAutograd")(op.body)
    else:
        torch.library.impl(qual, "CompositeExplicitAutograd")(_dispatcher(op, defaults))
        torch.library.register_fake(qual)(_checked(fake, check, defaults))
    if backward_fn is not None:
        op.autograd = _keeping_backend(setup_context, _trimmed(backward_fn))
        torch.library.register_autograd(qual, op.autograd[1], setup_context=op.autograd[0])
    if backward is not None:
        _register_higher_order(_op(backward))
    if torch_autograd:
        if set(kernels) != {"torch"} or backward is not None:
            raise ValueError(f"declare({name!r}): torch_autograd is for ops with only a 'torch' kernel and no backward op")
        _register_higher_order(op)
    if vmap is not None or not op.mutated():
        torch.library.register_vmap(qual, vmap or _vmap_loop(op))
    OPS[name] = op
    return _wrapper(op, doc)


def _flat(args) -> list:
    """The tensors of `args` (Tensor[] arguments flattened), in order."""
    return [t for a in args for t in (a if _tensor_list(a) else (a,)) if isinstance(t, torch.Tensor)]


def _unflat(args, tensors, others=lambda a: a):
    """`args` with its tensors replaced, in order, by `tensors`, and every other argument by others(it)."""
    it = iter(tensors)
    swap = lambda t: next(it) if isinstance(t, torch.Tensor) else others(t)  # noqa: E731
    return tuple([swap(t) for t in a] if _tensor_list(a) else swap(a) for a in args)


def _tensor_list(a) -> bool:
    return isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a)


def _register_higher_order(bop: Op) -> None:
    """Autograd for a backward op, so every op has second (and higher) derivatives: the backward op's
    "torch" kernel, written in torch ops, recomputed and differentiated by autograd. The first
    derivative still runs the chosen backend's kernel; the second goes through torch ops. Registered
    once, when the first forward op naming `bop` as its backward is declared (and for a torch_autograd
    op, on itself)."""
    if bop.autograd is not None:
        return
    torch_fn = bop.kernels["torch"].fn

    def setup_context(ctx, inputs, output):
        ctx.structure = inputs
        ctx.save_for_backward(*_flat(inputs))

    def backward(ctx, *grads):
        create = torch.is_grad_enabled()  # a third derivative wanted: keep the graph to the inputs
        saved = ctx.saved_tensors
        tensors = list(saved) if create else [t.detach().requires_grad_(t.requires_grad) for t in saved]
        wanted = [t for t in tensors if t.requires_grad]
        with torch.enable_grad():
            outs = torch_fn(*_unflat(ctx.structure, tensors))
        grads = [g for a in grads for g in (a if isinstance(a, (list, tuple)) else (a,))]  # Nones kept in place
        pairs = [(o, g) for o, g in zip(_flat([outs]), grads) if o.requires_grad and g is not None]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                         create_graph=create) if pairs and wanted else [None] * len(wanted))
        return _unflat(ctx.structure, [next(found) if t.requires_grad else None for t in tensors], lambda a: None)

    bop.autograd = (setup_context, backward)
    torch.library.register_autograd(bop.qualname, backward, setup_context=setup_context)


def _vmap_loop(op: Op):
    """The batching rule of an op without one of its own: the op called once per batch entry, the
    results stacked (correct for any op; ops whose kernels batch natively declare a faster `vmap`)."""

    def pick(a, d, i):
        if isinstance(a, (list, tuple)):  # Tensor[] (and bool[], whose in_dims may be a list of None)
            dims = d if isinstance(d, (list, tuple)) else [d] * len(a)
            return [pick(t, e, i) for t, e in zip(a, dims)]
        return a if d is None else a.select(d, i)

    def rule(info, in_dims, *args):
        outs = [op.overload(*[pick(a, d, i) for a, d in zip(args, in_dims)]) for i in range(info.batch_size)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        kind = list if isinstance(outs[0], list) else tuple
        return kind(torch.stack(parts) for parts in zip(*outs)), kind([0] * len(outs[0]))

    return rule


def _keeping_backend(setup_context, backward_fn):
    """The autograd pair with the forward's forced backend (specops.backend, a context variable) carried
    into the backward: autograd runs the backward of CUDA tensors on a device thread of its own, where
    the caller's block is not set, and the backward op would run the device default instead."""

    def setup(ctx, inputs, output):
        ctx.forced_backend = _backend._forced.get()
        setup_context(ctx, inputs, output)

    def backward(ctx, *grads):
        token = _backend._forced.set(ctx.forced_backend)
        try:
            return backward_fn(ctx, *grads)
        finally:
            _backend._forced.reset(token)

    return setup, backward


def _trimmed(backward_fn):
    """backward_fn returning one gradient per schema argument, for autograd, which expects one per
    argument passed (the dispatcher leaves trailing defaults out; setup_context gets them filled in)."""

    def run(ctx, *grads):
        out = backward_fn(ctx, *grads)
        return tuple(out)[: len(ctx.needs_input_grad)] if isinstance(out, tuple) else out

    return run


def _checked(fn, check, defaults):
    n = len(defaults)

    def run(*args):
        if len(args) < n:
            args = (*args, *defaults[len(args):])
        if check is not None:
            check(*args)
        return fn(*args)

    return run


def _dispatcher(op: Op, defaults):
    n = len(defaults)

    def run(*args):
        if len(args) < n:
            args = (*args, *defaults[len(args):])
        return _run(op, args)

    return run


def _run(op: Op, args):
    """The kernel call of a non-composite op on its full argument tuple: check, choose, run."""
    if op.check is not None:
        op.check(*args)
    device_type = _device_type(args)
    name = op.last = choose(op, args, device_type)
    if torch.is_autocast_enabled(device_type):
        # No op has an autocast kernel: its kernels run in the inputs' dtypes, as its fake says.
        with torch.autocast(device_type, enabled=False):
            return op.kernels[name].fn(*args)
    return op.kernels[name].fn(*args)


def _transformed() -> bool:
    """Forward-mode AD, or a torch.func grad / jvp transform, is active (vmap alone is the op's batching
    rule). torch.library's autograd serves neither: it registers no jvp, and its autograd.Function is
    not one that torch.func can run."""
    if forward_ad._current_level >= 0:
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None and any(
        i.key() in (pyfunctorch.TransformType.Grad, pyfunctorch.TransformType.Jvp)
        for i in pyfunctorch.retrieve_all_functorch_interpreters())


class _Box:
    """A call's non-tensor structure: its arguments in, its output's treespec out of Function.forward.
    One opaque object (a pytree leaf), so torch.func sees only the tensors as the Function's inputs."""

    def __init__(self, args):
        self.args, self.spec = args, None


def _function(op: Op) -> type:
    """The op as an autograd.Function that torch.func and forward-mode AD can run: forward is the op
    itself (the chosen backend), backward the op's own autograd pair (so the backward op's wrapper, and
    its own Function, serve the next order), jvp two reverse passes through the "torch" kernel.
    Tensor[] arguments and outputs are flattened (autograd.Function tracks only top-level tensors)."""
    if op.function is not None:
        return op.function
    setup, backward = op.autograd
    torch_fn = op.kernels["torch"].fn
    single = len(op.overload._schema.returns) == 1

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(box, *tensors):
            leaves, spec = pytree.tree_flatten(op.overload(*_unflat(box.args, tensors)))
            box.spec = spec
            return tuple(leaves)

        @staticmethod
        def setup_context(ctx, inputs, output):
            box, *tensors = inputs
            args = ctx.args = box.args
            ctx.out_spec = box.spec
            ctx.save_for_forward(*tensors)
            full = _unflat(args, tensors)
            setup(ctx, full, pytree.tree_unflatten(list(output), ctx.out_spec))
            # the declared backward reads needs_input_grad per op argument, not per flattened tensor
            ctx.arg_needs = _unflat(args, [t.requires_grad for t in tensors], lambda a: False)

        @staticmethod
        def backward(ctx, *grads):
            return _flat_backward(ctx, grads, backward, single)

        @staticmethod
        def jvp(ctx, _box, *tangents):
            # J·t as the vjp, at t, of the (linear) vjp u -> Jᵀu through the torch kernel: torch.func.vjp
            # runs inside forward-mode AD and under torch.func.jvp, where autograd's forward mode cannot nest.
            primals = ctx.saved_tensors
            live = [i for i, (p, t) in enumerate(zip(primals, tangents)) if t is not None and p.is_floating_point()]

            def fn(*ts):
                full = list(primals)
                for i, t in zip(live, ts):
                    full[i] = t
                return tuple(pytree.tree_leaves(torch_fn(*_unflat(ctx.args, full))))

            if not live:
                return tuple(torch.zeros_like(o) for o in fn())
            outs, vjp = torch.func.vjp(fn, *[primals[i] for i in live])
            _, vjp_of_vjp = torch.func.vjp(lambda *us: vjp(us), *[torch.zeros_like(o) for o in outs])
            return vjp_of_vjp(tuple(tangents[i] for i in live))

    Function.__name__ = Function.__qualname__ = f"{op.name}_function"
    op.function = Function
    return Function


def _flat_backward(ctx, grads, backward, single: bool) -> tuple:
    """An op Function's backward: the op's declared backward on its structured arguments and outputs,
    its gradients flattened as the Function's inputs (None for the leading _Box)."""
    ctx.needs_input_grad = tuple(any(a) if isinstance(a, list) else a for a in ctx.arg_needs)
    grads = pytree.tree_unflatten(list(grads), ctx.out_spec)
    per_arg = backward(ctx, grads) if single else backward(ctx, *grads)
    per_arg = per_arg if isinstance(per_arg, tuple) else (per_arg,)
    flat = []
    for a, g in zip(ctx.args, per_arg):
        if _tensor_list(a):
            flat.extend(g if g is not None else [None] * len(a))
        elif isinstance(a, torch.Tensor):
            flat.append(g)
    return (None, *flat)


def _eager_function(op: Op) -> type:
    """The op as a plain autograd.Function for eager calls (_call_eager): forward runs the chosen kernel
    and the op's setup_context, backward its declared backward. (A forward(ctx, ...) Function: one with
    a separate setup_context binds its arguments through inspect at every call.)"""
    if op.eager is not None:
        return op.eager
    setup, declared_backward = op.autograd
    single = len(op.overload._schema.returns) == 1

    def forward(ctx, box, *tensors):
        out = _run(op, box.args)
        setup(ctx, box.args, out)
        ctx.args, ctx.arg_needs = box.args, box.needs
        leaves, ctx.out_spec = pytree.tree_flatten(out)
        box.spec = ctx.out_spec
        return tuple(leaves)

    def backward(ctx, *grads):
        return _flat_backward(ctx, grads, declared_backward, single)

    # made with type() so that its graph nodes are named after the op (kron_matmul_eagerBackward)
    op.eager = type(f"{op.name.split('::')[-1]}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return op.eager


def _call_transformed(op: Op, args):
    """One call of `op` under forward-mode AD or a torch.func transform (see _transformed)."""
    if op.composite:  # its body, at the transform's level: the ops inside take this path themselves
        return op.body(*args)
    if op.autograd is None:  # an optimiser step: it writes its inputs and has no derivative
        return op.overload(*args)
    box = _Box(args)
    leaves = _function(op).apply(box, *_flat(args))
    return pytree.tree_unflatten(list(leaves), box.spec)


def _eager() -> bool:
    """A plain eager call, which may skip the dispatcher (_call_eager) if its tensors are plain ones (not
    fake tensors or other subclasses): no torch.compile tracing, no torch.func transform (vmap included)
    or forward-mode AD, no dispatch mode or profiler (they see the op as torch.ops.specops.*)."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
                or forward_ad._current_level >= 0 or torch._C._len_torch_dispatch_stack() > 0
                or torch.autograd.profiler._is_profiler_enabled)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _call_eager(op: Op, args, tensors):
    """One eager call without the dispatcher's Python layers (half an op's fixed cost on a small layer):
    the kernel itself when nothing needs a gradient, else _eager_function's Function calling it, with
    the op's own autograd pair; torch.ops.specops.* runs the same check, choice and kernels."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _run(op, args)
    box = _Box(args)
    box.needs = _unflat(args, [t.requires_grad for t in tensors], lambda a: False)
    leaves = _eager_function(op).apply(box, *tensors)
    return pytree.tree_unflatten(list(leaves), box.spec)


def _wrapper(op: Op, doc: str | None):
    overload = op.overload
    signature = _signature(overload._schema)
    defaults = tuple(p.default for p in signature.parameters.values())

    def call(*args, **kwargs):
        if kwargs:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        elif len(args) < len(defaults):
            args = (*args, *defaults[len(args):])
        # (ops that write their inputs have no autograd and keep the dispatcher; a backward op's autograd
        # is registered after its wrapper is made)
        if not op.composite and op.autograd is not None and _eager():
            tensors = _flat(args)
            if all(type(t) in _PLAIN for t in tensors):
                return _call_eager(op, args, tensors)
        # (not under torch.compile, which traces the op itself)
        if not torch.compiler.is_compiling() and _transformed():
            return _call_transformed(op, args)
        return overload(*args)

    call.__name__ = call.__qualname__ = op.name.split("::")[-1]
    call.__doc__ = doc
    call.__signature__ = signature
    call.op = op
    op.public = call
    return call


def _signature(schema) -> inspect.Signature:
    params = []
    for a in schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = a.default_value if a.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(a.name, kind, default=default))
    return inspect.Signature(params)


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device.type
    return "cpu"


def _refusal(op: Op, name: str, device_type: str, args) -> str | None:
    """None when backend `name` runs these inputs of `op`, else why it does not."""
    kernel = op.kernels.get(name)
    if kernel is None:
        return f"is not implemented by {op.name} (it has {', '.join(op.kernels)})"
    why = _backend._why_not(name, device_type)
    if why is not None:
        return f"cannot run on {device_type}: {why}"
    if kernel.supports is not None:
        why = kernel.supports(*args)
        if why is not None:
            return f"refuses these inputs: {why}"
    return None


def choose(op: Op, args, device_type: str | None = None) -> str:
    """The backend `op` runs for `args`: the forced one (see the module docstring), else the first of
    DEFAULT_ORDER for the inputs' device that the op declares, can run here and accepts the inputs."""
    device_type = device_type or _device_type(args)
    forced, fallback = _backend.forced()
    if forced is not None:
        why = _refusal(op, forced, device_type, args)
        if why is None:
            return forced
        if not fallback:
            raise BackendError(
                f"{op.qualname}: backend {forced!r} {why}; use specops.backend({forced!r}, fallback=True) "
                f"to run the device default instead"
            )
    for name in DEFAULT_ORDER.get(device_type, ("torch",)):
        if name in op.kernels and _refusal(op, name, device_type, args) is None:
            return name
    return "torch"


def last_backend(name: str) -> str | None:
    """The backend the latest call of op `name` ran (None before its first call; composite ops: None)."""
    return _op(name).last


def _op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; declared ops: {', '.join(sorted(OPS))}")
    return OPS[name]


def available_backends(name: str | None = None) -> dict[str, str]:
    """What can run here: {backend: "available on <devices>" or the reason it is not}.

    Without `name`, for this install as a whole; with an op's name, for the backends that op
    declares ("composite" for an op made of torch ops). Reported for CPU tensors, and for CUDA
    tensors when a GPU is visible (this may query the driver, which is why import never calls it).
    """
    if name is None:
        return _backend.available_backends()
    op = _op(name)
    if op.composite:
        return {"composite": "available on every device (made of torch ops)"}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {}
    for b in op.kernels:
        reasons = {d: _backend._why_not(b, d) for d in devices}
        where = [d for d, r in reasons.items() if r is None]
        out[b] = "available on " + ", ".join(where) if where else "; ".join(dict.fromkeys(reasons.values()))
    return out


def triton_module(name: str):
    """specops.triton_kernels.<name>, imported on first use (importing triton is slow and may fail)."""
    return importlib.import_module(f"specops.triton_kernels.{name}")
