"""Every op on non-contiguous operands (issue 16, item 1: a Triton kernel that read a strided bias
as if its stride were 1 gave y off by 5–73% relative, silently).

For every op and variant of the registry (op_harness.OPS) and for each tensor operand in turn, dy
included, the operand is handed to the op in each layout below while every other operand stays
contiguous, on every backend that runs on CPU (torch, and triton under the interpreter); y and
every gradient must match the float64 oracle on contiguous copies by the suite's accumulation rule
(tolerances.py). A kernel that reads an operand through the wrong strides reads other (random)
values and misses that rule by orders of magnitude. Each case also checks that the kernel really
received the strided tensor (nothing upstream copied it contiguous, which would make it vacuous).

Layouts (every view lies inside its own storage, so a kernel ignoring the strides reads wrong
values, never out of bounds):
- strided: every 3rd row and 2nd column (every 2nd element of a vector), from offset 1, of a
  larger random tensor: no unit stride, a row stride that is not the row length, an offset;
- transposed: a contiguous buffer of the reversed shape, permuted back (column-major; 2-D and up);
- expanded: row 0 broadcast along dim 0, stride 0 (a bias `b[:1].expand(m)`; a dy with equal rows,
  as the loss `(y * w).sum()` gives); the contiguous runs get the same broadcast values.

The CUDA launchers cannot run here; `test_cuda_wrappers_pass_every_operands_pointer_and_strides`
checks the half that is Python (backends/cuda.py builds each operand's (data_ptr, dtype, rows,
cols, stride_row, stride_col) tuple) against a stand-in module that reads the operands back from
those tuples exactly as the C++ launchers index them.
"""
from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch

from cersa_kernels.backends import cuda as cuda_backend
from cersa_kernels.ops import _define
from cersa_kernels.reference import lowrank as ref_lowrank, snell as ref_snell

from op_harness import OPS, SNELL_COEFFS, as64, grads_present, make_lowrank, make_snell, run
from tolerances import assert_matches_reference

BACKENDS = ("torch", "triton")  # the CPU-runnable ones (triton: TRITON_INTERPRET=1, conftest.py)

# Odd sizes, none a multiple of a tile, kept small: the interpreter's time grows with programs ×
# loop steps. SNELL's kernels loop over heads and d_h per tile, so its shape is smaller (still more
# than one 32-wide interpreter tile along T and n).
SHAPES = {"snell_linear": (37, 45, 27, 4)}
DEFAULT_SHAPE = (37, 130, 77, 5)


