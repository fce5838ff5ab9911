"""The `cuda` backend: thin wrappers around the compiled `cersa_kernels._cuda` module (csrc/ +
python_api/). No math here: the wrappers allocate outputs and the kernels' workspace with torch
(so the caching allocator and its stream semantics apply) and hand `_cuda` data pointers, shapes,
strides, a dtype code and the current stream of the tensors' device.

Kernels (same contracts as cersa_kernels.reference):
- `lowrank_fwd_cuda(x, V, S, U, bias) -> (y, h)`, `lowrank_bwd_cuda(dy, h, V, S, U, need_dx) -> (dx, dS)`
- `snell_delta_cuda(A, B, coeffs, tau) -> ΔW_s` (m, n)
Nothing here touches CUDA or imports `_cuda` until a kernel is called or a reason is asked for.
The kernels read dense operands only: a quantized operand (`quant.QuantizedTensor`) is refused.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import quant

__all__ = ["lowrank_fwd_cuda", "lowrank_bwd_cuda", "snell_delta_cuda", "unavailable_reasons", "build_info"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BUILD_HINT = (
    "build it with `pip install -e .` or `python setup.py build_ext --inplace` where nvcc is on PATH "
    "(or in $CUDA_HOME/bin) and CERSA_SKIP_CUDA is not set"
)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(the `_cuda` module, None), or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("cersa_kernels._cuda"), None
    except ImportError as exc:
        return None, f"the native module cersa_kernels._cuda is not built ({exc}); {_BUILD_HINT}"


def _module(op: str, tensors: Sequence[Optional[Tensor]]) -> ModuleType:
    """`_cuda`, after checking that it can run `op` on these tensors (RuntimeError listing why not)."""
    reasons = unavailable_reasons(op, [t for t in tensors if t is not None])
    if reasons:
        raise RuntimeError(f"the cuda backend cannot run {op}: " + "; ".join(reasons))
    return _load()[0]


def build_info() -> dict:
    """What `_cuda` was built for: archs, nvcc version, source hash, CUDA runtime/driver versions."""
    module, error = _load()
    if module is None:
        raise RuntimeError(error)
    return module.build_info()


def unavailable_reasons(op: str, tensors: Sequence) -> list[str]:
    """Every reason the cuda backend cannot run `op` on these operands; empty when it can."""
    reasons = []
    quantized = [t for t in tensors if quant.is_quantized(t)]
    if quantized:
        formats = "/".join(sorted({t.format for t in quantized}))
        reasons.append(f"quantized {formats} operands: the cuda backend's kernels read dense operands only")
        tensors = [t for t in tensors if not quant.is_quantized(t)]
    module, error = _load()
    if module is None:
        reasons.append(error)
    elif op not in module.KERNELS:
        reasons.append(f"_cuda has no kernel for {op} (it has {', '.join(module.KERNELS)})")
    if any(not t.is_cuda for t in tensors):
        devices = sorted({t.device.type for t in tensors})
        reasons.append(f"tensors are on {'/'.join(devices)}: the cuda backend needs CUDA tensors")
    elif len({t.device for t in tensors}) > 1:
        devices = sorted({str(t.device) for t in tensors})
        reasons.append(f"tensors are on several GPUs ({', '.join(devices)}): the cuda backend needs one")
    dtypes = {t.dtype for t in tensors}
    bad = sorted(str(d).replace("torch.", "") for d in dtypes if d not in _DTYPES)
    if bad:
        reasons.append(f"dtype {'/'.join(bad)} is not supported by the cuda backend (float16, bfloat16, float32)")
    elif len(dtypes - {torch.float32}) > 1:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        reasons.append(f"tensors mix {'/'.join(names)}: the cuda kernels take one dtype (S may also be float32)")
    return reasons


def _dtype_code(t: Tensor) -> int:
    cuda = _load()[0]
    return {torch.float32: cuda.FLOAT32, torch.float16: cuda.FLOAT16, torch.bfloat16: cuda.BFLOAT16}[t.dtype]


def _matrix(t: Tensor) -> tuple:
    """(data_ptr, dtype code, rows, cols, stride_row, stride_col) of a 2-D tensor; a vector is one row."""
    if t.dim() == 1:
        return (t.data_ptr(), _dtype_code(t), 1, t.shape[0], 0, t.stride(0))
    return (t.data_ptr(), _dtype_code(t), t.shape[0], t.shape[1], t.stride(0), t.stride(1))


def _tensor3(t: Tensor) -> tuple:
    return (t.data_ptr(), _dtype_code(t), tuple(t.shape), tuple(t.stride()))


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def lowrank_fwd_cuda(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (T, m), h (T, k)."""
    cuda = _module("lowrank_fwd", (x, V, S, U, bias))
    y = x.new_empty((x.shape[0], U.shape[0]))
    h = x.new_empty((x.shape[0], V.shape[1]))
    operands = [_matrix(t) for t in (x, V, S, U)]
    with torch.cuda.device(x.device):  # the launcher checks pointers against the current device
        ws = _workspace(cuda.lowrank_fwd_workspace_bytes(*operands), x.device)
        cuda.lowrank_fwd(
            *operands, None if bias is None else _matrix(bias), _matrix(y), _matrix(h),
            ws.data_ptr(), ws.numel(), _stream(x.device),
        )
    return y, h


def lowrank_bwd_cuda(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) (empty (0, n) unless need_dx), dS (k, k) in S's dtype."""
    cuda = _module("lowrank_bwd", (dy, h, V, S, U))
    dx = dy.new_empty((dy.shape[0] if need_dx else 0, V.shape[0]))
    dS = S.new_empty(S.shape)
    operands = [_matrix(t) for t in (dy, h, V, S, U)]
    with torch.cuda.device(dy.device):
        ws = _workspace(cuda.lowrank_bwd_workspace_bytes(*operands, need_dx), dy.device)
        cuda.lowrank_bwd(
            *operands, _matrix(dx) if need_dx else None, _matrix(dS), ws.data_ptr(), ws.numel(), _stream(dy.device)
        )
    return dx, dS


def snell_delta_cuda(A: Tensor, B: Tensor, coeffs: Sequence[float], tau: float) -> Tensor:
    """A (H, n, d_h), B (H, m, d_h), H coefficients -> ΔW_s (m, n) in A's dtype:
    K[i, j] = Σ_h coeffs[h]·‖B[h, i] − A[h, j]‖₂ (fp32), ΔW_s = K·|K| where |K| > tau, else 0."""
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"snell_delta: A and B must be (H, rows, d_h), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    cuda = _module("snell_delta", (A, B))
    out = A.new_empty((B.shape[1], A.shape[1]))
    with torch.cuda.device(A.device):
        cuda.snell_delta(_tensor3(A), _tensor3(B), [float(c) for c in coeffs], float(tau), _matrix(out), _stream(A.device))
    return out
