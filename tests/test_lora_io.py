"""specops.lora_io: exact adapter files, LoRA export that diffusers itself loads, kohya and SGM import.

Models are the tiny random SDXL stand-ins of specops.sdxl (built offline, same seed = same weights);
adapters sit on a handful of layers to keep the file fast.
"""
import errno
import json
import os
import re
import select
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from specops import lora_io, sdxl
from specops.adapters import Adapter, make_adapter

# Attention layers of every kind and level of the tiny SDXL UNet (self/cross, q/k/v/out, down/mid/up).
LORA_LAYERS = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
    "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k",
]
SVD_LAYER = "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v"  # (128, 96): full rank 96
OTHER_LAYERS = {  # one layer per remaining method, for the save/load round trip
    "soda-svd": "up_blocks.0.attentions.2.transformer_blocks.5.attn1.to_v",
    "koft": "down_blocks.2.attentions.0.transformer_blocks.4.attn1.to_k",
    "oft": "up_blocks.0.attentions.0.transformer_blocks.7.attn2.to_q",
    "loha": "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0",
    "lokr": "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
}
TE_LAYERS = ["layers.0.self_attn.q_proj", "layers.1.self_attn.out_proj"]  # suffixes: flat or not, CLIP's names


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 20]),
                encoder_hidden_states=torch.randn(2, 7, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)})


def _run(unet):
    with torch.no_grad():
        return unet(**_unet_inputs()).sample


def _encode(te1, te2):
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.cat([t.flatten() for t in sdxl.encode_prompt((te1, te2), ids)])


def _models(seed=0):
    te1, te2 = sdxl.tiny_text_encoders(seed)
    return {"unet": sdxl.tiny_unet(seed), "text_encoder": te1, "text_encoder_2": te2}


