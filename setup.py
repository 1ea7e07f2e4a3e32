"""Build specops and its optional extension specops._C.

C++ CPU kernels are always built (unless SPECOPS_NO_EXT=1); CUDA kernels are added when torch
was built with CUDA and nvcc is found. Environment:
  SPECOPS_NO_EXT=1          pure-Python install: every op runs its torch backend
  SPECOPS_CUDA_ARCHS="80;90" compute capabilities to generate code for
  SPECOPS_CPU_ARCH=native   value for -march (empty: compiler default)
  MAX_JOBS=2                parallel compile jobs (small machines run out of memory beyond that)
"""
import glob
import os
import subprocess
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _compiler_accepts(flag):
    """True when the C++ compiler accepts `flag` (so -march=native never breaks a build)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.NamedTemporaryFile("w", suffix=".cpp") as f:
        f.write("int main() { return 0; }\n")
        f.flush()
        cmd = [cxx, flag, "-x", "c++", "-fsyntax-only", f.name]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _extensions():
    if os.environ.get("SPECOPS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", "2")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
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
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        archs = os.environ.get("SPECOPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        ext_args["sources"] += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(
            glob.glob("csrc/cuda/*_glue.cpp")
        )
        ext_args["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"] + gencode
        ext_args["define_macros"] = [("SPECOPS_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(**ext_args)
    else:
        ext = cpp_extension.CppExtension(**ext_args)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    packages=["specops", "specops.triton_kernels"],
    package_dir={"specops": "specops", "specops.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
