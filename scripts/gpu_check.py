"""The staged GPU check: every kernel verified within one 15-minute GPU lease.

    python scripts/gpu_check.py STAGE [STAGE ...]      (on the GPU machine; results under $OUT)
    python scripts/gpu_check.py plan [--arch 90]       (on a CPU: the dry-run cost estimate)

Stages, in order of value; each is one command that stays well under 6 minutes of device time:
  preflight  seconds: the packages the stages import, versions, the GPU, nvcc, compute-sanitizer
  smoke      (a) build `_cuda` in place (a failed build is recorded and the Triton items still
             run), then every kernel family once against the reference: each op's fwd and bwd,
             each epilogue (bias / no bias) and dropout variant, bf16/fp16/fp32, one ragged and one
             aligned shape, on every backend with a kernel for it
  doctor     (b) `python -m cersa_kernels doctor`'s verification table (checks + timing), and the
             verified-<gpu>-<arch>.json that `auto` reads
  bench      (c) LLM-shape benchmarks (d = 4096) of lowrank, lora, snell and the quantized ops
             against torch/cuBLAS: pytest-benchmark JSON for benchmarks/make_tuned_table.py
  sanitize   (d) compute-sanitizer memcheck and racecheck on the `_cuda` kernels at small shapes

Every stage appends one JSON object per finished item to $OUT/<stage>.jsonl (flushed and
fsynced), so a stage killed at its limit keeps what it did. Verification stages pin one Triton
config per kernel family and shape class (CERSA_TRITON_AUTOTUNE=0: each variant compiles once);
the bench stage turns autotuning back on. `plan` runs each stage's launchers on CPU tensors under
the launch recorder of tests/triton_compile.py (kernels are recorded, GEMMs not executed) and
prices what it counted with the costs in COSTS (docs/kernels.md explains them).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STAGES = ("preflight", "smoke", "doctor", "bench", "sanitize")
# What the stages import; the device machine has these and no PyPI, so a missing one is reported
# up front, in seconds, instead of after a build.
REQUIRED = ("torch", "triton", "numpy", "pytest", "pytest_benchmark", "hypothesis", "pybind11", "ninja")

# Device-time prices of the dry run (seconds). Compile times were measured ahead of time for sm_90
# by compiling the recorded variants on CPU (tests/test_triton_compile.py reports each variant's
# seconds): a GEMM variant ~0.6 s, a SNELL kernel ~2 s. An autotuner times each config a few
# times (~0.15 s per config, on top of its compile). A launch costs ~30 µs of host time at these
# small shapes; the machine's start and the `_cuda` build are fixed costs.
COSTS = dict(gemm_compile=0.6, snell_compile=2.0, autotune_config=0.15, launch=30e-6,
             machine_start=120.0, cuda_build=150.0, pytest_start=15.0, bench_item=2.5)
BUDGET_TOTAL_S, BUDGET_STAGE_S = 12 * 60, 6 * 60
# CERSA_TRITON_AUTOTUNE per stage: verification pins one config per kernel family and shape class
# (each variant compiles once); the benchmarks tune (`doctor --tune` verifies tuned choices).
STAGE_AUTOTUNE = {"preflight": "0", "smoke": "0", "doctor": "0", "bench": "1", "sanitize": "0"}

SMOKE_SHAPES = ((37, 130, 77, 45), (256, 256, 256, 64))  # (T, n, m, k): ragged, aligned
SMOKE_DTYPES = ("bfloat16", "float16", "float32")
SMOKE_BACKENDS = ("triton", "cuda")


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or ROOT / "gpu_check_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def append(stage: str, record: dict) -> None:
    """One JSON line in $OUT/<stage>.jsonl, on disk before the next item starts."""
    with open(out_dir() / f"{stage}.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- preflight --------------------------------------------------------------------------------

def preflight() -> int:
    missing = []
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
            append("preflight", {"package": name, "version": getattr(module, "__version__", "?")})
        except Exception as exc:  # a broken install counts as missing
            missing.append(name)
            append("preflight", {"package": name, "error": f"{type(exc).__name__}: {exc}"})
    import torch

    append("preflight", {"cuda": torch.cuda.is_available(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         "nvcc": shutil.which("nvcc"), "compute_sanitizer": shutil.which("compute-sanitizer")})
    if missing:
        print(f"preflight: missing packages {missing}: the stages that import them cannot run", file=sys.stderr)
    return 1 if missing else 0


# --- smoke (a) --------------------------------------------------------------------------------

def build_cuda() -> bool:
    start = time.time()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, capture_output=True,
                          text=True)
    (out_dir() / "build.log").write_text(proc.stdout + proc.stderr)
    append("smoke", {"item": "build _cuda", "ok": proc.returncode == 0, "seconds": round(time.time() - start, 1),
                     "tail": (proc.stdout + proc.stderr)[-2000:] if proc.returncode else ""})
    return proc.returncode == 0


def variants(op: str) -> list[dict]:
    """The epilogue/dropout variants of one op that the smoke run covers."""
    if op == "lora":
        return [dict(bias=True, dropout=0.1), dict(bias=False, dropout=0.0)]
    return [dict(bias=True), dict(bias=False)]


def smoke_items(ops=None):
    from cersa_kernels import doctor

    for op in ops or doctor.OPS:
        for backend in SMOKE_BACKENDS:
            for dtype in SMOKE_DTYPES:
                for shape in SMOKE_SHAPES:
                    for variant in variants(op):
                        yield op, backend, dtype, shape, variant


def smoke(device="cuda", build: bool = True, ops=None) -> int:
    from dataclasses import asdict

    from cersa_kernels import doctor

    if build:
        build_cuda()  # a failed build is recorded; the Triton items still run
    failed = 0
    for op, backend, dtype, shape, variant in smoke_items(ops):
        start = time.time()
        result = doctor.check_one(op, backend, dtype, shape, device, reps=0, **variant)
        failed += not result.verified and not result.note.startswith("not run")
        append("smoke", dict(asdict(result), seconds=round(time.time() - start, 2)))
    return 1 if failed else 0


# --- doctor (b) ---------------------------------------------------------------------------------

def doctor_stage() -> int:
    from dataclasses import asdict

    from cersa_kernels import doctor

    os.environ.setdefault("CERSA_KERNELS_CACHE", str(out_dir()))
    return doctor.main(on_result=lambda r: append("doctor", asdict(r)))


# --- bench (c) ----------------------------------------------------------------------------------

# The LLM-shape benchmark groups the lease has time for: d = 4096, one k, bf16 (the harness's GPU
# dtype), fwd+bwd (what make_tuned_table compares).
BENCH_SELECT = "gpu and fwd+bwd and (T8192-n4096-m4096-k1024 or T8192-n4096-m4096-r16 or T512-n4096-m4096)"


def bench() -> int:
    env = dict(os.environ, CERSA_BENCH_JSONL=str(out_dir() / "bench.jsonl"), TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-m", "gpu", "-k",
           BENCH_SELECT.replace("gpu and ", ""), f"--benchmark-json={out_dir() / 'bench.json'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


# --- sanitize (d) -------------------------------------------------------------------------------

def cuda_kernels_once() -> None:
    """Each `_cuda` kernel once at a small ragged shape (what compute-sanitizer runs)."""
    import torch

    from cersa_kernels import doctor

    for op in doctor.OPS:
        for dtype in ("float16", "float32"):
            r = doctor.check_one(op, "cuda", dtype, SMOKE_SHAPES[0], torch.device("cuda", 0), reps=0)
            print(json.dumps({"op": op, "dtype": dtype, "verified": r.verified, "note": r.note}))


def sanitize() -> int:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        append("sanitize", {"error": "compute-sanitizer not found"})
        return 1
    status = 0
    for check in ("memcheck", "racecheck"):
        start = time.time()
        proc = subprocess.run([tool, "--tool", check, "--error-exitcode", "3", sys.executable, __file__,
                               "cuda-kernels-once"], cwd=ROOT, capture_output=True, text=True)
        append("sanitize", {"tool": check, "exit": proc.returncode, "seconds": round(time.time() - start, 1),
                            "tail": (proc.stdout + proc.stderr)[-3000:]})
        status |= proc.returncode != 0
    return status


# --- plan: the dry run on CPU --------------------------------------------------------------------

def _priced(recorder, launches: int, name: str) -> dict:
    """What a recorder counted, priced with COSTS."""
    compiles = {"gemm": 0, "snell": 0}
    for v in recorder.variants.values():
        compiles["gemm" if v["kernel"] == "_gemm_kernel" else "snell"] += 1
    sessions = {tuple(k[1:]) for k in recorder.tune_keys}  # one tuning per (kernel, key), whatever the case
    configs = sum(1 for _ in sessions) * len(_gemm_configs())
    seconds = (compiles["gemm"] * COSTS["gemm_compile"] + compiles["snell"] * COSTS["snell_compile"]
               + configs * COSTS["autotune_config"] + launches * COSTS["launch"])
    return dict(stage=name, gemm_compiles=compiles["gemm"], snell_compiles=compiles["snell"],
                autotune_sessions=len(sessions), launches=launches, seconds=round(seconds, 1))


def _gemm_configs():
    from cersa_kernels.triton import gemm

    return gemm._GPU_CONFIGS


class _AllKernels:
    def __contains__(self, name) -> bool:
        return True


class _LaunchCounter:
    """Counts kernel launches through the recorder (every launch, not only new variants)."""

    def __init__(self, recorder):
        self.recorder, self.count = recorder, 0
        self._record = recorder.record

    def __enter__(self):
        def record(*args, **kwargs):
            self.count += 1
            return self._record(*args, **kwargs)

        self.recorder.record = record
        return self

    def __exit__(self, *exc):
        self.recorder.record = self._record


def plan_stage(stage: str, arch: int = 90) -> dict:
    """Count and price one stage's device work by running its launchers on CPU under the recorder."""
    import triton_compile as tc

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("plan runs the launchers under the Triton interpreter: set TRITON_INTERPRET=1")
    if stage in FIXED_STAGE_SECONDS:  # nothing compiles there: preflight imports, the prebuilt `_cuda`
        return dict(stage=stage, gemm_compiles=0, snell_compiles=0, autotune_sessions=0, launches=0,
                    seconds=FIXED_STAGE_SECONDS[stage])
    if stage not in STAGES:
        raise SystemExit(f"plan: unknown stage {stage!r}; expected one of {STAGES}")
    recorder = tc.Recorder(arch)
    # Record every kernel without executing it: the stages' launch sequences depend on shapes only
    # (SNELL's radix select always makes its three passes), and interpreting GPU-sized tiles would
    # take minutes.
    executed, tc.NOT_EXECUTED = tc.NOT_EXECUTED, _AllKernels()
    autotune = os.environ.get("CERSA_TRITON_AUTOTUNE")
    os.environ["CERSA_TRITON_AUTOTUNE"] = STAGE_AUTOTUNE[stage]
    try:
        with recorder.installed(), _LaunchCounter(recorder) as counter:
            launches, extra = _STAGE_LAUNCHERS[stage](recorder, counter)
    finally:
        tc.NOT_EXECUTED = executed
        if autotune is None:
            os.environ.pop("CERSA_TRITON_AUTOTUNE", None)
        else:
            os.environ["CERSA_TRITON_AUTOTUNE"] = autotune
    priced = _priced(recorder, launches, stage)
    priced["seconds"] = round(priced["seconds"] + extra, 1)
    return priced


