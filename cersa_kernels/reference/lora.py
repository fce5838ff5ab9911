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

The mask is generated in row chunks (`_keep_chunks`) and applied chunk by chunk, fused with the
matmul that consumes it: the int64 hash of a whole T×n mask at once needs several T×n int64
temporaries (8 bytes an element each, far out of cache), which cost more time and memory than
the mask saves. A chunk's hash runs in place on one int64 buffer that stays in cache, the
transient memory is bounded by the chunk, and the backward generates the mask once for both of
its uses (dA and dx).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from ..quant import dense

_MASK32 = 0xFFFFFFFF
# Mask elements per chunk. CPU: 2¹⁸ (a 2 MiB int64 work buffer and its shifted copy, in L2/L3;
# fewer, larger chunks measured faster than 2¹⁶ at T·n ≥ 2¹⁹). CUDA: 2²², enough elements per launch to keep the GPU busy while the transient
# stays bounded (32 MiB of int64 instead of 8·T·n bytes per temporary).
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_CHUNK_ELEMENTS_OTHER = 1 << 22


def hash32(x):
    """A 32-bit integer mixer (xorshift-multiply) on python ints or int64 tensors in [0, 2³²).
    Each product stays below 2⁶³, so int64 arithmetic is exact on every backend. A tensor is
    updated in place (the augmented operators), so the chunked mask hashes one buffer."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= _MASK32
    x ^= x >> 15
    x *= 0x1B873593
    x &= _MASK32
    x ^= x >> 16
    return x


def dropout_params(p: float, seed: Tensor) -> tuple[int, int, float]:
    """(key, threshold, 1/(1−p)) of the mask for dropout probability p and the int64 seed tensor."""
    seed = int(seed)  # a Python int: the high word of a negative seed is its two's complement
    key = hash32((seed & _MASK32) ^ hash32((seed >> 32) & _MASK32))
    return key, int(round(p * (1 << 24))), 1.0 / (1.0 - p)


def _keep_chunks(rows: int, cols: int, p: float, seed: Tensor, device=None) -> Iterator[tuple[slice, Tensor]]:
    """(row slice, keep-mask of those rows (bool)) over consecutive row chunks of the rows × cols mask."""
    key, thresh, _ = dropout_params(p, seed)
    device = torch.device("cpu") if device is None else torch.device(device)
    # at most a quarter of the rows per chunk, so a small call's int64 buffers (8 bytes an element,
    # and a shifted copy) stay within the size of the (T, n) activation instead of four times it
    step = max(1, min(_CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_OTHER) // max(cols, 1), -(-rows // 4)))
    work = torch.empty(min(step, rows) * cols, dtype=torch.int64, device=device)
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        h = work[: (t1 - t0) * cols]
        torch.arange(t0 * cols, t1 * cols, dtype=torch.int64, device=device, out=h)
        if t1 * cols > _MASK32:  # the index wraps mod 2³² only past 2³² elements
            h &= _MASK32
        h ^= key
        hash32(h)
        # (h >> 8) ≥ thresh ⟺ h ≥ thresh·2⁸ for integers h ≥ 0. A fresh bool tensor per chunk:
        # autograd may keep it (torch.where saves its condition) while `work` is reused.
        yield slice(t0, t1), (h >= thresh << 8).view(t1 - t0, cols)


def dropout_keep(rows: int, cols: int, p: float, seed: Tensor, device=None) -> Tensor:
    """The keep-mask (rows, cols) bool of dropout probability p for this seed."""
    keep = torch.empty((rows, cols), dtype=torch.bool, device=device)
    for sl, chunk in _keep_chunks(rows, cols, p, seed, device):
        keep[sl] = chunk
    return keep


def _dropped_matmul(x: Tensor, other: Tensor, p: float, seed: Tensor) -> Tensor:
    """drop(x) @ other, x (T, n), other (n, c): the mask applied per row chunk just before its
    matmul (where, not a product: a dropped NaN becomes 0, as in the Triton kernels), and
    1/(1 − p) applied once to the (T, c) result. Differentiable (the eager comparator runs it)."""
    if p == 0.0:
        return x @ other
    parts = [torch.where(keep, x[rows], 0) @ other for rows, keep in _keep_chunks(*x.shape, p, seed, x.device)]
    return torch.cat(parts).mul_(dropout_params(p, seed)[2])


def lora_fwd(
    x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout_p: float, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s·xa Bᵀ with xa = drop(x) Aᵀ. Returns y (T, m) and xa (T, r)."""
    xa = _dropped_matmul(x, A.T, dropout_p, seed)
    Wd = dense(W)  # a quantized W0: one dense copy, freed when this returns
    y = x @ Wd.T if bias is None else torch.addmm(bias, x, Wd.T)
    # in place: one T×m buffer (mm/addmm's backward does not need its output)
    return y.addmm_(xa, B.T, alpha=scale), xa


def lora_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, dropout_p: float,
    seed: Tensor, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """g = s·dy B; dB = s·dyᵀ xa; dA = gᵀ drop(x); dx = dy W + drop'(g A).
    Returns dx (T, n) (empty (0, n) unless need_dx), dA (r, n), dB (m, r)."""
    g = (dy @ B).mul_(scale)
    dB = (dy.T @ xa).mul_(scale)
    dx = dy @ dense(W) if need_dx else dy.new_empty((0, W.shape[1]))  # dense(W): a transient
    if dropout_p == 0.0:
        if need_dx:
            dx.addmm_(g, A)
        return dx, g.T @ x, dB
    # dropout's backward is the same mask and the same 1/(1−p): the factor goes on g once (T×r),
    # which both drop(x) (for dA) and drop'(g A) (for dx) carry; each chunk's mask serves both.
    g.mul_(dropout_params(dropout_p, seed)[2])
    # 16-bit dA is summed over the chunks in float32 (one rounding per chunk's partial, not per sum)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dA = torch.zeros(A.shape, dtype=acc, device=A.device)
    for rows, keep in _keep_chunks(*x.shape, dropout_p, seed, x.device):
        dA += g[rows].T @ torch.where(keep, x[rows], 0)
        if need_dx:
            dx[rows].add_(torch.where(keep, g[rows] @ A, 0))
    return dx, dA.to(A.dtype), dB
