"""python -m specops.bench [FAMILY ...] [--quick] [--memory] [--json FILE]"""
import argparse
import importlib
import json
import platform

import torch

from . import FAMILIES, format_rows, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops.bench", description=__doc__)
    ap.add_argument("families", nargs="*", default=list(FAMILIES), help=f"any of {FAMILIES}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--memory", action="store_true", help="also measure peak allocated bytes")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown}; expected some of {FAMILIES}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    for fam in args.families:
        fam_rows = run(fam, quick=args.quick, memory=args.memory)
        print(f"\n## {fam}\n\n{format_rows(fam_rows)}\n", flush=True)
        summarize = getattr(importlib.import_module(f"specops.bench.{fam}"), "summarize", None)
        if summarize is not None:
            print(summarize(fam_rows) + "\n", flush=True)
        rows += fam_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
