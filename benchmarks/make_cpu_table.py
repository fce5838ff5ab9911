"""A markdown table of the torch path against its anchors from one pytest-benchmark JSON run:
per group (op, shape, variant, mode) the median time, peak and saved bytes of each row, and the
ratios of `<op>-torch` to every other row of the same group (time, peak).

    python benchmarks/make_cpu_table.py benchmarks/results/cpu-default-path.json > table.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

MB = 2**20


def main(path: str) -> None:
    benches = json.load(open(path))["benchmarks"]
    groups = defaultdict(dict)
    for b in benches:
        groups[b["group"]][b["extra_info"]["row"]] = b
    print("| group | row | median s | peak MiB | saved MiB | ours/row time | ours/row peak |")
    print("|---|---|---|---|---|---|---|")
    for group in sorted(groups):
        rows = groups[group]
        ours = next((b for r, b in rows.items() if r.endswith("-torch")), None)
        for row, b in sorted(rows.items(), key=lambda kv: (not kv[0].endswith("-torch"), kv[0])):
            info, median = b["extra_info"], b["stats"]["median"]
            t_ratio = p_ratio = ""
            if ours is not None and b is not ours:
                t_ratio = f"{ours['stats']['median'] / median:.2f}×"
                p_ratio = f"{ours['extra_info']['peak_bytes'] / info['peak_bytes']:.2f}×"
            print(f"| {group} | {row} | {median:.4f} | {info['peak_bytes'] / MB:.2f} | "
                  f"{info['saved_activation_bytes'] / MB:.2f} | {t_ratio} | {p_ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