def _smoke_launchers(recorder, counter) -> tuple[int, float]:
    from cersa_kernels import doctor

    for op, backend, dtype, shape, variant in smoke_items():
        if backend == "triton":  # bf16 is recorded as fp16 (bf16 dots are refused under the interpreter)
            recorder.case = f"{op}/{dtype}"
            doctor.check_one(op, backend, "float16" if dtype == "bfloat16" else dtype, shape, "cpu", reps=0,
                             **variant)
    return counter.count, COSTS["cuda_build"] + COSTS["pytest_start"]


def _doctor_launchers(recorder, counter, reps: int = 10) -> tuple[int, float]:
    from cersa_kernels import doctor

    for op in doctor.OPS:
        for dtype in doctor.DTYPES:
            for shape in doctor.DEFAULT_SHAPES:
                recorder.case = f"{op}/{dtype}"
                doctor.check_one(op, "triton", "float16" if dtype == "bfloat16" else dtype, shape, "cpu", reps=0)
    # each check runs once, then a warm-up and `reps` timed calls
    return counter.count * (2 + reps), COSTS["pytest_start"]


def _bench_stage_launchers(recorder, counter) -> tuple[int, float]:
    items, launches = _bench_launchers(recorder, counter)
    return launches, items * COSTS["bench_item"] + COSTS["pytest_start"]


