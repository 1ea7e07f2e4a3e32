"""The thin SDXL layer: put specops adapters on the hot path of a diffusers UNet and CLIP encoders.

    tiny_unet / tiny_text_encoders   random-init models with the exact SDXL-base structure, built offline
    inject(model, method, ...)       replace attention Linear layers by specops.adapters in place,
                                     optionally block-wise (only chosen UNet blocks, each with a weight)
    remove / fuse / unfuse           take adapters out again, or fold their ΔW into the base weights
    param_groups(model, lr, ...)     Euclidean parameters vs. orthogonal (Stiefel) factors
    zip_merge(unet, content, style)  ZipLoRA: train only the column mergers of two frozen LoRAs
    apply_lora(model, lora)          inject LoRA adapters holding given (B, A) factors
    save_adapters / load_adapters / export_lora / load_lora   files (specops.lora_io)

Real SDXL weights load into the same structure (UNet2DConditionModel.from_pretrained) when a user
has them; nothing here downloads anything.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import adapters
from .lora_io import export_lora, load_adapters, load_lora, save_adapters
from .zip import merger_penalty

__all__ = [
    "UNET_TARGETS", "TEXT_TARGETS", "INJECT_METHODS", "tiny_unet", "tiny_text_encoders", "attention_linears",
    "encode_prompt", "synthetic_batch", "denoising_loss", "train_step", "inject", "remove", "fuse", "unfuse",
    "param_groups", "apply_lora", "zip_merge", "save_adapters", "load_adapters", "export_lora", "load_lora",
]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
INJECT_METHODS = ("lora", "loha", "lokr", "oft", "koft", "svdiff", "soda-svd", "soda-lq")

# Tiny widths: SDXL-base's structure (levels, layers, heads per level, text_time embedding, two text
# encoders whose penultimate states are concatenated) at 1/10 of the channels.
_TEXT_WIDTHS = (32, 64)  # CLIP-L / OpenCLIP-bigG stand-ins; cross-attention width = their sum
_TIME_DIM = 8


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init diffusers UNet2DConditionModel with SDXL-base's structure, narrow channels.

    3 levels (no attention, 2 and 10 transformer layers per attention block), cross-attention on a
    96-wide context, the "text_time" added embedding (pooled text 64 + 6 time ids), and the 560
    attention Linear layers under their SDXL names (down_blocks.1.attentions.0.transformer_blocks.0
    .attn1.to_q, ...). Channels (32, 64, 128) instead of (320, 640, 1280). Deterministic in `seed`.
    """
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(2, 4, 8), cross_attention_dim=sum(_TEXT_WIDTHS), norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=_TIME_DIM,
            projection_class_embeddings_input_dim=_TEXT_WIDTHS[1] + 6 * _TIME_DIM,
            use_linear_projection=True,
        )
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def tiny_text_encoders(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(text_encoder, text_encoder_2): small random CLIP text encoders, the second with projection.

    Hidden widths 32 and 64 (SDXL: 768 and 1280), 2 layers each, vocabulary 1000, 77 positions; the
    second projects its pooled state to 64 (the UNet's text_embeds).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width):
        return CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=_TEXT_WIDTHS[1],
                              bos_token_id=0, eos_token_id=2)  # CLIP's own ids lie outside the tiny vocabulary

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(config(_TEXT_WIDTHS[0]))
        te2 = CLIPTextModelWithProjection(config(_TEXT_WIDTHS[1]))
    return tuple((te if dtype == torch.float32 else te.to(dtype)).eval() for te in (te1, te2))


def attention_linears(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Names of the nn.Linear (or adapter) modules of `model` whose name ends with a target."""
    targets = _targets(model, targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, adapters.Adapter)) and _matches(name, targets)]


def encode_prompt(text_encoders, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """SDXL conditioning: (penultimate states of both encoders concatenated, pooled projection of the 2nd)."""
    te1, te2 = text_encoders
    h1 = te1(input_ids, output_hidden_states=True).hidden_states[-2]
    out2 = te2(input_ids, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def synthetic_batch(text_encoders, batch: int = 2, tokens: int = 8, seed: int = 0, size: int = 16) -> dict:
    """A fixed synthetic denoising batch: noisy latents, timesteps, text conditioning and the noise.

    Returns {"unet": kwargs for UNet2DConditionModel.forward, "noise": the target (batch, 4, size, size)}.
    Latents are x_t = sqrt(abar) x0 + sqrt(1 - abar) noise with the SDXL (scaled-linear) schedule.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(text_encoders[0].parameters()).dtype
    ids = torch.randint(0, text_encoders[0].config.vocab_size, (batch, tokens), generator=g)
    with torch.no_grad():
        context, pooled = encode_prompt(text_encoders, ids)
    x0 = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    noise = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)[t]
    abar = abar.to(dtype).view(-1, 1, 1, 1)
    time_ids = torch.tensor([size * 8, size * 8, 0, 0, size * 8, size * 8], dtype=dtype).expand(batch, 6)
    return {
        "unet": dict(sample=abar.sqrt() * x0 + (1 - abar).sqrt() * noise, timestep=t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}),
        "noise": noise,
    }


