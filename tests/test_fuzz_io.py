"""Fuzz the adapter-file readers: a damaged file never crashes, never lies, never half-applies.

Every case starts from a valid file — save_adapters of lora, lokr, soda-svd and oft adapters on a
few layers of the tiny SDXL UNet, and export_lora of the same model in diffusers and kohya naming —
damages it in one way (cuts, header length, header bytes, JSON shape, offsets, dtypes, shapes,
NaN/Inf data, duplicated / missing / extra keys, oversized or mistyped metadata, method and config
JSON) and reads it with load_adapters, or with load_lora and specops.sdxl.apply_lora. The reader must
either raise a plain ValueError (its message naming the file, and the key where one is at fault)
and leave the model exactly as it was — every parameter and buffer torch.equal to a snapshot, the
same module objects, the same requires_grad flags — or, only for damage that can leave a valid file
(a flipped data bit, a changed config value, an extra metadata key), load exactly what the file holds.

Cases come from a seeded generator, so every run tries the same files:
    SPECOPS_FUZZ_CASES=N   how many cases (default 300, about a minute); e.g. 5000 for a long run
    SPECOPS_FUZZ_SEED=S    another sequence of cases (default 0)
Running with -s prints how many cases each damage produced and how many of them were refused.
"""
import collections
import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import load_file

from specops import lora_io, sdxl
from specops.adapters import Adapter

CASES = int(os.environ.get("SPECOPS_FUZZ_CASES", "300"))
SEED = int(os.environ.get("SPECOPS_FUZZ_SEED", "0"))

_T = "transformer_blocks"
LORA = [f"down_blocks.1.attentions.0.{_T}.0.attn1.to_q", f"mid_block.attentions.0.{_T}.3.attn2.to_k"]
OTHERS = {  # method -> (layer, options)
    "lokr": (f"up_blocks.1.attentions.0.{_T}.0.attn1.to_v", {"rank": 2}),
    "soda-svd": (f"down_blocks.1.attentions.1.{_T}.1.attn2.to_q", {"side": "basis"}),
    "oft": (f"up_blocks.0.attentions.1.{_T}.2.attn1.to_out.0", {}),
}
LAYERS = LORA + [layer for layer, _ in OTHERS.values()]
BYSTANDER = f"up_blocks.0.attentions.2.{_T}.5.attn1.to_v"  # an adapter in the target no file names


# ----------------------------------------------------------------------------- models and files


def _inject_loras(unet):
    found = sdxl.inject(unet, "lora", targets=LORA, rank=2, alpha=3.0)
    for a in found.values():
        a.scale = 0.5
    return found


class Target:
    """A model to load into, its snapshot, and a reset to that snapshot after a successful load."""

    def __init__(self, model):
        self.model = model
        self.originals = {name: model.get_submodule(name) for name in LAYERS}
        self.snapshot = self._state()

    def _state(self):
        m = self.model
        return ({n: id(x) for n, x in m.named_modules()},
                {n: p.requires_grad for n, p in m.named_parameters()},
                {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]})

    def assert_unchanged(self, why):
        modules, flags, tensors = self.snapshot
        now_modules = {n: id(x) for n, x in self.model.named_modules()}
        assert now_modules == modules, f"{why}: modules were replaced"
        assert {n: p.requires_grad for n, p in self.model.named_parameters()} == flags, f"{why}: requires_grad changed"
        now = dict([*self.model.named_parameters(), *self.model.named_buffers()])
        assert now.keys() == tensors.keys(), f"{why}: parameters or buffers added or removed"
        changed = [n for n, t in tensors.items() if not torch.equal(now[n], t)]
        assert not changed, f"{why}: tensors changed: {changed[:3]}"

    def reset(self):
        for name, module in self.originals.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, module)
        _, flags, tensors = self.snapshot
        with torch.no_grad():
            for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
                t.copy_(tensors[n])
        for n, p in self.model.named_parameters():
            p.requires_grad_(flags[n])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread is faster, and the cores are shared
    directory = tmp_path_factory.mktemp("fuzz")
    src = sdxl.tiny_unet(0)
    found = _inject_loras(src)
    for method, (layer, options) in OTHERS.items():
        found.update(sdxl.inject(src, method, targets=[layer], **options))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the identity start; orthogonal factors stay orthogonal
        for adapter in found.values():
            ortho = {id(p) for p in adapter.orthogonal_parameters()}
            for name, p in adapter.named_parameters():
                if not name.startswith("base."):
                    p.copy_(torch.linalg.qr(torch.randn(p.shape, generator=g, dtype=torch.float64))[0]
                            if id(p) in ortho else p + 0.1 * torch.randn(p.shape, generator=g))
    files = {}
    for kind in ("adapters", "diffusers", "kohya"):
        path = directory / f"{kind}.safetensors"
        if kind == "adapters":
            lora_io.save_adapters(src, path)
        else:
            lora_io.export_lora(src, path, format=kind)
        files[kind] = path.read_bytes()
    # Loads into the adapters' target replace its Linears, except one LoRA already there with the
    # same config (loaded in place); the LoRA target has plain Linears where the files have layers.
    into_adapters, into_lora = sdxl.tiny_unet(0), sdxl.tiny_unet(0)
    sdxl.inject(into_adapters, "lora", targets=LORA[:1], rank=2, alpha=3.0)[LORA[0]].scale = 0.5
    for model in (into_adapters, into_lora):
        sdxl.inject(model, "oft", targets=[BYSTANDER])
        model.requires_grad_(True)  # inject froze the rest: a reader that freezes a base must show
    yield files, {"adapters": Target(into_adapters), "lora": Target(into_lora)}
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- file surgery


