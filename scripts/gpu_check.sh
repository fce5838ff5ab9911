#!/usr/bin/env bash
# One command for a session that has a GPU (the device machine of the `run` tool):
#   bash scripts/gpu_check.sh
# Builds cersa_kernels._cuda in place (no pip install: the device machine cannot reach PyPI), runs
# the GPU tests, `python -m cersa_kernels doctor` (verification + timing, its cache file written
# under $OUT) and the GPU benchmarks at LLM shapes in bf16; every log and JSON goes under $OUT.
# Then: python benchmarks/make_tuned_table.py --bench $OUT/bench.json --verified $OUT/verified-*.json
# Exit status: non-zero if the build, the GPU tests, the doctor or the benchmarks failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 for CPU runs; on a GPU run Triton compiled
export CERSA_KERNELS_CACHE="$OUT"  # the doctor's verified-<gpu>-<arch>.json lands here

{
  date -u
  nvidia-smi || true
  nvcc --version
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

start=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  echo "build failed; tail of $OUT/build.log:"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
"$PY" -c "from cersa_kernels import _cuda; print(_cuda.build_info())" 2>&1 | tee -a "$OUT/build.log"

"$PY" -m pytest tests -m gpu -v -rs --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
tests_status=$?
tail -25 "$OUT/pytest_gpu.log"

"$PY" -m cersa_kernels doctor >"$OUT/doctor.log" 2>&1
doctor_status=$?
tail -40 "$OUT/doctor.log"

# On a GPU the benchmark suites run their LLM shapes (d = 4096, T = 8192) in bf16.
"$PY" -m pytest benchmarks --benchmark-only -q --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_status=$?
tail -15 "$OUT/bench.log"

echo "gpu tests exit $tests_status, doctor exit $doctor_status, benchmarks exit $bench_status; logs in $OUT"
exit $(( tests_status != 0 || doctor_status != 0 || bench_status != 0 ))
