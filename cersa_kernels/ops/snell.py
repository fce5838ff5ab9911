"""SNELL: sparse tuning with kernelized LoRA (METHODS.md §4): `y = x (W0 + ΔW_s)ᵀ + b`.

Custom ops (each runs on the backend `cersa_kernels.backends` selects for the call):
- `cersa::snell_threshold(A, B, coeffs, sparsity) -> tau`: τ, the k-th smallest |K| (0-d, fp32, or
  fp64 for fp64 inputs; -inf for s = 0). No gradient: it is the stop-gradient threshold.
- `cersa::snell_fwd(x, W0, bias, A, B, coeffs, tau) -> y`.
- `cersa::snell_bwd(dy, x, W0, A, B, coeffs, tau, need_dx) -> (dx, dA, dB)`: ΔW_s is recomputed.
Autograd keeps x and the scalar τ (4 bytes); W0, A and B are the layer's own tensors.
dbias = Σ_T dy is formed in the autograd formula.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._checks import (
    check_features, check_floating, check_same_device, check_same_dtype, check_shape, check_snell_factors, check_tensors,
)
from ..backends import kernel_for, requested_backend, unavailable_reasons, use_backend

__all__ = ["snell_linear", "snell_threshold", "snell_delta", "merge_backend", "check_snell_config"]


def _tau_dtype(A: Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


@torch.library.custom_op("cersa::snell_threshold", mutates_args=())
def _snell_threshold_op(A: Tensor, B: Tensor, coeffs: list[float], sparsity: float) -> Tensor:
    """A (H, n, d_h), B (H, m, d_h) -> τ (0-d)."""
    return kernel_for("snell_threshold", [A, B])(A, B, coeffs, sparsity)


@_snell_threshold_op.register_fake
def _(A, B, coeffs, sparsity):
    return A.new_empty((), dtype=_tau_dtype(A))


@torch.library.custom_op("cersa::snell_fwd", mutates_args=())
def snell_fwd(
    x: Tensor, W0: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, coeffs: list[float], tau: Tensor
) -> Tensor:
    """x (T, n), W0 (m, n), bias (m,), A (H, n, d_h), B (H, m, d_h), tau (0-d) -> y (T, m)."""
    tensors = [t for t in (x, W0, bias, A, B) if t is not None]
    return kernel_for("snell_fwd", tensors)(x, W0, bias, A, B, coeffs, tau)


@snell_fwd.register_fake
def _(x, W0, bias, A, B, coeffs, tau):
    return x.new_empty((x.shape[0], W0.shape[0]))


@torch.library.custom_op("cersa::snell_bwd", mutates_args=())
def snell_bwd(
    dy: Tensor, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, coeffs: list[float], tau: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m) -> dx (T, n) (shape (0, n) unless need_dx), dA (H, n, d_h), dB (H, m, d_h)."""
    return kernel_for("snell_bwd", [dy, x, W0, A, B])(dy, x, W0, A, B, coeffs, tau, need_dx)


@snell_bwd.register_fake
def _(dy, x, W0, A, B, coeffs, tau, need_dx):
    rows = dy.shape[0] if need_dx else 0
    return dy.new_empty((rows, x.shape[1])), A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, W0, bias, A, B, coeffs, tau = inputs
    # x is the only activation; tau is one scalar (saved so backward needs no second selection);
    # W0, A and B are the layer's own tensors.
    ctx.save_for_backward(x, W0, A, B, tau)
    ctx.coeffs = coeffs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, W0, A, B, tau = ctx.saved_tensors
    need_dx, _, need_dbias, need_dA, need_dB, _, _ = ctx.needs_input_grad
    dx = dA = dB = dbias = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = torch.ops.cersa.snell_bwd(dy, x, W0, A, B, ctx.coeffs, tau, need_dx)
    if need_dbias:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return (
        dx if need_dx else None, None, dbias, dA if need_dA else None, dB if need_dB else None, None, None,
    )


snell_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_snell_config(
    rank: int, heads: int, sparsity: float, coeffs: Sequence[float], layer: str
) -> None:
    """Errors for a bad SNELL configuration, naming the layer and the expected/actual values."""
    if heads < 1 or rank < 1 or rank % heads != 0:
        raise ValueError(f"{layer}: heads must be ≥ 1 and divide rank; got rank={rank}, heads={heads}")
    if len(coeffs) != heads:
        raise ValueError(f"{layer}: expected one coefficient per head ({heads}), got {len(coeffs)}: {tuple(coeffs)}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{layer}: sparsity must be in [0, 1), got {sparsity}")


