"""The PiCa ops (METHODS.md §2): `y = x W0ᵀ + b + (x Pᵀ) Mᵀ`, W0 and P frozen, M trainable.

Custom ops (each runs on the backend `cersa_kernels.backends` selects for the call):
- `cersa::pica_fwd(x, W, bias, P, M) -> (y, h)`, h = x Pᵀ (T×r), the only activation saved.
- `cersa::pica_bwd(dy, h, W, P, M, need_dx) -> (dx, dM)`.
On a CERSA base (W0 ≈ U S Vᵀ, P = V[:, :r]ᵀ, r ≤ k) the branch reuses CERSA's h = x V:
- `cersa::pica_lowrank_fwd(x, V, S, U, M, bias) -> (y, h)`, h = x V (T×k), the only activation saved.
- `cersa::pica_lowrank_bwd(dy, h, V, S, U, M, need_dx) -> (dx, dS, dM)`.
dbias = Σ_T dy is formed in the autograd formula.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_features, check_floating, check_same_device, check_same_dtype, check_shape, check_tensors
from ..backends import kernel_for
from ._bias import bias_grad

__all__ = ["pica_linear", "pica_lowrank_linear"]


@torch.library.custom_op("cersa::pica_fwd", mutates_args=())
def pica_fwd(x: Tensor, W: Tensor, bias: Optional[Tensor], P: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """x (T, n), W (m, n), bias (m,), P (r, n), M (m, r) -> y (T, m), h (T, r)."""
    tensors = [t for t in (x, W, bias, P, M) if t is not None]
    return kernel_for("pica_fwd", tensors)(x, W, bias, P, M)


@pica_fwd.register_fake
def _(x, W, bias, P, M):
    return x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], P.shape[0]))


@torch.library.custom_op("cersa::pica_bwd", mutates_args=())
def pica_bwd(dy: Tensor, h: Tensor, W: Tensor, P: Tensor, M: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, r) -> dx (T, n) ((0, n) unless need_dx), dM (m, r) in M's dtype."""
    return kernel_for("pica_bwd", [dy, h, W, P, M])(dy, h, W, P, M, need_dx)


@pica_bwd.register_fake
def _(dy, h, W, P, M, need_dx):
    return dy.new_empty((dy.shape[0] if need_dx else 0, W.shape[1])), M.new_empty(M.shape)


def _pica_setup(ctx, inputs, output):
    x, W, bias, P, M = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], W, P, M)  # h is the only activation; W, P, M are weights
    ctx.bias_dtype = None if bias is None else bias.dtype


def _pica_backward(ctx, dy, _dh):
    h, W, P, M = ctx.saved_tensors
    need_dx, _, need_dbias, _, need_dM = ctx.needs_input_grad
    dx = dM = None
    if need_dx or need_dM:
        dx, dM = torch.ops.cersa.pica_bwd(dy, h, W, P, M, need_dx)
    dbias = bias_grad(dy, ctx.bias_dtype) if need_dbias else None
    return (dx if need_dx else None), None, dbias, None, (dM if need_dM else None)


pica_fwd.register_autograd(_pica_backward, setup_context=_pica_setup)


@torch.library.custom_op("cersa::pica_lowrank_fwd", mutates_args=())
def pica_lowrank_fwd(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), M (m, r ≤ k), bias (m,) -> y (T, m), h (T, k)."""
    tensors = [t for t in (x, V, S, U, M, bias) if t is not None]
    return kernel_for("pica_lowrank_fwd", tensors)(x, V, S, U, M, bias)


@pica_lowrank_fwd.register_fake
def _(x, V, S, U, M, bias):
    return x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], V.shape[1]))


@torch.library.custom_op("cersa::pica_lowrank_bwd", mutates_args=())
def pica_lowrank_bwd(
    dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) ((0, n) unless need_dx), dS (k, k), dM (m, r)."""
    return kernel_for("pica_lowrank_bwd", [dy, h, V, S, U, M])(dy, h, V, S, U, M, need_dx)


@pica_lowrank_bwd.register_fake
def _(dy, h, V, S, U, M, need_dx):
    return dy.new_empty((dy.shape[0] if need_dx else 0, V.shape[0])), S.new_empty(S.shape), M.new_empty(M.shape)


def _pica_lowrank_setup(ctx, inputs, output):
    x, V, S, U, M, bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], V, S, U, M)  # h is the only activation
    ctx.bias_dtype = None if bias is None else bias.dtype


