"""The CERSA low-rank op: `y = (x V) Sᵀ Uᵀ + b` with U, V frozen and S trainable (docs/methods.md §1).

- `cersa::lowrank_fwd(x, V, S, U, bias) -> (y, h)`, h = x V (T×k), the only activation saved;
- `cersa::lowrank_bwd(dy, h, V, S, U, need_dx) -> (dx, dS)`, with g = dy U computed once.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._checks import (
    check_features, check_floating, check_frozen, check_same_device, check_same_dtype, check_shape, check_tensors,
)
from ._define import define_op_pair, flatten_tokens

__all__ = ["lowrank_linear"]

LOWRANK = define_op_pair(
    "lowrank",
    inputs="Tensor x, Tensor V, Tensor S, Tensor U, Tensor? bias",
    outputs=("y", "h"),
    backward_uses=("h", "V", "S", "U"),  # h is the activation; V, S, U are the layer's own weights
    gradients=("x", "S"),
    fake_forward=lambda x, V, S, U, bias: (x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], V.shape[1]))),
    fake_backward=lambda dy, h, V, S, U, need_dx: (
        dy.new_empty((dy.shape[0] if need_dx else 0, V.shape[0])), S.new_empty(S.shape)
    ),
    quantizable=("V", "U"),
)


def lowrank_linear(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor] = None, *, layer: str = "lowrank_linear"
) -> Tensor:
    """`y = x V Sᵀ Uᵀ + bias`: x (..., n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (..., m).

    U and V are frozen (no gradient flows to them) and may be `quant.QuantizedTensor`s (e.g. `Vt_q.T`
    for a Vᵀ stored quantized); gradients flow to x, S and bias. Only h = x V
    (T×k) is saved for backward. S may be kept in a wider dtype than x (an fp32 master copy): it is
    cast for the matmuls and dS comes back in S's dtype. `layer` names the caller in errors.
    """
    check_tensors(layer, LOWRANK.quantizable, x=x, V=V, S=S, U=U, bias=bias)
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
    check_frozen(layer, U=U, V=V)
    x2, lead = flatten_tokens(x)
    y, _ = LOWRANK(x2, V, S, U, bias, layer=layer)
    return y.reshape(*lead, m)
