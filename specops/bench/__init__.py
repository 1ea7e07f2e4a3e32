"""Benchmarks shared by `python -m specops.bench FAMILY` and benchmarks/bench_FAMILY.py.

Each op family has a module specops.bench.<family> with `cases(quick)`: a list of `Case`, one per
(shape, provider). A case's `setup()` allocates its inputs and returns the zero-argument callable
to time; the providers of one shape are set up together and take turns (ROUNDS), so a slow spell
of the machine hits them alike, and the fastest call is reported (`fastest`); ratios are taken against the
family's BASELINE provider.

The roof is measured at the start of a run, on the device and threads the run uses (`roof()`: fp32 and
bf16 GEMM with torch.mm, copy bandwidth), never assumed: the machine differs between sessions. A case's
roofline time is max(bytes / copy bandwidth, flops / fp32 GEMM rate); "roof" is that over the measured
time. A family may instead define `measure(quick)`, which times and returns its own rows (its own
interleaving and rounds). `run(family, device="cuda")` allocates every input on the GPU (setups draw from `rng()` and the
default device) and times with CUDA events.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
import time
from collections.abc import Callable

import torch

_device = "cpu"  # the device of the run in progress (set by run())
# (the zip family's module becomes this package's attribute `zip` once imported: builtins.zip here)
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
    dtype: torch.dtype = torch.float32  # of the inputs: 16-bit ones are held to the bf16 GEMM peak

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.provider}".replace(" ", "_")


def installed(module: str) -> bool:
    """Whether an optional provider's package can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def device() -> str:
    """The device the running benchmark allocates on."""
    return _device


def rng(seed: int = 0) -> torch.Generator:
    """A seeded generator on the benchmark's device (setups draw their inputs from it)."""
    return torch.Generator(device=_device).manual_seed(seed)


def kernel_backends() -> list[str]:
    """specops's kernel backends that run on the benchmark's device (Triton on CPU only interprets)."""
    from specops._backend import _why_not

    names = ("cpp",) if _device == "cpu" else ("triton", "cuda")
    return [b for b in names if _why_not(b, _device) is None]


def _sync():
    if _device == "cuda":
        torch.cuda.synchronize()


def _time_call(fn: Callable[[], object]) -> float:
    """Seconds for one call: wall clock on the CPU, CUDA events around it on the GPU."""
    if _device != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def fastest(times: list[float]) -> float:
    """What a run reports for repeated timings of one call: the fastest. Other load on the machine only slows a
    call down, so the minimum is the steadiest estimate of the call's own cost (on a shared 2-core VM, medians
    of 5-9 interleaved rounds moved by 20% between runs, the minima by a few percent)."""
    return min(times)


def timeit(fn: Callable[[], object], min_time: float = 0.3, warmup: int = 2) -> float:
    """Seconds per call (`fastest`) over at least `min_time` seconds and 5 calls, after warm-up."""
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        times.append(_time_call(fn))
        if len(times) >= 200:
            break
    return fastest(times)


@functools.cache
def roof(dev: str = "cpu") -> dict[str, float]:
    """This machine's ceilings on `dev`, measured now: fp32 and bf16 GEMM FLOP/s, copy bytes/s."""
    out = {}
    with _on(dev):
        for name, dtype in (("fp32 FLOP/s", torch.float32), ("bf16 FLOP/s", torch.bfloat16)):
            out[name] = _gemm_rate(dtype, 1280 if dev == "cpu" else 8192)
        # (written first: a never-written CPU buffer reads as the kernel's one zero page, from the caches,
        # which made a 64 MB copy look 3.5x faster than memory allows)
        src = torch.ones(64 * 2**20 if dev == "cpu" else 2**30, dtype=torch.uint8)
        dst = torch.empty_like(src)
        out["copy B/s"] = 2.0 * src.numel() / timeit(lambda: dst.copy_(src), min_time=0.2)  # read + write
    return out