def _perturb(adapters, seed=0):
    """Move every adapter away from its identity start (orthogonal factors stay orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            ortho = {id(p) for p in adapter.orthogonal_parameters()}
            for name, p in adapter.named_parameters():
                if name.startswith("base."):
                    continue
                if id(p) in ortho:
                    p.copy_(torch.linalg.qr(torch.randn(p.shape, generator=g, dtype=torch.float64))[0])
                else:
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _inject_loras(unet, layers=LORA_LAYERS, seed=0):
    """LoRA with alpha != rank and a block scale, so the exported B must carry scale·alpha/rank."""
    found = sdxl.inject(unet, "lora", targets=layers, rank=2, alpha=3.0)
    for a in found.values():
        a.scale = 0.5
    _perturb(found, seed)
    return found


def _snapshot(model):
    modules = model.values() if isinstance(model, dict) else [model]
    return [({k: v.clone() for k, v in m.state_dict().items()}, {n: type(x) for n, x in m.named_modules()},
             {n: p.requires_grad for n, p in m.named_parameters()}) for m in modules]


def _assert_unchanged(before, model):
    for (s0, t0, g0), (s1, t1, g1) in zip(before, _snapshot(model)):
        assert t0 == t1, "module types changed"
        assert g0 == g1, "requires_grad flags changed"
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0), "tensors changed"


def _adapters(model):
    return {f"{c}.{n}": m for c, root in model.items() for n, m in root.named_modules() if isinstance(m, Adapter)}


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bitwise(tmp_path):
    src = _models()
    found = {}
    found.update(_inject_loras(src["unet"]))
    found.update(sdxl.inject(src["unet"], "svdiff", targets=[SVD_LAYER]))
    found.update(sdxl.inject(src["unet"], "soda-svd", targets=[OTHER_LAYERS["soda-svd"]], side="basis"))
    for method in ("koft", "oft", "loha"):
        found.update(sdxl.inject(src["unet"], method, targets=[OTHER_LAYERS[method]]))
    found.update(sdxl.inject(src["unet"], "lokr", targets=[OTHER_LAYERS["lokr"]], rank=2))
    te_lora = sdxl.inject(src["text_encoder"], "lora", targets=TE_LAYERS)
    found.update(te_lora)
    found.update(sdxl.inject(src["text_encoder_2"], "soda-lq", targets=["layers.1.self_attn.v_proj"]))
    _perturb(found)
    next(iter(te_lora.values())).A.requires_grad_(False)  # frozen, not trainable: must round-trip all the same
    fused = found[OTHER_LAYERS["loha"]]
    fused.fuse()  # the fingerprint must be of W0, not of the fused weight

    path = tmp_path / "adapters.safetensors"
    names = lora_io.save_adapters(src, path, extra_metadata={"note": "test"})
    fused.unfuse()
    assert len(names) == len(found) == 12
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["note"] == "test"
        meta = json.loads(f.metadata()["specops.modules"])
    assert {m["method"] for m in meta.values()} == {"lora", "svdiff", "soda-lq", *OTHER_LAYERS}

    dst = _models()
    assert lora_io.load_adapters(dst, path) == names == sorted(names)
    src_adapters, dst_adapters = _adapters(src), _adapters(dst)
    assert src_adapters.keys() == dst_adapters.keys() == set(names)
    for name, a in src_adapters.items():
        b = dst_adapters[name]
        assert (b.method, b.config()) == (a.method, a.config()), name
    for c in src:
        s0, s1 = src[c].state_dict(), dst[c].state_dict()
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0), c
    assert torch.equal(_run(dst["unet"]), _run(src["unet"]))
    assert torch.equal(_encode(dst["text_encoder"], dst["text_encoder_2"]),
                       _encode(src["text_encoder"], src["text_encoder_2"]))

    # Loading into existing adapters of the same config works in place: an optimizer keeps its tensors.
    params = {n: p for n, p in dst["unet"].named_parameters()}
    _perturb(dst_adapters, seed=1)
    lora_io.load_adapters(dst, path)
    assert all(p is params[n] for n, p in dst["unet"].named_parameters())
    s0, s1 = src["unet"].state_dict(), dst["unet"].state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_load_rejects_damaged_and_foreign_files_and_changes_nothing(tmp_path):
    src = sdxl.tiny_unet(0)
    _inject_loras(src)
    good = tmp_path / "good.safetensors"
    lora_io.save_adapters(src, good)
    raw = good.read_bytes()

    dst = sdxl.tiny_unet(0)
    sdxl.inject(dst, "oft", targets=[OTHER_LAYERS["oft"]])  # an unrelated adapter that must survive
    before = _snapshot(dst)

    def rejects(path, match, model=dst, snapshot=before):
        with pytest.raises(ValueError, match=match):
            lora_io.load_adapters(model, path)
        _assert_unchanged(snapshot, model)

    for cut in (5, 200, len(raw) // 2, len(raw) - 1):  # in the header length, the header, the data
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        rejects(tmp_path / "cut.safetensors", "not a readable safetensors file")

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    rejects(tmp_path / "plain.safetensors", "not a specops adapter file")
    lora_io.export_lora(src, tmp_path / "lora.safetensors")
    rejects(tmp_path / "lora.safetensors", "not a specops adapter file")

    other = sdxl.tiny_unet(1)
    rejects(good, "saved for another base model", model=other, snapshot=_snapshot(other))
    # The last module checked (sorted order) has a base nudged by one part in 1e5 at one entry: the
    # modules before it were already validated (and their make_adapter froze their bases) when it fails.
    weight = dst.get_submodule(sorted(LORA_LAYERS)[-1]).weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] *= 1 + 1e-5
    rejects(good, "checksum", snapshot=_snapshot(dst))
    with torch.no_grad():
        weight[0, 0] = original

    rejects(good, "no such module", model={"unet": dst})  # names saved without a prefix

    tensors, metadata = lora_io._read(good)
    modules = json.loads(metadata["specops.modules"])
    modules[LORA_LAYERS[1]]["config"]["rank"] = 3
    save_file(tensors, tmp_path / "rank3.safetensors", metadata={**metadata, "specops.modules": json.dumps(modules)})
    rejects(tmp_path / "rank3.safetensors", "expects")

    # the last module checked holds an adapter of another method (the ones before it pass)
    sdxl.inject(dst, "oft", targets=[sorted(LORA_LAYERS)[-1]])
    rejects(good, "holds a 'oft' adapter", snapshot=_snapshot(dst))


def _writers():
    return {"save_adapters": lora_io.save_adapters, "export_lora": lora_io.export_lora,
            "export_lora kohya": lambda m, p: lora_io.export_lora(m, p, format="kohya")}


@pytest.mark.parametrize("writer", list(_writers()))
@pytest.mark.parametrize("old_file", [True, False])
def test_a_writer_that_fails_half_way_leaves_the_old_file(tmp_path, monkeypatch, writer, old_file):
    """Disk full half-way through: the file at the path is the old one, byte for byte (or there is
    none), no temp file is left, and the OSError reaches the caller."""
    write = _writers()[writer]
    unet = sdxl.tiny_unet(0)
    _inject_loras(unet, LORA_LAYERS[:2])
    path = tmp_path / "a.safetensors"
    if old_file:
        write(unet, path)
        raw = path.read_bytes()
    real = lora_io.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        with open(filename, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lora_io, "save_file", half_then_full)
    _perturb(_adapters({"unet": unet}), seed=3)  # what would have been written differs from the old file
    with pytest.raises(OSError) as err:
        write(unet, path)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == (["a.safetensors"] if old_file else [])
    if old_file:
        assert path.read_bytes() == raw


_KILLED_WRITER = """
import sys, time
import torch
from torch import nn
from safetensors.torch import save
from specops import lora_io
from specops.adapters import make_adapter

