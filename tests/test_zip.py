"""ZipLoRA ops: every CPU-runnable backend against the dense (materialised ΔW) formulation in float64."""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS, assert_rel

import specops
from specops import ZipLoRALinear
from specops._registry import OPS
from specops.zip import (
    GRAD_SLOTS,
    PENALTY_KINDS,
    merger_penalty,
    merger_penalty_reference,
    zip_lora_linear,
    zip_lora_linear_reference,
    zip_merge,
    zip_merge_lora,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# merger_penalty has no Triton kernel: its backend-forcing tests run over the backends it declares.
PENALTY_BACKENDS = [b for b in CPU_BACKENDS if b in OPS["merger_penalty"].kernels]
# What runs on CPU tensors when no backend is forced.
CPU_DEFAULT = "cpp" if "cpp" in CPU_BACKENDS else "torch"

# (out, in), (r_c, r_s), token batch: the shapes, unequal ranks both ways, odd sizes.
CASES = [
    ((3, 7), (1, 1), (2, 77)),
    ((3, 7), (4, 1), (4096,)),
    ((3, 7), (1, 4), (5,)),
    ((640, 640), (64, 64), (2, 77)),
    ((640, 640), (4, 1), (4096,)),
    ((1280, 2048), (64, 64), (2, 77)),
    ((1280, 2048), (1, 4), (4096,)),
]
# The Triton interpreter runs kernels in numpy, one program at a time: keep its cases tiny.
TRITON_MAX_WORK = 1e6
SCALES = (0.5, 2.0)


@pytest.fixture(params=PENALTY_BACKENDS)
def penalty_backend(request):
    """Run the test once per backend merger_penalty declares that can run on CPU tensors here, forced."""
    with specops.backend(request.param):
        yield request.param


def _ran(backend, *ops):
    for op in ops:
        assert specops.last_backend(op) == backend, op


def _ids(case):
    (o, i), (rc, rs), batch = case
    return f"{o}x{i}-r{rc}.{rs}-T{'x'.join(map(str, batch))}"


def _inputs(out_f, in_f, r_c, r_s, batch, dtype, bias=True, weight=True):
    """x, weight, bias, B_c, A_c, m_c, B_s, A_s, m_s with LoRA-like magnitudes (update ~ W / 10)."""
    x = torch.randn(*batch, in_f, dtype=dtype)
    W = torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5 if weight else None
    b = torch.randn(out_f, dtype=dtype) if bias else None
    lora = []
    for r in (r_c, r_s):
        B = torch.randn(out_f, r, dtype=dtype) / r**0.5
        A = torch.randn(r, in_f, dtype=dtype) / (10 * in_f**0.5)
        m = 1 + 0.5 * torch.randn(in_f, dtype=dtype)
        lora += [B, A, m]
    return [x, W, b, *lora]


def _oracle(args, scales, need):
    """Dense formulation in float64: output and the gradients of the `need` inputs for grad_y = gy."""
    t64 = [a.detach().double().requires_grad_(n) if a is not None else None for a, n in zip(args, need)]
    return t64, zip_lora_linear_reference(*t64, *scales)


def _skip_slow_triton(backend, out_f, in_f, r_c, r_s, batch, dtype):
    tokens = torch.Size(batch).numel()
    if backend == "triton" and tokens * (in_f + out_f) * (r_c + r_s) > TRITON_MAX_WORK:
        pytest.skip("too slow for the Triton interpreter (covered by the small shapes)")
    if backend == "triton" and tokens > 1024 and dtype != torch.float32:
        pytest.skip("many token blocks / splits: run once (float32) under the Triton interpreter")
    if dtype == torch.bfloat16 and tokens * in_f * out_f > 4e9:
        # CPUs without bf16 GEMM units take minutes here; the 640 x 640 x 4096-token case keeps the
        # bf16 token depth and the 1280 x 2048 x 154-token case the bf16 width.
        pytest.skip("bf16 at 1280 x 2048 x 4096 tokens: covered by the two cases beside it")


@functools.cache
def _dense_case(case):
    """float64 inputs, grad_y, and the dense oracle's output and gradients, once per case."""
    (out_f, in_f), (r_c, r_s), batch = case
    gen_state = torch.get_rng_state()
    torch.manual_seed(hash(_ids(case)) % 2**31)
    args = [a.requires_grad_() for a in _inputs(out_f, in_f, r_c, r_s, batch, torch.float64)]
    gy = torch.randn(*batch, out_f, dtype=torch.float64)
    torch.set_rng_state(gen_state)
    ref = zip_lora_linear_reference(*args, *SCALES)
    grads = torch.autograd.grad(ref, args, gy)
    return [a.detach() for a in args], gy, ref.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_linear_matches_dense(backend, case, dtype):
    """Output and all nine gradients vs the float64 dense formulation (inputs rounded to dtype;
    that rounding is within each dtype's tolerance)."""
    (out_f, in_f), (r_c, r_s), batch = case
    _skip_slow_triton(backend, out_f, in_f, r_c, r_s, batch, dtype)
    args64, gy, ref, refs = _dense_case(case)
    args = [a.to(dtype).requires_grad_() for a in args64]
    y = zip_lora_linear(*args, *SCALES)
    assert y.shape == (*batch, out_f) and y.dtype == dtype
    assert_rel(y, ref, dtype, scale=2.0)
    grads = torch.autograd.grad(y, args, gy.to(dtype))
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")
    for name, g, r in zip(GRAD_SLOTS, grads, refs):
        assert g.dtype == dtype and g.shape == r.shape, name
        # merger/LoRA-A gradients sum over tokens and rank: deeper accumulation than the output
        assert_rel(g, r, dtype, scale=4.0 if dtype != torch.float64 else 100.0)


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_optional_weight_and_bias(backend, weight, bias):
    args = _inputs(5, 11, 3, 2, (4, 6), torch.float64, bias=bias, weight=weight)
    for a in args:
        if a is not None:
            a.requires_grad_()
    y = zip_lora_linear(*args, 1.5, 0.25)
    t64, ref = _oracle(args, (1.5, 0.25), [a is not None for a in args])
    assert_rel(y, ref, torch.float64)
    present = [a for a in args if a is not None]
    grads = torch.autograd.grad(y.square().sum(), present)
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")
    refs = torch.autograd.grad(ref.square().sum(), [t for t in t64 if t is not None])
    for g, r in zip(grads, refs):
        assert_rel(g, r, torch.float64, scale=100.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ranks", [(9, 8), (30, 20), (60, 40)], ids=["R32", "R64", "R128"])
def test_rank_paddings(backend, ranks, dtype):
    """Every padded-rank configuration of the Triton kernels (16 is covered by CASES); one past the
    widest (fp32 R128) is refused by a forced triton."""
    args = _inputs(6, 10, *ranks, (20,), dtype)
    for a in args:
        a.requires_grad_()
    supports = OPS["zip_lora_linear"].kernels[backend].supports
    if supports is not None and supports(*args, 0.5, 2.0) is not None:
        with pytest.raises(specops.BackendError, match="refuses these inputs"):
            zip_lora_linear(*args, 0.5, 2.0)
        return
    y = zip_lora_linear(*args, 0.5, 2.0)
    t64, ref = _oracle(args, (0.5, 2.0), [True] * 9)
    assert_rel(y, ref, dtype, scale=2.0)
    gy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(ref, t64, gy.double())):
        assert_rel(g, r, dtype, scale=4.0)
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")


def test_wide_rank(backend):
    """r_c + r_s = 70: past the widest fp32 Triton configuration. A forced triton refuses it; with
    fallback=True the device default runs instead."""
    args = _inputs(5, 9, 40, 30, (6,), torch.float32)
    for a in args:
        a.requires_grad_()
    expected, allow = backend, contextlib.nullcontext()
    if backend == "triton":
        with pytest.raises(specops.BackendError, match=r"refuses these inputs: r_c \+ r_s = 70 pads to 128 > 64"):
            zip_lora_linear(*args, 0.5, 2.0)
        expected, allow = CPU_DEFAULT, specops.backend("triton", fallback=True)
    with allow:
        y = zip_lora_linear(*args, 0.5, 2.0)
        t64, ref = _oracle(args, (0.5, 2.0), [True] * 9)
        assert_rel(y, ref, torch.float32, scale=2.0)
        gy = torch.randn_like(y)
        for g, r in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(ref, t64, gy.double())):
            assert_rel(g, r, torch.float32, scale=4.0)
    _ran(expected, "zip_lora_linear", "zip_lora_linear_backward")


