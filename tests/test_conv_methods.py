"""The rebuild methods (OFT, KOFT, SVDiff, SODA-SVD, SODA-LQ) on nn.Conv2d: the kernel as the
matrix W0 (out, in·kh·kw), the adapted W reshaped back and run as one conv.

The strong oracle: the conv adapter equals the same method's Linear adapter, with the same
parameters, on the unfolded input (F.unfold), since conv(x, W) is W applied to every patch.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import case_id
from torch import nn

from specops import adapters, sdxl
from specops.adapters import make_adapter
from specops.optim import StiefelAdam

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread

F64 = torch.float64
# (in, out, kernel, stride, padding, bias): a 3x3 stride-2 padded conv (in·kh·kw = 36) and a 1x1 (4)
CONVS = [(4, 6, 3, 2, 1, True), (4, 6, 1, 1, 0, False)]
CASES = [
    ("oft", {"blocks": 2}),
    ("oft", {"blocks": 3, "side": "output", "rescale": True}),
    ("oft", {"blocks": 2, "side": "output", "constraint": 0.05}),
    ("koft", {}),
    ("svdiff", {}),
    ("svdiff", {"activation": "softplus"}),
    ("soda-svd", {"side": "input"}),
    ("soda-svd", {"side": "basis"}),
    ("soda-lq", {"side": "input"}),
    ("soda-lq", {"side": "basis"}),
]


def _conv_id(spec):
    return f"{spec[2]}x{spec[2]}s{spec[3]}"


def _conv(spec, dtype=F64):
    n, m, k, stride, padding, bias = spec
    torch.manual_seed(1)
    return nn.Conv2d(n, m, k, stride=stride, padding=padding, bias=bias).to(dtype)


def _x(spec, dtype=F64):
    return torch.randn(2, spec[0], 7, 7, dtype=dtype)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _trainable(adapter):
    return {name: p for name, p in adapter.named_parameters() if p.requires_grad}


@torch.no_grad()
def _randomise(adapter, std=0.3):
    """Random trainable state; Stiefel factors stay orthogonal (Q of a QR)."""
    ortho = {id(p) for p in adapter.orthogonal_parameters()}
    for p in _trainable(adapter).values():
        if id(p) in ortho:
            Q, R = torch.linalg.qr(torch.randn_like(p))
            p.copy_(Q * torch.sign(torch.diagonal(R)))
        else:
            p.add_(std * torch.randn_like(p))
    return adapter


@pytest.mark.parametrize("spec", CONVS, ids=_conv_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_fresh_conv_adapter_is_the_base(case, spec):
    conv = _conv(spec, torch.float32)
    adapter = make_adapter(case[0], conv, **case[1])
    x = _x(spec, torch.float32)
    assert _rel(adapter(x), conv(x)) <= 1e-6
    delta = adapter.delta_weight()
    assert delta.shape == conv.weight.shape and delta.norm() <= 1e-6 * conv.weight.norm()


@pytest.mark.parametrize("spec", CONVS, ids=_conv_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_conv_adapter_is_the_linear_adapter_on_unfolded_patches(case, spec):
    """conv(x, W) = W · unfold(x): the conv adapter against the Linear adapter on W0.flatten(1) with
    the same parameters (the decompositions of the same matrix agree), at scale 1 and 0.4; ΔW is
    the Linear adapter's ΔW reshaped; forward is the conv with W0 + ΔW."""
    conv = _conv(spec)
    method, options = case
    adapter = _randomise(make_adapter(method, conv, **options))
    linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None).to(F64)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    twin = make_adapter(method, linear, **options)
    with torch.no_grad():
        for name, p in _trainable(adapter).items():
            twin.get_parameter(name).copy_(p)
    x = _x(spec)
    geometry = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = F.unfold(x, **geometry).mT  # (batch, positions, in·kh·kw)
    for scale in (1.0, 0.4):
        adapter.scale = twin.scale = scale
        y = adapter(x)
        assert _rel(y, conv(x)) > 1e-3  # the adapter changes the layer
        ref = twin(patches).mT.reshape(y.shape)
        assert _rel(y, ref) <= 1e-12
        delta = adapter.delta_weight()
        assert delta.shape == conv.weight.shape
        assert _rel(delta.flatten(1), twin.delta_weight()) <= 1e-12
        dense = F.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert _rel(y, dense) <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_twenty_adam_steps_lower_a_toy_loss(case):
    """Euclidean parameters with Adam, Stiefel factors with specops' StiefelAdam, as on Linear layers."""
    spec = CONVS[0]
    conv = _conv(spec, torch.float32)
    adapter = make_adapter(case[0], conv, **case[1])
    x = _x(spec, torch.float32)
    with torch.no_grad():
        target = conv(x) + 0.3 * torch.randn_like(conv(x))
    ortho = {id(p) for p in adapter.orthogonal_parameters()}
    euclid = [p for p in _trainable(adapter).values() if id(p) not in ortho]
    opts = [torch.optim.Adam(euclid, lr=1e-2)] if euclid else []
    if ortho:
        opts.append(StiefelAdam(adapter.orthogonal_parameters(), lr=1e-2, fused=False))
    losses = []
    for _ in range(20):
        loss = (adapter(x) - target).square().mean()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        last = (adapter(x) - target).square().mean().item()
    assert last < 0.99 * losses[0], (losses[0], last)
    for p in adapter.orthogonal_parameters():  # the rotations stayed orthogonal
        eye = torch.eye(p.shape[-1])
        assert (p.mT @ p - eye).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fuse_unfuse_and_config_on_a_conv(case):
    spec = CONVS[0]
    conv = _conv(spec)
    w0 = conv.weight.detach().clone()
    adapter = _randomise(make_adapter(case[0], conv, **case[1]))
    x = _x(spec)
    y = adapter(x)
    adapter.fuse()
    assert _rel(conv(x), y) <= 1e-12 and _rel(adapter(x), y) <= 1e-12
    adapter.unfuse()
    assert torch.equal(conv.weight, w0)
    assert torch.equal(adapter(x), y)
    # config() is JSON and rebuilds the same shapes; the state_dict is the base and the trainable state
    config = json.loads(json.dumps(adapter.config()))
    again = make_adapter(case[0], _conv(spec), **config)
    assert again.config() == adapter.config()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in adapter.state_dict().items()}
    assert set(adapter.state_dict()) == {"base.weight", *(["base.bias"] if conv.bias is not None else []),
                                         *_trainable(adapter)}
    again.load_state_dict(adapter.state_dict())
    assert _rel(again(x), y) <= 1e-12