def denoising_loss(unet: nn.Module, batch: dict) -> Tensor:
    """Mean squared error of the UNet's noise prediction (the epsilon objective)."""
    return torch.nn.functional.mse_loss(unet(**batch["unet"]).sample, batch["noise"])


def train_step(model: nn.Module, batch: dict, optimizers: Sequence[torch.optim.Optimizer]) -> float:
    """One denoising training step: zero the gradients, loss, backward, every optimiser's step."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = denoising_loss(model, batch)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- inject


def _is_text_encoder(model: nn.Module) -> bool:
    return str(getattr(getattr(model, "config", None), "model_type", "")).startswith("clip")


def _targets(model, targets):
    if targets is None:
        return TEXT_TARGETS if _is_text_encoder(model) else UNET_TARGETS
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets: expected a non-empty sequence of module-name suffixes, got {targets!r}")
    return tuple(targets)


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(?:\.attentions\.(\d+))?")


def _block_weights(blocks) -> dict[str, float]:
    """Normalise `blocks` to {prefix: weight}; prefix "down_blocks.1" or "down_blocks.1.attentions.0".

    Accepts {"down_blocks.1": 1.0, "mid_block": 0.0, "up_blocks.0": [1.0, 0.5, 0.0]} (a list gives one
    weight per attention block j of that UNet block) and diffusers' set_adapters form
    {"down": {"block_1": [..]}, "mid": 1.0, "up": {"block_0": 0.5}} (also "down": 0.5 for every down block).
    """
    if not isinstance(blocks, Mapping):
        raise ValueError(f"blocks: expected a mapping of UNet blocks to weights, got {type(blocks).__name__}")
    out: dict[str, float] = {}

    def put(prefix, w):
        if isinstance(w, (list, tuple)):
            for j, wj in enumerate(w):
                put(f"{prefix}.attentions.{j}", wj)
            return
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise ValueError(f"blocks[{prefix!r}]: expected a float weight or a list of them, got {w!r}")
        if not _BLOCK.fullmatch(prefix):
            raise ValueError(
                f"blocks: unknown UNet block {prefix!r}; expected down_blocks.i, mid_block, up_blocks.i "
                f"(optionally .attentions.j) or diffusers' {{'down': {{'block_i': ...}}, 'mid': ..., 'up': ...}}"
            )
        out[prefix] = float(w)

    for key, w in blocks.items():
        if key in ("down", "up"):
            if isinstance(w, Mapping):
                for bkey, bw in w.items():
                    m = re.fullmatch(r"block_(\d+)", str(bkey))
                    if m is None:
                        raise ValueError(f"blocks[{key!r}]: expected keys 'block_i', got {bkey!r}")
                    put(f"{key}_blocks.{m.group(1)}", bw)
            else:
                for i in range(4):  # every block of that side; prefixes with no layers select nothing
                    put(f"{key}_blocks.{i}", w)
        elif key == "mid":
            put("mid_block", w)
        else:
            put(str(key), w)
    return out


def _weight_of(name: str, weights: dict[str, float]) -> float | None:
    m = _BLOCK.match(name)
    if m is None:
        return None
    if m.group(2) is not None and f"{m.group(1)}.attentions.{m.group(2)}" in weights:
        return weights[f"{m.group(1)}.attentions.{m.group(2)}"]
    return weights.get(m.group(1))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject(model: nn.Module, method: str, *, targets: Sequence[str] | None = None, blocks=None,
           **options) -> dict[str, adapters.Adapter]:
    """Replace the matching Linear layers of `model` by `method` adapters, in place.

    method: one of INJECT_METHODS ("lora", "loha", "lokr", "oft", "koft", "svdiff", "soda-svd",
        "soda-lq"); `options` go to the adapter class (specops.adapters, e.g. rank=8, side="basis").
    targets: module-name suffixes; default UNET_TARGETS (to_q, to_k, to_v, to_out.0) for a UNet and
        TEXT_TARGETS (q_proj, k_proj, v_proj, out_proj) for a CLIP text encoder.
    blocks: None (every matching layer) or a block-wise selection (UNet only): layers outside the
        listed blocks, or with weight 0, are left alone; a listed weight w scales that layer's update
        ΔW by w (adapter.scale). Unlike diffusers' set_adapters, unlisted blocks are NOT adapted.
    Every other parameter of `model` is frozen (requires_grad False, as PEFT does), so a backward
    pass computes no weight gradient of the base model. Returns {module name: adapter}. Every
    adapter starts as the identity update. Nothing is changed if building any adapter fails.
    """
    if method not in INJECT_METHODS:
        raise ValueError(f"method: expected one of {INJECT_METHODS} (ZipLoRA comes from zip_merge), got {method!r}")
    targets = _targets(model, targets)
    weights = None
    if blocks is not None:
        if _is_text_encoder(model):
            raise ValueError("blocks: block-wise selection applies to a UNet, not a text encoder")
        weights = _block_weights(blocks)
    built: dict[str, adapters.Adapter] = {}
    with _restoring_grad_flags(model):
        for name, module in model.named_modules():
            if not _matches(name, targets):
                continue
            if isinstance(module, adapters.Adapter):
                raise ValueError(f"inject: {name} already holds a {module.method!r} adapter; call remove() first")
            if not isinstance(module, nn.Linear):
                continue
            scale = 1.0 if weights is None else _weight_of(name, weights)
            if not scale:
                continue
            built[name] = adapters.make_adapter(method, module, scale=scale, **options)
    if not built:
        raise ValueError(f"inject: no Linear layer of {type(model).__name__} matches targets={targets} and blocks={blocks}")
    return _install(model, built)


def _install(model: nn.Module, built: dict[str, adapters.Adapter]) -> dict[str, adapters.Adapter]:
    """Freeze the model's own parameters, then put the (trainable) adapters in place."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, adapter in built.items():
        _set(model, name, adapter)
    return built


