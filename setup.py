"""Build specops and its optional extension specops._C.

C++ CPU kernels are always built (unless SPECOPS_NO_EXT=1); CUDA kernels are added when torch
was built with CUDA. Environment:
  SPECOPS_NO_EXT=1           pure-Python install: every op runs its torch backend
  SPECOPS_CUDA=auto|0|1      auto (default): CUDA kernels whenever torch has CUDA, and a build
                             error when no CUDA toolkit is found; 0: CPU kernels only (the one
                             way to build without CUDA against a CUDA torch); 1: CUDA required
  CUDA_HOME                  the CUDA toolkit; else the one the `nvcc` on PATH belongs to;
                             else /usr/local/cuda
  SPECOPS_CUDA_ARCHS="80;90" compute capabilities to generate code for (PTX of the last one is
                             embedded too, so newer GPUs can JIT it)
  SPECOPS_CPU_ARCH=native    value for -march (empty: compiler default)
  MAX_JOBS=2                 parallel compile jobs (small machines run out of memory beyond that)
  CXX=c++                    the C++ compiler; one that links libstdc++ statically into shared objects
                             (a kernel's error would then crash Python) is replaced by c++ / g++ from PATH
What was used is printed and written to specops/_build_info.json (`python -m specops info`).
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_STD = "c++20"  # torch 2.14's headers require C++20; 2.13's build with it too
BUILD_INFO = os.path.join(ROOT, "specops", "_build_info.json")


def _say(msg):
    print(f"specops build: {msg}", file=sys.stderr)


def _links_shared_libstdcxx(cxx):
    """Whether `cxx` links a shared object against the shared libstdc++ (None: the probe did not build).
    A toolchain that has only the static one copies its own C++ runtime into the extension; an error
    raised in a kernel (TORCH_CHECK) then crashes the process instead of reaching Python."""
    with tempfile.TemporaryDirectory() as d:
        src, so = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write('#include <stdexcept>\nvoid specops_probe() { throw std::runtime_error("probe"); }\n')
        try:
            built = subprocess.run(shlex.split(cxx) + ["-shared", "-fPIC", src, "-o", so], capture_output=True,
                                   timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return None
        if not built:
            return None
        with open(so, "rb") as f:
            return b"libstdc++.so" in f.read()  # the NEEDED entry's name, in the dynamic string table


def _choose_cxx():
    """CXX (default c++), unless it links libstdc++ statically: then the first c++ / g++ on PATH that
    links it shared, said aloud and put in CXX for the build; an error when there is none."""
    cxx = os.environ.get("CXX", "c++")
    if _links_shared_libstdcxx(cxx) is not False:
        return cxx
    for name in ("c++", "g++"):
        other = shutil.which(name)
        if other and _links_shared_libstdcxx(other):
            _say(f"CXX={cxx} links libstdc++ statically into shared objects, so an error raised in a kernel "
                 f"would crash Python; building with {other} instead")
            os.environ["CXX"] = other
            return other
    raise SystemExit(f"specops build: CXX={cxx} links libstdc++ statically into shared objects (an error raised "
                     "in a kernel would crash Python), and no c++ / g++ on PATH links it shared; set CXX to one "
                     "that does, or SPECOPS_NO_EXT=1 for the pure-Python install")


def _compiler_accepts(flag):
    """True when the C++ compiler accepts `flag` (so -march=native never breaks a build)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.NamedTemporaryFile("w", suffix=".cpp") as f:
        f.write("int main() { return 0; }\n")
        f.flush()
        cmd = [cxx, flag, "-x", "c++", "-fsyntax-only", f.name]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _nvcc_toolkit(nvcc):
    """The toolkit root an `nvcc` belongs to, as nvcc itself reports it (wrappers resolved)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(m.group(1).strip()) if m else None  # TOP is <toolkit>/bin/..


def _find_cuda_home():
    """(toolkit root or None, how it was found): CUDA_HOME, nvcc on PATH, /usr/local/cuda."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append((os.environ["CUDA_HOME"], "CUDA_HOME"))
    if shutil.which("nvcc"):
        home = _nvcc_toolkit(shutil.which("nvcc"))
        if home:
            candidates.append((home, f"nvcc on PATH ({shutil.which('nvcc')})"))
    candidates.append(("/usr/local/cuda", "default location"))
    for home, how in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home, how
        if how == "CUDA_HOME":  # an explicit choice that is wrong must not be skipped silently
            return None, f"CUDA_HOME={home} has no bin/nvcc"
    return None, "no nvcc: not in CUDA_HOME, not on PATH, not in /usr/local/cuda"


