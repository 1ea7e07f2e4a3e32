"""LyCORIS (lycoris-lora 4.1.3) as the oracle for specops' presets and LoRA on convolutions (LoCon).

On the tiny SDXL-structured UNet and CLIP encoders (random init, offline): the layer sets of
inject's presets against the modules LyCORIS adapts; LyCORIS-written LoCon files (plain and Tucker)
applied by specops against LyCORIS's own adapted UNet; specops' kohya export loaded back by LyCORIS.
LyCORIS keeps its configuration in class attributes, which every test here restores.
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
lycoris = pytest.importorskip("lycoris")

from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.config import PRESET  # noqa: E402
from lycoris.kohya import create_network as create_kohya_network  # noqa: E402

from specops import lora_io, sdxl  # noqa: E402
from specops.sdxl.injection import PRESETS  # noqa: E402

# LyCORIS's attn-only preset names the attention classes of the original SD code; diffusers calls
# the same module Attention.
_DIFFUSERS_CLASS = {"CrossAttention": "Attention", "SelfAttention": "Attention"}


pytestmark = pytest.mark.usefixtures("one_thread", "lycoris_state")  # small ops: see conftest.one_thread


def _lycoris_names(model, preset: str, text: bool) -> set[str]:
    """The modules LyCORIS adapts for a built-in preset: its own module walk (LycorisNetwork) fed the
    preset's UNet or text-encoder lists, as its kohya trainer does for each model."""
    cfg = PRESET[preset]
    side = "text_encoder" if text else "unet"
    LycorisNetwork.apply_preset({
        "enable_conv": cfg["enable_conv"], "lora_prefix": "lycoris",
        "target_module": [_DIFFUSERS_CLASS.get(c, c) for c in cfg[f"{side}_target_module"]],
        "target_name": cfg[f"{side}_target_name"],
    })
    net = LycorisNetwork(model, lora_dim=2, conv_lora_dim=2, warn_on_unmatched=False)
    return {lora.lora_name for lora in net.loras}


def _specops_names(model, preset: str) -> set[str]:
    injected = sdxl.inject(model, "lora", preset=preset, rank=1)
    names = {"lycoris_" + name.replace(".", "_") for name in injected}
    sdxl.remove(model)
    return names


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_adapt_the_modules_lycoris_adapts(preset):
    unet = sdxl.tiny_unet(0)
    want = {"attn-only": 560, "attn-mlp": 726, "full-lin": 754, "full": 794}[preset]
    mine = _specops_names(unet, preset)
    assert len(mine) == want
    assert mine == _lycoris_names(unet, preset, text=False)
    for te in sdxl.tiny_text_encoders(0):
        mine = _specops_names(te, preset)
        assert len(mine) == (8 if preset == "attn-only" else 12)
        assert mine == _lycoris_names(te, preset, text=True)


def test_lycoris_entry_points_agree_where_they_apply_the_preset():
    """create_lycoris(unet, preset="full") adapts every Linear and Conv2d: specops' 794. (Its other
    presets keep their UNet / text-encoder lists unread and adapt the same 754 linear layers.)
    LyCORIS's kohya trainer entry reads them: attn-mlp there is specops' 726 and 12 + 12."""
    unet = sdxl.tiny_unet(0)
    net = create_lycoris(unet, 1.0, 2, 2, conv_dim=2, conv_alpha=2, algo="lora", preset="full", warn_on_unmatched=False)
    assert {lora.lora_name for lora in net.loras} == _specops_names(unet, "full")
    te1, te2 = sdxl.tiny_text_encoders(0)
    net = create_kohya_network(1.0, 2, 2, None, [te1, te2], unet, algo="lora", preset="attn-mlp",
                               warn_on_unmatched=False)
    assert {lora.lora_name.replace("lora_unet_", "lycoris_", 1) for lora in net.unet_loras} == \
        _specops_names(unet, "attn-mlp")
    for i, te in enumerate((te1, te2), 1):
        theirs = {lora.lora_name.replace(f"lora_te{i}_", "lycoris_", 1) for lora in net.text_encoder_loras
                  if lora.lora_name.startswith(f"lora_te{i}_")}
        assert theirs == _specops_names(te, "attn-mlp")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 7, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.randn(1, 6, generator=g)})


