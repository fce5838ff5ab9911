"""PiCa (docs/methods.md §2): a frozen base plus a column-space update M·P, one M shared per role.

- `PicaLinear`: a dense base. P = V_rᵀ (r×n), the top-r RIGHT singular vectors of the nn.Linear
  weight, frozen; y = x W0ᵀ + b + (x Pᵀ) Mᵀ on the `pica` op.
- `PicaCersaLinear`: a CersaLinear base (its S still trains). With r ≤ k, P = V_k[:, :r]ᵀ is CERSA's
  own basis, so the branch reuses h = x V_k inside one fused op (`pica_lowrank`).
M (m×r) is zero at step 0 and shared by every layer of one role (the module-name suffix, e.g.
every `q_proj`): autograd sums the gradients of all those layers into the one M.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .. import quant
from .._checks import check_int
from ..decompose import decompose
from ..ops import pica_linear, pica_lowrank_linear
from ._autocast import autocast_cast
from ._merge import merged_linear
from ._quantized import resolve_base_format, weight_dtype_of
from .base import AdapterLayer, LowRankUpdate, built
from .cersa import CersaLinear
from .tree import find_targets, replace_module

__all__ = ["PicaLinear", "PicaCersaLinear", "apply_pica", "pica_layers"]


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class PicaLinear(AdapterLayer, method="pica"):
    """x (..., in_features) -> y (..., out_features): y = x W0ᵀ + b + (x Pᵀ) Mᵀ over a dense base.

    Frozen: `weight` (m, n) (with `base_format` "int8" | "nf4": the buffers `weight_data`,
    `weight_absmax`, docs/quantization.md), `bias` (m,), `P` (r, n) (all Parameters with
    requires_grad=False, so FSDP2 shards them). `M` (m, r) is a Parameter that may be
    shared with other PiCa layers (pass the same one). Given a CersaLinear base, the constructor
    builds a PicaCersaLinear (deprecated spelling: call PicaCersaLinear directly).
    PicaCersaLinear subclasses it: the rank, the shared M, the role and the PARA hooks are here.
    """

    BASE_KEYS = ("weight", "weight_data", "weight_absmax", "bias")  # a quantized W0 is rebuilt from the model

    def __new__(cls, base: nn.Module = None, *args, **kwargs):
        if cls is PicaLinear and type(base) is CersaLinear:
            warnings.warn(
                "PicaLinear(cersa_layer, ...) is deprecated: PiCa over CERSA is PicaCersaLinear", DeprecationWarning,
                stacklevel=2,
            )
            return super().__new__(PicaCersaLinear)  # then PicaCersaLinear.__init__ runs, once
        return super().__new__(cls)

    def __init__(self, base: nn.Linear, rank: int, M: Optional[nn.Parameter] = None,
                 layer_name: Optional[str] = None, base_format: Optional[str] = None,
                 base_group_size: Optional[int] = None) -> None:
        super().__init__()
        name = layer_name or type(base).__name__
        if not isinstance(base, nn.Linear):  # before reading base.in_features
            raise TypeError(f"PicaLinear ({name}): base must be an nn.Linear or a CersaLinear, got {type(base).__name__}")
        label = self._init_branch(base, rank, M, layer_name)
        base_format, base_group_size = resolve_base_format(base, base_format, base_group_size, label)
        self._init_frozen_base(
            base.bias is not None, device="meta", dtype=weight_dtype_of(base), base_format=base_format,
            base_group_size=base_group_size,
        )
        self._copy_frozen_base(base)  # shares a dense W0 (no copy); allocates the rest on its device
        # P from the W0 the layer applies: the dequantized Ŵ0 of a quantized base (one transient copy)
        if base.weight.is_meta:  # built on the meta device (load_converted): P and M come from a file
            check_int("rank", self.rank, label, minimum=1)
            self._set_frozen("P", torch.empty(self.rank, self.in_features, device="meta", dtype=weight_dtype_of(base)))
            self._init_M(M, self.P, label)
            return
        w = quant.dense(self.frozen_weight()).detach()
        svd = decompose(w, rank=self.rank, layer=label)
        self._set_frozen("P", svd.V.T.contiguous())  # a frozen Parameter: FSDP2 shards it
        self._init_M(M, w, label)

    def projection(self) -> Tensor:
        return self.P

    def _orthonormal_projection(self) -> bool:
        return True  # P = V_rᵀ of an SVD

    def forward(self, x: Tensor) -> Tensor:
        x, weight, P, M, bias = autocast_cast(x, self.frozen_weight(), self.P, self.M, self.bias)
        return pica_linear(x, weight, P, M, bias, layer=self._name())

    def lowrank_update(self) -> LowRankUpdate:
        """M·P over the original W0 (which this layer keeps)."""
        return self.para_update()

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "PicaLinear":
        """The layer around the original Linear `base` (P and M come from a state_dict: P is saved,
        not recomputed, since SVD signs are arbitrary); a config with a `cersa` entry (PiCa over
        CERSA, as saved by older versions under this class name) builds a PicaCersaLinear."""
        if "cersa" in config:
            return PicaCersaLinear.from_config(config, base, device)
        return cls(base, config["rank"], base_format=config.get("base_format"), base_group_size=config.get("base_group_size"))

    def extra_repr(self) -> str:
        base = "cersa" if isinstance(self, PicaCersaLinear) else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, base={base}"

    def _init_branch(self, base: nn.Module, rank, M: Optional[nn.Parameter], layer_name: Optional[str]) -> str:
        self.layer_name = layer_name
        label = f"{type(self).__name__} ({layer_name or type(base).__name__})"
        self.rank = check_int("rank", rank, label)
        self.in_features, self.out_features = base.in_features, base.out_features
        return label

    def _init_M(self, M: Optional[nn.Parameter], like, label: str) -> None:
        """M (m, r), zero, on like's device and in its dtype (a tensor or a QuantizedTensor)."""
        if M is None:
            M = nn.Parameter(torch.zeros(self.out_features, self.rank, device=like.device, dtype=like.dtype))
        if tuple(M.shape) != (self.out_features, self.rank):
            raise ValueError(
                f"{label}: M must have shape (out_features, rank) = {(self.out_features, self.rank)}, "
                f"got {tuple(M.shape)}"
            )
        self.M = M

    def delta_weight(self) -> Tensor:
        """ΔW = M P (out, in): the PiCa update over the base."""
        return self.M.to(self.projection().dtype) @ self.projection()

    @classmethod
    def adapt(cls, bases: dict[str, nn.Module], rank: int = 64, base_format: Optional[str] = None,
              base_group_size: Optional[int] = None) -> dict[str, "PicaLinear"]:
        """`apply(model, "pica", rank=r)`: PiCa on every target, one zero M per role shared by its
        layers; a CersaLinear target becomes a PicaCersaLinear (the branch reuses h = x·V).
        `base_format` stores each dense W0 quantized (not for CERSA targets: quantize their factors
        with apply(model, "cersa", factor_format=...))."""
        return pica_layers(bases, rank, base_format, base_group_size)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        if isinstance(module, PicaLinear):
            return f"already a {type(module).__name__}: PiCa over PiCa is not supported"
        if type(module) is CersaLinear:  # PiCa over CERSA
            return None
        return super().unsupported_reason(module)

    def config(self) -> dict:
        """What `from_config` needs; `tied` makes `load` share one M across the layers of a role."""
        role = _role(self.layer_name or "")
        config = dict(rank=self.rank, role=role, tied={"M": f"pica:{role}"})
        if getattr(self, "base_format", None) is not None:
            config.update(base_format=self.base_format, base_group_size=self.base_group_size)
        return config

    # PARA compresses M once per role: M·P_l has M's spectrum for every layer l (P_l orthonormal rows)
    def para_update(self) -> LowRankUpdate:
        work = torch.float64 if self.M.dtype == torch.float64 else torch.float32
        return LowRankUpdate(A=self.projection().detach().to(work), B=self.M.detach().to(work), scale=1.0)

    para_label = ".M"

    def para_key(self) -> object:
        return id(self.M)

    def para_core_shape(self) -> tuple[int, int]:
        return tuple(self.M.shape)

    @torch.no_grad()
    def apply_para_update(self, update: Optional[LowRankUpdate]) -> None:
        """M = ΔW' Pᵀ for PARA's truncated ΔW' (it lies in P's row space; P has orthonormal rows, or,
        over quantized CERSA factors, M = ΔW' Pᵀ (P Pᵀ)⁻¹); one write serves the role."""
        if update is None:
            self.M.zero_()
        else:
            P = self.projection().to(update.A.dtype)
            right = update.A @ P.T  # (k', r)
            if not self._orthonormal_projection():
                right = torch.linalg.solve((P @ P.T).double(), right.double().T).T.to(right.dtype)
            self.M.copy_(update.scale * update.B @ right)
        return None


