"""DoRA (LyCORIS's weight decomposition, file key dora_scale) on specops' LoRA, LoHa and LoKr.

LyCORIS 4.1.3 is the oracle for files both ways, on a handful of tiny-UNet layers (Linear, 1x1 and
3x3 convs); PEFT's use_dora for the forward values of LoRA on an nn.Linear and an nn.Conv2d.
"""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")

from lycoris import LycorisNetwork, create_lycoris_from_weights  # noqa: E402

from specops import adapters, lora_io, sdxl  # noqa: E402
from test_lycoris import _rel, _run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "lycoris_state")


# A few layers of every kind: a 3x3 conv (conv_in, a resnet conv1), a 1x1 conv_shortcut, Linear
# projections of one transformer block (64 x 64 to_q, 64 -> 256 ff) and proj_in.
LAYERS = ["conv_in", "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
          "down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
          "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"]


@pytest.fixture(scope="module")
def _shared():
    """One tiny UNet for the whole file (building or copying one costs ~1 s) and its output."""
    unet = sdxl.tiny_unet(0)
    return unet, _run(unet)


@pytest.fixture
def unet(_shared):
    """The shared UNet, put back as it was after each test: LyCORIS networks (registered in NETS)
    restored, specops adapters removed."""
    yield _shared[0]
    while NETS:
        NETS.pop().restore()
    sdxl.remove(_shared[0])


NETS: list = []


def _reload(path, unet):
    """LyCORIS's network rebuilt from a file (kohya names) on `unet`, applied: (net, output)."""
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    net, _ = create_lycoris_from_weights(1.0, str(path), unet)
    net.apply_to()
    NETS.append(net)
    return net, _run(unet)


def _lycoris_dora(model, algo: str, dim: int, multiplier: float = 1.0, **options):
    """LyCORIS's `algo` with dora_wd on LAYERS, every parameter (dora_scale too) randomly perturbed."""
    LycorisNetwork.apply_preset({"enable_conv": True, "lora_prefix": "lora_unet", "target_module": [],
                                 "target_name": LAYERS})
    net = LycorisNetwork(model, multiplier=multiplier, lora_dim=dim, alpha=1.5, conv_lora_dim=dim, conv_alpha=0.5,
                         network_module=algo, weight_decompose=True, **options)
    net.apply_to()
    NETS.append(net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):  # a magnitude away from ‖W0‖, still positive
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    assert len(net.loras) == len(LAYERS) and all(lora.wd for lora in net.loras)
    return net


# (algo, dim, LyCORIS options, specops forms to check on the 3x3 conv_in)
LYCORIS_DORA = [
    ("lora", 2, {}, {"tucker": False}),
    ("lora", 2, {"use_tucker": True, "wd_on_out": False}, {"tucker": True, "wd_on_out": False}),  # norms per input column
    ("loha", 2, {"multiplier": 0.5}, {"tucker": False}),        # LyCORIS's multiplier rule = specops' scale
    ("loha", 2, {"use_tucker": True}, {"tucker": True}),
    ("lokr", 8, {}, {"rank": None}),                            # dense factors
    ("lokr", 2, {"decompose_both": True, "use_tucker": True}, {"tucker": True}),
]


@pytest.mark.parametrize("algo, dim, options, form", LYCORIS_DORA)
def test_a_lycoris_dora_file_applies_exactly(tmp_path, _shared, unet, algo, dim, options, form):
    options = dict(options)
    multiplier = options.pop("multiplier", 1.0)
    net = _lycoris_dora(unet, algo, dim, multiplier, **options)
    theirs = _run(unet)
    assert _rel(theirs, _shared[1]) > 1e-2  # the file changes the model
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    net.restore()

    mine = unet
    found = sdxl.apply_lora(mine, str(path), scale=multiplier)
    assert sorted(found) == sorted(LAYERS) and {a.method for a in found.values()} == {algo}
    assert all(a.config()["dora"] for a in found.values())
    conv_in = found["conv_in"]
    assert {k: conv_in.config()[k] for k in form} == form
    assert _rel(_run(mine), theirs) <= 1e-5
    if algo == "lokr" and options.get("decompose_both"):  # LyCORIS factors the Linear ones
        assert found[LAYERS[4]].w1_rank == 2 and found[LAYERS[4]].rank == 2


# specops' own DoRA adapters, exported: LyCORIS reloads (out, 1) dora_scale files (wd_on_out=True)
SPECOPS_DORA = [
    ("lora", {"rank": 2, "alpha": 1.0}, "kohya"),
    ("lora", {"rank": 2, "alpha": 1.0, "tucker": True}, "lycoris"),
    ("loha", {"rank": 2, "alpha": 1.5, "tucker": True}, "lycoris"),
    ("lokr", {"rank": 2, "w1_rank": 2, "alpha": 0.5}, "lycoris"),
]


