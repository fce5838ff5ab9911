"""Interleaved A/B of rank alignment (issue 19 item 7): the CERSA op's fwd+bwd at the energy-chosen
k = 0.4·d and at its aligned rank (next multiple of 16), beside dense nn.Linear, round after round
on one thread, medians (the entries and steps are bench_harness's, via ab_interleaved):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/ab_rank_alignment.py 2048 2048 9   # T, d, rounds
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import ab_interleaved as A  # noqa: E402
from cersa_kernels.decompose import RANK_MULTIPLE, align_rank  # noqa: E402
from test_bench_rank_alignment import RANK_ALIGNMENT as E  # noqa: E402



def main(T: int, d: int, rounds: int) -> None:
    torch.set_num_threads(1)
    k0 = int(0.4 * d)
    k1 = align_rank(k0, RANK_MULTIPLE, d)
    steps = {f"k{k0}": A._step(E, dict(T=T, n=d, m=d, k=k0), "", "lowrank-torch"),
             f"k{k1}": A._step(E, dict(T=T, n=d, m=d, k=k1), "", "lowrank-torch"),
             "dense": A._step(E, dict(T=T, n=d, m=d, k=k1), "", "dense")}
    for step in steps.values():
        step()  # warm-up
    times = {row: [] for row in steps}
    for _ in range(rounds):  # interleaved: a slow spell of the machine hits every row alike
        for row, step in steps.items():
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
    medians = {row: statistics.median(t) for row, t in times.items()}
    for row in steps:
        print(f"T{T} d{d} {row}: median {medians[row]:.4f} s, {medians[row] / medians['dense']:.3f}x dense")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
