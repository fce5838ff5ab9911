"""Triton kernels for the CERSA low-rank op (docs/methods.md §1).

Every product in the op is a skinny GEMM, so the shared tiled kernel of `triton/gemm.py` serves them
all: it takes any strides (transposes are free views, x may have a row stride), accumulates in
fp32, adds the bias in its epilogue, and can split the reduction dimension over programs.

Forward (writes h and y, nothing else of size T):
    US = U S                   (m×k, independent of T: S is folded into U once per call)
    h  = x V                   (T×k, saved for backward)
    y  = h (US)ᵀ + b           (bias fused into the epilogue)
Backward:
    g  = dy U                  (T×k, computed once)
    dS = gᵀ h                  (k×k, reduction over T split across programs, fp32 partials)
    SVt = S Vᵀ                 (k×n, independent of T: S is folded into Vᵀ once per call)
    dx = g SVt                 (skipped when x needs no gradient)
Folding S into the k×m / k×n factor costs 2k²·(m or n) FLOPs per call instead of 2k²·T for a
separate (T×k)·(k×k) pass, and no T×k intermediate is written for it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .gemm import QUANTIZED_FORMATS, _gemm, reduction_split  # noqa: F401 (QUANTIZED_FORMATS: read by backends)


def lowrank_fwd_triton(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (T, m), h (T, k)."""
    US = _gemm(U, S.to(x.dtype), x.dtype)
    h = _gemm(x, V, x.dtype)
    y = _gemm(h, US.T, x.dtype, bias=bias)
    return y, h


def lowrank_bwd_triton(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) (empty (0, n) unless need_dx), dS (k, k) in S's dtype."""
    T, k = h.shape
    g = _gemm(dy, U, dy.dtype)
    split = reduction_split(T, k, k, dy.device)
    dS = _gemm(g.T, h, S.dtype, split=split)
    if not need_dx:
        return dy.new_empty((0, V.shape[0])), dS
    SVt = _gemm(S.to(dy.dtype), V.T, dy.dtype)
    return _gemm(g, SVt, dy.dtype), dS
