"""Adapters (specops.adapters): identity start, ΔW consistency, scale, fuse, gradients, config, errors.

The oracle of every forward is the dense layer F.linear(x, W0 + delta_weight(), b); delta_weight itself
is checked against dense formulas (torch.kron, torch.block_diag, dense Cayley solve) for the methods
whose transpose conventions matter.
"""
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_TOL, assert_rel, case_id, loha_path, rel_err
from torch import nn

from specops import SODA_TABLE, adapters
from specops.adapters import ADAPTER_TYPES, make_adapter

F64 = torch.float64
# (out, in, bias): wide (out < in), square without bias, tall (out > in: k = in, degenerate split of 10)
SHAPES = [(12, 18, True), (16, 16, False), (24, 10, True)]
CASES = [
    ("lora", {"rank": 3}),
    ("loha", {"rank": 2}),
    ("lokr", {}),
    ("lokr", {"rank": 2, "factor": [2, 2]}),
    ("lokr", {"rank": 2, "w1_rank": 1, "alpha": 3.0}),
    ("oft", {"blocks": 2}),
    ("oft", {"blocks": 4, "side": "output", "rescale": True, "constraint": 0.05}),
    ("koft", {}),
    ("svdiff", {}),
    ("svdiff", {"activation": "softplus"}),
    ("soda-svd", {"side": "input"}),
    ("soda-svd", {"side": "basis", "activation": "none"}),
    ("soda-lq", {"side": "input"}),
    ("soda-lq", {"side": "basis"}),
    ("ziplora", {}),
]
SPECTRAL = ("svdiff", "soda-svd", "soda-lq")
ORTHO = ("koft", "soda-svd", "soda-lq")
LOW_RANK = ("lora", "ziplora")


def _shape_id(shape):
    return f"{shape[0]}x{shape[1]}{'b' if shape[2] else ''}"


def _base(shape, dtype=F64):
    out_f, in_f, bias = shape
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f))
    return base


def _lora(base, r):
    m, n = base.weight.shape
    return torch.randn(m, r, dtype=base.weight.dtype), torch.randn(r, n, dtype=base.weight.dtype) / n


def _make(case, base, **extra):
    """make_adapter for a case; ZipLoRA gets a rank-2 content and a rank-3 style LoRA (scale 0.7)."""
    method, options = case
    if method == "ziplora":
        options = {"content": _lora(base, 2), "style": (*_lora(base, 3), 0.7), **options}
    return make_adapter(method, base, **{**options, **extra})


def _trainable(adapter):
    return {name: p for name, p in adapter.named_parameters() if p.requires_grad}


@torch.no_grad()
def _randomise(adapter):
    """Random trainable state; Stiefel factors stay orthogonal (Q of a QR)."""
    ortho = {id(p) for p in adapter.orthogonal_parameters()}
    for p in _trainable(adapter).values():
        if id(p) in ortho:
            Q, R = torch.linalg.qr(torch.randn_like(p))
            p.copy_(Q * torch.sign(torch.diagonal(R)))
        else:
            p.copy_(0.3 * torch.randn_like(p))
    return adapter


def _dense(adapter, x):
    """The oracle: F.linear(x, W0 + ΔW, b)."""
    base = adapter.base
    return F.linear(x, base.weight + adapter.delta_weight(), base.bias)


# ----------------------------------------------------------------------------- identity start


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fresh_adapter_is_the_base(case, shape, dtype):
    """Output equals the base layer's: exactly for the additive and rotation methods, to the float64
    decomposition rounded once to the dtype for the spectral ones (fp32: ~1e-7, bound 1e-6)."""
    base = _base(shape, dtype)
    adapter = _make(case, base, **({"init": 0.0} if case[0] == "ziplora" else {}))
    x = torch.randn(2, 3, shape[1], dtype=dtype)
    y, ref = adapter(x), base(x)
    tol = 1e-6 if dtype == torch.float32 else REL_TOL[F64]
    if case[0] in SPECTRAL:
        assert rel_err(y, ref) <= tol
        assert adapter.delta_weight().norm() <= tol * base.weight.norm()
    else:
        assert torch.equal(y, ref)
        assert not adapter.delta_weight().any()


def test_fresh_adapters_learn():
    """Every trainable parameter of a fresh adapter gets a gradient, and the update moves."""
    base = _base(SHAPES[0])
    x = torch.randn(5, 18, dtype=F64)
    for case in CASES:
        adapter = _make(case, base)
        adapter(x).square().sum().backward()
        grads = [p.grad for p in _trainable(adapter).values()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), case


