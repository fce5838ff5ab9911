"""SNELL: our custom op (reference and fused Triton backends) against the published recipe written as
plain eager autograd, and against a plain eager LoRA of the same rank; forward and forward+backward.

Rows per group: `snell-<backend>` (cersa::snell_* on that backend), `snell-plain` (materialise K,
threshold with kthvalue, ΔW_s = K·sg|K|·mask, x(W0+ΔW_s)ᵀ, autograd saves what it needs),
`lora` (x W0ᵀ + b + s·(x Aᵀ)Bᵀ, eager). extra_info: time, saved activation bytes and, for memory,
`peak_memory_bytes` (GPU: torch.cuda.max_memory_allocated) or on CPU the bytes of every tensor
the call allocates (`allocated_bytes`) and its largest single allocation
(`largest_allocation_bytes`), recorded with cersa_kernels._alloc.AllocationRecorder.
CPU: small shapes in float32 (the Triton row skips: no GPU, and benchmarks never interpret);
GPU: d = 4096, T = 8192 in bf16, marked `gpu`.
"""
from __future__ import annotations

import math

import pytest
import torch

from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.ops import snell_linear

from conftest import DEVICE, HAS_GPU, make_step, time_it
from op_harness import saved_bytes

COEFFS = (0.1, -0.1)
SPARSITY = 0.9
ROWS = ["snell-torch", "snell-triton", "snell-plain", "lora"]  # _cuda has snell_delta only, no snell_fwd
CPU_SHAPES = [(256, 512, 512, 8), (512, 768, 768, 16)]  # (T, n, m, q)
GPU_SHAPES = [(8192, 4096, 4096, 8), (8192, 4096, 4096, 32)]
SHAPES = [pytest.param(s, id="T{}_n{}_m{}_q{}".format(*s)) for s in CPU_SHAPES] + [
    pytest.param(s, id="T{}_n{}_m{}_q{}".format(*s), marks=pytest.mark.gpu) for s in GPU_SHAPES
]


def make(T, n, m, q, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    d = q // 2
    uni = lambda bound, *s: ((torch.rand(*s, generator=g) * 2 - 1) * bound).to(DEVICE, dtype)  # noqa: E731
    W0 = uni(1 / math.sqrt(n), m, n)
    bias = uni(1 / math.sqrt(n), m)
    A = uni(1 / math.sqrt(d), 2, n, d).requires_grad_(True)
    B = uni(1 / math.sqrt(d), 2, m, d).requires_grad_(True)
    lora_A = uni(1 / math.sqrt(n), q, n).requires_grad_(True)
    lora_B = uni(0.01, m, q).requires_grad_(True)  # not zero, so the timing has no shortcut
    x = torch.randn(T, n, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(T, m, generator=g).to(DEVICE, dtype)
    return x, W0, bias, A, B, lora_A, lora_B, dy


def plain_snell(x, W0, bias, A, B):
    """The published recipe in eager PyTorch: the m×n K and ΔW_s exist, autograd keeps them."""
    Af, Bf = A.float(), B.float()
    sq = (Bf * Bf).sum(-1)[:, :, None] + (Af * Af).sum(-1)[:, None, :] - 2 * Bf @ Af.transpose(1, 2)
    D = sq.clamp_min(0).sqrt()
    K = COEFFS[0] * D[0] + COEFFS[1] * D[1]
    mag = K.abs().detach()
    tau = torch.kthvalue(mag.flatten(), int(math.floor(SPARSITY * (mag.numel() - 1))) + 1).values
    delta = K * (mag * (mag > tau))
    return x @ (W0.float() + delta).to(x.dtype).T + bias


def forward_fn(row, x, W0, bias, A, B, lora_A, lora_B):
    if row.startswith("snell-") and row != "snell-plain":
        backend = row.split("-", 1)[1]

        def run():
            with use_backend(backend):
                return snell_linear(x, W0, bias, A, B, COEFFS, SPARSITY)

        return run
    if row == "snell-plain":
        return lambda: plain_snell(x, W0, bias, A, B)
    scale = 2.0  # α/r with α = 2r
    return lambda: x @ W0.T + bias + scale * ((x @ lora_A.T) @ lora_B.T)


def flops(T, n, m, q, row, mode):
    gemm = 2 * T * n * m
    if row == "lora":
        fwd, bwd = gemm + 2 * T * q * (n + m), gemm + 4 * T * q * (n + m)
    else:  # W0+ΔW_s GEMM; backward: dx and G = dyᵀx (the K recompute is not counted)
        fwd, bwd = gemm, 2 * gemm
    return fwd if mode == "fwd" else fwd + bwd


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_snell(benchmark, shape, row, mode):
    T, n, m, q = shape
    dtype = torch.bfloat16 if HAS_GPU else torch.float32
    x, W0, bias, A, B, lora_A, lora_B, dy = make(*shape, dtype)
    if row in ("snell-torch", "snell-triton"):
        reasons = unavailable_reasons(row.split("-", 1)[1], "snell_fwd", [x, W0, A, B])
        if reasons:
            pytest.skip("; ".join(reasons))
    fwd = forward_fn(row, x, W0, bias, A, B, lora_A, lora_B)
    benchmark.group = f"snell T{T} n{n} m{m} q{q} s{SPARSITY} {str(dtype).replace('torch.', '')} {mode}"
    saved = saved_bytes(fwd, [W0, bias, A, B, lora_A, lora_B])[0]  # x counts: it is the activation
    step = make_step(fwd, mode, dy)
    extra = {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "q": q, "row": row, "sparsity": SPARSITY}
    if not HAS_GPU:  # CPU: no allocator statistics; count what the call allocates instead
        with AllocationRecorder() as rec:
            step()
        extra["allocated_bytes"] = rec.total_bytes()
        extra["largest_allocation_bytes"] = rec.largest().nbytes
        extra["mn_bytes"] = m * n * x.element_size()
    time_it(benchmark, step, flops(T, n, m, q, row, mode), extra)
