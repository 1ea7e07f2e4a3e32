"""One adapter training step on SDXL conv and feed-forward shapes: specops beside LyCORIS (its default
mode and bypass_mode=True), PEFT, and the frozen layer alone (the bound).

Shapes (batch 2, as SDXL's UNet at 1024² trains):
  conv  3x3, stride 1, padding 1, C -> C: the resnets at 320 / 640 / 1280 channels on 64² / 32² / 16²
        latents;
  ff    the transformer blocks' feed-forward Linears: ff.net.0.proj (GEGLU, d -> 8d) and ff.net.2
        (4d -> d) at d = 640 on 2 x 1024 tokens and d = 1280 on 2 x 256 tokens;
  attn  attention projections on 2 x 1024 tokens: 1280 -> 1280 (to_q, to_out) and 2048 -> 1280 (to_k /
        to_v fed 2048 wide, as the cross-attention is).
Methods, all rank 8, alpha 8 (a coefficient of 1):
  locon         LoRA (LoCon on a conv): specops LoRA, LyCORIS LoConModule, PEFT LoraConfig;
  locon-tucker  conv only, the Tucker core: LoRA(tucker=True), LoConModule(use_tucker=True); PEFT has none;
  loha          specops LoHa, LyCORIS LohaModule, PEFT LoHaConfig (flattened kernel, not Tucker);
  lokr          LyCORIS's defaults: factor -1 (the balanced split), W1 dense, W2 = B2 A2 of rank 8 (every
                W2 here has max(m2, n2) / 2 > 8, so LyCORIS decomposes it); specops LoKr(rank=8),
                LokrModule, PEFT LoKrConfig(r=8) (the same rule);
  oft           attn shapes only, blocks of 8: specops OFT(side="output", out / 8 blocks) and LyCORIS
                DiagOFTModule (lora_dim 8), the same function; PEFT OFTConfig(oft_block_size=8) rotates the
                input side (its default 5-term Neumann Cayley). specops's own row takes the output side because
                the input side cannot reach the bound as a first layer: its rotation's gradient needs the
                base's input gradient g W0, one dense GEMM more;
  boft          attn shapes only, the full butterfly on the output side: 1280 = 10 x 2^7, blocks of 10, 8
                stages (what LyCORIS builds for lora_dim 10; _boft_block): specops BOFT(side="output"),
                LyCORIS ButterflyOFTModule. No PEFT row: without its CUDA extension PEFT's BOFT runs one stage only
                (another rotation), and it rotates the input side, where 10 does not divide 2048;
  boft1         attn shapes only, what PEFT's BOFT runs without its CUDA extension: one butterfly stage on the
                input side, blocks of 8: specops BOFT(block_size=8, stages=1), PEFT BOFTConfig(boft_block_size=8,
                boft_n_butterfly_factor=1) (it builds the n x n rotation densely); LyCORIS has no such module.
The LyCORIS rows build its modules directly (what create_lycoris builds per layer) and apply_to() them.
"lycoris+specops" and "peft+specops" are the same peer models after specops.integrations.lycoris / .peft
apply(): the peer's layers and parameters, specops's forward (where apply() covers the layer).
Every trainable adapter weight is redrawn N(0, 0.05²), so no B or W1 is zero: a zero factor must not
let an implementation skip work.

Modes: "in-network" (the input requires a gradient, as inside the UNet) and "first-layer" (it does not).
The step is forward, then backward of the scalar loss Σ y ⊙ g for a fixed g (y.backward(g)), with the
adapter's weights trainable and the base frozen; gradients are dropped after each step. The bound is
the frozen layer's own step: forward + input gradient in-network, forward alone as a first layer.
Targets for specops: locon, locon-tucker and lokr need no dense weight gradient, so within 10% of the
bound; loha 10% over bound + one dense weight gradient (counted as one forward's time), what its merged
path W0 + ΔW needs (specops takes the rank-r² path instead where it costs less, 6 rows r² (m + n)
FLOPs: here, rank 8, everywhere; specops.adapters.hadamard_factored); boft too, as its rotation costs 2 n b FLOPs per
stage and row, least on W0's out rows (a batch has more). "x bound" is ms over the bound's ms, "x best peer"
specops's ms over the fastest LyCORIS / PEFT row of that method.

The "tiny UNet" group is one whole training step (SGD, forward and backward of the mean square of
the output) of specops.sdxl.tiny_unet at its own sample size (batch 2, 16x16 latents) with LoKr on the
resnet convs, LoHa on the feed-forward Linears and OFT on the attention projections (rank 2, OFT blocks
of 4), as a PEFT model (three adapters) and as a LyCORIS network (module_algo_map), each beside itself
after apply(): "x unpatched" is its ms over the same model's without apply().

Timing: every implementation of one (shape, mode) is built up front and warmed up by one step, then
timed in interleaved rounds (each round calls each implementation once), so drift falls on all of them
alike; the fastest round is reported (specops.bench.fastest). Peak memory is measured on the warm-up step: on CUDA
torch.cuda.max_memory_allocated over the step, on the CPU the running peak of the profiler's memory
events (allocations minus frees while the step runs; specops.bench.peak_bytes). Both count only what
the step allocates (activations kept for backward, gradients, temporaries), not the resident weights.
fp32 on the CPU, bf16 with --device cuda.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn

from . import ROUNDS, _sync, _time_call, device, fastest, installed, peak_bytes

RANK = 8
METHODS = ("locon", "locon-tucker", "loha", "lokr", "oft", "boft", "boft1")
OFT_BLOCK = 8  # OFT block size on the attn shapes
DENSE_GRAD = ("loha", "boft", "boft1")  # methods whose target counts one dense weight gradient (module docstring)
PEERS = ("lycoris", "lycoris-bypass", "peft")
PATCHED = ("lycoris+specops", "peft+specops")  # a peer's own model after specops.integrations.<peer>.apply()
IMPLS = ("frozen", "specops", *PEERS, *PATCHED)
MODES = ("in-network", "first-layer")
TARGET = 1.10  # over the bound (DENSE_GRAD: over the bound plus one weight gradient)


def _boft_block(out: int) -> int:
    """The BOFT block size b: the least even b >= 8 with out / b a power of two (a full butterfly; 10 for
    1280, 8 for 256), the block LyCORIS builds for lora_dim b."""
    return next(b for b in range(8, out + 1, 2) if out % b == 0 and (out // b) & (out // b - 1) == 0)


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # "conv", "ff" or "attn" (both Linear)
    cin: int
    cout: int
    batch: int
    size: int  # latent side (conv) or tokens per sample (ff)

    @property
    def label(self) -> str:
        if self.kind == "conv":
            return f"conv3x3 {self.cin} {self.batch}x{self.size}x{self.size}"
        return f"{self.kind} {self.cin}->{self.cout} {self.batch}x{self.size}"

    def layer(self) -> nn.Module:
        if self.kind == "conv":
            return nn.Conv2d(self.cin, self.cout, 3, padding=1)
        return nn.Linear(self.cin, self.cout)

    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            return (self.batch, self.cin, self.size, self.size)
        return (self.batch, self.size, self.cin)

    def output_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            return (self.batch, self.cout, self.size, self.size)
        return (self.batch, self.size, self.cout)

    def forward_flops(self) -> float:
        k = 9 if self.kind == "conv" else 1
        rows = self.batch * self.size * (self.size if self.kind == "conv" else 1)
        return 2.0 * rows * self.cin * self.cout * k


FULL = (
    Shape("conv", 320, 320, 2, 64), Shape("conv", 640, 640, 2, 32), Shape("conv", 1280, 1280, 2, 16),
    Shape("ff", 640, 5120, 2, 1024), Shape("ff", 2560, 640, 2, 1024),
    Shape("ff", 1280, 10240, 2, 256), Shape("ff", 5120, 1280, 2, 256),
    Shape("attn", 1280, 1280, 2, 1024), Shape("attn", 2048, 1280, 2, 1024),
)
QUICK = (Shape("conv", 320, 320, 2, 16), Shape("ff", 640, 5120, 2, 32), Shape("attn", 256, 256, 2, 32))


class _Holder(nn.Module):
    """One layer under the name "layer", for PEFT's target_modules."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _specops(base, method):
    from specops.adapters import BOFT, OFT, LoHa, LoKr, LoRA

    if method == "oft":
        return OFT(base, blocks=base.out_features // OFT_BLOCK, side="output")
    if method == "boft":
        return BOFT(base, block_size=_boft_block(base.out_features), side="output")
    if method == "boft1":
        return BOFT(base, block_size=OFT_BLOCK, stages=1)
    if method in ("locon", "locon-tucker"):
        return LoRA(base, rank=RANK, alpha=RANK, tucker=method == "locon-tucker")
    if method == "loha":
        return LoHa(base, rank=RANK, alpha=RANK)
    return LoKr(base, rank=RANK, alpha=RANK)


def _lycoris(base, method, bypass):
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    opts = dict(multiplier=1.0, lora_dim=RANK, alpha=RANK, bypass_mode=bypass)
    if method == "oft":
        mod = DiagOFTModule("layer", base, **{**opts, "lora_dim": OFT_BLOCK})
    elif method == "boft":
        mod = ButterflyOFTModule("layer", base, **{**opts, "lora_dim": _boft_block(base.out_features)})
    elif method in ("locon", "locon-tucker"):
        mod = LoConModule("layer", base, use_tucker=method == "locon-tucker", **opts)
    elif method == "loha":
        mod = LohaModule("layer", base, **opts)
    else:
        mod = LokrModule("layer", base, factor=-1, **opts)
    mod.apply_to()  # base.forward is now the LyCORIS module's forward
    return base, mod


def _peft(base, method):
    from peft import BOFTConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, inject_adapter_in_model

    if method == "boft1":
        cfg = BOFTConfig(boft_block_size=OFT_BLOCK, boft_n_butterfly_factor=1, target_modules=["layer"])
    elif method == "oft":
        cfg = OFTConfig(oft_block_size=OFT_BLOCK, r=0, target_modules=["layer"])
    elif method == "locon":
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["layer"])
    elif method == "loha":
        cfg = LoHaConfig(r=RANK, alpha=RANK, target_modules=["layer"])
    else:
        cfg = LoKrConfig(r=RANK, alpha=RANK, target_modules=["layer"])
    return inject_adapter_in_model(cfg, _Holder(base))


