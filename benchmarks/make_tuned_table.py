"""Turn GPU benchmark runs plus `doctor` verification into the table `CERSA_BACKEND=auto` reads.

    python benchmarks/make_tuned_table.py --bench bench.json [...] --verified verified-<gpu>-<sm>.json [...] \\
        > cersa_kernels/backends/tuned.json

An entry {"<op>_fwd"/"<op>_bwd": {arch: {dtype: backend}}} is written only for a backend that
(1) `python -m cersa_kernels doctor` verified against the reference for that op and dtype on that
GPU (every shape it checked), and (2) was faster than the `torch` row in forward+backward time
summed over the benchmarked shapes measured for both. The arch of a benchmark's device comes from
the doctor file of the same device; a device without one gets no entry (nothing is verified there).
Benchmark rows: extra_info with op, row ("<op>-<backend>", backend torch/triton/cuda; baseline rows
such as "eager" or "snell-plain" are ignored), mode, dtype, device, and the group's shape and
variant parameters (filled for every op by benchmarks/bench_harness.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def verified_backends(doctor_docs: list[dict]) -> dict:
    """{device: (arch, {(op, dtype, backend) verified on every checked shape})}."""
    out = {}
    for doc in doctor_docs:
        ok: dict = {}
        for r in doc["results"]:
            key = (r["op"], r["dtype"], r["backend"])
            ok[key] = ok.get(key, True) and bool(r["verified"])
        arch, passed = out.get(doc["device"], (doc["arch"], set()))
        out[doc["device"]] = (arch, passed | {k for k, v in ok.items() if v})
    return out


BACKENDS = ("torch", "triton", "cuda")
# extra_info keys that describe the row or its measurement, not the group (shape and variant)
_NOT_SHAPE = {
    "op", "row", "mode", "dtype", "device", "shape", "tflops", "saved_activation_bytes", "allocated_bytes",
    "largest_allocation_bytes", "mn_bytes", "bf16_matmul_peak_tflops", "peak_memory_bytes", "fraction_of_bf16_peak",
}


def _case(info: dict) -> str:
    """The group a row was measured in (shape and variant), as a key comparable across rows."""
    return json.dumps({k: v for k, v in info.items() if k not in _NOT_SHAPE and isinstance(v, (int, float, str))},
                      sort_keys=True)


def tuned_table(runs: list[dict], doctor_docs: list[dict]) -> dict:
    """{op_fwd|op_bwd: {arch: {dtype: backend}}} from pytest-benchmark JSON and doctor files."""
    times: dict = defaultdict(lambda: defaultdict(dict))  # (op, device, dtype) -> backend -> shape -> s
    for run in runs:
        for bench in run["benchmarks"]:
            info = bench.get("extra_info", {})
            op, row = info.get("op", ""), str(info.get("row", ""))
            backend = row[len(op) + 1:] if row.startswith(f"{op}-") else None
            if backend not in BACKENDS or info.get("mode") != "fwd+bwd":
                continue
            times[(op, info["device"], info["dtype"])][backend][_case(info)] = bench["stats"]["mean"]
    verified = verified_backends(doctor_docs)
    table: dict = defaultdict(lambda: defaultdict(dict))
    for (op, device, dtype), per_backend in sorted(times.items()):
        if device not in verified or "torch" not in per_backend:
            continue
        arch, passed = verified[device]
        torch_times = per_backend["torch"]
        faster = {}
        for backend, by_shape in per_backend.items():
            shapes = set(by_shape) & set(torch_times)
            if backend == "torch" or (op, dtype, backend) not in passed or not shapes:
                continue
            total = sum(by_shape[s] for s in shapes)
            if total < sum(torch_times[s] for s in shapes):
                faster[backend] = total / sum(torch_times[s] for s in shapes)  # ratio to torch
        if faster:
            best = min(faster, key=faster.get)
            for suffix in ("fwd", "bwd"):
                table[f"{op}_{suffix}"][arch][dtype] = best
    return json.loads(json.dumps(table))


def read_run(path: str) -> dict:
    """A pytest-benchmark JSON file, or a .jsonl of its benchmark records (what the GPU check's bench
    stage appends as each benchmark finishes, so a stage killed at its limit still counts)."""
    with open(path) as f:
        if path.endswith(".jsonl"):
            return {"benchmarks": [json.loads(line) for line in f if line.strip()]}
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="+", required=True,
                        help="pytest-benchmark JSON files, or the GPU check's bench.jsonl (one benchmark a line)")
    parser.add_argument("--verified", nargs="*", default=[], help="doctor cache files of the same GPUs")
    args = parser.parse_args(argv)
    runs = [read_run(p) for p in args.bench]
    docs = [json.load(open(p)) for p in args.verified]
    json.dump(tuned_table(runs, docs), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