def _nvcc_version(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    m = re.search(r"release ([\d.]+)", out.stdout)
    return m.group(1) if m else "unknown"


def _cuda_wanted(torch):
    """Whether to build the CUDA kernels; raises when the user's request cannot be met."""
    mode = os.environ.get("SPECOPS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"specops build: SPECOPS_CUDA={mode!r}; expected auto, 0 or 1")
    if mode == "0":
        return False, "SPECOPS_CUDA=0"
    if not torch.version.cuda:
        if mode == "1":
            raise SystemExit(f"specops build: SPECOPS_CUDA=1 but torch {torch.__version__} has no CUDA")
        return False, f"torch {torch.__version__} is a CPU build"
    return True, None


def _extensions():
    if os.environ.get("SPECOPS_NO_EXT", "0") == "1":
        _write_build_info({"extension": False, "why_not": "SPECOPS_NO_EXT=1"})
        return [], {}
    import torch

    os.environ.setdefault("MAX_JOBS", "2")
    _choose_cxx()
    cxx = ["-O3", f"-std={CXX_STD}", "-fopenmp", "-fno-math-errno"]
    arch = os.environ.get("SPECOPS_CPU_ARCH", "native")
    if arch and _compiler_accepts(f"-march={arch}"):
        cxx.append(f"-march={arch}")
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    ext_args = dict(
        name="specops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    info = {"extension": True, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cxx": os.environ.get("CXX", "c++"), "cxx_flags": cxx, "cuda": False}
    want, why_not = _cuda_wanted(torch)
    if want:
        home, how = _find_cuda_home()
        if home is None:
            raise SystemExit(
                f"specops build: torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA "
                f"toolkit was found ({how}). Set CUDA_HOME to the toolkit, or SPECOPS_CUDA=0 to build "
                "the CPU kernels only.")
        os.environ["CUDA_HOME"] = home
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = home  # it reads the variable once, at its first import
        archs = [a for a in os.environ.get("SPECOPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        nvcc = ["-O3", f"-std={CXX_STD}", "-lineinfo", "-Xptxas=-v"] + gencode  # -v: registers, spills
        ext_args["sources"] += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_glue.cpp"))
        ext_args["extra_compile_args"]["nvcc"] = nvcc
        ext_args["define_macros"] = [("SPECOPS_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(**ext_args)
        info.update(cuda=True, cuda_home=home, cuda_found_by=how, nvcc_version=_nvcc_version(home),
                    cuda_archs=archs, nvcc_flags=nvcc)
        _say(f"CUDA {info['nvcc_version']} from {home} ({how}), archs {archs}, torch {torch.__version__}")
    else:
        from torch.utils import cpp_extension

        ext = cpp_extension.CppExtension(**ext_args)
        info["why_not_cuda"] = why_not
        _say(f"CPU kernels only ({why_not}), torch {torch.__version__}")
    _write_build_info(info)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _write_build_info(info):
    """What this build used, read back by specops.show_build()."""
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["specops", "specops.*"]) + ["specops.triton_kernels"],
        package_dir={"specops.triton_kernels": "triton_kernels"},
        package_data={"specops": ["_build_info.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