def _pica_lowrank_backward(ctx, dy, _dh):
    h, V, S, U, M = ctx.saved_tensors
    need_dx, _, need_dS, _, need_dM, need_dbias = ctx.needs_input_grad
    dx = dS = dM = None
    if need_dx or need_dS or need_dM:
        dx, dS, dM = torch.ops.cersa.pica_lowrank_bwd(dy, h, V, S, U, M, need_dx)
    dbias = bias_grad(dy, ctx.bias_dtype) if need_dbias else None
    return (
        dx if need_dx else None, None, dS if need_dS else None, None, dM if need_dM else None, dbias
    )


pica_lowrank_fwd.register_autograd(_pica_lowrank_backward, setup_context=_pica_lowrank_setup)


def _check_frozen(layer: str, **tensors: Tensor) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t.requires_grad:
                raise ValueError(f"{layer}: {name} is frozen and gets no gradient, but requires_grad is set on it")


def pica_linear(
    x: Tensor, W: Tensor, P: Tensor, M: Tensor, bias: Optional[Tensor] = None, *, layer: str = "pica_linear"
) -> Tensor:
    """`y = x Wᵀ + bias + (x Pᵀ) Mᵀ`: x (..., n), W (m, n), P (r, n), M (m, r) -> y (..., m).

    W and P are frozen; gradients flow to x, M and bias. Only h = x Pᵀ (T×r) is saved. M may be
    kept in a wider dtype than x (fp32 master); dM comes back in M's dtype.
    """
    check_tensors(layer, x=x, W=W, P=P, M=M, bias=bias)
    if W.dim() != 2 or P.dim() != 2 or M.dim() != 2:
        raise ValueError(
            f"{layer}: W, P and M must be 2-D, got W {tuple(W.shape)}, P {tuple(P.shape)}, M {tuple(M.shape)}"
        )
    m, n = W.shape
    r = P.shape[0]
    check_features(x, n, layer)
    check_shape("P", P, (r, n), layer)
    check_shape("M", M, (m, r), layer)
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    for name, t in (("x", x), ("M", M)):
        check_floating(name, t, layer)
    check_same_dtype({"x": x, "W": W, "P": P, "bias": bias}, layer)
    check_same_device({"x": x, "W": W, "P": P, "M": M, "bias": bias}, layer)
    _check_frozen(layer, W=W, P=P)
    lead = x.shape[:-1]
    y, _ = torch.ops.cersa.pica_fwd(x.reshape(-1, n), W, bias, P, M)
    return y.reshape(*lead, m)


def pica_lowrank_linear(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, bias: Optional[Tensor] = None, *,
    layer: str = "pica_lowrank_linear",
) -> Tensor:
    """`y = x V Sᵀ Uᵀ + (x V[:, :r]) Mᵀ + bias`: CERSA with a PiCa branch that reuses h = x V.

    x (..., n), V (n, k), S (k, k), U (m, k), M (m, r) with r ≤ k -> y (..., m). U, V frozen;
    gradients flow to x, S, M and bias. Only h = x V (T×k) is saved.
    """
    check_tensors(layer, x=x, V=V, S=S, U=U, M=M, bias=bias)
    if V.dim() != 2 or U.dim() != 2 or M.dim() != 2:
        raise ValueError(
            f"{layer}: U, V and M must be 2-D, got U {tuple(U.shape)}, V {tuple(V.shape)}, M {tuple(M.shape)}"
        )
    n, k = V.shape
    m, r = M.shape
    check_features(x, n, layer)
    check_shape("U", U, (m, k), layer)
    check_shape("S", S, (k, k), layer)
    if r > k:
        raise ValueError(f"{layer}: the PiCa rank r must be <= the CERSA rank k = {k} to reuse h = x V, got r = {r}")
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    for name, t in (("x", x), ("S", S), ("M", M)):
        check_floating(name, t, layer)
    check_same_dtype({"x": x, "V": V, "U": U, "bias": bias}, layer)
    check_same_device({"x": x, "V": V, "S": S, "U": U, "M": M, "bias": bias}, layer)
    _check_frozen(layer, U=U, V=V)
    lead = x.shape[:-1]
    y, _ = torch.ops.cersa.pica_lowrank_fwd(x.reshape(-1, n), V, S, U, M, bias)
    return y.reshape(*lead, m)
