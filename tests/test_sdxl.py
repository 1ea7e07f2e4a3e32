"""The SDXL layer on the tiny SDXL-structured UNet and CLIP encoders (issue 6 acceptance 1, 2, 3, 5, 6, 7)."""
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from specops import adapters, sdxl, stiefel  # noqa: E402
from specops.optim import StiefelAdam  # noqa: E402

ORTHO_METHODS = ("koft", "soda-svd", "soda-lq")
# Learning rates that move each method visibly in 20 steps (spectral shifts need large ones).
LR = {"lora": 1e-3, "loha": 1e-3, "lokr": 1e-3, "oft": 1e-2, "koft": 1e-2, "svdiff": 1e-2, "soda-svd": 1e-2, "soda-lq": 1e-2}
# Small shapes keep the 20-step runs cheap: two adapted blocks, batch 1, 8x8 latents.
TRAIN_BLOCKS = {"down_blocks.1": 1.0, "up_blocks.1": 1.0}


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
    with pytest.raises(ValueError, match="block_weights: expected a mapping"):
        sdxl.inject(sdxl.tiny_unet(0), "lora", block_weights=[1.0])


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

    summary = demo.run(str(tmp_path), soda_steps=2, lora_steps=2, zip_steps=2, progress=False)
    assert summary["soda"]["layers"] == 560
    assert summary["soda"]["orthogonality_error"] <= 1e-5
    assert 0 < summary["soda"]["specops_share"] < 1
    assert summary["zip"]["reload_max_abs_diff"] == 0
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