def _bench_launchers(recorder, counter) -> tuple[int, int]:
    """The bench stage's Triton launches at its LLM shapes (GEMMs recorded, not executed), and how
    many benchmark items it times. Returns (items, launches per item summed over the stage)."""
    import torch

    from cersa_kernels.triton import lora, lowrank

    dt = torch.float16  # recorded as fp16: the bf16 interpreter caveat; the same variants count
    T, d, k, r = 8192, 4096, 1024, 16
    x, dy = torch.empty(T, d, dtype=dt), torch.empty(T, d, dtype=dt)
    V, U, S = torch.empty(d, k, dtype=dt), torch.empty(d, k, dtype=dt), torch.empty(k, k)
    recorder.case = "bench/lowrank"
    y, h = lowrank.lowrank_fwd_triton(x, V, S, U, None)
    lowrank.lowrank_bwd_triton(dy, h, V, S, U, True)
    W, A, B = torch.empty(d, d, dtype=dt), torch.empty(r, d, dtype=dt), torch.empty(d, r, dtype=dt)
    recorder.case = "bench/lora"
    seed = torch.tensor(1, dtype=torch.int64)
    _, xa = lora.lora_fwd_triton(x, W, None, A, B, 2.0, 0.1, seed)
    lora.lora_bwd_triton(dy, x, xa, W, A, B, 2.0, 0.1, seed, True)
    per_item = counter.count
    rounds = 20 + 3  # bench_harness.GPU_ROUNDS timed, two warm-up steps and one warm-up round
    items = 12  # BENCH_SELECT: about 3 rows (op-triton, op-torch, a baseline) × 4 groups
    return items, per_item * rounds * items // 2