model = nn.Sequential(nn.Linear(8, 6))
model[0] = make_adapter("lora", model[0], rank=2)

def half_then_hang(tensors, filename, metadata=None):
    data = save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[:len(data) // 2])
    print("half", flush=True)
    time.sleep(600)

lora_io.save_file = half_then_hang
lora_io.save_adapters(model, sys.argv[1])
"""


def test_a_writer_killed_half_way_leaves_the_old_file(tmp_path):
    """SIGKILL in the middle of a save: the old file is intact. The half-written temp file stays
    (nothing runs to remove it) as ".a.safetensors.<8 hex>.tmp": hidden, another suffix, never the
    target's name, and no reader accepts it."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    model[0] = make_adapter("lora", model[0], rank=2)
    with torch.no_grad():
        model[0].B.copy_(torch.randn(6, 2, generator=g))
    path = tmp_path / "a.safetensors"
    lora_io.save_adapters(model, path)
    raw = path.read_bytes()

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 600)  # a guard against a hang, not a timing
        line = proc.stdout.readline() if ready else ""
        assert line == "half\n", f"the writer did not reach the middle of its save: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert path.read_bytes() == raw
    strays = [p for p in os.listdir(tmp_path) if p != path.name]
    assert len(strays) == 1 and re.fullmatch(r"\.a\.safetensors\.[0-9a-f]{8}\.tmp", strays[0]), strays
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora_io.load_adapters(model, tmp_path / strays[0])
    lora_io.load_adapters(model, path)  # the old file still loads


def test_non_finite_adapters_are_not_written(tmp_path):
    unet = sdxl.tiny_unet(0)
    lora = _inject_loras(unet, LORA_LAYERS[:1])[LORA_LAYERS[0]]
    with torch.no_grad():
        lora.A[0, 0] = float("nan")
    for write in _writers().values():
        with pytest.raises(ValueError, match="holds NaN or Inf") as err:
            write(unet, tmp_path / "a.safetensors")
        assert LORA_LAYERS[0].replace(".", "_") in str(err.value).replace(".", "_")  # kohya names: underscores
    assert not os.listdir(tmp_path)


def test_save_refuses_what_it_could_not_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    content = (torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g))
    style = (torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g))
    model[0] = zipped = make_adapter("ziplora", model[0], content=content, style=style)
    with pytest.raises(ValueError, match="needs \\['content', 'style'\\].*export_lora"):
        lora_io.save_adapters(model, tmp_path / "zip.safetensors")
    assert not os.listdir(tmp_path)
    # ... and export_lora writes its merge exactly (rank 2 + 3)
    lora_io.export_lora(model, tmp_path / "zip.safetensors")
    B, A = lora_io.load_lora(tmp_path / "zip.safetensors")["unet.0"]
    assert A.shape == (5, 8) and all(torch.equal(x, y) for x, y in zip((B, A), zipped.lora_factors()))

    model[0] = make_adapter("lora", zipped.base)
    with pytest.raises(ValueError, match="extra_metadata"):
        lora_io.save_adapters(model, tmp_path / "x.safetensors", extra_metadata={"specops.format": "mine"})


# ----------------------------------------------------------------------------- LoRA export


def test_diffusers_export_loads_through_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    src = _models()
    _inject_loras(src["unet"])
    _perturb(sdxl.inject(src["unet"], "svdiff", targets=[SVD_LAYER]))  # not a LoRA: exported by SVD
    _perturb(sdxl.inject(src["unet"], "koft", targets=[OTHER_LAYERS["koft"]]))
    _perturb(sdxl.inject(src["text_encoder"], "lora", targets=TE_LAYERS))
    _perturb(sdxl.inject(src["text_encoder_2"], "svdiff", targets=["layers.1.self_attn.k_proj"]))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    report = lora_io.export_lora(src, path)
    assert report["max_rel_error"] < 1e-6
    assert report["rank"][f"unet.{SVD_LAYER}"] == 96 and report["rank"][f"unet.{LORA_LAYERS[0]}"] == 2
    keys = load_file(path).keys()
    assert f"unet.{LORA_LAYERS[1]}.lora_B.weight" in keys
    # transformers 5 flattens CLIPTextModel; the file keeps the usual names
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight" in keys

    expected = _run(src["unet"])
    # from the file (diffusers reads our LoraConfig metadata) and from a bare state dict (it infers)
    for source in ("file", "dict"):
        unet = sdxl.tiny_unet(0)
        if source == "file":
            unet.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="x")
            assert set(unet.peft_config["x"].rank_pattern) == {re.escape(SVD_LAYER), re.escape(OTHER_LAYERS["koft"])}
        else:
            unet.load_lora_adapter(load_file(path), prefix="unet", adapter_name="x")
        scalings = [m.scaling["x"] for m in unet.modules() if hasattr(m, "scaling") and "x" in m.scaling]
        assert len(scalings) == 5 and set(scalings) == {1.0}
        assert (_run(unet) - expected).abs().max().item() < 1e-4, source

    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(tmp_path), weight_name=path.name, return_lora_metadata=True)
    te1, te2 = sdxl.tiny_text_encoders(0)
    for te, prefix in ((te1, "text_encoder"), (te2, "text_encoder_2")):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, te, prefix=prefix, metadata=metadata,
                                                              adapter_name="x")
    got, want = _encode(te1, te2), _encode(src["text_encoder"], src["text_encoder_2"])
    assert (got - want).abs().max().item() < 1e-4


