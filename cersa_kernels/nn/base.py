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

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .. import quant
from ..quant import QuantizedTensor
from ._merge import merged_linear
from ._quantized import (
    DEFAULT_GROUP_SIZE, QuantSpec, check_quant_options, frozen_weight_of, is_linear4bit, linear4bit_problem,
)

__all__ = ["AdapterLayer", "LowRankUpdate", "adapter_classes", "method_classes", "placing_as_built", "built"]

# Where a whole-model build hands each new layer the moment it exists (`placing_as_built`): `apply`
# puts it into the model at once and drops the layer it replaces, so the dense weights of a CERSA
# conversion (or of a quantized base) are freed layer by layer, not when the last layer is done.
_PLACE: ContextVar[Optional[Callable[[str, "AdapterLayer"], None]]] = ContextVar("cersa_kernels_place", default=None)


@contextmanager
def placing_as_built(place: Callable[[str, "AdapterLayer"], None]) -> Iterator[None]:
    """Inside the block, `built(name, layer)` (called by every `adapt` as each layer is made) calls
    `place(name, layer)`."""
    token = _PLACE.set(place)
    try:
        yield
    finally:
        _PLACE.reset(token)


def built(name: str, layer: "AdapterLayer") -> None:
    """Hand a freshly built layer to the `placing_as_built` caller, if any. A builder calls it once
    per layer and keeps no reference to that layer's base afterwards (the caller may drop it)."""
    place = _PLACE.get()
    if place is not None:
        place(name, layer)