class PicaCersaLinear(PicaLinear):
    """PiCa over CERSA: y = x V Sᵀ Uᵀ + (x V[:, :r]) Mᵀ + b, x (..., in_features) -> (..., out_features).

    Submodule `base`: the CersaLinear (U, V frozen, S trains). `M` (m, r ≤ k) as in PicaLinear.
    """

    BASE_KEYS = ()  # CERSA's factors replace W0: everything is saved

    def __init__(self, base: CersaLinear, rank: int, M: Optional[nn.Parameter] = None,
                 layer_name: Optional[str] = None) -> None:
        AdapterLayer.__init__(self)  # not PicaLinear's: there is no dense base to decompose
        if type(base) is not CersaLinear:
            raise TypeError(f"PicaCersaLinear ({layer_name or type(base).__name__}): base must be a CersaLinear, "
                            f"got {type(base).__name__}")
        label = self._init_branch(base, rank, M, layer_name)
        if not 1 <= self.rank <= base.rank:
            raise ValueError(f"{label}: rank must be in [1, CERSA rank k = {base.rank}] to reuse h = x·V, got {self.rank}")
        self.base = base
        self._init_M(M, base.factors()[0], label)

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias

    def projection(self) -> Tensor:
        """V[:, :r]ᵀ (r, n): a view of CERSA's V, or of the dequantized V̂ (a transient copy)."""
        return self.base.dense_factors()[1][:, : self.rank].T

    def _orthonormal_projection(self) -> bool:
        return self.base.factor_format is None

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        U, V = b.factors()
        x, V, U, M, bias = autocast_cast(x, V, U, self.M, b.bias)  # S keeps its dtype, as in CersaLinear
        return pica_lowrank_linear(x, V, b.core(), U, M, bias, layer=self._name())

    def lowrank_update(self) -> LowRankUpdate:
        """(U ΔS + [M | 0]) Vᵀ over the ORIGINAL W0: CERSA's update and the PiCa branch together."""
        update = self.base.lowrank_update()
        B = update.B.clone()
        B[:, : self.rank] += self.M.detach().to(B.dtype)
        return LowRankUpdate(A=update.A, B=B, scale=1.0, noise=update.noise)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge into a plain nn.Linear: weight U S Vᵀ + M P (float32)."""
        return merged_linear(self.base.dense_weight() + self.delta_weight().float(), self.base.bias, self.base.base_dtype)

    def base_weight_bytes(self) -> int:
        return self.base.weight_bytes()

    def weight_dtype(self) -> torch.dtype:
        return self.base.weight_dtype()

    def config(self) -> dict:
        return dict(super().config(), cersa=self.base.config())

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "PicaCersaLinear":
        """An empty CERSA base from the saved config and M; every tensor comes from a state dict."""
        return cls(CersaLinear.from_config(config["cersa"], device=device), config["rank"])


def pica_layers(bases: dict[str, nn.Module], rank: int, base_format: Optional[str] = None,
                base_group_size: Optional[int] = None) -> dict[str, PicaLinear]:
    """{name: PiCa layer} around each base layer (nn.Linear, bitsandbytes Linear4bit or CersaLinear),
    with one zero M per role shared by all the layers of that role; `base_format` quantizes each
    dense W0. Raises ValueError when a role's layers differ in out_features (the message names the
    role and every layer's shape), or for base_format over a CersaLinear."""
    groups: dict[str, list[str]] = {}  # names only: a base is looked up when its layer is built
    for name in bases:
        groups.setdefault(_role(name), []).append(name)
    out: dict[str, PicaLinear] = {}
    for role, layers in groups.items():
        outs = {bases[n].out_features for n in layers}
        if len(outs) > 1:
            shapes = ", ".join(f"{n}: (out={bases[n].out_features}, in={bases[n].in_features})" for n in layers)
            raise ValueError(
                f"apply_pica: role '{role}' shares one M (out_features × rank) but its layers differ in "
                f"out_features: {shapes}"
            )
        first = bases[layers[0]]
        if isinstance(first, CersaLinear):
            device, dtype = first.sigma.device, first.base_dtype
        else:
            device, dtype = first.weight.device, weight_dtype_of(first)
        del first
        M = nn.Parameter(torch.zeros(outs.pop(), rank, device=device, dtype=dtype))
        for name in layers:
            module = bases[name]
            if type(module) is CersaLinear:
                if base_format is not None:
                    raise ValueError(
                        f"apply(method='pica'): layer {name!r} is a CersaLinear: base_format={base_format!r} does not "
                        "apply to it (its W0 is CERSA's factors: quantize them with apply(model, 'cersa', "
                        "factor_format=...))"
                    )
                out[name] = PicaCersaLinear(module, rank, M, layer_name=name)
            else:
                out[name] = PicaLinear(module, rank, M, layer_name=name, base_format=base_format,
                                       base_group_size=base_group_size)
            del module
            built(name, out[name])  # apply swaps it in now: a quantized base's dense W0 is freed here
    return out


def apply_pica(model: nn.Module, rank: int, target_modules: Optional[Iterable[str]] = None) -> dict[str, nn.Parameter]:
    """Deprecated: use `cersa_kernels.apply(model, "pica", target_modules=[...roles], rank=r)`, which
    matches roles the same way (module-name suffixes) and also freezes the base and reports.

    Replaces every nn.Linear / CersaLinear whose role is in `target_modules` (all when None) by a
    PiCa layer in place, one zero M per role. Returns {role: M}.
    """
    warnings.warn("apply_pica is deprecated: use cersa_kernels.apply(model, 'pica', ...)", DeprecationWarning, stacklevel=2)
    try:
        names = find_targets(model, "all-linear" if target_modules is None else list(target_modules))
    except ValueError:
        names = []
    found = {name: model.get_submodule(name) for name in names}
    found = {n: m for n, m in found.items() if isinstance(m, nn.Linear) or type(m) is CersaLinear}
    if not found:
        raise ValueError(f"apply_pica: no nn.Linear or CersaLinear layer matches target_modules={sorted(target_modules or [])}")
    layers = pica_layers(found, rank)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    return {_role(name): layer.M for name, layer in layers.items()}