def test_truncated_export_reports_the_eckart_young_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 20))
    svd = sdxl.inject(model, "svdiff", targets=["0"])
    _perturb(svd)
    lora = sdxl.inject(model, "lora", targets=["1"], rank=4)
    _perturb(lora)
    report = lora_io.export_lora(model, tmp_path / "l.safetensors", rank=3)
    s = torch.linalg.svdvals(svd["0"].delta_weight().double())
    assert report["rank"] == {"unet.0": 3, "unet.1": 3}
    assert report["rel_error"]["unet.0"] == pytest.approx((s[3:].norm() / s.norm()).item(), rel=1e-5)
    s = torch.linalg.svdvals(lora["1"].delta_weight().double())
    assert report["rel_error"]["unet.1"] == pytest.approx((s[3:].norm() / s.norm()).item(), rel=1e-5)
    assert report["max_rel_error"] == max(report["rel_error"].values()) > 0.01
    B, A = lora_io.load_lora(tmp_path / "l.safetensors")["unet.0"]
    assert B.shape == (16, 3) and A.shape == (3, 24)


# ----------------------------------------------------------------------------- LoRA import


def test_kohya_round_trip_is_exact_and_diffusers_reads_it(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    src = _models()
    loras = _inject_loras(src["unet"])
    _perturb(sdxl.inject(src["unet"], "svdiff", targets=[SVD_LAYER]))
    te_loras = sdxl.inject(src["text_encoder"], "lora", rank=3,
                           targets=["layers.0.self_attn.q_proj", "layers.0.self_attn.out_proj"])
    loras.update({f"te1.{k}": v for k, v in te_loras.items()})
    _perturb(loras, seed=2)
    _perturb(sdxl.inject(src["text_encoder_2"], "svdiff", targets=["layers.1.self_attn.out_proj"]))
    kohya, diffusers_path = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    lora_io.export_lora(src, kohya, format="kohya")
    lora_io.export_lora(src, diffusers_path)

    raw = load_file(kohya)
    key = "lora_unet_" + LORA_LAYERS[1].replace(".", "_")
    assert raw[f"{key}.alpha"].item() == 2.0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in raw
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in raw

    by_grammar, from_diffusers = lora_io.load_lora(kohya), lora_io.load_lora(diffusers_path)
    assert by_grammar.keys() == from_diffusers.keys() and len(by_grammar) == 7
    for name, (B, A) in by_grammar.items():
        assert torch.equal(B, from_diffusers[name][0]) and torch.equal(A, from_diffusers[name][1]), name
    for name in LORA_LAYERS:  # exact factors, scale 0.5·alpha/rank folded into B
        B, A = src["unet"].get_submodule(name).lora_factors()
        assert torch.equal(by_grammar[f"unet.{name}"][0], B) and torch.equal(by_grammar[f"unet.{name}"][1], A)
    te_name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert torch.equal(by_grammar[te_name][1], src["text_encoder"].get_submodule("encoder.layers.0.self_attn.q_proj").A)

    # with the model, names are the model's own (a transformers 5 CLIPTextModel has no text_model.)
    by_model = lora_io.load_lora(kohya, model=src)
    assert by_model.keys() == {k.replace("text_encoder.text_model.", "text_encoder.") for k in by_grammar}
    assert torch.equal(by_model["text_encoder.encoder.layers.0.self_attn.q_proj"][0], by_grammar[te_name][0])

    # end to end on fresh UNets: specops' own apply_lora reproduces the adapted UNet ...
    unet = sdxl.tiny_unet(0)
    sdxl.apply_lora(unet, by_model, prefix="unet")
    assert (_run(unet) - _run(src["unet"])).abs().max().item() < 1e-4
    # ... and diffusers' kohya converter + loader agrees with it. Only on a file of one rank: diffusers
    # 0.42 keys the alpha_pattern of a kohya file by its intermediate names ("...processor.to_v_lora
    # .down.weight"), which match no module, so a module of another rank gets the majority's alpha.
    lora_io.export_lora(src, kohya, format="kohya", rank=2)
    unet = sdxl.tiny_unet(0)
    sdxl.apply_lora(unet, lora_io.load_lora(kohya, model=src), prefix="unet")
    expected = _run(unet)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(kohya), unet_config=unet.config)
    unet = sdxl.tiny_unet(0)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="k")
    assert (_run(unet) - expected).abs().max().item() < 1e-4


