"""Autocast for layers built on custom ops: the dispatcher does not autocast a custom op, so each
layer casts its inputs itself, the way autocast casts nn.Linear's input and weight."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from ..quant import QuantizedTensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for x's device type, or None outside autocast."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(x: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """(x, *tensors) cast to the autocast dtype when autocast is on, unchanged otherwise (None
    entries stay None). Trainable tensors keep their own dtype; their gradients flow back through
    the cast, so fp32 parameters get fp32 gradients. A QuantizedTensor is not copied: it is
    relabelled to stand for the autocast dtype (its kernels dequantize into that dtype)."""
    if not isinstance(x, Tensor):
        return (x, *tensors)  # not a tensor: the op's input checks name the layer and the type
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    return tuple(_cast(t, dtype) for t in (x, *tensors))


def _cast(t, dtype: torch.dtype):
    if t is None:
        return None
    if isinstance(t, QuantizedTensor):
        return replace(t, dtype=dtype)
    return t.to(dtype)
