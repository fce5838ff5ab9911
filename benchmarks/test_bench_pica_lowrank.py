"""PiCa over CERSA (cersa::pica_lowrank) against the unfused composition; forward and forward+backward.

Rows: `pica_lowrank-<backend>` (one op, the branch reuses h = x·V; no _cuda kernel), `unfused`
(the CERSA op plus a separate PiCa branch projecting x again: saves x·V_r beside h).
GPU: LLM shapes in bf16 (PiCa's default rank 256); CPU: small shapes, float32, torch backend only.
"""
from __future__ import annotations

import pytest
import torch

from cersa_kernels.backends import use_backend
from cersa_kernels.ops import lowrank_linear, pica_lowrank_linear

from conftest import HAS_GPU, make_step, time_it
from op_harness import saved_bytes
from test_bench_pica import DTYPE_NAME, orthonormal, rand, skip_unless

if HAS_GPU:
    SHAPES = [(8192, 4096, 4096, 1024, 256)]  # (T, n, m, k, r)
else:
    SHAPES = [(512, 768, 768, 192, 64)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["pica_lowrank-torch", "pica_lowrank-triton", "unfused"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_n{}_m{}_k{}_r{}".format(*s))
def test_pica_lowrank(benchmark, shape, row, mode):
    T, n, m, k, r = shape
    g = torch.Generator().manual_seed(0)
    x, V, U = rand(T, n, g=g).requires_grad_(True), orthonormal(n, k, g), orthonormal(m, k, g)
    S, M = rand(k, k, g=g).requires_grad_(True), (rand(m, r, g=g) * 0.01).requires_grad_(True)
    bias, dy = rand(m, g=g), rand(T, m, g=g)
    skip_unless(row, "pica_lowrank_fwd", [x, V, S, U, M, bias])
    if row.startswith("pica_lowrank-"):
        def fwd():
            with use_backend(row.split("-", 1)[1]):
                return pica_lowrank_linear(x, V, S, U, M, bias)
    else:
        Vr = V[:, :r]

        def fwd():
            return lowrank_linear(x, V, S, U, bias) + (x @ Vr) @ M.T
    benchmark.group = f"pica_lowrank T{T} n{n} m{m} k{k} r{r} {DTYPE_NAME} {mode}"
    saved = saved_bytes(fwd, [V, S, U, M, bias])[0]
    flops = 2 * T * k * (n + m) + 2 * m * k * k
    if mode != "fwd":
        flops += 2 * T * (k + r) * (m + n) + 2 * T * k * k + 2 * T * m * r + 2 * n * k * k
    time_it(benchmark, make_step(fwd, mode, dy), flops,
            {"saved_activation_bytes": saved, "T": T, "n": n, "m": m, "k": k, "r": r, "row": row})
