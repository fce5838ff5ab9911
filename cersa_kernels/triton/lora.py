"""Triton launchers for the LoRA op (docs/methods.md §5), on the shared GEMM of `triton/gemm.py`.

Forward (writes xa and y; the dropout mask is never materialised):
    xa = drop(x) Aᵀ            (T×r, saved; the mask is applied to x tiles as they are loaded)
    y  = x W0ᵀ + b             (bias in the epilogue)
    y += xa (s·B)ᵀ             (residual epilogue, in place: no second T×m buffer)
Backward (x, xa saved; the mask is regenerated from the seed):
    g  = dy (s·B)              (T×r)
    dB = s·dyᵀ xa              (m×r, reduction over T split across programs)
    dA = gᵀ drop(x)            (r×n, mask applied to the x tiles, reduction split)
    dx = dy W0, then dx += drop'(g A)   (mask in the epilogue, residual in place)
s is folded into the m×r factor B once per call.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..reference.lora import dropout_params
from .gemm import QUANTIZED_FORMATS, DROP_A, DROP_B, DROP_C, _gemm, reduction_split  # noqa: F401 (QUANTIZED_FORMATS: read by backends)


def _drop(where: int, p: float, seed: Tensor, cols: int):
    if p == 0.0:
        return None
    key, thresh, scale = dropout_params(p, seed)
    return (where, key, thresh, cols, scale)


def lora_fwd_triton(
    x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout_p: float, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """x (T, n), W (m, n), A (r, n), B (m, r) -> y (T, m), xa (T, r)."""
    n = x.shape[1]
    xa = _gemm(x, A.T, x.dtype, dropout=_drop(DROP_A, dropout_p, seed, n))
    y = _gemm(x, W.T, x.dtype, bias=bias)
    _gemm(xa, (B * scale).T, x.dtype, residual=y, out=y)
    return y, xa


def lora_bwd_triton(
    dy: Tensor, x: Tensor, xa: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, dropout_p: float,
    seed: Tensor, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m) -> dx (T, n) (empty (0, n) unless need_dx), dA (r, n), dB (m, r)."""
    T, n = x.shape
    m, r = B.shape
    g = _gemm(dy, B * scale, dy.dtype)
    dB = _gemm(dy.T, xa, B.dtype, split=reduction_split(T, m, r, dy.device)) * scale
    dA = _gemm(g.T, x, A.dtype, split=reduction_split(T, r, n, dy.device), dropout=_drop(DROP_B, dropout_p, seed, n))
    if not need_dx:
        return dy.new_empty((0, n)), dA, dB
    dx = _gemm(dy, W, dy.dtype)
    _gemm(g, A, dy.dtype, residual=dx, out=dx, dropout=_drop(DROP_C, dropout_p, seed, n))
    return dx, dA, dB