_STAGE_LAUNCHERS = {"smoke": _smoke_launchers, "doctor": _doctor_launchers, "bench": _bench_stage_launchers}
FIXED_STAGE_SECONDS = {"preflight": 10.0, "sanitize": 60.0}  # imports; the sanitizers' slowdown of small calls


def plan(arch: int = 90, stages=STAGES) -> dict:
    rows = [plan_stage(s, arch) for s in stages]
    total = COSTS["machine_start"] + sum(r["seconds"] for r in rows)
    return dict(arch=arch, costs=COSTS, stages=rows, total_seconds=round(total, 1),
                budget_total_seconds=BUDGET_TOTAL_S, budget_stage_seconds=BUDGET_STAGE_S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="+", choices=STAGES + ("plan", "cuda-kernels-once"))
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90), help="plan: the target arch")
    parser.add_argument("--tune", action="store_true",
                        help="doctor: autotune, so that the verification checks the configs the tuner picks")
    args = parser.parse_args(argv)
    if args.stages == ["plan"]:
        result = plan(args.arch)
        print(json.dumps(result, indent=2))
        over = [r["stage"] for r in result["stages"] if r["seconds"] > BUDGET_STAGE_S]
        return 1 if over or result["total_seconds"] > BUDGET_TOTAL_S else 0
    if args.stages == ["cuda-kernels-once"]:
        cuda_kernels_once()
        return 0
    os.environ["TRITON_INTERPRET"] = "0"
    run = {"preflight": preflight, "smoke": smoke, "doctor": doctor_stage, "bench": bench, "sanitize": sanitize}
    status = 0
    for stage in args.stages:
        os.environ["CERSA_TRITON_AUTOTUNE"] = "1" if stage == "doctor" and args.tune else STAGE_AUTOTUNE[stage]
        start = time.time()
        code = run[stage]()
        append("stages", {"stage": stage, "exit": code, "seconds": round(time.time() - start, 1)})
        status |= code != 0
    return status


if __name__ == "__main__":
    sys.exit(main())