def _available(shape: Shape, method: str, impl: str) -> bool:
    if impl == "frozen":
        return True
    if (method == "locon-tucker" and shape.kind != "conv") or (method in ("oft", "boft", "boft1") and shape.kind != "attn"):
        return False
    if impl.startswith("lycoris"):
        return method != "boft1" and installed("lycoris")
    if impl.startswith("peft"):
        return method not in ("locon-tucker", "boft") and installed("peft")
    return True


def _build(shape: Shape, method: str, impl: str, base: nn.Module, dtype, seed: int):
    """(module to call, its trainable parameters); the adapter's weights redrawn non-zero."""
    base = copy.deepcopy(base).requires_grad_(False)
    keep = None
    if impl == "frozen":
        layer = base
    elif impl == "specops":
        layer = _specops(base, method)
    elif impl.startswith("peft"):
        layer = _peft(base, method)
    else:
        layer, keep = _lycoris(base, method, bypass=impl == "lycoris-bypass")
    params = [] if impl == "frozen" else [p for p in (keep or layer).parameters() if p.requires_grad]
    if impl != "frozen" and (not params or any(p is base.weight for p in params)):
        raise RuntimeError(f"{impl} {method}: expected trainable adapter weights and a frozen base")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layer = layer.to(device=device(), dtype=dtype)
    if keep is not None:
        keep.to(device=device(), dtype=dtype)
    if impl in PATCHED:
        from specops.integrations import lycoris, peft

        report = (peft.apply(layer) if impl == "peft+specops" else lycoris.apply(keep))
        if not report["patched"]:
            raise RuntimeError(f"{impl} {method}: apply() patched nothing: {report['skipped']}")
    return layer, params, keep


