"""The one benchmark harness: every `benchmarks/test_bench_<op>.py` declares a `BenchOp` entry and
gets its test from `benchmark_test(entry)`; adding an op's benchmark means adding one entry.

From an entry the harness generates one pytest-benchmark group per (op, shape, variant, dtype,
mode ∈ fwd/bwd/fwd+bwd) with one row per backend that has a kernel for the op (`<op>-<backend>`,
skipped where that backend cannot run these tensors) and one per baseline, and fills
`benchmark.extra_info` the same way for every row:

    op, row, mode, dtype, device, shape ({dim: size}) and each dim at the top level (T, n, m, ...),
    the variant's parameters (e.g. p, sparsity), tflops, saved_activation_bytes (what autograd keeps
    for one forward, beside the weights), and
    GPU: peak_memory_bytes (torch.cuda.max_memory_allocated), bf16_matmul_peak_tflops (measured once
         per session) and fraction_of_bf16_peak;
    CPU: allocated_bytes / largest_allocation_bytes / peak_bytes (the most of them alive at once)
         of one timed step (compare.measure.LiveTensorTracker, an AllocationRecorder) and
         mn_bytes (one m×n matrix in this dtype, the size a dense ΔW would take).

Shapes: `cpu_shapes` run on whatever device is present (CPU float32; on a GPU in its dtypes);
`gpu_shapes` (LLM sizes) are marked `gpu` and skip cleanly without one. Timing: each step ends with
a synchronise, runs twice plus one warm-up round before the timed rounds (Triton compiles and
autotunes outside the timed region); mode "bwd" runs the forward in the untimed setup of each round.
Kernels here always run compiled: benchmarks never run under TRITON_INTERPRET (see conftest.py).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import pytest
import torch
from torch import nn

from cersa_kernels.compare.measure import LiveTensorTracker
from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.quant import QuantizedTensor

from op_harness import saved_bytes

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
MODES = ("fwd", "bwd", "fwd+bwd")
GPU_ROUNDS, CPU_ROUNDS = 20, 5


class Forward(NamedTuple):
    """A row's forward `fn() -> y` and the tensors it created that are weights (not saved bytes)."""

    fn: Callable[[], torch.Tensor]
    weights: tuple = ()


@dataclass(frozen=True)
class Baseline:
    """A comparison row. `build(inputs, dims) -> Forward`; `flops(**dims) -> (fwd, bwd)` when its
    work differs from the op's; `applies(variant) -> bool` for the variants it is measured on."""

    name: str
    build: Callable[[dict, dict], Forward]
    flops: Optional[Callable[..., tuple]] = None
    applies: Callable[[dict], bool] = lambda variant: True


@dataclass(frozen=True)
class BenchOp:
    """One op's benchmark entry.

    op: the op's name (`<op>_fwd` is what a backend must implement; rows `<op>-<backend>`).
    dims: the names of a shape's sizes, e.g. ("T", "n", "m", "k"); every op has T (tokens) and m
        (output features), which size the upstream gradient dy.
    cpu_shapes / gpu_shapes: tuples of sizes in `dims` order.
    make(draw, **dims) -> {name: tensor or value}: float32 CPU tensors drawn with `draw` (a `Draw`);
        the harness moves them to the device, casts floating ones to the dtype and sets
        requires_grad on `grads`.
    call(inputs) -> y: the public op (run under `use_backend` for each `<op>-<backend>` row).
    flops(**dims) -> (forward FLOPs, backward FLOPs) of the op's math.
    backends: the backends with a kernel for the op.
    baselines: the comparison rows (`Baseline`), e.g. `DENSE`.
    variants: {label: parameters}, each merged into the inputs (label "" for none); the label joins
        the group name, e.g. "p0.1".
    activations: the inputs counted in saved bytes when autograd keeps them; every other input is
        a weight (frozen or trained), never counted.
    cpu_dtypes / gpu_dtypes: the dtypes benchmarked on each kind of machine.
    prepare(inputs) -> inputs: runs after the inputs are on the device in the dtype (e.g. quantizes
        a frozen weight into a `QuantizedTensor`, whose codes and absmax count as weights).
    extra(inputs, dims, row, mode) -> dict: more extra_info for a row (e.g. operand and read bytes).
    """

    op: str
    dims: tuple
    cpu_shapes: list
    gpu_shapes: list
    make: Callable[..., dict]
    call: Callable[[dict], torch.Tensor]
    flops: Callable[..., tuple]
    grads: tuple
    backends: tuple = ("torch", "triton")
    baselines: tuple = ()
    variants: dict = field(default_factory=lambda: {"": {}})
    activations: tuple = ("x",)
    cpu_dtypes: tuple = (torch.float32,)
    gpu_dtypes: tuple = (torch.bfloat16,)
    prepare: Optional[Callable[[dict], dict]] = None
    extra: Optional[Callable[[dict, dict, str, str], dict]] = None