def _split(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, text: str | None = None) -> bytes:
    body = (json.dumps(header) if text is None else text).encode()
    return len(body).to_bytes(8, "little") + body + data


def _pairs_text(pairs) -> str:
    """A JSON object written from (key, value) pairs, which may repeat a key."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


def _tensors(header):
    return [k for k in header if k != "__metadata__"]


def _repack(header, data, drop=(), add=()):
    """The file without the tensors `drop` and with `add` = [(key, dtype, shape, bytes)]."""
    items = [(k, e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]])
             for k, e in header.items() if k != "__metadata__" and k not in drop]
    new, chunks, pos = {}, [], 0
    if "__metadata__" in header:
        new["__metadata__"] = header["__metadata__"]
    for key, dtype, shape, payload in [*items, *add]:
        new[key] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(payload)]}
        chunks.append(payload)
        pos += len(payload)
    return _join(new, b"".join(chunks))


def _value_bytes(value: float, dtype: str) -> bytes:
    t = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dtype]
    return torch.tensor([value], dtype=t).view(torch.uint8).numpy().tobytes()


def _metadata_edit(raw, edit):
    header, data = _split(raw)
    meta = dict(header.get("__metadata__", {}))
    edit(meta)
    header["__metadata__"] = meta
    return _join(header, data)


def _modules_edit(raw, edit):
    def change(meta):
        modules = json.loads(meta["specops.modules"])
        meta["specops.modules"] = edit(modules) if callable(edit) else edit
        if not isinstance(meta["specops.modules"], str):
            meta["specops.modules"] = json.dumps(meta["specops.modules"])
    return _metadata_edit(raw, change)


# Each damage: (rng, raw bytes, kind) -> (bytes, expectation, text the error must contain or None).
# "fail": the file is damaged beyond use; "any": it may still be a valid file.


def cut(rng, raw, kind):
    n = int.from_bytes(raw[:8], "little")
    where = rng.choice([(0, 8), (8, 8 + n), (8 + n, len(raw))])
    return raw[:rng.randrange(*where)], "fail", None


def header_length(rng, raw, kind):
    n = int.from_bytes(raw[:8], "little")
    value = rng.choice([0, 1, rng.randrange(2, n), n + rng.randrange(1, 64), len(raw) - 7,
                        len(raw) + rng.randrange(1, 10**6), 2**63, 2**64 - 1, 2**31, 10**8 + 1])
    return value.to_bytes(8, "little") + raw[8:], "fail", None


def header_bytes(rng, raw, kind):
    n = int.from_bytes(raw[:8], "little")
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(8, 8 + n)
        out[i] = rng.choice([rng.randrange(256), ord(rng.choice('{}[]":,.0123456789eE-+ \\aznulltrue'))])
    return bytes(out), "any", None  # a digit of a config value or of a fingerprint may still parse


def garbage_header(rng, raw, kind):
    n = int.from_bytes(raw[:8], "little")
    junk = rng.choice([bytes(rng.randrange(256) for _ in range(n)), b"{" + b"\xff" * (n - 1),
                       b"{" + b" " * (n - 1), (b'{"a":' + b"[" * n)[:n], b" " + raw[8:8 + n - 1]])
    return raw[:8] + junk + raw[8 + n:], "fail", None


def not_an_object(rng, raw, kind):
    _, data = _split(raw)
    text = rng.choice(["[]", "1", '"x"', "null", "true", "[{}]", '{"a": 1}', '{"__metadata__": {}, "a": []}',
                       "{}", '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} x', "{" + "[" * 10**5])
    return _join(None, data, text), "fail", None


def offsets(rng, raw, kind):
    header, data = _split(raw)
    key = rng.choice(_tensors(header))
    b, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = rng.choice([
        [b, e + rng.randint(1, 8)], [max(b - 4, 0) if b else 4, e], [e, b] if e > b else [b, b + 1],
        [0, len(data) + 4], [b, 2**64], [-1, e], [float(b), e], [b], [b, e, e], "x", None,
        [len(data) + 8, len(data) + 8 + e - b]])
    return _join(header, data), "fail", None


def dtypes(rng, raw, kind):
    header, data = _split(raw)
    key = rng.choice(_tensors(header))
    entry = header[key]
    nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
    new = rng.choice(["I32", "U32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "I64", "XYZ", "f32", 7, None])
    size = {"I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8}.get(new)
    entry["dtype"] = new
    if size and nbytes % size == 0:
        entry["shape"] = [nbytes // size] if len(entry["shape"]) != 0 or nbytes != size else []
    # an integer kohya alpha is a number like any other
    may_load = key.endswith(".alpha") and isinstance(new, str) and new[0] in "IU" and entry["shape"] == []
    return _join(header, data), "any" if may_load else "fail", None


def shapes(rng, raw, kind):
    header, data = _split(raw)
    key = rng.choice([k for k in _tensors(header) if not k.endswith(".alpha")])
    shape = header[key]["shape"]
    numel = 1
    for d in shape:
        numel *= d
    candidates = [[1, *shape], [numel], shape[::-1], [*shape, 1], [numel * 2], [numel + 1], [d + 1 for d in shape],
                  [-d for d in shape], [float(d) for d in shape], [True] * len(shape), "x", [2**70]]
    header[key]["shape"] = rng.choice([c for c in candidates if c != shape])
    return _join(header, data), "fail", None


def nonfinite(rng, raw, kind):
    header, data = _split(raw)
    key = rng.choice([k for k in _tensors(header) if header[k]["dtype"] in ("F32", "F16", "BF16", "F64")
                      and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]])
    entry = header[key]
    value = _value_bytes(rng.choice([float("nan"), float("inf"), float("-inf")]), entry["dtype"])
    b, e = entry["data_offsets"]
    i = b + rng.randrange((e - b) // len(value)) * len(value)
    return raw[:len(raw) - len(data)] + data[:i] + value + data[i + len(value):], "fail", key


def duplicate(rng, raw, kind):
    header, data = _split(raw)
    pairs = list(header.items())
    choice = rng.randrange(3)
    if choice == 0:  # a tensor twice, the same or another tensor's entry under its name
        key = rng.choice(_tensors(header))
        pairs.insert(rng.randrange(len(pairs) + 1), (key, rng.choice([header[key], header[rng.choice(_tensors(header))]])))
    elif choice == 1:
        key = "__metadata__"
        pairs.append((key, header.get(key, {})))
    else:  # a metadata key twice: written out by hand below
        meta = header.get("__metadata__", {"format": "pt"})
        key = rng.choice(list(meta))
        inner = _pairs_text([*meta.items(), (key, meta[key])])
        rest = _pairs_text([p for p in pairs if p[0] != "__metadata__"])
        return _join(None, data, '{"__metadata__":' + inner + "," + rest[1:]), "fail", key
    return _join(None, data, _pairs_text(pairs)), "fail", key


def missing(rng, raw, kind):
    header, data = _split(raw)
    if rng.random() < 0.7:
        key = rng.choice(_tensors(header))
        if kind == "adapters":
            return _repack(header, data, drop=[key]), "fail", key
        return _repack(header, data, drop=[key]), "any" if key.endswith(".alpha") else "fail", None
    meta = header["__metadata__"]
    key = rng.choice(list(meta))
    return _metadata_edit(raw, lambda m: m.pop(key)), "fail" if kind == "adapters" and key != "format" else "any", None


def extra(rng, raw, kind):
    header, data = _split(raw)
    choice = rng.randrange(4)
    if choice == 0:  # an unknown tensor
        key = rng.choice(["bogus", "unet.bogus.weight", rng.choice(_tensors(header)) + "x", "lora_unet_bogus.alpha",
                          LAYERS[0] + ".extra", "text_encoder.x.lora_A.weight.y"])
        return _repack(header, data, add=[(key, "F32", [2], _value_bytes(1.0, "F32") * 2)]), "fail", key
    if choice == 1:  # one half of a pair for a layer the file does not have
        key = (f"lora_unet_{BYSTANDER.replace('.', '_')}.lora_down.weight" if kind == "kohya"
               else f"unet.{BYSTANDER}.lora_A.weight" if kind == "diffusers" else f"{BYSTANDER}.A")
        return _repack(header, data, add=[(key, "F32", [2, 128], bytes(4 * 256))]), "fail", None
    if choice == 2:  # an unknown field in an entry
        key = rng.choice(_tensors(header))
        header[key]["extra"] = 1
        return _join(header, data), "fail", None
    return _metadata_edit(raw, lambda m: m.update(note="x" * rng.randrange(100))), "any", None


def oversized(rng, raw, kind):
    huge = "x" * rng.choice([10**5, 10**6, 4 * 10**6])
    choice = rng.randrange(4)
    if choice == 0:
        return _metadata_edit(raw, lambda m: m.update(big=huge)), "any", None
    if choice == 1:  # the same file, but the reader's header cap is below its header
        return _metadata_edit(raw, lambda m: m.update(big=huge)), "fail:cap", None
    key = "specops.modules" if kind == "adapters" else "lora_adapter_metadata"
    value = huge if choice == 2 else "[" * len(huge)
    return _metadata_edit(raw, lambda m: m.update({key: value})), "fail", key


def metadata_types(rng, raw, kind):
    header, data = _split(raw)
    if rng.random() < 0.3:
        header["__metadata__"] = rng.choice([[], "x", 1, [["format", "pt"]]])
    else:
        meta = header["__metadata__"]
        meta[rng.choice(list(meta))] = rng.choice([1, 1.5, None, True, ["x"], {"a": "b"}])
    return _join(header, data), "fail", None


def method_config(rng, raw, kind):
    """Damage inside the specops.modules JSON, or to the tag and version beside it."""
    name = rng.choice(LAYERS)

    def entry(edit):
        def apply(modules):
            edit(modules[name])
            return modules
        return apply

    def twice(meta):  # a module named twice, written out by hand
        modules = json.loads(meta["specops.modules"])
        meta["specops.modules"] = _pairs_text([*modules.items(), (name, modules[name])])

    tag = rng.choice(["specops.format", "specops.version"])
    damages = [
        lambda: _modules_edit(raw, entry(lambda e: e.update(
            method=rng.choice(["nope", "", 3, None, "ziplora", "loha", "LoRA"])))),
        lambda: _modules_edit(raw, entry(lambda e: e.update(config=rng.choice(
            [[], "x", None, {"bogus": 1}, {"rank": 3}, {"rank": 10**12}, {"rank": 2**70}, {"rank": "2"}, {"rank": -1},
             {"rank": 2.0}, {"rank": True}, {"factors": 10**9}, {"blocks": 10**6}])))),
        lambda: _modules_edit(raw, entry(lambda e: e["base"].update({
            rng.choice(["sum", "abs_sum", "sum_sq", "shape", "dtype"]):
            rng.choice(["nan", "inf", "-inf", "x", 1.5, None, [1], "1e400", "float64"])}))),
        lambda: _modules_edit(raw, entry(lambda e: e.pop(rng.choice(["base", "config", "method", "tensors"])))),
        lambda: _modules_edit(raw, entry(lambda e: e.update(tensors=rng.choice(
            [e["tensors"] * 2, e["tensors"][:-1], [1], [*e["tensors"], "bogus"]])))),
        lambda: _modules_edit(raw, lambda modules: {
            **{k: v for k, v in modules.items() if k != name},
            rng.choice(["", "bogus", name + ".x", "conv_in", "..", name[:-1]]): modules[name]}),
        lambda: _modules_edit(raw, rng.choice(["", "{", "[]", "{}", "null", '{"a": 1}', "[" * 10**5, '{"a": NaN}',
                                               "1e400"])),
        lambda: _metadata_edit(raw, lambda m: m.update({tag: rng.choice(["", "x", "2", "specops"])})),
    ]
    if rng.random() < 0.1:
        return _metadata_edit(raw, twice), "fail", name
    if rng.random() < 0.2:  # one option changed: another valid config is possible (lokr factor None)
        key = rng.choice(["scale", "alpha", "rank", "side", "blocks", "factor"])
        value = rng.choice(["x", [1], None, 10**9])
        return _modules_edit(raw, entry(lambda e: e["config"].update({key: value}))), "any", None
    return rng.choice(damages)(), "fail", None


def diffusers_config(rng, raw, kind):
    value = rng.choice([
        "{", "[]", "1", '"x"', '{"unet.lora_alpha": "x"}', '{"unet.lora_alpha": true}', '{"unet.lora_alpha": 1e400}',
        '{"unet.lora_alpha": 1e300}', '{"unet.lora_alpha": 2, "unet.alpha_pattern": []}',
        '{"unet.lora_alpha": 2, "unet.alpha_pattern": {"(a+)+$": 1}}', '{"unet.lora_alpha": 2, "unet.use_rslora": "y"}',
        '{"unet.lora_alpha": 2, "unet.alpha_pattern": {"' + LORA[0] + '": "x"}}', '{"unet.lora_alpha": 4}',
        '{"unet.lora_alpha": NaN}', '{"unet.lora_alpha": 2, "unet.lora_alpha": 2}', "[" * 10**5])
    valid = value == '{"unet.lora_alpha": 4}'
    return _metadata_edit(raw, lambda m: m.update(lora_adapter_metadata=value)), "any" if valid else "fail", None


def data_bits(rng, raw, kind):
    header, data = _split(raw)
    out = bytearray(raw)
    start = len(raw) - len(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(start, len(raw))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out), "any", None  # NaN, Inf or just another number


def swapped(rng, raw, kind):
    """Two layers' tensors under each other's names: a consistent file for the wrong layers."""
    header, data = _split(raw)
    a, b = rng.sample(LAYERS, 2)
    def rename(k):
        for old, new in ((a, b), (b, a)):
            for form in (old, old.replace(".", "_")):
                if form in k:
                    return k.replace(form, new if form == old else new.replace(".", "_"))
        return k
    new = {rename(k): v for k, v in header.items()}
    return _join(new, data), "any", None


DAMAGES = {f.__name__: f for f in (cut, header_length, header_bytes, garbage_header, not_an_object, offsets, dtypes,
                                    shapes, nonfinite, duplicate, missing, extra, oversized, metadata_types,
                                    method_config, diffusers_config, data_bits, swapped)}
ONLY = {"method_config": ("adapters",), "diffusers_config": ("diffusers",)}
PLAN = [(kind, name) for name in DAMAGES for kind in ONLY.get(name, ("adapters", "diffusers", "kohya"))]


# ----------------------------------------------------------------------------- readers


def _read_adapters(target, path):
    names = lora_io.load_adapters(target.model, path)
    tensors = load_file(path)  # it loaded: what the file holds is now in the model, bit for bit
    for name in names:
        state = {k: v for k, v in target.model.get_submodule(name).state_dict().items() if not k.startswith("base.")}
        assert state.keys() == {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")}, name
        assert all(torch.equal(v, tensors[f"{name}.{k}"]) for k, v in state.items()), name


def _apply_lora(target, path, kind, lora):
    found = sdxl.apply_lora(target.model, lora, prefix="unet")
    tensors = load_file(path)
    assert found.keys() == {k.removeprefix("unet.") for k in lora}
    for name, adapter in found.items():
        key = (f"unet.{name}.lora_A.weight" if kind == "diffusers"
               else f"lora_unet_{name.replace('.', '_')}.lora_down.weight")
        assert torch.equal(adapter.A, tensors[key].to(adapter.A.dtype)), name  # A is the file's, as it is
        assert torch.isfinite(adapter.B).all(), name


def test_the_valid_files_read(world, tmp_path):
    """The starting points are valid: each reader takes its own file, so a refusal above is the damage's."""
    files, targets = world
    for kind, raw in files.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(raw)
        target = targets["adapters" if kind == "adapters" else "lora"]
        if kind == "adapters":
            _read_adapters(target, path)
        else:
            for model in (target.model, None):
                _apply_lora(target, path, kind, lora_io.load_lora(path, model=model))
                target.reset()
        target.reset()
        target.assert_unchanged(kind)


