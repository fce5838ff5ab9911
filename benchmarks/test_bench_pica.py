"""Benchmark entry of the PiCa op (cersa::pica): x Wᵀ + b + (x Pᵀ) Mᵀ (PiCa over CERSA:
test_bench_pica_lowrank.py).

Rows: `pica-<backend>` (our op; no _cuda kernel), `eager` (the same math as plain autograd),
`dense` (nn.Linear alone, weight frozen, x needs grad). GPU shapes use PiCa's default rank 256.
The groups, timing and extra_info come from bench_harness.
"""
from __future__ import annotations

from cersa_kernels.ops import pica_linear

from bench_harness import DENSE, Baseline, BenchOp, Forward, benchmark_test


def make(draw, T, n, m, r):
    return dict(x=draw.randn(T, n), W=draw.randn(m, n, scale=n**-0.5), bias=draw.randn(m),
                P=draw.orthonormal(n, r).T, M=draw.randn(m, r, scale=0.01))


def flops(T, n, m, r):
    fwd = 2 * T * m * n + 2 * T * r * (n + m)
    return fwd, fwd + 2 * T * m * r  # dx (dense + branch), dM


def eager(i, dims):
    x, W, bias, P, M = i["x"], i["W"], i["bias"], i["P"], i["M"]
    return Forward(lambda: x @ W.T + bias + (x @ P.T) @ M.T)


PICA = BenchOp(
    op="pica", dims=("T", "n", "m", "r"),
    cpu_shapes=[(512, 768, 768, 64)],
    gpu_shapes=[(8192, 4096, 4096, 256)],
    make=make, call=lambda i: pica_linear(i["x"], i["W"], i["P"], i["M"], i["bias"]),
    flops=flops, grads=("x", "M"),
    baselines=(Baseline("eager", eager), DENSE),
)

test_pica = benchmark_test(PICA)
