"""Benchmark entry of PiCa over CERSA (cersa::pica_lowrank): the branch reuses h = x·V.

Rows: `pica_lowrank-<backend>` (one op; no _cuda kernel), `unfused` (the CERSA op plus a separate
PiCa branch projecting x again: saves x·V_r beside h). GPU shapes use PiCa's default rank 256.
The groups, timing and extra_info come from bench_harness.
"""
from __future__ import annotations

from cersa_kernels.ops import lowrank_linear, pica_lowrank_linear

from bench_harness import Baseline, BenchOp, Forward, benchmark_test


def make(draw, T, n, m, k, r):
    return dict(x=draw.randn(T, n), V=draw.orthonormal(n, k), U=draw.orthonormal(m, k), S=draw.randn(k, k),
                M=draw.randn(m, r, scale=0.01), bias=draw.randn(m))


def flops(T, n, m, k, r):
    fwd = 2 * T * k * (n + m) + 2 * m * k * k
    bwd = 2 * T * (k + r) * (m + n) + 2 * T * k * k + 2 * T * m * r + 2 * n * k * k
    return fwd, bwd


def unfused(i, dims):
    x, V, S, U, M, bias = i["x"], i["V"], i["S"], i["U"], i["M"], i["bias"]
    Vr = V[:, : dims["r"]]
    return Forward(lambda: lowrank_linear(x, V, S, U, bias) + (x @ Vr) @ M.T)


PICA_LOWRANK = BenchOp(
    op="pica_lowrank", dims=("T", "n", "m", "k", "r"),
    cpu_shapes=[(512, 768, 768, 192, 64)],
    gpu_shapes=[(8192, 4096, 4096, 1024, 256)],
    make=make, call=lambda i: pica_lowrank_linear(i["x"], i["V"], i["S"], i["U"], i["M"], i["bias"]),
    flops=flops, grads=("x", "S", "M"),
    baselines=(Baseline("unfused", unfused),),
)

test_pica_lowrank = benchmark_test(PICA_LOWRANK)
