"""kron_matmul on SODA's SDXL factor sizes, fp32 and bf16: dense vs torch composites vs specops kernels."""
from __future__ import annotations

import math
import string

import torch

import specops

from . import Case, by_shape, kernel_backends, rng

BASELINE = "torch"
# Widths of SDXL layers with SODA's published factorisations, plus a 4-factor case.
SHAPES = {640: (8, 8, 10), 1280: (4, 16, 20), 2048: (4, 8, 64), 768: (6, 8, 16), 4096: (8, 8, 8, 8)}


def _flops(M: int, dims) -> float:
    """2·M·Σ_i (∏_{l<i} p_l)·p_i·q_i·(∏_{l>i} q_l) for square factors = 2·M·P·Σ p_i."""
    return 2.0 * M * math.prod(dims) * sum(dims)


def _einsum(x, fs):
    letters = string.ascii_letters
    k = len(fs)
    ins, outs = letters[:k], letters[k : 2 * k]
    eq = f"m{ins}," + ",".join(f"{a}{b}" for a, b in zip(ins, outs)) + f"->m{outs}"
    y = torch.einsum(eq, x.view(x.shape[0], *(f.shape[0] for f in fs)), *fs)
    return y.reshape(x.shape[0], -1)


def _providers():
    """name -> (forward callable, backend to force or None)."""
    provs = {
        "dense": (lambda x, fs: x @ specops.kron_reference(fs), None),
        "einsum": (_einsum, None),
        "torch": (specops.kron_matmul, "torch"),
    }
    for name in kernel_backends():
        provs[name] = (specops.kron_matmul, name)
    return provs


def _setup(M, dims, fn, backend, backward, dtype):
    def setup():
        g = rng()
        P = math.prod(dims)
        x = torch.randn(M, P, generator=g).to(dtype).requires_grad_(backward)
        fs = [torch.linalg.qr(torch.randn(p, p, generator=g))[0].to(dtype).requires_grad_(backward) for p in dims]
        ctx = specops.backend(backend) if backend else None

        def call():
            if ctx is not None:
                with specops.backend(backend):
                    y = fn(x, fs)
                    if backward:
                        y.backward(torch.ones_like(y))
            else:
                y = fn(x, fs)
                if backward:
                    y.backward(torch.ones_like(y))
            if backward:
                x.grad = None
                for f in fs:
                    f.grad = None

        return call

    return setup


def cases(quick: bool = False) -> list[Case]:
    out = []
    rows = (1024,) if quick else (1024, 4096)
    widths = (1280,) if quick else tuple(SHAPES)
    # bf16 (what people train in) at the run's largest M, where a dense bf16 GEMM runs on the matrix units
    runs = [(M, torch.float32) for M in rows] + [(rows[-1], torch.bfloat16)]
    for M, dtype in runs:
        for width in widths:
            dims = SHAPES[width]
            P = math.prod(dims)
            for backward in (False, True):
                f = _flops(M, dims) * (3 if backward else 1)
                b = dtype.itemsize * M * P * (5 if backward else 2)
                shape = f"M={M} {dims} {'fwd+bwd' if backward else 'fwd'}" + (" bf16" if dtype != torch.float32 else "")
                for name, (fn, be) in _providers().items():
                    if name == "dense" and backward and P >= 4096:
                        continue  # 3 x 137 GFLOP per call: minutes, and nothing to learn
                    out.append(Case("kron", shape, name, _setup(M, dims, fn, be, backward, dtype), f, b, dtype))
    return out


def summarize(rows: list[dict]) -> str:
    """Each kernel backend of the run (cpp on the CPU; triton, cuda on a GPU) vs the best torch composite
    and vs dense, per shape."""
    lines = []
    for shape, providers in by_shape(rows).items():
        by = {p: r["ms"] for p, r in providers.items()}
        best = min(by[p] for p in ("torch", "einsum") if p in by)
        for kernel in (k for k in ("cpp", "triton", "cuda") if k in by):
            parts = [f"{kernel} {by[kernel]:.2f} ms: {best / by[kernel]:.1f}x vs best torch composite"]
            if "dense" in by:
                parts.append(f"{by['dense'] / by[kernel]:.1f}x vs dense")
            lines.append(f"- {shape}: " + ", ".join(parts))
    return "\n".join(lines)