@pytest.mark.parametrize("need", [("m_c", "m_s"), ("x",), ("A_c", "B_s"), ("weight", "bias"), ("m_s",)])
def test_partial_gradients(backend, need):
    """Merger training asks only for m_c, m_s: exactly the requested gradients come back, right."""
    args = _inputs(6, 9, 2, 3, (2, 5), torch.float64)
    for name, a in zip(GRAD_SLOTS, args):
        a.requires_grad_(name in need)
    y = zip_lora_linear(*args)
    y.pow(2).sum().backward()
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")
    t64, ref = _oracle(args, (1.0, 1.0), [n in need for n in GRAD_SLOTS])
    ref.pow(2).sum().backward()
    for name, a, t in zip(GRAD_SLOTS, args, t64):
        if name in need:
            assert_rel(a.grad, t.grad, torch.float64, scale=100.0)
        else:
            assert a.grad is None


def test_non_contiguous_and_empty(backend):
    args = _inputs(7, 12, 2, 3, (5,), torch.float32)
    x = torch.randn(12, 10).t()[:, :]  # (10, 12) with strides (1, 10)
    y = zip_lora_linear(x, *args[1:])
    _, ref = _oracle([x, *args[1:]], (1.0, 1.0), [False] * 9)
    assert_rel(y, ref, torch.float32)
    x3 = torch.randn(4, 3, 24)[..., ::2]  # strided last dim
    assert_rel(zip_lora_linear(x3, *args[1:]), _oracle([x3, *args[1:]], (1.0, 1.0), [False] * 9)[1], torch.float32)
    empty = zip_lora_linear(torch.randn(0, 12), *args[1:])
    assert empty.shape == (0, 7)
    _ran(backend, "zip_lora_linear")


