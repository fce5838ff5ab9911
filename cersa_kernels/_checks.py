"""Input checks shared by the ops, layers and commands: each error names the layer (or caller), the
expected and the actual value. The tensor checks read shapes, dtypes and types only, never tensor
data, so they are free under torch.compile. `UsageError` marks a user's mistake for the CLI."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from .quant import is_quantized


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


class UsageError(ValueError):
    """A mistake in what the user gave (a path, a file, an argument), not a bug: the command line
    prints it as one line `error: …` and exits with status 2 instead of a traceback."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A path the user named does not exist (still a FileNotFoundError for callers that catch it)."""


def check_int(name: str, value, layer: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """`value` as an int in [minimum, maximum]. bool and non-integral numbers (2.7, 2.0) are
    rejected: int(2.7) would silently truncate and True would mean 1."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{layer}: {name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{layer}: {name} must be in [{low}, {high}], got {value}")
    return value


def check_real(name: str, value, layer: str, finite: bool = True) -> float:
    """`value` as a float; TypeError for a non-number or bool, ValueError for nan/inf when `finite`
    (a caller with a range check of its own passes finite=False: nan fails any range)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{layer}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{layer}: {name} must be finite, got {value}")
    return value


def check_layer_dtype(name: str, dtype, layer: str) -> None:
    """A layer's `dtype` / `core_dtype` is None (torch's default) or a floating-point torch.dtype:
    integer and bool parameters cannot train."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{layer}: {name} must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    if not dtype.is_floating_point:
        expected = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{layer}: {name} must be a floating-point dtype ({expected}), got {str(dtype).replace('torch.', '')}")


def check_features_args(in_features, out_features, dtype, layer: str) -> tuple[int, int]:
    """A layer constructor's (in_features, out_features) as ints >= 1, and its dtype floating point."""
    in_features = check_int("in_features", in_features, layer, minimum=1)
    out_features = check_int("out_features", out_features, layer, minimum=1)
    check_layer_dtype("dtype", dtype, layer)
    return in_features, out_features


def check_tensors(layer: str, quantizable: Sequence[str] = (), **tensors) -> None:
    """Each named value is a torch.Tensor (None allowed, for an optional bias), or a
    quant.QuantizedTensor for the frozen operands named in `quantizable`: a Python list or a NumPy
    array fails here with its name, instead of as an AttributeError deep inside."""
    for name, t in tensors.items():
        if is_quantized(t):
            if name not in quantizable:
                can = f"only {', '.join(quantizable)} can" if quantizable else "no operand of it can"
                raise TypeError(f"{layer}: {name} must be a torch.Tensor, got a QuantizedTensor ({can} be quantized)")
        elif t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_snell_factors(A, B, layer: str) -> None:
    """SNELL's A (H, n, d_h) and B (H, m, d_h) are tensors with no zero-sized dimension: the
    threshold is a quantile over m·n entries, which an empty factor leaves undefined."""
    check_tensors(layer, A=A, B=B)
    for name, t in (("A", A), ("B", B)):
        if 0 in t.shape:
            raise ValueError(f"{layer}: {name} must have at least one head, row and column, got shape {tuple(t.shape)}")


def check_seed(seed, layer: str) -> Tensor:
    """A dropout seed (int or int64 scalar tensor) as a CPU int64 scalar; an int outside int64
    raises instead of overflowing inside torch.tensor."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise TypeError(f"{layer}: seed must be an int64 scalar tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed
    seed = check_int("seed (int64)", seed, layer, minimum=-(2**63), maximum=2**63 - 1)
    return torch.tensor(seed, dtype=torch.int64)


def check_frozen(layer: str, **tensors: Optional[Tensor]) -> None:
    """A frozen operand (a base weight, a projection) must not require grad while grad is on: the
    ops return no gradient for it, so training it would silently do nothing."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(f"{layer}: {name} is frozen and gets no gradient, but requires_grad is set on it")
