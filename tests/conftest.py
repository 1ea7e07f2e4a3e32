"""Test set-up: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before anything else. With a
GPU it stays unset, so the Triton kernels are compiled and run on CUDA tensors (the CPU-tensor Triton
cases then skip, saying why).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the cores are shared between the N workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import specops  # noqa: E402
from helpers import CPU_BACKENDS  # noqa: E402


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per backend that can run on CPU tensors here, that backend forced."""
    with specops.backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module of small ops: on a loaded 2-core machine their GEMMs stall in
    OpenMP barriers (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def lycoris_state(monkeypatch):
    """Undo LyCORIS's class-level configuration (apply_preset, LORA_PREFIX; create_lycoris applies a
    preset too) after a test: `pytestmark = pytest.mark.usefixtures("lycoris_state")`."""
    from lycoris import LycorisNetwork
    from lycoris.kohya import LycorisNetworkKohya

    for cls in (LycorisNetwork, LycorisNetworkKohya):
        for name in dir(cls):
            if name.isupper():
                monkeypatch.setattr(cls, name, getattr(cls, name))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
