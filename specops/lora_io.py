"""Adapter files: exact save/load of specops adapters, and LoRA export/import (diffusers, kohya).

    save_adapters(model, path)       every adapter's state + method/config + a fingerprint of its base
    load_adapters(model, path)       validate everything, then swap the adapters in (all or nothing)
    export_lora(model, path, ...)    ΔW of every adapter as a LoRA (exact factors or truncated SVD),
                                     in diffusers/PEFT or kohya key naming
    load_lora(path, model=None)      {"unet.<module>": (B, A), "text_encoder.<module>": ...} from a
                                     diffusers, PEFT, older-diffusers or kohya (also SGM-named) file
    lycoris_adapters(path, model)    the adapters a kohya / LyCORIS file describes, in its own
                                     algorithm (LoRA, LoHa, LoKr, diag-OFT), built but not installed

`model` is an nn.Module or a mapping of named modules, e.g. {"unet": unet, "text_encoder": te1,
"text_encoder_2": te2}; with a mapping, names are prefixed by the mapping key. For the LoRA formats
a plain module counts as the UNet ("unet" prefix).

Readers validate the whole file before they build or change anything: the safetensors layout
against the file's size (header length, JSON, dtypes, shapes, data offsets; one check for every
reader, before safetensors reads a byte of data), duplicate keys, finite tensors, then the format's
own rules. A damaged file raises ValueError naming the file (and the key at fault). Writers write a
temp file in the target's directory, fsync it and os.replace it onto the target, so the target is
always either the old file or the complete new one.

LoRA convention (DESIGN.md layout): ΔW = B A, B (out, r), A (r, in); every scale is folded into B,
so a file written here applies with scale 1 (diffusers: lora_alpha = r; kohya: alpha = r). Conv
layers (LoCon) go by kohya / LyCORIS naming: lora_down, lora_up, lora_mid (Tucker) and alpha, ΔW as
specops.adapters.LoRA on an nn.Conv2d (see load_lora).
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
from .stiefel import cayley_reference

__all__ = ["save_adapters", "load_adapters", "export_lora", "load_lora", "lycoris_adapters", "FORMAT_TAG", "FORMAT_VERSION"]

FORMAT_TAG = "specops-adapters"
FORMAT_VERSION = "1"
_TAG_KEY, _VERSION_KEY, _MODULES_KEY = "specops.format", "specops.version", "specops.modules"
_RESERVED = {"format", _TAG_KEY, _VERSION_KEY, _MODULES_KEY}

# Relative tolerance of the base-weight checksums: float64 sums of the same weights agree to ~1e-13
# whatever the summation order (threads, devices); any real change of the weights moves them more.
_FINGERPRINT_RTOL = 1e-9

# diffusers' component prefixes and kohya's names for them (SD1.x kohya files say lora_te_).
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# Components a diffusers-format file may name: kohya's three and a ControlNet (Control-LoRA).
_DIFFUSERS_COMPONENTS = (*_KOHYA_PREFIX, "controlnet")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2",
                    "lora_te": "text_encoder"}
# LyCORIS's create_lycoris(module) names every key "lycoris_<module, '.' -> '_'>" for the one module
# it wrapped: the model's only component, or the UNet.
_LYCORIS_PREFIX = "lycoris"
_KOHYA_MODULE = {"kohya": "networks.lora", "lycoris": "lycoris.kohya"}  # ss_network_module by export format
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


# safetensors' own cap on the JSON header; also keeps a lying length from allocating without bound
_MAX_HEADER = 100_000_000
# safetensors dtype names torch can hold (the sub-byte F4/F6 and complex ones it cannot)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "U8": torch.uint8, "BOOL": torch.bool}
_DAMAGED = "not a readable safetensors file"  # every reader's message for a file that is not one


def _json(text: str, what: str):
    """json.loads for text from a file: duplicate keys, NaN/Infinity, numbers that overflow to inf
    and nesting deeper than the interpreter's stack are ValueErrors naming `what`."""
    def unique(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def finite(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"number {literal[:40]} overflows to {value}")
        return value

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=unique, parse_float=finite, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, the hooks' errors, int digit limit
        raise ValueError(f"{what} is not valid JSON: {str(e)[:200]}") from None


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float


def _finite(t: Tensor) -> bool:
    if not t.is_floating_point():
        return True
    t = t.detach()
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())  # fp8 has no isfinite


def _validated_metadata(path) -> dict[str, str]:
    """Check a safetensors file's layout against its size before any reader trusts it; its metadata.

    The 8-byte little-endian header length must fit the file and the cap; the header must be a
    UTF-8 JSON object without duplicate keys; "__metadata__" maps str to str; every other entry is
    exactly {dtype, shape, data_offsets} with a known dtype, whose byte span is dtype size x shape,
    and the spans tile the data that follows the header, without overlap or gap, to the last byte.
    """
    bad = f"{path}: {_DAMAGED}"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{bad}: {size} bytes, less than its 8-byte header length (truncated?)")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{bad}: header length {n} exceeds the {size - 8} bytes after it "
                             f"or the cap of {_MAX_HEADER} (truncated or damaged?)")
        raw = f.read(n)
    if len(raw) != n or not raw.startswith(b"{"):
        raise ValueError(f"{bad}: the header is not a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{bad}: the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    header = _json(text, f"{bad}: the header")
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise ValueError(f"{bad}: __metadata__ is a {type(metadata).__name__}, not a JSON object")
    wrong = [k for k, v in metadata.items() if not isinstance(v, str)]
    if wrong:
        raise ValueError(f"{bad}: __metadata__ must map str to str; the values of {wrong[:3]} are not strings")
    data_size = size - 8 - n
    spans = []
    for key, entry in header.items():
        where = f"{bad}: tensor {key!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where}: expected {{dtype, shape, data_offsets}}, got {str(entry)[:100]}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(f"{where}: dtype {str(dtype)[:20]!r} is not one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"{where}: shape {str(shape)[:100]} is not a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise ValueError(f"{where}: data_offsets {str(offsets)[:100]} is not a [begin, end] pair")
        nbytes = _DTYPES[dtype].itemsize if 0 not in shape else 0
        for d in shape:  # stops early: a lying shape must not make a huge integer
            nbytes *= d
            if nbytes > data_size:
                break
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                             f"its {dtype} shape {shape[:8]} needs {nbytes}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise ValueError(f"{bad}: tensor {key!r} starts at data byte {begin}, expected {end} "
                             "(overlapping or gapped data_offsets)")
        end = stop
    if end != data_size:
        raise ValueError(f"{bad}: the tensors end at data byte {end}, the file's data has {data_size} bytes")
    return metadata


