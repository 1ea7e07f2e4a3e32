"""The build and the install: CUDA toolkit discovery, the CUDA switch, packaging, the CUDA kernels' registration.

SPECOPS_EXPECT_CUDA_KERNELS=1 (set by `make cuda-check`, which installs the CUDA build into its own
venv) turns the registration test's skip into a failure, so a CUDA build that lost a kernel cannot pass.
"""
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import specops
from specops import _backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's helpers, imported without running setup()."""
    spec = importlib.util.spec_from_file_location("specops_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_impls() -> list[str]:
    """Every op that csrc/cuda/*_glue.cpp registers for the CUDA dispatch key."""
    names = []
    for glue in sorted((ROOT / "csrc" / "cuda").glob("*_glue.cpp")):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(specops_ext, CUDA, m\) \{(.*?)\n\}", glue.read_text(), re.S):
            names += re.findall(r'm\.impl\("(\w+)"', block)
    return names


def test_cuda_kernels_registered():
    names = _cuda_impls()
    assert len(names) >= 8, names  # kron fwd/bwd, zip fwd/bwd, three Stiefel steps, stiefel_step_fits
    if not (_backend._EXT_ERROR is None and _backend._ext_has("cuda")):
        if os.environ.get("SPECOPS_EXPECT_CUDA_KERNELS") == "1":
            pytest.fail(f"SPECOPS_EXPECT_CUDA_KERNELS=1 but this specops has no CUDA kernels "
                        f"({_backend._EXT_ERROR or 'built without CUDA'}; loaded from {specops.__file__})")
        pytest.skip("this build of specops has no CUDA kernels")
    missing = [n for n in names
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"specops_ext::{n}", "CUDA")]
    assert not missing, f"declared in csrc/cuda but not registered for CUDA: {missing}"


def test_show_build_names_torch_and_every_backend():
    buf = io.StringIO()
    info = specops.show_build(file=buf)
    text = buf.getvalue()
    assert torch.__version__ in text and specops.__version__ in text
    for name in _backend.BACKENDS:
        assert f"  {name} " in text
    assert info["extension_loaded"] == (_backend._EXT_ERROR is None)
    out = subprocess.run([sys.executable, "-m", "specops", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "backends:" in out.stdout, out.stderr


def _fake_toolkit(tmp_path, name):
    """A toolkit dir with bin/nvcc, and a wrapper script elsewhere that execs it (like /usr/local/bin/nvcc)."""
    home = tmp_path / name
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={home}/bin/.."\necho "Cuda compilation tools, release 13.0, V13.0.1"\n')
    nvcc.chmod(0o755)
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    return home, wrapper.parent


def test_cuda_home_from_nvcc_on_path(setup_py, tmp_path, monkeypatch):
    home, wrapper_dir = _fake_toolkit(tmp_path, "cuda-13.0")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    found, how = setup_py._find_cuda_home()
    assert found == str(home) and "nvcc on PATH" in how  # the wrapper resolved to its real toolkit
    assert setup_py._nvcc_version(found) == "13.0"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no c++ on PATH")
def test_a_compiler_that_links_libstdcxx_statically_is_replaced(setup_py, tmp_path, monkeypatch, capsys):
    """A GPU image's wrapper GCC had only the static libstdc++: the extension then carried its own C++
    runtime and a kernel's TORCH_CHECK crashed Python. setup.py sees it and builds with c++ instead."""
    static = tmp_path / "static-g++"
    static.write_text(f'#!/bin/sh\nexec {shutil.which("c++")} -static-libstdc++ "$@"\n')
    static.chmod(0o755)
    assert setup_py._links_shared_libstdcxx("c++") is True
    assert setup_py._links_shared_libstdcxx(str(static)) is False
    assert setup_py._links_shared_libstdcxx(str(tmp_path / "missing")) is None  # cannot tell: left alone
    monkeypatch.setenv("CXX", str(static))
    assert setup_py._choose_cxx() == shutil.which("c++") == os.environ["CXX"]
    assert "links libstdc++ statically" in capsys.readouterr().err
    monkeypatch.setenv("CXX", str(static))
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: None)  # no other compiler to fall back on
    with pytest.raises(SystemExit, match="links libstdc\\+\\+ statically"):
        setup_py._choose_cxx()


def test_cuda_home_env_wins_and_a_wrong_one_is_an_error(setup_py, tmp_path, monkeypatch):
    home, wrapper_dir = _fake_toolkit(tmp_path, "a")
    other, _ = _fake_toolkit(tmp_path / "x", "b")
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert setup_py._find_cuda_home() == (str(other), "CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    found, how = setup_py._find_cuda_home()
    assert found is None and "has no bin/nvcc" in how


class _Torch:
    """The two attributes of torch that the CUDA switch reads."""

    def __init__(self, cuda):
        self.__version__ = "2.14.1"
        self.version = type("v", (), {"cuda": cuda})


@pytest.mark.parametrize("mode,cuda,expect", [
    ("auto", "13.0", True), ("auto", None, False), ("0", "13.0", False), ("1", "13.0", True),
    ("1", None, SystemExit), ("yes", "13.0", SystemExit),
])
def test_cuda_switch(setup_py, monkeypatch, mode, cuda, expect):
    monkeypatch.setenv("SPECOPS_CUDA", mode)
    if expect is SystemExit:
        with pytest.raises(SystemExit, match="SPECOPS_CUDA"):
            setup_py._cuda_wanted(_Torch(cuda))
    else:
        assert setup_py._cuda_wanted(_Torch(cuda))[0] is expect


def test_sdist_carries_kernel_sources_and_every_package(tmp_path):
    # from a copy of the tree: setup.py writes specops/_build_info.json, which must stay the checkout's own
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "wheels", "*.egg-info", "__pycache__", "*.so", "_build_info.json", ".hypothesis",
        ".benchmarks", ".pytest_cache", "*_out"))
    env = {**os.environ, "SPECOPS_NO_EXT": "1"}  # an sdist compiles nothing
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = tmp_path.glob("specops-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {str(p.relative_to(ROOT)) for d in ("csrc", "triton_kernels", "specops")
                for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".cuh", ".h")}
    assert expected <= names, sorted(expected - names)
    assert f"specops-{specops.__version__}" in sdist.name
