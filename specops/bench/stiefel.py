"""One Stiefel-optimiser step over every SODA rotation factor of the SDXL UNet (1,680 matrices).

SODA rotates the input side of each of the 560 attention Linear layers of SDXL by R1 ⊗ R2 ⊗ R3,
the factor sizes taken from the layer's input width (640: 8,8,10; 1280: 4,16,20; 2048: 4,8,64).
The 560 layers are to_q/to_k/to_v/to_out.0 of attn1 and attn2 in 70 transformer blocks; attn2's
to_k/to_v read the 2048-wide text context, every other layer the block width.

Providers, one step each with fixed random gradients:
  fused         specops.optim.<Optimizer>(fused=True): one fused op call per factor shape
  fused-torch   the same with the batched-torch kernel of the fused op (no C++)
  loop          fused=False: the per-parameter path (the papers' formulas, dense torch ops)
  geotorch      geotorch.orthogonal on every factor + torch.optim.Adam: one step including the
                parametrisation's forward (the orthogonal map) and backward
"""
from __future__ import annotations

import torch

import specops
from specops import optim

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


def cases(quick: bool = False) -> list[Case]:
    names = ("StiefelAdam",) if quick else tuple(OPTIMIZERS)
    out = []
    for name in names:
        shape = f"SDXL SODA 1680 factors {name}"
        out.append(Case("stiefel", shape, "fused", _setup_specops(name, True)))
        out.append(Case("stiefel", shape, "fused-torch", _setup_specops(name, True, "torch")))
        out.append(Case("stiefel", shape, "loop", _setup_specops(name, False)))
        if installed("geotorch"):
            out.append(Case("stiefel", shape, "geotorch", _setup_geotorch()))
    return out


def summarize(rows: list[dict]) -> str:
    """The issue's targets: fused >= 10x faster than the loop and >= 5x faster than geotorch."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["provider"]: r["ms"] for r in rows if r["shape"] == shape}
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
