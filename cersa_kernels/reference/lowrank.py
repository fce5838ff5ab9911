"""Reference for the CERSA low-rank op (docs/methods.md §1), plain eager PyTorch.

Shapes: x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) or None; dy (T, m), h (T, k).
S may be stored in a wider dtype than x (an fp32 master copy); it is cast to x's dtype for the
matmuls, and dS comes back in S's dtype. U and V may be `quant.QuantizedTensor`s: each is dequantized
(`quant.dense`) inside the one product that reads it, a transient freed as soon as that product is
done, so at most one dense copy of a quantized operand exists at a time.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..quant import dense


def lowrank_fwd(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """y = (x V) Sᵀ Uᵀ + b. Returns y (T, m) and h = x V (T, k)."""
    h = x @ dense(V)
    y = (h @ S.to(x.dtype).T) @ dense(U).T
    if bias is not None:
        y = y + bias
    return y, h


def lowrank_bwd(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """g = dy U; dS = gᵀ h; dx = (g S) Vᵀ. Returns dx (T, n) (empty (0, n) if not need_dx) and dS (k, k)."""
    g = dy @ dense(U)
    dS = (g.T @ h).to(S.dtype)
    if need_dx:
        dx = (g @ S.to(g.dtype)) @ dense(V).T
    else:
        dx = dy.new_empty((0, V.shape[0]))
    return dx, dS
