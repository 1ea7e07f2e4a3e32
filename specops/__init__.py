"""specops: kernels and math for spectrum-aware parameter-efficient fine-tuning.

Ops are torch custom ops in the `specops` namespace (torch.ops.specops.*), each with a fake
kernel and autograd; the functions here are their documented Python entry points. Importing
specops never initialises CUDA and works without the C++ extension or Triton.
"""
from ._backend import available_backends, backend
from .kron import kron, kron_matmul, kron_matmul_reference, kron_reference

__all__ = [
    "available_backends",
    "backend",
    "kron",
    "kron_matmul",
    "kron_matmul_reference",
    "kron_reference",
]
__version__ = "0.1.0"
