"""Injection and its inverse: put specops adapters on the attention Linear layers of a UNet or CLIP encoder.

    inject(model, method, ...)       replace attention Linear layers by specops.adapters in place,
                                     optionally block-wise (block_weights=: chosen UNet blocks, each weighted)
    remove / fuse / unfuse           take adapters out again, or fold their ΔW into the base weights
    apply_lora(model, lora)          inject LoRA adapters holding given (B, A) factors
    INJECT_METHODS                   the adapter types inject builds
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence

from torch import nn

from .. import adapters
from ..lora_io import load_lora
from .model import _is_text_encoder, _matches, _targets

__all__ = ["INJECT_METHODS", "inject", "remove", "fuse", "unfuse", "apply_lora"]

INJECT_METHODS = ("lora", "loha", "lokr", "oft", "koft", "svdiff", "soda-svd", "soda-lq")


_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(?:\.attentions\.(\d+))?")


def _parse_block_weights(block_weights) -> dict[str, float]:
    """Normalise `block_weights` to {prefix: weight}; prefix "down_blocks.1" or "down_blocks.1.attentions.0".

    Accepts {"down_blocks.1": 1.0, "mid_block": 0.0, "up_blocks.0": [1.0, 0.5, 0.0]} (a list gives one
    weight per attention block j of that UNet block) and diffusers' set_adapters form
    {"down": {"block_1": [..]}, "mid": 1.0, "up": {"block_0": 0.5}} (also "down": 0.5 for every down block).
    """
    if not isinstance(block_weights, Mapping):
        raise ValueError(f"block_weights: expected a mapping of UNet blocks to weights, got {type(block_weights).__name__}")
    out: dict[str, float] = {}

    def put(prefix, w):
        if isinstance(w, (list, tuple)):
            for j, wj in enumerate(w):
                put(f"{prefix}.attentions.{j}", wj)
            return
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise ValueError(f"block_weights[{prefix!r}]: expected a float weight or a list of them, got {w!r}")
        if not _BLOCK.fullmatch(prefix):
            raise ValueError(
                f"block_weights: unknown UNet block {prefix!r}; expected down_blocks.i, mid_block, up_blocks.i "
                f"(optionally .attentions.j) or diffusers' {{'down': {{'block_i': ...}}, 'mid': ..., 'up': ...}}"
            )
        out[prefix] = float(w)

    for key, w in block_weights.items():
        if key in ("down", "up"):
            if isinstance(w, Mapping):
                for bkey, bw in w.items():
                    m = re.fullmatch(r"block_(\d+)", str(bkey))
                    if m is None:
                        raise ValueError(f"block_weights[{key!r}]: expected keys 'block_i', got {bkey!r}")
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


def inject(model: nn.Module, method: str, *, targets: Sequence[str] | None = None, block_weights=None,
           **options) -> dict[str, adapters.Adapter]:
    """Replace the matching Linear layers of `model` by `method` adapters, in place.

    method: one of INJECT_METHODS ("lora", "loha", "lokr", "oft", "koft", "svdiff", "soda-svd",
        "soda-lq"); `options` go to the adapter class (specops.adapters, e.g. rank=8, side="basis",
        or OFT's blocks=4: the number of diagonal rotation blocks, forwarded like any other option).
    targets: module-name suffixes; default UNET_TARGETS (to_q, to_k, to_v, to_out.0) for a UNet and
        TEXT_TARGETS (q_proj, k_proj, v_proj, out_proj) for a CLIP text encoder.
    block_weights: None (every matching layer) or a block-wise selection (UNet only), e.g.
        {"down_blocks.1": 1.0, "up_blocks.0": [1.0, 0.5]} or diffusers' {"down": {"block_1": ...}}:
        layers outside the listed blocks, or with weight 0, are left alone; a listed weight w scales
        that layer's update ΔW by w (adapter.scale). Unlike diffusers' set_adapters, unlisted blocks
        are NOT adapted.
    Every other parameter of `model` is frozen (requires_grad False, as PEFT does), so a backward
    pass computes no weight gradient of the base model. Returns {module name: adapter}. Every
    adapter starts as the identity update. Nothing is changed if building any adapter fails.
    """
    if method not in INJECT_METHODS:
        raise ValueError(f"method: expected one of {INJECT_METHODS} (ZipLoRA comes from train_zip_mergers), got {method!r}")
    targets = _targets(model, targets)
    weights = None
    if block_weights is not None:
        if _is_text_encoder(model):
            raise ValueError("block_weights: block-wise selection applies to a UNet, not a text encoder")
        weights = _parse_block_weights(block_weights)
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
        raise ValueError(f"inject: no Linear layer of {type(model).__name__} matches targets={targets} and block_weights={block_weights}")
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


# ----------------------------------------------------------------------------- LoRA factor dicts


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