_T = "transformer_blocks"
SGM_KEYS = {  # kohya SDXL key (Stability block names) -> diffusers module name
    f"lora_unet_input_blocks_4_1_{_T}_0_attn1_to_q": f"unet.down_blocks.1.attentions.0.{_T}.0.attn1.to_q",
    f"lora_unet_input_blocks_8_1_{_T}_9_attn2_to_out_0": f"unet.down_blocks.2.attentions.1.{_T}.9.attn2.to_out.0",
    f"lora_unet_middle_block_1_{_T}_3_attn2_to_k": f"unet.mid_block.attentions.0.{_T}.3.attn2.to_k",
    f"lora_unet_output_blocks_0_1_{_T}_8_attn2_to_q": f"unet.up_blocks.0.attentions.0.{_T}.8.attn2.to_q",
    f"lora_unet_output_blocks_2_1_{_T}_0_attn1_to_v": f"unet.up_blocks.0.attentions.2.{_T}.0.attn1.to_v",
    "lora_unet_output_blocks_4_1_proj_in": "unet.up_blocks.1.attentions.1.proj_in",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
}


def test_sgm_kohya_keys_import_to_diffusers_names(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    models = _models()
    g = torch.Generator().manual_seed(0)
    tensors, factors = {}, {}
    for key, name in SGM_KEYS.items():
        component, _, module = name.partition(".")
        if component == "text_encoder":  # a transformers 5 CLIPTextModel has no text_model level
            module = module.removeprefix("text_model.")
        layer = models[component].get_submodule(module)
        A = torch.randn(4, layer.in_features, generator=g)
        B = torch.randn(layer.out_features, 4, generator=g)
        tensors.update({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(3.0)})
        factors[name] = ((B.double() * 0.75).float(), A)  # alpha / rank = 3 / 4
    path = tmp_path / "sgm.safetensors"
    save_file(tensors, path)

    loaded = lora_io.load_lora(path)
    assert loaded.keys() == factors.keys()
    for name, (B, A) in loaded.items():
        assert torch.equal(B, factors[name][0]) and torch.equal(A, factors[name][1]), name
    by_model = lora_io.load_lora(path, model=models)
    assert set(by_model) == {n.replace("text_encoder.text_model.", "text_encoder.") for n in factors}

    # diffusers' own SGM mapping agrees on every module (its output is older diffusers naming)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=models["unet"].config)
    save_file(state, tmp_path / "converted.safetensors")
    converted = lora_io.load_lora(tmp_path / "converted.safetensors")
    assert converted.keys() == factors.keys()
    assert all(torch.equal(converted[n][1], factors[n][1]) for n in factors)


def test_sgm_names_cover_the_whole_unet(tmp_path):
    """Every Linear and Conv2d of the UNet (preset "full") written in SGM names (names="sgm") reads
    back to its diffusers name with and without the model, agrees with diffusers' own SGM mapping,
    and reproduces the adapted UNet."""
    from diffusers import StableDiffusionXLPipeline

    src = sdxl.tiny_unet(0)
    injected = sdxl.inject(src, "lora", preset="full", rank=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in injected.values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=g) * 0.05)
    path = tmp_path / "sgm.safetensors"
    lora_io.export_lora(src, path, format="kohya", names="sgm")
    keys = {k.rsplit(".", 2)[0] for k in load_file(path)}
    assert len(keys) == 794 and not any(b in k for k in keys for b in ("down_blocks", "mid_block", "up_blocks"))
    assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_5_2_conv", "lora_unet_middle_block_2_emb_layers_1",
            "lora_unet_label_emb_0_2"} <= keys
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["ss_network_args"]) == {"algo": "lora"}
    want = {f"unet.{name}" for name in injected}
    assert lora_io.load_lora(path).keys() == want
    assert lora_io.load_lora(path, model=sdxl.tiny_unet(0)).keys() == want
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=src.config)
    save_file(state, tmp_path / "converted.safetensors")
    assert lora_io.load_lora(tmp_path / "converted.safetensors").keys() == want
    dst = sdxl.tiny_unet(0)
    sdxl.apply_lora(dst, path)
    expected = _run(src)
    assert ((_run(dst) - expected).norm() / expected.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="names: expected"):
        lora_io.export_lora(src, path, format="diffusers", names="sgm")