def _read(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, validated first (_validated_metadata);
    a damaged file or a NaN/Inf tensor raises ValueError."""
    path = os.fspath(path)
    metadata = _validated_metadata(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # the file changed since, or a check missed
        raise ValueError(f"{path}: {_DAMAGED}: {e}") from e
    for key, t in tensors.items():
        if not _finite(t):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf; an adapter file must be finite")
    return tensors, metadata


def _write(path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file in the same directory, fsync, os.replace.

    A failed write removes its temp file; a killed process leaves it as ".<name>.<hex>.tmp", which
    no reader takes for the target. Non-finite tensors are refused: the readers would refuse them.
    """
    path = os.fspath(path)
    for key, t in tensors.items():
        if not _finite(t):
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf; not writing a file no reader would accept")
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
            return f"base weight {key} {now[key]} != {str(saved.get(key))[:100]} in the file"
    try:
        s, l1, sq = (float(saved[k]) for k in ("sum", "abs_sum", "sum_sq"))
    except (KeyError, TypeError, ValueError):
        s = l1 = sq = math.nan
    if not all(map(math.isfinite, (s, l1, sq))):  # an infinite abs-sum would make any sum match
        return f"malformed base fingerprint {str(saved)[:200]}"
    # the sum can cancel, so its tolerance is relative to the sum of magnitudes; written so that a
    # NaN on either side is a mismatch
    if not (abs(float(now["sum"]) - s) <= _FINGERPRINT_RTOL * l1 + 1e-300
            and abs(float(now["sum_sq"]) - sq) <= _FINGERPRINT_RTOL * sq + 1e-300):
        return "base weight values differ from the ones the file was saved for (checksum mismatch)"
    return None


def _config_problem(config: dict, base: nn.Module) -> str | None:
    """Why make_adapter(method, base, **config) should not even be tried, or None.

    Every integer option of a specops adapter (ranks, factor sizes and counts, block counts) is at
    most max(out, in) for any adapter worth having (a conv: in·kh·kw for in, the columns of its
    ΔW); a larger one in a file would only make make_adapter allocate (or recurse) without bound
    before the shape check could refuse it.
    """
    weight = base.weight
    limit = max(weight.shape[0], weight[0].numel())
    stack = list(config.items())
    while stack:
        key, value = stack.pop()
        if isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            return f"config option {key!r} = {str(value)[:40]} exceeds max(out, in) = {limit} of the base layer"
    return None


def _rebuild_problem(name: str, adapter: nn.Module, config: dict) -> str | None:
    """Why make_adapter(adapter.method, base, **config) could not rebuild `adapter`, or None."""
    cls = adapters.ADAPTER_TYPES.get(adapter.method)
    if cls is None:
        return f"{name}: method {adapter.method!r} is not in specops.adapters.ADAPTER_TYPES"
    params = list(inspect.signature(cls).parameters.values())[1:]  # after `base`
    missing = [p.name for p in params if p.default is p.empty and p.name not in config]
    if missing:  # ZipLoRA: its two frozen LoRAs are inputs, not options
        return f"{name}: a {adapter.method!r} adapter needs {missing} to be rebuilt, which config() cannot hold"
    why = _config_problem(config, adapter.base)
    return f"{name}: {why}" if why else None


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
    named module exists and is an nn.Linear, an nn.Conv2d or an unfused adapter of the same method; its base
    weight matches the saved fingerprint; every tensor matches, in name, shape and dtype, the
    adapter that make_adapter(method, base, **config) builds. Then plain layers are replaced by new
    adapters and existing adapters with the same config are loaded in place (so optimizers keep their
    parameters); an existing adapter with another config is replaced. The round trip is bitwise.
    """
    tensors, metadata = _read(path)
    modules = _adapter_entries(metadata, path)
    listed: dict[str, str] = {}
    for name, entry in modules.items():
        for key in entry["tensors"]:
            other = listed.setdefault(f"{name}.{key}", name)
            if other != name:  # module "a" tensor "b.c" and module "a.b" tensor "c"
                raise ValueError(f"{path}: tensor {name + '.' + key!r} is listed by modules {other!r} and {name!r}")
    if listed.keys() != tensors.keys():
        raise ValueError(f"{path}: tensors {sorted(tensors.keys() ^ listed.keys())[:3]} are not the ones the metadata lists")

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
        raise ValueError(f"{path}: format version {str(metadata.get(_VERSION_KEY))[:20]!r}; "
                         f"this specops reads {FORMAT_VERSION!r}")
    if _MODULES_KEY not in metadata:
        raise ValueError(f"{path}: metadata {_MODULES_KEY!r} missing")
    modules = _json(metadata[_MODULES_KEY], f"{path}: metadata {_MODULES_KEY!r}")
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{path}: metadata {_MODULES_KEY!r} names no module")
    for name, entry in modules.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("method"), str)
                and isinstance(entry.get("config"), dict) and isinstance(entry.get("base"), dict)
                and isinstance(entry.get("tensors"), list) and all(isinstance(k, str) for k in entry["tensors"])):
            raise ValueError(f"{path}: module {name!r}: metadata lacks method, config, base or tensors")
        seen: set[str] = set()
        for key in entry["tensors"]:
            if key in seen:
                raise ValueError(f"{path}: module {name!r}: metadata lists tensor {key!r} twice")
            seen.add(key)
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
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        base = module
    else:
        raise ValueError(f"{where}: is a {type(module).__name__}, expected an nn.Linear, an nn.Conv2d or a specops adapter")
    why = _fingerprint_mismatch(entry["base"], base.weight)
    if why:
        raise ValueError(f"{where}: saved for another base model: {why}")
    # compared as JSON, the form the file holds it in (tuples become lists)
    if isinstance(module, adapters.Adapter) and json.loads(json.dumps(module.config())) == config:
        target, new = module, False
    else:
        why = _config_problem(config, base)
        if why:
            raise ValueError(f"{where}: {why}")
        for p in base.parameters():
            flags.setdefault(p, p.requires_grad)
        try:
            target, new = adapters.make_adapter(method, base, **config), True
        except Exception as e:
            raise ValueError(f"{where}: make_adapter({method!r}, base, **{str(config)[:200]}) failed: {e}") from e
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


def _conv_lora_of(adapter: nn.Module, rank: int | None) -> tuple[dict[str, Tensor], float]:
    """LoCon tensors {lora_down.weight, lora_up.weight[, lora_mid.weight]} of a conv adapter, every
    scale folded into lora_up, and the relative error ||ΔW - ΔW_file||_F / ||ΔW||_F.

    Exact factors when the adapter has them (LoRA.conv_factors) and they fit `rank`; else the
    truncated SVD of ΔW as an (out, in·kh·kw) matrix in float64, split evenly, as a plain LoCon.
    """
    with torch.no_grad():
        delta = adapter.delta_weight().detach()
        factors = adapter.conv_factors() if hasattr(adapter, "conv_factors") else None
        if factors is not None and (rank is None or factors[1].shape[0] <= rank):
            B, A, *mid = (t.detach() for t in factors)
        else:
            U, S, Vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
            r = S.numel() if rank is None else min(rank, S.numel())
            root = S[:r].sqrt()
            B = (U[:, :r] * root).to(delta.dtype)
            A = (root[:, None] * Vh[:r]).view(r, *delta.shape[1:]).to(delta.dtype)
            mid = []
        B64, A64 = B.double(), A.double()
        if mid:
            rebuilt = torch.einsum("op,pqhw,qi->oihw", B64, mid[0].double(), A64)
        else:
            rebuilt = (B64 @ A64.flatten(1)).view(delta.shape)
        d64 = delta.double()
        norm = d64.norm().item()
        err = (d64 - rebuilt).norm().item()
        parts = {"lora_up.weight": B[:, :, None, None], "lora_down.weight": A[:, :, None, None] if mid else A}
        if mid:
            parts["lora_mid.weight"] = mid[0]
        return parts, (err / norm if norm > 0 else err)


def _lycoris_parts(adapter: nn.Module) -> tuple[dict[str, Tensor], float]:
    """LyCORIS's own tensors for a LoHa / LoKr adapter (Linear or conv), every scale folded into the
    first factor and alpha = r, so LyCORIS's alpha / r is 1 (it ignores alpha when both LoKr factors
    are dense); and the relative error of the written ΔW, rebuilt in float64 by LyCORIS's formulas.
    LoKr keeps a factored form only where LyCORIS rebuilds it from the file (a Linear's W2 with
    rank < max(m2, n2) / 2; a factored W1 only with such a W2 of the same rank, rank < max(m1, n1) / 2);
    elsewhere, and on every conv, it writes the dense products. Tucker files hold the out factors
    as (r, out)."""
    with torch.no_grad():
        delta = adapter._delta(adapter.scale).detach()  # with DoRA: ΔW' at scale 1 (export checks the scale)
        shape = tuple(delta.shape)
        kernel = shape[2:]
        if adapter.method == "loha":
            c = adapter.scale * adapter.alpha / adapter.rank
            tucker = adapter.T1 is not None
            B1 = adapter.B1 * c
            parts = {"hada_w1_a": B1.mT if tucker else B1, "hada_w1_b": adapter.A1,
                     "hada_w2_a": adapter.B2.mT if tucker else adapter.B2, "hada_w2_b": adapter.A2}
            d = {k: v.double() for k, v in parts.items()}
            if tucker:
                parts.update(hada_t1=adapter.T1, hada_t2=adapter.T2)
                halves = [torch.einsum("pqhw,po,qi->oihw", t.double(), d[f"hada_w{j}_a"], d[f"hada_w{j}_b"])
                          for j, t in ((1, adapter.T1), (2, adapter.T2))]
            else:
                halves = [(d[f"hada_w{j}_a"] @ d[f"hada_w{j}_b"]).reshape(shape) for j in (1, 2)]
            rebuilt = halves[0] * halves[1]
            alpha = adapter.rank
        else:
            c = adapter.scale * adapter._coef
            W1, W2 = adapter.kron_factors()
            m2, n2 = W2.shape[:2]
            m1, n1 = W1.shape
            # LyCORIS 4.1.3 infers a conv's split from lokr_w2_b's flattened (r, n2·kh·kw) width (or, for
            # Tucker, from lokr_w2_a's (r, m2)) and cannot rebuild factored conv files, not even its own
            w2 = not adapter.is_conv and adapter.rank is not None and adapter.rank < max(m2, n2) / 2
            w1 = w2 and adapter.w1_rank == adapter.rank and adapter.w1_rank < max(m1, n1) / 2
            parts = {"lokr_w1_a": adapter.B1 * c, "lokr_w1_b": adapter.A1} if w1 else {"lokr_w1": W1}
            tucker = w2 and adapter.T2 is not None
            if tucker:
                parts.update(lokr_w2_a=adapter.B2.mT, lokr_w2_b=adapter.A2, lokr_t2=adapter.T2)
            elif w2:
                parts.update(lokr_w2_a=adapter.B2, lokr_w2_b=adapter.A2)
            else:
                parts["lokr_w2"] = W2
            d = {k: v.double() for k, v in parts.items()}
            w1_64 = d["lokr_w1_a"] @ d["lokr_w1_b"] if w1 else d["lokr_w1"]
            if tucker:
                w2_64 = torch.einsum("pqhw,pb,qd->bdhw", d["lokr_t2"], d["lokr_w2_a"], d["lokr_w2_b"])
            elif w2:
                w2_64 = (d["lokr_w2_a"] @ d["lokr_w2_b"]).reshape(m2, n2, *kernel)
            else:
                w2_64 = d["lokr_w2"]
            rebuilt = torch.kron(w1_64.reshape(m1, n1, *(1,) * len(kernel)), w2_64.contiguous())
            alpha = adapter.rank if w2 else 1
        parts = {k: v.detach().contiguous() for k, v in parts.items()}
        d64 = delta.double()
        norm = d64.norm().item()
        err = (d64 - rebuilt).norm().item()
        return {**parts, **_dora_scale(adapter), "alpha": alpha}, (err / norm if norm > 0 else err)


def _dora_scale(adapter: nn.Module) -> dict[str, Tensor]:
    """{"dora_scale": m in LyCORIS's (out, 1[, 1, 1]) or (1, in[, 1, 1]) shape}, or {} without DoRA."""
    m = adapter.magnitude
    if m is None:
        return {}
    return {"dora_scale": m.detach().reshape(adapters._axis_shape(adapter.base.weight, adapter.wd_on_out)).contiguous()}


def _dora_lora_parts(adapter: nn.Module) -> tuple[dict[str, Tensor], float]:
    """LoCon tensors of a DoRA LoRA: its own factors with alpha/rank folded into lora_up (scale 1),
    dora_scale; and the relative error of the written ΔW' against the adapter's, in float64."""
    with torch.no_grad():
        delta = adapter._delta(1.0).detach()
        B, A, mid = adapter.B * (adapter.alpha / adapter.rank), adapter.A.detach(), adapter.mid
        if adapter.is_conv:
            parts = {"lora_up.weight": B[:, :, None, None], "lora_down.weight": A[:, :, None, None] if mid is not None else A}
            if mid is not None:
                parts["lora_mid.weight"] = mid.detach()
                rebuilt = torch.einsum("op,pqhw,qi->oihw", B.double(), mid.double(), A.double())
            else:
                rebuilt = (B.double() @ A.double().flatten(1)).view(delta.shape)
        else:
            parts = {"lora_down.weight": A, "lora_up.weight": B}
            rebuilt = B.double() @ A.double()
        d64 = delta.double()
        norm = d64.norm().item()
        err = (d64 - rebuilt).norm().item()
        parts = {k: v.detach().contiguous() for k, v in parts.items()}
        return {**parts, **_dora_scale(adapter)}, (err / norm if norm > 0 else err)


def _lycoris_oft_parts(adapter: nn.Module) -> tuple[dict[str, Tensor], float] | None:
    """LyCORIS's diag-oft tensors for an OFT adapter (Linear or conv), or None where LyCORIS cannot
    hold it: side "input", scale ≠ 1 (s (W - W0) is not a rotation), or blocks of size p with
    p² > out (LyCORIS rebuilds a file's blocks from p by factorization(out, p), which puts the
    smaller factor on the block size). oft_blocks = -Q/2 (exact), rescale g as (out, 1[, 1, 1]),
    alpha the constraint; and the relative error of the written ΔW, rebuilt in float64 by
    LyCORIS's formula W = diag(g) R^T W0, R = (I + q)(I - q)^-1, q = B - B^T norm-clipped."""
    b, p, _ = adapter.Q.shape
    if adapter.side != "output" or adapter.scale != 1.0 or p * p > adapter.out_features:
        return None
    with torch.no_grad():
        delta = adapter.delta_weight().detach()
        W0 = adapter._w0().double()
        blocks = (adapter.Q.detach() * -0.5).contiguous()
        parts = {"oft_blocks": blocks}
        g = adapter.g
        if g is not None:
            parts["rescale"] = g.detach().reshape(-1, *(1,) * (W0.dim() - 1)).clone()
        q = blocks.double() - blocks.double().mT
        bound = adapter.constraint * adapter.out_features
        q_norm = q.norm() + 1e-8
        if bound > 0 and q_norm > bound:
            q = q * bound / q_norm
        Rt = cayley_reference(-2.0 * q)  # R^T = (I + q)^-1 (I - q), solved one block at a time
        W = torch.einsum("bij,bjc->bic", Rt, W0.flatten(1).unflatten(0, (b, p))).reshape(W0.shape)
        if g is not None:
            W = parts["rescale"].double() * W
        err = (delta.double() - (W - W0)).norm().item()
        norm = delta.double().norm().item()
        return {**parts, "alpha": adapter.constraint}, (err / norm if norm > 0 else err)


def _lycoris_boft_parts(adapter: nn.Module) -> tuple[dict[str, Tensor], float] | None:
    """LyCORIS's BOFT tensors for a BOFT adapter, or None where LyCORIS cannot rebuild it: side "input",
    scale ≠ 1, or not its full butterfly (LyCORIS rebuilds a file's structure from out and the block size
    b alone: out / b blocks, a power of two, and log2(out / b) + 1 stages). oft_blocks = Q / 2 (exact),
    rescale g as (out, 1[, 1, 1]), alpha the constraint; and the relative error of the written ΔW, rebuilt
    in float64 with LyCORIS's stage blocks (I + q)(I - q)^-1, q = B - B^T norm-clipped."""
    m, k, b, _ = adapter.Q.shape
    if adapter.side != "output" or adapter.scale != 1.0 or k & (k - 1) or m != adapters.boft_max_stages(k * b, b):
        return None
    with torch.no_grad():
        delta = adapter.delta_weight().detach()
        W0 = adapter._w0().double()
        parts = {"oft_blocks": (adapter.Q.detach() * 0.5).contiguous()}
        if adapter.g is not None:
            parts["rescale"] = adapter.g.detach().reshape(-1, *(1,) * (W0.dim() - 1)).clone()
        q = parts["oft_blocks"].double() - parts["oft_blocks"].double().mT
        bound = adapter.constraint * adapter.out_features
        q_norm = q.norm() + 1e-8
        if bound > 0 and q_norm > bound:
            q = q * bound / q_norm
        blocks = cayley_reference(2.0 * q.flatten(0, 1)).view(q.shape)  # (I - q)^-1 (I + q), block by block
        W = adapters.butterfly(W0.flatten(1), blocks, adapters.butterfly_gathers(k * b, b, m, W0.device)).view(W0.shape)
        if adapter.g is not None:
            W = parts["rescale"].double() * W
        err = (delta.double() - (W - W0)).norm().item()
        norm = delta.double().norm().item()
        return {**parts, "alpha": adapter.constraint}, (err / norm if norm > 0 else err)


def _is_flat_clip(root: nn.Module) -> bool:
    # transformers >= 5 builds CLIPTextModel without its .text_model level (CLIPTextModelWithProjection keeps it)
    return not hasattr(root, "text_model") and hasattr(root, "embeddings") and hasattr(root, "encoder")


def _file_name(root: nn.Module, name: str) -> str:
    """The name LoRA files use for module `name` of `root`: a flattened CLIP text encoder's layers
    keep their "text_model." names there, as kohya, diffusers and every other reader expect."""
    return f"text_model.{name}" if _is_flat_clip(root) else name


def export_lora(model, path, format: str = "diffusers", rank: int | None = None, names: str = "diffusers") -> dict:
    """Write the ΔW of every adapter in `model` as a LoRA file; returns an error report.

    format "diffusers": keys "<component>.<module>.lora_A.weight" (A, (r, in)) and ".lora_B.weight"
        (B, (out, r)), components "unet", "text_encoder", "text_encoder_2" (and "controlnet"); diffusers' metadata says
        lora_alpha = r for every module, so diffusers/PEFT apply exactly B A.
    format "kohya": keys "lora_unet_<module, '.' -> '_'>.lora_down.weight" (A), ".lora_up.weight"
        (B), ".alpha" (= r, scale 1); "lora_te1_" / "lora_te2_" for the two text encoders. A conv
        adapter is written as LoCon (kohya / LyCORIS): lora_down (r, in, kh, kw) and lora_up
        (out, r, 1, 1), or for a Tucker LoRA lora_down (r, in, 1, 1), lora_mid (r, r, kh, kw) and
        lora_up; "diffusers" writes a plain LoCon as PEFT's conv LoRA (lora_A (r, in, kh, kw),
        lora_B (out, r, 1, 1)) and refuses a Tucker one.
    format "lycoris": kohya's, except that with rank None LoHa and LoKr adapters keep their own
        algorithm in LyCORIS's keys (hada_w1_a, ..., lokr_w1, lokr_w2_a, ..., alpha; see
        lycoris_adapters), every scale folded into the first factor; their report rank is the
        alpha written (r, or 1 for a dense LoKr, whose scale LyCORIS fixes at 1). "kohya" writes
        them as LoRA factors of their ΔW, which every kohya reader takes. An OFT adapter with
        side="output" at scale 1 whose block size p has p² <= out (the files LyCORIS rebuilds)
        keeps LyCORIS's diag-oft keys (oft_blocks = -Q/2, rescale, alpha = constraint; see
        lycoris_adapters), its report rank the block count; any other OFT is written as LoRA factors.
        Likewise a BOFT adapter with side="output" at scale 1 that is LyCORIS's full butterfly (out / b
        blocks, a power of two, all log2(out / b) + 1 stages) keeps LyCORIS's BOFT keys (4-D
        oft_blocks = Q/2, rescale, alpha = constraint), its report rank the block count per stage.
    DoRA adapters (dora=True; see specops.adapters.Adapter): "lycoris" (LoRA, LoHa, LoKr) and
        "kohya" (LoRA) write the factors of ΔW' and the magnitude as dora_scale, which LyCORIS
        reloads as its weight_decompose (it reads (out, 1[, 1, 1]), the default wd_on_out=True,
        only); such an adapter must be at scale 1, since a file's DoRA scale is the reader's
        multiplier. Otherwise (diffusers, LoHa / LoKr in kohya, or an int rank) W' − W0 is written
        as plain LoRA factors, like any other ΔW.
    Text-encoder layers are written as "text_model.encoder.layers.{i}..." also from a transformers 5
    CLIPTextModel, whose own module names lack "text_model.". kohya and lycoris files carry kohya's
    metadata: ss_network_module ("networks.lora", or "lycoris.kohya" for a lycoris file) and
    ss_network_args, a JSON object with "algo" (LyCORIS's name of the algorithm written, several
    joined by "+" when the file holds more than one) and "dora_wd": "True" when it holds DoRA.
    names: "diffusers" (UNet modules as diffusers names them) or "sgm": Stability's block names
        that kohya's SDXL trainer writes (input_blocks_4_1_..., middle_block_0_in_layers_2, out_2;
        kohya and lycoris formats only). load_lora / lycoris_adapters read both.
    rank: None keeps LoRA factors as they are and exports other methods at full rank min(out, in)
        (exact up to rounding); an int truncates every ΔW of higher rank by SVD (a conv's as the
        (out, in·kh·kw) matrix, written as a plain LoCon).
    A layer whose exact factors have rank 0 (an AdaLoRA layer that kept no triplet) gets no entry.
    Report: {"format", "rank": {name: r}, "rel_error": {name: ||ΔW - B A||/||ΔW||}, "max_rel_error"},
    names as in `model` ("unet.<module>", ...).
    """
    if format not in ("diffusers", "kohya", "lycoris"):
        raise ValueError(f"format: expected 'diffusers', 'kohya' or 'lycoris', got {format!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: expected None or a positive int, got {rank!r}")
    if names not in ("diffusers", "sgm") or (names == "sgm" and format == "diffusers"):
        raise ValueError(f"names: expected 'diffusers', or 'sgm' with format 'kohya' / 'lycoris', got {names!r} "
                         f"with format {format!r}")
    roots = dict(_components(model, "unet"))
    tensors, ranks, errors, file_ranks, algos, wrote_dora = {}, {}, {}, {}, set(), False
    for name, adapter in _named_adapters(model, "unet"):
        component, _, module = name.partition(".")
        if format != "diffusers" and component not in _KOHYA_PREFIX:
            raise ValueError(f"format {format!r}: no kohya prefix for component {component!r}; "
                             f"expected one of {sorted(_KOHYA_PREFIX)}")
        dora = adapter.magnitude is not None and rank is None and (
            format == "lycoris" or (format == "kohya" and adapter.method == "lora"))
        if dora and adapter.scale != 1.0:
            raise ValueError(f"format {format!r}: {name} is a DoRA adapter at scale {adapter.scale:g}; a file holds "
                             "DoRA at scale 1 (its multiplier is the reader's): set scale = 1.0, or pass rank= to "
                             "write W' - W0 as plain LoRA factors")
        rotation = {"oft": _lycoris_oft_parts, "boft": _lycoris_boft_parts}.get(adapter.method)
        oft = rotation(adapter) if format == "lycoris" and rank is None and rotation is not None else None
        if dora and adapter.method == "lora":
            parts, errors[name] = _dora_lora_parts(adapter)
        elif oft is not None:
            parts, errors[name] = oft
            algos.add("diag-oft" if adapter.method == "oft" else "boft")
        elif format == "lycoris" and rank is None and adapter.method in ("loha", "lokr"):
            parts, errors[name] = _lycoris_parts(adapter)
            algos.add(adapter.method)
        elif adapter.is_conv:
            parts, errors[name] = _conv_lora_of(adapter, rank)
            if format == "diffusers" and "lora_mid.weight" in parts:
                raise ValueError(f"format {format!r}: {name} is a Tucker LoCon, which PEFT / diffusers cannot hold; "
                                 "write it with format='kohya', or as a plain LoCon with rank=")
        else:
            B, A, errors[name] = _lora_of(adapter, rank)
            parts = {"lora_down.weight": A, "lora_up.weight": B}
        if "lora_down.weight" in parts and parts["lora_down.weight"].shape[0] == 0:
            ranks[name] = 0  # ΔW = 0 exactly (an AdaLoRA layer that kept no triplet): no entry
            continue
        if "lora_down.weight" in parts:
            algos.add("lora")
        wrote_dora = wrote_dora or "dora_scale" in parts
        alpha = parts.pop("alpha", None)
        if oft is not None:  # (B)OFT's alpha is its constraint; report the block count
            ranks[name] = parts["oft_blocks"].shape[-3]
        else:
            ranks[name] = parts["lora_down.weight"].shape[0] if alpha is None else int(alpha)
        module = _file_name(roots[component], module)
        file_ranks[(component, module)] = ranks[name]
        if format == "diffusers":
            tensors[f"{component}.{module}.lora_A.weight"] = parts["lora_down.weight"]
            tensors[f"{component}.{module}.lora_B.weight"] = parts["lora_up.weight"]
        else:
            underscored = _to_sgm(module, roots[component]) if names == "sgm" and component == "unet" else module.replace(".", "_")
            key = f"{_KOHYA_PREFIX[component]}_{underscored}"
            if f"{key}.alpha" in tensors:
                raise ValueError(f"format {format!r}: two modules map to the kohya name {key!r}")
            tensors.update({f"{key}.{role}": t for role, t in parts.items()})
            tensors[f"{key}.alpha"] = torch.tensor(float(ranks[name] if alpha is None else alpha))
    if not ranks:
        raise ValueError(f"export_lora: no specops adapter found in {type(model).__name__}")
    metadata = {"format": "pt", "specops.export": format}
    if format == "diffusers":
        metadata[_DIFFUSERS_METADATA_KEY] = json.dumps(_diffusers_config(file_ranks), sort_keys=True)
    else:  # kohya's trainers record the network module and its arguments; "algo" is LyCORIS's
        metadata["ss_network_module"] = _KOHYA_MODULE[format]
        metadata["ss_network_args"] = json.dumps({"algo": "+".join(sorted(algos)), **({"dora_wd": "True"} if wrote_dora else {})})
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

# \Z, not $: "$" also matches before a final newline, so "<key>.alpha\n" would pass for "<key>.alpha"
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\."
                        r"(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)\Z")
