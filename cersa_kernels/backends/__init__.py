"""Which backend runs a custom op for a given call, and why another one cannot.

`CERSA_BACKEND=auto|torch|triton|cuda` (read at every call, so it can change at run time), or the
`use_backend(name)` context manager, which wins over the variable.

- `torch`: the reference (cersa_kernels.reference), any device and dtype.
- `triton`: CUDA tensors; CPU tensors too when TRITON_INTERPRET=1 (how CI tests the kernels).
- `cuda`: the compiled `cersa_kernels._cuda` module; CUDA tensors.
- `auto`: a kernel runs on a GPU only where it has been verified on that GPU architecture and
  measured faster than `torch`: from the table committed from our GPU runs (`tuned.json` beside
  this file, written by benchmarks/make_tuned_table.py) or from the user's own
  `python -m cersa_kernels doctor` run (`verified_cache_path()`; it wins over the committed one).
  Everywhere else, `torch` (cuBLAS on a GPU: the same memory contract). CPU tensors always go to
  `torch`; the Triton interpreter is for tests and is never chosen by `auto`.

Both tables have one shape: {"<op>_fwd" | "<op>_bwd": {"sm_<major><minor>": {dtype: backend}}}; an
entry exists only where that backend was verified on that arch and was faster than torch.

A backend asked for by name that cannot serve a call raises `BackendUnavailableError` listing every
reason; nothing falls back silently.

Kernels are found by name: backend `torch` runs `cersa_kernels.reference.<module>.<op>`, `triton`
runs `cersa_kernels.triton.<module>.<op>_triton`, `cuda` runs `cersa_kernels.backends.cuda.<op>_cuda`.

Quantized operands (`quant.QuantizedTensor`) come through the ops `<op>_q_fwd` / `<op>_q_bwd`, which
run the same kernels as `<op>_fwd` / `<op>_bwd`: `torch` dequantizes them; `triton` serves a format
once the op's Triton module lists it in `QUANTIZED_FORMATS` (its launchers read that format); `cuda`
reads dense operands only. `auto` reads the tables under the `_q_` names, which hold no entry until a
quantized kernel is verified on a GPU, so it runs `torch` for them.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .. import quant
from ..triton import triton_interpreting
from . import cuda

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "requested_backend",
    "use_backend",
    "unavailable_reasons",
    "select_backend",
    "kernel_for",
    "triton_interpreting",
    "device_arch",
    "verified_cache_path",
    "plain_op",
]

BACKENDS = ("torch", "triton", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("cersa_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run this call; the message lists every reason."""


