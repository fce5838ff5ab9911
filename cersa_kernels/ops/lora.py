"""The LoRA op: `y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ` with W0 frozen, A and B trainable (docs/methods.md §5).

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
    check_features, check_floating, check_frozen, check_same_device, check_same_dtype, check_seed, check_shape,
    check_tensors,
)
from ._define import define_op_pair, flatten_tokens

__all__ = ["lora_linear"]


LORA = define_op_pair(
    "lora",
    inputs="Tensor x, Tensor W, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p, Tensor seed",
    outputs=("y", "xa"),
    # x and xa are the activations; W, A, B are the layer's own weights
    backward_uses=("x", "xa", "W", "A", "B", "scale", "dropout_p", "seed"),
    gradients=("x", "A", "B"),
    fake_forward=lambda x, W, bias, A, B, scale, dropout_p, seed: (
        x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], A.shape[0]))
    ),
    fake_backward=lambda dy, x, xa, W, A, B, scale, dropout_p, seed, need_dx: (
        dy.new_empty((dy.shape[0] if need_dx else 0, W.shape[1])), A.new_empty(A.shape), B.new_empty(B.shape)
    ),
    # the seed is kept only when there is a mask to regenerate
    save_when={"seed": lambda constants: constants["dropout_p"] > 0},
    quantizable=("W",),
)


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

    W is frozen and may be a `quant.QuantizedTensor`; gradients flow to x, A, B and bias. Only x and x·Aᵀ (T×r) are saved. With
    dropout_p > 0 a `seed` (int or int64 scalar tensor, best kept on the CPU) is required: the same
    seed gives the same mask, and the backward regenerates it. `layer` names the caller in errors.
    """
    check_tensors(layer, LORA.quantizable, x=x, W=W, A=A, B=B, bias=bias)
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
    check_frozen(layer, W=W)
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{layer}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        raise ValueError(f"{layer}: dropout_p={dropout_p} needs an explicit seed (int or int64 scalar tensor)")
    # A CPU scalar whatever x's device: the kernels read it as a Python int (no GPU sync).
    seed = torch.zeros((), dtype=torch.int64) if seed is None else check_seed(seed, layer)
    x2, lead = flatten_tokens(x)
    y, _ = LORA(x2, W, bias, A, B, float(scale), dropout_p, seed, layer=layer)
    return y.reshape(*lead, m)
