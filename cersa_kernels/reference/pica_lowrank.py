"""Reference for PiCa on a CERSA base (docs/methods.md §1 + §2): the PiCa projection P = V_k[:, :r]ᵀ
is the CERSA basis itself, so the branch reuses h = x V_k.

Shapes: x (T, n), V (n, k), S (k, k), U (m, k), M (m, r) with r ≤ k, bias (m,); dy (T, m), h (T, k).
    y  = h Sᵀ Uᵀ + h[:, :r] Mᵀ + b
    dS = (dy U)ᵀ h,  dM = dyᵀ h[:, :r],  dx = (dy U) S Vᵀ + (dy M) V[:, :r]ᵀ
U and V may be `quant.QuantizedTensor`s (dequantized one at a time, see reference/lowrank.py).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..quant import dense
from .lowrank import lowrank_bwd, lowrank_fwd


def pica_lowrank_fwd(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Returns y (T, m) and h = x V (T, k)."""
    y, h = lowrank_fwd(x, V, S, U, bias)
    r = M.shape[1]
    return y.addmm_(h[:, :r], M.to(x.dtype).T), h  # in place: no second T×m buffer


def pica_lowrank_bwd(
    dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (T, n) (empty (0, n) unless need_dx), dS (k, k) in S's dtype, dM (m, r) in M's dtype."""
    r = M.shape[1]
    dx, dS = lowrank_bwd(dy, h, V, S, U, need_dx)
    dM = (dy.T @ h[:, :r]).to(M.dtype)
    if need_dx:
        # a quantized V is dequantized a second time here (O(n·k), against the O(T·n·k) products)
        # rather than kept dense across lowrank_bwd, where U's transient would then coexist with it
        dx.addmm_(dy @ M.to(dy.dtype), dense(V)[:, :r].T)  # in place: no second T×n buffer
    return dx, dS, dM
