"""Shared benchmark helpers. Kernels here always run compiled (never TRITON_INTERPRET): on a CPU
machine only the torch backend and the baselines are timed, on small shapes. The test suite's
helpers (tests/: the GPU-skip rule, op_harness.saved_bytes) are shared, not copied."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("benchmarks must not run under TRITON_INTERPRET=1; unset it")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_marker import skip_gpu_items_without_a_gpu  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu_items_without_a_gpu(items)


@pytest.fixture(autouse=True)
def _seed():
    """Seed the global generators before every benchmark (each also draws from its own Generator)."""
    torch.manual_seed(0)


def synchronize() -> None:
    if HAS_GPU:
        torch.cuda.synchronize()


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
