"""Benchmarks of `decompose` (issue 19 item 5): the energy rule (α = 0.95) on weights with a decaying
spectrum (σ_i ∝ i^-0.75, as trained layers have; k ≪ d/4), and at a fixed rank k = d/4.

Rows per group (shape, rule): `decompose-exact` (svd="exact": the full SVD, today's path before the
sketch), `decompose-auto` (the default: the seeded sketch when k ≤ d/4), and the anchor
`svd_lowrank` (torch.svd_lowrank at q = d/4, niter = 2). extra_info: k, method, peak_bytes (the
most tensor bytes alive at once during one call, LiveTensorTracker; LAPACK's workspace is not a
tensor and is not counted), mn_bytes (the weight). CPU shapes are small; the LLM shapes are
marked gpu. Whole-conversion time and RSS: benchmarks/measure_conversion.py.
"""
from __future__ import annotations

import pytest
import torch

from cersa_kernels import decompose
from cersa_kernels.compare.measure import LiveTensorTracker

from bench_harness import CPU_ROUNDS, DEVICE, GPU_ROUNDS, HAS_GPU, synchronize

CPU_SHAPES = [(1024, 1024), (2752, 1024)]
GPU_SHAPES = [(4096, 4096), (11008, 4096)]
ROWS = ("decompose-exact", "decompose-auto", "svd_lowrank")
RULES = ("energy0.95", "rank-d/4")


def decaying(m: int, n: int) -> torch.Tensor:
    """(m, n) float32 with a power-law spectrum: G₁ diag(i^-0.75) G₂ᵀ / √r, seeded."""
    g = torch.Generator().manual_seed(0)
    r = min(m, n)
    left = torch.randn(m, r, generator=g) * torch.arange(1, r + 1, dtype=torch.float32) ** -0.75
    return (left @ torch.randn(n, r, generator=g).T / r**0.5).to(DEVICE)


def call(row: str, rule: str, w: torch.Tensor):
    d = min(w.shape)
    if row == "svd_lowrank":
        return lambda: torch.svd_lowrank(w, q=d // 4, niter=2)
    options = dict(energy=0.95) if rule == "energy0.95" else dict(rank=d // 4)
    return lambda: decompose(w, svd=row.split("-")[1], **options)


def _cases():
    for shapes, marks in ((CPU_SHAPES, ()), (GPU_SHAPES, (pytest.mark.gpu,))):
        for (m, n) in shapes:
            for rule in RULES:
                for row in ROWS:
                    if row == "svd_lowrank" and rule != "rank-d/4":
                        continue  # the anchor has no energy rule; it sits in the fixed-rank group
                    yield pytest.param(m, n, rule, row, id=f"m{m}-n{n}-{rule}-{row}", marks=marks)


@pytest.mark.parametrize("m, n, rule, row", list(_cases()))
def test_decompose(benchmark, m, n, rule, row):
    w = decaying(m, n)
    fn = call(row, rule, w)
    benchmark.group = f"decompose m{m} n{n} {rule} float32"
    result = fn()  # warm-up, and what extra_info reports
    info = dict(op="decompose", row=row, rule=rule, m=m, n=n, shape=dict(m=m, n=n),
                device=torch.cuda.get_device_name() if HAS_GPU else "cpu",
                mn_bytes=w.numel() * w.element_size())
    if row == "svd_lowrank":
        info.update(k=result[1].numel(), method="randomized")
    else:
        info.update(k=result.rank, energy_rank=result.energy_rank, method=result.method,
                    energy_kept=result.energy_kept)
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    else:
        with LiveTensorTracker(0) as tracker:
            fn()
        info["peak_bytes"] = tracker.peak_bytes

    def timed():
        fn()
        synchronize()

    benchmark.pedantic(timed, rounds=GPU_ROUNDS if HAS_GPU else CPU_ROUNDS // 2 + 1, iterations=1, warmup_rounds=0)
    if HAS_GPU:
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    benchmark.extra_info.update(info)