@pytest.mark.parametrize("weight", [True, False], ids=["base", "branch_only"])
def test_gradcheck(backend, weight):
    args = _inputs(3, 5, 2, 1, (2, 3), torch.float64, weight=weight)
    for a in args:
        if a is not None:
            a.requires_grad_()
    # fast mode (random projections) keeps the Triton interpreter's many launches affordable
    assert torch.autograd.gradcheck(lambda *a: zip_lora_linear(*a, 0.7, -1.3), args, fast_mode=backend == "triton")
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_penalty_gradcheck(penalty_backend, kind):
    mc = [(1 + torch.randn(n, dtype=torch.float64)).requires_grad_() for n in (3, 1, 6)]
    ms = [(1 + torch.randn(n, dtype=torch.float64)).requires_grad_() for n in (3, 1, 6)]
    assert torch.autograd.gradcheck(lambda *a: merger_penalty(a[:3], a[3:], kind), (*mc, *ms))
    _ran(penalty_backend, "merger_penalty", "merger_penalty_backward")


def test_penalty_has_no_triton_kernel():
    """Forcing a backend merger_penalty lacks is an error (or, on request, runs the default)."""
    mc, ms = [torch.ones(2, requires_grad=True)], [torch.ones(2)]
    with specops.backend("triton"):
        with pytest.raises(specops.BackendError, match="backend 'triton' is not implemented by merger_penalty"):
            merger_penalty(mc, ms)
    with specops.backend("triton", fallback=True):
        merger_penalty(mc, ms).backward()
    _ran(CPU_DEFAULT, "merger_penalty", "merger_penalty_backward")


