"""Adapter files: exact save/load of specops adapters, and LoRA export/import (diffusers, kohya).

    save_adapters(model, path)       every adapter's state + method/config + a fingerprint of its base
    load_adapters(model, path)       validate everything, then swap the adapters in (all or nothing)
    export_lora(model, path, ...)    ΔW of every adapter as a LoRA (exact factors or truncated SVD),
                                     in diffusers/PEFT or kohya key naming
    load_lora(path, model=None)      {"unet.<module>": (B, A), "text_encoder.<module>": ...} from a
                                     diffusers, PEFT, older-diffusers or kohya (also SGM-named) file

`model` is an nn.Module or a mapping of named modules, e.g. {"unet": unet, "text_encoder": te1,
"text_encoder_2": te2}; with a mapping, names are prefixed by the mapping key. For the LoRA formats
a plain module counts as the UNet ("unet" prefix).

LoRA convention (DESIGN.md layout): ΔW = B A, B (out, r), A (r, in); every scale is folded into B,
so a file written here applies with scale 1 (diffusers: lora_alpha = r; kohya: alpha = r).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import adapters

__all__ = ["save_adapters", "load_adapters", "export_lora", "load_lora", "FORMAT_TAG", "FORMAT_VERSION"]

FORMAT_TAG = "specops-adapters"
FORMAT_VERSION = "1"
_TAG_KEY, _VERSION_KEY, _MODULES_KEY = "specops.format", "specops.version", "specops.modules"
_RESERVED = {"format", _TAG_KEY, _VERSION_KEY, _MODULES_KEY}

# Relative tolerance of the base-weight checksums: float64 sums of the same weights agree to ~1e-13
# whatever the summation order (threads, devices); any real change of the weights moves them more.
_FINGERPRINT_RTOL = 1e-9

# diffusers' component prefixes and kohya's names for them (SD1.x kohya files say lora_te_).
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                    "lora_te": "text_encoder"}
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps its LoraConfig kwargs


# ----------------------------------------------------------------------------- models and files


def _components(model, default: str = "") -> list[tuple[str, nn.Module]]:
    """[(prefix, module)]: a plain module gets `default`, a mapping its own keys."""
    if isinstance(model, nn.Module):
        return [(default, model)]
    if isinstance(model, Mapping) and model:
        for key, module in model.items():
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"model: mapping keys must be non-empty names without '.', got {key!r}")
            if not isinstance(module, nn.Module):
                raise ValueError(f"model[{key!r}]: expected an nn.Module, got {type(module).__name__}")
        return list(model.items())
    raise ValueError(f"model: expected an nn.Module or a non-empty mapping of them, got {type(model).__name__}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _named_adapters(model, default: str = "") -> Iterator[tuple[str, nn.Module]]:
    for prefix, module in _components(model, default):
        for name, m in module.named_modules():
            if isinstance(m, adapters.Adapter):
                if not name:
                    raise ValueError("model: is itself an adapter; pass the module that contains it")
                yield _join(prefix, name), m


def _find(model, qualified: str) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, child name, module) of a qualified module name, or None if `model` has no such module."""
    comps = dict(_components(model))
    if "" in comps:  # a plain module: names carry no prefix
        root, rest = comps[""], qualified
    else:
        prefix, _, rest = qualified.partition(".")
        root = comps.get(prefix)
    if root is None or not rest:
        return None
    parent_name, _, child = rest.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        return None
    module = parent._modules.get(child)
    return None if module is None else (parent, child, module)


def _read(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a damaged file raises ValueError."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged?): {e}") from e
    return tensors, metadata


