"""The `cuda` backend: thin wrappers around the compiled `cersa_kernels._cuda` module.

Until csrc/ kernels and the pybind11 module are built (issue 3), this backend reports why it
cannot serve a call and never runs anything.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def unavailable_reasons(op: str, tensors: Sequence[Tensor]) -> list[str]:
    reasons = []
    try:
        from .. import _cuda  # noqa: F401
    except ImportError as exc:
        reasons.append(f"the native module cersa_kernels._cuda is not built ({exc})")
    if any(not t.is_cuda for t in tensors):
        devices = sorted({t.device.type for t in tensors})
        reasons.append(f"tensors are on {'/'.join(devices)}: the cuda backend needs CUDA tensors")
    return reasons