def _adapters(model: nn.Module) -> dict[str, adapters.Adapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, adapters.Adapter)}


def remove(model: nn.Module) -> dict[str, adapters.Adapter]:
    """Put the base Linear layers back (unfusing fused adapters first); returns the removed adapters."""
    found = _adapters(model)
    for name, adapter in found.items():
        if adapter.fused:
            adapter.unfuse()
        _set(model, name, adapter.base)
    return found


def fuse(model: nn.Module) -> int:
    """Fold every adapter's ΔW into its base weight (forward then costs one GEMM); returns the count."""
    found = [a for a in _adapters(model).values() if not a.fused]
    for adapter in found:
        adapter.fuse()
    return len(found)


def unfuse(model: nn.Module) -> int:
    """Restore the base weights of every fused adapter exactly; returns the count."""
    found = [a for a in _adapters(model).values() if a.fused]
    for adapter in found:
        adapter.unfuse()
    return len(found)


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


# ----------------------------------------------------------------------------- LoRA dicts and ZipLoRA


def _strip(lora: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    """Keys "unet.<name>" (load_lora's form) or bare names -> bare names of this model."""
    out = {}
    for key, value in lora.items():
        head, _, rest = key.partition(".")
        if head in ("unet", "text_encoder", "text_encoder_2"):
            if head != prefix:
                continue
            key = rest
        out[key] = value
    return out


def apply_lora(model: nn.Module, lora: Mapping[str, tuple] | str, *, prefix: str = "unet", scale: float = 1.0):
    """Inject LoRA adapters holding given factors: lora = {name: (B, A)} (load_lora's output or a path).

    ΔW = scale · B A for every listed layer; keys may carry the "unet." / "text_encoder." prefix
    (only `prefix`'s are used). Returns {name: adapter}; nothing changes if a name does not exist.
    """
    if isinstance(lora, str):
        lora = load_lora(lora, model={prefix: model})
    lora = _strip(lora, prefix)
    modules = dict(model.named_modules())
    missing = [n for n in lora if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"lora: no Linear layer named {missing[:3]} in {type(model).__name__} ({len(missing)} missing)")
    return _install(model, _lora_adapters(modules, lora, scale))


def _lora_adapters(modules: dict, lora: Mapping[str, tuple], scale: float = 1.0) -> dict[str, adapters.Adapter]:
    with _restoring_grad_flags(*(modules[n] for n in lora)):
        return {n: adapters.make_adapter("lora", modules[n], init=(B, A), scale=scale) for n, (B, A) in lora.items()}


@contextlib.contextmanager
def _restoring_grad_flags(*modules: nn.Module):
    """An adapter freezes its base as it is built; if a later one fails, nothing may stay changed."""
    flags = {p: p.requires_grad for m in modules for p in m.parameters()}
    try:
        yield
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise


def zip_merge(unet: nn.Module, content_lora, style_lora, content_batch: dict, style_batch: dict, *, steps: int = 100,
              lam: float = 0.01, lr: float = 1e-2, kind: str = "abs_product", progress: bool = False) -> dict:
    """ZipLoRA on a UNet: learn column mergers m_c, m_s of two frozen LoRAs; return the merged LoRA.

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
        raise ValueError("zip_merge: content_lora and style_lora must each hold at least one layer")
    if _adapters(unet):
        raise ValueError("zip_merge: the UNet already holds adapters; call specops.sdxl.remove(unet) first")
    both = [n for n in content if n in style]
    if not both:
        raise ValueError("zip_merge: the two LoRAs share no layer, so there is nothing to merge")
    modules = dict(unet.named_modules())
    missing = [n for n in {**content, **style} if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"zip_merge: no Linear layer named {missing[:3]} in the UNet ({len(missing)} missing)")
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
    for _ in _progress(range(steps), progress, "zip_merge"):
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