def _sdxl_widths():
    """in_features of the 560 SDXL attention Linear layers (70 transformer blocks x 8 layers)."""
    widths = []
    for width, blocks in ((640, 10), (1280, 60)):
        widths += [width, width, width, width, width, 2048, 2048, width] * blocks  # attn1 q/k/v/out, attn2 q/k/v/out
    return widths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_penalty_matches_loop(penalty_backend, kind, dtype):
    widths = _sdxl_widths()
    assert len(widths) == 560
    mc = [(1 + 0.3 * torch.randn(n)).to(dtype).requires_grad_() for n in widths]
    ms = [(1 + 0.3 * torch.randn(n)).to(dtype).requires_grad_() for n in widths]
    p = merger_penalty(mc, ms, kind)
    assert p.dim() == 0 and p.dtype == dtype
    m64 = [t.detach().double().requires_grad_() for t in mc + ms]
    ref = merger_penalty_reference(m64[:560], m64[560:], kind)
    assert_rel(p, ref, dtype)
    grads = torch.autograd.grad(p, mc + ms)
    _ran(penalty_backend, "merger_penalty", "merger_penalty_backward")
    refs = torch.autograd.grad(ref, m64)
    assert_rel(torch.cat(grads), torch.cat(refs), dtype, scale=2.0)


def test_penalty_cosine_has_zero_gradient_at_ones(penalty_backend):
    mc = [torch.ones(n, requires_grad=True) for n in (4, 9)]
    ms = [torch.ones(n, requires_grad=True) for n in (4, 9)]
    grads = torch.autograd.grad(merger_penalty(mc, ms, "cosine"), mc + ms)
    assert all(g.abs().max() < 1e-6 for g in grads)
    grads = torch.autograd.grad(merger_penalty(mc, ms, "abs_product"), mc + ms)
    assert all(g.abs().min() > 0 for g in grads)
    _ran(penalty_backend, "merger_penalty", "merger_penalty_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_lora_reproduces_dense_merge(dtype):
    """Acceptance 2: B_m A_m == zip_merge(ΔW_c, ΔW_s) to round-off (checked in float64 too)."""
    _, _, _, B_c, A_c, m_c, B_s, A_s, m_s = _inputs(40, 33, 4, 7, (1,), dtype)
    B_m, A_m = zip_merge_lora(B_c, A_c, B_s, A_s, m_c, m_s, 0.5, 3.0)
    assert B_m.shape == (40, 11) and A_m.shape == (11, 33)
    dense = zip_merge(0.5 * (B_c @ A_c), 3.0 * (B_s @ A_s), m_c, m_s)
    assert_rel(B_m @ A_m, dense, dtype, scale=2.0)
    d64 = [t.double() for t in (B_c, A_c, B_s, A_s, m_c, m_s)]
    B64, A64 = zip_merge_lora(*d64, 0.5, 3.0)
    exact = zip_merge(0.5 * (d64[0] @ d64[1]), 3.0 * (d64[2] @ d64[3]), d64[4], d64[5])
    assert_rel(B64 @ A64, exact, torch.float64)


def test_merge_gradients():
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((4, 3), (4, 3), (3,), (3,))]
    assert torch.autograd.gradcheck(zip_merge, args)
    lora = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((4, 2), (2, 3), (4, 1), (1, 3), (3,), (3,))]
    assert torch.autograd.gradcheck(lambda *a: zip_merge_lora(*a, 0.5, 2.0), lora)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_equals_dense(backend, dtype):
    base = torch.nn.Linear(24, 10).to(dtype)
    _, _, _, B_c, A_c, _, B_s, A_s, _ = _inputs(10, 24, 3, 5, (1,), dtype)
    mod = ZipLoRALinear(base, (B_c, A_c, 0.5), (B_s, A_s), init=0.8)
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["m_c", "m_s"]
    assert torch.equal(mod.m_c.detach(), torch.full((24,), 0.8, dtype=dtype))
    with torch.no_grad():
        mod.m_c.mul_(torch.linspace(0.5, 1.5, 24, dtype=dtype))
    x = torch.randn(3, 7, 24, dtype=dtype)
    y = mod(x)
    W64 = base.weight.double() + zip_merge(0.5 * B_c @ A_c, B_s @ A_s, mod.m_c, mod.m_s).double()
    dense = F.linear(x.double(), W64, base.bias.double())
    assert_rel(y, dense, dtype, scale=2.0)
    B_m, A_m = mod.lora_factors()
    assert_rel(F.linear(x.double(), base.weight.double(), base.bias.double()) + x.double() @ (B_m.double() @ A_m.double()).t(),
               dense, dtype, scale=2.0)
    y.sum().backward()
    assert mod.m_c.grad is not None and mod.m_s.grad is not None and base.weight.grad is None
    _ran(backend, "zip_lora_linear", "zip_lora_linear_backward")