_PEFT_KEY = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight\Z")          # lora_A.weight, lora_A.<adapter>.weight
_OLD_KEY = re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight\Z")  # LoRACompatibleLinear era
_PROC_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight\Z")  # attn processors
_OLD_TE_KEY = re.compile(r"^(.+\.self_attn)\.to_(q|k|v|out)_lora\.(down|up)\.weight\Z")  # their text-encoder twin
_ALPHA_KEY = re.compile(r"^(.+)\.alpha\Z")
_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROLE = {"lora_down.weight": "A", "lora_up.weight": "B", "lora_mid.weight": "mid", "alpha": "alpha", "A": "A", "B": "B",
         "down": "A", "up": "B"}

# Name segments of the SDXL attention and CLIP text-encoder Linear layers, for splitting kohya's
# underscore names where no model is given. Longest match first, so "proj_in" beats "proj".
_WORDS = sorted(["down_blocks", "up_blocks", "mid_block", "attentions", "transformer_blocks", "attn1", "attn2",
                 "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "proj_in", "proj_out",
                 "resnets", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers", "upsamplers", "conv",
                 "conv_in", "conv_out", "time_embedding", "add_embedding", "linear_1", "linear_2",
                 "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                 "mlp", "fc1", "fc2", "text_projection"], key=len, reverse=True)
# Every Linear and Conv2d of an SDXL UNet (LyCORIS's "full" set), and of a CLIP text encoder
_UNET_NAME = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.(proj_in|proj_out|"
                        r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
                        r"|(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
                        r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
                        r"|conv_in|conv_out|(time_embedding|add_embedding)\.linear_[12]")
_TEXT_NAME = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection")

# Stability's (SGM) UNet names, which kohya SDXL files use (layers_per_block = 2). Input block
# 3i + j + 1 holds down_blocks.i's j-th resnet (sub-module 0) and transformer (1), 3i + 3 its
# downsampler ("0.op"), 0 the input conv; output block 3i + j holds up_blocks.i's j-th resnet (0)
# and transformer (1), and the last of each up block its upsampler (sub-module 2, or 1 in a block
# without transformers); the middle block is resnet 0, transformer, resnet 1. block_of() numbers
# the same blocks for block-weight lists.
_SGM = [  # (SGM block, its diffusers block, layers per block, block number -> (i, j), (i, j) -> number)
    ("input_blocks", "down_blocks", 2, lambda n: divmod(n - 1, 3), lambda i, j: 3 * i + j + 1),
    ("output_blocks", "up_blocks", 3, lambda n: divmod(n, 3), lambda i, j: 3 * i + j),
]
_SGM_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
            "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
            "label_emb_0_2": "add_embedding_linear_2"}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_KEY = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)\Z")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)\Z")
