"""The main job: every piece of specops on the tiny SDXL-structured model, end to end, offline.

1. SODA-SVD adapters on all 560 attention layers of the UNet, trained on a fixed synthetic denoising
   batch with fused StiefelAdam (rotation factors) + AdamW (spectral shifts); adapters saved.
2. A content LoRA and a style LoRA, each trained on its own batch.
3. ZipLoRA merge of the two (only the column mergers train), exported in diffusers format and
   re-loaded with specops.lora_io.load_lora; the re-loaded factors must equal the merge.
4. AdaLoRA on the 700 attention and feed-forward layers (init_r 12, target 8): the rank allocator
   moves the budget to the target, the pruned triplets are compacted away, the live adapters saved
   (with the allocator's state) and the result exported as an exact LoRA of each layer's kept rank.
5. The training-side methods, a few steps each on a fresh UNet: textual inversion (two new tokens in
   both text encoders) with a LoRA and DreamBooth prior preservation, the embedding file reloaded;
   SVDiff's Cut-Mix-Unmix on the two new subjects; a Control-LoRA in a ControlNet, exported and
   reloaded; a T2I-Adapter trained to condition the UNet.
Prints a summary: losses, orthogonality error, the share of step time spent inside specops ops, the
AdaLoRA budget and the ranks each UNet block kept, each method's losses, files.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import adalora, lora_io, sdxl, stiefel
from .optim import StiefelAdam
from .sdxl.train import _progress


def _specops_share(step) -> float:
    """Fraction of one call of `step` (profiled, CPU time) spent inside torch.ops.specops.* calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    inside = 0.0
    for ev in prof.events():
        if not ev.name.startswith("specops::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("specops::"):
            parent = parent.cpu_parent
        if parent is None:  # outermost specops call: count its inclusive time once
            inside += ev.cpu_time_total / 1e6
    return inside / wall


def _train(unet, batch, steps, make_opts, desc, progress):
    opts = make_opts()
    losses = []

    def step():
        losses.append(sdxl.train_step(unet, batch, opts))

    times = []
    for _ in _progress(range(steps), progress, desc):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return losses, times, step


def _lora_opts(unet, lr):
    return lambda: [torch.optim.AdamW(sdxl.param_groups(unet, lr).euclidean)]


ADALORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # AdaLoRA's own choice
ADALORA_REG = 0.1  # weight of the orthogonality regulariser in the loss


def _adalora(unet, batch, steps: int, out_dir: str, progress: bool) -> dict:
    """AdaLoRA init_r 12 -> target_r 8 for `steps` steps (warm-up steps/6, final phase steps/4, masking
    every 2nd step), then compact, save the live adapters and export the kept-rank LoRA."""
    layers = sdxl.inject(unet, "adalora", targets=ADALORA_TARGETS, init_r=12)
    alloc = adalora.RankAllocator(unet, target_r=8, tinit=steps // 6, tfinal=steps // 4, deltaT=2, total_step=steps)
    opt = torch.optim.AdamW(sdxl.param_groups(unet, lr=1e-2).euclidean)
    losses, budgets, times = [], [], []
    for step in _progress(range(steps), progress, "adalora"):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = sdxl.denoising_loss(unet, batch)
        (loss + ADALORA_REG * alloc.regularizer()).backward()
        opt.step()
        budgets.append(alloc.update_and_allocate(step))
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ranks = alloc.ranks()
    alloc.compact()
    if [m.rank for m in layers.values()] != list(ranks.values()):
        raise RuntimeError("demo: compaction did not keep each layer's kept rank")
    files = {"adalora adapters": os.path.join(out_dir, "adalora_adapters.safetensors"),
             "adalora lora (kohya)": os.path.join(out_dir, "adalora_lora.safetensors")}
    lora_io.save_adapters(unet, files["adalora adapters"])
    report = lora_io.export_lora(unet, files["adalora lora (kohya)"], format="kohya")
    reloaded = lora_io.load_lora(files["adalora lora (kohya)"], model={"unet": unet})
    kept = {n: m for n, m in layers.items() if m.rank}
    if set(reloaded) != {f"unet.{n}" for n in kept}:
        raise RuntimeError("demo: the AdaLoRA export does not hold every layer that kept a triplet")
    with torch.no_grad():
        reload_error = max(((B @ A - m.delta_weight()).norm() / m.delta_weight().norm()).item()
                           for (B, A), m in zip((reloaded[f"unet.{n}"] for n in kept), kept.values()))
    blocks: dict[str, list[int]] = {}
    for name, r in ranks.items():
        blocks.setdefault(lora_io.block_of(name) or "BASE", []).append(r)
    sdxl.remove(unet)
    return {"layers": len(layers), "budgets": budgets, "init_budget": alloc.init_budget,
            "target_budget": alloc.target_budget, "loss_first": losses[0], "loss_last": losses[-1],
            "step_ms": 1e3 * sorted(times)[len(times) // 2], "blocks": blocks,
            "export_max_rel_error": report["max_rel_error"], "reload_max_rel_error": reload_error, "files": files}


def _fit(params, loss_fn, steps: int, lr: float, progress: bool, desc: str) -> list[float]:
    """`steps` AdamW steps on loss_fn(); the losses."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in _progress(range(steps), progress, desc):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


UNMIX_WEIGHT = 0.1  # of the unmix term beside the denoising loss


def _seed_methods(seed: int, steps: int, out_dir: str, progress: bool) -> dict:
    """Part 5: textual inversion + LoRA + prior preservation, Cut-Mix-Unmix, Control-LoRA, T2I-Adapter."""
    out: dict = {"files": {}}
    unet = sdxl.tiny_unet(seed).train()
    enc = sdxl.tiny_text_encoders(seed)
    first, second, prior = (sdxl.synthetic_batch(enc, seed=seed + k) for k in (3, 4, 5))
    v1, v2 = sdxl.add_tokens(enc, 2, init_ids=[17, 18])
    prompt = torch.tensor([[0, v1, 17, v2, 18, 2, 1, 1]]).expand(len(first["noise"]), -1)  # "[V1] a [V2] b"

    sdxl.inject(unet, "lora", rank=4)
    lora = sdxl.param_groups(unet, 1e-3).euclidean
    losses = _fit([*lora, {"params": sdxl.token_parameters(enc), "lr": 1e-2}],
                  lambda: sdxl.denoising_loss(unet, sdxl.with_prompt(first, enc, prompt), prior, 1.0),
                  steps, 1e-3, progress, "textual inversion + prior")
    path = os.path.join(out_dir, "textual_inversion.safetensors")
    sdxl.save_textual_inversion(enc, path)
    fresh = sdxl.tiny_text_encoders(seed)
    sdxl.load_textual_inversion(fresh, path)
    diff = max((a - b).abs().max().item() for a, b in zip(sdxl.token_parameters(fresh), sdxl.token_parameters(enc)))
    out["textual_inversion"] = {"loss_first": losses[0], "loss_last": losses[-1], "reload_max_abs_diff": diff}
    out["files"]["textual inversion (diffusers SDXL)"] = path

    x0 = sdxl.cut_mix(first["x0"], second["x0"])
    t = first["unet"]["timestep"]
    mixed = {**first, "x0": x0, "unet": {**first["unet"], "sample": sdxl.noised(x0, first["noise"], t)}}
    rec = sdxl.UnmixRecorder(unet, ([1], [3]), tuple(x0.shape[-2:]))
    unmix = []

    def mixed_loss():
        loss = sdxl.denoising_loss(unet, sdxl.with_prompt(mixed, enc, prompt))
        term = rec.loss()
        unmix.append(term.item())
        return loss + UNMIX_WEIGHT * term

    losses = _fit([*lora, {"params": sdxl.token_parameters(enc), "lr": 1e-2}], mixed_loss, steps, 1e-3,
                  progress, "cut-mix-unmix")
    rec.remove()
    out["cut_mix"] = {"loss_first": losses[0], "loss_last": losses[-1], "unmix_first": unmix[0], "unmix_last": unmix[-1]}
    sdxl.remove(unet)
    unet.requires_grad_(False)

    image = torch.rand(len(first["noise"]), 3, *(8 * n for n in first["x0"].shape[-2:]),
                       generator=torch.Generator().manual_seed(seed))
    controlled = {**first, "unet": {**first["unet"], "control_image": image}}
    net = sdxl.controlnet(unet)
    sdxl.inject(net, "lora", preset="full")
    # Control-LoRA trains the ControlNet's own zero convolutions and conditioning embedding beside the
    # LoRAs: with the zero convolutions frozen at zero no gradient reaches the LoRAs
    own = [p for m in (net.controlnet_cond_embedding, net.controlnet_down_blocks, net.controlnet_mid_block)
           for p in m.parameters()]
    for p in own:
        p.requires_grad_(True)
    model = sdxl.ControlledUNet(unet, controlnet=net)
    losses = _fit([*sdxl.param_groups(net, 1e-3).euclidean, {"params": own}],
                  lambda: sdxl.denoising_loss(model, controlled), steps, 1e-3, progress, "control-lora")
    path = os.path.join(out_dir, "control_lora.safetensors")
    report = lora_io.export_lora({"controlnet": net}, path)
    out["controlnet"] = {"layers": len(report["rank"]), "loss_first": losses[0], "loss_last": losses[-1],
                         "export_max_rel_error": report["max_rel_error"]}
    out["files"]["control-lora (diffusers)"] = path

    model = sdxl.ControlledUNet(unet, adapter=sdxl.t2i_adapter(unet))
    losses = _fit(model.adapter.parameters(), lambda: sdxl.denoising_loss(model, controlled), steps, 1e-3,
                  progress, "t2i-adapter")
    out["t2i"] = {"loss_first": losses[0], "loss_last": losses[-1]}
    return out


def run(out_dir: str = "demo_out", soda_steps: int = 24, lora_steps: int = 15, zip_steps: int = 20,
        adalora_steps: int = 24, seed_method_steps: int = 6, progress: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    unet = sdxl.tiny_unet(seed).train()
    text_encoders = sdxl.tiny_text_encoders(seed)
    batch = sdxl.synthetic_batch(text_encoders, seed=seed)
    content_batch = sdxl.synthetic_batch(text_encoders, seed=seed + 1)
    style_batch = sdxl.synthetic_batch(text_encoders, seed=seed + 2)
    summary: dict = {"files": {}}

    # 1. SODA-SVD everywhere: spectrum by AdamW, Kronecker rotations by fused StiefelAdam.
    t0 = time.perf_counter()
    layers = sdxl.inject(unet, "soda-svd")
    summary["soda_inject_s"] = time.perf_counter() - t0

    def soda_opts():
        g = sdxl.param_groups(unet, lr=1e-2, stiefel_lr=1e-2)
        return [torch.optim.AdamW(g.euclidean), StiefelAdam(g.orthogonal, fused=True)]

    losses, times, step = _train(unet, batch, soda_steps, soda_opts, "soda-svd", progress)
    factors = sdxl.param_groups(unet, 1.0).orthogonal[0]["params"]
    summary["soda"] = {
        "layers": len(layers), "factors": len(factors), "loss_first": losses[0], "loss_last": losses[-1],
        "orthogonality_error": max(stiefel.orthogonality_error(p.detach()).max().item() for p in factors),
        "step_ms": 1e3 * sorted(times)[len(times) // 2], "specops_share": _specops_share(step),
    }
    path = os.path.join(out_dir, "soda_adapters.safetensors")
    lora_io.save_adapters(unet, path)
    summary["files"]["soda adapters"] = path
    sdxl.remove(unet)

    # 2. Content and style LoRAs, each on its own batch.
    loras = {}
    for name, b in (("content", content_batch), ("style", style_batch)):
        sdxl.inject(unet, "lora", rank=4)
        ls, _, _ = _train(unet, b, lora_steps, _lora_opts(unet, 1e-3), f"{name} lora", progress)
        summary[f"{name}_lora"] = {"loss_first": ls[0], "loss_last": ls[-1]}
        loras[name] = {n: tuple(t.detach().clone() for t in a.lora_factors()) for n, a in sdxl.remove(unet).items()}

    # 3. ZipLoRA merge, export, reload.
    unet.eval()
    merged = sdxl.train_zip_mergers(unet, loras["content"], loras["style"], content_batch, style_batch,
                                    steps=zip_steps, progress=progress)
    path = os.path.join(out_dir, "merged_lora.safetensors")
    report = lora_io.export_lora(unet, path, format="diffusers")
    reloaded = lora_io.load_lora(path)
    diff = max((reloaded[f"unet.{n}"][i] - t).abs().max().item() for n, f in merged.items() for i, t in enumerate(f))
    if set(reloaded) != {f"unet.{n}" for n in merged} or diff > 0:
        raise RuntimeError(f"demo: the exported merged LoRA does not reload to the merge (max diff {diff})")
    rank = {A.shape[0] for _, A in merged.values()}
    summary["zip"] = {"layers": len(merged), "rank": sorted(rank), "export_max_rel_error": report["max_rel_error"],
                      "reload_max_abs_diff": diff}
    summary["files"]["merged lora (diffusers)"] = path
    sdxl.remove(unet)

    # 4. AdaLoRA: the budget falls to the target, pruned triplets are compacted away, files written.
    unet.train()
    summary["adalora"] = _adalora(unet, batch, adalora_steps, out_dir, progress)
    summary["files"].update(summary["adalora"].pop("files"))

    # 5. Textual inversion, prior preservation, Cut-Mix-Unmix, ControlNet, T2I-Adapter.
    summary["seed_methods"] = _seed_methods(seed, seed_method_steps, out_dir, progress)
    summary["files"].update(summary["seed_methods"].pop("files"))
    summary["total_s"] = time.perf_counter() - t_start
    return summary


def _print(summary: dict) -> None:
    s = summary["soda"]
    print(f"\nSODA-SVD on {s['layers']} attention layers ({s['factors']} Stiefel factors), inject {summary['soda_inject_s']:.1f} s")
    print(f"  loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}; max orthogonality error {s['orthogonality_error']:.2e}")
    print(f"  step {s['step_ms']:.0f} ms (median); share of step time inside specops ops {100 * s['specops_share']:.0f}%")
    for name in ("content", "style"):
        lo = summary[f"{name}_lora"]
        print(f"{name} LoRA (rank 4): loss {lo['loss_first']:.4f} -> {lo['loss_last']:.4f}")
    z = summary["zip"]
    print(f"ZipLoRA merge: {z['layers']} layers, rank {z['rank']}, export error {z['export_max_rel_error']:.1e}, "
          f"reload max |diff| {z['reload_max_abs_diff']:.1e}")
    a = summary["adalora"]
    b = a["budgets"]
    marks = sorted({0, len(b) // 3, 2 * len(b) // 3, len(b) - 1})
    print(f"AdaLoRA on {a['layers']} attention + feed-forward layers (init_r 12 -> target 8): loss "
          f"{a['loss_first']:.4f} -> {a['loss_last']:.4f}, step {a['step_ms']:.0f} ms (median)")
    print(f"  budget {a['init_budget']} -> " + " -> ".join(f"{b[i]} (step {i})" for i in marks)
          + f"; target {a['target_budget']}")
    print(f"  compacted, exported as a kept-rank LoRA (kohya): export error {a['export_max_rel_error']:.1e}, "
          f"reloaded B A vs ΔW {a['reload_max_rel_error']:.1e}")
    print("  triplets kept per layer, by block (mean, min-max): " + ", ".join(
        f"{blk} {sum(r) / len(r):.1f} ({min(r)}-{max(r)})" for blk, r in a["blocks"].items()))
    m = summary["seed_methods"]
    ti, cm, cn, t2i = m["textual_inversion"], m["cut_mix"], m["controlnet"], m["t2i"]
    print(f"textual inversion (2 tokens, both encoders) + LoRA + prior preservation: loss {ti['loss_first']:.4f} -> "
          f"{ti['loss_last']:.4f}; embedding file reloaded, max diff {ti['reload_max_abs_diff']:.1e}")
    print(f"Cut-Mix-Unmix: loss {cm['loss_first']:.4f} -> {cm['loss_last']:.4f}; unmix term "
          f"{cm['unmix_first']:.2e} -> {cm['unmix_last']:.2e}")
    print(f"Control-LoRA on {cn['layers']} ControlNet layers: loss {cn['loss_first']:.4f} -> {cn['loss_last']:.4f}; "
          f"export error {cn['export_max_rel_error']:.1e}")
    print(f"T2I-Adapter (full_adapter_xl): loss {t2i['loss_first']:.4f} -> {t2i['loss_last']:.4f}")
    print("files:")
    for what, path in summary["files"].items():
        print(f"  {path}  ({what}, {os.path.getsize(path) / 1e6:.2f} MB)")
    print(f"total {summary['total_s']:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="directory for the files written")
    ap.add_argument("--soda-steps", type=int, default=24)
    ap.add_argument("--lora-steps", type=int, default=15)
    ap.add_argument("--zip-steps", type=int, default=20)
    ap.add_argument("--adalora-steps", type=int, default=24)
    ap.add_argument("--seed-method-steps", type=int, default=6, help="steps of each method of part 5")
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    summary = run(args.out, args.soda_steps, args.lora_steps, args.zip_steps, args.adalora_steps,
                  args.seed_method_steps, progress=not args.no_progress)
    _print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0
