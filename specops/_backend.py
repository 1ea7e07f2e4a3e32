"""Which implementation runs an op: "torch", "cpp", "triton" or "cuda".

Defaults per device: CPU -> "cpp" when the extension is built, else "torch"; CUDA -> "cuda" when
the extension has the op's CUDA kernel, else "triton" when Triton is installed, else "torch".
`backend(name)` (a context manager) or the environment variable SPECOPS_BACKEND force one; what an
op does with a forced backend it lacks (raise, or with fallback=True / SPECOPS_BACKEND_FALLBACK=1 run
its device default) is the registry's rule (specops._registry.choose). Triton kernels run on CPU
tensors only under TRITON_INTERPRET=1 (set before triton is imported): that is how tests run them.

Nothing here initialises CUDA or fails when the extension or Triton is missing.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os

BACKENDS = ("torch", "cpp", "triton", "cuda")

_forced: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("specops_backend", default=None)


def _load_extension() -> str | None:
    """Import specops._C (registers the specops_ext::* kernels); the reason it failed, or None."""
    if os.environ.get("SPECOPS_NO_EXT", "0") == "1":
        return "disabled by SPECOPS_NO_EXT=1"
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

    try:
        importlib.import_module("specops._C")
    except ImportError as e:
        return f"extension specops._C not built or not loadable ({e})"
    return None


_EXT_ERROR = _load_extension()


def _ext_has(device_type: str) -> bool:
    """Whether the extension has kernels for `device_type` (kron_matmul stands for every op)."""
    import torch

    if _EXT_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("specops_ext::kron_matmul_fwd", key)


@functools.cache
def _triton_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(name: str, device_type: str) -> str | None:
    """None when backend `name` can run on `device_type`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpp":
        if device_type != "cpu":
            return "cpp kernels run on CPU tensors only"
        return _EXT_ERROR
    if name == "cuda":
        if device_type != "cuda":
            return "cuda kernels run on CUDA tensors only"
        if _EXT_ERROR is not None:
            return _EXT_ERROR
        return None if _ext_has("cuda") else "specops._C was built without CUDA kernels"
    if name == "triton":
        if _triton_error() is not None:
            return _triton_error()
        if device_type == "cpu" and not _interpret():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"triton kernels do not run on {device_type} tensors"
        return None
    raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")


def available_backends() -> dict[str, str]:
    """What this install can run: {backend: "available" or the reason it is not}.

    Reported for CPU tensors, and for CUDA tensors when a GPU is visible (this may query the
    driver, which is why import never calls it).
    """
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {}
    for name in BACKENDS:
        reasons = [_why_not(name, d) for d in devices]
        if any(r is None for r in reasons):
            where = [d for d, r in zip(devices, reasons) if r is None]
            out[name] = "available on " + ", ".join(where)
        else:
            out[name] = "; ".join(dict.fromkeys(r for r in reasons if r))
    return out


@contextlib.contextmanager
def backend(name: str, fallback: bool = False):
    """Force backend `name` for ops called inside the block (nested blocks: innermost wins).

    An op that does not declare `name`, or whose `name` kernel refuses the inputs, raises
    specops.BackendError — unless fallback=True, which runs the op's device default instead.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    token = _forced.set((name, bool(fallback)))
    try:
        yield
    finally:
        _forced.reset(token)


def forced() -> tuple[str | None, bool]:
    """(forced backend or None, fallback allowed): the innermost `backend` block, else SPECOPS_BACKEND
    (with SPECOPS_BACKEND_FALLBACK=1 for fallback)."""
    f = _forced.get()
    if f is not None:
        return f
    name = os.environ.get("SPECOPS_BACKEND") or None
    if name is None:
        return None, False
    if name not in BACKENDS:
        raise ValueError(f"SPECOPS_BACKEND: unknown backend {name!r}; expected one of {BACKENDS}")
    return name, os.environ.get("SPECOPS_BACKEND_FALLBACK", "0") == "1"