_DIFFUSERS_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(?:(?:resnets|attentions)\.(\d+)|downsamplers|upsamplers)"
                              r"|mid_block|conv_in")


def block_of(name: str) -> str | None:
    """The SGM block holding a diffusers UNet module, numbered as SDXL block-weight lists do:
    "IN00" (conv_in) .. "IN08", "M00", "OUT00" .. "OUT08"; None outside them (the time and add
    embeddings, conv_out)."""
    m = _DIFFUSERS_BLOCK.match(name)
    if m is None or name[m.end():m.end() + 1] not in ("", "."):
        return None
    if m.group(0) == "conv_in":
        return "IN00"
    if m.group(0) == "mid_block":
        return "M00"
    side, i = m.group(1), int(m.group(2))
    _, _, layers, _, join = next(t for t in _SGM if t[1] == side)
    # a sampler closes its block: the input side's own slot after the layers, the output side's last layer
    j = int(m.group(3)) if m.group(3) is not None else (layers if side == "down_blocks" else layers - 1)
    return f"{'IN' if side == 'down_blocks' else 'OUT'}{join(i, j):02d}"


_NUMBER = re.compile(r"\d+(?=_|\Z)")


def _split_words(underscored: str) -> str | None:
    """'down_blocks_1_attentions_0_..._to_out_0' -> 'down_blocks.1.attentions.0....to_out.0', or None.

    Walks an index instead of slicing, so that a megabyte-long key costs linear time."""
    parts, pos, end = [], 0, len(underscored)
    while pos < end:
        m = _NUMBER.match(underscored, pos)
        word = m.group(0) if m else next((w for w in _WORDS if underscored.startswith(w, pos)
                                          and underscored[pos + len(w):pos + len(w) + 1] in ("", "_")), None)
        if word is None:
            return None
        parts.append(word)
        pos += len(word) + 1
    return ".".join(parts) if pos == end + 1 else None  # not "" nor a trailing "_"


