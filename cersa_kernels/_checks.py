"""Input checks shared by the ops and layers: each error names the layer, the expected and the
actual value. Shape checks only: they never read tensor data, so they are free under
torch.compile."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def check_features(x: Tensor, expected: int, layer: str) -> None:
    if x.dim() < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{layer}: expected input with last dimension in_features={expected}, got shape {tuple(x.shape)}"
        )


def check_shape(name: str, t: Tensor, expected: Sequence[int], layer: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{layer}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_all_same(tensors: dict[str, Optional[Tensor]], attr: str, layer: str, error: type) -> None:
    """All given tensors (None entries skipped) share `attr` (dtype or device); else `error`."""
    present = {k: getattr(v, attr) for k, v in tensors.items() if v is not None}
    if len(set(present.values())) > 1:
        first, value = next(iter(present.items()))
        listed = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in present.items())
        raise error(f"{layer}: {attr} mismatch, expected every tensor in {value} like {first}, got {listed}")


def check_same_dtype(tensors: dict[str, Optional[Tensor]], layer: str) -> None:
    _check_all_same(tensors, "dtype", layer, TypeError)


def check_same_device(tensors: dict[str, Optional[Tensor]], layer: str) -> None:
    _check_all_same(tensors, "device", layer, RuntimeError)


def check_floating(name: str, t: Tensor, layer: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{layer}: {name} must be a floating-point tensor, got {t.dtype}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_frozen(layer: str, **tensors: Optional[Tensor]) -> None:
    """A frozen operand (a base weight, a projection) must not require grad while grad is on: the
    ops return no gradient for it, so training it would silently do nothing."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(f"{layer}: {name} is frozen and gets no gradient, but requires_grad is set on it")
