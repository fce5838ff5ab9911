"""Reference for SNELL, sparse tuning with kernelized LoRA (docs/methods.md §4), plain eager PyTorch.

This is the *plain* version: it materialises the m×n kernel matrix K (and, in backward, the m×n
G = dyᵀx) every call, exactly like the published method. The Triton backend computes the same
quantities tile by tile without any m×n buffer.

Shapes: x (T, n), W0 (m, n), bias (m,) or None, A (H, n, d_h), B (H, m, d_h), coeffs H floats,
tau a 0-d tensor (the threshold); dy (T, m). W0 may be a `quant.QuantizedTensor`, dequantized
(`quant.dense`) where it is added to ΔW_s (this path forms m×n matrices anyway).
K[i, j] = Σ_h c_h ‖B[h, i] − A[h, j]‖₂ in float32 (float64 for float64 inputs).

Numerics (the same choices as the Triton and CUDA kernels, so the backends agree):
- Distances are summed from direct differences, D² = Σ_d (b_d − a_d)², at every d_h: the expanded
  ‖b‖² + ‖a‖² − 2b·a cancels when b ≈ a (gradients off by 4e-2 relative at d_h = 1 in fp32). It
  costs d_h passes over (H, m, n) here; in the fused kernels it is cheaper than the expanded form
  up to d_h = 16 (a tl.dot pads d_h to 16) and at most twice its CUDA-core work above.
- The gradient of D is summed the same way: dB_h[i] = c_h Σ_j E_ij (B_h[i] − A_h[j]) and
  dA_h[j] = −c_h Σ_i E_ij (B_h[i] − A_h[j]), not rowsum(E)·B − E·A, which cancels alike.
- τ = −inf means s = 0, plain kernelized LoRA: ΔW = K, with no |K| scaling and no threshold.
  Otherwise ΔW_s = K ⊙ |K| ⊙ 1[|K| > τ], written as K · mag so that a NaN in K stays NaN
  (mag = 0 there); E = G'/D except where D == 0 (where it is 0), so a NaN D gives a NaN E.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

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


def _pair_differences(A: Tensor, B: Tensor, dd: int) -> Tensor:
    """(H, m, n): B[h, i, dd] − A[h, j, dd]."""
    return B[:, :, dd, None] - A[:, None, :, dd]


def head_distances(A: Tensor, B: Tensor) -> Tensor:
    """D (H, m, n), D[h, i, j] = ‖B[h, i] − A[h, j]‖₂ in the compute dtype, summed over d in order."""
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
    absK = kernelized_update(A, B, coeffs).abs().flatten()
    return torch.kthvalue(absK, kth_rank(absK.numel(), sparsity)).values


def _magnitude(K: Tensor, tau: Tensor) -> Tensor:
    """The stop-gradient factor: 1 for τ = −inf (s = 0), else |K| ⊙ 1[|K| > τ]."""
    absK = K.abs()
    tau = tau.to(absK.dtype)
    sparse_mag = torch.where(absK > tau, absK, torch.zeros((), dtype=absK.dtype, device=absK.device))
    return torch.where(torch.isneginf(tau), torch.ones_like(absK), sparse_mag)


def _sparse_delta(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor):
    """(ΔW_s, D, mag): ΔW_s = K ⊙ mag (see `_magnitude`)."""
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
    """y (T, m) = x (W0 + ΔW_s)ᵀ + b. W0 + ΔW_s is summed in the compute dtype, then cast to x's dtype."""
    delta = _sparse_delta(A, B, coeffs, tau)[0]
    W = (dense(W0, delta.dtype) + delta).to(x.dtype)
    y = x @ W.T
    return y if bias is None else y + bias


def snell_bwd(
    dy: Tensor, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes ΔW_s (nothing but x was saved). Returns dx (T, n) (empty (0, n) unless need_dx),
    dA (H, n, d_h), dB (H, m, d_h) in A's dtype, with G = dyᵀx, G' = G ⊙ mag, E_h = G' ⊘ D_h
    (0 where D_h = 0): dB_h[i] = c_h Σ_j E_ij (B_h[i] − A_h[j]), dA_h[j] = −c_h Σ_i E_ij (B_h[i] − A_h[j])."""
    delta, D, mag = _sparse_delta(A, B, coeffs, tau)
    cd = delta.dtype
    if need_dx:
        dx = dy @ (dense(W0, cd) + delta).to(dy.dtype)
    else:
        dx = dy.new_empty((0, x.shape[1]))
    Gp = (dy.to(cd).T @ x.to(cd)) * mag
    Af, Bf = A.to(cd), B.to(cd)
    dA = torch.empty_like(Af)
    dB = torch.empty_like(Bf)
    zero = torch.zeros((), dtype=cd, device=A.device)
    for h in range(D.shape[0]):
        Dh = D[h]
        E = torch.where(Dh == 0, zero, Gp / torch.where(Dh == 0, torch.ones_like(Dh), Dh))
        for dd in range(A.shape[2]):
            P = E * (Bf[h, :, dd, None] - Af[h, None, :, dd])
            dB[h, :, dd] = coeffs[h] * P.sum(1)
            dA[h, :, dd] = -coeffs[h] * P.sum(0)
    return dx, dA.to(A.dtype), dB.to(B.dtype)