@pytest.mark.parametrize("method, options, format", SPECOPS_DORA)
def test_a_specops_dora_export_loads_into_lycoris(tmp_path, unet, method, options, format):
    mine = unet
    torch.manual_seed(0)
    found = sdxl.inject(mine, method, targets=LAYERS, dora=True, **options)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in found.values():
            for name, p in a.named_parameters():
                if name == "magnitude":
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
                elif p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    want = _run(mine)
    path = tmp_path / "dora.safetensors"
    report = lora_io.export_lora(mine, path, format=format)
    assert report["max_rel_error"] <= 1e-6
    assert sum(k.endswith(".dora_scale") for k in lora_io._read(path)[0]) == len(LAYERS)

    # a DoRA file holds scale 1: another scale is refused, naming the layer
    found["conv_in"].scale = 0.5
    with pytest.raises(ValueError, match=r"unet.conv_in is a DoRA adapter at scale 0.5"):
        lora_io.export_lora(mine, tmp_path / "no.safetensors", format=format)
    sdxl.remove(mine)

    net, theirs = _reload(path, unet)
    assert len(net.loras) == len(LAYERS) and all(lora.wd for lora in net.loras)
    assert _rel(theirs, want) <= 1e-5


# ----------------------------------------------------------------------------- the adapters themselves

# (method, options); wd_on_out=False (norms per input column) on one form of each method
CASES = [("lora", {}), ("lora", {"tucker": True, "wd_on_out": False}), ("loha", {"wd_on_out": False}),
         ("loha", {"tucker": True}), ("lokr", {"factor": 2, "rank": None}),
         ("lokr", {"factor": 2, "rank": 2, "tucker": True, "wd_on_out": False})]


def _layer(conv: bool):
    torch.manual_seed(0)
    if conv:
        return nn.Conv2d(6, 8, 3, padding=1), torch.randn(4, 6, 5, 5)
    return nn.Linear(12, 8), torch.randn(16, 12)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("method, options", CASES)
def test_dora_starts_as_identity_fuses_exactly_and_trains(method, options, conv):
    base, x = _layer(conv)
    y0 = base(x).detach()
    wd_on_out = options.get("wd_on_out", True)
    a = adapters.make_adapter(method, base, dora=True, **{"rank": 2, **options})
    assert a.magnitude.shape == (8 if wd_on_out else (6 if conv else 12),)
    assert _rel(a(x), y0) <= 1e-6
    again = adapters.make_adapter(method, base, **a.config())  # config() rebuilds it, DoRA included
    assert again.magnitude.shape == a.magnitude.shape and again.config() == a.config()

    # 20 Adam steps towards the layer with a rescaled and perturbed weight lower the loss; m trains
    with torch.no_grad():
        target = adapters._run_layer(base, x, 1.2 * base.weight + 0.1 * torch.randn_like(base.weight))
    opt = torch.optim.Adam(a.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = (a(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert a.magnitude.grad is not None and a.magnitude.grad.abs().sum() > 0

    W0 = base.weight.detach().clone()
    with torch.no_grad():
        y = a(x)
        dW = a.delta_weight()
        assert _rel(W0 + dW, a.dora_weight()) <= 1e-6  # delta_weight() = W' - W0
        a.fuse()
        assert _rel(a(x), y) <= 1e-5
        a.unfuse()
    assert torch.equal(base.weight, W0)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_dora_gradients_match_lycoris(conv):
    """LyCORIS does not detach the norm: the factors' and the magnitude's gradients agree, at
    multiplier (scale) 0.5 too."""
    from lycoris.modules.locon import LoConModule
    base, x = _layer(conv)
    theirs = copy.deepcopy(base)
    module = LoConModule("layer", theirs, multiplier=0.5, lora_dim=2, alpha=1.0, weight_decompose=True)
    module.apply_to()
    with torch.no_grad():
        module.lora_up.weight.normal_()
        module.dora_scale.mul_(1.3)
    mine = adapters.LoRA(base, rank=2, alpha=1.0, dora=True, scale=0.5)
    with torch.no_grad():
        mine.A.copy_(module.lora_down.weight.reshape(mine.A.shape))
        mine.B.copy_(module.lora_up.weight.flatten(1))
        mine.magnitude.copy_(module.dora_scale.flatten())
    y_theirs, y_mine = theirs(x), mine(x)
    assert _rel(y_mine, y_theirs) <= 1e-6
    y_theirs.square().sum().backward()
    y_mine.square().sum().backward()
    for ours, lyco in ((mine.A, module.lora_down.weight), (mine.B, module.lora_up.weight),
                       (mine.magnitude, module.dora_scale)):
        assert _rel(ours.grad, lyco.grad.reshape(ours.shape)) <= 1e-5


def test_dora_scale_follows_lycoris_multiplier_rule():
    """W' = W ⊙ (1 + s (m/‖W‖ - 1)), W = W0 + ΔW': s = 0 runs W0 + ΔW', not W0."""
    base, x = _layer(False)
    a = adapters.LoRA(base, rank=2, dora=True)
    with torch.no_grad():
        a.B.normal_()
        a.magnitude.mul_(1.5)
        W = base.weight + a.B @ a.A * (a.alpha / a.rank)
        ratio = a.magnitude[:, None] / (W.norm(dim=1, keepdim=True) + torch.finfo(W.dtype).eps)
        for s in (1.0, 0.5, 0.0):
            a.scale = s
            want = nn.functional.linear(x, W * (1 + s * (ratio - 1)), base.bias)
            assert _rel(a(x), want) <= 1e-6


def test_save_adapters_round_trips_the_magnitude(tmp_path):
    model = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(6, 8, 3))
    model[0] = adapters.LoKr(model[0], factor=2, rank=2, dora=True, wd_on_out=False)
    model[1] = adapters.LoHa(model[1], rank=2, dora=True)
    with torch.no_grad():
        for a in model:
            a.magnitude.mul_(torch.rand(a.magnitude.shape) + 0.5)
    path = tmp_path / "a.safetensors"
    lora_io.save_adapters(model, path)
    fresh = nn.Sequential(nn.Linear(12, 8), nn.Conv2d(6, 8, 3))
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".base." in k})
    lora_io.load_adapters(fresh, path)
    for a, b in zip(model, fresh):
        assert b.config() == a.config() and torch.equal(b.magnitude, a.magnitude)


