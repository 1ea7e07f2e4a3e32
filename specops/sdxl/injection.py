"""Injection and its inverse: put specops adapters on the Linear and conv layers of a UNet or CLIP encoder.

    inject(model, method, ...)       replace a preset's layers (PRESETS, LyCORIS's names; default the
                                     attention projections) or named targets by specops.adapters in
                                     place, optionally block-wise (block_weights=: chosen UNet blocks, each weighted)
    remove / fuse / unfuse           take adapters out again, or fold their ΔW into the base weights
    apply_lora(model, lora)          inject LoRA adapters holding given factors (Linear and LoCon)
    INJECT_METHODS, PRESETS          the adapter types inject builds, the layer sets it selects
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch import nn

from .. import adapters
from ..lora_io import Adapters, block_of, lycoris_adapters
from .model import _is_text_encoder, _matches, _targets

__all__ = ["INJECT_METHODS", "PRESETS", "BLOCK_LISTS", "inject", "set_block_weights", "remove", "fuse", "unfuse",
           "apply_lora"]

INJECT_METHODS = ("lora", "loha", "lokr", "adalora", "oft", "boft", "koft", "svdiff", "soda-svd", "soda-lq")


class _Preset(NamedTuple):
    """Which layers a preset adapts: every Linear and 1x1 Conv2d inside a module of one of the
    container classes (or named in `names`), and the larger-kernel Conv2d layers too when `conv`."""
    unet: tuple[str, ...]   # container class names in a diffusers UNet
    names: tuple[str, ...]  # UNet module names adapted wherever they are
    text: tuple[str, ...]   # container class names in a transformers CLIP text encoder
    conv: bool


_CLIP_ATTENTION = ("CLIPAttention", "CLIPSdpaAttention")
_TRANSFORMER = ("Transformer2DModel", "TimestepEmbedding")

# LyCORIS 4.1.3's built-in presets (lycoris.config), restricted to the classes an SDXL UNet and its
# CLIP encoders hold. attn-only is selected by name instead (UNET_TARGETS / TEXT_TARGETS: the same
# layers as LyCORIS's attention classes, which it names by their original-SD class names). Like
# LyCORIS, a 1x1 conv counts as a linear layer: full-lin adapts the resnets' 1x1 shortcuts too.
# On the tiny UNet: attn-only 560, attn-mlp 726 (+ ff, proj_in/out, the time and add embeddings),
# full-lin 754 (+ resnet time_emb_proj and conv_shortcut), full 794 (every Linear and Conv2d);
# on each CLIP encoder 8 (attention) or 12 (+ mlp).
PRESETS: dict[str, _Preset] = {
    "attn-only": _Preset((), (), (), conv=False),
    "attn-mlp": _Preset(_TRANSFORMER, (), _CLIP_ATTENTION + ("CLIPMLP",), conv=False),
    "full-lin": _Preset(_TRANSFORMER + ("ResnetBlock2D",), ("time_embedding.linear_1", "time_embedding.linear_2"),
                        _CLIP_ATTENTION + ("CLIPMLP",), conv=False),
    "full": _Preset(_TRANSFORMER + ("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                    ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"),
                    _CLIP_ATTENTION + ("CLIPMLP",), conv=True),
}


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _is_spatial(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and any(k != 1 for k in module.kernel_size)


def _layers(model: nn.Module):
    """(name, module, layer) for every Linear and Conv2d of `model` in module order; an adapter
    stands for the layer it wraps (module the adapter, layer its base), whose own name is skipped."""
    inner = ()
    for name, module in model.named_modules():
        if inner and name.startswith(inner):
            continue
        if isinstance(module, adapters.Adapter):
            inner = name + "."
            yield name, module, module.base
        elif _is_layer(module):
            yield name, module, module


def _select(model: nn.Module, targets, preset) -> list[str]:
    """Names of the layers (or adapters) that `targets` (if given) or `preset` select, in module order."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
    if targets is not None or preset == "attn-only":
        targets = _targets(model, targets)
        return [n for n, _, _ in _layers(model) if _matches(n, targets)]
    spec = PRESETS[preset]
    text = _is_text_encoder(model)
    classes, names = (spec.text, ()) if text else (spec.unet, spec.names)
    inside = tuple(n + "." for n, m in model.named_modules() if type(m).__name__ in classes)
    return [n for n, _, layer in _layers(model)
            if (spec.conv or not _is_spatial(layer)) and (n in names or n.startswith(inside))]


