"""Triton launchers for the PiCa op (docs/methods.md §2), on the shared GEMM of `triton/gemm.py`.

Forward:  h = x Pᵀ (T×r, saved);  y = x W0ᵀ + b (bias epilogue);  y += h Mᵀ (residual, in place).
Backward: dM = dyᵀ h (m×r, reduction over T split);  dx = dy W0;  dx += (dy M) P (in place).
Nothing of the frozen W0 path is saved: its backward needs only dy and the weight.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .gemm import QUANTIZED_FORMATS, _gemm, reduction_split  # noqa: F401 (QUANTIZED_FORMATS: read by backends)


def pica_fwd_triton(x: Tensor, W: Tensor, bias: Optional[Tensor], P: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """x (T, n), W (m, n), P (r, n), M (m, r) -> y (T, m), h (T, r)."""
    h = _gemm(x, P.T, x.dtype)
    y = _gemm(x, W.T, x.dtype, bias=bias)
    _gemm(h, M.to(x.dtype).T, x.dtype, residual=y, out=y)
    return y, h


def pica_bwd_triton(dy: Tensor, h: Tensor, W: Tensor, P: Tensor, M: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, r) -> dx (T, n) (empty (0, n) unless need_dx), dM (m, r) in M's dtype."""
    T, r = h.shape
    m = dy.shape[1]
    dM = _gemm(dy.T, h, M.dtype, split=reduction_split(T, m, r, dy.device))
    if not need_dx:
        return dy.new_empty((0, W.shape[1])), dM
    dx = _gemm(dy, W, dy.dtype)
    g = _gemm(dy, M.to(dy.dtype), dy.dtype)
    _gemm(g, P, dy.dtype, residual=dx, out=dx)
    return dx, dM
