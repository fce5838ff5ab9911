"""Benchmark entry of rank alignment (issue 19 item 7): the CERSA op at an energy-chosen rank
(k = 0.4·d, an arbitrary integer: 409 at 1024², 819 at 2048²) against the same layer at the rank
`decompose` now gives by default (rounded up to a multiple of 16: 416, 832), beside the dense
anchor of each group. Compare the `lowrank-torch` rows of the two groups of one size: the aligned k
does ~2% more FLOPs; anything more than that is the matmul libraries' penalty on odd ranks.
The groups, timing and extra_info come from bench_harness (CPU shapes run on the torch backend)."""
from __future__ import annotations

from cersa_kernels.decompose import RANK_MULTIPLE, align_rank
from cersa_kernels.ops import lowrank_linear

from bench_harness import DENSE, BenchOp, benchmark_test
from test_bench_lowrank import flops, make


def pair(T: int, d: int) -> list:
    """(T, d, d, k) at the energy-chosen k = 0.4·d and at its aligned rank."""
    k = int(0.4 * d)
    return [(T, d, d, k), (T, d, d, align_rank(k, RANK_MULTIPLE, d))]


RANK_ALIGNMENT = BenchOp(
    op="lowrank", dims=("T", "n", "m", "k"),
    cpu_shapes=pair(1024, 1024),
    gpu_shapes=pair(8192, 2048) + pair(8192, 4096),
    make=make, call=lambda i: lowrank_linear(i["x"], i["V"], i["S"], i["U"], i["bias"]),
    flops=flops, grads=("x", "S"), backends=("torch", "triton", "cuda"), baselines=(DENSE,),
)

test_rank_alignment = benchmark_test(RANK_ALIGNMENT)