def test_ziplora_starts_from_the_sum():
    """init=1: both LoRAs in full."""
    base = _base(SHAPES[0])
    content, style = _lora(base, 2), (*_lora(base, 3), 0.7)
    adapter = make_adapter("ziplora", base, content=content, style=style)
    x = torch.randn(4, 18, dtype=F64)
    ref = base(x) + x @ (content[0] @ content[1]).T + 0.7 * x @ (style[0] @ style[1]).T
    assert_rel(adapter(x), ref, F64)


# ----------------------------------------------------------------------------- ΔW consistency


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_delta_weight(case, shape):
    adapter = _randomise(_make(case, _base(shape)))
    x = torch.randn(2, 3, shape[1], dtype=F64)
    assert_rel(adapter(x), _dense(adapter, x), F64)


def _cayley_dense(S):
    I = torch.eye(S.shape[-1], dtype=S.dtype)
    return torch.linalg.solve(I - S / 2, I + S / 2)


def _reference_weight(adapter):
    """W0 + ΔW from the method's formula with dense matrices (torch.kron order, V = Vh^T)."""
    W0 = adapter.base.weight
    if adapter.method == "lokr":  # LyCORIS's scale: alpha / (W1's rank if factored, else W2's); 1 if both dense
        W1 = adapter.W1 if adapter.w1_rank is None else adapter.B1 @ adapter.A1
        W2 = adapter.W2 if adapter.rank is None else adapter.B2 @ adapter.A2
        r = adapter.w1_rank or adapter.rank
        return W0 + adapter.scale * (1.0 if r is None else adapter.alpha / r) * torch.kron(W1, W2)
    if adapter.method == "oft":
        S = adapter.Q - adapter.Q.mT
        bound = adapter.constraint * S.shape[0] * S.shape[1]  # κ times the rotated dimension
        if bound and S.norm() / 2 > bound:
            S = S * bound / (S.norm() / 2)
        R = torch.block_diag(*_cayley_dense(S))
        W = W0 @ R if adapter.side == "input" else R @ W0
        return W if adapter.g is None else adapter.g[:, None] * W
    R = torch.kron(torch.kron(*adapter.factors[:2]), adapter.factors[2])
    if adapter.method == "koft":
        return W0 @ R
    if adapter.method == "soda-svd":
        left, right = adapter.U * torch.relu(adapter.S + adapter.delta), adapter.Vh
    else:
        left, right = adapter.L + torch.diag(adapter.delta), adapter.Qh
    return left @ (right @ R.T if adapter.side == "input" else (right.T @ R).T)


@pytest.mark.parametrize("case", [("lokr", {}), ("lokr", {"rank": 2, "factor": [2, 3]}),
                                  ("lokr", {"rank": 2, "w1_rank": 1, "alpha": 0.5}), ("oft", {"blocks": 3}),
                                  ("oft", {"blocks": 3, "side": "output", "rescale": True}),
                                  ("oft", {"blocks": 2, "side": "output", "constraint": 0.05}),
                                  ("koft", {}), ("soda-svd", {"side": "input"}), ("soda-svd", {"side": "basis"}),
                                  ("soda-lq", {"side": "input"}), ("soda-lq", {"side": "basis"})], ids=case_id)
def test_dense_reference(case):
    """The Kronecker / block / side conventions against dense matrices (wide 12 x 18: the input
    side rotates 18 = 2·3·3 features, the basis side k = 12 = 2·2·3 directions)."""
    adapter = _randomise(_make(case, _base(SHAPES[0])))
    if case[1].get("constraint"):  # the constraint clips this Q (||S||/2 > κ·12)
        assert (adapter.Q - adapter.Q.mT).norm() / 2 > case[1]["constraint"] * 12
    with torch.no_grad():
        ref = _reference_weight(adapter)
    assert_rel(adapter.base.weight + adapter.delta_weight(), ref, F64)
    x = torch.randn(5, 18, dtype=F64)
    assert_rel(adapter(x), F.linear(x, ref, adapter.base.bias), F64)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scale(case):
    """scale 0.5 halves ΔW and the change of the output; scale 0 is the base layer."""
    adapter = _randomise(_make(case, _base(SHAPES[0])))
    x = torch.randn(4, 18, dtype=F64)
    y0, y1, d1 = adapter.base(x), adapter(x), adapter.delta_weight()
    adapter.scale = 0.5
    assert adapter.config()["scale"] == 0.5
    assert_rel(adapter.delta_weight(), d1 / 2, F64)
    assert_rel(adapter(x) - y0, (y1 - y0) / 2, F64, scale=10.0)
    assert_rel(adapter(x), _dense(adapter, x), F64)
    adapter.scale = 0.0
    assert torch.equal(adapter(x), y0) and not adapter.delta_weight().any()


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lora_factors(case, scale):
    adapter = _randomise(_make(case, _base(SHAPES[0]), scale=scale))
    factors = adapter.lora_factors()
    if case[0] not in LOW_RANK:
        assert factors is None
        return
    B, A = factors
    assert torch.equal(B @ A, adapter.delta_weight())
    assert B.shape[1] == A.shape[0] == (3 if case[0] == "lora" else 2 + 3)


