"""Reference for SNELL, sparse tuning with kernelized LoRA (docs/methods.md §4), plain eager PyTorch.

The eager version: it computes K, the mask and, in backward, G = dyᵀx one row tile of ΔW at a
time (`_row_tiles`), so the m×n quantities exist one tile at a time; the only whole m×n tensors
are the selection's |K| (torch.kthvalue needs all of it) and the forward's GEMM operand W0 + ΔW_s.
Nothing m×n is saved for backward. The Triton backend computes the same quantities in register
tiles without any m×n buffer.

Shapes: x (T, n), W0 (m, n), bias (m,) or None, A (H, n, d_h), B (H, m, d_h), coeffs H floats,
tau a 0-d tensor (the threshold); dy (T, m). W0 may be a `quant.QuantizedTensor`, dequantized
(`quant.dense`) where it is added to ΔW_s (this path forms m×n matrices anyway).
K[i, j] = Σ_h c_h ‖B[h, i] − A[h, j]‖₂ in float32 (float64 for float64 inputs).

Numerics (the same choices as the Triton and CUDA kernels, so the backends agree):
- Distances are summed from direct differences, D² = Σ_d (b_d − a_d)², at every d_h: the expanded
  ‖b‖² + ‖a‖² − 2b·a cancels when b ≈ a (gradients off by 4e-2 relative at d_h = 1 in fp32). Here
  they are summed in order d = 0, 1, … and the root is correctly rounded, the kernels' own bits
  (so a τ from this reference selects the same entries in every kernel); in the fused kernels direct differences are
  cheaper than the expanded form up to d_h = 16 (a tl.dot pads d_h to 16) and at most twice its
  CUDA-core work above.
- The gradient of D is summed the same way: dB_h[i] = c_h Σ_j E_ij (B_h[i] − A_h[j]) and
  dA_h[j] = −c_h Σ_i E_ij (B_h[i] − A_h[j]), not rowsum(E)·B − E·A, which cancels alike (here
  cdist's own backward, which sums G'_ij (b − a)/D_ij over direct differences).
- τ = −inf means s = 0, plain kernelized LoRA: ΔW = K, with no |K| scaling and no threshold.
  Otherwise ΔW_s = K ⊙ |K| ⊙ 1[|K| > τ], written as K · mag so that a NaN in K stays NaN
  (mag = 0 there); E = G'/D except where D == 0 (where it is 0), so a NaN D gives a NaN E.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..quant import dense

__all__ = [
    "compute_dtype",
    "kth_rank",
    "head_distances",
    "kernelized_update",
    "snell_threshold",
    "snell_delta",
    "snell_fwd",
    "snell_bwd",
]


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise (K is never formed in half precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kth_rank(numel: int, sparsity: float) -> int:
    """k = ⌊s·(N−1)⌋ + 1: the k-th smallest |K| is the threshold that keeps exactly the entries
    torch.quantile(|K|, s) followed by `> τ` keeps (docs/methods.md §4)."""
    return int(math.floor(sparsity * (numel - 1))) + 1


# Rows of ΔW (= rows of B) per tile: every m×n quantity (D, K, mag, G) exists one row tile at a
# time. CPU: about 2¹⁸ elements per tile (1 MiB in fp32: a tile's temporaries stay in L2/L3, and
# fewer, larger tiles measured faster than 2¹⁶ on the benchmark shapes); elsewhere 2²², enough
# work per launch. The m×n ΔW itself is built only where it is the result (the merge) or a
# GEMM operand of the forward.
_TILE_ELEMENTS = {"cpu": 1 << 18}
_TILE_ELEMENTS_OTHER = 1 << 22


def _row_tiles(m: int, n: int, device: torch.device) -> Iterator[slice]:
    # at most a quarter of the rows per tile, so a small layer's tile temporaries (D for every
    # head, K, mag, G') stay a fraction of one m×n matrix
    step = max(1, min(_TILE_ELEMENTS.get(device.type, _TILE_ELEMENTS_OTHER) // max(n, 1), -(-m // 4)))
    return (slice(i, min(m, i + step)) for i in range(0, m, step))


def _pair_differences(A: Tensor, B: Tensor, dd: int) -> Tensor:
    """(H, m, n): B[h, i, dd] − A[h, j, dd]."""
    return B[:, :, dd, None] - A[:, None, :, dd]


def head_distances(A: Tensor, B: Tensor) -> Tensor:
    """D (H, m, n), D[h, i, j] = ‖B[h, i] − A[h, j]‖₂ in the compute dtype from direct differences,
    the squares summed in order d = 0, 1, … and the root correctly rounded: the kernels' bits (not
    torch.cdist, whose summation order over d differs). Each entry depends on its own two rows only
    (the same bits in a row tile as in the whole matrix), and D is exactly 0 for equal rows."""
    cd = compute_dtype(A)
    Af, Bf = A.to(cd), B.to(cd)
    sq = torch.zeros((A.shape[0], B.shape[1], A.shape[1]), dtype=cd, device=A.device)
    for dd in range(A.shape[2]):
        sq += _pair_differences(Af, Bf, dd).square()
    return sqrt_rn(sq)


def sqrt_rn(t: Tensor) -> Tensor:
    """Correctly rounded square root (the kernels' sqrt_rn / __fsqrt_rn). torch's CPU sqrt on
    float32 is not (it differs from the IEEE result in about 15% of values, by 1 ulp), which would
    put this reference's |K| an ulp away from the kernels' at entries the threshold compares: so a
    float32 root is taken in float64 and rounded once (exact for sqrt: 53 ≥ 2·24 + 2 bits), head by
    head to bound the transient."""
    if t.dtype != torch.float32:
        return t.sqrt()
    return torch.stack([h.double().sqrt_().float() for h in t.unbind(0)]) if t.dim() == 3 else t.double().sqrt().float()


def _distance_grad(grad: Tensor, x1: Tensor, x2: Tensor, D: Tensor) -> Tensor:
    """Σ_j grad[h, i, j]·(x1[h, i] − x2[h, j]) / D[h, i, j], 0 where D = 0: the gradient of D with
    respect to x1, summed from direct differences (the cancelling rowsum(E)·x1 − E·x2 is avoided);
    NaN where D is NaN."""
    return torch.ops.aten._cdist_backward(grad, x1, x2, 2.0, D)


def kernelized_update(A: Tensor, B: Tensor, coeffs: Sequence[float], D: Optional[Tensor] = None) -> Tensor:
    """K (m, n) = Σ_h c_h D_h in the compute dtype: SNELL's kernelized update before sparsification
    (the paper's "kernel matrix"; named after what it is here, not after GPU kernels)."""
    D = head_distances(A, B) if D is None else D
    K = coeffs[0] * D[0]
    for h in range(1, D.shape[0]):
        K = K + coeffs[h] * D[h]
    return K


def _no_sparsity(device: torch.device, dtype: torch.dtype) -> Tensor:
    # τ = −inf is how s = 0 (plain kernelized LoRA, ΔW = K) travels through the ops.
    return torch.full((), float("-inf"), device=device, dtype=dtype)


def snell_threshold(A: Tensor, B: Tensor, coeffs: Sequence[float], sparsity: float) -> Tensor:
    """τ (0-d, compute dtype) = the k-th smallest |K|, k = kth_rank(m·n, s), via torch.kthvalue on
    the materialised |K| (works above 2^24 elements, where torch.quantile refuses); -inf for s = 0."""
    cd = compute_dtype(A)
    if sparsity == 0:
        return _no_sparsity(A.device, cd)
    absK = torch.empty((B.shape[1], A.shape[1]), dtype=cd, device=A.device)
    for rows in _row_tiles(B.shape[1], A.shape[1], A.device):
        absK[rows] = kernelized_update(A, B[:, rows], coeffs).abs()
    absK = absK.flatten()
    return torch.kthvalue(absK, kth_rank(absK.numel(), sparsity)).values


def _magnitude(K: Tensor, tau: Tensor) -> Tensor:
    """The stop-gradient factor: 1 for τ = −inf (s = 0), else |K| ⊙ 1[|K| > τ]."""
    absK = K.abs()
    tau = tau.to(absK.dtype)
    sparse_mag = torch.where(absK > tau, absK, 0.0)
    return torch.where(torch.isneginf(tau), 1.0, sparse_mag)  # a 0-d condition: no ones tensor


def _sparse_delta(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor):
    """(ΔW_s, D, mag) for the rows of ΔW that B holds (a row tile, or all m): ΔW_s = K ⊙ mag (see `_magnitude`)."""
    D = head_distances(A, B)
    K = kernelized_update(A, B, coeffs, D)
    mag = _magnitude(K, tau)
    return K * mag, D, mag


def snell_delta(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: float) -> Tensor:
    """ΔW_s (m, n) in A's dtype: K·|K| where |K| > tau, else 0; K itself for tau = −inf (s = 0)
    (the merge; the contract of the `cuda` backend's snell_delta_cuda)."""
    tau_t = torch.tensor(tau, dtype=compute_dtype(A), device=A.device)
    return _sparse_delta(A, B, coeffs, tau_t)[0].to(A.dtype)


def snell_fwd(
    x: Tensor, W0: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor
) -> Tensor:
    """y (T, m) = x (W0 + ΔW_s)ᵀ + b. W0 + ΔW_s is summed in the compute dtype, then cast to x's dtype;
    it is built row tile by row tile, so the only m×n tensor is the GEMM operand W0 + ΔW_s."""
    m, n = W0.shape
    W0 = dense(W0)  # a quantized W0: one dense copy (W0 + ΔW_s is m×n anyway)
    Af, Bf = A.to(compute_dtype(A)), B.to(compute_dtype(A))
    W = torch.empty((m, n), dtype=x.dtype, device=x.device)
    for rows in _row_tiles(m, n, x.device):
        torch.add(_sparse_delta(Af, Bf[:, rows], coeffs, tau)[0], W0[rows], out=W[rows])  # cast on the way out
    return x @ W.T if bias is None else torch.addmm(bias, x, W.T)


def snell_bwd(
    dy: Tensor, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes ΔW_s (nothing but x was saved), one row tile of every m×n quantity at a time
    (the dx GEMM operand W0 + ΔW_s is the one whole m×n tensor).
    Returns dx (T, n) (empty (0, n) unless need_dx), dA (H, n, d_h), dB (H, m, d_h) in A's dtype,
    with G = dyᵀx, G' = G ⊙ mag, E_h = G' ⊘ D_h (0 where D_h = 0):
    dB_h[i] = c_h Σ_j E_ij (B_h[i] − A_h[j]), dA_h[j] = −c_h Σ_i E_ij (B_h[i] − A_h[j])."""
    m, n = W0.shape
    W0 = dense(W0)  # a quantized W0: one dense copy (W0 + ΔW_s is m×n anyway)
    cd = compute_dtype(A)
    Af, Bf, xf = A.to(cd), B.to(cd), x.to(cd)
    c = torch.tensor(list(coeffs), dtype=cd, device=A.device)[:, None, None]
    # W0 + ΔW_s for dx is assembled tile by tile and used in one GEMM after the loop: summing dx
    # over the tiles instead would round a 16-bit dx once per tile
    W = torch.empty((m, n), dtype=dy.dtype, device=dy.device) if need_dx else None
    dA = torch.zeros_like(Af)
    dB = torch.empty_like(Bf)
    for rows in _row_tiles(m, n, x.device):
        delta, D, mag = _sparse_delta(Af, Bf[:, rows], coeffs, tau)
        if need_dx:
            torch.add(delta, W0[rows], out=W[rows])
        Gp = (dy[:, rows].to(cd).T @ xf).mul_(mag).expand(D.shape)  # G' (rows, n), the same for every head
        # c_h multiplies the sums, as in the formula: a non-finite c_h gives ±inf, not inf − inf
        dB[:, rows] = c * _distance_grad(Gp, Bf[:, rows], Af, D)
        dA += _distance_grad(Gp.transpose(1, 2), Af, Bf[:, rows], D.transpose(1, 2))  # a and b swap roles
    dA *= c  # after the sum over the tiles too: c_h = inf gives ±inf, not inf − inf between tiles
    dx = dy @ W if need_dx else dy.new_empty((0, n))
    return dx, dA.to(A.dtype), dB.to(B.dtype)
