"""Spectral shift on SDXL attention shapes: one training step (forward + backward) per layer.

Shapes: in -> out = 640 -> 640, 1280 -> 1280, 2048 -> 1280 (attn2's to_k/to_v read the 2048-wide
text context), tokens M = 2 x 1024 and 2 x 4096, fp32. Only delta and the rotation factors require
gradients, as in training (the input and the frozen U, S, Vh do not).

Providers, side by side:
  specops       specops.spectral_linear (path chosen by specops.spectral.linear_path; rotation on
                the input side, SODA's factor sizes), on the device's default kernels
  torch         the same on its torch kernels (which kernels a device should default to)
  soda_authors  the SODA authors' formulation: R = kron(kron(R1, R2), R3) materialised, x @ R, then a
                freshly rebuilt U @ diag(relu(S + delta)) @ Vh and F.linear: torch autograd
  svdiff        (no rotation) the SVDiff rebuild U @ diag(relu(S + delta)) @ Vh then F.linear
Shapes marked "rot" compare specops with soda_authors, "norot" with svdiff. "lowrank" shapes: one
training step of specops.lowrank_linear (y + ((x Aᵀ) diag(s)) Bᵀ at rank r, x, A, s and B requiring
gradients, as a LoRA / AdaLoRA branch inside a UNet), provider specops (the device default: the cpp
kernel on the CPU) beside torch (the op's torch kernel: BLAS GEMMs, PEFT's LoRA composition); flops
are the six products' 6·M·r·(in + out), bytes the rank-independent reads of x (twice), y and the output
gradient and writes of the output and x's gradient. Plus the one-time
`decompose` (SVD and LQ) for every distinct SDXL attention weight shape; `summarize` multiplies by
the number of such layers (560 in all) for the total a user pays first.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn.functional as F

import specops
from specops import spectral as sp

from . import SDXL_LAYERS, Case, by_shape, min_ms, rng, sdxl_attention_layers, verdict

BASELINE = "soda_authors"


def sdxl_attention_shapes() -> dict[tuple[int, int], int]:
    """{(out, in): number of layers} over the 560 attention Linear layers of the SDXL base UNet
    (to_q/to_k/to_v/to_out.0 of attn1 and attn2 in 70 transformer blocks)."""
    return dict(collections.Counter((out, n) for _, out, n in sdxl_attention_layers()))


def _soda_authors(x, U, S, Vh, delta, rot):
    R = torch.kron(torch.kron(rot[0], rot[1]), rot[2])
    W = U @ torch.diag(F.relu(S + delta)) @ Vh
    return F.linear(x @ R, W)


def _svdiff(x, U, S, Vh, delta, rot):
    return F.linear(x, U @ torch.diag(F.relu(S + delta)) @ Vh)


def _specops(x, U, S, Vh, delta, rot):
    return sp.spectral_linear(x, U, S, Vh, delta, rotation=rot or None)


def _specops_torch(*args):
    """specops on its torch kernels (the forward's choice reaches the backward too): beside the device
    default, which backend a device should default to."""
    with specops.backend("torch"):
        return _specops(*args)


PROVIDERS = {"specops": _specops, "torch": _specops_torch, "soda_authors": _soda_authors, "svdiff": _svdiff}


def _setup_step(M, n, out, rotated, fn):
    def setup():
        g = rng()
        k = min(out, n)
        U = torch.linalg.qr(torch.randn(out, k, generator=g))[0]
        Vh = torch.linalg.qr(torch.randn(n, k, generator=g))[0].mT.contiguous()
        S = torch.rand(k, generator=g) + 0.1
        delta = torch.zeros(k, requires_grad=True)
        rot = [torch.eye(p).requires_grad_() for p in sp.SODA_TABLE[n]] if rotated else []
        x = torch.randn(2, M // 2, n, generator=g)
        gy = torch.randn(2, M // 2, out, generator=g)
        params = [delta, *rot]

        def step():
            fn(x, U, S, Vh, delta, rot).backward(gy)
            for p in params:
                p.grad = None

        return step

    return setup


def _setup_lowrank(M, n, out, r, backend):
    def setup():
        g = rng()
        x = torch.randn(M, n, generator=g, requires_grad=True)
        A, s = torch.randn(r, n, generator=g) / n**0.5, torch.rand(r, generator=g)
        B, y = torch.randn(out, r, generator=g), torch.randn(M, out, generator=g)
        gy = torch.randn(M, out, generator=g)
        params = [x, A.requires_grad_(), s.requires_grad_(), B.requires_grad_()]

        def step():
            with specops.backend(backend) if backend else contextlib.nullcontext():
                sp.lowrank_linear(x, A, s, B, y).backward(gy)
            for p in params:
                p.grad = None

        return step

    return setup


def _setup_decompose(out, n, method, raw):
    def setup():
        W = 0.02 * torch.randn(out, n, generator=rng())
        if raw:
            return (lambda: torch.linalg.svd(W, full_matrices=False)) if method == "svd" else (
                lambda: torch.linalg.qr(W.mT))
        return lambda: sp.decompose(W, method)

    return setup


def cases(quick: bool = False) -> list[Case]:
    out = []
    for M in (2048,) if quick else (2048, 8192):
        for n, o in SDXL_LAYERS:
            for rotated in (True, False):
                sizes = sp.SODA_TABLE[n] if rotated else ()
                flops = min(sp.linear_path(M, o, n, min(o, n), rotation_sizes=sizes)[1].values())
                nbytes = 4.0 * M * (n + 2 * o)  # read x and grad_y, write y
                shape = f"{n}->{o} M={M} {'rot' if rotated else 'norot'}"
                for name in ("specops", "torch", "soda_authors" if rotated else "svdiff"):
                    out.append(Case("spectral", shape, name, _setup_step(M, n, o, rotated, PROVIDERS[name]),
                                    flops, nbytes))
    for n, o in SDXL_LAYERS[1:]:
        for r in (8,) if quick else (4, 8, 16):
            cost = dict(flops=6.0 * 2048 * r * (n + o), bytes=4.0 * 2048 * (3 * n + 3 * o))
            out += [Case("spectral", f"lowrank {n}->{o} M=2048 r={r}", name, _setup_lowrank(2048, n, o, r, backend),
                         **cost) for name, backend in (("specops", None), ("torch", "torch"))]
    shapes = sdxl_attention_shapes()
    for (o, n), count in shapes.items() if not quick else list(shapes.items())[:1]:
        for method in ("svd", "lq"):
            for raw in (False, True):
                name = ("torch.linalg." + method if method == "svd" else "torch.linalg.qr") if raw else "specops"
                out.append(Case("spectral", f"decompose {method} {o}x{n} (x{count})", name,
                                _setup_decompose(o, n, method, raw)))
    return out


def summarize(rows: list[dict]) -> str:
    """The issue's targets per shape, and the one-time decompose cost of all SDXL attention layers."""
    lines = []
    for shape, by in by_shape(rows).items():
        if shape.startswith(("decompose", "lowrank")) or "specops" not in by:
            continue
        other, target = ("soda_authors", 2.5) if "soda_authors" in by else ("svdiff", 1.15)
        ratio = by[other]["ms"] / by["specops"]["ms"]
        bound = by[other]["ms"] / min_ms(by["specops"])  # specops at the roof of the cheapest formulation
        line = f"- {shape}: specops {by['specops']['ms']:.1f} ms, {ratio:.2f}x vs {other}, bound {bound:.2f}x " \
               f"(target {target}x: {verdict(ratio, target, bound)})"
        if "peak MB" in by["specops"]:
            a, b = by["specops"]["peak MB"], by[other]["peak MB"]
            line += f"; peak {a:.0f} MB vs {b:.0f} MB ({'not higher' if a <= b else 'HIGHER'})"
        lines.append(line)
    for method in ("svd", "lq"):
        total = n = 0
        for r in rows:
            if r["shape"].startswith(f"decompose {method}") and r["provider"] == "specops":
                count = int(r["shape"].rsplit("(x", 1)[1].rstrip(")"))
                total += count * r["ms"] / 1e3
                n += count
        if n:
            lines.append(f"- decompose {method} of {n} SDXL attention weights: {total:.1f} s in all")
    return "\n".join(lines)

