"""The one way every layer's `to_linear()` builds its plain nn.Linear."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


@torch.no_grad()
def merged_linear(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> nn.Linear:
    """nn.Linear holding `weight` (out, in), merged in float32 by the caller and cast to `dtype`
    once here, and a copy of `bias` (out,) if given."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    linear.weight.copy_(weight.to(dtype))
    if bias is not None:
        linear.bias.copy_(bias)
    return linear
