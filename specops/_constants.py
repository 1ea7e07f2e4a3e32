"""Constants and dtype rules shared by every op family and every backend (Python, Triton, C++).

The C++ and Triton kernels receive what they need of these as arguments, so each exists once.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 for float64, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32