@pytest.mark.parametrize("key, match", [
    ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q", "holds no transformer"),  # a downsampler slot
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_z", "not an SDXL UNet"),
    ("lora_unet_down_blocks_0_resnets_0_norm1", "not an SDXL UNet"),
    ("lora_unet_middle_block_2_in_layers_0", "not a resnet layer"),
    ("unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector", "not a .*LoRA key"),
])
def test_unmappable_keys_raise_naming_the_key(tmp_path, key, match):
    suffix = "" if "magnitude" in key else ".lora_down.weight"
    save_file({key + suffix: torch.ones(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=match) as err:
        lora_io.load_lora(tmp_path / "bad.safetensors")
    assert key in str(err.value)


def test_load_lora_other_namings_scales_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"

    def read(tensors, metadata=None):
        save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / "x.safetensors", metadata=metadata)
        return lora_io.load_lora(tmp_path / "x.safetensors")

    old = read({f"unet.{name}.to_q.lora.down.weight": A, f"unet.{name}.to_q.lora.up.weight": B,
                f"unet.{name}.processor.to_out_lora.down.weight": A, f"unet.{name}.processor.to_out_lora.up.weight": B})
    assert set(old) == {f"unet.{name}.to_q", f"unet.{name}.to_out.0"}
    peft = read({f"base_model.model.{name}.to_k.lora_A.default.weight": A,
                 f"base_model.model.{name}.to_k.lora_B.default.weight": B})
    assert torch.equal(peft[f"unet.{name}.to_k"][0], B)
    # diffusers metadata with lora_alpha = 2r, and an alpha_pattern for one module: scales 2 and 1/2
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4,
                                                 "unet.alpha_pattern": {re.escape(f"{name}.to_v"): 1}})}
    scaled = read({f"unet.{name}.to_q.lora_A.weight": A, f"unet.{name}.to_q.lora_B.weight": B,
                   f"unet.{name}.to_v.lora_A.weight": A, f"unet.{name}.to_v.lora_B.weight": B}, meta)
    assert torch.equal(scaled[f"unet.{name}.to_q"][0], 2 * B) and torch.equal(scaled[f"unet.{name}.to_v"][0], B / 2)

    with pytest.raises(ValueError, match="lacks its B"):
        read({f"unet.{name}.to_q.lora_A.weight": A})
    with pytest.raises(ValueError, match="ranks differ"):
        read({f"unet.{name}.to_q.lora_A.weight": A, f"unet.{name}.to_q.lora_B.weight": B[:, :1].contiguous()})
    with pytest.raises(ValueError, match="not matrices"):
        read({f"unet.{name}.to_q.lora_A.weight": A[:, :, None].contiguous(), f"unet.{name}.to_q.lora_B.weight": B})
    # 4-D factors in PEFT naming are PEFT's conv LoRA: (B, A) with A (r, in, 1, 1)
    conv = read({f"unet.{name}.to_q.lora_A.weight": A[:, :, None, None].contiguous(),
                 f"unet.{name}.to_q.lora_B.weight": B[:, :, None, None].contiguous()})[f"unet.{name}.to_q"]
    assert torch.equal(conv[0], B) and torch.equal(conv[1], A[:, :, None, None])
    with pytest.raises(ValueError, match="no Linear or Conv2d layer"):
        save_file({f"unet.{name}.to_z.lora_A.weight": A, f"unet.{name}.to_z.lora_B.weight": B},
                  tmp_path / "z.safetensors")
        lora_io.load_lora(tmp_path / "z.safetensors", model=sdxl.tiny_unet(0))


# ----------------------------------------------------------------------------- LoRA on conv layers (LoCon)

CONV_LAYERS = {  # layer -> what it exercises
    "down_blocks.1.resnets.0.conv1": "3x3",
    "down_blocks.1.resnets.0.conv_shortcut": "1x1, a Linear's rank",
    "down_blocks.0.downsamplers.0.conv": "3x3, stride 2",
}
TUCKER_LAYER = "conv_in"  # 3x3 from 4 channels, Tucker


def _inject_convs(unet, seed=0):
    found = sdxl.inject(unet, "lora", targets=list(CONV_LAYERS), rank=2, conv_rank=3, conv_alpha=1.5)
    found.update(sdxl.inject(unet, "lora", targets=[TUCKER_LAYER], conv_rank=3, alpha=2.0, tucker=True))
    found[TUCKER_LAYER].scale = 0.5
    _perturb(found, seed)
    return found


