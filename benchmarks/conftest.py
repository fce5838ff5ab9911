"""Shared benchmark helpers. Kernels here always run compiled (never TRITON_INTERPRET): on a CPU
machine only the torch backend and the baselines are timed, on small shapes."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("benchmarks must not run under TRITON_INTERPRET=1; unset it")

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Seed the global generators before every benchmark (each also draws from its own Generator)."""
    torch.manual_seed(0)


def synchronize() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


def saved_activation_bytes(fn, own_tensors) -> int:
    """Bytes autograd keeps for one call of fn(), not counting tensors that share storage with
    `own_tensors` (weights the layer holds anyway)."""
    own = {t.untyped_storage().data_ptr() for t in own_tensors}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def make_step(fwd, mode: str, dy):
    """The timed step: `fwd()` under no_grad for mode "fwd", else `fwd().backward(dy)`."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fwd()
    else:
        def step():
            fwd().backward(dy)
    return step


def time_it(benchmark, fn, flops: float, extra: dict) -> None:
    """Benchmark fn (synchronised, warmed up: Triton compiles and autotunes outside the timed
    region) and record TFLOP/s and peak memory beside `extra`."""

    def call():
        fn()
        synchronize()

    for _ in range(2):
        call()
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    rounds = 20 if HAS_GPU else 5
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(extra)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if HAS_GPU else "cpu"
    if HAS_GPU:
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