def _run(unet):
    with torch.no_grad():
        return unet(**_inputs()).sample


def _lycoris_from_file(path):
    """LyCORIS's network rebuilt from a file in kohya key names, applied to a fresh tiny UNet: (net, output)."""
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    fresh = sdxl.tiny_unet(0)
    net, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    net.apply_to()
    return net, _run(fresh)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tucker", [False, True])
def test_a_lycoris_locon_file_applies_exactly(tmp_path, tucker):
    unet = sdxl.tiny_unet(0)
    base = _run(unet)
    net = create_lycoris(unet, 1.0, 4, 2.0, conv_dim=3, conv_alpha=1.5, algo="lora", preset="full",
                         use_tucker=tucker, warn_on_unmatched=False)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random non-zero factors: lora_up too
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    theirs = _run(unet)
    assert _rel(theirs, base) > 0.1  # the file changes the model
    path = tmp_path / "locon.safetensors"
    net.save_weights(str(path), torch.float32, {})

    mine = sdxl.tiny_unet(0)
    found = sdxl.apply_lora(mine, str(path))
    assert len(found) == 794
    convs = [a for a in found.values() if a.is_conv]
    assert len(convs) == 51 and sum(a.mid is not None for a in convs) == (40 if tucker else 0)
    spatial = [a for a in convs if a.base.kernel_size != (1, 1)]
    assert {a.rank for a in spatial} == {3} and {a.rank for a in found.values() if a not in spatial} == {4}
    assert _rel(_run(mine), theirs) <= 1e-5


@pytest.mark.parametrize("tucker", [False, True])
def test_the_kohya_export_loads_into_lycoris(tmp_path, tucker):
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(0)
    found = sdxl.inject(unet, "lora", preset="full", rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5, tucker=tucker)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in found.values():
            a.B.copy_(0.1 * torch.randn(a.B.shape, generator=g))
        found["conv_in"].scale = 0.5  # a block-wise weight is part of the exported update
    mine = _run(unet)
    path = tmp_path / "kohya.safetensors"
    report = lora_io.export_lora(unet, path, format="kohya")
    assert report["max_rel_error"] <= 1e-6

    net, theirs = _lycoris_from_file(path)
    assert len(net.loras) == 794
    assert sum(getattr(lora, "tucker", False) for lora in net.loras) == (40 if tucker else 0)
    assert _rel(theirs, mine) <= 1e-5


# ----------------------------------------------------------------------------- LoHa and LoKr on Linear layers


def _linear_network(unet, algo: str, dim: int, alpha: float, std: float = 0.3, **options):
    """LyCORIS's `algo` on the Linear layers of the UNet's transformer blocks (its own module walk, as
    _lycoris_names), with random non-zero weights (every factor, also the zero-initialised ones)."""
    LycorisNetwork.apply_preset({"enable_conv": False, "lora_prefix": "lycoris", "target_module": ["Transformer2DModel"],
                                 "target_name": []})
    net = LycorisNetwork(unet, lora_dim=dim, alpha=alpha, network_module=algo, warn_on_unmatched=False, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return net


def _install(unet, built):
    """Put lycoris_adapters' {"unet.<module>": adapter} into the UNet."""
    for name, adapter in built.items():
        parent, _, child = name.partition(".")[2].rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, adapter)


# LyCORIS picks LoKr's forms per layer; on a 64 x 64 projection (an 8 x 8 split) rank 4 >= 8/2 keeps
# W2 dense (with W1 dense: scale 1, alpha unread), rank 3 factors W2 (alpha / 3), rank 2 with
# decompose_both factors W1 too (alpha / 2); full_matrix keeps every factor dense (its weights are
# drawn smaller: a ΔW that swamps W0 would only measure float32 rounding).
LYCORIS_LINEAR = [("loha", 4, {}, None), ("lokr", 4, {}, "dense"), ("lokr", 3, {}, "w2"),
                  ("lokr", 2, {"decompose_both": True}, "both"), ("lokr", 4, {"full_matrix": True, "std": 0.1}, "dense")]


