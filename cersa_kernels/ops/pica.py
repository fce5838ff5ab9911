"""The PiCa op (docs/methods.md §2): `y = x W0ᵀ + b + (x Pᵀ) Mᵀ`, W0 and P frozen, M trainable.

- `cersa::pica_fwd(x, W, bias, P, M) -> (y, h)`, h = x Pᵀ (T×r), the only activation saved;
- `cersa::pica_bwd(dy, h, W, P, M, need_dx) -> (dx, dM)`.
On a CERSA base the branch reuses CERSA's h = x V instead: `ops/pica_lowrank.py`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._checks import (
    check_features, check_floating, check_frozen, check_same_device, check_same_dtype, check_shape, check_tensors,
)
from ._define import define_op_pair, flatten_tokens

__all__ = ["pica_linear"]

PICA = define_op_pair(
    "pica",
    inputs="Tensor x, Tensor W, Tensor? bias, Tensor P, Tensor M",
    outputs=("y", "h"),
    backward_uses=("h", "W", "P", "M"),  # h is the only activation; W, P, M are weights
    gradients=("x", "M"),
    fake_forward=lambda x, W, bias, P, M: (x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], P.shape[0]))),
    fake_backward=lambda dy, h, W, P, M, need_dx: (
        dy.new_empty((dy.shape[0] if need_dx else 0, W.shape[1])), M.new_empty(M.shape)
    ),
    quantizable=("W",),
)


def pica_linear(
    x: Tensor, W: Tensor, P: Tensor, M: Tensor, bias: Optional[Tensor] = None, *, layer: str = "pica_linear"
) -> Tensor:
    """`y = x Wᵀ + bias + (x Pᵀ) Mᵀ`: x (..., n), W (m, n), P (r, n), M (m, r) -> y (..., m).

    W and P are frozen, and W may be a `quant.QuantizedTensor`; gradients flow to x, M and bias. Only h = x Pᵀ (T×r) is saved. M may be
    kept in a wider dtype than x (fp32 master); dM comes back in M's dtype.
    """
    check_tensors(layer, PICA.quantizable, x=x, W=W, P=P, M=M, bias=bias)
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
    check_frozen(layer, W=W, P=P)
    x2, lead = flatten_tokens(x)
    y, _ = PICA(x2, W, bias, P, M, layer=layer)
    return y.reshape(*lead, m)
