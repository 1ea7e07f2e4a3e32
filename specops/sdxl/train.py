"""Training on an injected model: the denoising loss and step, optimiser groups, ZipLoRA mergers.

    denoising_loss / train_step                     the epsilon objective and one optimiser step on it, with
                                                    DreamBooth's prior preservation (prior=, prior_weight=)
    train_blocks(unet, blocks)                      plain fine-tuning of chosen UNet blocks (block-wise)
    param_groups(model, lr, ...)                    Euclidean parameters vs. orthogonal (Stiefel) factors
    train_zip_mergers(unet, content, style, ...)    ZipLoRA: train only the column mergers of two frozen
                                                    LoRAs (the dense merge op is specops.zip_merge)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import adapters
from ..lora_io import load_lora
from ..zip import merger_penalty
from .injection import _adapters, _install, _lora_adapters, _parse_block_weights, _strip, _weight_of

__all__ = ["denoising_loss", "train_step", "train_blocks", "ParamGroups", "param_groups", "train_zip_mergers"]


def _cat_batches(a, b):
    """The UNet kwargs of two batches as one (concatenated along the batch dimension), or None when a
    tensor's other dimensions differ (e.g. prompts of different lengths) or a value is neither a
    tensor, a dict nor the same plain value in both."""
    if isinstance(a, dict):
        out = {k: _cat_batches(a[k], b[k]) for k in a}
        return None if any(v is None for v in out.values()) else out
    if isinstance(a, Tensor):
        return torch.cat([a, b]) if a.shape[1:] == b.shape[1:] else None
    return a if a is b or (isinstance(a, (int, float, str, type(None))) and a == b) else None


def denoising_loss(unet: nn.Module, batch: dict, prior: dict | None = None, prior_weight: float = 1.0) -> Tensor:
    """Mean squared error of the UNet's noise prediction (the epsilon objective), optionally with
    DreamBooth's prior preservation:

        L = mean((ε_θ(x_t, t, c) − ε)²) + λ · mean((ε_θ(x'_t', t', c_pr) − ε')²)

    `batch` holds the instance images, `prior` a class-prior batch of the same form (images the
    model generated for the class prompt, noised likewise), λ = prior_weight. The two go through
    the UNet as one concatenated batch (one pass over the weights) when their shapes allow, as
    two passes otherwise; λ = 0 or prior=None is the plain objective (the prior is not evaluated).
    """
    if not isinstance(prior_weight, (int, float)) or isinstance(prior_weight, bool) or not prior_weight >= 0:
        raise ValueError(f"denoising_loss: prior_weight must be a float >= 0, got {prior_weight!r}")
    if prior is None or prior_weight == 0:
        return torch.nn.functional.mse_loss(unet(**batch["unet"]).sample, batch["noise"])
    both = _cat_batches(batch["unet"], prior["unet"])
    if both is None:
        pred, pred_prior = unet(**batch["unet"]).sample, unet(**prior["unet"]).sample
    else:
        pred, pred_prior = unet(**both).sample.split([len(batch["noise"]), len(prior["noise"])])
    mse = torch.nn.functional.mse_loss
    return mse(pred, batch["noise"]) + prior_weight * mse(pred_prior, prior["noise"])


def train_step(model: nn.Module, batch: dict, optimizers: Sequence[torch.optim.Optimizer], *,
               prior: dict | None = None, prior_weight: float = 1.0) -> float:
    """One denoising training step: zero the gradients, loss (denoising_loss, with its prior
    preservation arguments), backward, every optimiser's step."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = denoising_loss(model, batch, prior, prior_weight)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.item()


def train_blocks(unet: nn.Module, blocks) -> list[nn.Parameter]:
    """Plain fine-tuning of chosen UNet blocks (block-wise, as Block-wise LoRA's paper trains): the
    parameters of those blocks become trainable and the UNet's other own parameters frozen; adapters
    keep theirs as they are (call it after inject, which freezes the whole model, to train both).
    `blocks`: block prefixes ("down_blocks.1", "mid_block", "up_blocks.0.attentions.1") or inject's
    block_weights mapping (a nonzero weight selects). Layers that hold a specops adapter keep their base weights frozen: several methods
    (SVDiff, SODA) cache a decomposition of them. Returns the trainable parameters, for an
    optimiser group of their own: AdamW([*param_groups(unet, lr).euclidean, {"params": train_blocks(...)}])."""
    spec = blocks if isinstance(blocks, dict) else {b: 1.0 for b in blocks}
    weights = _parse_block_weights(spec)
    if not any(weights.values()):
        raise ValueError("train_blocks: select at least one block (a prefix, or a nonzero weight)")
    adapted = tuple(f"{n}." for n in _adapters(unet))
    chosen = []
    for name, p in unet.named_parameters():
        if name.startswith(adapted):
            continue
        on = bool(_weight_of(name, weights))
        p.requires_grad_(on)
        if on:
            chosen.append(p)
    if not chosen:
        raise ValueError(f"train_blocks: the blocks {sorted(weights)} hold no parameters of this UNet")
    return chosen


class ParamGroups(NamedTuple):
    euclidean: list[dict]   # for torch.optim.AdamW & co.
    orthogonal: list[dict]  # for specops.optim.StiefelAdam / CayleyAdam / StiefelSGD (fused)


def param_groups(model: nn.Module, lr: float, stiefel_lr: float | None = None, weight_decay: float = 0.0) -> ParamGroups:
    """Split the adapters' trainable parameters into Euclidean ones and orthogonal (Stiefel) factors.

    Usage: g = param_groups(unet, lr=1e-3, stiefel_lr=1e-4); AdamW(g.euclidean); StiefelAdam(g.orthogonal).
    Either list may be empty (e.g. LoRA has no orthogonal factors). stiefel_lr defaults to lr.
    """
    found = _adapters(model).values()
    ortho, euclid, seen = [], [], set()
    for adapter in found:
        for p in adapter.orthogonal_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ortho.append(p)
    for adapter in found:
        for p in adapter.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                euclid.append(p)
    stiefel_lr = lr if stiefel_lr is None else stiefel_lr
    return ParamGroups(
        [{"params": euclid, "lr": lr, "weight_decay": weight_decay}] if euclid else [],
        [{"params": ortho, "lr": stiefel_lr}] if ortho else [],
    )


def train_zip_mergers(unet: nn.Module, content_lora, style_lora, content_batch: dict, style_batch: dict, *,
                      steps: int = 100, lam: float = 0.01, lr: float = 1e-2, kind: str = "abs_product",
                      progress: bool = False) -> dict:
    """ZipLoRA on a UNet: train column mergers m_c, m_s of two frozen LoRAs; return the merged LoRA.

    train_zip_mergers is the training loop; the dense merge ΔW_c diag(m_c) + ΔW_s diag(m_s) of one
    layer is the op specops.zip_merge.

    content_lora / style_lora: {name: (B, A)} (load_lora's output) or file paths. Targets are the
    outputs of the content-only model on content_batch and the style-only model on style_batch
    (synthetic_batch dicts); the loss per step is
        ||ε_m(content) − ε_c(content)||² + ||ε_m(style) − ε_s(style)||² + lam · merger_penalty(m_c, m_s, kind)
    and only the mergers train (Adam, `lr`), for `steps` steps. Layers in both LoRAs get a ZipLoRA
    adapter (left in `unet`, so export_lora writes the merge); layers in only one keep that LoRA.
    Returns {name: (B_m, A_m)} with B_m A_m = ΔW_c diag(m_c) + ΔW_s diag(m_s), rank r_c + r_s.
    """
    content = _strip(load_lora(content_lora, model={"unet": unet}) if isinstance(content_lora, str) else content_lora, "unet")
    style = _strip(load_lora(style_lora, model={"unet": unet}) if isinstance(style_lora, str) else style_lora, "unet")
    if not content or not style:
        raise ValueError("train_zip_mergers: content_lora and style_lora must each hold at least one layer")
    if _adapters(unet):
        raise ValueError("train_zip_mergers: the UNet already holds adapters; call specops.sdxl.remove(unet) first")
    both = [n for n in content if n in style]
    if not both:
        raise ValueError("train_zip_mergers: the two LoRAs share no layer, so there is nothing to merge")
    modules = dict(unet.named_modules())
    missing = [n for n in {**content, **style} if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"train_zip_mergers: no Linear layer named {missing[:3]} in the UNet ({len(missing)} missing)")
    zipped = {n: adapters.make_adapter("ziplora", modules[n], content=content[n], style=style[n]) for n in both}
    single = _lora_adapters(modules, {n: f for lo in (content, style) for n, f in lo.items() if n not in both})
    for adapter in single.values():
        adapter.requires_grad_(False)  # kept as they are: only the mergers train
    _install(unet, {**zipped, **single})

    def set_mergers(c, s):
        for a in zipped.values():
            a.m_c.fill_(c)
            a.m_s.fill_(s)

    with torch.no_grad():  # targets: content-only on the content batch, style-only on the style batch
        set_mergers(1.0, 0.0)
        target_c = unet(**content_batch["unet"]).sample
        set_mergers(0.0, 1.0)
        target_s = unet(**style_batch["unet"]).sample
        set_mergers(1.0, 1.0)
    m_c = [a.m_c for a in zipped.values()]
    m_s = [a.m_s for a in zipped.values()]
    opt = torch.optim.Adam(m_c + m_s, lr=lr)
    for _ in _progress(range(steps), progress, "train_zip_mergers"):
        opt.zero_grad(set_to_none=True)
        loss = (torch.nn.functional.mse_loss(unet(**content_batch["unet"]).sample, target_c)
                + torch.nn.functional.mse_loss(unet(**style_batch["unet"]).sample, target_s)
                + lam * merger_penalty(m_c, m_s, kind))
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {name: tuple(t.detach().clone() for t in a.lora_factors()) for name, a in _adapters(unet).items()}


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)