def _sgm_resnet(prefix: str, part: str) -> str:
    if part not in _SGM_RESNET:
        raise ValueError(f"{part!r} is not a resnet layer (expected one of {sorted(_SGM_RESNET)})")
    return f"{prefix}_{_SGM_RESNET[part]}"


def _to_sgm(name: str, root: nn.Module) -> str:
    """A diffusers UNet module name -> its SGM name, underscored (_from_sgm's inverse); ValueError
    for a name outside SDXL's UNet layout."""
    top = {v.replace("_linear", ".linear"): k for k, v in _SGM_TOP.items()}
    if name in top:
        return top[name]
    resnet = {v: k for k, v in _SGM_RESNET.items()}
    m = re.fullmatch(r"mid_block\.(?:attentions\.0\.(.+)|resnets\.([01])\.(\w+))", name)
    if m and (m.group(1) or m.group(3) in resnet):
        rest = m.group(1).replace(".", "_") if m.group(1) else f"{2 * int(m.group(2))}_{resnet[m.group(3)]}"
        return f"middle_block_1_{rest}" if m.group(1) else f"middle_block_{rest}"
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(?:(resnets|attentions)\.(\d+)\.(.+)|(downsamplers|upsamplers)\.0\.conv)", name)
    if m:
        sgm, _, layers, _, join = next(t for t in _SGM if t[1] == m.group(1))
        i = int(m.group(2))
        if m.group(6) == "downsamplers":
            return f"{sgm}_{join(i, layers)}_0_op"
        if m.group(6) == "upsamplers":  # sub-module 2 after a transformer, else 1
            return f"{sgm}_{join(i, layers - 1)}_{2 if hasattr(root.get_submodule(f'{m.group(1)}.{i}'), 'attentions') else 1}_conv"
        j, rest = int(m.group(4)), m.group(5)
        if m.group(3) == "attentions":
            return f"{sgm}_{join(i, j)}_1_{rest.replace('.', '_')}"
        if rest in resnet:
            return f"{sgm}_{join(i, j)}_0_{resnet[rest]}"
    raise ValueError(f"{name} has no SGM name: not a layer of an SDXL UNet's blocks, embeddings or in/out convs")