def _padding(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values at every 3rd index (every 2nd in the last dim), from 1, of a larger random tensor;
    differentiable (the gradient of the view is t's)."""
    steps = [3] * (t.dim() - 1) + [2]
    big = _padding([s * n + 1 for s, n in zip(steps, t.shape)], t.dtype, seed=11)
    index = tuple(slice(1, 1 + s * n, s) for s, n in zip(steps, t.shape))
    big[index] = t
    return big[index]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """t's values in a buffer of the reversed shape (column-major for a matrix)."""
    order = list(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


def expanded(t: torch.Tensor) -> torch.Tensor:
    """Row 0 of t broadcast along dim 0 (stride 0 there), as a view of a random tensor of t's shape
    whose row 0 is t's: a kernel that ignored the stride would read the other, random rows."""
    big = _padding(t.shape, t.dtype, seed=13)
    big[:1] = t[:1]
    return big[:1].expand(t.shape)


def broadcast_values(t: torch.Tensor) -> torch.Tensor:
    """The values `expanded` gives, as a contiguous tensor (what the contiguous runs get)."""
    return t[:1].expand(t.shape).contiguous()


# layout name -> (the values every run gets, the view the non-contiguous run gets)
LAYOUTS = {
    "strided": (lambda t: t, strided),
    "transposed": (lambda t: t, transposed),
    "expanded": (broadcast_values, expanded),
}
# Not expanded: SNELL's A or B with equal rows gives |K| with ties at τ (or K = 0 across heads),
# which no longer has the threshold margin make_snell guarantees.
NOT_EXPANDED = {("snell_linear", "A"), ("snell_linear", "B")}


def _layouts(op: str, name: str, dim: int) -> list[str]:
    return [layout for layout in LAYOUTS
            if not (layout == "transposed" and dim < 2) and not (layout == "expanded" and (op, name) in NOT_EXPANDED)]


def _contiguous(inputs: dict) -> dict:
    # the registry's orthonormal factors come out of QR column-major: made row-major here, so that
    # exactly one operand at a time is non-contiguous
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _draw(op: str, variant: str) -> dict:
    return _contiguous(OPS[op].draw(*SHAPES.get(op, DEFAULT_SHAPE), variant=variant))


def _cases():
    for op, case in OPS.items():
        for variant in case.variants:
            inputs = _draw(op, variant)
            operands = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)] + ["dy"]
            for name in operands:
                label = f"{op}[{variant}]" if variant else op
                yield pytest.param(op, variant, name, id=f"{label}-{name}")


@contextlib.contextmanager
def kernel_arguments():
    """Records (data_ptr, shape, strides) of every tensor argument every op kernel is called with."""
    seen = set()
    kernel_for = _define.kernel_for

    def recording(op, tensors):
        kernel = kernel_for(op, tensors)

        def call(*args):
            seen.update((a.data_ptr(), tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor))
            return kernel(*args)

        return call

    _define.kernel_for = recording
    try:
        yield seen
    finally:
        _define.kernel_for = kernel_for


@pytest.mark.parametrize("op, variant, name", list(_cases()))
def test_op_honours_the_strides_of_each_operand(op, variant, name):
    case = OPS[op]
    drawn = _draw(op, variant)
    dim = 2 if name == "dy" else drawn[name].dim()
    for layout in _layouts(op, name, dim):
        values, view = LAYOUTS[layout]
        inputs = dict(drawn)
        edit_dy = None
        if name == "dy":
            def edit_dy(dy, values=values):
                dy.copy_(values(dy))
        else:
            inputs[name] = values(inputs[name])
        grads = grads_present(case, inputs)
        y64, g64 = run("torch", case.call, as64(inputs), grads, edit_dy=edit_dy)
        y32, g32 = run("torch", case.call, inputs, grads, edit_dy=edit_dy)
        for backend in BACKENDS:
            made = []

            def make(t, view=view):
                made.append(view(t))
                return made[-1]

            with kernel_arguments() as seen:
                y, g = run(backend, case.call, inputs, grads, edit_dy=edit_dy, views={name: make})
            what = f"{name} {layout} on {backend}"
            (v,) = made
            assert not v.is_contiguous(), f"{what}: the layout is contiguous"
            assert (v.data_ptr(), tuple(v.shape), v.stride()) in seen, f"{what}: no kernel got the strided tensor"
            assert_matches_reference(y, y32, y64, f"y, {what}")
            for k in grads:
                assert g[k] is not None, f"d{k}, {what}: no gradient"
                assert_matches_reference(g[k], g32[k], g64[k], f"d{k}, {what}")


# ------------------------------------------------------------------ CUDA launchers' arguments


# float32 rounding of another BLAS path (a transposed operand) differs by ~1e-6; an operand read
# through wrong strides or a wrong pointer is off by O(1)
_CLOSE = dict(rtol=1e-5, atol=1e-5)
_DTYPE_OF_CODE = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def _from_pointer(ptr: int, code: int, sizes, strides) -> torch.Tensor:
    """The tensor a C++ launcher sees in an operand tuple: element (i, j, ...) at data + Σ i·stride
    (strides in elements, csrc/launchers.h), read from the raw pointer alone (no torch metadata)."""
    dtype = _DTYPE_OF_CODE[code]
    if 0 in sizes:
        return torch.empty(sizes, dtype=dtype)
    span = 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides))
    raw = (ctypes.c_char * (span * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(raw, dtype=dtype).as_strided(sizes, strides)


def _matrix(arg) -> torch.Tensor:
    ptr, code, rows, cols, stride_row, stride_col = arg
    return _from_pointer(ptr, code, (rows, cols), (stride_row, stride_col))


def _tensor3(arg) -> torch.Tensor:
    ptr, code, sizes, strides = arg
    return _from_pointer(ptr, code, sizes, strides)


class _LaunchersOnHostMemory:
    """Stands in for `cersa_kernels._cuda`: same entry points and argument tuples; reads each
    operand through its tuple, runs the reference and writes the outputs through theirs."""

    FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2
    KERNELS = ("lowrank_fwd", "lowrank_bwd", "snell_delta")

    @staticmethod
    def lowrank_fwd_workspace_bytes(*operands):
        return 0

    @staticmethod
    def lowrank_bwd_workspace_bytes(*operands):
        return 0

    @staticmethod
    def lowrank_fwd(x, V, S, U, bias, y, h, workspace, workspace_bytes, stream):
        b = None if bias is None else _matrix(bias)[0]  # a vector travels as one row
        out_y, out_h = ref_lowrank.lowrank_fwd(_matrix(x), _matrix(V), _matrix(S), _matrix(U), b)
        _matrix(y).copy_(out_y)
        _matrix(h).copy_(out_h)

    @staticmethod
    def lowrank_bwd(dy, h, V, S, U, dx, dS, workspace, workspace_bytes, stream):
        out_dx, out_dS = ref_lowrank.lowrank_bwd(*(_matrix(t) for t in (dy, h, V, S, U)), dx is not None)
        _matrix(dS).copy_(out_dS)
        if dx is not None:
            _matrix(dx).copy_(out_dx)

    @staticmethod
    def snell_delta(A, B, coeffs, tau, out, stream):
        _matrix(out).copy_(ref_snell.snell_delta(_tensor3(A), _tensor3(B), coeffs, tau))


@pytest.fixture
def host_launchers(monkeypatch):
    fake = _LaunchersOnHostMemory()
    monkeypatch.setattr(cuda_backend, "_load", lambda: (fake, None))
    monkeypatch.setattr(cuda_backend, "_module", lambda op, tensors: fake)  # skips the CUDA-tensor check
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def _each_operand_in_each_layout(names, tensors):
    for i, name in enumerate(names):
        for layout, (values, view) in LAYOUTS.items():
            if layout == "transposed" and tensors[i].dim() < 2:
                continue
            contiguous = list(tensors)
            contiguous[i] = values(tensors[i])
            strided_args = list(contiguous)
            strided_args[i] = view(contiguous[i])
            assert not strided_args[i].is_contiguous()
            yield f"{name} {layout}", contiguous, strided_args


def test_cuda_wrappers_pass_every_operands_pointer_and_strides(host_launchers):
    """lowrank_fwd_cuda / lowrank_bwd_cuda / snell_delta_cuda on each operand in turn strided,
    transposed or expanded give exactly what the reference gives on contiguous copies: the tuples
    carry each operand's own data pointer (offset included), shape and strides."""
    gen = torch.Generator().manual_seed(5)
    lr = _contiguous(make_lowrank(37, 130, 77, 5, torch.float32, True, gen))
    fwd = (lr["x"], lr["V"], lr["S"], lr["U"], lr["bias"])
    for what, contiguous, args in _each_operand_in_each_layout(("x", "V", "S", "U", "bias"), fwd):
        expected = ref_lowrank.lowrank_fwd(*contiguous)
        for out, ref, name in zip(cuda_backend.lowrank_fwd_cuda(*args), expected, ("y", "h")):
            torch.testing.assert_close(out, ref, **_CLOSE, msg=lambda m: f"{name}, {what}: {m}")
    dy = torch.randn(37, 77, generator=gen)
    h = lr["x"] @ lr["V"]
    bwd = (dy, h, lr["V"], lr["S"], lr["U"])
    for need_dx in (True, False):
        for what, contiguous, args in _each_operand_in_each_layout(("dy", "h", "V", "S", "U"), bwd):
            expected = ref_lowrank.lowrank_bwd(*contiguous, need_dx)
            for out, ref, name in zip(cuda_backend.lowrank_bwd_cuda(*args, need_dx), expected, ("dx", "dS")):
                torch.testing.assert_close(out, ref, **_CLOSE, msg=lambda m: f"{name}, {what}: {m}")
    sn = _contiguous(make_snell(1, 45, 27, 4, torch.float32, False, gen))
    tau = float(ref_snell.snell_threshold(sn["A"], sn["B"], SNELL_COEFFS, 0.5))
    # A and B are not expanded (ties at τ, see NOT_EXPANDED): strided and transposed only
    for what, contiguous, args in _each_operand_in_each_layout(("A", "B"), (sn["A"], sn["B"])):
        if "expanded" in what:
            continue
        expected = ref_snell.snell_delta(*contiguous, SNELL_COEFFS, tau)
        torch.testing.assert_close(cuda_backend.snell_delta_cuda(*args, SNELL_COEFFS, tau), expected,
                                   **_CLOSE, msg=lambda m: f"ΔW, {what}: {m}")
