"""Triton launchers for PiCa on a CERSA base: one op, the PiCa branch folded into CERSA's factors.

Since P = V[:, :r]ᵀ, y = h Sᵀ Uᵀ + h[:, :r] Mᵀ = h (U S + [M | 0])ᵀ: M is added into the m×k output
factor U S once per call, and the forward is exactly the CERSA forward (no extra T-sized pass).
Forward:  F = U S;  F[:, :r] += M;  h = x V (saved);  y = h Fᵀ + b.
Backward: G = dy [U | M] (T×(k+r), one GEMM for g = dy U and dy M);
          dS = gᵀ h,  dM = dyᵀ h[:, :r]  (reductions over T split);
          dx = G [S Vᵀ ; V[:, :r]ᵀ]      (one GEMM over k + r).
A quantized U or V (`QuantizedTensor`) cannot be concatenated without a dense copy, so then the two
halves of each concatenation are separate GEMMs: G's column blocks are written by two GEMMs, and
dx = G[:, :k] S Vᵀ, then dx += G[:, k:] Vᵀ[:r] (residual epilogue; the GEMM reads only Vᵀ's first r
rows, no slice of the codes).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant import is_quantized
from .gemm import QUANTIZED_FORMATS, _gemm, reduction_split  # noqa: F401 (QUANTIZED_FORMATS: read by backends)


def pica_lowrank_fwd_triton(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), M (m, r) -> y (T, m), h (T, k)."""
    r = M.shape[1]
    F = _gemm(U, S.to(x.dtype), x.dtype)
    F[:, :r] += M.to(x.dtype)
    h = _gemm(x, V, x.dtype)
    y = _gemm(h, F.T, x.dtype, bias=bias)
    return y, h


def pica_lowrank_bwd_triton(
    dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) (empty (0, n) unless need_dx), dS (k, k), dM (m, r)."""
    T, k = h.shape
    m, r = M.shape
    if is_quantized(U):
        G = dy.new_empty((T, k + r))
        _gemm(dy, U, dy.dtype, out=G[:, :k])
        _gemm(dy, M.to(dy.dtype), dy.dtype, out=G[:, k:])
    else:
        G = _gemm(dy, torch.cat([U, M.to(U.dtype)], 1), dy.dtype)
    dS = _gemm(G[:, :k].T, h, S.dtype, split=reduction_split(T, k, k, dy.device))
    dM = _gemm(dy.T, h[:, :r], M.dtype, split=reduction_split(T, m, r, dy.device))
    if not need_dx:
        return dy.new_empty((0, V.shape[0])), dS, dM
    SVt = _gemm(S.to(dy.dtype), V.T, dy.dtype)
    if is_quantized(V):
        dx = _gemm(G[:, :k], SVt, dy.dtype)
        return _gemm(G[:, k:], V.T, dy.dtype, residual=dx, out=dx), dS, dM
    return _gemm(G, torch.cat([SVt, V[:, :r].T], 0), dy.dtype), dS, dM