def _check_factors(A: Tensor, B: Tensor, coeffs: Sequence[float], layer: str) -> None:
    check_snell_factors(A, B, layer)
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[2]:
        raise ValueError(
            f"{layer}: A must be (H, in_features, d_h) and B (H, out_features, d_h) with the same H and d_h, "
            f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    if len(coeffs) != A.shape[0]:
        raise ValueError(
            f"{layer}: expected one coefficient per head ({A.shape[0]}), got {len(coeffs)}: {tuple(coeffs)}"
        )
    for name, t in (("A", A), ("B", B)):
        check_floating(name, t, layer)
    check_same_dtype({"A": A, "B": B}, layer)
    check_same_device({"A": A, "B": B}, layer)


def snell_threshold(
    A: Tensor, B: Tensor, coeffs: Sequence[float], sparsity: float, *, layer: str = "snell_threshold"
) -> Tensor:
    """τ (0-d tensor): the k-th smallest |K| over all m·n entries, k = ⌊s·(m·n − 1)⌋ + 1 (what
    torch.kthvalue gives on the materialised |K|), or -inf for s = 0. A (H, n, d_h), B (H, m, d_h).
    The Triton backend finds it with an exact radix select that never forms K."""
    _check_factors(A, B, coeffs, layer)
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{layer}: sparsity must be in [0, 1), got {sparsity}")
    return torch.ops.cersa.snell_threshold(A.detach(), B.detach(), [float(c) for c in coeffs], float(sparsity))


def merge_backend(A: Tensor, B: Tensor) -> str:
    """Where the merge runs: the `cuda` kernel where `_cuda` is built and A, B are CUDA tensors,
    else the reference, under every backend setting (`torch`, when asked for, always gets the
    reference). Triton has no merge kernel: the merge forms the m×n result anyway."""
    if requested_backend() != "torch" and not unavailable_reasons("cuda", "snell_delta", [A, B]):
        return "cuda"
    return "torch"


def snell_delta(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: float) -> Tensor:
    """ΔW_s (m, n) in A's dtype for a threshold τ (a float; −inf for s = 0, where ΔW = K): the
    merge, on `merge_backend(A, B)` (this one does form the m×n matrix: it is the result)."""
    _check_factors(A, B, coeffs, "snell_delta")
    with use_backend(merge_backend(A, B)):
        kernel = kernel_for("snell_delta", [A, B])
    return kernel(A.detach(), B.detach(), tuple(float(c) for c in coeffs), float(tau))


def snell_linear(
    x: Tensor,
    W0: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    coeffs: Sequence[float] = (0.1, -0.1),
    sparsity: float = 0.0,
    *,
    layer: str = "snell_linear",
) -> Tensor:
    """`y = x (W0 + ΔW_s)ᵀ + bias`, x (..., n) -> y (..., m), with W0 (m, n) frozen, A (H, n, d_h),
    B (H, m, d_h), K[i, j] = Σ_h coeffs[h]·‖B[h, i] − A[h, j]‖, τ = the s-quantile of |K| and
    ΔW_s = K ⊙ sg(|K|) ⊙ 1[|K| > τ], or ΔW = K for sparsity 0 (METHODS §4). Gradients flow to x, A, B and bias. Autograd keeps
    x and τ only; `layer` names the caller in error messages."""
    check_tensors(layer, x=x, W0=W0, bias=bias)
    if W0.dim() != 2:
        raise ValueError(f"{layer}: W0 must be 2-D (out_features, in_features), got {tuple(W0.shape)}")
    m, n = W0.shape
    check_features(x, n, layer)
    _check_factors(A, B, coeffs, layer)
    check_shape("A", A, (A.shape[0], n, A.shape[2]), layer)
    check_shape("B", B, (A.shape[0], m, A.shape[2]), layer)
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{layer}: sparsity must be in [0, 1), got {sparsity}")
    check_floating("x", x, layer)
    check_same_dtype({"x": x, "W0": W0, "A": A, "B": B, "bias": bias}, layer)
    check_same_device({"x": x, "W0": W0, "A": A, "B": B, "bias": bias}, layer)
    if torch.is_grad_enabled() and W0.requires_grad:
        raise ValueError(f"{layer}: W0 is frozen and gets no gradient, but requires_grad is set on it")
    coeffs = [float(c) for c in coeffs]
    tau = torch.ops.cersa.snell_threshold(A.detach(), B.detach(), coeffs, float(sparsity))
    lead = x.shape[:-1]
    y = torch.ops.cersa.snell_fwd(x.reshape(-1, n), W0, bias, A, B, coeffs, tau)
    return y.reshape(*lead, m)
