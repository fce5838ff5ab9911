"""Triton kernels. Imported lazily by the backend selector: importing cersa_kernels never imports
triton. Set TRITON_INTERPRET=1 before the first import to run them on CPU tensors (tests)."""
import os


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET is set: Triton kernels then run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
