"""The LoRA op against the PEFT-style eager composition and a dense frozen nn.Linear; forward and
forward+backward.

Rows per group: `lora-<backend>` (our custom op on each available backend), `peft-style` (frozen
nn.Linear + dropout + lora_A/lora_B nn.Linear modules as PEFT builds them: autograd saves x, the
dropped x and x·Aᵀ), `dense` (nn.Linear alone, weight frozen, x needs grad). GPU: LLM shapes in
bf16; CPU: a small shape, float32, torch backend only.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cersa_kernels.backends import unavailable_reasons, use_backend
from cersa_kernels.ops import lora_linear

from conftest import DEVICE, HAS_GPU, make_step, time_it
from op_harness import saved_bytes

if HAS_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(8192, 4096, 4096, r) for r in (16, 64)]  # (T, n, m, r)
else:
    DTYPE = torch.float32
    SHAPES = [(512, 768, 768, 16)]

ROWS = ["lora-torch", "lora-triton", "peft-style", "dense"]  # no _cuda kernel for LoRA
DROPOUT = [0.0, 0.1]
ALPHA = 32.0


def make(T, n, m, r):
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE)  # noqa: E731
    W = rand(m, n) / n**0.5
    A = (rand(r, n) / n**0.5).requires_grad_(True)
    B = (rand(m, r) * 0.01).requires_grad_(True)
    return rand(T, n).requires_grad_(True), W, rand(m), A, B, rand(T, m)


def flops(T, n, m, r, mode):
    fwd = 2 * T * m * n + 2 * T * r * (n + m)
    bwd = 2 * T * m * n + 4 * T * r * (n + m)  # dx (dense + low-rank), dA, dB
    return fwd if mode == "fwd" else fwd + bwd


def forward_fn(row, x, W, bias, A, B, p):
    r = A.shape[0]
    if row.startswith("lora-"):
        backend = row.split("-", 1)[1]
        seed = torch.tensor(1, device=x.device)

        def run():
            with use_backend(backend):
                return lora_linear(x, W, A, B, bias, ALPHA / r, p, seed)

        return run, []
    base = nn.Linear(W.shape[1], W.shape[0], device=DEVICE, dtype=DTYPE).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(bias)
    if row == "dense":
        return (lambda: base(x)), [base.weight, base.bias]
    drop = nn.Dropout(p) if p > 0 else nn.Identity()
    return (lambda: base(x) + (drop(x) @ A.T) @ B.T * (ALPHA / r)), [base.weight, base.bias]


@pytest.mark.parametrize("p", DROPOUT, ids=lambda p: f"drop{p}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_n{}_m{}_r{}".format(*s))
def test_lora(benchmark, shape, row, mode, p):
    T, n, m, r = shape
    if row == "dense" and p > 0:
        pytest.skip("dense has no dropout")
    x, W, bias, A, B, dy = make(*shape)
    if row.startswith("lora-"):
        reasons = unavailable_reasons(row.split("-", 1)[1], "lora_fwd", [x, W, bias, A, B])
        if reasons:
            pytest.skip("; ".join(reasons))
    fwd, own = forward_fn(row, x, W, bias, A, B, p)
    benchmark.group = f"lora T{T} n{n} m{m} r{r} p{p} {str(DTYPE).replace('torch.', '')} {mode}"
    # x is counted: it is an activation the op keeps alive (only the weights are excluded)
    saved = saved_bytes(fwd, [W, bias, A, B] + own)[0]
    step = make_step(fwd, mode, dy)
    work = 2 * T * n * m * (1 if mode == "fwd" else 2) if row == "dense" else flops(T, n, m, r, mode)
    time_it(benchmark, step, work, {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "r": r, "p": p, "row": row})