def test_lora_init_loads_factors_exactly():
    base = _base(SHAPES[0])
    B, A = _lora(base, 5)
    adapter = make_adapter("lora", base, init=(B, A))
    assert adapter.rank == 5 and adapter.alpha == 5.0
    assert torch.equal(adapter.delta_weight(), B @ A)
    x = torch.randn(3, 18, dtype=F64)
    assert_rel(adapter(x), base(x) + x @ (B @ A).T, F64)
    with torch.no_grad():
        adapter.B.add_(1.0)  # the parameters are copies: training never writes into the caller's tensors
    assert not torch.equal(adapter.B, B)


# ----------------------------------------------------------------------------- fuse / unfuse


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fuse_unfuse(case):
    adapter = _randomise(_make(case, _base(SHAPES[0], torch.float32)))
    base = adapter.base
    x = torch.randn(4, 18)
    y, delta, w0 = adapter(x), adapter.delta_weight(), base.weight.detach().clone()
    adapter.fuse()
    assert adapter.fused and torch.equal(adapter(x), base(x))
    assert_rel(base(x), y, torch.float32)
    assert torch.equal(adapter.delta_weight(), delta)  # still relative to the original W0
    with pytest.raises(RuntimeError, match="already fused"):
        adapter.fuse()
    adapter.unfuse()
    assert not adapter.fused and torch.equal(base.weight, w0) and torch.equal(adapter(x), y)
    with pytest.raises(RuntimeError, match="not fused"):
        adapter.unfuse()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case, scale):
    """d forward / d (every trainable parameter and x), float64, on a 4 x 6 layer (KOFT and the
    input-side SODA rotations split 6 as 1·2·3, the basis side k = 4 as 1·2·2)."""
    adapter = _randomise(_make(case, _base((4, 6, True)), scale=scale))
    params = _trainable(adapter)
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)

    def fn(x, *values):
        return torch.func.functional_call(adapter, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *(p.detach().clone().requires_grad_() for p in params.values())))


# ----------------------------------------------------------------------------- parameters, state, config


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_orthogonal_parameters(case):
    adapter = _make(case, _base(SHAPES[0]))
    ortho = adapter.orthogonal_parameters()
    expected = list(adapter.factors) if case[0] in ORTHO else []
    assert [id(p) for p in ortho] == [id(p) for p in expected]
    assert len(ortho) == len(adapter.config().get("sizes", []))
    trainable = {id(p) for p in _trainable(adapter).values()}
    for p in ortho:
        assert id(p) in trainable and torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype))
    assert not any(p.requires_grad for p in adapter.base.parameters())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_holds_only_trainable_state(case):
    """Decompositions and the ZipLoRA inputs are non-persistent: a state_dict is base + parameters."""
    adapter = _make(case, _base(SHAPES[0]))
    keys = {k for k in adapter.state_dict() if not k.startswith("base.")}
    assert keys == set(_trainable(adapter))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_config_round_trip(case):
    base = _base(SHAPES[0])
    adapter = _randomise(_make(case, base, scale=0.5))
    cfg = json.loads(json.dumps(adapter.config()))  # as read back from a file
    assert cfg == adapter.config() and cfg["scale"] == 0.5
    extra = {}
    if case[0] == "ziplora":
        extra = {"content": (adapter.B_c, adapter.A_c, adapter.scale_c),
                 "style": (adapter.B_s, adapter.A_s, adapter.scale_s)}
    rebuilt = make_adapter(adapter.method, base, **cfg, **extra)
    assert type(rebuilt) is type(adapter) and rebuilt.config() == cfg
    assert {k: p.shape for k, p in _trainable(rebuilt).items()} == {k: p.shape for k, p in _trainable(adapter).items()}
    rebuilt.load_state_dict(adapter.state_dict())
    x = torch.randn(3, 18, dtype=F64)
    assert torch.equal(rebuilt(x), adapter(x))