def test_module_merger_training_step_lowers_the_loss():
    torch.manual_seed(1)
    base = torch.nn.Linear(16, 8)
    _, _, _, B_c, A_c, _, B_s, A_s, _ = _inputs(8, 16, 2, 2, (1,), torch.float32)
    mod = ZipLoRALinear(base, (B_c * 10, A_c * 10), (B_s * 10, A_s * 10))
    x = torch.randn(32, 16)
    with torch.no_grad():
        target = F.linear(x, base.weight + B_c @ A_c * 100, base.bias)  # content only
    opt = torch.optim.Adam(mod.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(mod(x), target) + 0.01 * merger_penalty([mod.m_c], [mod.m_s])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_opcheck():
    args = _inputs(4, 6, 2, 3, (5,), torch.float64)
    for a in args:
        a.requires_grad_()
    torch.library.opcheck(torch.ops.specops.zip_lora_linear, (*args, 0.5, 2.0))
    torch.library.opcheck(torch.ops.specops.zip_lora_linear, (args[0], None, None, *args[3:], 1.0, 1.0))
    gy = torch.randn(5, 4, dtype=torch.float64)
    det = [a.detach() for a in args]
    for need in ([True] * 9, [False, False, False, False, False, True, False, False, True]):
        torch.library.opcheck(
            torch.ops.specops.zip_lora_linear_backward, (gy, det[0], det[1], *det[3:], 0.5, 2.0, need)
        )
    mc = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (3, 5)]
    ms = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (3, 5)]
    for kind in PENALTY_KINDS:
        torch.library.opcheck(torch.ops.specops.merger_penalty, (mc, ms, kind))
        torch.library.opcheck(
            torch.ops.specops.merger_penalty_backward,
            (torch.tensor(1.5, dtype=torch.float64), [m.detach() for m in mc], [m.detach() for m in ms], kind),
        )
    torch.library.opcheck(torch.ops.specops.zip_merge, (args[4].t(), args[7].t()[:, :2], args[5][:2], args[8][:2]))
    B_c, A_c, m_c, B_s, A_s, m_s = args[3:]
    torch.library.opcheck(torch.ops.specops.zip_merge_lora, (B_c, A_c, B_s, A_s, m_c, m_s, 0.5, 2.0))


def test_compile_fullgraph():
    base = torch.nn.Linear(12, 6)
    _, _, _, B_c, A_c, _, B_s, A_s, _ = _inputs(6, 12, 2, 3, (1,), torch.float32)
    mod = ZipLoRALinear(base, (B_c, A_c, 0.5), (B_s, A_s))
    x = torch.randn(4, 12)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        loss = mod(x).square().mean() + 0.01 * merger_penalty([mod.m_c], [mod.m_s], "dot")
        B_m, A_m = mod.lora_factors()
        return loss, B_m, A_m

    loss, B_m, A_m = step(x)
    loss.backward()
    grads = [mod.m_c.grad.clone(), mod.m_s.grad.clone()]
    mod.zero_grad()
    eager = mod(x).square().mean() + 0.01 * merger_penalty([mod.m_c], [mod.m_s], "dot")
    eager.backward()
    assert_rel(loss, eager, torch.float32)
    for g, m in zip(grads, (mod.m_c, mod.m_s)):
        assert_rel(g, m.grad, torch.float32)
    assert_rel(B_m @ A_m, zip_merge(0.5 * B_c @ A_c, B_s @ A_s, mod.m_c, mod.m_s), torch.float32)


def _good():
    return _inputs(8, 10, 3, 2, (4,), torch.float32)


def _with(i, value):
    args = _good()
    args[i] = value
    return args