def _step(layer, params, x, g, train: bool):
    """The step to time: forward, and backward of Σ y ⊙ g unless nothing needs a gradient."""

    def call():
        y = layer(x)
        if train:
            y.backward(g)
            x.grad = None
            for p in params:
                p.grad = None

    return call


def _group(shape: Shape, mode: str, dtype, rounds: int, seed: int = 0) -> list[dict]:
    """Rows of every (method, impl) of one shape and mode, timed in interleaved rounds."""
    torch.manual_seed(seed)
    base = shape.layer().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape.input_shape(), generator=gen).to(device=device(), dtype=dtype)
    g = torch.randn(shape.output_shape(), generator=gen).to(device=device(), dtype=dtype)
    x.requires_grad_(mode == "in-network")
    entries = []  # (method, impl, call, objects kept alive)
    for method in ("-",) + METHODS:
        for impl in IMPLS:
            if (method == "-") != (impl == "frozen") or not _available(shape, method, impl):
                continue
            layer, params, keep = _build(shape, method, impl, base, dtype, seed + 2)
            train = bool(params) or mode == "in-network"
            entries.append((method, impl, _step(layer, params, x, g, train), (layer, keep)))
    peaks = [peak_bytes(call) / 2**20 for _, _, call, _ in entries]  # the warm-up step measures memory
    _sync()
    times: dict[int, list[float]] = {i: [] for i in range(len(entries))}
    for _ in range(rounds):
        for i, (_, _, call, _) in enumerate(entries):
            times[i].append(_time_call(call))
    rows = []
    for i, (method, impl, _, _) in enumerate(entries):
        rows.append({"shape": shape.label, "mode": mode, "method": method, "impl": impl,
                     "ms": fastest(times[i]) * 1e3, "peak MB": peaks[i]})
    bound = rows[0]["ms"]
    for r in rows:
        r["x bound"] = r["ms"] / bound
    own = {r["method"]: r["ms"] for r in rows if r["impl"] == "specops"}
    for r in rows:
        if r["impl"] == "specops":
            peers = [p["ms"] for p in rows if p["method"] == r["method"] and p["impl"] in PEERS]
            if peers:
                r["x best peer"] = r["ms"] / min(peers)
        elif r["impl"] in PATCHED:  # against the same peer without apply(), and specops's own adapter
            plain = next(p["ms"] for p in rows if p["method"] == r["method"] and p["impl"] == r["impl"].split("+")[0])
            r["x unpatched"], r["x specops"] = r["ms"] / plain, r["ms"] / own[r["method"]]
    return rows


