"""What this install was built with and what it can run: `specops.show_build()`, `python -m specops info`."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

_INFO = Path(__file__).with_name("_build_info.json")


def build_info() -> dict:
    """The build's own record (written by setup.py) merged with what this process sees now."""
    import torch

    from . import _backend
    from ._version import __version__

    try:
        built = json.loads(_INFO.read_text())
    except (OSError, ValueError):
        built = {"extension": False, "why_not": f"no build record ({_INFO.name}): not built by setup.py"}
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    ext = _backend._EXT_ERROR is None
    return {
        "specops": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": triton,
        "built": built,
        "extension_loaded": ext,
        "extension_error": _backend._EXT_ERROR,
        "cpu_kernels": ext and _backend._ext_has("cpu"),
        "cuda_kernels": ext and _backend._ext_has("cuda"),
        "backends": _backend.available_backends(),
    }


def show_build(file=None) -> dict:
    """Print torch, CUDA, archs, compiler flags and every backend (with why not); return the dict."""
    out = file or sys.stdout
    info = build_info()
    b = info["built"]
    lines = [
        f"specops {info['specops']}  python {info['python']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}; "
        f"GPU visible: {'yes' if info['cuda_available'] else 'no'})  triton {info['triton'] or 'not installed'}",
    ]
    if b.get("extension"):
        lines.append(f"extension built against torch {b['torch']} with {b['cxx']} {' '.join(b['cxx_flags'])}")
        if b.get("cuda"):
            lines.append(f"  CUDA kernels: nvcc {b['nvcc_version']} from {b['cuda_home']} ({b['cuda_found_by']}), "
                         f"archs {','.join('sm_' + a for a in b['cuda_archs'])}, flags {' '.join(b['nvcc_flags'])}")
        else:
            lines.append(f"  CUDA kernels: not built ({b.get('why_not_cuda')})")
        if b["torch"] != info["torch"]:
            lines.append(f"  WARNING: built against torch {b['torch']} but running {info['torch']}: rebuild")
    else:
        lines.append(f"extension: not built ({b.get('why_not')})")
    lines.append(f"extension loaded: {'yes' if info['extension_loaded'] else 'no: ' + str(info['extension_error'])}"
                 f" (CPU kernels {'yes' if info['cpu_kernels'] else 'no'}, "
                 f"CUDA kernels {'yes' if info['cuda_kernels'] else 'no'})")
    lines.append("backends:")
    lines += [f"  {name:<7} {why}" for name, why in info["backends"].items()]
    print("\n".join(lines), file=out)
    return info
