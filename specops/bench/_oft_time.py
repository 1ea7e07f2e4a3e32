"""OFT and the retractions at SDXL widths, fp32: the "no hang" figures of the README.

    python -m specops.bench._oft_time [--threads 2] [--tokens 77 2048]

OFT: make_adapter("oft", nn.Linear(n, n)) (default 4 blocks of n/4), Q ~ N(0, 0.01), forward +
backward, min and median of 10 calls after one warm-up, for n = 640 and 1280. Retractions: every
method on a batch of 4 of (1280, 160) and (640, 320), one call after one warm-up. A script, not a
timing family of `python -m specops.bench` (hence the leading underscore).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from specops import stiefel
from specops.adapters import make_adapter


def _times(fn, calls: int) -> list[float]:
    fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops.bench._oft_time", description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[77, 2048])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for tokens in args.tokens:
        for n in (640, 1280):
            ad = make_adapter("oft", nn.Linear(n, n))
            with torch.no_grad():
                ad.Q.normal_(std=0.01)
            x = torch.randn(1, tokens, n)

            def step():
                ad.Q.grad = None
                ad(x).square().sum().backward()

            ts = _times(step, 10)
            print(f"oft width {n} tokens {tokens}: fwd+bwd min {min(ts) * 1e3:.1f} ms, "
                  f"median {statistics.median(ts) * 1e3:.1f} ms")
    for n, p in ((1280, 160), (640, 320)):
        X = torch.linalg.qr(torch.randn(4, n, p))[0]
        V = stiefel.project(X, 0.1 * torch.randn_like(X))
        for method in stiefel.RETRACTIONS:
            (t,) = _times(lambda: stiefel.retract(X, V, method), 1)
            print(f"retract {method} batch 4 x ({n}, {p}): {t * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