def test_damaged_files_are_refused_or_read_exactly(world, tmp_path):
    files, targets = world
    path = tmp_path / "case.safetensors"
    tally = collections.Counter()
    for i in range(CASES):
        rng = random.Random(f"{SEED}:{i}")
        kind, damage = PLAN[i % len(PLAN)] if i < len(PLAN) else rng.choice(PLAN)
        raw, expect, must_name = DAMAGES[damage](rng, files[kind], kind)
        path.write_bytes(raw)
        cross = rng.random() < 0.05  # now and then the other reader, which must refuse even the valid file
        reader = "lora" if (kind == "adapters") == cross else "adapters"
        target = targets[reader]
        case = f"case {i} (SPECOPS_FUZZ_SEED={SEED}): {damage} on the {kind} file, read as {reader}"
        stage = "read"
        with pytest.MonkeyPatch.context() as mp:
            if expect == "fail:cap":
                mp.setattr(lora_io, "_MAX_HEADER", int.from_bytes(raw[:8], "little") - 1)
                expect = "fail"
            try:
                if reader == "adapters":
                    _read_adapters(target, path)
                else:
                    lora = lora_io.load_lora(path, model=target.model if rng.random() < 0.5 else None)
                    stage = "apply"  # apply_lora's own errors do not know the file
                    _apply_lora(target, path, kind, lora)
            except ValueError as e:
                assert type(e) is ValueError, f"{case}: {type(e).__name__} leaked: {e}"
                message = str(e)
                if stage == "read":
                    assert path.name in message, f"{case}: the message does not name the file: {message[:300]}"
                if must_name is not None and not cross:
                    assert must_name in message, f"{case}: the message does not name {must_name!r}: {message[:300]}"
                target.assert_unchanged(f"{case}, refused with {message[:200]}")
                tally[damage, "refused"] += 1
                continue
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001 - any other type is the failure this test looks for
                raise AssertionError(f"{case}: {type(e).__name__} instead of ValueError: {e}") from e
        assert expect == "any" and not cross, f"{case}: a damaged file was accepted"
        tally[damage, "read"] += 1
        target.reset()
        target.assert_unchanged(f"{case}: reset after a successful read")
    print(f"\n{CASES} cases, seed {SEED}:")
    for name in DAMAGES:
        print(f"  {name:18s} refused {tally[name, 'refused']:5d}  read {tally[name, 'read']:5d}")
    assert sum(tally.values()) == CASES


def test_header_checks_name_what_is_wrong(world, tmp_path):
    files, targets = world
    header, data = _split(files["kohya"])
    key = next(k for k in _tensors(header) if k.endswith("lora_down.weight"))
    cases = {
        "header length 9223372036854775808 exceeds": (2**63).to_bytes(8, "little") + files["kohya"][8:],
        f"duplicate key '{key}'": _join(None, data, _pairs_text([*header.items(), (key, header[key])])),
        f"tensor '{key}' holds NaN or Inf": None,
        "is not one of": None,
    }
    b = header[key]["data_offsets"][0]
    start = len(files["kohya"]) - len(data)
    cases[f"tensor '{key}' holds NaN or Inf"] = files["kohya"][:start + b] + struct.pack("<f", float("nan")) + \
        files["kohya"][start + b + 4:]
    header[key]["dtype"] = "F4"
    cases["is not one of"] = _join(header, data)
    path = tmp_path / "bad.safetensors"
    for match, raw in cases.items():
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=match):
            lora_io.load_lora(path)
