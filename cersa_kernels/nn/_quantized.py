"""Quantized frozen operands inside the layers (docs/quantization.md): option checks, where a frozen
weight comes from (a dense nn.Linear, or the packed NF4 data of a bitsandbytes Linear4bit, read in
place), and byte counts. The storage itself (buffers `<name>_data`, `<name>_absmax`) is
AdapterLayer's (nn/base.py), so every layer keeps it the same way.

bitsandbytes is optional: a Linear4bit is recognised by its class name and module, and
bitsandbytes itself is imported only to dequantize a nested absmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import quant
from .._checks import check_int
from ..quant import QuantizedTensor

__all__ = [
    "QuantSpec", "check_quant_options", "is_linear4bit", "linear4bit_problem", "frozen_weight_of", "weight_dtype_of",
    "weight_bytes_of", "resolve_base_format",
]

DEFAULT_GROUP_SIZE = quant.DEFAULT_GROUP_SIZE


@dataclass(frozen=True)
class QuantSpec:
    """How a layer's quantized operand `<name>` is stored: the row-major (rows, cols) matrix
    grouped along cols; `transposed` when the operand is its transpose (CERSA's U, V are stored
    as Uᵀ (k, m), Vᵀ (k, n))."""

    stored_shape: tuple[int, int]
    format: str
    group_size: int
    transposed: bool = False

    def data_numel(self) -> int:
        rows, cols = self.stored_shape
        return rows * cols if self.format == "int8" else (rows * cols + 1) // 2

    def absmax_numel(self) -> int:
        rows, cols = self.stored_shape
        return rows * -(-cols // self.group_size)

    def nbytes(self) -> int:
        return quant.quantized_bytes(*self.stored_shape, self.format, self.group_size)


def check_quant_options(option: str, format: Optional[str], group_size, layer: str) -> Optional[str]:
    """`format` None (dense) or one of quant.FORMATS, and a positive int group size; errors name
    the layer and the option (`option` is e.g. "factor_format" or "base_format")."""
    if format is None:
        return None
    if format not in quant.FORMATS:
        raise ValueError(f"{layer}: unknown {option} {format!r}; expected None (dense) or one of {list(quant.FORMATS)}")
    group = option.replace("format", "group_size")
    check_int(group, group_size, layer, minimum=1)
    return format


# --- bitsandbytes Linear4bit ---------------------------------------------------------------------

def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (or a subclass: LinearNF4), by class name and module: this does
    not import bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def linear4bit_problem(module: nn.Module) -> Optional[str]:
    """Why the packed weight of a Linear4bit cannot be read in place (None when it can)."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return ("a bitsandbytes Linear4bit whose weight is not quantized yet (bitsandbytes quantizes on the move "
                "to a device: call .to('cpu') or .cuda() first)")
    if state.quant_type != "nf4":
        return f"a bitsandbytes Linear4bit with quant_type={state.quant_type!r}; only 'nf4' is read"
    if getattr(state, "packing_format_for_cpu", False):
        return ("a bitsandbytes Linear4bit repacked for bitsandbytes' AVX512-bf16 CPU kernel, which is not the NF4 "
                "block layout")
    if module.in_features % state.blocksize:
        return (
            f"a bitsandbytes Linear4bit with in_features={module.in_features}, not a multiple of its block size "
            f"{state.blocksize}: its flat blocks then straddle rows, which the row-grouped layout cannot view"
        )
    return None


def _linear4bit_weight(module: nn.Module) -> QuantizedTensor:
    """The packed NF4 weight of a Linear4bit as a QuantizedTensor viewing it (no copy of the codes;
    the absmax too unless nested, whose 8-bit absmax is dequantized by bitsandbytes itself)."""
    state = module.weight.quant_state
    absmax = state.absmax
    if state.nested:
        import bitsandbytes.functional as bnb_functional

        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    rows, cols = module.out_features, module.in_features
    return QuantizedTensor(
        module.weight.data.view(-1), absmax.float(), (rows, cols), "nf4", int(state.blocksize), state.dtype
    )


def frozen_weight_of(module: nn.Module) -> Union[Tensor, QuantizedTensor]:
    """The frozen (out, in) weight of an nn.Linear (the tensor itself) or of a readable Linear4bit (a
    QuantizedTensor viewing its packed data)."""
    if is_linear4bit(module):
        problem = linear4bit_problem(module)
        if problem is not None:
            raise ValueError(f"{type(module).__name__}: {problem}")
        return _linear4bit_weight(module)
    return module.weight


def weight_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype the module's weight stands for (a Linear4bit's original dtype, not uint8)."""
    if is_linear4bit(module) and getattr(module.weight, "quant_state", None) is not None:
        return module.weight.quant_state.dtype
    return module.weight.dtype


def weight_bytes_of(module: nn.Module) -> int:
    """Bytes of a Linear's or Linear4bit's weight as stored (a Linear4bit: codes and its absmax, the
    nested absmax's own statistics included; bias excluded)."""
    w = module.weight
    state = getattr(w, "quant_state", None) if is_linear4bit(module) else None
    total = w.numel() * w.element_size()
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def resolve_base_format(module: nn.Module, base_format: Optional[str], base_group_size: Optional[int],
                        layer: str) -> tuple[Optional[str], int]:
    """(format, group size) a LoRA/PiCa base over `module` is stored in: the options as given
    (group size default DEFAULT_GROUP_SIZE) for an nn.Linear; for a bitsandbytes Linear4bit, its own
    nf4 layout, read in place: asking for another format or group size is a ValueError (no silent
    requantization)."""
    if not is_linear4bit(module):
        group = DEFAULT_GROUP_SIZE if base_group_size is None else base_group_size
        return check_quant_options("base_format", base_format, group, layer), group
    problem = linear4bit_problem(module)
    if problem is not None:
        raise ValueError(f"{layer}: the layer is {problem}")
    blocksize = int(module.weight.quant_state.blocksize)
    if base_format not in (None, "nf4") or base_group_size not in (None, blocksize):
        raise ValueError(
            f"{layer}: the layer is a bitsandbytes Linear4bit (nf4, block size {blocksize}), whose packed weight is "
            f"read in place; base_format={base_format!r}, base_group_size={base_group_size!r} asks for another "
            "layout (leave both unset)"
        )
    return "nf4", blocksize