class Draw:
    """Seeded float32 CPU draws for an entry's `make` (one Generator per benchmark item)."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def uniform(self, bound: float, *shape) -> torch.Tensor:
        """Uniform in [-bound, bound), as kaiming-style initialisers draw."""
        return (torch.rand(*shape, generator=self.gen) * 2 - 1) * bound

    def orthonormal(self, rows: int, cols: int) -> torch.Tensor:
        """rows × cols with orthonormal columns (cols ≤ rows)."""
        return torch.linalg.qr(torch.randn(rows, cols, generator=self.gen))[0]


def dense_flops(T, n, m, **_):
    """x Wᵀ forward, and dx = dy W backward (the weight is frozen)."""
    return 2 * T * n * m, 2 * T * n * m


def _dense(inputs, dims):
    layer = nn.Linear(dims["n"], dims["m"], device=DEVICE, dtype=inputs["x"].dtype).requires_grad_(False)
    x = inputs["x"]
    return Forward(lambda: layer(x), (layer.weight, layer.bias))


DENSE = Baseline("dense", _dense, flops=dense_flops)  # nn.Linear of the same shape, weight frozen, x needs grad


def synchronize() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=1)
def bf16_matmul_peak_tflops(size: int = 8192, iters: int = 20) -> float:
    """The measured bf16 matmul throughput of this GPU (size³ GEMMs, warmed up, synchronised)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 * iters / seconds / 1e12


def make_step(fwd: Callable, mode: str, dy: torch.Tensor):
    """(setup, timed) for a mode: `setup()` runs untimed and returns the argument of `timed(arg)`.
    fwd: the forward under no_grad; bwd: the forward in setup, `y.backward(dy)` timed; fwd+bwd: both."""

    def no_setup():
        return None

    if mode == "fwd":
        def timed(_):
            with torch.no_grad():
                fwd()
        return no_setup, timed
    if mode == "bwd":
        def forward_untimed():
            y = fwd()
            synchronize()
            return y

        def timed(y):
            y.backward(dy)
        return forward_untimed, timed
    if mode == "fwd+bwd":
        def timed(_):
            fwd().backward(dy)
        return no_setup, timed
    raise ValueError(f"make_step: mode must be one of {MODES}, got {mode!r}")


def time_step(benchmark, setup: Callable, timed: Callable) -> None:
    """Benchmark `timed(setup())`, synchronised, warmed up outside the timed region."""

    def call(arg):
        timed(arg)
        synchronize()

    for _ in range(2):
        call(setup())
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, setup=lambda: ((setup(),), {}), rounds=GPU_ROUNDS if HAS_GPU else CPU_ROUNDS,
                       iterations=1, warmup_rounds=1)


class Case(NamedTuple):
    shape: tuple
    variant: str
    dtype: torch.dtype
    row: str
    mode: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rows(entry: BenchOp) -> list:
    return [f"{entry.op}-{b}" for b in entry.backends] + [b.name for b in entry.baselines]


def _cases(entry: BenchOp) -> list:
    """Every (shape, variant, dtype, row, mode) of the entry as pytest params; GPU shapes marked gpu."""
    dtypes = entry.gpu_dtypes if HAS_GPU else entry.cpu_dtypes
    baselines = {b.name: b for b in entry.baselines}
    params = []
    for shapes, marks in ((entry.cpu_shapes, ()), (entry.gpu_shapes, (pytest.mark.gpu,))):
        for shape, (label, variant), dtype, row, mode in itertools.product(
                shapes, entry.variants.items(), dtypes, _rows(entry), MODES):
            if row in baselines and not baselines[row].applies(variant):
                continue
            ident = "-".join([*(f"{d}{s}" for d, s in zip(entry.dims, shape))] + ([label] if label else [])
                             + [_dtype_name(dtype), row, mode])
            params.append(pytest.param(Case(tuple(shape), label, dtype, row, mode), id=ident, marks=marks))
    return params