def test_conv_loras_in_peft_naming_both_ways(tmp_path):
    """A plain LoCon written as diffusers / PEFT keys (lora_A (r, in, kh, kw), lora_B (out, r, 1, 1))
    loads through diffusers and back through specops with the same UNet output; Tucker is refused."""
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tucker = sdxl.tiny_unet(0)
    _inject_convs(tucker)
    with pytest.raises(ValueError, match="Tucker LoCon"):
        lora_io.export_lora(tucker, path)
    src = sdxl.tiny_unet(0)
    found = sdxl.inject(src, "lora", targets=list(CONV_LAYERS), rank=2, conv_rank=3, conv_alpha=1.5)
    _perturb(found)
    assert lora_io.export_lora(src, path)["max_rel_error"] < 1e-6
    assert load_file(path)[f"unet.{next(iter(CONV_LAYERS))}.lora_B.weight"].shape == (64, 3, 1, 1)
    expected = _run(src)
    unet = sdxl.tiny_unet(0)
    unet.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="x")
    assert ((_run(unet) - expected).norm() / expected.norm()).item() < 1e-5
    dst = sdxl.tiny_unet(0)
    sdxl.apply_lora(dst, path)
    assert ((_run(dst) - expected).norm() / expected.norm()).item() < 1e-5


