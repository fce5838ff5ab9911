"""Benchmark entry of SNELL (cersa::snell): x (W0 + ΔW_s)ᵀ + b with ΔW_s = K ⊙ sg|K| ⊙ 1[|K| > τ],
K the kernelised update of A, B, at sparsity 0.9.

Rows: `snell-<backend>` (our op on the reference and fused Triton backends; _cuda has snell_delta
only, no snell_fwd), `snell-plain` (the published recipe as plain eager autograd: materialise K,
threshold with kthvalue, the m×n K and ΔW_s exist and autograd keeps them), `lora` (an eager LoRA
of the same rank q: x W0ᵀ + b + s·(x Aᵀ)Bᵀ). On CPU the harness's allocated_bytes,
largest_allocation_bytes and mn_bytes show whether a row builds an m×n matrix.
The groups, timing and extra_info come from bench_harness.
"""
from __future__ import annotations

import math

import torch

from cersa_kernels.ops import snell_linear

from bench_harness import Baseline, BenchOp, Forward, benchmark_test

COEFFS = (0.1, -0.1)
LORA_SCALE = 2.0  # α/r with α = 2r


def make(draw, T, n, m, q):
    d = q // 2  # two kernel heads of width d
    return dict(x=draw.randn(T, n), W0=draw.uniform(1 / math.sqrt(n), m, n), bias=draw.uniform(1 / math.sqrt(n), m),
                A=draw.uniform(1 / math.sqrt(d), 2, n, d), B=draw.uniform(1 / math.sqrt(d), 2, m, d),
                lora_A=draw.uniform(1 / math.sqrt(n), q, n),
                lora_B=draw.uniform(0.01, m, q))  # not zero, so the timing has no shortcut


def flops(T, n, m, q):
    """The W0+ΔW_s GEMM; backward: dx and G = dyᵀx (the K recompute is not counted)."""
    gemm = 2 * T * n * m
    return gemm, 2 * gemm


def lora_flops(T, n, m, q):
    gemm = 2 * T * n * m
    return gemm + 2 * T * q * (n + m), gemm + 4 * T * q * (n + m)


def plain_snell(x, W0, bias, A, B, sparsity):
    """The published recipe in eager PyTorch: the m×n K and ΔW_s exist, autograd keeps them."""
    Af, Bf = A.float(), B.float()
    sq = (Bf * Bf).sum(-1)[:, :, None] + (Af * Af).sum(-1)[:, None, :] - 2 * Bf @ Af.transpose(1, 2)
    D = sq.clamp_min(0).sqrt()
    K = COEFFS[0] * D[0] + COEFFS[1] * D[1]
    mag = K.abs().detach()
    tau = torch.kthvalue(mag.flatten(), int(math.floor(sparsity * (mag.numel() - 1))) + 1).values
    delta = K * (mag * (mag > tau))
    return x @ (W0.float() + delta).to(x.dtype).T + bias


def plain(i, dims):
    return Forward(lambda: plain_snell(i["x"], i["W0"], i["bias"], i["A"], i["B"], i["sparsity"]))


def lora(i, dims):
    x, W0, bias, lora_A, lora_B = i["x"], i["W0"], i["bias"], i["lora_A"], i["lora_B"]
    return Forward(lambda: x @ W0.T + bias + LORA_SCALE * ((x @ lora_A.T) @ lora_B.T))


SNELL = BenchOp(
    op="snell", dims=("T", "n", "m", "q"),
    cpu_shapes=[(256, 512, 512, 8), (512, 768, 768, 16)],
    gpu_shapes=[(8192, 4096, 4096, 8), (8192, 4096, 4096, 32)],
    make=make, call=lambda i: snell_linear(i["x"], i["W0"], i["bias"], i["A"], i["B"], COEFFS, i["sparsity"]),
    flops=flops, grads=("x", "A", "B", "lora_A", "lora_B"),
    baselines=(Baseline("snell-plain", plain), Baseline("lora", lora, flops=lora_flops)),
    variants={"s0.9": {"sparsity": 0.9}},
)

test_snell = benchmark_test(SNELL)