def _inputs(entry: BenchOp, dims: dict, variant: dict, dtype: torch.dtype) -> dict:
    inputs = {}
    for name, value in entry.make(Draw(0), **dims).items():
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE, dtype) if value.is_floating_point() else value.to(DEVICE)
            if name in entry.grads:
                value.requires_grad_(True)
        inputs[name] = value
    inputs.update(variant)
    return entry.prepare(inputs) if entry.prepare else inputs


def _op_forward(entry: BenchOp, backend: str, inputs: dict) -> Forward:
    tensors = [t for t in inputs.values()
               if (isinstance(t, torch.Tensor) and t.is_floating_point()) or isinstance(t, QuantizedTensor)]
    reasons = unavailable_reasons(backend, f"{entry.op}_fwd", tensors)
    if reasons:
        pytest.skip("; ".join(reasons))

    def fn():
        with use_backend(backend):
            return entry.call(inputs)

    return Forward(fn)


def run_case(entry: BenchOp, benchmark, case: Case) -> None:
    """Measure one row of one group and fill its extra_info."""
    dims = dict(zip(entry.dims, case.shape))
    variant = entry.variants[case.variant]
    inputs = _inputs(entry, dims, variant, case.dtype)
    baseline = next((b for b in entry.baselines if b.name == case.row), None)
    forward = baseline.build(inputs, dims) if baseline else _op_forward(entry, case.row.split("-", 1)[1], inputs)
    dy = Draw(1).randn(dims["T"], dims["m"]).to(DEVICE, case.dtype)

    benchmark.group = " ".join([entry.op, *(f"{d}{s}" for d, s in dims.items())] + ([case.variant] if case.variant else [])
                               + [_dtype_name(case.dtype), case.mode])
    weights = [t for name, t in inputs.items() if isinstance(t, torch.Tensor) and name not in entry.activations]
    weights += [t for q in inputs.values() if isinstance(q, QuantizedTensor) for t in (q.data, q.absmax)]
    saved = saved_bytes(forward.fn, weights + list(forward.weights))[0]
    fwd_flops, bwd_flops = (baseline.flops if baseline and baseline.flops else entry.flops)(**dims)
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "fwd+bwd": fwd_flops + bwd_flops}[case.mode]
    setup, timed = make_step(forward.fn, case.mode, dy)

    info = dict(op=entry.op, row=case.row, mode=case.mode, dtype=_dtype_name(case.dtype),
                device=torch.cuda.get_device_name() if HAS_GPU else "cpu", shape=dims, **dims, **variant,
                saved_activation_bytes=saved, **(entry.extra(inputs, dims, case.row, case.mode) if entry.extra else {}))
    if HAS_GPU:
        info["bf16_matmul_peak_tflops"] = bf16_matmul_peak_tflops()
    else:  # no allocator statistics on CPU: count what one step allocates instead
        arg = setup()
        with LiveTensorTracker(0) as rec:
            timed(arg)
        info["allocated_bytes"] = rec.total_bytes()
        info["peak_bytes"] = rec.peak_bytes
        info["largest_allocation_bytes"] = rec.largest().nbytes if rec.allocations else 0
        info["mn_bytes"] = dims["m"] * dims["n"] * inputs["x"].element_size()

    time_step(benchmark, setup, timed)
    info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    if HAS_GPU:
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        info["fraction_of_bf16_peak"] = info["tflops"] / info["bf16_matmul_peak_tflops"]
    benchmark.extra_info.update(info)


def benchmark_test(entry: BenchOp) -> Callable:
    """The parametrised test for an entry: assign it to `test_<op>` in the op's benchmark file."""
    rows = _rows(entry)
    if len(set(rows)) != len(rows):
        raise ValueError(f"benchmark entry {entry.op}: row names must be unique, got {rows}")

    @pytest.mark.parametrize("case", _cases(entry))
    def test(benchmark, case):
        run_case(entry, benchmark, case)

    test.__name__ = f"test_{entry.op}"
    return test
