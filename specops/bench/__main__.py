"""python -m specops.bench [FAMILY ...] [--quick] [--memory] [--device cpu|cuda] [--json FILE] [--report DIR]"""
import argparse
import importlib
import json
import os
import platform

import torch

from . import FAMILIES, _plots, format_rows, roof, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops.bench", description=__doc__)
    ap.add_argument("families", nargs="*", default=list(FAMILIES), help=f"any of {FAMILIES}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--memory", action="store_true", help="also measure peak allocated bytes")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where inputs live (cuda: CUDA events)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--report", help="write report.md, report.json and the PNG plots (specops.bench._plots) of the "
                                     "whole run into this directory")
    args = ap.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown}; expected some of {FAMILIES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    peak = roof(args.device)
    header = (f"# torch {torch.__version__}, {args.device} ({where}), {torch.get_num_threads()} CPU threads\n"
              f"# roof measured now: fp32 GEMM {peak['fp32 FLOP/s'] / 1e9:.0f} GFLOP/s, bf16 GEMM "
              f"{peak['bf16 FLOP/s'] / 1e9:.0f} GFLOP/s, copy {peak['copy B/s'] / 1e9:.1f} GB/s")
    print(header)
    rows, sections = [], [header]
    for fam in args.families:
        fam_rows = run(fam, quick=args.quick, memory=args.memory, device=args.device)
        section = f"\n## {fam}\n\n{format_rows(fam_rows)}\n"
        summarize = getattr(importlib.import_module(f"specops.bench.{fam}"), "summarize", None)
        if summarize is not None:
            section += "\n" + summarize(fam_rows) + "\n"
        print(section, flush=True)
        sections.append(section)
        rows += fam_rows
        # written after every family, so a run that is stopped part-way still leaves what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        if args.report:
            os.makedirs(args.report, exist_ok=True)
            with open(os.path.join(args.report, "report.md"), "w") as f:
                f.write("\n".join(sections))
            with open(os.path.join(args.report, "report.json"), "w") as f:
                json.dump({"device": args.device, "device_name": where, "torch": torch.__version__, "roof": peak,
                           "rows": rows}, f, indent=1)
    if args.report:
        _plots.write(rows, args.report, header.replace("# ", "").replace("\n", "; "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
