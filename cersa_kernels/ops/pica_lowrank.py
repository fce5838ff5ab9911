"""PiCa over a CERSA base (docs/methods.md §2): `y = x V Sᵀ Uᵀ + (x V[:, :r]) Mᵀ + b`.

With W0 ≈ U S Vᵀ and P = V[:, :r]ᵀ (r ≤ k) the PiCa projection x Pᵀ is the first r columns of
CERSA's h = x V, so the branch costs no extra pass over x:
- `cersa::pica_lowrank_fwd(x, V, S, U, M, bias) -> (y, h)`, h = x V (T×k), the only activation saved;
- `cersa::pica_lowrank_bwd(dy, h, V, S, U, M, need_dx) -> (dx, dS, dM)`.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._checks import (
    check_features, check_floating, check_frozen, check_same_device, check_same_dtype, check_shape, check_tensors,
)
from ._define import define_op_pair, flatten_tokens

__all__ = ["pica_lowrank_linear"]

PICA_LOWRANK = define_op_pair(
    "pica_lowrank",
    inputs="Tensor x, Tensor V, Tensor S, Tensor U, Tensor M, Tensor? bias",
    outputs=("y", "h"),
    backward_uses=("h", "V", "S", "U", "M"),  # h is the only activation
    gradients=("x", "S", "M"),
    fake_forward=lambda x, V, S, U, M, bias: (
        x.new_empty((x.shape[0], U.shape[0])), x.new_empty((x.shape[0], V.shape[1]))
    ),
    fake_backward=lambda dy, h, V, S, U, M, need_dx: (
        dy.new_empty((dy.shape[0] if need_dx else 0, V.shape[0])), S.new_empty(S.shape), M.new_empty(M.shape)
    ),
    quantizable=("V", "U"),
)


def pica_lowrank_linear(
    x: Tensor, V: Tensor, S: Tensor, U: Tensor, M: Tensor, bias: Optional[Tensor] = None, *,
    layer: str = "pica_lowrank_linear",
) -> Tensor:
    """`y = x V Sᵀ Uᵀ + (x V[:, :r]) Mᵀ + bias`: CERSA with a PiCa branch that reuses h = x V.

    x (..., n), V (n, k), S (k, k), U (m, k), M (m, r) with r ≤ k -> y (..., m). U, V frozen (either
    may be a `quant.QuantizedTensor`);
    gradients flow to x, S, M and bias. Only h = x V (T×k) is saved.
    """
    check_tensors(layer, PICA_LOWRANK.quantizable, x=x, V=V, S=S, U=U, M=M, bias=bias)
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
    check_frozen(layer, U=U, V=V)
    x2, lead = flatten_tokens(x)
    y, _ = PICA_LOWRANK(x2, V, S, U, M, bias, layer=layer)
    return y.reshape(*lead, m)
