"""specops: kernels and math for spectrum-aware parameter-efficient fine-tuning.

Ops are torch custom ops in the `specops` namespace (torch.ops.specops.*), each with a fake
kernel and autograd; the functions here are their documented Python entry points. Importing
specops never initialises CUDA and works without the C++ extension or Triton.
"""
from . import adalora, adapters, optim, spectral, stiefel
from ._build import show_build
from ._version import __version__
from ._backend import backend
from ._registry import BackendError, available_backends, last_backend
from .kron import block_diag_matmul, block_diag_matmul_reference, kron, kron_matmul, kron_matmul_reference, kron_reference
from .optim import CayleyAdam, StiefelAdam, StiefelSGD
from .spectral import (LQFactors, SODA_TABLE, SVDFactors, decompose, kron_factor_sizes, linear_path, lora_linear,
                       lora_linear_reference, lowrank_linear,
                       lowrank_linear_reference, scaled_matmul, scaled_matmul_reference, spectral_linear,
                       spectral_linear_lq, spectral_linear_lq_reference,
                       spectral_linear_reference, spectral_shift, spectral_shift_lq, spectral_shift_lq_reference,
                       spectral_shift_reference)
from .adapters import ZipLoRALinear
from .zip import (
    merger_penalty,
    merger_penalty_reference,
    zip_lora_linear,
    zip_lora_linear_reference,
    zip_merge,
    zip_merge_lora,
    zip_merge_lora_reference,
    zip_merge_reference,
)

__all__ = [
    "__version__",
    "available_backends",
    "BackendError",
    "last_backend",
    "show_build",
    "backend",
    "kron",
    "kron_matmul",
    "kron_matmul_reference",
    "kron_reference",
    "block_diag_matmul",
    "block_diag_matmul_reference",
    "adalora",
    "adapters",
    "optim",
    "stiefel",
    *spectral.__all__,
    "StiefelSGD",
    "CayleyAdam",
    "StiefelAdam",
    "ZipLoRALinear",
    "merger_penalty",
    "merger_penalty_reference",
    "zip_lora_linear",
    "zip_lora_linear_reference",
    "zip_merge",
    "zip_merge_lora",
    "zip_merge_lora_reference",
    "zip_merge_reference",
]
