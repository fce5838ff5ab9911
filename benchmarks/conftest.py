"""Benchmark session set-up; the harness itself is bench_harness.py (one entry per op file).
Kernels here always run compiled (never TRITON_INTERPRET): on a CPU machine only the torch backend
and the baselines are timed, on small shapes. The test suite's helpers (tests/: the GPU-skip rule,
op_harness.saved_bytes) are shared, not copied."""
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


def pytest_collection_modifyitems(config, items):
    skip_gpu_items_without_a_gpu(items)


@pytest.fixture(autouse=True)
def _seed():
    """Seed the global generators before every benchmark (nn.Linear's init in the dense rows, dropout
    masks); inputs come from bench_harness.Draw's own Generator."""
    torch.manual_seed(0)
