"""Triton kernels. Imported lazily by the backend selector: importing cersa_kernels never imports
triton. Set TRITON_INTERPRET=1 before the first import to run them on CPU tensors (tests)."""
