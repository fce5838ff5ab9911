"""Turn a GPU benchmark run into the table `CERSA_BACKEND=auto` reads.

    python benchmarks/make_tuned_table.py bench.json [more.json ...] > cersa_kernels/backends/tuned.json

For each (op, device, dtype), the backend whose forward+backward time summed over the benchmarked
shapes is lowest wins, for both `<op>_fwd` and `<op>_bwd`. Rows come from benchmarks whose
extra_info carries op, row ("cersa-<backend>"), mode, dtype and device (see test_bench_lowrank.py).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def tuned_table(runs: list[dict]) -> dict:
    """{op_fwd|op_bwd: {device: {dtype: backend}}} from pytest-benchmark JSON documents."""
    totals: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    shapes: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        for bench in run["benchmarks"]:
            info = bench.get("extra_info", {})
            if not str(info.get("row", "")).startswith("cersa-") or info.get("mode") != "fwd+bwd":
                continue
            key = (info["op"], info["device"], info["dtype"])
            backend = info["row"].split("-", 1)[1]
            totals[key][backend] += bench["stats"]["mean"]
            shapes[key][backend].add((info["T"], info["n"], info["m"], info["k"]))
    table: dict = defaultdict(lambda: defaultdict(dict))
    for (op, device, dtype), per_backend in totals.items():
        # compare only backends measured on every shape of this group
        everywhere = set.union(*shapes[(op, device, dtype)].values())
        complete = {b: t for b, t in per_backend.items() if shapes[(op, device, dtype)][b] == everywhere}
        best = min(complete, key=complete.get)
        for suffix in ("fwd", "bwd"):
            table[f"{op}_{suffix}"][device][dtype] = best
    return json.loads(json.dumps(table))


if __name__ == "__main__":
    docs = [json.load(open(path)) for path in sys.argv[1:]]
    json.dump(tuned_table(docs), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
