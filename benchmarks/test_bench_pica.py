"""The PiCa ops against their eager compositions and a dense frozen nn.Linear; forward and
forward+backward.

`test_pica` rows: `pica-<backend>` (our op), `eager` (x Wᵀ + b + (x Pᵀ) Mᵀ as plain autograd),
`dense` (nn.Linear alone, weight frozen, x needs grad).
`test_pica_on_cersa` rows: `fused-<backend>` (cersa::pica_lowrank: one op, the branch reuses
h = x·V), `unfused` (the CERSA op plus a separate PiCa branch projecting x again: saves x·V_r beside h).
GPU: LLM shapes in bf16 (PiCa's default rank 256); CPU: small shapes, float32, torch backend only.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.ops import lowrank_linear, pica_linear, pica_lowrank_linear

from conftest import DEVICE, HAS_GPU, make_step, saved_activation_bytes, time_it

if HAS_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(8192, 4096, 4096, 256)]  # (T, n, m, r)
    CERSA_SHAPES = [(8192, 4096, 4096, 1024, 256)]  # (T, n, m, k, r)
else:
    DTYPE = torch.float32
    SHAPES = [(512, 768, 768, 64)]
    CERSA_SHAPES = [(512, 768, 768, 192, 64)]

DTYPE_NAME = str(DTYPE).replace("torch.", "")


def rand(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE)


def orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0].to(DEVICE, DTYPE)


def skip_unless(row, op, tensors):
    if "-" in row and row.split("-", 1)[0] in ("pica", "fused"):
        reasons = unavailable_reasons(row.split("-", 1)[1], op, tensors)
        if reasons:
            pytest.skip("; ".join(reasons))


def step_for(fwd, mode, dy):
    step = make_step(fwd, mode, dy)
    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["pica-torch", "pica-triton", "pica-cuda", "eager", "dense"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_n{}_m{}_r{}".format(*s))
def test_pica(benchmark, shape, row, mode):
    T, n, m, r = shape
    g = torch.Generator().manual_seed(0)
    x, W, bias = rand(T, n, g=g).requires_grad_(True), rand(m, n, g=g) / n**0.5, rand(m, g=g)
    P, M, dy = orthonormal(n, r, g).T, (rand(m, r, g=g) * 0.01).requires_grad_(True), rand(T, m, g=g)
    skip_unless(row, "pica_fwd", [x, W, bias, P, M])
    if row.startswith("pica-"):
        def fwd():
            with use_backend(row.split("-", 1)[1]):
                return pica_linear(x, W, P, M, bias)
    elif row == "eager":
        def fwd():
            return x @ W.T + bias + (x @ P.T) @ M.T
    dense = nn.Linear(n, m, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    if row == "dense":
        fwd = lambda: dense(x)  # noqa: E731
    benchmark.group = f"pica T{T} n{n} m{m} r{r} {DTYPE_NAME} {mode}"
    saved = saved_activation_bytes(fwd, [W, bias, P, M, dense.weight, dense.bias])  # x is counted where kept
    flops = 2 * T * m * n + 2 * T * r * (n + m)
    if mode != "fwd":
        flops += 2 * T * m * n + 2 * T * r * (n + m) + 2 * T * m * r  # dx (dense + branch), dM
    if row == "dense":
        flops = 2 * T * n * m * (1 if mode == "fwd" else 2)
    time_it(benchmark, step_for(fwd, mode, dy), flops,
            {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "r": r, "row": row})


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["fused-torch", "fused-triton", "fused-cuda", "unfused"])
@pytest.mark.parametrize("shape", CERSA_SHAPES, ids=lambda s: "T{}_n{}_m{}_k{}_r{}".format(*s))
def test_pica_on_cersa(benchmark, shape, row, mode):
    T, n, m, k, r = shape
    g = torch.Generator().manual_seed(0)
    x, V, U = rand(T, n, g=g).requires_grad_(True), orthonormal(n, k, g), orthonormal(m, k, g)
    S, M = rand(k, k, g=g).requires_grad_(True), (rand(m, r, g=g) * 0.01).requires_grad_(True)
    bias, dy = rand(m, g=g), rand(T, m, g=g)
    skip_unless(row, "pica_lowrank_fwd", [x, V, S, U, M, bias])
    if row.startswith("fused-"):
        def fwd():
            with use_backend(row.split("-", 1)[1]):
                return pica_lowrank_linear(x, V, S, U, M, bias)
    else:
        Vr = V[:, :r]

        def fwd():
            return lowrank_linear(x, V, S, U, bias) + (x @ Vr) @ M.T
    benchmark.group = f"pica-on-cersa T{T} n{n} m{m} k{k} r{r} {DTYPE_NAME} {mode}"
    saved = saved_activation_bytes(fwd, [V, S, U, M, bias])
    flops = 2 * T * k * (n + m) + 2 * m * k * k
    if mode != "fwd":
        flops += 2 * T * (k + r) * (m + n) + 2 * T * k * k + 2 * T * m * r + 2 * n * k * k
    time_it(benchmark, step_for(fwd, mode, dy), flops,
            {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "k": k, "r": r, "row": row})