def _write(path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file in the same directory, fsync, os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # (not mkstemp: keep the umask's mode)
    try:
        # safetensors wants contiguous CPU tensors that share no storage
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ----------------------------------------------------------------------------- specops adapter files


def _adapter_state(adapter: nn.Module) -> dict[str, Tensor]:
    """The adapter's own state: every parameter and persistent buffer outside the frozen base.

    This is more than the trainable parameters on purpose: a parameter the user froze (e.g. A in
    LoRA-FA) must still round-trip, or the reloaded adapter would hold a fresh random value.
    The tensors share storage with the module, so copying into them loads the adapter.
    """
    return {k: v for k, v in adapter.state_dict().items() if not k.startswith("base.")}


def _fingerprint(weight: Tensor) -> dict:
    w = weight.detach().double()
    return {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "sum": f"{w.sum().item():.15e}", "abs_sum": f"{w.abs().sum().item():.15e}",
            "sum_sq": f"{w.square().sum().item():.15e}"}


def _fingerprint_mismatch(saved: dict, weight: Tensor) -> str | None:
    """Why `weight` is not the base the file was saved for, or None if it is."""
    now = _fingerprint(weight)
    for key in ("shape", "dtype"):
        if saved.get(key) != now[key]:
            return f"base weight {key} {now[key]} != {saved.get(key)} in the file"
    try:
        s, l1, sq = (float(saved[k]) for k in ("sum", "abs_sum", "sum_sq"))
    except (KeyError, TypeError, ValueError):
        return f"malformed base fingerprint {saved!r}"
    # the sum can cancel, so its tolerance is relative to the sum of magnitudes
    if abs(float(now["sum"]) - s) > _FINGERPRINT_RTOL * l1 + 1e-300 or \
            abs(float(now["sum_sq"]) - sq) > _FINGERPRINT_RTOL * sq + 1e-300:
        return "base weight values differ from the ones the file was saved for (checksum mismatch)"
    return None


def _rebuild_problem(name: str, adapter: nn.Module, config: dict) -> str | None:
    """Why make_adapter(adapter.method, base, **config) could not rebuild `adapter`, or None."""
    cls = adapters.METHODS.get(adapter.method)
    if cls is None:
        return f"{name}: method {adapter.method!r} is not in specops.adapters.METHODS"
    params = list(inspect.signature(cls).parameters.values())[1:]  # after `base`
    missing = [p.name for p in params if p.default is p.empty and p.name not in config]
    if missing:  # ZipLoRA: its two frozen LoRAs are inputs, not options
        return f"{name}: a {adapter.method!r} adapter needs {missing} to be rebuilt, which config() cannot hold"
    return None


def save_adapters(model, path, *, extra_metadata: Mapping[str, str] | None = None) -> list[str]:
    """Save every specops adapter in `model` to one safetensors file; returns the module names, sorted.

    Tensors are "<module>.<param>" (the adapter's state without its base). Metadata: format tag and
    version, and per module its method, config() and a fingerprint of the wrapped base weight
    (shape, dtype, float64 sum / abs-sum / sum of squares) so that loading into another base fails.
    Fused adapters are saved like unfused ones (the fingerprint is of the original weight W0).
    An adapter whose constructor needs options config() cannot hold (ZipLoRA: its two frozen LoRAs)
    raises ValueError: write it with export_lora instead.
    """
    extra = dict(extra_metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str) or k in _RESERVED]
    if bad:
        raise ValueError(f"extra_metadata: keys must be str (not {sorted(_RESERVED)}) and values str; bad keys {bad}")
    tensors, modules = {}, {}
    for name, adapter in _named_adapters(model):
        config = adapter.config()
        why = _rebuild_problem(name, adapter, config)
        if why:
            raise ValueError(f"save_adapters: {why}; write its update with export_lora instead")
        state = _adapter_state(adapter)
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
        modules[name] = {"method": adapter.method, "config": config, "tensors": sorted(state),
                         "base": _fingerprint(adapter._w0())}
    if not modules:
        raise ValueError(f"save_adapters: no specops adapter found in {type(model).__name__}")
    try:
        modules_json = json.dumps(modules, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapters: an adapter's config() is not JSON-safe: {e}") from e
    _write(path, tensors, {**extra, "format": "pt", _TAG_KEY: FORMAT_TAG, _VERSION_KEY: FORMAT_VERSION,
                           _MODULES_KEY: modules_json})
    return sorted(modules)


def load_adapters(model, path) -> list[str]:
    """Load a save_adapters file into `model`: all or nothing; returns the module names, sorted.

    Every check runs before anything changes: the file is a readable specops adapter file; every
    named module exists and is an nn.Linear or an unfused adapter of the same method; its base
    weight matches the saved fingerprint; every tensor matches, in name, shape and dtype, the
    adapter that make_adapter(method, base, **config) builds. Then plain Linears are replaced by new
    adapters and existing adapters with the same config are loaded in place (so optimizers keep their
    parameters); an existing adapter with another config is replaced. The round trip is bitwise.
    """
    tensors, metadata = _read(path)
    modules = _adapter_entries(metadata, path)
    listed = {f"{name}.{key}" for name, entry in modules.items() for key in entry["tensors"]}
    if listed != set(tensors):
        raise ValueError(f"{path}: tensors {sorted(set(tensors) ^ listed)[:3]} are not the ones the metadata lists")

    flags: dict[nn.Parameter, bool] = {}  # make_adapter freezes the base; undone if anything fails
    plans = []
    try:
        # make_adapter draws random initial values; keep the caller's (CPU) random stream as it was
        with torch.random.fork_rng(devices=[]):
            for name, entry in modules.items():
                own = {key: tensors[f"{name}.{key}"] for key in entry["tensors"]}
                plans.append(_plan_load(model, name, entry, own, flags, path))
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    with torch.no_grad():
        for parent, child, adapter, new, own in plans:
            state = _adapter_state(adapter)
            for key, value in own.items():
                state[key].copy_(value)
            if new:
                setattr(parent, child, adapter)
    return sorted(modules)


def _adapter_entries(metadata: dict[str, str], path) -> dict[str, dict]:
    """The per-module metadata of a save_adapters file, its form checked."""
    if metadata.get(_TAG_KEY) != FORMAT_TAG:
        raise ValueError(f"{path}: not a specops adapter file (metadata {_TAG_KEY!r} missing); "
                         "LoRA files are read with load_lora")
    if metadata.get(_VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {metadata.get(_VERSION_KEY)!r}; "
                         f"this specops reads {FORMAT_VERSION!r}")
    try:
        modules = json.loads(metadata[_MODULES_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata {_MODULES_KEY!r} missing or not JSON") from e
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{path}: metadata {_MODULES_KEY!r} names no module")
    for name, entry in modules.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("method"), str)
                and isinstance(entry.get("config"), dict) and isinstance(entry.get("base"), dict)
                and isinstance(entry.get("tensors"), list) and all(isinstance(k, str) for k in entry["tensors"])):
            raise ValueError(f"{path}: module {name!r}: metadata lacks method, config, base or tensors")
    return modules


def _plan_load(model, name: str, entry: dict, own: dict[str, Tensor], flags: dict, path):
    """Validate one module of a save_adapters file against `model`; nothing in `model` changes.

    Returns (parent, child name, adapter to fill, whether it replaces the module, own tensors).
    """
    where = f"{path}: module {name!r}"
    method, config = entry["method"], entry["config"]
    found = _find(model, name)
    if found is None:
        raise ValueError(f"{where}: no such module in {type(model).__name__}")
    parent, child, module = found
    if isinstance(module, adapters.Adapter):
        if module.method != method:
            raise ValueError(f"{where}: holds a {module.method!r} adapter, the file a {method!r} one")
        if module.fused:
            raise ValueError(f"{where}: the adapter is fused; unfuse() it before loading")
        base = module.base
    elif isinstance(module, nn.Linear):
        base = module
    else:
        raise ValueError(f"{where}: is a {type(module).__name__}, expected an nn.Linear or a specops adapter")
    why = _fingerprint_mismatch(entry["base"], base.weight)
    if why:
        raise ValueError(f"{where}: saved for another base model: {why}")
    # compared as JSON, the form the file holds it in (tuples become lists)
    if isinstance(module, adapters.Adapter) and json.loads(json.dumps(module.config())) == config:
        target, new = module, False
    else:
        for p in base.parameters():
            flags.setdefault(p, p.requires_grad)
        try:
            target, new = adapters.make_adapter(method, base, **config), True
        except Exception as e:
            raise ValueError(f"{where}: make_adapter({method!r}, base, **{config}) failed: {e}") from e
    expected = _adapter_state(target)
    if set(own) != set(expected):
        raise ValueError(f"{where}: tensors {sorted(own)} != the adapter's {sorted(expected)}")
    for key, value in own.items():
        ref = expected[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(f"{where}: tensor {key!r} is {tuple(value.shape)} {value.dtype}, "
                             f"the adapter expects {tuple(ref.shape)} {ref.dtype}")
    return parent, child, target, new, own


# ----------------------------------------------------------------------------- LoRA export


def _lora_of(adapter: nn.Module, rank: int | None) -> tuple[Tensor, Tensor, float]:
    """(B, A, relative error ||ΔW - B A||_F / ||ΔW||_F) for one adapter.

    Exact factors when the adapter has them (and they fit `rank`), else the truncated SVD of ΔW in
    float64, split evenly (B = U √S, A = √S Vh) so both factors have the same range in fp16/bf16.
    """
    with torch.no_grad():
        delta = adapter.delta_weight().detach()
        factors = adapter.lora_factors()
        if factors is not None and (rank is None or factors[1].shape[0] <= rank):
            B, A = (t.detach() for t in factors)
        else:
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            r = S.numel() if rank is None else min(rank, S.numel())
            root = S[:r].sqrt()
            B, A = (U[:, :r] * root).to(delta.dtype), (root[:, None] * Vh[:r]).to(delta.dtype)
        d64 = delta.double()
        norm = d64.norm().item()
        err = (d64 - B.double() @ A.double()).norm().item()
        return B, A, (err / norm if norm > 0 else err)


def _is_flat_clip(root: nn.Module) -> bool:
    # transformers >= 5 builds CLIPTextModel without its .text_model level (CLIPTextModelWithProjection keeps it)
    return not hasattr(root, "text_model") and hasattr(root, "embeddings") and hasattr(root, "encoder")


def _file_name(root: nn.Module, name: str) -> str:
    """The name LoRA files use for module `name` of `root`: a flattened CLIP text encoder's layers
    keep their "text_model." names there, as kohya, diffusers and every other reader expect."""
    return f"text_model.{name}" if _is_flat_clip(root) else name


def export_lora(model, path, format: str = "diffusers", rank: int | None = None) -> dict:
    """Write the ΔW of every adapter in `model` as a LoRA file; returns an error report.

    format "diffusers": keys "<component>.<module>.lora_A.weight" (A, (r, in)) and ".lora_B.weight"
        (B, (out, r)), components "unet", "text_encoder", "text_encoder_2"; diffusers' metadata says
        lora_alpha = r for every module, so diffusers/PEFT apply exactly B A.
    format "kohya": keys "lora_unet_<module, '.' -> '_'>.lora_down.weight" (A), ".lora_up.weight"
        (B), ".alpha" (= r, scale 1); "lora_te1_" / "lora_te2_" for the two text encoders.
    Text-encoder layers are written as "text_model.encoder.layers.{i}..." also from a transformers 5
    CLIPTextModel, whose own module names lack "text_model.".
    rank: None keeps LoRA factors as they are and exports other methods at full rank min(out, in)
        (exact up to rounding); an int truncates every ΔW of higher rank by SVD.
    Report: {"format", "rank": {name: r}, "rel_error": {name: ||ΔW - B A||/||ΔW||}, "max_rel_error"},
    names as in `model` ("unet.<module>", ...).
    """
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format: expected 'diffusers' or 'kohya', got {format!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected None or a positive int, got {rank!r}")
    roots = dict(_components(model, "unet"))
    tensors, ranks, errors, file_ranks = {}, {}, {}, {}
    for name, adapter in _named_adapters(model, "unet"):
        component, _, module = name.partition(".")
        if format == "kohya" and component not in _KOHYA_PREFIX:
            raise ValueError(f"format 'kohya': no kohya prefix for component {component!r}; "
                             f"expected one of {sorted(_KOHYA_PREFIX)}")
        B, A, errors[name] = _lora_of(adapter, rank)
        ranks[name] = A.shape[0]
        module = _file_name(roots[component], module)
        file_ranks[(component, module)] = ranks[name]
        if format == "diffusers":
            tensors[f"{component}.{module}.lora_A.weight"], tensors[f"{component}.{module}.lora_B.weight"] = A, B
        else:
            key = f"{_KOHYA_PREFIX[component]}_{module.replace('.', '_')}"
            if f"{key}.alpha" in tensors:
                raise ValueError(f"format 'kohya': two modules map to the kohya name {key!r}")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = A, B
            tensors[f"{key}.alpha"] = torch.tensor(float(ranks[name]))
    if not ranks:
        raise ValueError(f"export_lora: no specops adapter found in {type(model).__name__}")
    metadata = {"format": "pt", "specops.export": format}
    if format == "diffusers":
        metadata[_DIFFUSERS_METADATA_KEY] = json.dumps(_diffusers_config(file_ranks), sort_keys=True)
    _write(path, tensors, metadata)
    return {"format": format, "rank": ranks, "rel_error": errors, "max_rel_error": max(errors.values())}


def _diffusers_config(ranks: dict[tuple[str, str], int]) -> dict:
    """diffusers' per-component LoraConfig kwargs ("unet.r", ...) with lora_alpha = r everywhere.

    diffusers 0.42 infers the same from the tensors when this is absent, but earlier versions gave
    modules of a non-majority rank the majority's alpha; stating it keeps the scale exactly 1.
    Module names go in without "text_model." and patterns are escaped: PEFT matches both as a
    dotted suffix of the module name, so they fit CLIP text encoders with and without that level.
    """
    by_component: dict[str, dict[str, int]] = {}
    for (component, module), r in ranks.items():
        by_component.setdefault(component, {})[module.removeprefix("text_model.")] = r
    out = {}
    for component, modules in by_component.items():
        values = list(modules.values())
        common = max(set(values), key=values.count)
        pattern = {re.escape(m): r for m, r in modules.items() if r != common}
        out.update({f"{component}.r": common, f"{component}.lora_alpha": common,
                    f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern),
                    f"{component}.target_modules": sorted(modules)})
    return out


# ----------------------------------------------------------------------------- LoRA import

_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")          # lora_A.weight, lora_A.<adapter>.weight
_OLD_KEY = re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")  # LoRACompatibleLinear era
_PROC_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")  # attn processors
_OLD_TE_KEY = re.compile(r"^(.+\.self_attn)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")  # their text-encoder twin
_ALPHA_KEY = re.compile(r"^(.+)\.alpha$")
_ROLE = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "A": "A", "B": "B", "down": "A", "up": "B"}

# Name segments of the SDXL attention and CLIP text-encoder Linear layers, for splitting kohya's
# underscore names where no model is given. Longest match first, so "proj_in" beats "proj".
_WORDS = sorted(["down_blocks", "up_blocks", "mid_block", "attentions", "transformer_blocks", "attn1", "attn2",
                 "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "proj_in", "proj_out",
                 "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                 "mlp", "fc1", "fc2", "text_projection"], key=len, reverse=True)
_UNET_NAME = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.(proj_in|proj_out|"
                        r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))")
_TEXT_NAME = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection")

# Stability's (SGM) UNet block names that kohya SDXL files use, layers_per_block = 2: input block
# 3i + j + 1 holds down_blocks.i's j-th layer (3i + 3 is a downsampler, 0 the input conv), output
# block 3i + j holds up_blocks.i's j-th; sub-module 1 of a block is its transformer (0 the resnet).
_SGM = [  # (SGM block, its diffusers block, layers per block, block number -> (i, j))
    ("input_blocks", "down_blocks", 2, lambda n: divmod(n - 1, 3)),
    ("output_blocks", "up_blocks", 3, lambda n: divmod(n, 3)),
]


def _split_words(underscored: str) -> str | None:
    """'down_blocks_1_attentions_0_..._to_out_0' -> 'down_blocks.1.attentions.0....to_out.0', or None."""
    parts, rest = [], underscored
    while rest:
        m = re.match(r"\d+(?=_|$)", rest)
        word = m.group(0) if m else next(
            (w for w in _WORDS if rest.startswith(w) and rest[len(w):len(w) + 1] in ("", "_")), None)
        if word is None:
            return None
        parts.append(word)
        rest = rest[len(word) + 1:]
    return ".".join(parts)


def _from_sgm(name: str) -> str:
    """kohya SGM block names -> diffusers block names (still underscored); other names unchanged."""
    m = re.match(r"^middle_block_1_(.+)$", name)
    if m:
        return f"mid_block_attentions_0_{m.group(1)}"
    for sgm, block, layers, split in _SGM:
        m = re.match(rf"^{sgm}_(\d+)_1_(.+)$", name)
        if m:
            i, j = split(int(m.group(1)))
            if i < 0 or j >= layers:
                raise ValueError(f"SGM block {sgm}_{m.group(1)} holds no transformer")
            return f"{block}_{i}_attentions_{j}_{m.group(2)}"
    return name


def _name_tables(model) -> dict[str, tuple[dict[str, str], dict[str, set[str]]]]:
    """Per component: ({file name or module name: module name}, {that with '.' -> '_': {module names}})
    over the component's Linear layers and adapters (not the Linear inside an adapter)."""
    tables = {}
    for prefix, root in _components(model, "unet"):
        inner = {name + ".base" for name, m in root.named_modules() if isinstance(m, adapters.Adapter)}
        alias = {}
        for name, m in root.named_modules():
            if isinstance(m, (nn.Linear, adapters.Adapter)) and name not in inner:
                alias[name] = alias[_file_name(root, name)] = name
        under: dict[str, set[str]] = {}
        for key, name in alias.items():
            under.setdefault(key.replace(".", "_"), set()).add(name)
        tables[prefix] = (alias, under)
    return tables


def _kohya_name(component: str, underscored: str, tables: dict, key: str) -> str:
    """The module name of a kohya key's underscored module part (the model's, or SDXL's grammar)."""
    try:
        underscored = _from_sgm(underscored) if component == "unet" else underscored
    except ValueError as e:
        raise ValueError(f"load_lora: key {key!r}: {e}") from e
    if component in tables:
        found = tables[component][1].get(underscored, set())
        if len(found) != 1:
            why = "no Linear layer of the model" if not found else f"ambiguous between {sorted(found)}"
            raise ValueError(f"load_lora: key {key!r} maps to {why} ({component}: {underscored})")
        return next(iter(found))
    name = _split_words(underscored)
    grammar = _UNET_NAME if component == "unet" else _TEXT_NAME
    if name is None or not grammar.fullmatch(name):
        raise ValueError(f"load_lora: key {key!r} is not an SDXL attention/text-encoder layer name; "
                         "pass model= to resolve it by the model's module names")
    return name


def _parse_key(key: str, tables: dict) -> tuple[str, str, str, bool]:
    """(component, module name, role A/B/alpha, is kohya) of one LoRA key; ValueError if unknown.

    Kohya names come back resolved (by `tables` or the grammar), diffusers names as in the file.
    """
    m = _KOHYA_KEY.match(key)
    if m:
        component = _KOHYA_COMPONENT[m.group(1)]
        return component, _kohya_name(component, m.group(2), tables, key), _ROLE[m.group(3)], True
    name = key.removeprefix("base_model.model.")
    for pattern in (_PEFT_KEY, _OLD_KEY, _PROC_KEY, _OLD_TE_KEY, _ALPHA_KEY):
        m = pattern.match(name)
        if m:
            break
    else:
        raise ValueError(f"load_lora: key {key!r} is not a (linear) LoRA key this reader knows "
                         "(lora_A/lora_B, lora.down/up, lora_down/lora_up/alpha)")
    if pattern is _PROC_KEY:
        module, role = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else ""), _ROLE[m.group(3)]
    elif pattern is _OLD_TE_KEY:
        module, role = f"{m.group(1)}.{m.group(2)}_proj", _ROLE[m.group(3)]
    else:
        module, role = m.group(1), ("alpha" if pattern is _ALPHA_KEY else _ROLE[m.group(2)])
    head, _, rest = module.partition(".")
    component, module = (head, rest) if head in _KOHYA_PREFIX and rest else ("unet", module)
    return component, module, role, False


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha_pattern rule: the first key matching the end of the name ('^' = whole name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_lora(path, model=None) -> dict[str, tuple[Tensor, Tensor]]:
    """Read a LoRA file into {"<component>.<module>": (B, A)} with ΔW = B A (every scale folded into B).

    Reads diffusers/PEFT keys (lora_A/lora_B, an optional "base_model.model." prefix, and diffusers'
    lora_alpha metadata), older diffusers keys (.lora.down/.lora.up, .processor.to_q_lora.down) and
    kohya keys (lora_unet_/lora_te1_/lora_te2_, lora_down/lora_up/alpha, scale alpha/r), including
    kohya SDXL files with Stability's block names (input_blocks_4_1_... -> down_blocks.1.attentions.0...).
    Components: "unet", "text_encoder", "text_encoder_2" (unprefixed diffusers keys count as unet).
    model: None, an nn.Module (the UNet) or a mapping {component: module}. Kohya's underscored names
        are resolved by the model's module names for the components it has, else by the SDXL grammar
        of attention and text-encoder layers; with a model, every name must exist in it.
    A key that cannot be mapped, an incomplete pair or a conv (4-D) LoRA raises ValueError.
    """
    tensors, metadata = _read(path)
    tables = _name_tables(model) if model is not None else {}
    try:
        peft_config = json.loads(metadata.get(_DIFFUSERS_METADATA_KEY) or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {_DIFFUSERS_METADATA_KEY!r} is not JSON") from e
    groups: dict[tuple[str, str, bool], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        component, module, role, is_kohya = _parse_key(key, tables)
        parts = groups.setdefault((component, module, is_kohya), {})
        if role in parts:
            raise ValueError(f"load_lora: {path}: two keys give the {role} of {component}.{module} (e.g. {key!r})")
        parts[role] = value
    if not groups:
        raise ValueError(f"load_lora: {path} holds no tensor")
    out = {}
    for (component, module, is_kohya), parts in groups.items():
        where = f"load_lora: {path}: {component}.{module}"
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{where} lacks its {'A (down)' if 'A' not in parts else 'B (up)'} matrix")
        A, B = parts["A"], parts["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{where}: A {tuple(A.shape)} / B {tuple(B.shape)} are not matrices (conv LoRA?)")
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"{where}: A is {tuple(A.shape)} but B is {tuple(B.shape)}; ranks differ")
        scale = _scale(where, parts, r, None if is_kohya else peft_config, component, module)
        if not is_kohya and component in tables:
            if module not in tables[component][0]:
                raise ValueError(f"{where}: the model's {component} has no Linear layer {module!r}")
            module = tables[component][0][module]
        name = f"{component}.{module}"
        if name in out:
            raise ValueError(f"{where}: a second entry for {name}")
        out[name] = (_fold(B, scale), A)
    return out


def _scale(where: str, parts: dict, r: int, peft_config: dict | None, component: str, module: str) -> float:
    """The factor ΔW = scale · B A of one LoRA: alpha / r (kohya, network alphas), else PEFT's
    rule on diffusers' metadata (peft_config None: a kohya entry, which has no such metadata)."""
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise ValueError(f"{where}: alpha has shape {tuple(parts['alpha'].shape)}, expected a scalar")
        return parts["alpha"].double().item() / r
    if peft_config is None or f"{component}.lora_alpha" not in peft_config:
        return 1.0  # no alpha stated: kohya and diffusers both apply B A as is
    patterns = peft_config.get(f"{component}.alpha_pattern") or {}
    alpha = _pattern_value(patterns, module, peft_config[f"{component}.lora_alpha"])
    return alpha / (math.sqrt(r) if peft_config.get(f"{component}.use_rslora") else r)


def _fold(B: Tensor, scale: float) -> Tensor:
    # one rounding from the exact product, and none at all for scale 1 (round trips stay bitwise)
    return B if scale == 1.0 else (B.double() * scale).to(B.dtype)