_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(?:\.attentions\.(\d+))?")

# The SDXL weight lists of block-weight tools (a "lbw=" list): BASE, then SGM blocks (lora_io.block_of).
# The 12-weight form lists the blocks holding attention, the 20-weight form every block.
BLOCK_LISTS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}


def _block_rule(block_weights, text: bool):
    """block_weights -> a function: module name -> its weight, or None when it is not selected."""
    if isinstance(block_weights, (list, tuple)):
        if len(block_weights) not in BLOCK_LISTS:
            raise ValueError(f"block_weights: a list holds {sorted(BLOCK_LISTS)} weights (SDXL's block-weight "
                             f"orders, BLOCK_LISTS), got {len(block_weights)}")
        for i, w in enumerate(block_weights):
            _check_weight(f"block_weights[{i}]", w)
        weights = dict(zip(BLOCK_LISTS[len(block_weights)], map(float, block_weights)))
        if text:
            return lambda name: weights["BASE"]
        return lambda name: weights.get(block_of(name) or "BASE")
    if text:
        raise ValueError("block_weights: a mapping of UNet blocks applies to a UNet; a text encoder takes a "
                         "block-weight list, whose BASE weight it uses")
    weights = _parse_block_weights(block_weights)
    return lambda name: _weight_of(name, weights)


def _check_weight(where: str, w) -> None:
    if not isinstance(w, (int, float)) or isinstance(w, bool):
        raise ValueError(f"{where}: expected a float weight, got {w!r}")


def _parse_block_weights(block_weights) -> dict[str, float]:
    """Normalise a mapping `block_weights` to {prefix: weight}; prefix "down_blocks.1" or "down_blocks.1.attentions.0".

    Accepts {"down_blocks.1": 1.0, "mid_block": 0.0, "up_blocks.0": [1.0, 0.5, 0.0]} (a list gives one
    weight per attention block j of that UNet block) and diffusers' set_adapters form
    {"down": {"block_1": [..]}, "mid": 1.0, "up": {"block_0": 0.5}} (also "down": 0.5 for every down block).
    """
    if not isinstance(block_weights, Mapping):
        raise ValueError(f"block_weights: expected a mapping of UNet blocks to weights or a list of "
                         f"{' or '.join(map(str, BLOCK_LISTS))} weights, got {type(block_weights).__name__}")
    out: dict[str, float] = {}

    def put(prefix, w):
        if isinstance(w, (list, tuple)):
            for j, wj in enumerate(w):
                put(f"{prefix}.attentions.{j}", wj)
            return
        _check_weight(f"block_weights[{prefix!r}] (a float weight or a list of them)", w)
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