@pytest.mark.parametrize(
    "args,match",
    [
        (_with(0, torch.randn(4, 9)), r"x: expected shape \(\.\.\., in_features=10\)"),
        (_with(1, torch.randn(8)), r"weight: expected shape \(out_features, in_features\)"),
        (_with(2, torch.randn(7)), r"bias: expected shape \(out_features=8,\)"),
        (_with(3, torch.randn(8, 2)), r"B_c: expected shape \(out_features=8, r_c=3\)"),
        (_with(3, torch.randn(9, 3)), r"B_c: expected shape \(out_features=8, r_c=3\)"),
        (_with(4, torch.randn(3, 11)), r"A_c: expected shape \(r_c, in_features=10\)"),
        (_with(5, torch.randn(9)), r"m_c: expected shape \(in_features=10,\)"),
        (_with(6, torch.randn(8, 3)), r"B_s: expected shape \(out_features=8, r_s=2\)"),
        (_with(7, torch.randn(2, 8)), r"A_s: expected shape \(r_s, in_features=10\)"),
        (_with(8, torch.randn(10, 1)), r"m_s: expected shape \(in_features=10,\)"),
        (_with(8, torch.randn(10, dtype=torch.float64)), r"m_s: dtype torch.float64 differs"),
        (_with(0, torch.ones(4, 10, dtype=torch.int64)), r"x: expected a floating dtype"),
    ],
)
def test_errors_linear(args, match):
    with pytest.raises(ValueError, match=match):
        zip_lora_linear(*args)


def test_errors_module_merge_and_penalty():
    base = torch.nn.Linear(10, 8)
    with pytest.raises(ValueError, match=r"A_s: expected shape \(r_s, in_features=10\)"):
        ZipLoRALinear(base, (torch.randn(8, 2), torch.randn(2, 10)), (torch.randn(8, 2), torch.randn(2, 12)))
    with pytest.raises(ValueError, match=r"B_c: expected shape \(out_features=8, r_c=2\)"):
        ZipLoRALinear(base, (torch.randn(6, 2), torch.randn(2, 10)), (torch.randn(8, 2), torch.randn(2, 10)))
    with pytest.raises(ValueError, match=r"content: expected a \(B, A\)"):
        ZipLoRALinear(base, torch.randn(8, 2), (torch.randn(8, 2), torch.randn(2, 10)))
    with pytest.raises(ValueError, match=r"m_s: expected shape \(in_features=5,\)"):
        zip_merge(torch.randn(4, 5), torch.randn(4, 5), torch.randn(5), torch.randn(4))
    with pytest.raises(ValueError, match=r"m_s: expected shape \(in_features=5,\)"):  # the op checks, not the wrapper
        torch.ops.specops.zip_merge(torch.randn(4, 5), torch.randn(4, 5), torch.randn(5), torch.randn(4))
    with pytest.raises(ValueError, match=r"delta_s: expected shape \(4, 5\)"):
        zip_merge(torch.randn(4, 5), torch.randn(5, 4), torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match=r"B_s: expected shape \(out_features=4, r_s=1\)"):
        zip_merge_lora(torch.randn(4, 2), torch.randn(2, 5), torch.randn(3, 1), torch.randn(1, 5), torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match=r"m_s_list\[1\]: expected shape \(3,\) like m_c_list\[1\]"):
        merger_penalty([torch.randn(2), torch.randn(3)], [torch.randn(2), torch.randn(4)])
    with pytest.raises(ValueError, match=r"m_s_list: expected 2 vectors"):
        merger_penalty([torch.randn(2), torch.randn(3)], [torch.randn(2)])
    with pytest.raises(ValueError, match=r"kind: expected one of"):
        merger_penalty([torch.randn(2)], [torch.randn(2)], "l2")
    with pytest.raises(ValueError, match=r"m_c_list: expected a non-empty list"):
        merger_penalty([], [])


def test_errors_backward_op():
    args = [a.detach() for a in _good()]
    gy = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"need: expected 9 flags, one per \('x', 'weight'"):
        torch.ops.specops.zip_lora_linear_backward(gy, args[0], args[1], *args[3:], 1.0, 1.0, [True] * 8)
    with pytest.raises(ValueError, match="need: a weight gradient was asked for but weight is None"):
        torch.ops.specops.zip_lora_linear_backward(gy, args[0], None, *args[3:], 1.0, 1.0, [True] * 9)


def test_backends_listed():
    assert "torch" in CPU_BACKENDS
    assert specops.zip.zip_lora_linear is zip_lora_linear