def test_sizes_and_canonical_decompositions():
    base = _base(SHAPES[0])
    assert adapters.KOFT(base).config()["sizes"] == [2, 3, 3]
    assert adapters.KOFT(base, sizes=[3, 6]).config()["factors"] == 2
    assert adapters.LoKr(_base((7, 13, True))).config()["factor"] == [1, 1]  # primes: 1 x width
    assert adapters.KOFT(_base((3, 7, True))).config()["sizes"] == [1, 1, 7]
    wide = _base((8, 640, False))
    assert adapters.SODASVD(wide).config()["sizes"] == list(SODA_TABLE[640])
    assert adapters.SODASVD(wide, factors=2).config()["sizes"] == [20, 32]  # the table has 3 factors
    svd, lq = adapters.SVDiff(base), adapters.SODALQ(base)
    U = svd.U
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()
    assert (torch.diagonal(lq.L) >= 0).all()


def test_bf16_base():
    """bf16 weights: LoRA-family parameters stay bf16; spectral factors, δ and Stiefel factors are
    float32 so that the fresh adapter is the base layer and the rotations stay orthogonal."""
    base = _base(SHAPES[0], torch.bfloat16)
    x = torch.randn(4, 18, dtype=torch.bfloat16)
    for case in CASES:
        adapter = _make(case, base, **({"init": 0.0} if case[0] == "ziplora" else {}))
        params = _trainable(adapter)
        for name, p in params.items():
            high = case[0] in SPECTRAL or case[0] == "koft" or name == "g"  # OFT's rescale
            assert p.dtype == (torch.float32 if high else torch.bfloat16), (case, name)
        assert adapter(x).dtype == torch.bfloat16 and adapter.delta_weight().dtype == torch.bfloat16
        assert_rel(adapter(x), base(x), torch.bfloat16)
        _randomise(adapter)
        assert_rel(adapter(x), _dense(adapter, x), torch.bfloat16, scale=2.0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("dora", {}, "method: expected one of"),
        ("lora", {"ranks": 4}, "options: .*ranks"),
        ("ziplora", {}, "options: .*content"),
        ("lora", {"rank": 0}, "rank: expected a positive integer"),
        ("lora", {"init": (torch.zeros(12, 2), torch.zeros(2, 17))}, r"A expected shape \(r, in_features=18\)"),
        ("lora", {"init": (torch.zeros(11, 2), torch.zeros(2, 18))}, r"B expected shape \(out_features=12, r=2\)"),
        ("lora", {"rank": 3, "init": (torch.zeros(12, 2), torch.zeros(2, 18))}, "rank: 3 differs"),
        ("oft", {"blocks": 4}, "blocks: expected a divisor of in_features=18"),
        ("koft", {"sizes": [2, 2, 4]}, r"sizes: expected sizes whose product is in_features = 18"),
        ("koft", {"factors": 2, "sizes": [2, 3, 3]}, "sizes: expected factors=2 sizes"),
        ("soda-svd", {"side": "basis", "sizes": [3, 6]}, r"product is k = min\(out_features, in_features\) = 12"),
        ("soda-svd", {"side": "output"}, "side: expected one of"),
        ("svdiff", {"activation": "gelu"}, "activation: expected one of"),
        ("lokr", {"factor": 5}, r"factor: expected m1 dividing out_features=12"),
        ("lokr", {"alpha": 2.0}, "alpha: 2.0, but with both Kronecker factors dense LoKr has no alpha"),
        ("lokr", {"rank": 2, "w1_rank": 0}, "w1_rank: expected a positive integer"),
        ("ziplora", {"content": (torch.zeros(12, 2), torch.zeros(2, 17)),
                     "style": (torch.zeros(12, 1), torch.zeros(1, 18))}, r"A_c: expected shape \(r_c, in_features=18\)"),
    ],
)
def test_errors(method, options, match):
    with pytest.raises(ValueError, match=match):
        make_adapter(method, _base(SHAPES[0]), **options)