@dataclass(frozen=True)
class LowRankUpdate:
    """A low-rank weight update ΔW = scale·B·A (out, in): A (r, in), B (out, r). What a layer hands
    to PEFT export and PARA, and what PARA hands back (rank-k truncated). `noise`: a bound on the
    spectral norm of the rounding error in scale·B·A from how the layer computed it (CERSA's
    ΔS = S − S* carries eps·‖S*‖, however small ΔS is); PARA treats σ at or below it as zero."""

    A: Tensor
    B: Tensor
    scale: float
    noise: float = 0.0

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
    # Parameters that optimizer weight decay must not touch (model.trainable_parameters(weight_decay=)).
    NO_WEIGHT_DECAY: ClassVar[tuple[str, ...]] = ()

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

    def _init_frozen_base(
        self, bias: bool, device=None, dtype=None, base_format: Optional[str] = None,
        base_group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        """The frozen base: `weight` (out, in) and `bias` (out,) as Parameters with
        requires_grad=False, so the state dict has nn.Linear's keys (what BASE_KEYS names). With
        `base_format` ("int8" | "nf4") the weight is stored quantized instead, as the frozen
        Parameters `weight_data` and `weight_absmax` (grouped along in_features), and there is no
        `weight`."""
        factory = dict(device=device, dtype=dtype)
        self.base_format = check_quant_options("base_format", base_format, base_group_size, self._name())
        self.base_group_size = int(base_group_size)
        self.base_dtype = dtype or torch.get_default_dtype()
        if self.base_format is None:
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **factory), requires_grad=False)
        else:
            spec = QuantSpec((self.out_features, self.in_features), self.base_format, self.base_group_size)
            self._register_quantized("weight", spec, device)
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory), requires_grad=False) if bias else None

    @torch.no_grad()
    def _copy_frozen_base(self, linear: nn.Linear, train_bias: bool = False) -> None:
        """Take `linear`'s weight and bias as the frozen base; the bias trains only if asked. A dense
        base SHARES the weight's storage (a new frozen Parameter over the same tensor, as PEFT keeps
        the original layer): no copy, so `apply` never holds two copies of a weight. A quantized base
        quantizes the weight (the dense one is then the caller's to drop), or, for a bitsandbytes
        Linear4bit, views its packed data in place. The bias is copied (it may train). Tensors still
        on the meta device (a layer built there) are allocated on the weight's device first."""
        source = frozen_weight_of(linear)
        if self.base_format is None:
            weight = quant.dense(source).detach()
            if (tuple(weight.shape), weight.dtype) != (tuple(self.weight.shape), self.weight.dtype):
                raise ValueError(
                    f"{self._name()}: the base weight must be {self.weight.dtype} of shape {tuple(self.weight.shape)}, "
                    f"got {weight.dtype} of shape {tuple(weight.shape)}"
                )
            self.weight = nn.Parameter(weight, requires_grad=False)
        self._materialize(source.device)
        if self.base_format is not None and not getattr(source, "is_meta", False):  # on meta (load_converted) the codes come later
            self._store_quantized("weight", source)
        if linear.bias is not None:
            self.bias.copy_(linear.bias)
            self.bias.requires_grad_(train_bias)

    def _materialize(self, device) -> None:
        """Allocate (uninitialised, on `device`) every tensor of this layer still on the meta device;
        the others stay as they are (unlike `to_empty`, which would reallocate a shared weight)."""
        self._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)

    def frozen_weight(self) -> Union[Tensor, QuantizedTensor]:
        """The frozen base W0 (out, in): the `weight` Parameter, or the QuantizedTensor over the
        codes and absmax (dtype: the layer's base dtype)."""
        if getattr(self, "base_format", None) is None:
            return self.weight
        return self.quantized("weight")

    # --- quantized storage (docs/quantization.md) ------------------------------------------------
    # A quantized operand `<name>` is two plain tensors, `<name>_data` (the codes) and
    # `<name>_absmax` (float32, one per group), held as frozen Parameters (requires_grad=False), so
    # state_dict, .to(), save/load see only tensors and FSDP2 / ZeRO-3 shard them like any weight
    # (a buffer would stay whole on every rank); the QuantizedTensor is rebuilt around them at each
    # use (no copy).

    def _register_quantized(self, name: str, spec: QuantSpec, device=None) -> None:
        if not hasattr(self, "_quant_specs"):
            self._quant_specs: dict[str, QuantSpec] = {}
        self._quant_specs[name] = spec
        code = torch.int8 if spec.format == "int8" else torch.uint8
        self._set_frozen(f"{name}_data", torch.zeros(spec.data_numel(), dtype=code, device=device))
        self._set_frozen(f"{name}_absmax", torch.zeros(spec.absmax_numel(), dtype=torch.float32, device=device))

    def _set_frozen(self, key: str, tensor: Tensor) -> None:
        """Hold `tensor` (itself, no copy) as the frozen operand `key`: a Parameter that never
        requires grad (sharded by FSDP2 like a frozen base weight; never trained)."""
        self._parameters[key] = nn.Parameter(tensor, requires_grad=False)

    def _store_quantized(self, name: str, source: Union[Tensor, QuantizedTensor]) -> None:
        """Fill `<name>` from a dense stored matrix (quantized here: its codes become the operand
        itself, no copy) or from a QuantizedTensor of the same stored layout, whose data and absmax
        become the operand (a view: the packed weight of a Linear4bit is not copied)."""
        spec = self._quant_specs[name]
        if isinstance(source, QuantizedTensor):
            got = (source.format, source.group_size, tuple(source.stored_shape))
            want = (spec.format, spec.group_size, spec.stored_shape)
            if got != want:
                raise ValueError(
                    f"{self._name()}: {name} is stored as (format, group_size, stored shape) {want}, the source is {got}"
                )
            q = source
        else:
            q = quant.quantize(source.detach(), spec.format, spec.group_size, where=f"{self._name()} ({name})")
        self._set_frozen(f"{name}_data", q.data.detach().reshape(-1))
        self._set_frozen(f"{name}_absmax", q.absmax.detach().reshape(-1))

    def quantized(self, name: str, dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
        """The QuantizedTensor of operand `<name>` over its buffers (logical shape: the stored one,
        transposed if its spec says so), standing for `dtype` (default: the layer's base dtype)."""
        spec = self._quant_specs[name]
        return QuantizedTensor(
            getattr(self, f"{name}_data"), getattr(self, f"{name}_absmax"), spec.stored_shape, spec.format,
            spec.group_size, dtype or self.base_dtype, spec.transposed,
        )

    def quantized_bytes(self) -> int:
        """Bytes of every quantized operand of this layer (codes + absmax)."""
        return sum(spec.nbytes() for spec in getattr(self, "_quant_specs", {}).values())

    def state_hint(self, key: str) -> str:
        """A note `load` appends to a shape or dtype mismatch of state-dict entry `key`."""
        name = key.rsplit("_", 1)[0]
        spec = getattr(self, "_quant_specs", {}).get(name)
        if spec is None or not key.endswith(("_data", "_absmax")):
            return ""
        rows, cols = spec.stored_shape
        return (
            f" ({name} is stored {spec.format} in groups of {spec.group_size} along a {rows}×{cols} matrix: "
            f"{spec.data_numel()} codes, {spec.absmax_numel()} float32 absmax; check the saved format and group size)"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dense base weight shares the storage of the model's original layer (`_copy_frozen_base`):
        # a state dict that brings one (a trained W0) gets a tensor of its own, never written into
        # that storage, so a load that fails later leaves the original layer's values intact (the
        # Parameter object stays: callers hold it).
        for key in self.BASE_KEYS:
            p = self._parameters.get(key)
            if p is not None and prefix + key in state_dict and tuple(state_dict[prefix + key].shape) == tuple(p.shape):
                p.data = torch.empty_like(p)  # (a wrong shape is refused by torch: the weight stays as it was)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast floating tensors: a quantized operand's absmax must stay float32
        # (its codes are integers and are never cast), so it goes through fn as raw int32 bits:
        # moved like any tensor, never cast. The dtype the operands stand for follows the cast.
        # The order of the parameters is kept: DDP and FSDP2 match tensors across processes by it
        # (a set's order, which varies with the hash seed, once paired U_absmax with V_absmax).
        order = list(self._parameters)
        scales = [f"{n}_absmax" for n in getattr(self, "_quant_specs", {})]
        kept = {k: self._parameters.pop(k) for k in scales if k in self._parameters}
        try:
            super()._apply(fn, recurse)
        finally:
            for key, t in kept.items():
                self._set_frozen(key, fn(t.detach().view(torch.int32)).view(torch.float32))
            for key in [k for k in order if k in self._parameters]:  # back in the registration order
                self._parameters[key] = self._parameters.pop(key)
        if hasattr(self, "base_dtype"):
            self.base_dtype = fn(torch.empty(0, dtype=self.base_dtype)).dtype
        return self

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
        return cls._build_each(bases, lambda name, base: cls.from_linear(base, **options))

    @classmethod
    def _build_each(cls, bases: dict[str, nn.Module], build) -> dict[str, "AdapterLayer"]:
        """{name: build(name, base)}, each ValueError prefixed by the layer it came from (from_linear does
        not know its layer's name). Each layer goes to `built` as soon as it exists; the loop holds
        no base beyond the one it builds (`apply` removes it from `bases` then)."""
        out = {}
        for name in list(bases):
            try:
                out[name] = build(name, bases[name])
            except ValueError as error:
                raise ValueError(f"apply(method={cls.method!r}): layer {name!r}: {error}") from None
            built(name, out[name])
        return out

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
        if is_linear4bit(module):
            return linear4bit_problem(module)
        if not module.weight.is_floating_point():  # another quantized Linear subclass (Linear8bitLt, ...)
            return (f"a {type(module).__name__} with a {module.weight.dtype} weight; of the quantized Linear layers "
                    "only bitsandbytes' Linear4bit (nf4) is read")
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
        w0 = self.frozen_weight()
        dtype = w0.dtype  # a quantized base stands for its base dtype, and is dequantized once, here
        return merged_linear(quant.dense(w0, torch.float32) + delta.float(), self.bias, dtype)

    def base_weight_bytes(self) -> int:
        """Bytes of what stands for the frozen base weight (bias excluded): the dense W0 here (or its
        codes and absmax when quantized), CERSA's factors where they replace it."""
        w = self.frozen_weight()
        return w.nbytes if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()

    def weight_dtype(self) -> torch.dtype:
        """The dtype of the Linear this layer stands for, which its inputs come in: the frozen W0's
        here, CERSA's factors' where they replace it. `load` refuses an adapter whose layer has
        another dtype than the model's Linear at that place. A quantized W0 stands for its base dtype."""
        return self.frozen_weight().dtype

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