def test_bf16_conv_follows_the_linear_precision_rules():
    """bf16 kernel: Q stays bf16, δ / Stiefel factors / rescale are float32; the output is bf16."""
    conv = _conv(CONVS[0], torch.bfloat16)
    x = _x(CONVS[0], torch.bfloat16)
    for method, options in CASES:
        adapter = make_adapter(method, conv, **options)
        for name, p in _trainable(adapter).items():
            assert p.dtype == (torch.bfloat16 if name == "Q" else torch.float32), (method, name)
        y = adapter(x)
        assert y.dtype == torch.bfloat16 and adapter.delta_weight().dtype == torch.bfloat16
        assert _rel(y.float(), conv(x).float()) <= 1e-2


@pytest.mark.parametrize("method, options, match", [
    ("oft", {"blocks": 5}, r"blocks: expected a divisor of in_channels·kh·kw = 36, got 5"),
    ("oft", {"blocks": 4, "side": "output"}, r"blocks: expected a divisor of out_channels=6, got 4"),
    ("oft", {"side": "basis"}, r"side: expected one of \('input', 'output'\)"),
    ("oft", {"constraint": -1.0}, r"constraint: expected a number >= 0"),
    ("oft", {"rescale": 1}, r"rescale: expected a bool"),
    ("koft", {"sizes": [2, 2, 4]}, r"sizes: expected sizes whose product is in_channels·kh·kw = 36"),
    ("soda-svd", {"sizes": [5, 7]}, r"product is in_channels·kh·kw = 36"),
    ("soda-lq", {"side": "basis", "sizes": [4, 9]}, r"product is k = min\(out_channels, in_channels·kh·kw\) = 6"),
])
def test_bad_sizes_on_a_conv_name_the_flattened_dimension(method, options, match):
    with pytest.raises(ValueError, match=match):
        make_adapter(method, _conv(CONVS[0]), **options)
    with pytest.raises(ValueError, match="groups=2"):
        make_adapter(method, nn.Conv2d(4, 6, 3, groups=2), **options)


def test_every_inject_method_takes_a_conv():
    assert set(sdxl.INJECT_METHODS) <= set(adapters.CONV_METHODS)
    assert adapters.CONV_METHODS == ("lora", "loha", "lokr", "adalora", "oft", "boft", "koft", "svdiff",
                                     "soda-svd", "soda-lq")


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 7, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.randn(1, 6, generator=g)})


def test_full_preset_injection_of_a_rebuild_method_is_the_identity():
    """KOFT, the cheapest rebuild method to build on 794 layers (SVD / LQ of every layer, or OFT's
    Cayley solves of blocks up to 576 wide, cost seconds); the conv path is shared by all of them."""
    pytest.importorskip("diffusers")
    unet = sdxl.tiny_unet(0)
    with torch.no_grad():
        ref = unet(**_unet_inputs()).sample
        injected = sdxl.inject(unet, "koft", preset="full")
        assert len(injected) == 794 and sum(a.is_conv for a in injected.values()) == 51
        assert _rel(unet(**_unet_inputs()).sample, ref) <= 1e-6