# ----------------------------------------------------------------------------- PEFT's DoRA


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_peft_use_dora_gives_the_same_forward(conv):
    """PEFT's DoRA has LyCORIS's axis (a norm per output row) but detaches the norm and adds no eps:
    the forward values agree, and so do the magnitude's gradients; A's and B's gradients differ."""
    peft = pytest.importorskip("peft")
    base, x = _layer(conv)
    model = nn.Sequential(copy.deepcopy(base))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True,
                                                        init_lora_weights=False))
    layer = theirs.base_model.model[0]
    mine = adapters.LoRA(base, rank=2, alpha=3.0, dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
        mine.A.copy_(layer.lora_A["default"].weight.reshape(mine.A.shape))
        mine.B.copy_(layer.lora_B["default"].weight.flatten(1))
        mine.magnitude.copy_(layer.lora_magnitude_vector["default"].weight.flatten())
    y_theirs, y_mine = theirs(x), mine(x)
    assert _rel(y_mine, y_theirs) <= 1e-5
    y_theirs.square().sum().backward()
    y_mine.square().sum().backward()
    m_grad = layer.lora_magnitude_vector["default"].weight.grad.flatten()
    assert _rel(mine.magnitude.grad, m_grad) <= 1e-4
    assert _rel(mine.B.grad, layer.lora_B["default"].weight.grad.flatten(1)) > 1e-3  # the detached norm


# ----------------------------------------------------------------------------- bad files


def test_bad_dora_files_raise_and_change_nothing(tmp_path, unet):
    from safetensors.torch import save_file
    net = _lycoris_dora(unet, "lora", 2)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    net.restore()
    good = lora_io._read(path)[0]
    q = "lora_unet_" + LAYERS[4].replace(".", "_")
    cases = [
        ({**good, f"{q}.dora_scale": torch.ones(65, 1)},
         r"to_q: dora_scale is torch.float32 of shape \(65, 1\); expected .* \(64, 1\) .* or \(1, 64\)"),
        ({**good, f"{q}.dora_scale": torch.ones(64, 1, dtype=torch.int32)}, r"dora_scale is torch.int32"),
        ({f"{q}.dora_scale": torch.ones(64, 1)}, r"dora_scale without factors"),
        ({**{k: v for k, v in good.items() if not k.startswith(q)}, f"{q}.dora_scale": torch.ones(64, 1)},
         r"to_q: (a )?dora_scale without factors"),
        ({f"{q}.hada_w1_a": torch.zeros(64, 2), f"{q}.hada_w1_b": torch.zeros(2, 64), f"{q}.hada_w2_a": torch.zeros(64, 2),
          f"{q}.hada_w2_b": torch.zeros(2, 64), f"{q}.dora_scale": torch.ones(1, 1, 64)}, r"dora_scale is .* \(1, 1, 64\)"),
        ({"lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1), "lora_unet_conv_in.alpha": torch.tensor(1.0),
          f"{q}.lokr_w1": torch.zeros(8, 8), f"{q}.lokr_w2": torch.zeros(8, 8)}, r"conv_in: alpha and dora_scale without"),
    ]
    target = unet
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    for tensors, match in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad))
        with pytest.raises(ValueError, match=match):
            sdxl.apply_lora(target, str(bad))
        assert {n: p.requires_grad for n, p in target.named_parameters()} == flags
    assert not any(isinstance(m, adapters.Adapter) for m in target.modules())
    # load_lora returns plain factors: it refuses a magnitude instead of dropping it
    with pytest.raises(ValueError, match=r"dora_scale.*apply_lora\(model, path\).*lycoris_adapters"):
        lora_io.load_lora(path, target)
