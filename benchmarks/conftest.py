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


@pytest.fixture(autouse=True)
def _append_result(request):
    """With CERSA_BENCH_JSONL set (the GPU check's bench stage), append each finished benchmark
    (name, extra_info, stats) to that file at once, so a run killed at its time limit keeps what it
    measured; pytest-benchmark's own --benchmark-json is written only at the end."""
    yield
    path = os.environ.get("CERSA_BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if not path or stats is None:
        return
    import json

    record = {"name": request.node.name, "group": bench.group, "extra_info": dict(bench.extra_info),
              "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")}}
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