@pytest.mark.parametrize("algo, dim, options, form", LYCORIS_LINEAR)
def test_a_lycoris_loha_lokr_file_applies_exactly(tmp_path, algo, dim, options, form):
    unet = sdxl.tiny_unet(0)
    base = _run(unet)
    net = _linear_network(unet, algo, dim, 1.5, **options)  # std: the weights' scale
    theirs = _run(unet)
    assert _rel(theirs, base) > 1e-2  # the file changes the model
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})

    mine = sdxl.tiny_unet(0)
    built = lora_io.lycoris_adapters(path, mine)
    assert len(built) == len(net.loras) == 722
    assert {a.method for a in built.values()} == {algo}
    if algo == "lokr":  # the forms on a 64 x 64 projection
        q = built["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
        assert (q.w1_rank, q.rank) == {"dense": (None, None), "w2": (None, 3), "both": (2, 2)}[form]
        if options.get("full_matrix"):
            assert all(a.w1_rank is None and a.rank is None for a in built.values())
    _install(mine, built)
    assert _rel(_run(mine), theirs) <= 1e-5


@pytest.mark.parametrize("method, options", [
    ("loha", {"rank": 3, "alpha": 1.5}),
    ("lokr", {}),                                             # both dense: written dense, scale folded into W1
    ("lokr", {"rank": 2, "alpha": 3.0}),                      # W2 factored
    ("lokr", {"rank": 2, "w1_rank": 2, "alpha": 0.5}),        # both factored, as decompose_both
    ("lokr", {"rank": 6, "w1_rank": 1}),                      # ranks LyCORIS would not rebuild: written dense
])
def test_the_lycoris_loha_lokr_export_loads_into_lycoris(tmp_path, method, options):
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(0)
    found = sdxl.inject(unet, method, preset="attn-mlp", **options)
    g = torch.Generator().manual_seed(2)
    std = 0.3 if method == "loha" else 0.1  # LoKr's dense W1 ⊗ W2 is larger: keep ΔW below W0
    with torch.no_grad():
        for a in found.values():
            for p in a.parameters():
                if p.requires_grad:
                    p.copy_(std * torch.randn(p.shape, generator=g))
        next(iter(found.values())).scale = 0.5  # a block-wise weight is part of the exported update
    mine = _run(unet)
    path = tmp_path / "kohya.safetensors"
    report = lora_io.export_lora(unet, path, format="lycoris")
    assert report["max_rel_error"] <= 1e-6

    net, theirs = _lycoris_from_file(path)
    assert len(net.loras) == len(found) == 726
    assert {type(lora).__name__ for lora in net.loras} == {"LohaModule" if method == "loha" else "LokrModule"}
    assert _rel(theirs, mine) <= 1e-5
    # and specops reads its own file back into the same adapters
    again = sdxl.tiny_unet(0)
    _install(again, lora_io.lycoris_adapters(path, again))
    assert _rel(_run(again), mine) <= 1e-5


def test_lycoris_adapters_validates_before_building(tmp_path):
    from safetensors.torch import save_file
    unet = sdxl.tiny_unet(0)
    net = _linear_network(unet, "loha", 2, 1.0)
    path = tmp_path / "loha.safetensors"
    net.save_weights(str(path), torch.float32, {})
    good = lora_io._read(path)[0]
    name = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    cases = [
        ({**good, f"{name}.dora_scale": torch.ones(65, 1)}, r"dora_scale is torch.float32 of shape \(65, 1\)"),
        ({**good, f"{name}.hada_w3_a": torch.ones(2, 2)}, r"hada_w3_a.*not loha keys specops reads"),
        ({k: v for k, v in good.items() if k != f"{name}.hada_w2_b"}, r"lacks \['hada_w2_b'\]"),
        ({**good, f"{name}.hada_w1_b": torch.zeros(2, 65)}, r"hada_w1_b is \(2, 65\), expected \(2, 64\)"),
        ({**good, "lycoris_nope_to_q.hada_w1_a": torch.zeros(64, 2)}, "maps to no Linear or Conv2d layer"),
        ({**good, f"{name}.lora_down.weight": torch.zeros(2, 64)}, "is not a LoHa / LoKr key"),
        ({**good, f"{name}.hada_t1": torch.zeros(2, 2, 3, 3), f"{name}.hada_t2": torch.zeros(2, 2, 3, 3)},
         r"Tucker cores .* need a conv kernel larger than 1x1"),
        ({**good, "lycoris_conv_in.hada_w1_a": torch.zeros(32, 2)}, r"unet.conv_in: lacks \['hada_w1_b'"),
        ({f"{name}.lokr_w1": torch.zeros(8, 8), f"{name}.lokr_w2_a": torch.zeros(8, 2)},
         r"expected lokr_w2 or both lokr_w2_a and lokr_w2_b, got \['lokr_w2_a'\]"),
        ({f"{name}.lokr_w1": torch.zeros(7, 8), f"{name}.lokr_w2": torch.zeros(8, 8)}, "does not divide"),
    ]
    target = sdxl.tiny_unet(0)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    for tensors, match in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad))
        with pytest.raises(ValueError, match=match):
            lora_io.lycoris_adapters(bad, target)
        assert {n: p.requires_grad for n, p in target.named_parameters()} == flags
    assert not any(isinstance(m, lora_io.adapters.Adapter) for m in target.modules())


