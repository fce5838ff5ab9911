"""Benchmark entry of the CERSA low-rank op (cersa::lowrank): x V Sᵀ Uᵀ + b.

Rows: `lowrank-<backend>` (our op on torch, triton and the compiled `_cuda` kernel), `eager` (the
same math as plain autograd, S applied to the T×k activation), `eager-folded` (the same with S
folded into U, as users write `x @ V @ (U @ S).T`), `dense` (nn.Linear of the same shape, weight
frozen, x needs grad). The torch reference folds S on the side where it pays (m < T forward,
n < T for dx): at T = 512 it should track `eager`, at T = 8192 `eager-folded`.
The groups, timing and extra_info come from bench_harness.
"""
from __future__ import annotations

from cersa_kernels.ops import lowrank_linear

from bench_harness import DENSE, Baseline, BenchOp, Forward, benchmark_test


def make(draw, T, n, m, k):
    return dict(x=draw.randn(T, n), V=draw.orthonormal(n, k), S=draw.randn(k, k), U=draw.orthonormal(m, k),
                bias=draw.randn(m))


def flops(T, n, m, k):
    fwd = 2 * T * k * (n + m) + 2 * m * k * k  # h, y, and folding S into U
    bwd = 2 * T * k * (n + m) + 2 * T * k * k + 2 * n * k * k  # g, dx, dS, S folded into Vᵀ
    return fwd, bwd


def eager(i, dims):
    x, V, S, U, bias = i["x"], i["V"], i["S"], i["U"], i["bias"]
    return Forward(lambda: ((x @ V) @ S.T) @ U.T + bias)


def eager_folded(i, dims):
    x, V, S, U, bias = i["x"], i["V"], i["S"], i["U"], i["bias"]
    return Forward(lambda: (x @ V) @ (U @ S).T + bias)


LOWRANK = BenchOp(
    op="lowrank", dims=("T", "n", "m", "k"),
    cpu_shapes=[(512, 768, 768, 192), (512, 768, 768, 384), (8192, 768, 768, 192)],
    gpu_shapes=[(8192, 4096, 4096, k) for k in (256, 1024, 2048)],
    make=make, call=lambda i: lowrank_linear(i["x"], i["V"], i["S"], i["U"], i["bias"]),
    flops=flops, grads=("x", "S"), backends=("torch", "triton", "cuda"),
    baselines=(Baseline("eager", eager), Baseline("eager-folded", eager_folded), DENSE),
)

test_lowrank = benchmark_test(LOWRANK)
