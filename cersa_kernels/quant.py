"""Quantized frozen operands (docs/quantization.md): the one type that stores a frozen 2-D weight as
codes plus one float32 absmax per group, and the int8 / NF4 formats.

A `QuantizedTensor` stands for a logical (rows, cols) matrix F. Its storage is the row-major
flattening of F (or of Fᵀ when `transposed`: `.T` is a free view, as for a tensor):

- groups: each stored row is cut into ceil(cols_stored / group_size) groups of `group_size`
  consecutive elements (the last one shorter when group_size does not divide the row: padding, no
  refusal); the absmax of stored element (r, c) is `absmax[r * groups_per_row + c // group_size]`.
  When group_size divides the row length this is exactly bitsandbytes' flat blockwise layout.
- int8: `data` int8 (numel,), F̂ = data · absmax / 127 (symmetric, round to nearest, in [-127, 127]).
- nf4: `data` uint8 (ceil(numel / 2),), two 4-bit codes per byte, the element of even flat index
  in the high nibble (bitsandbytes' `quant_type="nf4"` packing); F̂ = NF4_CODE[code] · absmax.

Kernels read `data`, `absmax` and `code_table()` directly and dequantize as they load; the torch
reference calls `dequantize()` (one transient dense copy per call). Nothing here touches CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "FORMATS", "NF4_CODE", "QuantizedTensor", "quantize", "dense", "is_quantized", "quantized_bytes", "to_parts",
    "from_parts",
]

FORMATS = ("int8", "nf4")
# The dtypes an operand may stand for, in the order of their id in `to_parts`' meta.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_GROUP_SIZE = 64

# QLoRA's NormalFloat-4 code (the values bitsandbytes uses for quant_type="nf4"): quantiles of
# N(0, 1) normalised to [-1, 1], with an exact zero; index = the 4-bit code.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _check_format(format: str, where: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"{where}: unknown quantization format {format!r}; expected one of {list(FORMATS)}")


def _check_group_size(group_size: int, where: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
    return group_size


def code_table(device=None) -> Tensor:
    """The 16 NF4 code values (float32), on `device`."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A frozen (rows, cols) operand stored quantized; see the module docstring for the layout.

    data: int8 (numel,) for int8, uint8 (ceil(numel/2),) for nf4; absmax: float32 (rows_stored ·
    groups_per_row,); stored_shape: (rows, cols) of the stored row-major matrix; dtype: the dtype
    the operand stands for (what dequantize returns and the GEMM computes in)."""

    data: Tensor
    absmax: Tensor
    stored_shape: tuple[int, int]
    format: str
    group_size: int
    dtype: torch.dtype
    transposed: bool = False

    def __post_init__(self) -> None:
        _check_format(self.format, "QuantizedTensor")
        _check_group_size(self.group_size, "QuantizedTensor")
        if self.dtype not in _DTYPES:
            raise ValueError(f"QuantizedTensor: dtype must be one of {[str(d) for d in _DTYPES]}, got {self.dtype}")
        rows, cols = self.stored_shape
        numel = rows * cols
        want = numel if self.format == "int8" else (numel + 1) // 2
        want_dtype = torch.int8 if self.format == "int8" else torch.uint8
        if self.data.dtype != want_dtype or self.data.numel() != want:
            raise ValueError(
                f"QuantizedTensor: {self.format} data for {rows}×{cols} must be {want} {want_dtype} elements, got "
                f"{self.data.numel()} {self.data.dtype}"
            )
        if self.absmax.dtype != torch.float32 or self.absmax.numel() != rows * self.groups_per_row:
            raise ValueError(
                f"QuantizedTensor: absmax for {rows}×{cols} in groups of {self.group_size} must be "
                f"{rows * self.groups_per_row} float32 values, got {self.absmax.numel()} {self.absmax.dtype}"
            )

    # --- what it looks like from outside: a frozen 2-D operand -------------------------------------
    @property
    def shape(self) -> torch.Size:
        rows, cols = self.stored_shape
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    @property
    def T(self) -> "QuantizedTensor":
        return replace(self, transposed=not self.transposed)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def requires_grad(self) -> bool:
        return False

    def dim(self) -> int:
        return 2

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def groups_per_row(self) -> int:
        return math.ceil(self.stored_shape[1] / self.group_size)

    @property
    def nbytes(self) -> int:
        """Exact bytes stored: codes + absmax."""
        return self.data.numel() * self.data.element_size() + self.absmax.numel() * self.absmax.element_size()

    def dense_nbytes(self) -> int:
        """Bytes of the same operand stored dense in `dtype`."""
        rows, cols = self.stored_shape
        return rows * cols * torch.empty((), dtype=self.dtype).element_size()

    # --- values ----------------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense (rows, cols) operand F̂ in `dtype` (default: self.dtype): a new tensor."""
        rows, cols = self.stored_shape
        if self.format == "int8":
            codes = self.data.to(torch.float32)
        else:
            hi, lo = (self.data >> 4).long(), (self.data & 0x0F).long()
            idx = torch.stack((hi, lo), dim=1).reshape(-1)[: rows * cols]
            codes = code_table(self.data.device)[idx]
        scale = self.absmax.reshape(rows, self.groups_per_row).repeat_interleave(self.group_size, dim=1)[:, :cols]
        if self.format == "int8":
            scale = scale / 127.0
        out = (codes.reshape(rows, cols) * scale).to(dtype or self.dtype)
        return out.T if self.transposed else out

    def to(self, *args, device=None, dtype: Optional[torch.dtype] = None) -> "QuantizedTensor":
        """Like Tensor.to(device), .to(dtype), .to(device, dtype): a device moves the codes and the
        absmax; a dtype changes only the dtype the operand stands for (the codes stay: this is how
        autocast's `t.to(bfloat16)` casts a quantized frozen weight). Self when nothing changes."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        out = self
        if dtype is not None and dtype != self.dtype:
            out = replace(out, dtype=dtype)
        if device is not None and torch.device(device) != self.device:
            out = replace(out, data=out.data.to(device), absmax=out.absmax.to(device))
        return out

    def __repr__(self) -> str:
        r, c = self.shape
        return (
            f"QuantizedTensor({r}×{c}, format={self.format}, group_size={self.group_size}, dtype={self.dtype}, "
            f"bytes={self.nbytes})"
        )


def quantized_bytes(rows: int, cols: int, format: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Exact bytes of a (rows, cols) operand stored in `format` (grouped along cols)."""
    _check_format(format, "quantized_bytes")
    numel = rows * cols
    codes = numel if format == "int8" else (numel + 1) // 2
    return codes + 4 * rows * math.ceil(cols / group_size)


