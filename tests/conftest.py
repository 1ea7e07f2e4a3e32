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

import specops  # noqa: E402
from helpers import CPU_BACKENDS  # noqa: E402


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per backend that can run on CPU tensors here, that backend forced."""
    with specops.backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