def set_block_weights(model: nn.Module, block_weights) -> dict[str, float]:
    """Set every adapter's scale from `block_weights` (inject's forms): unselected adapters get 0,
    which switches them off (except DoRA's rescaling: LyCORIS's multiplier rule keeps W0 + ΔW' at
    0, see specops.adapters.Adapter); e.g. after apply_lora, as block-weight tools weight a file's
    blocks. Returns {module name: scale}."""
    rule = _block_rule(block_weights, _is_text_encoder(model))
    scales = {}
    for name, adapter in _adapters(model).items():
        adapter.scale = scales[name] = float(rule(name) or 0.0)
    return scales


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject(model: nn.Module, method: str, *, targets: Sequence[str] | None = None, preset: str | None = None,
           block_weights=None, **options) -> dict[str, adapters.Adapter]:
    """Replace the selected Linear (and Conv2d) layers of `model` by `method` adapters, in place.

    method: one of INJECT_METHODS ("lora", "loha", "lokr", "adalora", "oft", "boft", "koft", "svdiff",
        "soda-svd", "soda-lq"); `options` go to the adapter class (specops.adapters, e.g. rank=8, side="basis",
        AdaLoRA's init_r=12 (its rank allocator: specops.adalora.RankAllocator),
        OFT's blocks=4: the number of diagonal rotation blocks, which must divide every adapted
        layer's rotated dimension (in, a conv's in·kh·kw, or out with side="output"), or BOFT's
        block_size=8 and stages, the block size an even divisor of that dimension;
        LoRA's conv_rank / conv_alpha / tucker act on the convolutions, as LyCORIS's conv_dim /
        conv_alpha / use_tucker).
    preset: one of PRESETS, LyCORIS's preset names and layer sets: "attn-only" (the default: the
        attention projections, UNET_TARGETS / TEXT_TARGETS), "attn-mlp" (+ feed-forward, proj_in /
        proj_out and the time / add embeddings; + mlp on a text encoder), "full-lin" (+ the resnets'
        time_emb_proj and 1x1 conv_shortcut), "full" (every Linear and Conv2d of an SDXL UNet: also
        resnet, sampler and conv_in / conv_out convolutions). Every method here takes conv layers
        (specops.adapters.CONV_METHODS): LoRA, LoHa and LoKr in LyCORIS's conv forms, the rebuild
        methods (OFT, KOFT, SVDiff, SODA) on the kernel as the (out, in·kh·kw) matrix.
    targets: module-name suffixes, selecting the Linear and Conv2d layers they name; given, they win
        over `preset`.
    block_weights: None (every selected layer) or a block-wise selection, e.g. (UNet only)
        {"down_blocks.1": 1.0, "up_blocks.0": [1.0, 0.5]} or diffusers' {"down": {"block_1": ...}}:
        layers outside the listed blocks, or with weight 0, are left alone; a listed weight w scales
        that layer's update ΔW by w (adapter.scale). A list weights the attention blocks j of that
        UNet block only (its resnets and samplers need a single weight for the block). Unlike
        diffusers' set_adapters, unlisted blocks are NOT adapted. Or a block-weight tool's SDXL
        list (BLOCK_LISTS) of 12 weights — BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05 — or of
        20 — BASE, IN00..IN08, M00, OUT00..OUT08 —, numbering Stability's (SGM) UNet blocks:
        IN00 conv_in, IN{3i+j+1} down_blocks.i's j-th resnet and transformer, IN{3i+3} its
        downsampler, M00 the mid block, OUT{3i+j} up_blocks.i's j-th resnet and transformer (the
        last also its upsampler). BASE weights a text encoder's layers and the UNet layers no block
        holds (time / add embeddings, conv_out); blocks the 12-weight form omits hold no attention
        and are not adapted.
    Every other parameter of `model` is frozen (requires_grad False, as PEFT does), so a backward
    pass computes no weight gradient of the base model. Returns {module name: adapter}. Every
    adapter starts as the identity update. Nothing is changed if building any adapter fails, or if
    a selected layer is a Conv2d and `method` is not in CONV_METHODS (a ValueError names the layer).
    """
    if method not in INJECT_METHODS:
        raise ValueError(f"method: expected one of {INJECT_METHODS} (ZipLoRA comes from train_zip_mergers), got {method!r}")
    preset = "attn-only" if preset is None else preset
    selected = _select(model, targets, preset)
    what = f"targets={_targets(model, targets)}" if targets is not None else f"preset={preset!r}"
    rule = None if block_weights is None else _block_rule(block_weights, _is_text_encoder(model))
    modules = dict(model.named_modules())
    built: dict[str, adapters.Adapter] = {}
    with _restoring_grad_flags(model):
        for name in selected:
            module = modules[name]
            if isinstance(module, adapters.Adapter):
                raise ValueError(f"inject: {name} already holds a {module.method!r} adapter; call remove() first")
            scale = 1.0 if rule is None else rule(name)
            if not scale:
                continue
            if isinstance(module, nn.Conv2d) and method not in adapters.CONV_METHODS:
                raise ValueError(
                    f"inject: {name} is a Conv2d ({module.kernel_size[0]}x{module.kernel_size[1]}); method {method!r} "
                    f"adapts Linear layers only, the methods for conv layers are {adapters.CONV_METHODS} "
                    "(or choose targets / a preset without conv layers)")
            built[name] = adapters.make_adapter(method, module, scale=scale, **options)
    if not built:
        raise ValueError(f"inject: no Linear or Conv2d layer of {type(model).__name__} matches {what} "
                         f"and block_weights={block_weights}")
    return _install(model, built)


