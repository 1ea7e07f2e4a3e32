"""Benchmarks shared by `python -m specops.bench FAMILY` and benchmarks/bench_FAMILY.py.

Each op family has a module specops.bench.<family> with `cases(quick)`: a list of `Case`, one per
(shape, provider). A case's `setup()` allocates its inputs and returns the zero-argument callable
to time, so building every case up front costs no memory. Providers of one shape are timed side
by side in one run; ratios are taken against the case's `baseline` provider.

Roofline on this machine (shared/DESIGN.md): fp32 GEMM ~140 GFLOP/s, copy ~35 GB/s. A case's
roofline time is max(bytes / 35 GB/s, flops / 140 GFLOP/s); "roof" is that over the measured time.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
import statistics
import time
from collections.abc import Callable

PEAK_FLOPS = 140e9
PEAK_BYTES = 35e9
FAMILIES = tuple(
    m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
)  # one module per op family beside this file


# The SDXL base UNet's attention blocks: (width, attention blocks, transformer layers in each).
SDXL_BLOCKS = {
    "down_blocks.1": (640, 2, 2),
    "down_blocks.2": (1280, 2, 10),
    "up_blocks.0": (1280, 3, 10),
    "up_blocks.1": (640, 3, 2),
    "mid_block": (1280, 1, 10),
}
SDXL_CONTEXT = 2048  # width of the text context that attn2's to_k/to_v read
# (in, out) of the SDXL attention layer shapes the op benchmarks run: self, square at 1280, cross.
SDXL_LAYERS = ((640, 640), (1280, 1280), (2048, 1280))


def sdxl_attention_layers() -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of the 560 attention Linear layers of the SDXL base UNet,
    named and ordered as diffusers' UNet2DConditionModel.named_modules() gives them:
    to_q/to_k/to_v/to_out.0 of attn1 and attn2 in 70 transformer blocks (attn2's to_k/to_v read
    the 2048-wide context; every other layer is block width to block width)."""
    out = []
    for block, (width, attentions, layers) in SDXL_BLOCKS.items():
        for a in range(attentions):
            for t in range(layers):
                for attn in ("attn1", "attn2"):
                    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                        n = SDXL_CONTEXT if attn == "attn2" and proj in ("to_k", "to_v") else width
                        out.append((f"{block}.attentions.{a}.transformer_blocks.{t}.{attn}.{proj}", width, n))
    return out


@dataclasses.dataclass
class Case:
    family: str
    shape: str  # the shape being measured, e.g. "M=4096 (4,16,20) fwd"
    provider: str
    setup: Callable[[], Callable[[], object]]
    flops: float = 0.0  # useful FLOPs of the op (the same for every provider of a shape)
    bytes: float = 0.0  # minimal memory traffic of the op

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.provider}".replace(" ", "_")


def installed(module: str) -> bool:
    """Whether an optional provider's package can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def timeit(fn: Callable[[], object], min_time: float = 0.3, warmup: int = 2) -> float:
    """Median seconds per call over at least `min_time` seconds and 5 calls, after warm-up."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through torch's CPU allocator while fn() runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def run(family: str, quick: bool = False, memory: bool = False) -> list[dict]:
    """Time every case of `family`; print and return one row per case."""
    mod = importlib.import_module(f"specops.bench.{family}")
    rows = []
    for case in mod.cases(quick):
        fn = case.setup()
        sec = timeit(fn)
        row = {"family": family, "shape": case.shape, "provider": case.provider, "ms": sec * 1e3}
        if case.flops:
            row["GFLOP/s"] = case.flops / sec / 1e9
        if case.bytes:
            row["GB/s"] = case.bytes / sec / 1e9
        if case.flops or case.bytes:
            row["roof"] = max(case.bytes / PEAK_BYTES, case.flops / PEAK_FLOPS) / sec
        if memory:
            row["peak MB"] = peak_bytes(fn) / 2**20
        del fn
        rows.append(row)
    baseline = getattr(mod, "BASELINE", None)
    for row in rows:
        ref = [r for r in rows if r["shape"] == row["shape"] and r["provider"] == baseline]
        if ref:
            row[f"x vs {baseline}"] = ref[0]["ms"] / row["ms"]
    return rows


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of `rows` (the columns of the first row plus any later ones)."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c != "family"]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
