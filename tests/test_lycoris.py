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
from lycoris.kohya import LycorisNetworkKohya  # noqa: E402
from lycoris.kohya import create_network as create_kohya_network  # noqa: E402

from specops import lora_io, sdxl  # noqa: E402
from specops.sdxl.injection import PRESETS  # noqa: E402

# LyCORIS's attn-only preset names the attention classes of the original SD code; diffusers calls
# the same module Attention.
_DIFFUSERS_CLASS = {"CrossAttention": "Attention", "SelfAttention": "Attention"}


@pytest.fixture(autouse=True)
def _lycoris_state(monkeypatch):
    """Undo LyCORIS's class-level configuration (apply_preset, LORA_PREFIX) after every test."""
    for cls in (LycorisNetwork, LycorisNetworkKohya):
        for name in dir(cls):
            if name.isupper():
                monkeypatch.setattr(cls, name, getattr(cls, name))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread is faster, and the cores are shared
    yield
    torch.set_num_threads(threads)


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

    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})  # kohya's key names
    fresh = sdxl.tiny_unet(0)
    net, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    net.apply_to()
    assert len(net.loras) == 794
    assert sum(getattr(lora, "tucker", False) for lora in net.loras) == (40 if tucker else 0)
    assert _rel(_run(fresh), mine) <= 1e-5
