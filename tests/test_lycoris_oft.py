"""LyCORIS's diag-oft and BOFT files (oft_blocks, rescale, alpha = constraint) both ways, on the
resnets of the tiny SDXL UNet: their time_emb_proj Linear layers, 3x3 conv1 / conv2 and 1x1 conv_shortcut.

LyCORIS rotates the output side: diag-oft W = diag(g) R^T W0 with R = (I + q)(I - q)^-1, which specops
reads as OFT(side="output") with Q = -2 oft_blocks (see specops.adapters.OFT); BOFT W = diag(g)
B_{m-1} ⋯ B_0 W0 with stage blocks (I + q)(I - q)^-1 and 4-D oft_blocks, read as BOFT(side="output")
with Q = 2 oft_blocks (specops.adapters.BOFT). Block sizes stay <= 8: LyCORIS inverts its blocks in
one batched call, which stalls on large blocks here.
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("lycoris")

from lycoris import LycorisNetwork  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_lycoris import _install, _lycoris_from_file, _rel, _run  # noqa: E402

from specops import adapters, lora_io, sdxl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "lycoris_state")  # small ops: see conftest.one_thread

RESNET_LAYERS = ["time_emb_proj", "conv1", "conv2", "conv_shortcut"]  # 62 layers, 11 of them 1x1 shortcuts


# per algorithm: specops's method, LyCORIS's module class, LyCORIS's lora_dim
ALGOS = {"diag-oft": ("oft", "DiagOFTModule", 8), "boft": ("boft", "ButterflyOFTModule", 4)}


def _oft_network(unet, algo, **options):
    """LyCORIS's diag-oft or BOFT on the resnets (its own module walk), blocks of size <= 8 (diag-oft's
    factorization(out, dim) puts the smaller factor on the block; BOFT's lora_dim 4 gives blocks of 4),
    random oft_blocks, rescale near 1."""
    LycorisNetwork.apply_preset({"enable_conv": True, "lora_prefix": "lycoris", "target_module": ["ResnetBlock2D"],
                                 "target_name": []})
    net = LycorisNetwork(unet, lora_dim=ALGOS[algo][2], conv_lora_dim=4, alpha=1, network_module=algo,
                         warn_on_unmatched=False, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_((1.0 if name.endswith("rescale") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("options", [{}, {"rescaled": True, "constraint": 0.005}],
                         ids=["plain", "rescaled-constrained"])
def test_lycoris_oft_files_both_ways(tmp_path, algo, options):
    method, module, _ = ALGOS[algo]
    unet = sdxl.tiny_unet(0)
    base = _run(unet)
    net = _oft_network(unet, algo, **options)
    theirs = _run(unet)
    assert _rel(theirs, base) > 1e-2  # the file changes the model
    path = tmp_path / "oft.safetensors"
    net.save_weights(str(path), torch.float32, {})

    mine = sdxl.tiny_unet(0)
    built = sdxl.apply_lora(mine, str(path))  # lycoris_adapters, installed
    assert len(built) == len(net.loras) == 62 and sum(a.is_conv for a in built.values()) == 45
    assert {a.method for a in built.values()} == {method} and {a.side for a in built.values()} == {"output"}
    if method == "boft":  # blocks of 4 in several butterfly stages, not one block-diagonal stage
        assert {a.Q.shape[-1] for a in built.values()} == {4} and max(a.Q.shape[0] for a in built.values()) >= 4
    assert all((a.g is not None) == options.get("rescaled", False) for a in built.values())
    kappa = options.get("constraint", 0.0)
    assert all(a.constraint == pytest.approx(kappa) for a in built.values())
    if kappa:  # the constraint clips some layers' generators, so the comparison below tests it
        assert any((a.Q - a.Q.mT).norm() / 2 > kappa * a.out_features for a in built.values())
    assert _rel(_run(mine), theirs) <= 1e-5

    out = tmp_path / "specops.safetensors"
    report = lora_io.export_lora(mine, out, format="lycoris")
    # the tensors written are exact; the error is the fp32 adapter's own rounding, over several stages in BOFT
    assert report["max_rel_error"] <= (1e-5 if method == "boft" else 1e-6)
    # 32 outputs: diag-oft's factorization(32, 8) makes 8 blocks of 4, BOFT 8 blocks of 4 per stage
    assert report["rank"]["unet.down_blocks.0.resnets.0.time_emb_proj"] == 8
    net, back = _lycoris_from_file(out)
    assert len(net.loras) == 62 and {type(lora).__name__ for lora in net.loras} == {module}
    assert _rel(back, theirs) <= 1e-5


# per method: inject's options, and two adapters LyCORIS cannot rebuild (besides a scaled one)
_ODD = {
    "oft": (dict(blocks=16), {"down_blocks.0.resnets.0.conv1": dict(blocks=16, side="input"),  # in·kh·kw = 288
                              "up_blocks.0.resnets.0.conv1": dict(blocks=2, side="output")}),  # p = out / 2: p² > out
    "boft": (dict(block_size=4), {"down_blocks.0.resnets.0.conv1": dict(block_size=4, side="input"),
                                  "up_blocks.0.resnets.0.conv1": dict(block_size=4, stages=2, side="output")}),
}


@pytest.mark.parametrize("algo", ALGOS)
def test_oft_adapters_lycoris_cannot_hold_are_exported_as_locon(tmp_path, algo):
    """Output-side OFT at scale 1 goes out as diag-oft, BOFT as LyCORIS's BOFT; an input-side one, a
    scaled one and one LyCORIS would rebuild otherwise (OFT blocks with p² > out, a BOFT short of
    the full butterfly) go out as exact LoRA factors of their ΔW; LyCORIS and specops both read the
    mixed file."""
    method, module, _ = ALGOS[algo]
    options, odd = _ODD[method]
    unet = sdxl.tiny_unet(0)
    found = sdxl.inject(unet, method, targets=RESNET_LAYERS, side="output", rescale=True, constraint=0.01, **options)
    for name, own in odd.items():
        found[name] = adapters.make_adapter(method, found[name].base, **own)
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, found[name])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in found.values():
            a.Q.copy_(0.2 * torch.randn(a.Q.shape, generator=g))
            if a.g is not None:
                a.g.add_(0.1 * torch.randn(a.g.shape, generator=g))
    found["down_blocks.1.resnets.0.conv2"].scale = 0.5
    mine = _run(unet)
    out = tmp_path / "specops.safetensors"
    report = lora_io.export_lora(unet, out, format="lycoris")
    assert report["max_rel_error"] <= (1e-5 if method == "boft" else 1e-6)  # as above
    tensors = lora_io._read(out)[0]
    locon = {k.partition(".")[0] for k in tensors if k.endswith("lora_down.weight")}
    assert locon == {"lora_unet_" + n.replace(".", "_") for n in [*odd, "down_blocks.1.resnets.0.conv2"]}
    assert sum(k.endswith("oft_blocks") and tensors[k].dim() == (4 if method == "boft" else 3) for k in tensors) == 62 - 3
    net, theirs = _lycoris_from_file(out)
    kinds = [type(lora).__name__ for lora in net.loras]
    assert len(kinds) == 62 and kinds.count("LoConModule") == 3 and kinds.count(module) == 59
    assert _rel(theirs, mine) <= 1e-5
    # and specops reads the mixed file back: diag-oft / BOFT modules as OFT / BOFT, the others as LoRA
    again = sdxl.tiny_unet(0)
    built = lora_io.lycoris_adapters(out, again)
    assert sorted(a.method for a in built.values()).count("lora") == 3 and len(built) == 62
    _install(again, built)
    assert _rel(_run(again), mine) <= 1e-5


def test_diag_oft_entries_are_checked_before_building(tmp_path):
    name = "lycoris_down_blocks_0_resnets_0_time_emb_proj"  # a Linear with 32 outputs
    conv = "lycoris_down_blocks_0_resnets_0_conv1"          # a 3x3 conv with 32 outputs
    good = {f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(0.0),
            f"{conv}.oft_blocks": torch.zeros(8, 4, 4), f"{conv}.rescale": torch.ones(32, 1, 1, 1)}
    cases = [
        ({**good, f"{name}.oft_blocks": torch.zeros(4, 8, 3, 3)}, r"oft_blocks is .* \(stages, blocks, b, b\) \(BOFT: b even"),
        ({**good, f"{name}.oft_blocks": torch.zeros(6, 16, 2, 2)}, r"2\^\(stages-1\)·b dividing out"),
        ({**good, f"{name}.oft_blocks": torch.zeros(3, 8, 8)}, r"blocks·p = out = 32"),
        ({**good, f"{conv}.rescale": torch.ones(32, 1)}, r"rescale is .* expected float \(32, 1, 1, 1\)"),
        ({**good, f"{name}.alpha": torch.tensor(-1.0)}, r"alpha \(the rotation's constraint\) is -1.0"),
        ({**good, f"{name}.lokr_w1": torch.zeros(4, 4)}, r"keys \['lokr_w1'\] are not diag-oft / BOFT keys"),
        ({k: v for k, v in good.items() if k != f"{conv}.oft_blocks"}, r"conv1: lacks \['oft_blocks'\]"),
    ]
    target = sdxl.tiny_unet(0)
    ok = tmp_path / "ok.safetensors"
    save_file(good, str(ok))
    built = lora_io.lycoris_adapters(ok, target)
    assert {n: (a.side, a.Q.shape[0], a.g is not None) for n, a in built.items()} == {
        "unet.down_blocks.0.resnets.0.time_emb_proj": ("output", 4, False),
        "unet.down_blocks.0.resnets.0.conv1": ("output", 8, True)}
    with pytest.raises(ValueError, match="is a LyCORIS LoHa / LoKr / diag-OFT key, not a LoRA one"):
        lora_io.load_lora(ok, target)
    for tensors, match in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad))
        with pytest.raises(ValueError, match=match):
            lora_io.lycoris_adapters(bad, target)
    assert not any(isinstance(m, adapters.Adapter) for m in target.modules())