def _from_sgm(name: str) -> str:
    """kohya SGM UNet names -> diffusers names (still underscored); other names unchanged."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    m = _SGM_MIDDLE.match(name)
    if m:
        n, rest = int(m.group(1)), m.group(2)
        if n > 2:
            raise ValueError(f"SGM block middle_block_{n} does not exist (0 and 2 are resnets, 1 the transformer)")
        return f"mid_block_attentions_0_{rest}" if n == 1 else _sgm_resnet(f"mid_block_resnets_{n // 2}", rest)
    m = _SGM_KEY.match(name)
    if m is None:
        return name
    sgm, n, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    block, layers, split = next((b, k, f) for s, b, k, f, _ in _SGM if s == sgm)
    i, j = split(n)
    sampler = "downsamplers" if sgm == "input_blocks" else "upsamplers"
    if i < 0:
        raise ValueError(f"SGM block {sgm}_{n}_{sub} is not a layer block")
    if sgm == "input_blocks" and j == layers:  # the downsampler slot
        if sub == 0 and rest == "op":
            return f"{block}_{i}_{sampler}_0_conv"
        raise ValueError(f"SGM block {sgm}_{n} holds no transformer or resnet, only the downsampler {sgm}_{n}_0_op")
    if sub == 0:
        return _sgm_resnet(f"{block}_{i}_resnets_{j}", rest)
    if rest == "conv" and sgm == "output_blocks" and j == layers - 1 and sub in (1, 2):
        return f"{block}_{i}_{sampler}_0_conv"
    if sub == 1:
        return f"{block}_{i}_attentions_{j}_{rest}"
    raise ValueError(f"SGM block {sgm}_{n}_{sub} is not a resnet, transformer or sampler")


def _name_tables(model) -> dict[str, tuple[dict[str, str], dict[str, set[str]], dict[str, tuple[int, ...]]]]:
    """Per component: ({file name or module name: module name}, {that with '.' -> '_': {module names}},
    {module name: weight shape, (out, in) or a conv's (out, in, kh, kw)}) over the component's
    Linear and Conv2d layers and adapters (not the layer inside an adapter)."""
    tables = {}
    for prefix, root in _components(model, "unet"):
        inner = {name + ".base" for name, m in root.named_modules() if isinstance(m, adapters.Adapter)}
        alias, shapes = {}, {}
        for name, m in root.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, adapters.Adapter)) and name not in inner:
                alias[name] = alias[_file_name(root, name)] = name
                shapes[name] = tuple((m.base if isinstance(m, adapters.Adapter) else m).weight.shape)
        under: dict[str, set[str]] = {}
        for key, name in alias.items():
            under.setdefault(key.replace(".", "_"), set()).add(name)
        tables[prefix] = (alias, under, shapes)
    return tables


def _kohya_name(component: str, underscored: str, tables: dict, key: str, path) -> str:
    """The module name of a kohya key's underscored module part (the model's, or SDXL's grammar)."""
    try:
        underscored = _from_sgm(underscored) if component == "unet" else underscored
    except ValueError as e:
        raise ValueError(f"load_lora: {path}: key {key!r}: {e}") from e
    if component in tables:
        found = tables[component][1].get(underscored, set())
        if len(found) != 1:
            why = "no Linear or Conv2d layer of the model" if not found else f"ambiguous between {sorted(found)}"
            raise ValueError(f"load_lora: {path}: key {key!r} maps to {why} ({component}: {underscored})")
        return next(iter(found))
    name = _split_words(underscored)
    grammar = _UNET_NAME if component == "unet" else _TEXT_NAME
    if name is None or not grammar.fullmatch(name):
        raise ValueError(f"load_lora: {path}: key {key!r} is not an SDXL UNet / text-encoder layer name; "
                         "pass model= to resolve it by the model's module names")
    return name


def _parse_key(key: str, tables: dict, path) -> tuple[str, str, str, bool]:
    """(component, module name, role A/B/alpha, is kohya) of one LoRA key; ValueError if unknown.

    Kohya names come back resolved (by `tables` or the grammar), diffusers names as in the file.
    """
    m = _KOHYA_KEY.match(key)
    if m:
        if m.group(1) == _LYCORIS_PREFIX:
            component = next(iter(tables)) if len(tables) == 1 else "unet"
        else:
            component = _KOHYA_COMPONENT[m.group(1)]
        return component, _kohya_name(component, m.group(2), tables, key, path), _ROLE[m.group(3)], True
    name = key.removeprefix("base_model.model.")
    for pattern in (_PEFT_KEY, _OLD_KEY, _PROC_KEY, _OLD_TE_KEY, _ALPHA_KEY):
        m = pattern.match(name)
        if m:
            break
    else:
        if _lycoris_match(key):
            raise ValueError(f"load_lora: {path}: key {key!r} is a LyCORIS LoHa / LoKr / diag-OFT key, not a LoRA one; "
                             "lycoris_adapters(path, model) builds those adapters")
        raise ValueError(f"load_lora: {path}: key {key!r} is not a LoRA key this reader knows "
                         "(lora_A/lora_B, lora.down/up, lora_down/lora_up/lora_mid/alpha)")
    if pattern is _PROC_KEY:
        module, role = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else ""), _ROLE[m.group(3)]
    elif pattern is _OLD_TE_KEY:
        module, role = f"{m.group(1)}.{m.group(2)}_proj", _ROLE[m.group(3)]
    else:
        module, role = m.group(1), ("alpha" if pattern is _ALPHA_KEY else _ROLE[m.group(2)])
    head, _, rest = module.partition(".")
    component, module = (head, rest) if head in _DIFFUSERS_COMPONENTS and rest else ("unet", module)
    return component, module, role, False


_REGEX_SYNTAX = re.compile(r"[*+?()\[\]{}|$^\\]")


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank/alpha_pattern rule: the first key naming the end of the module name at a dot
    ('^' first: the whole name). PEFT runs keys as regular expressions; diffusers and export_lora
    write module names, plain or re.escape'd, and only those are read: compared as text, since a
    file's own regular expression could backtrack for ever."""
    for key, value in patterns.items():
        whole = key.startswith("^")
        if _REGEX_SYNTAX.search(re.sub(r"\\.", "", key[whole:])):
            raise ValueError(f"{where}: alpha_pattern key {key[:100]!r} is a regular expression; "
                             "only module names (plain or re.escape'd) are supported")
        name = re.sub(r"\\(.)", r"\1", key[whole:])
        if module == name or (not whole and module.endswith("." + name)):
            return value
    return default


def load_lora(path, model=None) -> dict[str, tuple[Tensor, ...]]:
    """Read a LoRA file into {"<component>.<module>": (B, A)} with ΔW = B A (every scale folded into B).

    Reads diffusers/PEFT keys (lora_A/lora_B, an optional "base_model.model." prefix, and diffusers'
    lora_alpha metadata), older diffusers keys (.lora.down/.lora.up, .processor.to_q_lora.down) and
    kohya keys (lora_unet_/lora_te1_/lora_te2_, lora_down/lora_up/alpha, scale alpha/r), including
    kohya SDXL files with Stability's block names (input_blocks_4_1_... -> down_blocks.1.attentions.0...)
    and LyCORIS's create_lycoris files ("lycoris_" keys: the model's only component, else the UNet).
    Components: "unet", "text_encoder", "text_encoder_2", and in diffusers keys "controlnet" (unprefixed
    diffusers keys count as unet).
    Conv layers (LoCon): lora_down (r, in, kh, kw), lora_up (out, r, 1, 1) — PEFT / diffusers name
    them lora_A / lora_B —, or, kohya / LyCORIS only, Tucker lora_down (r, in, 1, 1), lora_mid
    (r, r, kh, kw), lora_up; the entry
    is specops.adapters.LoRA's init form, every scale folded into B (out, r):
        (B, A)       A = lora_down (r, in, kh, kw):   ΔW[o, i] = Σ_r B[o, r] A[r, i]
        (B, A, mid)  A = lora_down (r, in) as a matrix:  ΔW[o, i] = Σ_{p,q} B[o, p] mid[p, q] A[q, i]
    model: None, an nn.Module (the UNet) or a mapping {component: module}. Kohya's underscored names
        are resolved by the model's module names (Linear and Conv2d layers) for the components it
        has, else by the SDXL grammar of attention and text-encoder layers; with a model, every
        name must exist in it.
    A key that cannot be mapped, an incomplete pair, factors
    that are not float16, bfloat16, float32 or float64, or (with a model) factors of another shape
    than the layer raise ValueError, and so does a DoRA magnitude (dora_scale), which plain factors
    cannot hold: sdxl.apply_lora(model, path) and lycoris_adapters(path, model) read those files.
    """
    tensors, metadata = _read(path)
    dora = [k for k in tensors if _is_dora_key(k)]
    if dora:
        raise ValueError(f"load_lora: {path}: key {dora[0]!r} is a DoRA magnitude (dora_scale), which plain (B, A) "
                         "factors cannot hold; read the file with sdxl.apply_lora(model, path) or "
                         "lora_io.lycoris_adapters(path, model), which build DoRA adapters")
    return _lora_entries(tensors, metadata, path, model)


def _lora_entries(tensors: dict[str, Tensor], metadata: dict[str, str], path, model,
                  tables: dict | None = None) -> dict[str, tuple[Tensor, ...]]:
    """load_lora on a file's tensors and metadata (`tables`: the model's _name_tables, if known)."""
    if tables is None:
        tables = _name_tables(model) if model is not None else {}
    what = f"load_lora: {path}: metadata {_DIFFUSERS_METADATA_KEY!r}"
    peft_config = _json(metadata.get(_DIFFUSERS_METADATA_KEY) or "{}", what)
    if not isinstance(peft_config, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(peft_config).__name__}")
    groups: dict[tuple[str, str, bool], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        component, module, role, is_kohya = _parse_key(key, tables, path)
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
        A, B, mid = parts["A"], parts["B"], parts.get("mid")
        if any(t.dtype not in _FACTOR_DTYPES for t in (A, B) + (() if mid is None else (mid,))):
            raise ValueError(f"{where}: A is {A.dtype}, B is {B.dtype}{'' if mid is None else f', mid is {mid.dtype}'}; "
                             "LoRA factors are float16, bfloat16, float32 or float64")
        conv = A.ndim == 4 or B.ndim == 4 or mid is not None
        if conv:
            B, A, kernel = _conv_parts(where, A, B, mid)
        elif A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{where}: A {tuple(A.shape)} / B {tuple(B.shape)} are not matrices")
        r = A.shape[0]
        if B.shape[1] != r or r == 0:
            raise ValueError(f"{where}: A is {tuple(A.shape)} but B is {tuple(B.shape)}; ranks differ or are 0")
        scale = _scale(where, parts, r, None if is_kohya else peft_config, component, module)
        if component in tables:
            if not is_kohya:
                if module not in tables[component][0]:
                    raise ValueError(f"{where}: the model's {component} has no Linear or Conv2d layer {module!r}")
                module = tables[component][0][module]
            shape = tables[component][2][module]
            if conv and (B.shape[0], A.shape[1], *kernel) != shape:
                raise ValueError(f"{where}: the conv LoRA's ΔW is (out, in, kh, kw) = {(B.shape[0], A.shape[1], *kernel)}, "
                                 f"the model's {component}.{module} has weight shape {shape}")
            if not conv and (B.shape[0], A.shape[1]) != shape:
                raise ValueError(f"{where}: B A is {(B.shape[0], A.shape[1])}, the model's {component}.{module} "
                                 f"is (out, in) = {shape}")
        name = f"{component}.{module}"
        if name in out:
            raise ValueError(f"{where}: a second entry for {name}")
        B = _fold(B, scale)
        if not _finite(B):
            raise ValueError(f"{where}: B times its scale {scale:g} overflows {B.dtype}")
        out[name] = (B, A) if mid is None else (B, A, mid)
    return out


def _conv_parts(where: str, A: Tensor, B: Tensor, mid: Tensor | None) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(B as an (out, r) matrix, A in LoRA's init form, the kernel (kh, kw)) of a LoCon entry:
    lora_down A (r, in, kh, kw) or, with a Tucker core mid (r, r, kh, kw), A (r, in, 1, 1);
    lora_up B (out, r, 1, 1)."""
    if B.ndim != 4 or tuple(B.shape[2:]) != (1, 1):
        raise ValueError(f"{where}: lora_up is {tuple(B.shape)}; a conv LoRA's is (out, r, 1, 1)")
    if A.ndim != 4:
        raise ValueError(f"{where}: lora_down is {tuple(A.shape)}; a conv LoRA's is (r, in, kh, kw)")
    if mid is None:
        return B[:, :, 0, 0], A, tuple(A.shape[2:])
    r = A.shape[0]
    kernel = tuple(mid.shape[2:])
    if tuple(A.shape[2:]) != (1, 1) or mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r) or kernel == (1, 1):
        raise ValueError(f"{where}: lora_down {tuple(A.shape)} / lora_mid {tuple(mid.shape)}; a Tucker conv LoRA "
                         "has lora_down (r, in, 1, 1) and lora_mid (r, r, kh, kw), kh x kw not 1 x 1")
    return B[:, :, 0, 0], A[:, :, 0, 0], kernel


def _scale(where: str, parts: dict, r: int, peft_config: dict | None, component: str, module: str) -> float:
    """The factor ΔW = scale · B A of one LoRA: alpha / r (kohya, network alphas), else PEFT's
    rule on diffusers' metadata (peft_config None: a kohya entry, which has no such metadata)."""
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1 or alpha.dtype == torch.bool:
            raise ValueError(f"{where}: alpha is {alpha.dtype} of shape {tuple(alpha.shape)}, expected a number")
        return alpha.double().item() / r
    if peft_config is None or f"{component}.lora_alpha" not in peft_config:
        return 1.0  # no alpha stated: kohya and diffusers both apply B A as is
    patterns = peft_config.get(f"{component}.alpha_pattern")
    patterns = {} if patterns is None else patterns
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: metadata {component}.alpha_pattern is not a JSON object")
    alpha = _pattern_value(patterns, module, peft_config[f"{component}.lora_alpha"], where)
    rslora = peft_config.get(f"{component}.use_rslora", False)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not isinstance(rslora, bool):
        raise ValueError(f"{where}: metadata lora_alpha {str(alpha)[:40]} / use_rslora {str(rslora)[:40]} "
                         "are not a number / a bool")
    return alpha / (math.sqrt(r) if rslora else r)


def _fold(B: Tensor, scale: float) -> Tensor:
    # one rounding from the exact product, and none at all for scale 1 (round trips stay bitwise)
    return B if scale == 1.0 else (B.double() * scale).to(B.dtype)


# ----------------------------------------------------------------------------- LyCORIS LoHa / LoKr files

# LyCORIS's key families for its LoHa and LoKr modules (kohya or "lycoris_" prefixes, no ".weight"):
# file role -> the specops adapter parameter it fills.
_LOHA_ROLES = {"hada_w1_a": "B1", "hada_w1_b": "A1", "hada_w2_a": "B2", "hada_w2_b": "A2", "hada_t1": "T1",
               "hada_t2": "T2"}
_LOKR_ROLES = {"lokr_w1": "W1", "lokr_w1_a": "B1", "lokr_w1_b": "A1", "lokr_w2": "W2", "lokr_w2_a": "B2", "lokr_w2_b": "A2",
               "lokr_t2": "T2"}
_LYCORIS_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\.(hada_\w+|lokr_\w+|dora_scale|alpha)\Z")


def _is_dora_key(key: str) -> bool:
    return (m := _LYCORIS_KEY.match(key)) is not None and m.group(3) == "dora_scale"


def _dora_plan(where: str, t: Tensor, base: nn.Module) -> tuple[dict, Tensor]:
    """({"dora": True, "wd_on_out": ...}, the magnitude as a vector) of one dora_scale: LyCORIS's
    (out, 1[, 1, 1]) is a norm per output row, (1, in[, 1, 1]) per input column (wd_on_out=False)."""
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{where}: a dora_scale for a {type(base).__name__}; expected an nn.Linear or nn.Conv2d")
    out_f, in_f, *kernel = base.weight.shape
    tail = (1,) * len(kernel)
    on_out, on_in = (out_f, 1, *tail), (1, in_f, *tail)
    if t.dtype not in _FACTOR_DTYPES or tuple(t.shape) not in (on_out, on_in):
        raise ValueError(f"{where}: dora_scale is {t.dtype} of shape {tuple(t.shape)}; expected float16, bfloat16, "
                         f"float32 or float64 of shape {on_out} (a norm per output row) or {on_in} (per input column) "
                         f"for the layer's weight {tuple(base.weight.shape)}")
    wd_on_out = tuple(t.shape) == on_out
    return {"dora": True, "wd_on_out": wd_on_out}, t.flatten()


def _file_alpha(where: str, parts: dict, r: int) -> float:
    """LyCORIS's alpha: the stored number, or r (scale 1) when absent or 0."""
    alpha = parts.get("alpha")
    if alpha is None:
        return float(r)
    if alpha.numel() != 1 or alpha.dtype == torch.bool:
        raise ValueError(f"{where}: alpha is {alpha.dtype} of shape {tuple(alpha.shape)}, expected a number")
    value = alpha.double().item()
    return float(r) if value == 0 else value


def _lycoris_plan(where: str, parts: dict[str, Tensor], base: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    """(method, make_adapter options, {parameter: tensor}) of one LoHa / LoKr module; ValueError
    if its keys, shapes or dtypes do not make that adapter on `base` (an nn.Linear or nn.Conv2d)."""
    roles = set(parts) - {"alpha"}
    method = "loha" if any(r.startswith("hada_") for r in roles) else "lokr"
    known = _LOHA_ROLES if method == "loha" else _LOKR_ROLES
    roles.discard("dora_scale")
    unknown = sorted(roles - set(known))
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not {method} keys specops reads ({sorted(known)}, alpha, "
                         "dora_scale)")
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{where}: a {method} entry for a {type(base).__name__}; expected an nn.Linear or nn.Conv2d")
    for role in roles:
        t = parts[role]
        if t.dtype not in _FACTOR_DTYPES or t.ndim not in (2, 4) or 0 in t.shape:
            raise ValueError(f"{where}: {role} is {t.dtype} of shape {tuple(t.shape)}; expected a non-empty float16, "
                             "bfloat16, float32 or float64 matrix (or a 4-D conv factor)")
    out_f, in_f, *kernel = base.weight.shape
    kernel = tuple(kernel)
    k = math.prod(kernel)
    spatial = any(s != 1 for s in kernel)
    conv = isinstance(base, nn.Conv2d)
    tucker = bool(roles & {"hada_t1", "hada_t2", "lokr_t2"})
    if tucker and not spatial:
        raise ValueError(f"{where}: Tucker cores ({sorted(roles & {'hada_t1', 'hada_t2', 'lokr_t2'})}) need a conv "
                         f"kernel larger than 1x1; the layer's weight is {tuple(base.weight.shape)}")
    if method == "loha":
        need = set(known) if tucker else set(known) - {"hada_t1", "hada_t2"}
        if roles != need:
            raise ValueError(f"{where}: lacks {sorted(need - roles)}")
        r = parts["hada_w1_b"].shape[0]
        if tucker:  # LyCORIS keeps the out factor as (r, out) next to a core
            want = {"hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f), "hada_t1": (r, r, *kernel)}
        else:
            want = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f * k)}
        want.update({key.replace("1", "2"): shape for key, shape in want.items()})
        options = {"rank": r, "alpha": _file_alpha(where, parts, r)}
    else:
        role = {v: k for k, v in known.items()}
        for dense, pair in (("W1", ("B1", "A1")), ("W2", ("B2", "A2"))):
            has = [key for key in (dense, *pair) if role[key] in roles]
            if has not in ([dense], list(pair)):
                raise ValueError(f"{where}: expected {role[dense]} or both {role[pair[0]]} and {role[pair[1]]}, "
                                 f"got {[role[key] for key in has]}")
        if tucker and "lokr_w2" in roles:
            raise ValueError(f"{where}: lokr_t2 is the core of a factored lokr_w2_a / lokr_w2_b, not of lokr_w2")
        W1 = parts.get("lokr_w1")
        m1, n1 = tuple(W1.shape[:2]) if W1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[-1])
        if out_f % m1 or in_f % n1:
            raise ValueError(f"{where}: the first Kronecker factor is {(m1, n1)}, which does not divide the layer's "
                             f"(out, in) = {(out_f, in_f)}")
        m2, n2 = out_f // m1, in_f // n1
        w1_rank = None if W1 is not None else parts["lokr_w1_a"].shape[1]
        rank = None if "lokr_w2" in roles else parts["lokr_w2_b"].shape[0]
        want = {"lokr_w1": (m1, n1), "lokr_w1_a": (m1, w1_rank), "lokr_w1_b": (w1_rank, n1),
                "lokr_w2": (m2, n2, *kernel)}
        if tucker:
            want.update({"lokr_w2_a": (rank, m2), "lokr_w2_b": (rank, n2), "lokr_t2": (rank, rank, *kernel)})
        else:
            want.update({"lokr_w2_a": (m2, rank), "lokr_w2_b": (rank, n2 * k)})
        r = w1_rank if w1_rank is not None else rank
        alpha = None if r is None else _file_alpha(where, parts, r)  # both dense: LyCORIS's scale is 1
        options = {"factor": [m1, n1], "rank": rank, "w1_rank": w1_rank, "alpha": alpha}
    if conv:
        options["tucker"] = tucker
    for key in roles:
        if tuple(parts[key].shape) != want[key]:
            raise ValueError(f"{where}: {key} is {tuple(parts[key].shape)}, expected {want[key]} for the layer's "
                             f"weight {tuple(base.weight.shape)}")
    # Tucker files hold the out factors as (r, out): the adapters' B is (out, r)
    own = {known[key]: (t.mT if tucker and key.endswith("_a") and not key.startswith("lokr_w1") else t)
           for key, t in parts.items() if key not in ("alpha", "dora_scale")}
    if "dora_scale" in parts:
        dora, own["magnitude"] = _dora_plan(where, parts["dora_scale"], base)
        options.update(dora)
    return method, options, own


# LyCORIS's diag-oft keys: oft_blocks (blocks, p, p), rescale (out, 1[, 1, 1]) and alpha (its constraint);
# BOFT's the same with a 4-D oft_blocks (stages, blocks, b, b).
_OFT_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te|lycoris)_([^.]+)\.(oft_blocks|rescale)\Z")


def _lycoris_match(key: str):
    return _LYCORIS_KEY.match(key) or _OFT_KEY.match(key)


def _oft_plan(where: str, parts: dict[str, Tensor], base: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    """(method, make_adapter options, {parameter: tensor}) of one LyCORIS diag-oft or BOFT module, both
    with side "output", g = rescale and constraint = alpha: diag-oft (3-D oft_blocks) is OFT with blocks =
    oft_blocks' count and Q = -2 oft_blocks, BOFT (4-D: stages, blocks, b, b) is BOFT with block_size b,
    those stages and Q = 2 oft_blocks (specops.adapters.OFT / BOFT show why these give LyCORIS's W);
    ValueError if they do not fit `base`."""
    unknown = sorted(set(parts) - {"oft_blocks", "rescale", "alpha"})
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not diag-oft / BOFT keys specops reads (oft_blocks, "
                         "rescale, alpha)")
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{where}: a diag-oft / BOFT entry for a {type(base).__name__}; expected an nn.Linear "
                         "or nn.Conv2d")
    out_f = base.weight.shape[0]
    blocks, rescale = parts.get("oft_blocks"), parts.get("rescale")
    if blocks is None:
        raise ValueError(f"{where}: lacks ['oft_blocks']")
    butterfly = blocks.ndim == 4
    if blocks.dtype not in _FACTOR_DTYPES or blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2] \
            or blocks.shape[-3] * blocks.shape[-1] != out_f or (butterfly and (
                blocks.shape[-1] % 2 or not 1 <= blocks.shape[0] <= adapters.boft_max_stages(out_f, blocks.shape[-1]))):
        raise ValueError(f"{where}: oft_blocks is {blocks.dtype} of shape {tuple(blocks.shape)}; expected float "
                         f"(blocks, p, p) (diag-oft) or (stages, blocks, b, b) (BOFT: b even, "
                         f"2^(stages-1)·b dividing out) with blocks·p = out = {out_f}")
    want = (out_f, *(1,) * (base.weight.dim() - 1))
    if rescale is not None and (rescale.dtype not in _FACTOR_DTYPES or tuple(rescale.shape) != want):
        raise ValueError(f"{where}: rescale is {rescale.dtype} of shape {tuple(rescale.shape)}, expected float {want}")
    alpha = parts.get("alpha")
    if alpha is not None and (alpha.numel() != 1 or alpha.dtype == torch.bool):
        raise ValueError(f"{where}: alpha is {alpha.dtype} of shape {tuple(alpha.shape)}, expected a number")
    constraint = 0.0 if alpha is None else alpha.double().item()
    if not constraint >= 0:
        raise ValueError(f"{where}: alpha (the rotation's constraint) is {constraint}, expected a number >= 0")
    options = {"side": "output", "rescale": rescale is not None, "constraint": constraint}
    if butterfly:
        options.update(block_size=blocks.shape[-1], stages=blocks.shape[0])
    else:
        options["blocks"] = blocks.shape[0]
    own = {"Q": blocks * (2.0 if butterfly else -2.0)}
    if rescale is not None:
        own["g"] = rescale.flatten()
    return ("boft" if butterfly else "oft"), options, own


