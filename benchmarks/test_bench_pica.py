"""The PiCa op against its eager composition and a dense frozen nn.Linear; forward and
forward+backward (PiCa over CERSA: test_bench_pica_lowrank.py).

Rows: `pica-<backend>` (our op; no _cuda kernel), `eager` (x Wᵀ + b + (x Pᵀ) Mᵀ as plain autograd),
`dense` (nn.Linear alone, weight frozen, x needs grad).
GPU: LLM shapes in bf16 (PiCa's default rank 256); CPU: small shapes, float32, torch backend only.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.ops import pica_linear

from conftest import DEVICE, HAS_GPU, make_step, time_it
from op_harness import saved_bytes

if HAS_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(8192, 4096, 4096, 256)]  # (T, n, m, r)
else:
    DTYPE = torch.float32
    SHAPES = [(512, 768, 768, 64)]

DTYPE_NAME = str(DTYPE).replace("torch.", "")


def rand(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE)


def orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0].to(DEVICE, DTYPE)


def skip_unless(row, op, tensors):
    """Skip an `<op>-<backend>` row whose backend cannot run `op` for these tensors."""
    if row.startswith(op.rsplit("_", 1)[0] + "-"):
        reasons = unavailable_reasons(row.split("-", 1)[1], op, tensors)
        if reasons:
            pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["pica-torch", "pica-triton", "eager", "dense"])
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
    saved = saved_bytes(fwd, [W, bias, P, M, dense.weight, dense.bias])[0]  # x is counted where kept
    flops = 2 * T * m * n + 2 * T * r * (n + m)
    if mode != "fwd":
        flops += 2 * T * m * n + 2 * T * r * (n + m) + 2 * T * m * r  # dx (dense + branch), dM
    if row == "dense":
        flops = 2 * T * n * m * (1 if mode == "fwd" else 2)
    time_it(benchmark, make_step(fwd, mode, dy), flops,
            {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "r": r, "row": row})