@torch.no_grad()
def quantize(t: Tensor, format: str, group_size: int = DEFAULT_GROUP_SIZE, *, where: str = "quantize") -> QuantizedTensor:
    """Quantize a frozen 2-D tensor t (rows, cols), grouped along cols (its last dimension).

    int8: absmax = max|group|, q = round(t · 127 / absmax). nf4: absmax = max|group|, q = the index
    of the NF4 code nearest to t / absmax (ties to the lower code, as bitsandbytes' reference)."""
    _check_format(format, where)
    _check_group_size(group_size, where)
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{where}: expected a 2-D floating-point tensor, got {getattr(t, 'shape', type(t))}")
    if t.requires_grad:
        raise ValueError(
            f"{where}: cannot quantize a tensor that requires grad: quantized operands are frozen (no gradient)"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: the tensor to quantize holds NaN or Inf")
    rows, cols = t.shape
    # by blocks of rows, so that the float32 temporaries (nf4: 16 distances per element) stay a
    # small, fixed size whatever the weight's: quantizing a layer never costs several layers' bytes
    step = max(1, _QUANTIZE_CHUNK // max(cols, 1))
    step += step % 2 if cols % 2 else 0  # nf4 packs pairs of the flat index: chunks of even length
    parts = [_quantize_rows(t[r : r + step], format, group_size) for r in range(0, rows, step)]
    data = torch.cat([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
    absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
    return QuantizedTensor(data, absmax, (rows, cols), format, group_size, t.dtype)


_QUANTIZE_CHUNK = 1 << 18  # elements per block of rows in `quantize`


def _quantize_rows(t: Tensor, format: str, group_size: int) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a block of rows, flat, in the layout `quantize` documents."""
    rows, cols = t.shape
    groups = math.ceil(cols / group_size)
    padded = torch.zeros(rows, groups * group_size, dtype=torch.float32, device=t.device)
    padded[:, :cols] = t.float()
    blocks = padded.reshape(rows, groups, group_size)
    absmax = blocks.abs().amax(dim=2)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]
    if format == "int8":
        q = torch.round(blocks * 127.0 / safe).clamp_(-127, 127).to(torch.int8)
        data = q.reshape(rows, -1)[:, :cols].reshape(-1).contiguous()
    else:
        scaled = (blocks / safe).reshape(rows, -1)[:, :cols].reshape(-1)
        idx = torch.argmin((scaled[:, None] - code_table(t.device)[None, :]).abs(), dim=1).to(torch.uint8)
        if idx.numel() % 2:
            idx = torch.cat((idx, idx.new_zeros(1)))
        data = ((idx[0::2] << 4) | idx[1::2]).contiguous()
    return data, absmax.reshape(-1).contiguous()


def is_quantized(t) -> bool:
    return isinstance(t, QuantizedTensor)


def to_parts(t) -> tuple[Tensor, Optional[Tensor], list[int]]:
    """A frozen operand as custom-op arguments `(data, absmax, meta)`: a QuantizedTensor is not a
    Tensor and cannot cross a torch.library schema, its parts can. meta = [format id (index in
    FORMATS), group_size, stored rows, stored cols, transposed, dtype id]; a dense tensor travels
    as `(t, None, [])`, so one quantized op also serves calls where only some operands are."""
    if not isinstance(t, QuantizedTensor):
        return t, None, []
    rows, cols = t.stored_shape
    meta = [FORMATS.index(t.format), t.group_size, rows, cols, int(t.transposed), _DTYPES.index(t.dtype)]
    return t.data, t.absmax, meta


def from_parts(data: Tensor, absmax: Optional[Tensor], meta: list[int]):
    """The operand `to_parts` split: a QuantizedTensor (validated again), or `data` when dense."""
    if absmax is None:
        return data
    if len(meta) != 6 or not 0 <= meta[0] < len(FORMATS) or not 0 <= meta[5] < len(_DTYPES):
        raise ValueError(f"from_parts: meta must be [format id, group size, rows, cols, transposed, dtype id], got {meta}")
    fmt, group_size, rows, cols, transposed, dtype = meta
    return QuantizedTensor(data, absmax, (rows, cols), FORMATS[fmt], group_size, _DTYPES[dtype], bool(transposed))


def dense(t, dtype: Optional[torch.dtype] = None) -> Tensor:
    """`t` as a dense tensor: dequantized (a transient copy) if quantized, else `t` itself (cast to
    `dtype` if given)."""
    if isinstance(t, QuantizedTensor):
        return t.dequantize(dtype)
    return t if dtype is None else t.to(dtype)