def test_base_must_be_linear():
    conv = nn.Conv1d(3, 4, 1)
    for method in ADAPTER_TYPES:
        with pytest.raises(ValueError, match="base: expected an nn.Linear, got Conv1d"):
            extra = {"content": (torch.zeros(4, 1), torch.zeros(1, 3))} if method == "ziplora" else {}
            make_adapter(method, conv, **extra, **({"style": extra["content"]} if extra else {}))


@pytest.mark.parametrize("case", [("loha", {"rank": 2}), ("loha", {"rank": 2, "conv_rank": 3, "tucker": True}),
                                  ("lokr", {}), ("lokr", {"rank": 2, "w1_rank": 1, "alpha": 3.0}),
                                  ("lokr", {"rank": 2, "tucker": True})], ids=case_id)
@pytest.mark.parametrize("kernel", [1, 3])
def test_loha_lokr_on_a_conv(case, kernel):
    """LoHa / LoKr on an nn.Conv2d (LyCORIS's forms): identity start; forward = conv with W0 + ΔW and
    the base's geometry; ΔW from the dense formulas (LoHa's Hadamard product reshaped or Tucker,
    LoKr's channel Kronecker product with the kernel on W2)."""
    method, options = case
    conv = nn.Conv2d(8, 12, kernel, stride=2, padding=kernel // 2, dilation=1).to(F64)
    adapter = make_adapter(method, conv, **options)
    x = torch.randn(2, 8, 9, 9, dtype=F64)
    assert torch.equal(adapter(x), conv(x))
    spatial_tucker = options.get("tucker", False) and kernel > 1
    assert adapter.config()["tucker"] == spatial_tucker
    with torch.no_grad():
        _randomise(adapter)
        ref = F.conv2d(x, conv.weight + adapter.delta_weight(), conv.bias, conv.stride, conv.padding)
        if method == "loha":
            c = adapter.scale * adapter.alpha / adapter.rank
            assert adapter.rank == (3 if "conv_rank" in options and kernel > 1 else 2)
            if spatial_tucker:
                h1, h2 = (torch.einsum("op,pqhw,qi->oihw", B, T, A) for B, T, A in
                          ((adapter.B1, adapter.T1, adapter.A1), (adapter.B2, adapter.T2, adapter.A2)))
            else:
                h1, h2 = ((B @ A).view(conv.weight.shape) for B, A in ((adapter.B1, adapter.A1), (adapter.B2, adapter.A2)))
            dense = c * h1 * h2
        else:  # LyCORIS's scale: alpha / (W1's rank if factored, else W2's); 1 if both dense
            r = adapter.w1_rank or adapter.rank
            c = adapter.scale * (1.0 if r is None else adapter.alpha / r)
            W1 = adapter.W1 if adapter.w1_rank is None else adapter.B1 @ adapter.A1
            if adapter.rank is None:
                W2 = adapter.W2
            elif spatial_tucker:
                W2 = torch.einsum("op,pqhw,qi->oihw", adapter.B2, adapter.T2, adapter.A2)
            else:
                W2 = (adapter.B2 @ adapter.A2).view(adapter.B2.shape[0], -1, kernel, kernel)
            dense = c * torch.einsum("ap,bqhw->abpqhw", W1, W2).reshape(12, 8, kernel, kernel)
    assert_rel(adapter.delta_weight(), dense, F64)
    assert_rel(adapter(x), ref, F64)
    assert adapters.CONV_METHODS == ("lora", "loha", "lokr", "adalora", "oft", "boft", "koft", "svdiff", "soda-svd", "soda-lq")


@pytest.mark.parametrize("tucker", [False, True], ids=["matrix", "tucker"])
def test_hadamard_delta_gradients_and_saved_tensors(tucker):
    """LoHa's product: first and second derivatives (a tensor scale included), and only the factors kept."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    cols = 4 if tucker else 12
    B1, A1, B2, A2 = leaf(5, 3), leaf(3, cols), leaf(5, 3), leaf(3, cols)
    cores = (leaf(3, 3, 2, 2), leaf(3, 3, 2, 2)) if tucker else (None, None)
    c = leaf(())
    args = (c, B1, A1, B2, A2, *[t for t in cores if t is not None])

    def fn(c, B1, A1, B2, A2, *cores):
        return adapters.hadamard_delta(B1, A1, B2, A2, *(cores or (None, None)), scale=c)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    half = (lambda B, T, A: torch.einsum("op,pqhw,qi->oihw", B, T, A)) if tucker else (lambda B, T, A: B @ A)
    ref = c * half(B1, cores[0], A1) * half(B2, cores[1], A2)
    torch.testing.assert_close(fn(*args), ref, rtol=1e-12, atol=0)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fn(*args)
    assert kept and all(any(t is a for a in args) for t in kept)  # the factors themselves, no weight-sized half


def test_hadamard_factors_are_the_product():
    """C D = (B1 A1) ⊙ (B2 A2) for unequal ranks: LoHa is a LoRA of rank r1 r2."""
    g = torch.Generator().manual_seed(0)
    B1, A1, B2, A2 = (torch.randn(*s, generator=g, dtype=F64) for s in ((7, 3), (3, 10), (7, 2), (2, 10)))
    C, D = adapters.hadamard_factors(B1, A1, B2, A2)
    assert C.shape == (7, 6) and D.shape == (6, 10)
    torch.testing.assert_close(C @ D, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["linear", "conv", "conv-strided-dilated", "conv-1x1"])
@pytest.mark.parametrize("factored", [True, False])
def test_loha_factored_and_merged_paths(layer, factored, monkeypatch):
    """LoHa's rank-r² path and its W0 + ΔW path, each forced: the same values and gradients (x and the
    four factors) as the layer run with W0 + delta_weight(); fp64 gradcheck of the path; and the rule
    picks the factored path at rank 8 on an SDXL width, the merged one at rank 32."""
    base = {"linear": lambda: nn.Linear(12, 10), "conv": lambda: nn.Conv2d(6, 8, 3, padding=1),
            "conv-strided-dilated": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2),
            "conv-1x1": lambda: nn.Conv2d(6, 8, 1)}[layer]().to(F64).requires_grad_(False)
    adapter = make_adapter("loha", base, rank=2, alpha=3.0)
    _randomise(adapter)
    x = torch.randn(2, 5, 12, dtype=F64) if layer == "linear" else torch.randn(2, 6, 7, 7, dtype=F64)
    x.requires_grad_()
    params = [adapter.B1, adapter.A1, adapter.B2, adapter.A2]
    W = base.weight + adapter.delta_weight()
    ref = F.linear(x, W, base.bias) if layer == "linear" else F.conv2d(x, W, base.bias, *adapters._conv_geometry(base))
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *params], g)
    with loha_path(monkeypatch, factored) as calls:
        y = adapter(x)
        got = torch.autograd.grad(y, [x, *params], g)
        assert torch.autograd.gradcheck(lambda x, *ps: adapter(x), (x, *params), fast_mode=True)
    assert calls
    assert_rel(y, ref, F64)
    for a, b in zip(got, want):
        assert_rel(a, b, F64)
    assert adapters.hadamard_factored(2048, 1280, 1280, 8, True)
    assert not adapters.hadamard_factored(2048, 1280, 1280, 32, True)


def test_loha_on_a_same_padded_conv_takes_the_merged_path(monkeypatch):
    """padding="same" has no integer output size to count: hadamard_rows says None, LoHa merges W0 + ΔW."""
    conv = nn.Conv2d(6, 8, 3, padding="same").to(F64)
    adapter = make_adapter("loha", conv, rank=2)
    _randomise(adapter)
    x = torch.randn(2, 6, 7, 7, dtype=F64)
    assert adapters.hadamard_rows(conv, x) is None
    with loha_path(monkeypatch, True) as calls:
        y = adapter(x)
    assert not calls
    assert_rel(y, F.conv2d(x, conv.weight + adapter.delta_weight(), conv.bias, padding="same"), F64)


@pytest.mark.parametrize("order", ["W2 first", "W1 first"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["first-layer", "in-network"])
def test_lokr_linear_adds_into_the_base_output(order, x_grad, monkeypatch):
    """LoKr on a plain Linear adds x (W1 ⊗ W2)ᵀ into the base GEMM's own output (_BaddbmmInto): the same
    values and gradients as the out-of-place batched GEMM, in both factor orders; a hooked base, whose
    output others may hold, keeps the out-of-place path."""
    torch.manual_seed(0)
    # m1 = n1 = factor: W2 applied first is the cheaper order when in >= out, W1 first when out > in
    n, m, factor = {"W2 first": (48, 4, 4), "W1 first": (12, 16, 2)}[order]
    base = nn.Linear(n, m, dtype=torch.float64)
    layer = make_adapter("lokr", base, factor=factor, rank=2)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 3, base.in_features, dtype=torch.float64, requires_grad=x_grad)
    trainable = [p for p in layer.parameters() if p.requires_grad] + ([x] if x_grad else [])

    def run():
        y = layer(x)
        return y, torch.autograd.grad(y.square().sum(), trainable)

    calls = []
    into = adapters._BaddbmmInto.apply
    monkeypatch.setattr(adapters._BaddbmmInto, "apply", lambda *a: calls.append(1) or into(*a))
    y, grads = run()
    assert calls
    # x is 3-D: F.linear's output is a view, and written in place as one autograd would clone the gradient
    names, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    assert "CopySlices" not in names and any("_BaddbmmInto" in n for n in names)
    monkeypatch.setattr(adapters, "_plain_linear", lambda *a: False)
    y_ref, grads_ref = run()
    assert_rel(y, y_ref, torch.float64)
    for g, r in zip(grads, grads_ref):
        assert_rel(g, r, torch.float64)
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(adapters._BaddbmmInto, "apply", lambda *a: calls.append(1) or into(*a))
    base.register_forward_hook(lambda m, i, o: None)
    assert_rel(layer(x), y_ref, torch.float64)
    assert not calls


def test_baddbmm_into_gradcheck():
    """_BaddbmmInto (y += a @ b written into y) in float64: gradcheck and gradgradcheck in y, a and b."""
    torch.manual_seed(0)
    y, a, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 20), (3, 4, 2), (3, 2, 5)))

    def fn(y, a, b):
        return adapters._BaddbmmInto.apply(y * 1.0, a, b)  # (y * 1.0: a fresh non-leaf to write into)

    assert torch.autograd.gradcheck(fn, (y, a, b))
    assert torch.autograd.gradgradcheck(fn, (y, a, b))


@pytest.mark.parametrize("channels,size,stride,dilation", [(3, 9, 1, 1), (6, 3, 2, 1), (5, 8, 1, 2)],
                         ids=["one-input-grad-conv", "kernel-larger-than-x", "dilated"])
@pytest.mark.parametrize("form", ["locon", "lokr"])
def test_conv_update_gradcheck(form, channels, size, stride, dilation):
    """lowrank_conv_onto and kron_conv_onto in float64: gradcheck and gradgradcheck in x, the base's bias and the
    update's factors, through _ConvUpdate (ΔW no larger than x: one conv for both input gradients; the double
    backward rebuilds the update on x's graph) and without it (a kernel larger than x)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    base = nn.Conv2d(channels, 4, 3, stride=stride, padding=1, dilation=dilation).to(torch.float64)
    base.weight.requires_grad_(False)
    x = torch.randn(2, channels, size, size, **f64, requires_grad=True)
    assert (base.weight.numel() <= x.numel()) == (size > 3)
    if form == "locon":
        factors = [torch.randn(2, channels, 3, 3, **f64, requires_grad=True), torch.randn(4, 2, **f64, requires_grad=True)]
        fn = lambda x, b, D, B: adapters.lowrank_conv_onto(base, x, D, B)  # noqa: E731
    else:  # W1 (2, 1), W2 = B2 A2 (2, channels·9)
        factors = [torch.randn(*s, **f64, requires_grad=True) for s in ((2, 1), (2, 2), (2, channels * 9))]
        fn = lambda x, b, W1, B2, A2: adapters.kron_conv_onto(base, x, W1, (B2, A2))  # noqa: E731
    inputs = (x, base.bias, *factors)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("make", ["lora", "adalora", "loha", "lokr", "lokr-tucker"])
