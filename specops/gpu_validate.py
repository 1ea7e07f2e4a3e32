"""`make gpu-validate`: build, test and benchmark specops on a GPU machine where nothing is built yet.

    python3 specops/gpu_validate.py [--dry-run] [--quick] [--out DIR]   (a plain script: it imports no torch)

Uses the machine's own python3 and torch (on this workplace's lent H200: Python 3.12, torch 2.11 with
CUDA 13.0, Triton 3.6, no network). Packages the machine lacks travel as wheels in wheels/, fetched
beforehand on a networked machine by `make gpu-wheels`. Steps, each with its own time limit; a failed
step is reported and the later ones still run (without the CUDA build, the tests and benchmarks cover
the torch and triton backends only):
  probe   nvidia-smi, torch / CUDA / Triton versions, the GPU's name and compute capability
  wheels  pip install --no-index --no-deps --target SITE wheels/*.whl (a temporary folder; PYTHONPATH for
          what follows)
  build   the CUDA extension for this GPU's arch, in place (pip install --no-build-isolation -e .)
  info    python -m specops info: the CUDA kernels must be there
  tests   the device matrix (tests/test_devices.py: every op x GPU backend against the reference,
          fp64 gradcheck, opcheck, compile, fused optimisers, adapters) and the CUDA kernels'
          registration (pytest-xdist when installed)
  suite   the rest of the test suite, unless --quick
  bench   python -m specops.bench --device cuda --memory --quick (CUDA events; roof measured on the
          GPU), every family (--quick: kron, stiefel, zip), the kernel families first; its report is
          rewritten after every family, so a bench stopped at its limit still leaves what it measured
Everything lands in DIR (default $OUT when set, else gpu_validate_out/): gpu_validate.md and .json
(each step's command, status, seconds and output tail), gpu_validate.log (every step's whole output),
tests.xml, suite.xml, bench/report.md, report.json and the plots.
The limits add up to 10 minutes (--quick: 5.5, about 3 expected) on one H100/H200-class GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = shlex.quote(sys.executable)
PROBE = ("import torch, importlib.util as u; c = torch.cuda.is_available(); "
         "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', "
         "torch.cuda.get_device_name() if c else None, 'capability', torch.cuda.get_device_capability() if c else None, "
         "'triton', __import__('triton').__version__ if u.find_spec('triton') else None)")
ARCH = "import torch; print('%d%d' % torch.cuda.get_device_capability())"


def steps(out: Path, site: Path, quick: bool) -> list[tuple[str, str, int]]:
    """(name, shell command, seconds allowed) in order."""
    xdist = f"-n {max(2, min(12, os.cpu_count() or 2))}" if _has("xdist") else ""
    families = "kron stiefel zip" if quick else "kron spectral stiefel zip sdxl adalora peers"

    def pytest(files: str, xml: str, limit: int) -> tuple[str, int]:
        # SIGINT a little before the limit: pytest then still prints its summary and writes its xml
        return (f"SPECOPS_EXPECT_CUDA_KERNELS=1 timeout -s INT -k 10 {limit - 15} {PY} -m pytest -q "
                f"-p no:cacheprovider {xdist} --junitxml={out}/{xml} {files}", limit)

    suite = [("suite", *pytest("tests --ignore=tests/test_devices.py --ignore=tests/test_build.py",
                               "suite.xml", 120))] if not quick else []
    return [
        ("probe", f"nvidia-smi -L; {PY} -c {shlex.quote(PROBE)}", 30),
        ("wheels", f"{PY} -m pip install -q --no-index --no-deps --no-compile --upgrade --target {site} "
                   f"{ROOT}/wheels/*.whl" if glob.glob(str(ROOT / "wheels" / "*.whl")) else "echo no wheels/ to install", 30),
        ("build", f"SPECOPS_CUDA=1 SPECOPS_CUDA_ARCHS=$({PY} -c {shlex.quote(ARCH)}) MAX_JOBS=$(nproc) "
                  f"{PY} -m pip install -q --no-build-isolation --no-deps -e {ROOT}", 150),
        ("info", f"{PY} -m specops info", 30),
        ("tests", *pytest("tests/test_devices.py tests/test_build.py", "tests.xml", 60)),
        *suite,
        # --quick shapes: the first H200 run spent its 2 minutes on the full kron and spectral tables alone
        ("bench", f"{PY} -m specops.bench {families} --device cuda --memory --quick --report {out}/bench",
         45 if quick else 180),
    ]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specops/gpu_validate.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing")
    ap.add_argument("--quick", action="store_true", help="the short run (about 3 minutes)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu_validate_out"))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    site = Path(tempfile.gettempdir()) / "specops_gpu_site"  # installed wheels stay out of the report
    plan = steps(out, site, args.quick)
    if args.dry_run:
        for i, (name, cmd, limit) in enumerate(plan, 1):
            print(f"{i}. {name} (at most {limit} s)\n   {cmd}")
        print(f"report: {out}/gpu_validate.md, {out}/gpu_validate.json, {out}/tests.xml, {out}/bench/report.md")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    results = []
    with open(out / "gpu_validate.log", "w") as log:
        for name, cmd, limit in plan:
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=limit)
                status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
                text = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                status = f"timed out after {limit} s"
                text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            sec = time.perf_counter() - t0
            results.append({"step": name, "command": cmd, "status": status, "seconds": round(sec, 1),
                            "output_tail": text[-4000:]})
            print(f"[{name}] {status} in {sec:.0f} s", flush=True)
            print(text[-1500:], flush=True)
            log.write(f"===== {name}: {status} in {sec:.0f} s\n$ {cmd}\n{text}\n")
            log.flush()
    (out / "gpu_validate.json").write_text(json.dumps(results, indent=1))
    md = ["# specops gpu-validate", ""] + [f"- {r['step']}: {r['status']}, {r['seconds']} s" for r in results]
    for r in results:
        md += ["", f"## {r['step']}", "", f"    {r['command']}", "", "```", r["output_tail"].strip()[-3000:], "```"]
    bench = out / "bench" / "report.md"
    if bench.exists():
        md += ["", "## benchmark report", "", bench.read_text()]
    (out / "gpu_validate.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
