"""PicaLinear and `apply_pica`: PiCa (METHODS.md §2), a frozen base plus a column-space update M·P.

P = V_rᵀ (r×n), the top-r RIGHT singular vectors of the nn.Linear weight, frozen; M (m×r) trainable,
zero at step 0, shared by every layer of one role (the module-name suffix, e.g. every `q_proj`):
autograd sums the gradients of all the layers into the one M.
On a CersaLinear base with r ≤ k, P = V_k[:, :r]ᵀ is CERSA's own basis and the branch reuses
h = x V_k inside one fused op (`cersa::pica_lowrank`).
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..decompose import truncated_svd
from ..model import replace_module
from ..ops import pica_linear, pica_lowrank_linear
from ._autocast import autocast_cast
from ._merge import merged_linear
from .cersa import CersaLinear

__all__ = ["PicaLinear", "apply_pica", "pica_layers"]


class PicaLinear(nn.Module):
    """x (..., in_features) -> y (..., out_features): y = base(x) + (x Pᵀ) Mᵀ.

    Dense base: frozen `weight` (m, n), `bias` (m,), buffer `P` (r, n). CERSA base: submodule `base`
    (its S still trains) and no P buffer (P = base.V[:, :r]ᵀ). `M` (m, r) is a Parameter that may be
    shared with other PicaLinear layers (pass the same one).
    """

    def __init__(self, base: Union[nn.Linear, CersaLinear], rank: int, M: Optional[nn.Parameter] = None,
                 layer_name: Optional[str] = None) -> None:
        super().__init__()
        self.layer_name = layer_name
        name = layer_name or type(base).__name__
        if not isinstance(base, (nn.Linear, CersaLinear)):  # before reading base.in_features
            raise TypeError(f"PicaLinear ({name}): base must be an nn.Linear or a CersaLinear, got {type(base).__name__}")
        rank = check_int("rank", rank, f"PicaLinear ({name})")
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        if isinstance(base, CersaLinear):
            if not 1 <= rank <= base.rank:
                raise ValueError(
                    f"PicaLinear ({name}): rank must be in [1, CERSA rank k = {base.rank}] to reuse h = x·V, got {rank}"
                )
            self.base = base
        else:
            w = base.weight.detach()
            svd = truncated_svd(w, rank=rank, where=f"PicaLinear ({name})")
            self.weight = nn.Parameter(w.clone(), requires_grad=False)
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
            self.register_buffer("P", svd.V.T.contiguous())
            self.base = None
        ref = base.U if isinstance(base, CersaLinear) else base.weight
        if M is None:
            M = nn.Parameter(torch.zeros(self.out_features, rank, device=ref.device, dtype=ref.dtype))
        if tuple(M.shape) != (self.out_features, rank):
            raise ValueError(
                f"PicaLinear ({name}): M must have shape (out_features, rank) = {(self.out_features, rank)}, "
                f"got {tuple(M.shape)}"
            )
        self.M = M

    def projection(self) -> Tensor:
        """P (r, n)."""
        return self.P if self.base is None else self.base.V[:, : self.rank].T

    def _name(self) -> str:
        return self.layer_name or f"PicaLinear(in_features={self.in_features}, out_features={self.out_features})"

    def forward(self, x: Tensor) -> Tensor:
        if self.base is None:
            x, weight, P, M, bias = autocast_cast(x, self.weight, self.P, self.M, self.bias)
            return pica_linear(x, weight, P, M, bias, layer=self._name())
        b = self.base
        x, V, U, M, bias = autocast_cast(x, b.V, b.U, self.M, b.bias)  # S keeps its dtype, as in CersaLinear
        return pica_lowrank_linear(x, V, b.core(), U, M, bias, layer=self._name())

    def delta_weight(self) -> Tensor:
        """ΔW = M P (out, in): the PiCa update over the base."""
        return self.M.to(self.projection().dtype) @ self.projection()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge into a plain nn.Linear: weight W_base + M P (W_base = W0, or U S Vᵀ of a CERSA base)."""
        if self.base is None:
            base_weight, bias, dtype = self.weight.float(), self.bias, self.weight.dtype
        else:
            base_weight, bias, dtype = self.base.dense_weight(), self.base.bias, self.base.U.dtype
        return merged_linear(base_weight + self.delta_weight().detach().float(), bias, dtype)

    # Tensors the original model already holds (dense base): `save` writes them only if trained.
    BASE_KEYS = ("weight", "bias")

    def config(self) -> dict:
        """What `from_config` needs; `tied` makes `load` share one M across the layers of a role."""
        config = dict(rank=self.rank, role=_role(self.layer_name or ""), tied={"M": f"pica:{_role(self.layer_name or '')}"})
        if self.base is not None:
            config["cersa"] = self.base.config()
        return config

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "PicaLinear":
        """The layer around the original Linear `base` (or an empty CERSA base); P, M and the CERSA
        factors come from a state_dict (P is saved, not recomputed: SVD signs are arbitrary)."""
        if "cersa" in config:
            base = CersaLinear.from_config(config["cersa"], device=device)
        return cls(base, config["rank"])

    def extra_repr(self) -> str:
        base = "cersa" if self.base is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, base={base}"


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def apply_pica(model: nn.Module, rank: int, target_modules: Optional[Iterable[str]] = None) -> dict[str, nn.Parameter]:
    """Replace every nn.Linear / CersaLinear of `model` whose role (module-name suffix) is in
    `target_modules` (all of them when None) by a PicaLinear, in place. One zero-initialised
    M (out_features × rank) per role is shared by all the layers of that role.

    Returns {role: M}. Raises ValueError when a role's layers differ in out_features (one M cannot
    serve them; the message names the role and every layer's shape), when rank exceeds a layer's
    min(out, in) (or its CERSA rank k), or when nothing matches.
    """
    targets = None if target_modules is None else set(target_modules)
    found = {
        name: module for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, CersaLinear)) and name and (targets is None or _role(name) in targets)
    }
    if not found:
        raise ValueError(f"apply_pica: no nn.Linear or CersaLinear layer matches target_modules={sorted(targets or [])}")
    layers = pica_layers(found, rank)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return {_role(name): layer.M for name, layer in layers.items()}


def pica_layers(bases: dict[str, nn.Module], rank: int) -> dict[str, PicaLinear]:
    """{name: PicaLinear} around each base layer (nn.Linear or CersaLinear), with one zero M per
    role shared by all the layers of that role. Raises ValueError when a role's layers differ in
    out_features (the message names the role and every layer's shape)."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in bases.items():
        groups.setdefault(_role(name), []).append((name, module))
    out: dict[str, PicaLinear] = {}
    for role, layers in groups.items():
        outs = {m.out_features for _, m in layers}
        if len(outs) > 1:
            shapes = ", ".join(f"{n}: (out={m.out_features}, in={m.in_features})" for n, m in layers)
            raise ValueError(
                f"apply_pica: role '{role}' shares one M (out_features × rank) but its layers differ in "
                f"out_features: {shapes}"
            )
        first = layers[0][1]
        ref = first.U if isinstance(first, CersaLinear) else first.weight
        M = nn.Parameter(torch.zeros(outs.pop(), rank, device=ref.device, dtype=ref.dtype))
        for name, module in layers:
            out[name] = PicaLinear(module, rank, M, layer_name=name)
    return out
