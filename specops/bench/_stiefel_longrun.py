"""Long-run numerics of the Stiefel optimisers: does ||X^T X - I||_F stay at round-off?

    python -m specops.bench._stiefel_longrun [--steps N] [--copies K | --all] [--threads T] [--seed S]

Steps each of StiefelSGD, CayleyAdam and StiefelAdam (fused, the default CPU backend, float32,
the hyper-parameters of specops.bench.stiefel.OPTIMIZERS) N times (default 10,000) on the SDXL
SODA factor shapes, with fresh random gradients 1e-2 N(0, 1) every step, and prints the largest
orthogonality error (specops.stiefel.orthogonality_error, of the fp32 factors measured in fp64)
at log-spaced checkpoints and at the end, how far the factors moved, and the wall time. Exits 1
when an end error is above the target 1e-5.

The 1,680 factors (specops.bench.stiefel.sdxl_soda_factors) come in six square sizes: 4, 8, 10,
16, 20 and 64. A step of the whole table takes 120-200 ms on one thread of a loaded 2-core
machine, 10,000 steps 20-35 minutes per optimiser, so by default the run steps a representative
subset: K (default 8) factors of each size (48 in all), in one optimiser, fused per size exactly
as the full table is (9-24 ms a step). --all steps all 1,680.
--threads (default 1): torch's intra-op threads; on a loaded machine the barriers of a parallel
region cost more than a few small matrices gain from a second thread.
A script, not a test (it takes minutes), and not a timing family of `python -m specops.bench`:
hence the leading underscore.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from specops.stiefel import orthogonality_error

from .stiefel import OPTIMIZERS, sdxl_soda_factors

TARGET = 1e-5
GRAD_SCALE = 1e-2  # the gradient scale of the stiefel benchmark


def factor_sizes(copies: int | None) -> dict[int, int]:
    """{factor size: how many}, the full SDXL table when copies is None."""
    table = collections.Counter(k for _, k in sdxl_soda_factors())
    return dict(sorted(table.items())) if copies is None else {k: copies for k in sorted(table)}


def checkpoints(steps: int) -> list[int]:
    """1, 10, 100, ... below `steps`, then `steps`."""
    out, c = [], 1
    while c < steps:
        out.append(c)
        c *= 10
    return out + [steps]


def run(name: str, sizes: dict[int, int], steps: int, seed: int = 0) -> dict:
    """Step optimiser `name` on `sizes` factors; its errors at the checkpoints, motion and wall time."""
    cls, kw = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(seed)
    start = {k: torch.linalg.qr(torch.randn(c, k, k, generator=g, dtype=torch.float64))[0].float()
             for k, c in sizes.items()}
    params = {k: [x.clone().requires_grad_() for x in xs] for k, xs in start.items()}
    opt = cls([p for ps in params.values() for p in ps], **kw)

    def max_error():
        return max(orthogonality_error(torch.stack(ps).detach().double()).max().item() for ps in params.values())

    errors = {0: max_error()}
    marks = set(checkpoints(steps))
    t0 = time.perf_counter()
    for it in range(1, steps + 1):
        for k, ps in params.items():
            grads = GRAD_SCALE * torch.randn(len(ps), k, k, generator=g)
            for p, gr in zip(ps, grads.unbind(0)):
                p.grad = gr
        opt.step()
        if it in marks:
            errors[it] = max_error()
    wall = time.perf_counter() - t0  # includes the checkpoint measurements (a few ms)
    moved = torch.cat([(torch.stack(ps).detach() - start[k]).flatten(1).norm(dim=1) for k, ps in params.items()])
    return {"errors": errors, "moved": (moved.min().item(), moved.max().item()), "wall": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops.bench._stiefel_longrun", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10_000, help="steps per optimiser (default 10,000)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--copies", type=int, default=8, help="factors of each of the six sizes (default 8)")
    group.add_argument("--all", action="store_true", help="all 1,680 SDXL SODA factors")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps: expected >= 1, got {args.steps}")
    if not args.all and args.copies < 1:
        ap.error(f"--copies: expected >= 1, got {args.copies}")
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    sizes = factor_sizes(None if args.all else args.copies)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {sum(sizes.values())} fp32 factors "
          f"{' '.join(f'{c}x{k}x{k}' for k, c in sizes.items())}; {args.steps} steps; target {TARGET:g}")
    ok = True
    for name in OPTIMIZERS:
        r = run(name, sizes, args.steps, args.seed)
        marks = ", ".join(f"{it}: {e:.2e}" for it, e in r["errors"].items())
        end = r["errors"][args.steps]
        ok &= end <= TARGET
        print(f"{name:12s} max ||X^T X - I||_F at step {marks}; end {end:.2e} "
              f"({'met' if end <= TARGET else 'MISSED'}); moved ||X - X0||_F {r['moved'][0]:.3g}..{r['moved'][1]:.3g}; "
              f"{r['wall']:.1f} s ({r['wall'] / args.steps * 1e3:.2f} ms/step)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
