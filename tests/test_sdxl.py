"""The SDXL layer on the tiny SDXL-structured UNet and CLIP encoders (issue 6 acceptance 1, 2, 3, 5, 6, 7)."""
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from specops import adapters, lora_io, sdxl, stiefel  # noqa: E402
from specops.optim import StiefelAdam  # noqa: E402

ORTHO_METHODS = ("koft", "soda-svd", "soda-lq")
# Learning rates that move each method visibly in 20 steps (spectral shifts need large ones).
LR = {"lora": 1e-3, "loha": 1e-3, "lokr": 1e-3, "adalora": 1e-2, "oft": 1e-2, "boft": 1e-2, "koft": 1e-2, "svdiff": 1e-2, "soda-svd": 1e-2, "soda-lq": 1e-2}
# Small shapes keep the 20-step runs cheap: two adapted blocks, batch 1, 8x8 latents.
TRAIN_BLOCKS = {"down_blocks.1": 1.0, "up_blocks.1": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: see conftest.one_thread


@pytest.fixture(scope="module")
def encoders():
    return sdxl.tiny_text_encoders(0)


@pytest.fixture(scope="module")
def batch(encoders):
    return sdxl.synthetic_batch(encoders, batch=2, seed=0)


@pytest.fixture(scope="module")
def small_batch(encoders):
    return sdxl.synthetic_batch(encoders, batch=1, seed=3, size=8)


def _out(unet, batch):
    with torch.no_grad():
        return unet(**batch["unet"]).sample


def _rel(a, b):
    """Relative Frobenius error ||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def test_tiny_unet_has_the_sdxl_attention_layers():
    from specops.bench import sdxl_attention_layers

    unet = sdxl.tiny_unet(0)
    names = sdxl.attention_linears(unet)
    assert len(names) == 560
    assert names == [name for name, _, _ in sdxl_attention_layers()]
    te1, te2 = sdxl.tiny_text_encoders(0)
    assert len(sdxl.attention_linears(te1)) == len(sdxl.attention_linears(te2)) == 8
    assert hasattr(te2, "text_projection") and not hasattr(te1, "text_projection")


@pytest.mark.parametrize("method", sdxl.INJECT_METHODS)
def test_fresh_injection_is_the_identity(method, batch, encoders):
    unet = sdxl.tiny_unet(0)
    ref = _out(unet, batch)
    injected = sdxl.inject(unet, method)
    assert len(injected) == 560 and all(isinstance(m, adapters.Adapter) for m in injected.values())
    assert _rel(_out(unet, batch), ref) <= 1e-6
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    for te in sdxl.tiny_text_encoders(0):
        base = te(ids).last_hidden_state
        assert len(sdxl.inject(te, method)) == 8
        assert _rel(te(ids).last_hidden_state, base) <= 1e-6
    sdxl.remove(unet)
    assert not any(isinstance(m, adapters.Adapter) for m in unet.modules())
    torch.testing.assert_close(_out(unet, batch), ref, rtol=0, atol=0)


def _optimisers(unet, method):
    g = sdxl.param_groups(unet, lr=LR[method], stiefel_lr=1e-2)
    opts = [torch.optim.AdamW(g.euclidean)] if g.euclidean else []
    if g.orthogonal:
        opts.append(StiefelAdam(g.orthogonal, fused=True))
    assert bool(g.orthogonal) == (method in ORTHO_METHODS)
    return opts, g


@pytest.mark.parametrize("method", sdxl.INJECT_METHODS)
def test_twenty_steps_lower_the_loss(method, small_batch):
    torch.manual_seed(0)
    unet = sdxl.tiny_unet(0)
    sdxl.inject(unet, method, block_weights=TRAIN_BLOCKS)
    opts, groups = _optimisers(unet, method)
    losses = [sdxl.train_step(unet, small_batch, opts) for _ in range(20)]
    last = sdxl.denoising_loss(unet, small_batch).item()
    assert last < losses[0] * 0.99, (losses[0], last)
    for group in groups.orthogonal:
        for p in group["params"]:
            assert stiefel.orthogonality_error(p.detach()).max().item() <= 1e-5


def _prior_batches(encoders, tokens=8):
    return (sdxl.synthetic_batch(encoders, batch=1, seed=3, size=8),
            sdxl.synthetic_batch(encoders, batch=1, seed=4, size=8, tokens=tokens))


def test_prior_preservation_at_weight_zero_is_the_plain_step(encoders):
    inst, prior = _prior_batches(encoders)
    runs = []
    for kwargs in ({}, dict(prior=prior, prior_weight=0.0), dict(prior=prior, prior_weight=1.0)):
        torch.manual_seed(0)
        unet = sdxl.tiny_unet(0)
        sdxl.inject(unet, "lora", block_weights=TRAIN_BLOCKS)
        _perturb(unet)
        opt = torch.optim.AdamW(sdxl.param_groups(unet, 1e-3).euclidean)
        loss = sdxl.train_step(unet, inst, [opt], **kwargs)
        runs.append((loss, [p.detach().clone() for p in unet.parameters()]))
    (loss0, plain), (loss_zero, zero), (loss_one, one) = runs
    assert loss_zero == loss0 and all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert loss_one > loss0 and not all(torch.equal(a, b) for a, b in zip(plain, one))
    with pytest.raises(ValueError, match="prior_weight must be a float >= 0"):
        sdxl.denoising_loss(sdxl.tiny_unet(0), inst, prior, prior_weight=-1.0)


@pytest.mark.parametrize("tokens", [8, 5], ids=["one-pass", "two-passes"])
def test_prior_preservation_gradient_matches_the_written_loss(tokens):
    """fp64: the gradient of denoising_loss with a prior batch (concatenated into one UNet pass, or
    two passes when the prompts' lengths differ) equals autograd of the loss written out."""
    enc = sdxl.tiny_text_encoders(0, dtype=torch.float64)
    inst, prior = _prior_batches(enc, tokens)
    unet = sdxl.tiny_unet(0, dtype=torch.float64)
    sdxl.inject(unet, "lora", block_weights=TRAIN_BLOCKS)
    _perturb(unet)
    params = [p for g in sdxl.param_groups(unet, 1.0).euclidean for p in g["params"]]
    lam = 0.7
    got = torch.autograd.grad(sdxl.denoising_loss(unet, inst, prior, lam), params)
    written = ((unet(**inst["unet"]).sample - inst["noise"]) ** 2).mean() \
        + lam * ((unet(**prior["unet"]).sample - prior["noise"]) ** 2).mean()
    want = torch.autograd.grad(written, params)
    assert max(_rel(a, b) for a, b in zip(got, want) if b.norm() > 0) <= 1e-10
    assert sum(b.norm() > 0 for b in want) == len(want)


def test_prior_preservation_with_block_wise_plain_fine_tuning(encoders):
    """train_blocks: the chosen blocks' own weights train beside the adapters; nothing else moves."""
    inst, prior = _prior_batches(encoders)
    unet = sdxl.tiny_unet(0)
    sdxl.inject(unet, "lora", block_weights={"down_blocks.1": 1.0})
    blocks = sdxl.train_blocks(unet, ["mid_block"])
    names = {id(p): n for n, p in unet.named_parameters()}
    assert blocks and all(names[id(p)].startswith("mid_block.") for p in blocks)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    adapter_params = {n for n in trainable if not n.startswith("mid_block.")}
    assert adapter_params and all(n.startswith("down_blocks.1.") for n in adapter_params)
    opt = torch.optim.AdamW([*sdxl.param_groups(unet, 1e-3).euclidean, {"params": blocks}], lr=1e-3)
    losses = [sdxl.train_step(unet, inst, [opt], prior=prior, prior_weight=0.5) for _ in range(8)]
    assert losses[-1] < losses[0]
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert adapter_params <= moved <= trainable and moved - adapter_params
    with pytest.raises(ValueError, match="unknown UNet block"):
        sdxl.train_blocks(unet, ["middle"])


def _perturb(unet, seed=0):
    """Random non-trivial adapter parameters (orthogonal ones stay orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    groups = sdxl.param_groups(unet, 1.0)
    with torch.no_grad():
        for group in groups.euclidean:
            for p in group["params"]:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for group in groups.orthogonal:
            for p in group["params"]:
                p.copy_(torch.linalg.qr(p + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))[0])


@pytest.mark.parametrize("method", ("lora", "oft", "soda-svd", "soda-lq"))
def test_fuse_matches_and_unfuse_restores(method, batch):
    unet = sdxl.tiny_unet(0)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    sdxl.inject(unet, method, block_weights={"down_blocks.2": 1.0, "mid_block": 0.5})
    _perturb(unet)
    adapted = _out(unet, batch)
    assert sdxl.fuse(unet) > 0
    assert _rel(_out(unet, batch), adapted) <= 1e-5
    sdxl.unfuse(unet)
    sdxl.remove(unet)
    for k, v in unet.state_dict().items():
        assert (v - base[k]).abs().max().item() <= 1e-6, k


def test_block_wise_selection_and_weights(batch):
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(0)  # LoRA's A is random: the same seed gives both models the same A
    injected = sdxl.inject(unet, "lora", block_weights={"down_blocks.1": 1.0, "mid_block": 0.0, "up_blocks.0": [1.0, 0.5, 0.0]})
    assert injected and all(n.startswith(("down_blocks.1.", "up_blocks.0.attentions.0.", "up_blocks.0.attentions.1."))
                            for n in injected)
    assert sum(n.startswith("down_blocks.1.") for n in injected) == 32
    assert {injected[n].scale for n in injected if n.startswith("up_blocks.0.attentions.1.")} == {0.5}
    _perturb(unet)
    full = sdxl.tiny_unet(0)
    torch.manual_seed(0)
    sdxl.inject(full, "lora", block_weights={"down_blocks.1": 1.0, "up_blocks.0": [1.0, 1.0]})
    _perturb(full)  # same seed and the same parameter order: the same factors, at weight 1
    for name, a in injected.items():
        d_full = full.get_submodule(name).delta_weight()
        torch.testing.assert_close(a.delta_weight(), a.scale * d_full, rtol=1e-6, atol=1e-7)
    # layers outside the selection are the base Linear layers, untouched
    base = sdxl.tiny_unet(0)
    for name in sdxl.attention_linears(unet):
        if name not in injected:
            m = unet.get_submodule(name)
            assert type(m) is torch.nn.Linear
            assert torch.equal(m.weight, base.get_submodule(name).weight)


def test_block_weights_accept_diffusers_form():
    unet = sdxl.tiny_unet(0)
    injected = sdxl.inject(unet, "lora", block_weights={"down": {"block_2": [0.0, 0.3]}, "mid": 1.0})
    assert {n.split(".transformer_blocks")[0] for n in injected} == {"down_blocks.2.attentions.1", "mid_block.attentions.0"}
    assert {round(a.scale, 6) for n, a in injected.items() if n.startswith("down")} == {0.3}
    with pytest.raises(ValueError, match="unknown UNet block"):
        sdxl.inject(sdxl.tiny_unet(0), "lora", block_weights={"side_blocks.0": 1.0})
    with pytest.raises(ValueError, match="method"):
        sdxl.inject(unet, "ziplora")
    with pytest.raises(ValueError, match="already holds"):
        sdxl.inject(unet, "lora", block_weights={"mid": 1.0})


def test_blocks_is_the_oft_option_not_block_weights():
    # inject's per-block weights are block_weights=; blocks= goes to OFT as its number of rotation blocks
    injected = sdxl.inject(sdxl.tiny_unet(0), "oft", blocks=2, block_weights={"mid": 0.5})
    assert injected and all(n.startswith("mid_block.") for n in injected)
    assert {a.Q.shape[0] for a in injected.values()} == {2} and {a.scale for a in injected.values()} == {0.5}
    with pytest.raises(ValueError, match="a list holds"):
        sdxl.inject(sdxl.tiny_unet(0), "lora", block_weights=[1.0])
    with pytest.raises(ValueError, match="block_weights: expected a mapping"):
        sdxl.inject(sdxl.tiny_unet(0), "lora", block_weights=1.0)


def test_block_weight_lists_number_the_sgm_blocks():
    """The 20-weight list (BASE, IN00..IN08, M00, OUT00..OUT08) on every layer ("full"); the
    12-weight list adapts the attention-holding blocks only; set_block_weights re-weights a model."""
    unet = sdxl.tiny_unet(0)
    weights = [0.5] + [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] + [0.9] + [1.0 + i / 10 for i in range(9)]
    injected = sdxl.inject(unet, "lora", preset="full", block_weights=weights, rank=1)
    scale = {n: a.scale for n, a in injected.items()}
    assert "conv_in" not in scale  # IN00 = 0: not adapted
    assert len(scale) == 793
    assert scale["down_blocks.0.resnets.0.conv1"] == 0.1 and scale["down_blocks.0.downsamplers.0.conv"] == 0.3
    assert scale["down_blocks.1.attentions.1.proj_in"] == 0.5 and scale["down_blocks.2.resnets.0.conv2"] == 0.7
    assert scale["mid_block.resnets.1.time_emb_proj"] == 0.9
    assert scale["up_blocks.0.resnets.0.conv1"] == 1.0 and scale["up_blocks.0.upsamplers.0.conv"] == 1.2
    assert scale["up_blocks.1.attentions.2.proj_out"] == pytest.approx(1.5) and scale["up_blocks.2.resnets.2.conv2"] == pytest.approx(1.8)
    assert scale["time_embedding.linear_1"] == scale["conv_out"] == 0.5  # outside every block: BASE
    assert set(sdxl.BLOCK_LISTS[20]) == {lora_io.block_of(n) or "BASE" for n in dict(unet.named_modules())
                                         if isinstance(unet.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d))}
    short = sdxl.inject(sdxl.tiny_unet(0), "lora", preset="full", block_weights=[1.0] * 5 + [0.0] + [1.0] * 6, rank=1)
    assert {lora_io.block_of(n) for n in short} == {"IN04", "IN05", "IN07", "IN08", *(f"OUT{i:02d}" for i in range(6)), None}
    te = sdxl.tiny_text_encoders(0)[0]
    assert {a.scale for a in sdxl.inject(te, "lora", block_weights=weights).values()} == {0.5}
    scales = sdxl.set_block_weights(unet, {"mid_block": 2.0})
    assert scales["mid_block.resnets.1.time_emb_proj"] == 2.0 and scales["down_blocks.1.attentions.1.proj_in"] == 0.0
    assert unet.get_submodule("down_blocks.1.attentions.1.proj_in").scale == 0.0


# ----------------------------------------------------------------------------- presets and LoRA on conv layers
# (the same layer sets as LyCORIS's presets: tests/test_lycoris.py checks them against LyCORIS itself)

_KINDS = (  # a layer name -> its kind in the breakdown of the "full" preset
    ("attention", r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"), ("ff", r"\.ff\.net\.(0\.proj|2)$"),
    ("proj_in/out", r"\.proj_(in|out)$"), ("resnet conv", r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut)$"),
    ("time_emb_proj", r"\.time_emb_proj$"), ("sampler conv", r"samplers\.0\.conv$"),
    ("conv_in/out", r"^conv_(in|out)$"), ("embedding", r"^(time|add)_embedding\.linear_[12]$"),
)


def _kind(name):
    import re

    return next(kind for kind, pattern in _KINDS if re.search(pattern, name))


def test_presets_select_lycoris_layer_sets():
    import collections

    from specops.sdxl.injection import PRESETS

    counts = {}
    for preset in PRESETS:
        unet = sdxl.tiny_unet(0)
        injected = sdxl.inject(unet, "lora", preset=preset, rank=1)
        counts[preset] = collections.Counter(_kind(n) for n in injected)
        for te in sdxl.tiny_text_encoders(0):
            assert len(sdxl.inject(te, "lora", preset=preset, rank=1)) == (8 if preset == "attn-only" else 12)
    assert {p: sum(c.values()) for p, c in counts.items()} == {"attn-only": 560, "attn-mlp": 726, "full-lin": 754, "full": 794}
    assert counts["full"] == {"attention": 560, "ff": 140, "proj_in/out": 22, "resnet conv": 45, "time_emb_proj": 17,
                              "sampler conv": 4, "conv_in/out": 2, "embedding": 4}
    assert counts["full-lin"]["resnet conv"] == 11  # the 1x1 shortcuts: a 1x1 conv counts as linear
    assert counts["attn-only"] == {"attention": 560}
    # the default is attn-only; explicit targets win over a preset
    unet = sdxl.tiny_unet(0)
    assert list(sdxl.inject(unet, "lora")) == sdxl.attention_linears(sdxl.tiny_unet(0))
    convs = sdxl.inject(sdxl.tiny_unet(0), "lora", targets=["conv1"], preset="attn-mlp")
    assert len(convs) == 17 and all(a.is_conv for a in convs.values())
    with pytest.raises(ValueError, match="preset: expected one of"):
        sdxl.inject(sdxl.tiny_unet(0), "lora", preset="all")


@pytest.mark.parametrize("method, preset, layer", [("svdiff", "full", "conv_in"),
                                                    ("oft", "full-lin", "down_blocks.1.resnets.0.conv_shortcut")])
def test_conv_layers_need_a_conv_method(method, preset, layer, monkeypatch):
    # every inject method takes convs now (tests/test_conv_methods.py); the guard is for one that does not
    monkeypatch.setattr(adapters, "CONV_METHODS", ("lora", "loha", "lokr"))
    unet = sdxl.tiny_unet(0)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with pytest.raises(ValueError, match=rf"{layer} is a Conv2d.*\('lora', 'loha', 'lokr'\)"):
        sdxl.inject(unet, method, preset=preset)
    assert not any(isinstance(m, adapters.Adapter) for m in unet.modules())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    with pytest.raises(ValueError, match="conv1 is a Conv2d"):
        sdxl.inject(unet, method, targets=["conv1"])
    assert len(sdxl.inject(unet, method, preset="attn-mlp")) == 726  # no conv layer there


@pytest.mark.parametrize("tucker", [False, True])
def test_fresh_full_preset_injection_is_the_identity(tucker, batch):
    unet = sdxl.tiny_unet(0)
    ref = _out(unet, batch)
    injected = sdxl.inject(unet, "lora", preset="full", conv_rank=3, tucker=tucker)
    convs = [a for a in injected.values() if a.is_conv]
    assert len(convs) == 51 and sum(a.mid is not None for a in convs) == (40 if tucker else 0)
    assert _rel(_out(unet, batch), ref) <= 1e-6
    sdxl.remove(unet)
    torch.testing.assert_close(_out(unet, batch), ref, rtol=0, atol=0)


def test_twenty_steps_lower_the_loss_with_conv_layers(small_batch):
    torch.manual_seed(0)
    unet = sdxl.tiny_unet(0)
    injected = sdxl.inject(unet, "lora", preset="full", rank=4, conv_rank=4)
    opts, _ = _optimisers(unet, "lora")
    losses = [sdxl.train_step(unet, small_batch, opts) for _ in range(20)]
    last = sdxl.denoising_loss(unet, small_batch).item()
    assert last < losses[0] * 0.99, (losses[0], last)
    convs = [a for a in injected.values() if a.is_conv]
    assert all(a.B.abs().max() > 0 for a in convs)  # the conv layers trained too


@pytest.mark.parametrize("tucker", [False, True])
def test_fuse_and_unfuse_are_exact_on_conv_layers(tucker, batch):
    unet = sdxl.tiny_unet(0)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    injected = sdxl.inject(unet, "lora", preset="full", conv_rank=3, tucker=tucker,
                           block_weights={"down_blocks.1": 1.0, "mid_block": 0.5, "up_blocks.2": 1.0})
    assert sum(a.is_conv for a in injected.values()) == 6 + 4 + 9  # resnet convs, shortcuts and samplers there
    _perturb(unet)
    adapted = _out(unet, batch)
    assert sdxl.fuse(unet) == len(injected)
    assert _rel(_out(unet, batch), adapted) <= 1e-5
    for a in injected.values():
        if a.is_conv:
            torch.testing.assert_close(a.base.weight - a._unfused_weight, a.delta_weight(), rtol=1e-6, atol=1e-7)
    sdxl.unfuse(unet)
    assert _rel(_out(unet, batch), adapted) <= 1e-6
    sdxl.remove(unet)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


def test_block_weights_apply_to_conv_layers(batch):
    weights = {"down_blocks.1": 1.0, "up_blocks.1": 0.5}
    unet = sdxl.tiny_unet(0)
    torch.manual_seed(0)
    injected = sdxl.inject(unet, "lora", preset="full", conv_rank=3, block_weights=weights)
    assert all(n.startswith(tuple(w + "." for w in weights)) for n in injected)
    convs = {n for n, a in injected.items() if a.is_conv}
    assert "down_blocks.1.resnets.0.conv_shortcut" in convs and "up_blocks.1.upsamplers.0.conv" in convs
    assert {injected[n].scale for n in convs if n.startswith("up_blocks.1.")} == {0.5}
    _perturb(unet)
    full = sdxl.tiny_unet(0)
    torch.manual_seed(0)
    sdxl.inject(full, "lora", preset="full", conv_rank=3, block_weights={"down_blocks.1": 1.0, "up_blocks.1": 1.0})
    _perturb(full)  # the same factors, at weight 1: weight 0.5 halves the update
    for name, a in injected.items():
        torch.testing.assert_close(a.delta_weight(), a.scale * full.get_submodule(name).delta_weight(), rtol=1e-6, atol=1e-7)
    fresh = sdxl.tiny_unet(0)
    for name, m in unet.named_modules():  # every other layer is the base layer, untouched
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not name.endswith(".base"):
            assert name.rpartition(".")[0] not in injected and name not in injected
            assert torch.equal(m.weight, fresh.get_submodule(name).weight)
    # only the selected blocks change the output: the others see the base layers
    assert _rel(_out(unet, batch), _out(fresh, batch)) > 1e-4


def test_train_zip_mergers_returns_an_exact_rank_sum_lora(encoders):
    unet = sdxl.tiny_unet(0)
    cb = sdxl.synthetic_batch(encoders, batch=1, seed=1, size=8)
    sb = sdxl.synthetic_batch(encoders, batch=1, seed=2, size=8)
    loras = []
    for seed, blocks in ((1, {"down_blocks.1": 1.0, "mid_block": 1.0}), (2, {"down_blocks.1": 1.0, "up_blocks.1": 1.0})):
        sdxl.inject(unet, "lora", rank=2 + seed, block_weights=blocks)
        _perturb(unet, seed)
        loras.append({n: tuple(t.detach().clone() for t in a.lora_factors()) for n, a in sdxl.remove(unet).items()})
    content, style = loras
    merged = sdxl.train_zip_mergers(unet, content, style, cb, sb, steps=3)
    assert set(merged) == set(content) | set(style)
    for name, (B, A) in merged.items():
        a = unet.get_submodule(name)
        if name in content and name in style:
            assert A.shape[0] == 3 + 4
            Bc, Ac = content[name]
            Bs, As = style[name]
            want = Bc @ Ac * a.m_c.detach() + Bs @ As * a.m_s.detach()
            assert not torch.equal(a.m_c.detach(), torch.ones_like(a.m_c))  # the mergers trained
        else:
            want = (content.get(name) or style.get(name))[0] @ (content.get(name) or style.get(name))[1]
        torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B @ A, a.delta_weight().detach(), rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    unet = sdxl.tiny_unet(0).train()
    sdxl.inject(unet, "soda-svd", block_weights={"down_blocks.1": 1.0})
    model = DDP(unet)
    g = sdxl.param_groups(unet, lr=1e-2, stiefel_lr=1e-2)
    opts = [torch.optim.AdamW(g.euclidean), StiefelAdam(g.orthogonal, fused=True)]
    batch = sdxl.synthetic_batch(sdxl.tiny_text_encoders(0), batch=1, seed=10 + rank, size=8)  # each rank its own data
    for _ in range(20):
        sdxl.train_step(model, batch, opts)
    torch.save({n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_stay_identical_and_orthogonal(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert p0.keys() == p1.keys() and len(p0) == 32 * 4  # 32 layers: delta + 3 rotation factors
    fresh = sdxl.tiny_unet(0)
    sdxl.inject(fresh, "soda-svd", block_weights={"down_blocks.1": 1.0})
    moved = 0
    for name, t in p0.items():
        assert torch.equal(t, p1[name]), name
        moved += not torch.equal(t, fresh.get_parameter(name))
        if t.dim() == 2:
            assert stiefel.orthogonality_error(t).item() <= 1e-5, name
    assert moved == len(p0)


def test_demo_runs_end_to_end(tmp_path):
    from specops import demo

    summary = demo.run(str(tmp_path), soda_steps=2, lora_steps=2, zip_steps=2, adalora_steps=4, seed_method_steps=2,
                       progress=False)
    assert summary["soda"]["layers"] == 560
    a = summary["adalora"]
    assert a["layers"] == 700 and a["budgets"][-1] == a["target_budget"] == 8 * 700
    assert sum(map(sum, a["blocks"].values())) == a["target_budget"] and a["export_max_rel_error"] <= 1e-6
    assert a["reload_max_rel_error"] <= 1e-6
    assert summary["soda"]["orthogonality_error"] <= 1e-5
    assert 0 < summary["soda"]["specops_share"] < 1
    assert summary["zip"]["reload_max_abs_diff"] == 0
    m = summary["seed_methods"]
    assert m["textual_inversion"]["reload_max_abs_diff"] == 0 and m["controlnet"]["export_max_rel_error"] <= 1e-6
    assert all(v["loss_first"] > 0 for v in m.values()) and m["cut_mix"]["unmix_first"] > 0
    assert all(os.path.getsize(p) > 0 for p in summary["files"].values())


def test_block_benchmark_providers_agree():
    """The sdxl benchmark's three step functions compute what they claim (acceptance 8's set-up)."""
    import math

    from specops.bench import sdxl as bench

    built = {p: bench.make_step(bench.QUICK, p, lr=1e-2, rot_lr=1e-2) for p in bench.PROVIDERS}
    x, ctx, _ = bench.make_inputs(bench.QUICK)

    def fwd(p):
        with torch.no_grad():
            return built[p][0](x, encoder_hidden_states=ctx)

    frozen = fwd("lora")  # B = 0
    for p in ("specops", "authors"):
        torch.testing.assert_close(fwd(p), frozen, rtol=1e-5, atol=1e-5)
    for _ in range(2):
        assert all(math.isfinite(built[p][2]().item()) for p in bench.PROVIDERS)
    ys, ya = fwd("specops"), fwd("authors")
    assert (ys - frozen).abs().max() > 1e-3  # the steps moved the output
    torch.testing.assert_close(ys, ya, rtol=1e-5, atol=1e-5)  # the same update in both formulations
    for p in ("specops", "authors"):
        for a in built[p][1].values():
            for f in a.orthogonal_parameters():
                torch.testing.assert_close(f.mT @ f, torch.eye(f.shape[0]), rtol=0, atol=1e-5)
    g = bench.flop_model(bench.FULL)
    assert 1.3 < g["bound"] < 1.4 and g["lora"] < g["full_spectrum"]
