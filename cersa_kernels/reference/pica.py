"""Reference for the PiCa op (docs/methods.md §2), plain eager PyTorch.

Shapes: x (T, n), W (m, n) frozen, bias (m,) or None, P (r, n) frozen (= V_rᵀ of W), M (m, r)
trainable; dy (T, m), h (T, r). M may be kept in a wider dtype than x (an fp32 master copy): it is
cast for the matmuls and dM comes back in M's dtype. W may be a `quant.QuantizedTensor`, dequantized
(`quant.dense`) inside the product that reads it and freed after it.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..quant import dense


def pica_fwd(x: Tensor, W: Tensor, bias: Optional[Tensor], P: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """h = x Pᵀ; y = x Wᵀ + b + h Mᵀ. Returns y (T, m) and h (T, r)."""
    h = x @ P.T
    y = x @ dense(W).T + h @ M.to(x.dtype).T
    if bias is not None:
        y = y + bias
    return y, h


def pica_bwd(dy: Tensor, h: Tensor, W: Tensor, P: Tensor, M: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dM = dyᵀ h; dx = dy W + (dy M) P. Returns dx (T, n) (empty (0, n) unless need_dx), dM (m, r)."""
    dM = (dy.T @ h).to(M.dtype)
    if need_dx:
        dx = dy @ dense(W) + (dy @ M.to(dy.dtype)) @ P
    else:
        dx = dy.new_empty((0, W.shape[1]))
    return dx, dM