def test_conv_update_in_one_node_matches_the_generic_path(make, monkeypatch):
    """LoRA, AdaLoRA, LoHa (as its rank-r² LoRA) and LoKr (W2 low rank, and with a Tucker core) on a Conv2d,
    in-network: one _ConvUpdate node, whose output and every gradient equal those of the plain path (_plain_conv
    forced False: the update's own input-gradient convs)."""
    torch.manual_seed(0)
    base = nn.Conv2d(16, 24, 3, padding=1)  # wide enough for LoHa's rank-4 and LoKr's factored forms
    adapter = {"lora": lambda b: adapters.LoRA(b, rank=3), "adalora": lambda b: adapters.AdaLoRA(b, init_r=3),
               "loha": lambda b: adapters.LoHa(b, rank=2), "lokr": lambda b: adapters.LoKr(b, rank=2),
               "lokr-tucker": lambda b: adapters.LoKr(b, rank=2, tucker=True)}[make](base.requires_grad_(False))
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 16, 14, 14, requires_grad=True)
    g = torch.randn(2, 24, 14, 14)
    params = [p for p in adapter.parameters() if p.requires_grad]

    def step():
        y = adapter(x)
        return y, torch.autograd.grad(y, [x, *params], g)

    seen = []
    monkeypatch.setattr(adapters._ConvUpdate, "apply", functools.partial(
        lambda apply, *a: seen.append(1) or apply(*a), adapters._ConvUpdate.apply))
    y, grads = step()
    assert seen
    monkeypatch.setattr(adapters, "_plain_conv", lambda *a: False)
    y_ref, grads_ref = step()
    assert len(seen) == 1
    assert_rel(y, y_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        assert_rel(got, want, torch.float32)


@pytest.mark.parametrize("m1,n1,m2,tucker", [(16, 16, 20, False), (2, 2, 3, False), (16, 16, 20, True), (2, 2, 3, True)],
                         ids=["w1-first", "b2-first", "w1-first-tucker", "b2-first-tucker"])
def test_add_kron_conv_either_order_is_the_merged_conv(m1, n1, m2, tucker):
    """_add_kron_conv applies W1 to the groups' r channels before B2 when that costs fewer FLOPs (many groups),
    else B2 per group first: both equal conv(x, W0 + W1 ⊗ W2) in float64, values and every gradient."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    r, n2 = 8, 5
    conv = nn.Conv2d(n1 * n2, m1 * m2, 3, stride=2, padding=1).to(torch.float64).requires_grad_(False)
    x = torch.randn(2, n1 * n2, 7, 6, **f64, requires_grad=True)
    W1 = torch.randn(m1, n1, **f64, requires_grad=True)
    shapes = [(m2, r), (r, r, 3, 3), (r, n2)] if tucker else [(m2, r), (r, n2 * 9)]
    W2 = [torch.randn(*s, **f64, requires_grad=True) for s in shapes]
    W1_first = m1 * r * (n1 + m2) < n1 * m2 * (r + m1)
    assert W1_first == (m1 == 16)
    y = adapters._add_kron_conv(conv(x), x, W1, tuple(W2), conv)
    dense = torch.kron(W1[:, :, None, None], adapters._kron_w2(tuple(W2), conv.weight.shape[2:]).contiguous())
    ref = F.conv2d(x, conv.weight + dense, conv.bias, conv.stride, conv.padding)
    assert_rel(y, ref, torch.float64)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, W1, *W2], g), torch.autograd.grad(ref, [x, W1, *W2], g)):
        assert_rel(got, want, torch.float64)


@pytest.mark.parametrize("W1_shape,W2_shape,rank,order", [
    ((64, 20), (80, 32), 8, "rank"), ((1, 8), (8, 2), None, "W1"), ((8, 1), (2, 8), None, "W2"),
    ((8, 1), (2, 8), 8, "W2")], ids=["through-rank", "w1-first", "w2-first", "low-rank-w2-first"])
@pytest.mark.parametrize("into", [False, True], ids=["onto", "into"])
def test_add_kron_linear_every_order_is_the_merged_linear(W1_shape, W2_shape, rank, order, into):
    """_add_kron_linear in each of its orders (the cheapest by multiply-adds; asserted here) equals
    F.linear(x, W0 + W1 ⊗ W2) in float64, values and every gradient, onto and into the base's output."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    (m1, n1), (m2, n2) = W1_shape, W2_shape
    cost = {"W2": n1 * n2 * m2 + m1 * n1 * m2, "W1": m1 * n1 * n2 + m1 * n2 * m2}
    if rank:
        cost["rank"] = n1 * n2 * rank + m1 * n1 * rank + m1 * rank * m2
    assert min(cost, key=cost.get) == order
    W0 = torch.randn(m1 * m2, n1 * n2, **f64)
    x = torch.randn(3, 5, n1 * n2, **f64, requires_grad=True)
    W1 = torch.randn(m1, n1, **f64, requires_grad=True)
    W2 = [torch.randn(*s, **f64, requires_grad=True) for s in (((m2, rank), (rank, n2)) if rank else (W2_shape,))]
    y = adapters._add_kron_linear(F.linear(x, W0), x, W1, tuple(W2), into=into)
    ref = F.linear(x, W0 + torch.kron(W1, W2[0] @ W2[1] if rank else W2[0]))
    assert_rel(y, ref, torch.float64)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, W1, *W2], g), torch.autograd.grad(ref, [x, W1, *W2], g)):
        assert_rel(got, want, torch.float64)