def _gemm_rate(dtype: torch.dtype, k_max: int) -> float:
    """FLOP/s of torch.mm (3.2k x k @ k x k), k doubled from 128 up to k_max while one product takes
    under 20 ms: a CPU without native bf16 runs bf16 GEMM ~1000x slower, and must not stall the run."""
    k = 128
    while True:
        a, b = torch.randn(int(3.2 * k), k, dtype=dtype), torch.randn(k, k, dtype=dtype)
        sec = timeit(lambda: torch.mm(a, b), min_time=0.2 if k >= k_max else 0.0, warmup=1)
        if k >= k_max or sec > 0.02:
            return 2.0 * a.shape[0] * k * k / sec
        k *= 2


@contextlib.contextmanager
def _on(dev: str):
    global _device
    prev, _device = _device, dev
    try:
        with torch.device(dev):
            yield
    finally:
        _device = prev


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while fn() runs: torch's CPU allocator (profiler memory events) or CUDA's."""
    if _device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
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


def run(family: str, quick: bool = False, memory: bool = False, device: str = "cpu") -> list[dict]:
    """Time every case of `family` on `device`; return one row per case."""
    mod = importlib.import_module(f"specops.bench.{family}")
    peak = roof(device)
    if hasattr(mod, "measure"):  # a family that interleaves its providers times its own rows
        with _on(device):
            return [{"family": family, **row} for row in mod.measure(quick)]
    rows = []
    shapes: dict[str, list[Case]] = {}
    with _on(device):  # (cases too: which kernel backends they name depends on the device)
        for case in mod.cases(quick):
            shapes.setdefault(case.shape, []).append(case)
        for cases in shapes.values():
            fns = [case.setup() for case in cases]
            for sec, case, fn in builtins.zip(_interleaved(fns), cases, fns):
                rows.append(_row(family, case, fn, sec, peak, memory))
            del fns
    baseline = getattr(mod, "BASELINE", None)
    for row in rows:
        ref = [r for r in rows if r["shape"] == row["shape"] and r["provider"] == baseline]
        if ref:
            row[f"x vs {baseline}"] = ref[0]["ms"] / row["ms"]
    return rows


ROUNDS = 5  # the providers of a shape take turns this often, so a slow spell of the machine hits them alike


def _interleaved(fns: list[Callable[[], object]], min_time: float = 0.3) -> list[float]:
    """Seconds per call (`fastest`) of each of `fns`, timed in ROUNDS turns of at least 2 calls and
    min_time / ROUNDS seconds each, after 2 warm-up calls."""
    for fn in fns:
        for _ in range(2):
            fn()
    _sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(ROUNDS):
        for fn, t in builtins.zip(fns, times):
            start, n = time.perf_counter(), 0
            while n < 2 or time.perf_counter() - start < min_time / ROUNDS:
                t.append(_time_call(fn))
                n += 1
                if n >= 70:
                    break
    return [fastest(t) for t in times]


def _row(family: str, case: Case, fn: Callable[[], object], sec: float, peak: dict, memory: bool) -> dict:
    row = {"family": family, "shape": case.shape, "provider": case.provider, "ms": sec * 1e3}
    if case.flops:
        row["GFLOP/s"] = case.flops / sec / 1e9
    if case.bytes:
        row["GB/s"] = case.bytes / sec / 1e9
    if case.flops or case.bytes:
        flops_peak = peak["bf16 FLOP/s"] if case.dtype in (torch.bfloat16, torch.float16) else peak["fp32 FLOP/s"]
        row["roof"] = max(case.bytes / peak["copy B/s"], case.flops / flops_peak) / sec
    if memory:
        row["peak MB"] = peak_bytes(fn) / 2**20
    return row


def min_ms(row: dict) -> float:
    """The least time the row's FLOP and byte counts allow on this machine: its roof fraction's limit."""
    return row["roof"] * row["ms"]


def verdict(ratio: float, target: float, bound: float | None = None) -> str:
    """A speed-up against its target: met, MISSED, or, where the FLOP/byte-count bound on the speed-up
    is below the target, how close to that bound it came."""
    if ratio >= target:
        return "met"
    if bound is not None and bound < target:
        return f"target above its bound: {ratio / bound:.0%} of the bound"
    return "MISSED"


def by_shape(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{shape: {provider: row}}, shapes in the order the rows first give them (what summaries read)."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["shape"], {})[r["provider"]] = r
    return out


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
