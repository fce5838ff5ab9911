"""SNELL: sparse tuning with kernelized LoRA (docs/methods.md §4): `y = x (W0 + ΔW_s)ᵀ + b`.

- `cersa::snell_threshold(A, B, coeffs, sparsity) -> tau`: τ, the k-th smallest |K| (0-d, fp32, or
  fp64 for fp64 inputs; -inf for s = 0). No gradient: it is the stop-gradient threshold.
- `cersa::snell_fwd(x, W0, bias, A, B, coeffs, tau) -> y`.
- `cersa::snell_bwd(dy, x, W0, A, B, coeffs, tau, need_dx) -> (dx, dA, dB)`: ΔW_s is recomputed.
  Autograd keeps x and the scalar τ (4 bytes); W0, A and B are the layer's own tensors.
- `cersa::snell_delta(A, B, coeffs, tau) -> ΔW_s (m, n)`: the merge, on `merge_backend`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._checks import (
    check_features, check_floating, check_frozen, check_same_device, check_same_dtype, check_shape,
    check_snell_factors, check_tensors,
)
from ..backends import requested_backend, unavailable_reasons
from ._define import define_op, define_op_pair, flatten_tokens

__all__ = ["snell_linear", "snell_threshold", "snell_delta", "merge_backend", "check_snell_config"]


def _tau_dtype(A: Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def merge_backend(A: Tensor, B: Tensor) -> str:
    """Where the merge runs: the `cuda` kernel where `_cuda` is built and A, B are CUDA tensors,
    else the reference, under every backend setting (`torch`, when asked for, always gets the
    reference). Triton has no merge kernel: the merge forms the m×n result anyway."""
    if requested_backend() != "torch" and not unavailable_reasons("cuda", "snell_delta", [A, B]):
        return "cuda"
    return "torch"


_THRESHOLD = define_op(
    "snell_threshold", "Tensor A, Tensor B, float[] coeffs, float sparsity", "Tensor",
    fake=lambda A, B, coeffs, sparsity: A.new_empty((), dtype=_tau_dtype(A)),
)
_DELTA = define_op(
    "snell_delta", "Tensor A, Tensor B, float[] coeffs, float tau", "Tensor",
    fake=lambda A, B, coeffs, tau: A.new_empty((B.shape[1], A.shape[1])),
    backend=lambda A, B, coeffs, tau: merge_backend(A, B),
)
SNELL = define_op_pair(
    "snell",
    inputs="Tensor x, Tensor W0, Tensor? bias, Tensor A, Tensor B, float[] coeffs, Tensor tau",
    outputs=("y",),
    # x is the only activation; τ is one scalar (saved so backward needs no second selection);
    # W0, A and B are the layer's own tensors
    backward_uses=("x", "W0", "A", "B", "coeffs", "tau"),
    gradients=("x", "A", "B"),
    fake_forward=lambda x, W0, bias, A, B, coeffs, tau: x.new_empty((x.shape[0], W0.shape[0])),
    fake_backward=lambda dy, x, W0, A, B, coeffs, tau, need_dx: (
        dy.new_empty((dy.shape[0] if need_dx else 0, x.shape[1])), A.new_empty(A.shape), B.new_empty(B.shape)
    ),
    quantizable=("W0",),
)


def _check_sparsity(sparsity: float, layer: str) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{layer}: sparsity must be in [0, 1), got {sparsity}")


def check_snell_config(
    rank: int, heads: int, sparsity: float, coeffs: Sequence[float], layer: str
) -> None:
    """Errors for a bad SNELL configuration, naming the layer and the expected/actual values."""
    if heads < 1 or rank < 1 or rank % heads != 0:
        raise ValueError(f"{layer}: heads must be ≥ 1 and divide rank; got rank={rank}, heads={heads}")
    if len(coeffs) != heads:
        raise ValueError(f"{layer}: expected one coefficient per head ({heads}), got {len(coeffs)}: {tuple(coeffs)}")
    _check_sparsity(sparsity, layer)


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
    _check_sparsity(sparsity, layer)
    return _THRESHOLD(A.detach(), B.detach(), [float(c) for c in coeffs], float(sparsity))


def snell_delta(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: float) -> Tensor:
    """ΔW_s (m, n) in A's dtype for a threshold τ (a float; −inf for s = 0, where ΔW = K): the
    merge, on `merge_backend(A, B)` (this one does form the m×n matrix: it is the result)."""
    _check_factors(A, B, coeffs, "snell_delta")
    return _DELTA(A.detach(), B.detach(), [float(c) for c in coeffs], float(tau))


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
    ΔW_s = K ⊙ sg(|K|) ⊙ 1[|K| > τ], or ΔW = K for sparsity 0 (docs/methods.md §4). Gradients flow to x, A, B and bias. Autograd keeps
    x and τ only; `layer` names the caller in error messages. W0 may be a `quant.QuantizedTensor`
    (the torch backend dequantizes it; the Triton and CUDA kernels refuse it)."""
    check_tensors(layer, SNELL.quantizable, x=x, W0=W0, bias=bias)
    if W0.dim() != 2:
        raise ValueError(f"{layer}: W0 must be 2-D (out_features, in_features), got {tuple(W0.shape)}")
    m, n = W0.shape
    check_features(x, n, layer)
    _check_factors(A, B, coeffs, layer)
    check_shape("A", A, (A.shape[0], n, A.shape[2]), layer)
    check_shape("B", B, (A.shape[0], m, A.shape[2]), layer)
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    _check_sparsity(sparsity, layer)
    check_floating("x", x, layer)
    check_same_dtype({"x": x, "W0": W0, "A": A, "B": B, "bias": bias}, layer)
    check_same_device({"x": x, "W0": W0, "A": A, "B": B, "bias": bias}, layer)
    check_frozen(layer, W0=W0)
    coeffs = [float(c) for c in coeffs]
    tau = _THRESHOLD(A.detach(), B.detach(), coeffs, float(sparsity))
    x2, lead = flatten_tokens(x)
    y = SNELL(x2, W0, bias, A, B, coeffs, tau, layer=layer)
    return y.reshape(*lead, m)