def _lycoris_module(key: str, tables: dict, path) -> str:
    """"<component>.<module>" of a LyCORIS-style key (_lycoris_match), the module resolved in `tables`."""
    m = _lycoris_match(key)
    if m.group(1) == _LYCORIS_PREFIX:
        component = next(iter(tables)) if len(tables) == 1 else "unet"
    else:
        component = _KOHYA_COMPONENT[m.group(1)]
    if component not in tables:
        raise ValueError(f"{path}: key {key!r} is for the {component}, which `model` lacks")
    return f"{component}.{_kohya_name(component, m.group(2), tables, key, path)}"


class Adapters(dict):
    """{"<component>.<module>": adapter}, and in `skipped` {key or module: why} of what a non-strict
    read left out."""

    skipped: dict[str, str]


def lycoris_adapters(path, model, *, scale: float = 1.0, strict: bool = True) -> Adapters:
    """Build the adapters a kohya / LyCORIS file describes, in the file's own algorithm; returns
    {"<component>.<module>": adapter}. Nothing is installed: put each adapter in its layer's place.

    LoHa keys hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b, alpha give
    specops.adapters.LoHa (B1, A1, B2, A2; ΔW = (alpha/r) (B1 A1) ⊙ (B2 A2)); on a conv hada_w*_b
    is (r, in·kh·kw), or in the Tucker form hada_t1 / hada_t2 (r, r, kh, kw) with hada_w*_a
    (r, out) and hada_w*_b (r, in). LoKr keys lokr_w1 (m1, n1) or lokr_w1_a (m1, r) / lokr_w1_b
    (r, n1), lokr_w2 (m2, n2[, kh, kw]) or lokr_w2_a (m2, r) / lokr_w2_b (r, n2[·kh·kw]), or Tucker
    lokr_t2 (r, r, kh, kw) with lokr_w2_a (r, m2) / lokr_w2_b (r, n2), and alpha give
    specops.adapters.LoKr with LyCORIS's scale: 1 when both factors are dense, else alpha / r (r:
    the rank of the first factor if factored, else of the second). An alpha of 0 or none means r.
    diag-OFT keys oft_blocks B (blocks, p, p), blocks·p = out, optional rescale g (out, 1[, 1, 1])
    and alpha κ (its constraint; 0 or none: unconstrained) give specops.adapters.OFT with
    side="output", Q = -2 B, g and constraint κ: LyCORIS's W = diag(g) R^T W0 (R = (I + q)(I - q)^-1,
    q = B - B^T, norm-clipped to κ·out), on a conv over the out channels. At scale ≠ 1 the OFT's
    ΔW is scale·(W - W0), LyCORIS's multiplier leaves g unscaled: they agree where g = 1.
    BOFT keys: the same with oft_blocks B (stages, blocks, b, b), blocks·b = out, give
    specops.adapters.BOFT with side="output", block_size b, those stages and Q = 2 B: LyCORIS's
    W = diag(g) B_{stages-1} ⋯ B_0 W0, stage blocks (I + q)(I - q)^-1 = cayley(2 q). At scale ≠ 1 its
    ΔW is scale·(W - W0), where LyCORIS's multiplier interpolates every stage toward I: they agree at 1.
    Every other module is LoRA / LoCon (any naming load_lora reads). A module's dora_scale
    (LyCORIS's DoRA, on LoRA, LoHa or LoKr) makes its adapter dora=True with that magnitude: shape
    (out, 1) / (out, 1, 1, 1) is LyCORIS's norm per output row, (1, in) / (1, in, 1, 1)
    wd_on_out=False (specops.adapters.Adapter has the formula).
    Every key and shape is checked against `model` (an nn.Module, the UNet, or a mapping
    {component: module}) before any adapter is built; a failure changes nothing. strict=False
    skips the keys and modules that fail instead (the result's `skipped` says why); a file that is
    not a readable safetensors file raises either way.
    """
    tensors, metadata = _read(path)
    tables = _name_tables(model)
    roots = dict(_components(model, "unet"))
    skipped: dict[str, str] = {}

    def attempt(what: str, fn, *args):
        """fn(*args), or None with `what` recorded as skipped when not strict."""
        try:
            return fn(*args)
        except ValueError as e:
            if strict:
                raise
            skipped[what] = str(e)
            return None

    # A module is LyCORIS's (LoHa, LoKr, diag-OFT) when a key names one of its factors; the others
    # are LoRA / LoCon. DoRA magnitudes and alphas go with their module either way.
    roles: dict[str, set] = {}
    for k in tensors:
        roles.setdefault(k.partition(".")[0], set()).add((m := _lycoris_match(k)) and m.group(3))
    lycoris = {head for head, r in roles.items()  # (a magnitude with no factor at all is reported there)
               if r - {None, "alpha", "dora_scale"} or (None not in r and "dora_scale" in r)}
    groups: dict[str, dict[str, Tensor]] = {}
    magnitudes: dict[str, tuple[str, Tensor]] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        head = key.partition(".")[0]
        if head in lycoris:
            m = _lycoris_match(key)
            if m is None:
                attempt(key, _refuse, f"{path}: key {key!r} is not a LoHa / LoKr key (.hada_* / .lokr_* / .alpha / "
                                      ".dora_scale) nor a diag-OFT / BOFT one (.oft_blocks / .rescale)")
            elif (name := attempt(key, _lycoris_module, key, tables, path)) is not None:
                groups.setdefault(name, {})[m.group(3)] = value
        elif _is_dora_key(key):
            if (name := attempt(key, _lycoris_module, key, tables, path)) is not None:
                magnitudes[name] = (key, value)
        elif (parsed := attempt(key, _parse_key, key, tables, path)) is not None:
            lora.setdefault(f"{parsed[0]}.{parsed[1]}", {})[key] = value
    plans = []
    # load_lora's checks: on all LoRA keys at once, or module by module when a failure only skips it
    batches = lora.items() if not strict else [("", {k: t for own in lora.values() for k, t in own.items()})]
    for name, own_keys in batches:
        if not own_keys:
            continue
        entries = attempt(name, _lora_entries, own_keys, metadata, path, model, tables)
        if entries:
            plans += [(n, "lora", {"init": f}, {}) for n, f in entries.items()]
    for name, parts in groups.items():
        where = f"{path}: {name}"
        if set(parts) <= {"alpha", "dora_scale"}:
            attempt(name, _refuse, f"{where}: {' and '.join(sorted(parts))} without factors")
            continue
        component, _, module = name.partition(".")
        layer = roots[component].get_submodule(module)
        plan = _oft_plan if "oft_blocks" in parts or "rescale" in parts else _lycoris_plan
        found = attempt(name, plan, where, parts, layer)
        if found is not None:
            plans.append((name, *found))
    for i, (name, method, options, own) in enumerate(plans):  # LoRA modules take their magnitude here
        if name in magnitudes and method == "lora":
            component, _, module = name.partition(".")
            found = attempt(name, _dora_plan, f"{path}: {name}", magnitudes.pop(name)[1],
                            roots[component].get_submodule(module))
            plans[i] = (name, method, {**options, **found[0]}, {**own, "magnitude": found[1]}) if found else None
    plans = [p for p in plans if p is not None]
    for name, (key, _) in magnitudes.items():
        attempt(key, _refuse, f"{path}: {name}: a dora_scale without factors (lora_down / lora_up)")
    if not plans and strict:
        raise ValueError(f"{path}: holds no adapter")
    for name, *_ in plans:
        component, _, module = name.partition(".")
        layer = roots[component].get_submodule(module)
        if isinstance(layer, adapters.Adapter):
            raise ValueError(f"{path}: {name} already holds a {layer.method!r} adapter; remove it first")
    flags = {p: p.requires_grad for name, *_ in plans
             for p in roots[name.partition(".")[0]].get_submodule(name.partition(".")[2]).parameters()}
    built = {}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # random inits are overwritten
            for name, method, options, own in plans:
                component, _, module = name.partition(".")
                adapter = adapters.make_adapter(method, roots[component].get_submodule(module), scale=scale, **options)
                for key, t in own.items():
                    getattr(adapter, key).copy_(t)
                built[name] = adapter
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    built = Adapters(built)
    built.skipped = skipped
    return built


def _refuse(message: str):
    raise ValueError(message)
