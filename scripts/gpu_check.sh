#!/usr/bin/env bash
# The staged GPU check (scripts/gpu_check.py; docs/gpu_check.md), one stage per command so that each
# fits the device tool's 10-minute cap and a 15-minute lease holds all of them:
#   bash scripts/gpu_check.sh preflight smoke     # (a) build + every kernel family once
#   bash scripts/gpu_check.sh doctor              # (b) the verification table auto reads
#   bash scripts/gpu_check.sh bench               # (c) LLM-shape benchmarks for make_tuned_table.py
#   bash scripts/gpu_check.sh sanitize            # (d) compute-sanitizer on the _cuda kernels
# Results: $OUT/<stage>.jsonl, one line per finished item. Dry run on a CPU:
#   TRITON_INTERPRET=1 python scripts/gpu_check.py plan
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