def _install(model: nn.Module, built: dict[str, adapters.Adapter]) -> dict[str, adapters.Adapter]:
    """Freeze the model's own parameters, then put the (trainable) adapters in place; no adapter,
    no change."""
    if not built:
        return built
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


def apply_lora(model: nn.Module, lora: Mapping[str, tuple] | str | os.PathLike, *, prefix: str = "unet",
               scale: float = 1.0, strict: bool = True):
    """Inject the adapters of a file (a path: LoRA/LoCon, LoHa, LoKr or diag-OFT, in the file's own
    algorithm, lora_io.lycoris_adapters) or LoRA adapters holding given factors (lora = {name: factors},
    load_lora's output).

    factors: (B, A) for a Linear, ΔW = scale · B A; for a Conv2d (LoCon) (B, A) with A
    (r, in, kh, kw) or, Tucker, (B, A, mid) — specops.adapters.LoRA's init forms. A path may hold
    diffusers, kohya or LyCORIS keys (load_lora). Keys may carry the "unet." / "text_encoder."
    prefix (only `prefix`'s are used). Returns {name: adapter}; nothing changes if a name is not a
    layer of the entry's kind or any factor does not fit its layer. strict=False (a path only)
    installs what fits and skips the rest: the result's `skipped` maps each key or module left out
    to why (lora_io.Adapters); an unreadable file still raises.
    """
    if isinstance(lora, (str, os.PathLike)):  # the file's own algorithm: LoRA/LoCon, LoHa, LoKr or diag-OFT
        built = lycoris_adapters(lora, {prefix: model}, scale=scale, strict=strict)
        installed = Adapters(_install(model, {n.partition(".")[2]: a for n, a in built.items()
                                              if n.partition(".")[0] == prefix}))
        installed.skipped = built.skipped
        return installed
    lora = _strip(lora, prefix)
    modules = dict(model.named_modules())
    missing = [n for n, f in lora.items() if not isinstance(modules.get(n), nn.Conv2d if _is_conv_entry(f) else nn.Linear)]
    if missing:
        kinds = sorted({"Conv2d" if _is_conv_entry(lora[n]) else "Linear" for n in missing})
        raise ValueError(f"lora: no {' / '.join(kinds)} layer named {missing[:3]} in {type(model).__name__} "
                         f"({len(missing)} missing)")
    return _install(model, _lora_adapters(modules, lora, scale))


def _is_conv_entry(factors) -> bool:
    """A LoCon entry: a Tucker triple, or an A with the (r, in, kh, kw) shape of a conv."""
    return len(factors) == 3 or (len(factors) == 2 and getattr(factors[1], "ndim", 2) == 4)


def _lora_adapters(modules: dict, lora: Mapping[str, tuple], scale: float = 1.0) -> dict[str, adapters.Adapter]:
    with _restoring_grad_flags(*(modules[n] for n in lora)):
        return {n: adapters.make_adapter("lora", modules[n], init=tuple(f), scale=scale) for n, f in lora.items()}


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
