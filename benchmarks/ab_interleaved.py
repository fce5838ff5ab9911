"""Interleaved A/B timing of benchmark rows on a shared, noisy CPU: the rows of one group run in
turn, round after round (ours, anchor, ours, anchor, ...), so a slow spell of the machine hits
every row alike; the ratio of medians is reported with the peak bytes of one step.

The rows, inputs and steps are the benchmark entries' own (bench_harness), not a second copy:

    PYTHONPATH=$PWD python benchmarks/ab_interleaved.py lora 1024,1024,1024,16 p0.1 lora-torch peft-style
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import bench_harness as H  # noqa: E402
from cersa_kernels.compare.measure import LiveTensorTracker  # noqa: E402


def _entry(op: str):
    module = __import__(f"test_bench_{op}")
    return next(v for v in vars(module).values() if isinstance(v, H.BenchOp) and v.op == op)


def _step(entry, dims, variant, row):
    torch.manual_seed(0)
    inputs = H._inputs(entry, dims, entry.variants[variant], torch.float32)
    baseline = next((b for b in entry.baselines if b.name == row), None)
    forward = baseline.build(inputs, dims) if baseline else H._op_forward(entry, row.split("-", 1)[1], inputs)
    dy = H.Draw(1).randn(dims["T"], dims["m"])
    setup, timed = H.make_step(forward.fn, "fwd+bwd", dy)
    return lambda: timed(setup())


def main(op: str, shape: str, variant: str, *rows: str, rounds: int = 9) -> None:
    entry = _entry(op)
    dims = dict(zip(entry.dims, (int(s) for s in shape.split(","))))
    variant = "" if variant == "-" else variant
    steps = {row: _step(entry, dims, variant, row) for row in rows}
    peaks = {}
    for row, step in steps.items():
        step()  # warm-up
        with LiveTensorTracker(0) as tracker:
            step()
        peaks[row] = tracker.peak_bytes
    times = {row: [] for row in rows}
    for _ in range(rounds):
        for row, step in steps.items():
            start = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - start)
    medians = {row: statistics.median(t) for row, t in times.items()}
    first = rows[0]
    for row in rows:
        print(f"{op} {shape} {variant or '-'} {row}: median {medians[row]:.4f} s, peak {peaks[row] / 2**20:.2f} MiB"
              + ("" if row == first else f"; {first}/{row}: time {medians[first] / medians[row]:.2f}×,"
                 f" peak {peaks[first] / peaks[row]:.2f}×"))


if __name__ == "__main__":
    main(*sys.argv[1:])
