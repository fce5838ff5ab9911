"""The one adapter interface every layer implements, so that whole-model code (apply, save/load,
merge, PARA, PEFT export) works through it alone, with no per-method case.

A method is one subclass `class FooLinear(AdapterLayer, method="foo")`: defining it registers
"foo" for `cersa_kernels.apply(model, "foo")` and the class name for `load`. What a subclass states
(see each hook's docstring): `from_linear`, `config` / `from_config`, `forward`, `delta_weight`,
`lowrank_update` (PEFT export and, by default, PARA), `to_linear`. What it inherits: the whole-model
hook `adapt`, the base-type rule `unsupported_reason`, the frozen-base set-up, the layer's name in
errors, PARA's defaults and the weight-byte count. docs/architecture.md walks through adding one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from ._merge import merged_linear

__all__ = ["AdapterLayer", "LowRankUpdate", "adapter_classes", "method_classes"]


@dataclass(frozen=True)
class LowRankUpdate:
    """A low-rank weight update ΔW = scale·B·A (out, in): A (r, in), B (out, r). What a layer hands
    to PEFT export and PARA, and what PARA hands back (rank-k truncated)."""

    A: Tensor
    B: Tensor
    scale: float

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A)


_CLASSES: dict[str, type["AdapterLayer"]] = {}  # class name -> class (what `load` rebuilds)
_METHODS: dict[str, type["AdapterLayer"]] = {}  # method name -> the class whose `adapt` serves it


def adapter_classes() -> dict[str, type["AdapterLayer"]]:
    """{class name: class} of every AdapterLayer subclass defined so far."""
    return dict(_CLASSES)


def method_classes() -> dict[str, type["AdapterLayer"]]:
    """{method name: class} for `apply(model, method)`."""
    return dict(_METHODS)


class AdapterLayer(nn.Module):
    """Base class of the adapter layers: x (..., in_features) -> y (..., out_features).

    Attributes every layer has: in_features, out_features, rank, layer_name (its path in the model,
    set by `apply`/`load`, used in error messages), base_type (the class name of the layer it
    replaced: "Linear", or "Conv1D" for GPT-2, which PEFT export needs).
    """

    method: ClassVar[str] = ""
    # State-dict keys of tensors the original model already holds (the frozen base weight and
    # bias): `save` writes them only if they were trained.
    BASE_KEYS: ClassVar[tuple[str, ...]] = ()

    in_features: int
    out_features: int
    rank: int

    def __init_subclass__(cls, method: Optional[str] = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in _CLASSES and _CLASSES[cls.__name__].__module__ != cls.__module__:
            raise TypeError(f"AdapterLayer: two adapter classes are named {cls.__name__!r}; `load` needs unique names")
        _CLASSES[cls.__name__] = cls
        if method is not None:
            if method in _METHODS and _METHODS[method].__qualname__ != cls.__qualname__:
                raise TypeError(f"AdapterLayer: method {method!r} is already served by {_METHODS[method].__name__}")
            cls.method = method
            _METHODS[method] = cls

    def __init__(self) -> None:
        super().__init__()
        self.layer_name: Optional[str] = None
        self.base_type = "Linear"

    # --- naming and the frozen base --------------------------------------------------------------

    def _name(self) -> str:
        """How errors name this layer: its path in the model, else its class and shape."""
        return self.layer_name or f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    def _init_frozen_base(self, bias: bool, device=None, dtype=None) -> None:
        """The frozen base: `weight` (out, in) and `bias` (out,) as Parameters with
        requires_grad=False, so the state dict has nn.Linear's keys (what BASE_KEYS names)."""
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory), requires_grad=False) if bias else None

    @torch.no_grad()
    def _copy_frozen_base(self, linear: nn.Linear, train_bias: bool = False) -> None:
        """Copy `linear`'s weight and bias into the frozen base; the bias trains only if asked."""
        self.weight.copy_(linear.weight)
        if linear.bias is not None:
            self.bias.copy_(linear.bias)
            self.bias.requires_grad_(train_bias)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "AdapterLayer":
        """The adapter layer replacing `linear` (its frozen weights copied or decomposed)."""
        raise NotImplementedError(f"{cls.__name__} must define from_linear")

    @classmethod
    def adapt(cls, bases: dict[str, nn.Module], **options) -> dict[str, "AdapterLayer"]:
        """Whole-model hook of `apply`: {name: new layer} for the selected layers {name: base}
        (nn.Linear, or an adapter layer `unsupported_reason` accepted). Per layer by default;
        a method whose layers depend on each other (CERSA's global allocation, PiCa's shared M)
        overrides it."""
        return {name: cls.from_linear(base, **options) for name, base in bases.items()}

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        """Why this method cannot adapt `module` (None if it can): by default an nn.Linear only,
        not a layer that is already adapted."""
        if isinstance(module, AdapterLayer):
            return (
                f"already a {type(module).__name__}; {cls.method!r} adapts an nn.Linear only "
                "(only 'pica' adapts a CersaLinear)"
            )
        if not isinstance(module, nn.Linear):
            return f"a {type(module).__name__}, not an nn.Linear"
        return None

    def config(self) -> dict:
        """JSON-able options that, with the original base layer, rebuild an empty layer of this shape."""
        raise NotImplementedError(f"{type(self).__name__} must define config")

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "AdapterLayer":
        """An empty layer from `config()` around the original Linear `base`; weights come from a
        state dict afterwards."""
        raise NotImplementedError(f"{cls.__name__} must define from_config")

    # --- what the update is ----------------------------------------------------------------------

    def delta_weight(self) -> Tensor:
        """ΔW (out, in): what this layer adds to the weight it applies (over its own base)."""
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight")

    def lowrank_update(self) -> Optional[LowRankUpdate]:
        """The update over the ORIGINAL dense weight W0 as scale·B·A (float32), for PEFT export;
        None when it is not low-rank (SNELL's is sparse)."""
        return None

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge into a plain nn.Linear with weight W0 + ΔW (summed in float32). This default is for
        layers that keep the dense W0 as `weight`; CERSA-based layers override it."""
        update = self.lowrank_update()
        delta = self.delta_weight() if update is None else update.delta_weight()
        return merged_linear(self.weight.float() + delta.float(), self.bias, self.weight.dtype)

    def base_weight_bytes(self) -> int:
        """Bytes of what stands for the frozen base weight (bias excluded): the dense W0 here,
        CERSA's factors where they replace it."""
        return self.weight.numel() * self.weight.element_size()

    def weight_dtype(self) -> torch.dtype:
        """The dtype of the Linear this layer stands for, which its inputs come in: the frozen W0's
        here, CERSA's factors' where they replace it. `load` refuses an adapter whose layer has
        another dtype than the model's Linear at that place."""
        return self.weight.dtype

    # --- PARA (data-free rank pruning) -------------------------------------------------------------

    def para_update(self) -> Optional[LowRankUpdate]:
        """What PARA compresses: this layer's own trained low-rank update (default: lowrank_update);
        None to leave the layer out."""
        return self.lowrank_update()

    para_label: ClassVar[str] = ""  # appended to the layer's name in PARA's report (PiCa: ".M")

    def para_key(self) -> object:
        """Layers with equal keys hold one shared update (PiCa's M) and are compressed once."""
        return id(self)

    def para_core_shape(self) -> tuple[int, int]:
        """(rows, cols) of the stored tensor PARA's parameter count is taken over: a rank-k update
        costs min(k·(rows + cols), rows·cols)."""
        return self.out_features, self.in_features

    def apply_para_update(self, update: Optional[LowRankUpdate]) -> Optional[nn.Module]:
        """Write PARA's rank-k truncation of `para_update()` back (None: rank 0, the update is
        removed). Returns a module to put in this layer's place, or None if rewritten in place."""
        raise NotImplementedError(f"{type(self).__name__} has a para_update but no apply_para_update")
