"""Triton kernels, imported lazily, used for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)."""
