"""Reference for the LoRA op (docs/methods.md §5), plain eager PyTorch, with reproducible dropout.

Shapes: x (T, n), W (m, n) frozen, bias (m,) or None, A (r, n), B (m, r); dy (T, m), xa (T, r).
W may be a `quant.QuantizedTensor`, dequantized (`quant.dense`) inside the product that reads it.
`y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`, with drop(x) = x ⊙ keep / (1 − p).

Dropout is counter-based: keep[t, j] = hash32(lo32(t·n + j) ^ key) >> 8 ≥ round(p·2²⁴), with
key = hash32(lo32(seed) ^ hash32(hi32(seed))): all 64 bits of the seed reach the key (seeds 5 and
5 + 2³² differ), and a seed in [0, 2³²) keeps key = hash32(seed) (hash32(0) = 0). The mask is a
pure function of (seed, element index), so the backward regenerates it instead of saving a T×n
mask, and the Triton kernels (`triton/gemm.py::_hash32`, given this key) compute the same bits. The
index is taken mod 2³², so the pattern repeats after 2³² elements of one call (T·n ≥ 4.3e9).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant import dense

_MASK32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit integer mixer (xorshift-multiply) on python ints or int64 tensors in [0, 2³²).
    Each product stays below 2⁶³, so int64 arithmetic is exact on every backend."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _MASK32
    x = x ^ (x >> 16)
    return x


def dropout_params(p: float, seed: Tensor) -> tuple[int, int, float]:
    """(key, threshold, 1/(1−p)) of the mask for dropout probability p and the int64 seed tensor."""
    seed = int(seed)  # a Python int: the high word of a negative seed is its two's complement
    key = hash32((seed & _MASK32) ^ hash32((seed >> 32) & _MASK32))
    return key, int(round(p * (1 << 24))), 1.0 / (1.0 - p)


def dropout_keep(rows: int, cols: int, p: float, seed: Tensor, device=None) -> Tensor:
    """The keep-mask (rows, cols) bool of dropout probability p for this seed."""
    key, thresh, _ = dropout_params(p, seed)
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device).reshape(rows, cols) & _MASK32
    return (hash32(idx ^ key) >> 8) >= thresh


def _dropped(x: Tensor, p: float, seed: Tensor) -> Tensor:
    if p == 0.0:
        return x
    keep = dropout_keep(x.shape[0], x.shape[1], p, seed, x.device)
    return torch.where(keep, x, 0) * (1.0 / (1.0 - p))


def lora_fwd(
    x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout_p: float, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s·xa Bᵀ with xa = drop(x) Aᵀ. Returns y (T, m) and xa (T, r)."""
    xa = _dropped(x, dropout_p, seed) @ A.T
    y = x @ dense(W).T + (xa @ B.T) * scale  # the dense W is a temporary, freed after its product
    if bias is not None:
        y = y + bias
    return y, xa


def lora_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, dropout_p: float,
    seed: Tensor, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """g = s·dy B; dB = s·dyᵀ xa; dA = gᵀ drop(x); dx = dy W + drop'(g A).
    Returns dx (T, n) (empty (0, n) unless need_dx), dA (r, n), dB (m, r)."""
    g = (dy @ B) * scale
    dB = (dy.T @ xa) * scale
    dA = g.T @ _dropped(x, dropout_p, seed)
    if need_dx:
        dx = dy @ dense(W) + _dropped(g @ A, dropout_p, seed)  # dropout's backward is the same mask and scale
    else:
        dx = dy.new_empty((0, W.shape[1]))
    return dx, dA, dB
