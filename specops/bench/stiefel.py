"""One Stiefel-optimiser step over every SODA rotation factor of the SDXL UNet (1,680 matrices), and
the Cayley transform on OFT's block shapes and on that factor table.

SODA rotates the input side of each of the 560 attention Linear layers of SDXL by R1 ⊗ R2 ⊗ R3,
the factor sizes taken from the layer's input width (640: 8,8,10; 1280: 4,16,20; 2048: 4,8,64).
The 560 layers are to_q/to_k/to_v/to_out.0 of attn1 and attn2 in 70 transformer blocks; attn2's
to_k/to_v read the 2048-wide text context, every other layer the block width.

Cayley rows: forward + backward of Σ cayley(A) ⊙ G for skew A, a batch of k blocks of b (1280 = k b:
OFT's blocks from 32 to 320 wide) or the 1,680 SODA factors (one call per factor size). Providers:
specops (the device default: on the CPU the cpp kernel, block recursion above 32 x 32), torch (its
torch kernel forced: batched Cholesky) and reference (specops.stiefel.cayley_reference, one dense
LU solve per matrix, differentiated by autograd); 2 n³ (forward) + 4 n³ (backward) FLOPs per matrix.

Optimiser providers, one step each with fixed random gradients:
  fused         specops.optim.<Optimizer>(fused=True): one fused op call per factor shape
  fused-torch   the same with the batched-torch kernel of the fused op (no C++)
  loop          fused=False: the per-parameter path (the papers' formulas, dense torch ops)
  geotorch      geotorch.orthogonal on every factor + torch.optim.Adam: one step including the
                parametrisation's forward (the orthogonal map) and backward
"""
from __future__ import annotations

import contextlib

import torch

import specops
from specops import optim, stiefel

from . import Case, installed, rng, sdxl_attention_layers

BASELINE = "loop"
FACTORS = {640: (8, 8, 10), 1280: (4, 16, 20), 2048: (4, 8, 64)}
OPTIMIZERS = {
    "StiefelSGD": (optim.StiefelSGD, dict(lr=1e-2, momentum=0.9)),
    "CayleyAdam": (optim.CayleyAdam, dict(lr=1e-3)),
    "StiefelAdam": (optim.StiefelAdam, dict(lr=5e-5)),
}


def sdxl_soda_factors() -> list[tuple[str, int]]:
    """(layer name + factor index, factor size) for the 1,680 SODA factors of the SDXL UNet."""
    return [
        (f"{name}.R{i + 1}", k)
        for name, _, n in sdxl_attention_layers()
        for i, k in enumerate(FACTORS[n])
    ]


def _problem(dtype=torch.float32):
    g = rng()
    sizes = [k for _, k in sdxl_soda_factors()]
    xs = [torch.linalg.qr(torch.randn(k, k, generator=g, dtype=dtype))[0] for k in sizes]
    grads = [1e-2 * torch.randn(k, k, generator=g, dtype=dtype) for k in sizes]
    return xs, grads


def _setup_specops(name, fused, backend=None):
    cls, kw = OPTIMIZERS[name]

    def setup():
        xs, grads = _problem()
        params = [x.requires_grad_() for x in xs]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt = cls(params, fused=fused, **kw)

        def call():
            if backend is None:
                opt.step()
            else:
                with specops.backend(backend):
                    opt.step()

        return call

    return setup


def _setup_geotorch():
    import geotorch

    def setup():
        xs, grads = _problem()
        mods = torch.nn.ModuleList()
        for x in xs:
            lin = torch.nn.Linear(x.shape[0], x.shape[0], bias=False)
            geotorch.orthogonal(lin, "weight")
            lin.weight = x
            mods.append(lin)
        opt = torch.optim.Adam(mods.parameters(), lr=1e-3)

        def call():
            opt.zero_grad(set_to_none=True)
            loss = sum((m.weight * g).sum() for m, g in zip(mods, grads))
            loss.backward()
            opt.step()

        return call

    return setup


CAYLEY_BLOCKS = ((40, 32), (20, 64), (10, 128), (8, 160), (4, 320))  # (k blocks, b): 1280 features


def _setup_cayley(sizes: dict[int, int], provider: str):
    """Cayley forward + backward over {n: count} skew matrices (one call per size)."""

    def setup():
        g = rng()
        As, Gs = [], []
        for n, count in sizes.items():
            Q = torch.randn(count, n, n, generator=g)
            As.append((0.1 * (Q - Q.mT)).requires_grad_())
            Gs.append(torch.randn(count, n, n, generator=g))
        fn = stiefel.cayley_reference if provider == "reference" else stiefel.cayley

        def call():
            with specops.backend(provider) if provider == "torch" else contextlib.nullcontext():
                for A, G in zip(As, Gs):
                    fn(A).backward(G)

        return call

    return setup


def _cayley_cases() -> list[Case]:
    soda: dict[int, int] = {}
    for _, k in sdxl_soda_factors():
        soda[k] = soda.get(k, 0) + 1
    shapes = [(f"cayley {k} blocks of {b}", {b: k}) for k, b in CAYLEY_BLOCKS]
    shapes.append(("cayley SODA 1680 factors", soda))
    return [Case("stiefel", shape, provider, _setup_cayley(sizes, provider),
                 flops=sum(6 * n**3 * c for n, c in sizes.items()), bytes=sum(5 * 4 * n * n * c for n, c in sizes.items()))
            for shape, sizes in shapes for provider in ("specops", "torch", "reference")]


def cases(quick: bool = False) -> list[Case]:
    names = ("StiefelAdam",) if quick else tuple(OPTIMIZERS)
    out = [] if quick else _cayley_cases()
    for name in names:
        shape = f"SDXL SODA 1680 factors {name}"
        out.append(Case("stiefel", shape, "fused", _setup_specops(name, True)))
        out.append(Case("stiefel", shape, "fused-torch", _setup_specops(name, True, "torch")))
        out.append(Case("stiefel", shape, "loop", _setup_specops(name, False)))
        if installed("geotorch"):
            out.append(Case("stiefel", shape, "geotorch", _setup_geotorch()))
    return out


CAYLEY_TARGET = 3.0  # the Cayley transform's speed-up over the per-matrix reference


def summarize(rows: list[dict]) -> str:
    """The targets: fused >= 10x faster than the loop and >= 5x faster than geotorch; cayley >= 3x the reference."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["provider"]: r["ms"] for r in rows if r["shape"] == shape}
        if "reference" in by:
            x = by["reference"] / by["specops"]
            lines.append(f"- {shape}: specops {by['specops']:.2f} ms, {x:.1f}x vs reference (target {CAYLEY_TARGET:g}x: "
                         f"{'met' if x >= CAYLEY_TARGET else 'MISSED'}), torch kernel {by['torch']:.2f} ms")
            continue
        if "fused" not in by:
            continue
        f = by["fused"]
        parts = [f"fused {f:.2f} ms"]
        if "loop" in by:
            parts.append(f"{by['loop'] / f:.1f}x vs loop (target 10x: {'met' if by['loop'] >= 10 * f else 'MISSED'})")
        if "geotorch" in by:
            parts.append(
                f"{by['geotorch'] / f:.1f}x vs geotorch (target 5x: {'met' if by['geotorch'] >= 5 * f else 'MISSED'})"
            )
        lines.append(f"- {shape}: " + ", ".join(parts))
    return "\n".join(lines)
