"""GPU readiness without a GPU: compile every kernel for sm_80 and sm_90 and read ptxas's report.

    python -m specops.gpu_check [--arch 80 90] [--csrc DIR] [--no-cuda]

- Triton: every configuration a launcher can use (each module of specops.triton_kernels lists
  them in `aot_specs()` as (name, jit_fn, signature, constexprs[, compile options])) goes through triton.compile with a GPUTarget; Triton's own ptxas -v on
  its PTX gives registers, spills and static shared memory (Triton's dynamic shared memory comes
  from the compile metadata).
- CUDA: every csrc/cuda/*.cu is compiled by nvcc for each arch with -Xptxas -v (the .cu files
  carry no torch headers, so the CPU build of torch is enough).
One row per kernel and arch. Exit status 1 when anything fails to compile or any shipped kernel
spills registers.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _find(tool: str) -> str | None:
    """`tool` on PATH, else in $CUDA_HOME/bin (default /usr/local/cuda)."""
    if found := shutil.which(tool):
        return found
    cand = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / tool
    return str(cand) if cand.exists() else None


def _parse_ptxas(text: str, default_name: str = "?") -> list[dict]:
    """Rows {kernel, arch, regs, spill, smem} from `ptxas -v` output (nvcc's or standalone)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": _demangle(m.group(1)), "arch": m.group(2), "regs": 0, "spill": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None and ("Used" in line or "spill" in line):
            cur = {"kernel": default_name, "arch": "?", "regs": 0, "spill": 0, "smem": 0}
            rows.append(cur)
        if cur is None:
            continue
        if m := _SPILL.search(line):
            cur["spill"] = int(m.group(1)) + int(m.group(2))
        if m := _REGS.search(line):
            cur["regs"] = int(m.group(1))
        if m := _SMEM.search(line):
            cur["smem"] = int(m.group(1))
    return rows


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    out = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    # "void specops::cuda::detail::kern<float, true, 4>(Args...)" -> "kern<float, true, 4>"
    out = re.sub(r"\b[A-Za-z_]\w*::", "", out.removeprefix("void ").split("(")[0])
    return out


def _triton_specs():
    import specops.triton_kernels as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"specops.triton_kernels.{mod.name}")
        for spec in module.aot_specs():
            yield mod.name, spec


def _compile_triton(family, spec, arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses: its PTX may be newer than nvcc's

    name, fn, signature, constexprs, *options = spec  # options: e.g. {"num_warps": 8}
    label = f"triton/{family}:{name}"
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options[0] if options else None)
    except Exception as e:  # a kernel that does not compile is exactly what this check reports
        return [{"kernel": label, "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"[:300]}]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, f"-arch={sm}", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        return [{"kernel": label, "arch": f"sm_{arch}", "error": out.stderr.strip()[:300]}]
    rows = _parse_ptxas(out.stderr + out.stdout)
    for r in rows:
        r["kernel"], r["arch"] = label, f"sm_{arch}"
        r["dyn_smem"] = kernel.metadata.shared
    return rows


def _compile_cuda(path: Path, archs, nvcc: str, include: Path) -> list[dict]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-I{include}", "-Xptxas", "-v", *gencode,
               str(path), "-o", str(Path(tmp) / "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    label = f"cuda/{path.stem}"
    if out.returncode != 0:
        return [{"kernel": label, "arch": ",".join(f"sm_{a}" for a in archs), "error": out.stderr.strip()[-600:]}]
    rows = _parse_ptxas(out.stderr + out.stdout)
    for r in rows:
        r["kernel"] = f"{label}:{r['kernel']}"
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specops.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--csrc", type=Path, default=Path(__file__).resolve().parents[1] / "csrc")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton part")
    ap.add_argument("--ptxas-log", type=Path,
                    help="read the CUDA rows from the ptxas -v output in this build log (the extension's own "
                         "build, which passes -Xptxas=-v) instead of compiling csrc/cuda again")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    if args.ptxas_log:
        args.no_cuda = True
    nvcc = _find("nvcc")
    if not args.no_cuda and nvcc is None:
        print("gpu-check: nvcc not found (set CUDA_HOME or pass --no-cuda)", file=sys.stderr)
        return 1
    # nvcc runs as subprocesses in the background while Triton compiles in this thread
    # (triton.compile is not documented as thread-safe).
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs - 1)) as pool:
        cuda_jobs = [] if args.no_cuda else [
            pool.submit(_compile_cuda, cu, args.arch, nvcc, args.csrc)
            for cu in sorted((args.csrc / "cuda").glob("*.cu"))
        ]
        rows = [] if args.no_triton else [r for family, spec in _triton_specs() for arch in args.arch
                                          for r in _compile_triton(family, spec, arch)]
        rows += [r for j in cuda_jobs for r in j.result()]
    if args.ptxas_log:
        rows += [{**r, "kernel": f"cuda/build:{r['kernel']}"} for r in _parse_ptxas(args.ptxas_log.read_text())]

    failed = 0
    print(f"{'kernel':<60} {'arch':<6} {'regs':>5} {'spill B':>8} {'smem B':>7} {'dyn smem':>8}")
    for r in rows:
        if "error" in r:
            failed += 1
            print(f"{r['kernel']:<60} {r['arch']:<6} FAILED: {r['error']}")
            continue
        bad = r["spill"] > 0
        failed += bad
        print(f"{r['kernel']:<60} {r['arch']:<6} {r['regs']:>5} {r['spill']:>8} {r['smem']:>7} "
              f"{r.get('dyn_smem', '-'):>8}{'  SPILLS' if bad else ''}")
    n_kernels = len(rows)
    print(f"gpu-check: {n_kernels} kernel builds, {failed} failed or spilling")
    return 1 if failed or n_kernels == 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
