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


def check_same_dtype(tensors: dict[str, Optional[Tensor]], layer: str) -> None:
    """All given tensors share one dtype (None entries are skipped)."""
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {k: v.dtype for k, v in present.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k}={str(d).replace('torch.', '')}" for k, d in dtypes.items())
        first = next(iter(present))
        raise TypeError(
            f"{layer}: dtype mismatch, expected every tensor in {present[first].dtype} like {first}, got {listed}"
        )


def check_same_device(tensors: dict[str, Optional[Tensor]], layer: str) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k}={d}" for k, d in devices.items())
        first = next(iter(present))
        raise RuntimeError(f"{layer}: device mismatch, expected every tensor on {devices[first]}, got {listed}")


def check_floating(name: str, t: Tensor, layer: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{layer}: {name} must be a floating-point tensor, got {t.dtype}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
