"""PNG plots of one benchmark run, written beside its report (python -m specops.bench --report DIR).

- speedup-<family>.png: how many times faster specops runs than each other implementation of the same
  computation, per shape (log scale, 1 = as fast). The peers family: specops's adapter over each peer's
  (PEFT, LyCORIS default and bypass), and each peer model after apply() over the same model without it;
  the other families: every provider over the family's baseline (the "x vs <baseline>" column).
- roof.png: the fraction of its roof (max(bytes / copy bandwidth, flops / GEMM peak), measured at the
  start of the run) that each kernel reaches, for every row that reports one.

matplotlib is a bench extra: without it no plot is written and the run says so.
"""
from __future__ import annotations

import os

from .peers import PATCHED, PEERS


def _peer_bars(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(label, against, x) for the peers family: specops vs each peer, apply() vs unpatched."""
    bars = []
    for r in rows:
        label = f"{r['shape']} {r['mode']} {r['method']}"
        if r["impl"] == "specops":
            for p in rows:
                if (p["shape"], p["mode"], p["method"], p["impl"] in PEERS) == (r["shape"], r["mode"], r["method"], True):
                    bars.append((label, f"specops vs {p['impl']}", p["ms"] / r["ms"]))
        elif r["impl"] in PATCHED:
            bars.append((label, f"{r['impl']} vs {r['impl'].split('+')[0]}", 1.0 / r["x unpatched"]))
    return bars


def _baseline_bars(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(shape, provider vs baseline, x) from each row's "x vs <baseline>" column."""
    bars = []
    for r in rows:
        for k, v in r.items():
            if k.startswith("x vs ") and r.get("provider") != k[5:]:
                bars.append((r["shape"], f"{r['provider']} {k[2:]}", v))
    return bars


def _barh(plt, groups: list[tuple[str, list[tuple[str, float]]]], title: str, xlabel: str, log: bool, ref: float):
    """Horizontal bars, one group of series per label; returns the figure."""
    series = sorted({s for _, bars in groups for s, _ in bars})
    height = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.32 * len(groups) * max(1, len(series)) ** 0.5))
    for j, s in enumerate(series):
        ys = [i + j * height for i, (_, bars) in enumerate(groups) for name, _ in bars if name == s]
        xs = [v for _, bars in groups for name, v in bars if name == s]
        ax.barh(ys, xs, height=height, label=s)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(groups))], [g for g, _ in groups], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(ref, color="black", linewidth=0.8)
    if log:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _grouped(bars: list[tuple[str, str, float]]) -> list[tuple[str, list[tuple[str, float]]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for label, series, v in bars:
        out.setdefault(label, []).append((series, v))
    return list(out.items())


def write(rows: list[dict], directory: str, header: str) -> list[str]:
    """Write the plots of `rows` (a whole run, every family) into `directory`; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# no plots: matplotlib is not installed (pip install 'specops[bench]')")
        return []
    names = []
    families = list(dict.fromkeys(r["family"] for r in rows))
    for fam in families:
        fam_rows = [r for r in rows if r["family"] == fam]
        bars = _peer_bars(fam_rows) if fam == "peers" else _baseline_bars(fam_rows)
        if not bars:
            continue
        fig = _barh(plt, _grouped(bars), f"{fam}: speed-up (x faster; 1 = as fast)\n{header}", "x faster", True, 1.0)
        names.append(f"speedup-{fam}.png")
        fig.savefig(os.path.join(directory, names[-1]), dpi=110)
        plt.close(fig)
    roofs = [(f"{r['family']}: {r['shape']}", r.get("provider") or r.get("impl"), r["roof"]) for r in rows if r.get("roof")]
    if roofs:
        fig = _barh(plt, _grouped(roofs), f"fraction of roof per kernel\n{header}", "fraction of roof", False, 1.0)
        names.append("roof.png")
        fig.savefig(os.path.join(directory, names[-1]), dpi=110)
        plt.close(fig)
    return names
