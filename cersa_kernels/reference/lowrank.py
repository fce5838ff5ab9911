"""Reference for the CERSA low-rank op (docs/methods.md §1), plain eager PyTorch.

Shapes: x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) or None; dy (T, m), h (T, k).
S may be stored in a wider dtype than x (an fp32 master copy); it is cast to x's dtype for the
matmuls, and dS comes back in S's dtype.

Folding S. The k×k core can be applied to the T×k activation (2Tk² FLOPs, a T×k temporary) or
folded once into the frozen factor it meets (U·S, m×k, 2mk² FLOPs, or S·Vᵀ, k×n, 2nk²). Each side
folds exactly when that is fewer FLOPs: the forward when m < T, the dx product when n < T. The
folded factor is then also the smaller temporary (m×k < T×k), so peak memory never grows.
The backward runs by row chunks of T (`_row_chunks`), see `lowrank_bwd`.
U and V may be `quant.QuantizedTensor`s: each is dequantized (`quant.dense`) once per call, a
transient freed before the other's copy is made, so at most one dense copy exists at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant import dense, is_quantized


def lowrank_fwd(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """y = (x V) Sᵀ Uᵀ + b. Returns y (T, m) and h = x V (T, k)."""
    h = x @ dense(V)  # a quantized V's dense copy is freed after this product
    S = S.to(x.dtype)
    U = dense(U)
    if U.shape[0] < h.shape[0]:
        left, right = h, (U @ S).T  # S folded into U: 2mk² once instead of 2Tk²
    else:
        left, right = h @ S.T, U.T
    y = left @ right if bias is None else torch.addmm(bias, left, right)
    return y, h


def _row_chunks(T: int) -> list[slice]:
    """Row chunks of the backward: an eighth of T each (at least 64 rows, so each GEMM still has
    rows to work on), so its T×k temporaries (g, g·S) exist one chunk at a time."""
    step = max(64, -(-T // 8))
    return [slice(t, min(T, t + step)) for t in range(0, T, step)]


def lowrank_bwd(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """g = dy U; dS = gᵀ h; dx = (g S) Vᵀ. Returns dx (T, n) (empty (0, n) if not need_dx) and dS (k, k).

    By row chunks of T: the saved h is alive throughout (autograd holds it), so a whole T×k g
    beside it would keep two T×k tensors more than plain autograd does at its peak (dx)."""
    T, n = dy.shape[0], V.shape[0]
    # dS summed over the chunks in float32 for 16-bit inputs, else in their own dtype
    dS = torch.zeros(S.shape, dtype=torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype,
                     device=h.device)
    Sg = S.to(dy.dtype)
    # S folded into Vᵀ (2nk² once) when that is cheaper than g·S (2Tk²)
    # (also whenever V is quantized: its dense copy then lives only for this product, before U's)
    SVt = Sg @ dense(V).T if need_dx and (n < T or is_quantized(V)) else None
    U = dense(U)  # one dense copy of a quantized U for every chunk
    dx = dy.new_empty((T, n)) if need_dx else dy.new_empty((0, n))
    for rows in _row_chunks(T):
        g = dy[rows] @ U
        if dS.dtype == g.dtype:
            dS.addmm_(g.T, h[rows])
        else:
            dS += g.T @ h[rows]
        if need_dx:
            torch.mm(g, SVt, out=dx[rows]) if SVt is not None else torch.mm(g @ Sg, V.T, out=dx[rows])
    return dx, dS.to(S.dtype)
