"""The CERSA low-rank op against the torch eager composition of the same math and against a dense
nn.Linear of the same shape; forward and forward+backward.

Rows per group: `lowrank-<backend>` (our custom op on the torch and triton backends, and the
compiled `_cuda` kernel), `eager` (the same
math as plain autograd: saves x and intermediates), `dense` (nn.Linear, weight frozen, x needs
grad). GPU: LLM shapes in bf16; CPU: small shapes, float32.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.ops import lowrank_linear

from conftest import DEVICE, HAS_GPU, make_step, time_it
from op_harness import saved_bytes

if HAS_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(8192, 4096, 4096, k) for k in (256, 1024, 2048)]  # (T, n, m, k)
else:
    DTYPE = torch.float32
    SHAPES = [(512, 768, 768, 192), (512, 768, 768, 384)]

ROWS = ["lowrank-torch", "lowrank-triton", "lowrank-cuda", "eager", "dense"]


def make(T, n, m, k):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE)  # noqa: E731
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0].to(DEVICE, DTYPE)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0].to(DEVICE, DTYPE)
    S = rand(k, k).requires_grad_(True)
    bias = rand(m)
    x = rand(T, n).requires_grad_(True)
    dy = rand(T, m)
    return x, V, S, U, bias, dy


def flops(T, n, m, k, mode):
    fwd = 2 * T * k * (n + m) + 2 * m * k * k  # h, y, and folding S into U
    bwd = 2 * T * k * (n + m) + 2 * T * k * k + 2 * n * k * k  # g, dx, dS, S folded into Vᵀ
    return fwd if mode == "fwd" else fwd + bwd


def forward_fn(row, x, V, S, U, bias, dense):
    if row.startswith("lowrank-"):
        backend = row.split("-", 1)[1]

        def run():
            with use_backend(backend):
                return lowrank_linear(x, V, S, U, bias)

        return run
    if row == "eager":
        return lambda: ((x @ V) @ S.T) @ U.T + bias
    return lambda: dense(x)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_n{}_m{}_k{}".format(*s))
def test_lowrank(benchmark, shape, row, mode):
    T, n, m, k = shape
    x, V, S, U, bias, dy = make(*shape)
    if row.startswith("lowrank-"):
        reasons = unavailable_reasons(row.split("-", 1)[1], "lowrank_fwd", [x, V, S, U])
        if reasons:
            pytest.skip("; ".join(reasons))
    dense = nn.Linear(n, m, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    fwd = forward_fn(row, x, V, S, U, bias, dense)
    benchmark.group = f"lowrank T{T} n{n} m{m} k{k} {str(DTYPE).replace('torch.', '')} {mode}"
    saved = saved_bytes(fwd, [x, V, S, U, bias, dense.weight, dense.bias])[0]
    step = make_step(fwd, mode, dy)
    work = 2 * T * n * m * (1 if mode == "fwd" else 2) if row == "dense" else flops(T, n, m, k, mode)
    info = dict(op="lowrank", row=row, mode=mode, dtype=str(DTYPE).replace("torch.", ""), T=T, n=n, m=m, k=k)
    time_it(benchmark, step, work, {"saved_activation_bytes": saved, **info})