# ----------------------------------------------------------------------------- LoHa and LoKr on convolutions

# create_lycoris(preset="full"): every Linear and Conv2d; 51 convs, 40 of them 3x3 (Tucker where asked).
# LyCORIS 4.1.3 cannot reload its own factored conv LoKr files (it infers the Kronecker split from
# lokr_w2_b's flattened width), so specops writes conv LoKr factors dense; they load back exactly.
LYCORIS_CONV = [("loha", 4, {}), ("loha", 4, {"use_tucker": True}), ("lokr", 3, {}), ("lokr", 3, {"use_tucker": True}),
                ("lokr", 2, {"decompose_both": True, "use_tucker": True})]


@pytest.mark.parametrize("algo, dim, options", LYCORIS_CONV)
def test_lycoris_conv_loha_lokr_files_both_ways(tmp_path, algo, dim, options):
    unet = sdxl.tiny_unet(0)
    base = _run(unet)
    net = create_lycoris(unet, 1.0, dim, 1.5, conv_dim=dim, conv_alpha=0.5, algo=algo, preset="full",
                         warn_on_unmatched=False, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    theirs = _run(unet)
    assert _rel(theirs, base) > 0.1
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})

    mine = sdxl.tiny_unet(0)
    built = lora_io.lycoris_adapters(path, mine)
    assert len(built) == 794 and {a.method for a in built.values()} == {algo}
    convs = [a for a in built.values() if a.is_conv]
    tucker = options.get("use_tucker", False)
    assert len(convs) == 51 and sum(a.config()["tucker"] for a in convs) == (40 if tucker else 0)
    _install(mine, built)
    assert _rel(_run(mine), theirs) <= 1e-5

    for a in convs[:5]:
        a.scale = 0.5  # a block-wise weight is part of the exported update
    weighted = _run(mine)
    out = tmp_path / "specops.safetensors"
    assert lora_io.export_lora(mine, out, format="lycoris")["max_rel_error"] <= 1e-6
    net, theirs = _lycoris_from_file(out)
    assert len(net.loras) == 794
    assert sum(getattr(lora, "tucker", False) for lora in net.loras) == (40 if tucker and algo == "loha" else 0)
    assert _rel(theirs, weighted) <= 1e-5