def requested_backend() -> str:
    """The backend asked for: `use_backend(...)` if active, else $CERSA_BACKEND, else 'auto'."""
    name = _override.get() or os.environ.get("CERSA_BACKEND", "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"CERSA_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on backend `name` ('auto', 'torch', 'triton' or 'cuda')."""
    token = _override.set(name)
    try:
        requested_backend()  # validate the name now, not at the first op
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def plain_op(op: str) -> str:
    """The op whose kernels `op` runs: lowrank_q_fwd -> lowrank_fwd (a quantized op reuses them)."""
    base, _, direction = op.rpartition("_")
    return f"{base[:-2]}_{direction}" if base.endswith("_q") and direction in ("fwd", "bwd") else op


def _kernel_location(backend: str, op: str) -> tuple[str, str]:
    op = plain_op(op)
    module = op.rsplit("_", 1)[0]  # lowrank_fwd -> lowrank
    if backend == "torch":
        return f"cersa_kernels.reference.{module}", op
    if backend == "triton":
        return f"cersa_kernels.triton.{module}", f"{op}_triton"
    return "cersa_kernels.backends.cuda", f"{op}_cuda"


@functools.lru_cache(maxsize=None)
def _load_kernel(backend: str, op: str) -> Callable | None:
    module_name, attr = _kernel_location(backend, op)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    return getattr(module, attr, None)


def _quantized_formats(backend: str, op: str) -> tuple[str, ...]:
    """The formats `backend`'s kernels for `op` read in place (the Triton module's QUANTIZED_FORMATS)."""
    if backend != "triton":
        return ()
    module_name, _ = _kernel_location(backend, op)
    try:
        return tuple(getattr(importlib.import_module(module_name), "QUANTIZED_FORMATS", ()))
    except ModuleNotFoundError:
        return ()


def unavailable_reasons(backend: str, op: str, tensors: Sequence) -> list[str]:
    """Every reason `backend` cannot run `op` on these operands (tensors or QuantizedTensors);
    empty when it can."""
    reasons: list[str] = []
    devices = sorted({t.device.type for t in tensors})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    if backend == "torch":
        return reasons
    if backend == "triton":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        if devices != ["cuda"] and not (devices == ["cpu"] and triton_interpreting()):
            reasons.append(
                f"tensors are on {'/'.join(devices)}: Triton needs CUDA tensors "
                "(or CPU tensors with TRITON_INTERPRET=1, for tests)"
            )
        bad = [d for d in dtypes if getattr(torch, d) not in _FLOAT_DTYPES]
        if bad:
            reasons.append(f"dtype {'/'.join(bad)} is not supported (float16, bfloat16, float32)")
        if triton_interpreting() and devices == ["cpu"] and "bfloat16" in dtypes:
            reasons.append("bfloat16 tl.dot is wrong under the Triton interpreter; test bfloat16 on a GPU")
        formats = sorted({t.format for t in tensors if quant.is_quantized(t)})
        if formats and not err:
            unread = [f for f in formats if f not in _quantized_formats(backend, op)]
            if unread:
                reasons.append(
                    f"quantized {'/'.join(unread)} operands: the Triton kernels of {plain_op(op)} do not read them "
                    f"yet (no such format in {_kernel_location(backend, op)[0]}.QUANTIZED_FORMATS)"
                )
    elif backend == "cuda":
        reasons.extend(cuda.unavailable_reasons(plain_op(op), tensors))
    if not reasons and _load_kernel(backend, op) is None:
        module_name, attr = _kernel_location(backend, op)
        reasons.append(f"backend {backend} has no kernel for {op} ({module_name}.{attr} is missing)")
    return reasons


@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict:
    """The committed table (see the module docstring), {} if none is committed."""
    path = Path(__file__).with_name("tuned.json")
    return json.loads(path.read_text()) if path.exists() else {}


def device_arch(device: torch.device) -> str:
    """'sm_90' for an H100, 'sm_80' for an A100, ...: the key of the verified tables."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def verified_cache_path(device_name: str, arch: str) -> Path:
    """Where `doctor` writes, and `auto` reads, this GPU's verified-and-faster table:
    $CERSA_KERNELS_CACHE, else ~/.cache/cersa_kernels, /verified-<gpu name>-<arch>.json."""
    root = os.environ.get("CERSA_KERNELS_CACHE") or Path.home() / ".cache" / "cersa_kernels"
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    return Path(root) / f"verified-{slug}-{arch}.json"


@functools.lru_cache(maxsize=8)
def _user_table(device_name: str, arch: str) -> dict:
    path = verified_cache_path(device_name, arch)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("table", {})
    except (OSError, ValueError):  # a truncated or foreign file: ignore it rather than fail every op
        return {}


def _auto_candidates(op: str, tensors: Sequence) -> list[str]:
    """[backend verified and faster for this op, arch and dtype, 'torch'], or ['torch']."""
    if not all(t.device.type == "cuda" for t in tensors):
        return ["torch"]
    device = tensors[0].device
    dtype = str(tensors[0].dtype).replace("torch.", "")
    arch = device_arch(device)
    for table in (_user_table(torch.cuda.get_device_name(device), arch), _tuned_table()):
        best = table.get(op, {}).get(arch, {}).get(dtype)
        if best in BACKENDS:
            return [best, "torch"] if best != "torch" else ["torch"]
    return ["torch"]


def select_backend(op: str, tensors: Sequence) -> str:
    """The backend that runs `op` for these tensors, honouring the request; raises if it cannot."""
    name = requested_backend()
    if name == "auto":
        for candidate in _auto_candidates(op, tensors):
            if not unavailable_reasons(candidate, op, tensors):
                return candidate
        return "torch"
    reasons = unavailable_reasons(name, op, tensors)
    if reasons:
        listed = "\n  - ".join(reasons)
        raise BackendUnavailableError(f"CERSA_BACKEND={name} cannot run cersa::{op} for this call:\n  - {listed}")
    return name


def kernel_for(op: str, tensors: Sequence) -> Callable:
    """The kernel function of the selected backend for `op` (see the module docstring)."""
    backend = select_backend(op, tensors)
    kernel = _load_kernel(backend, op)
    assert kernel is not None, (backend, op)  # unavailable_reasons checked it
    return kernel
