"""Triton kernels of specops, installed as specops.triton_kernels (one module per op family)."""
