"""The CERSA low-rank op: `y = (x V) Sᵀ Uᵀ + b` with U, V frozen and S trainable (METHODS.md §1).

Custom ops (each runs on the backend `cersa_kernels.backends` selects for the call):
- `cersa::lowrank_fwd(x, V, S, U, bias) -> (y, h)`, h = x V, the only activation saved.
- `cersa::lowrank_bwd(dy, h, V, S, U, need_dx) -> (dx, dS)`, with g = dy U computed once.
dbias = Σ_T dy is formed in the autograd formula (a reduction, no kernel of its own).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_features, check_floating, check_same_device, check_same_dtype, check_shape, check_tensors
from ..backends import kernel_for
from ._bias import bias_grad

__all__ = ["lowrank_linear"]


@torch.library.custom_op("cersa::lowrank_fwd", mutates_args=())
def lowrank_fwd(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (T, m), h (T, k)."""
    tensors = [t for t in (x, V, S, U, bias) if t is not None]
    return kernel_for("lowrank_fwd", tensors)(x, V, S, U, bias)


@lowrank_fwd.register_fake
def _(x, V, S, U, bias):
    return x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], V.shape[1]))


@torch.library.custom_op("cersa::lowrank_bwd", mutates_args=())
def lowrank_bwd(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) (shape (0, n) when not need_dx), dS (k, k) in S's dtype."""
    return kernel_for("lowrank_bwd", [dy, h, V, S, U])(dy, h, V, S, U, need_dx)


@lowrank_bwd.register_fake
def _(dy, h, V, S, U, need_dx):
    rows = dy.shape[0] if need_dx else 0
    return dy.new_empty((rows, V.shape[0])), S.new_empty(S.shape)


def _setup_context(ctx, inputs, output):
    x, V, S, U, bias = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(h, V, S, U)  # h is the only activation; V, S, U are the layer's own weights
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dh):
    h, V, S, U = ctx.saved_tensors
    need_dx, _, need_dS, _, need_dbias = ctx.needs_input_grad
    dx = dS = dbias = None
    if need_dx or need_dS:
        dx, dS = torch.ops.cersa.lowrank_bwd(dy, h, V, S, U, need_dx)
    if need_dbias:
        dbias = bias_grad(dy, ctx.bias_dtype)
    return (dx if need_dx else None), None, (dS if need_dS else None), None, dbias


lowrank_fwd.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor] = None, *, layer: str = "lowrank_linear"
) -> Tensor:
    """`y = x V Sᵀ Uᵀ + bias`: x (..., n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (..., m).

    U and V are frozen (no gradient flows to them); gradients flow to x, S and bias. Only h = x V
    (T×k) is saved for backward. `layer` names the caller in error messages.
    """
    check_tensors(layer, x=x, V=V, S=S, U=U, bias=bias)
    if V.dim() != 2 or U.dim() != 2:
        raise ValueError(f"{layer}: U and V must be 2-D, got U {tuple(U.shape)} and V {tuple(V.shape)}")
    n, k = V.shape
    m = U.shape[0]
    check_features(x, n, layer)
    check_shape("U", U, (m, k), layer)
    check_shape("S", S, (k, k), layer)
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    for name, t in (("x", x), ("S", S)):
        check_floating(name, t, layer)
    check_same_dtype({"x": x, "V": V, "U": U, "bias": bias}, layer)
    check_same_device({"x": x, "V": V, "S": S, "U": U, "bias": bias}, layer)
    if torch.is_grad_enabled() and (U.requires_grad or V.requires_grad):
        raise ValueError(f"{layer}: U and V are frozen and get no gradient, but requires_grad is set on them")
    lead = x.shape[:-1]
    y, _ = torch.ops.cersa.lowrank_fwd(x.reshape(-1, n), V, S, U, bias)
    return y.reshape(*lead, m)
