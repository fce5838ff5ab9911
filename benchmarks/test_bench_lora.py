"""Benchmark entry of the LoRA op (cersa::lora): x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, dropout p = 0 and 0.1.

Rows: `lora-<backend>` (our op; no _cuda kernel), `peft-style` (frozen nn.Linear + dropout + the
two low-rank matmuls as PEFT builds them: autograd saves x, the dropped x and x·Aᵀ), `dense`
(nn.Linear alone, weight frozen, x needs grad; p = 0 only: it has no dropout).
The groups, timing and extra_info come from bench_harness.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cersa_kernels.ops import lora_linear

from bench_harness import DENSE, DEVICE, Baseline, BenchOp, Forward, benchmark_test

ALPHA = 32.0


def make(draw, T, n, m, r):
    return dict(x=draw.randn(T, n), W=draw.randn(m, n, scale=n**-0.5), bias=draw.randn(m),
                A=draw.randn(r, n, scale=n**-0.5), B=draw.randn(m, r, scale=0.01), seed=torch.tensor(1))


def flops(T, n, m, r):
    fwd = 2 * T * m * n + 2 * T * r * (n + m)
    bwd = 2 * T * m * n + 4 * T * r * (n + m)  # dx (dense + low-rank), dA, dB
    return fwd, bwd


def peft_style(i, dims):
    x, A, B, p = i["x"], i["A"], i["B"], i["p"]
    base = nn.Linear(dims["n"], dims["m"], device=DEVICE, dtype=x.dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(i["W"])
        base.bias.copy_(i["bias"])
    drop = nn.Dropout(p) if p > 0 else nn.Identity()
    scale = ALPHA / A.shape[0]
    return Forward(lambda: base(x) + (drop(x) @ A.T) @ B.T * scale, (base.weight, base.bias))


LORA = BenchOp(
    op="lora", dims=("T", "n", "m", "r"),
    cpu_shapes=[(512, 768, 768, 16), (1024, 1024, 1024, 16)],
    gpu_shapes=[(8192, 4096, 4096, r) for r in (16, 64)],
    make=make,
    call=lambda i: lora_linear(i["x"], i["W"], i["A"], i["B"], i["bias"], ALPHA / i["A"].shape[0], i["p"], i["seed"]),
    flops=flops, grads=("x", "A", "B"),
    baselines=(Baseline("peft-style", peft_style), dataclasses.replace(DENSE, applies=lambda v: v["p"] == 0)),
    variants={f"p{p}": {"p": p} for p in (0.0, 0.1)},
    activations=("x", "seed"),  # the op keeps the 8-byte seed to regenerate the dropout mask
)

test_lora = benchmark_test(LORA)