def test_conv_loras_round_trip_through_adapter_and_kohya_files(tmp_path):
    src = sdxl.tiny_unet(0)
    found = _inject_convs(src)
    assert {n: a.rank for n, a in found.items()} == {**dict.fromkeys(CONV_LAYERS, 3), TUCKER_LAYER: 3,
                                                    "down_blocks.1.resnets.0.conv_shortcut": 2}
    path = tmp_path / "adapters.safetensors"
    lora_io.save_adapters(src, path)
    dst = sdxl.tiny_unet(0)
    lora_io.load_adapters(dst, path)
    s0, s1 = src.state_dict(), dst.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert dst.get_submodule(TUCKER_LAYER).config() == {"rank": 3, "alpha": 2.0, "tucker": True, "scale": 0.5}

    kohya = tmp_path / "kohya.safetensors"
    report = lora_io.export_lora(src, kohya, format="kohya")
    assert report["max_rel_error"] <= 1e-6
    raw = load_file(kohya)
    assert raw["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (3, 32, 3, 3)
    assert raw["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape == (64, 3, 1, 1)
    assert raw["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (2, 32, 1, 1)
    assert raw["lora_unet_conv_in.lora_down.weight"].shape == (3, 4, 1, 1)
    assert raw["lora_unet_conv_in.lora_mid.weight"].shape == (3, 3, 3, 3)
    assert raw["lora_unet_conv_in.alpha"].item() == 3.0  # every scale folded into lora_up
    with pytest.raises(ValueError, match="Tucker LoCon.*kohya"):
        lora_io.export_lora(src, tmp_path / "d.safetensors")

    # kohya file -> load_lora -> apply_lora: the same ΔW, bit for bit, and the same UNet
    fresh = sdxl.tiny_unet(0)
    factors = lora_io.load_lora(kohya, model=fresh)
    assert len(factors[f"unet.{TUCKER_LAYER}"]) == 3
    applied = sdxl.apply_lora(fresh, factors)
    for name, a in found.items():
        assert torch.equal(applied[name].delta_weight(), a.delta_weight()), name
    torch.testing.assert_close(_run(fresh), _run(src), rtol=1e-6, atol=1e-6)  # the scale now sits in B

    # rank 2 keeps the rank-2 shortcut exact and truncates the others by the SVD of ΔW as (out, in·kh·kw)
    report = lora_io.export_lora(src, kohya, format="kohya", rank=2)
    for name, a in found.items():
        s = torch.linalg.svdvals(a.delta_weight().detach().double().flatten(1))
        want = 0.0 if a.rank == 2 else (s[2:].norm() / s.norm()).item()
        assert report["rel_error"][f"unet.{name}"] == pytest.approx(want, rel=1e-5, abs=1e-7), name
    assert "lora_unet_conv_in.lora_mid.weight" not in load_file(kohya)  # written as a plain LoCon


def test_conv_lora_files_are_checked_before_anything_changes(tmp_path):
    src = sdxl.tiny_unet(0)
    _inject_convs(src)
    good = tmp_path / "good.safetensors"
    lora_io.export_lora(src, good, format="kohya")
    # LyCORIS's create_lycoris(unet) names its keys "lycoris_<module>"
    tensors = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in load_file(good).items()}
    assert sdxl.apply_lora(sdxl.tiny_unet(0), _save(tmp_path, tensors)).keys() == {*CONV_LAYERS, TUCKER_LAYER}

    dst = sdxl.tiny_unet(0)
    sdxl.inject(dst, "lora", targets=[LORA_LAYERS[0]])  # an unrelated adapter that must survive
    before = _snapshot(dst)
    conv1 = "lycoris_down_blocks_1_resnets_0_conv1"
    bad = {
        "maps to no Linear or Conv2d layer": {**tensors, "lycoris_down_blocks_1_resnets_0_conv9.lora_down.weight":
                                              torch.ones(3, 32, 3, 3)},
        r"\(out, in, kh, kw\) = \(64, 32, 1, 3\)": {**tensors, f"{conv1}.lora_down.weight": torch.ones(3, 32, 1, 3)},
        "lora_up is": {**tensors, f"{conv1}.lora_up.weight": torch.ones(64, 3)},
        "a Tucker conv LoRA has": {**tensors, "lycoris_conv_in.lora_mid.weight": torch.ones(3, 2, 3, 3)},
        r"lacks its B \(up\)": {k: v for k, v in tensors.items() if k != f"{conv1}.lora_up.weight"},
        "has weight shape": {**tensors, **{f"lycoris_{LORA_LAYERS[1].replace('.', '_')}.{role}": t for role, t in
                                           (("lora_down.weight", torch.ones(2, 64, 1, 1)),
                                            ("lora_up.weight", torch.ones(64, 2, 1, 1)))}},
    }
    for match, state in bad.items():
        path = _save(tmp_path, state)
        with pytest.raises(ValueError, match=match) as err:
            sdxl.apply_lora(dst, str(path))
        assert path.name in str(err.value)
        _assert_unchanged(before, dst)
    conv_factors = lora_io.load_lora(good, model=src)
    # without a model, SDXL's own layer names resolve (the UNet grammar), others need model=
    assert lora_io.load_lora(good).keys() == conv_factors.keys()
    with pytest.raises(ValueError, match="pass model="):
        lora_io.load_lora(_save(tmp_path, {"lora_unet_down_blocks_1_resnets_0_conv9.lora_down.weight": torch.ones(3, 32, 3, 3)}))
    with pytest.raises(ValueError, match="no Conv2d layer named"):
        sdxl.apply_lora(dst, {f"unet.{LORA_LAYERS[1]}": conv_factors[f"unet.{TUCKER_LAYER}"]})
    _assert_unchanged(before, dst)


def test_partly_unknown_foreign_and_truncated_files(tmp_path):
    """strict (the default) refuses a file with any unknown key or misfit module and changes
    nothing; strict=False installs what fits and reports the rest; an unreadable file raises."""
    src = sdxl.tiny_unet(0)
    _inject_convs(src)
    good = tmp_path / "good.safetensors"
    lora_io.export_lora(src, good, format="kohya")
    tensors = load_file(good)
    conv1 = "lora_unet_down_blocks_1_resnets_0_conv1"
    extra = {
        "lora_unet_down_blocks_1_resnets_0_conv9.lora_down.weight": torch.ones(3, 32, 3, 3),  # no such layer
        "lora_unet_conv_in.hada_w1_a": torch.ones(3, 2),  # a LoHa module lacking its other factors
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2),  # a checkpoint's key
    }
    partly = {**{k: v for k, v in tensors.items() if not k.startswith("lora_unet_conv_in.")}, **extra,
              f"{conv1}.lora_up.weight": torch.ones(64, 5, 1, 1)}  # ranks differ from its lora_down
    foreign = {"model.diffusion_model.out.2.weight": torch.ones(4, 4), "first_stage_model.x": torch.ones(3)}
    dst = sdxl.tiny_unet(0)
    before = _snapshot(dst)
    for state in (partly, foreign):
        path = _save(tmp_path, state)
        with pytest.raises(ValueError):
            sdxl.apply_lora(dst, path)
        _assert_unchanged(before, dst)
    got = sdxl.apply_lora(dst, _save(tmp_path, partly), strict=False)
    assert set(got) == set(CONV_LAYERS) - {"down_blocks.1.resnets.0.conv1"}
    assert set(got.skipped) == {*list(extra)[::2], "unet.conv_in", "unet.down_blocks.1.resnets.0.conv1"}
    assert "maps to no Linear or Conv2d layer" in got.skipped[list(extra)[0]]
    assert "ranks differ" in got.skipped["unet.down_blocks.1.resnets.0.conv1"]
    for name in got:
        torch.testing.assert_close(got[name].delta_weight(), src.get_submodule(name).delta_weight(), rtol=0, atol=0)
    dst = sdxl.tiny_unet(0)
    nothing = sdxl.apply_lora(dst, _save(tmp_path, foreign), strict=False)
    assert not nothing and set(nothing.skipped) == set(foreign)
    _assert_unchanged(before, dst)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    for strict in (True, False):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            sdxl.apply_lora(dst, cut, strict=strict)
    _assert_unchanged(before, dst)


def _save(tmp_path, tensors):
    path = tmp_path / "case.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path