UNET_TARGETS = (r".*resnets\.\d+\.conv[12]$", r".*ff\.net\.(0\.proj|2)$",
                r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$")  # LoKr, LoHa, OFT (the tiny UNet group)


def _unet_models(dtype):
    """{impl: (unet, trainable parameters)}: the tiny UNet as a PEFT model and as a LyCORIS network, each
    also after apply() (module docstring)."""
    from lycoris import LycorisNetwork
    from peft import LoHaConfig, LoKrConfig, OFTConfig, inject_adapter_in_model

    from specops.integrations import lycoris, peft
    from specops.sdxl import tiny_unet

    unet = tiny_unet(0)
    configs = (LoKrConfig(r=2, alpha=2, target_modules=UNET_TARGETS[0], init_weights=False),
               LoHaConfig(r=2, alpha=2, target_modules=UNET_TARGETS[1], init_weights=False),
               OFTConfig(oft_block_size=4, r=0, target_modules=UNET_TARGETS[2], init_weights=False))
    with warnings.catch_warnings():  # PEFT warns on a second adapter: three tuner types here, one per layer set
        warnings.simplefilter("ignore")
        for name, cfg in zip(("kr", "ha", "oft"), configs):
            unet = inject_adapter_in_model(cfg, unet, adapter_name=name)
    built = {"peft": (unet, unet)}  # impl -> (the model to call, the module holding its adapter weights)
    saved = {k: getattr(LycorisNetwork, k) for k in dir(LycorisNetwork) if k.isupper()}
    try:  # LyCORIS keeps its preset on the class: restored below
        LycorisNetwork.apply_preset({
            "enable_conv": True, "target_module": ["Attention", "FeedForward", "ResnetBlock2D"], "target_name": [],
            "module_algo_map": {"Attention": {"algo": "diag-oft"}, "FeedForward": {"algo": "loha"},
                                "ResnetBlock2D": {"algo": "lokr"}}})
        unet = tiny_unet(0)
        net = LycorisNetwork(unet, lora_dim=2, conv_lora_dim=2, alpha=2, warn_on_unmatched=False)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    net.apply_to()
    unet.requires_grad_(False)
    built["lycoris"] = (unet, net.requires_grad_(True))
    g = torch.Generator().manual_seed(1)
    models = {}
    for impl, integration in (("peft", peft), ("lycoris", lycoris)):
        unet, holder = built[impl]
        params = [p for p in holder.parameters() if p.requires_grad]
        with torch.no_grad():  # LyCORIS starts at ΔW = 0: every factor off zero, in both models alike
            for p in params:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        models[impl] = (unet, holder)
        models[f"{impl}+specops"] = patched = copy.deepcopy((unet, holder))
        if not integration.apply(patched[1])["patched"]:
            raise RuntimeError(f"{impl}: apply() patched nothing")
    out = {}
    for impl, (unet, holder) in models.items():
        if device() != "cpu" or dtype != torch.float32:  # (diffusers warns on every .to() with a dtype)
            unet.to(device=device(), dtype=dtype)
            holder.to(device=device(), dtype=dtype)
        out[impl] = (unet, [p for p in holder.parameters() if p.requires_grad])
    return out


def _unet_rows(dtype, rounds: int) -> list[dict]:
    """The tiny UNet group: one training step of each model (module docstring), interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(2, 4, 16, 16, generator=gen), timestep=torch.tensor(10),
                  encoder_hidden_states=torch.randn(2, 7, 96, generator=gen),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=gen),
                                     "time_ids": torch.randn(2, 6, generator=gen)})
    inputs = {k: ({n: t.to(device(), dtype) for n, t in v.items()} if isinstance(v, dict) else v.to(device(), dtype))
              for k, v in inputs.items()}

    def step(unet, params):
        def call():
            unet(**inputs).sample.square().mean().backward()
            for p in params:
                p.grad = None
        return call

    calls = {impl: step(*m) for impl, m in _unet_models(dtype).items()}
    peaks = {impl: peak_bytes(call) / 2**20 for impl, call in calls.items()}
    _sync()
    times: dict[str, list[float]] = {impl: [] for impl in calls}
    for _ in range(rounds):
        for impl, call in calls.items():
            times[impl].append(_time_call(call))
    rows = [{"shape": "tiny UNet 2x16x16", "mode": "whole model", "method": "lokr+loha+oft", "impl": impl,
             "ms": fastest(t) * 1e3, "peak MB": peaks[impl]} for impl, t in times.items()]
    for r in rows:
        if r["impl"] in PATCHED:
            r["x unpatched"] = r["ms"] / next(p["ms"] for p in rows if p["impl"] == r["impl"].split("+")[0])
    return rows


def measure(quick: bool = False) -> list[dict]:
    """Every row, shape by shape, then the tiny UNet (called by specops.bench.run in place of timing `cases`)."""
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    rows = []
    for shape in QUICK if quick else FULL:
        for mode in MODES:
            rows += _group(shape, mode, dtype, rounds=ROUNDS)
    if installed("peft") and installed("lycoris"):
        rows += _unet_rows(dtype, rounds=1 if quick else ROUNDS)
    return rows


def target(row: dict, bound_row: dict, fwd_ms: float) -> float:
    """The ms specops should meet: TARGET x the bound, DENSE_GRAD's bound counting one weight gradient more."""
    extra = fwd_ms if row["method"] in DENSE_GRAD else 0.0
    return TARGET * (bound_row["ms"] + extra)


def summarize(rows: list[dict]) -> str:
    """specops rows against their target, the best peer and the peers' memory; patched peers against
    themselves unpatched and specops's own adapter."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["mode"]), []).append(r)
    for (label, mode), rs in groups.items():
        bound = rs[0]
        # forward alone: the first-layer bound of the same shape, where it was measured
        fwd = [r["ms"] for r in rows if r["shape"] == label and r["mode"] == "first-layer" and r["impl"] == "frozen"]
        fwd_ms = fwd[0] if fwd else bound["ms"]
        for r in rs:
            if r["impl"] in PATCHED:  # apply() must not slow its peer down, and should run as specops's own
                ok = r["x unpatched"] <= 1.0 and r.get("x specops", 1.0) <= TARGET
                own = f", {r['x specops']:.2f}x specops's own" if "x specops" in r else ""
                lines.append(f"- {label} {mode} {r['method']} {r['impl']}: {'met' if ok else 'MISS'} "
                             f"({r['x unpatched']:.2f}x unpatched{own})")
            if r["impl"] != "specops":
                continue
            peers = [p for p in rs if p["method"] == r["method"] and p["impl"] in PEERS]
            want = target(r, bound, fwd_ms)
            misses = []
            if r["ms"] > want:
                misses.append(f"{r['ms']:.1f} ms > target {want:.1f} ms ({r['x bound']:.2f}x bound)")
            if peers and r["ms"] > min(p["ms"] for p in peers):
                best = min(peers, key=lambda p: p["ms"])
                misses.append(f"slower than {best['impl']} ({r['x best peer']:.2f}x)")
            if peers and r["peak MB"] > 1.05 * min(p["peak MB"] for p in peers) + 1:
                low = min(peers, key=lambda p: p["peak MB"])
                misses.append(f"peak {r['peak MB']:.0f} MB > {low['impl']} {low['peak MB']:.0f} MB")
            state = "MISS " + "; ".join(misses) if misses else "met"
            lines.append(f"- {label} {mode} {r['method']}: {state}")
    return "\n".join(lines)
