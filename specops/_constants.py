"""Constants and dtype rules shared by every op family and every backend (Python, Triton, C++).

The C++ and Triton kernels receive what they need of these as arguments, so each exists once.
"""
from __future__ import annotations

import functools

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: float64 for float64, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- Stiefel family
# specops.stiefel, specops.stiefel_steps and their Triton / C++ / CUDA kernels (passed in as arguments).

# Newton-Schulz polar iterations at most: they converge quadratically from ||Y^T Y - I|| < 1; 30 also
# covers a start rescaled from a nearly rank-deficient Y (the slow phase grows small singular values
# by 1.5x per step).
POLAR_MAX_ITER = 30
CAYLEY_ITERS = 2  # fixed-point Cayley iterations s of Li, Fuxin & Todorovic (2020)


@functools.cache  # called on every fused optimiser step
def polar_tol(n: int, p: int, dtype: torch.dtype) -> float:
    """Where Newton-Schulz stops: the round-off level eps sqrt(n p) of ||Y^T Y - I||_F for an (n, p)
    matrix, eps that of the accumulation dtype of `dtype` (the dtype the iterations compute in)."""
    return torch.finfo(acc_dtype(dtype)).eps * (n * p) ** 0.5


# ----------------------------------------------------------------------------- ZipLoRA family
# specops.zip and its C++ kernels (passed in as arguments).

# merger_penalty "cosine": |m_c|·|m_s| below this counts as zero (as in F.cosine_similarity).
ZIP_COS_EPS = 1e-8
