"""The LoRA op: `y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ` with W0 frozen, A and B trainable (METHODS.md §5).

Custom ops (each runs on the backend `cersa_kernels.backends` selects for the call):
- `cersa::lora_fwd(x, W, bias, A, B, scale, dropout_p, seed) -> (y, xa)`, xa = drop(x) Aᵀ.
- `cersa::lora_bwd(dy, x, xa, W, A, B, scale, dropout_p, seed, need_dx) -> (dx, dA, dB)`.
Saved for backward: x and xa only (plus the 8-byte seed when dropout is on). The dropout mask is
a counter-based hash of (seed, element index) that both backends compute, so the backward
regenerates it rather than saving it (`cersa_kernels.reference.lora`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._checks import (
    check_features, check_floating, check_same_device, check_same_dtype, check_seed, check_shape, check_tensors,
)
from ..backends import kernel_for
from ._bias import bias_grad

__all__ = ["lora_linear"]


@torch.library.custom_op("cersa::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scale: float, dropout_p: float, seed: Tensor
) -> tuple[Tensor, Tensor]:
    """x (T, n), W (m, n), bias (m,), A (r, n), B (m, r), seed () int64 -> y (T, m), xa (T, r)."""
    tensors = [t for t in (x, W, bias, A, B) if t is not None]
    return kernel_for("lora_fwd", tensors)(x, W, bias, A, B, scale, dropout_p, seed)


@lora_fwd.register_fake
def _(x, W, bias, A, B, scale, dropout_p, seed):
    return x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


@torch.library.custom_op("cersa::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor, x: Tensor, xa: Tensor, W: Tensor, A: Tensor, B: Tensor, scale: float, dropout_p: float,
    seed: Tensor, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m) -> dx (T, n) ((0, n) unless need_dx), dA (r, n), dB (m, r)."""
    return kernel_for("lora_bwd", [dy, x, xa, W, A, B])(dy, x, xa, W, A, B, scale, dropout_p, seed, need_dx)


@lora_bwd.register_fake
def _(dy, x, xa, W, A, B, scale, dropout_p, seed, need_dx):
    rows = dy.shape[0] if need_dx else 0
    return dy.new_empty((rows, W.shape[1])), A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, W, bias, A, B, scale, dropout_p, seed = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype
    # x and xa are the activations; W, A, B are the layer's own weights. The seed is kept only
    # when there is a mask to regenerate.
    ctx.has_seed = dropout_p > 0
    ctx.save_for_backward(x, xa, W, A, B, *([seed] if ctx.has_seed else []))


def _backward(ctx, dy, _dxa):
    x, xa, W, A, B, *rest = ctx.saved_tensors
    seed = rest[0] if ctx.has_seed else torch.zeros((), dtype=torch.int64)
    need_dx, _, need_dbias, need_dA, need_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = dbias = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = torch.ops.cersa.lora_bwd(dy, x, xa, W, A, B, ctx.scale, ctx.dropout_p, seed, need_dx)
    if need_dbias:
        dbias = bias_grad(dy, ctx.bias_dtype)
    return (
        dx if need_dx else None, None, dbias, dA if need_dA else None, dB if need_dB else None, None, None, None
    )


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: Tensor,
    W: Tensor,
    A: Tensor,
    B: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Union[int, Tensor, None] = None,
    *,
    layer: str = "lora_linear",
) -> Tensor:
    """`y = x Wᵀ + bias + scale·(drop(x) Aᵀ) Bᵀ`: x (..., n), W (m, n), A (r, n), B (m, r) -> (..., m).

    W is frozen; gradients flow to x, A, B and bias. Only x and x·Aᵀ (T×r) are saved. With
    dropout_p > 0 a `seed` (int or int64 scalar tensor, best kept on the CPU) is required: the same
    seed gives the same mask, and the backward regenerates it. `layer` names the caller in errors.
    """
    check_tensors(layer, x=x, W=W, A=A, B=B, bias=bias)
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"{layer}: W, A and B must be 2-D, got W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    m, n = W.shape
    r = A.shape[0]
    check_features(x, n, layer)
    check_shape("A", A, (r, n), layer)
    check_shape("B", B, (m, r), layer)
    if bias is not None:
        check_shape("bias", bias, (m,), layer)
    check_floating("x", x, layer)
    check_same_dtype({"x": x, "W": W, "A": A, "B": B, "bias": bias}, layer)
    check_same_device({"x": x, "W": W, "A": A, "B": B, "bias": bias}, layer)
    if torch.is_grad_enabled() and W.requires_grad:
        raise ValueError(f"{layer}: the base weight W is frozen and gets no gradient, but requires_grad is set on it")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{layer}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        raise ValueError(f"{layer}: dropout_p={dropout_p} needs an explicit seed (int or int64 scalar tensor)")
    # A CPU scalar whatever x's device: the kernels read it as a Python int (no GPU sync).
    seed = torch.zeros((), dtype=torch.int64) if seed is None else check_seed(seed, layer)
    lead = x.shape[:-1]
    y, _ = torch.ops.cersa.lora_fwd(x.reshape(-1, n), W, bias, A, B, float(scale), dropout_p, seed)
    return y.reshape(*lead, m)
