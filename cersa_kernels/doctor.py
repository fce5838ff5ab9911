"""`python -m cersa_kernels doctor`: what this machine can run, checked, and what is faster here.

1. Prints the environment: torch, triton, CUDA runtime and driver, GPU name and arch, whether the
   native module `_cuda` is built and its build_info().
2. On a GPU: runs every kernel of every backend (`<op>_fwd` then `<op>_bwd`, as the custom ops call
   them) against the reference in bf16, fp16 and fp32 on an odd and an aligned shape (or the
   Linear shapes of `--model DIR`), times each backend's forward+backward against `torch`, prints a
   table, and writes the verified-and-faster entries for this GPU to
   `backends.verified_cache_path(gpu, arch)`, which `CERSA_BACKEND=auto` reads.
3. Without a GPU: says what it checked (imports, the native module's build) and what it could not,
   and exits 0.

The check/timing loop (`run_checks`) takes any device: tests run it on CPU tensors, comparing the
Triton interpreter with torch.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import backends
from ._checks import check_int
from .analyze import Progress, check_model_dir
from .nn.tree import as_linear, named_linears
from .reference.snell import snell_threshold

OPS = ("lowrank", "lora", "pica", "pica_lowrank", "snell")
DTYPES = ("bfloat16", "float16", "float32")
# (T, n, m, k): odd sizes (no stride divisible by 16, prime-ish) and aligned ones
DEFAULT_SHAPES = ((37, 130, 77, 45), (512, 1024, 1024, 64))
# Absolute slack per dtype, relative to max|reference|, on top of the rule
# max|y − ref64| ≤ 2·max|y_torch_same_dtype − ref64| + slack (the test suite's rule).
SLACK = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@dataclass
class CheckResult:
    op: str
    backend: str
    dtype: str
    shape: tuple
    verified: bool
    note: str = ""  # why it failed or was skipped
    max_rel_err: float = float("nan")  # worst output, relative to max|reference|
    ms: float = float("nan")  # forward + backward
    torch_ms: float = float("nan")
    variant: dict = field(default_factory=dict)  # epilogue options of `_inputs` (bias, dropout)


# Inputs per op: (forward args, backward args from (forward outputs, dy)). Shapes as in docs/methods.md.
def _inputs(op: str, shape: tuple, dtype: torch.dtype, device, gen: torch.Generator, bias: bool = True,
            dropout: float = 0.1):
    """(forward args, bwd_args(out, dy)) of `op`; `bias` and `dropout` (LoRA) pick the epilogue variant."""
    T, n, m, k = shape
    r = max(1, k // 4)

    def rand(*size, scale=1.0, dt=dtype):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dt)

    x, bias = rand(T, n), (rand(m, scale=0.1) if bias else None)
    if op == "lowrank":
        V, S, U = rand(n, k, scale=n**-0.5), rand(k, k, scale=k**-0.5, dt=torch.float32), rand(m, k)
        return (x, V, S, U, bias), lambda out, dy: (dy, out[1], V, S, U, True)
    if op == "lora":
        W, A, B = rand(m, n, scale=n**-0.5), rand(r, n, scale=n**-0.5), rand(m, r)
        seed = torch.tensor(1234, dtype=torch.int64)
        return (x, W, bias, A, B, 2.0, dropout, seed), lambda out, dy: (dy, x, out[1], W, A, B, 2.0, dropout, seed, True)
    if op == "pica":
        W, P, M = rand(m, n, scale=n**-0.5), rand(r, n, scale=n**-0.5), rand(m, r, dt=torch.float32)
        return (x, W, bias, P, M), lambda out, dy: (dy, out[1], W, P, M, True)
    if op == "pica_lowrank":
        V, S, U = rand(n, k, scale=n**-0.5), rand(k, k, scale=k**-0.5, dt=torch.float32), rand(m, k)
        M = rand(m, r, dt=torch.float32)
        return (x, V, S, U, M, bias), lambda out, dy: (dy, out[1], V, S, U, M, True)
    if op == "snell":
        H, d = 2, 8
        W0, A, B = rand(m, n, scale=n**-0.5), rand(H, n, d, scale=0.3), rand(H, m, d, scale=0.3)
        coeffs = [0.5, 0.25]
        tau = snell_threshold(A.float(), B.float(), coeffs, 0.5)  # one τ for every backend and dtype
        return (x, W0, bias, A, B, coeffs, tau), lambda out, dy: (dy, x, W0, A, B, coeffs, tau, True)
    raise ValueError(f"doctor: unknown op {op!r}, expected one of {OPS}")


def _reference_dtype(op: str) -> torch.dtype:
    # SNELL's mask compares |K| with τ: a float64 K would flip entries at τ, so its oracle is fp32
    return torch.float32 if op == "snell" else torch.float64


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _fwd_bwd(op: str, backend: str, fwd_args, bwd_args: Callable, dy: Tensor):
    fwd = backends._load_kernel(backend, f"{op}_fwd")
    bwd = backends._load_kernel(backend, f"{op}_bwd")
    out = _as_tuple(fwd(*fwd_args))
    return out + _as_tuple(bwd(*bwd_args(out, dy)))


def _time(fn: Callable, device: torch.device, reps: int) -> float:
    """Mean milliseconds of fn() after one warm-up call (Triton compiles there), synchronised."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def check_one(op: str, backend: str, dtype_name: str, shape: tuple, device, reps: int = 10,
              **variant) -> CheckResult:
    """Verify `backend`'s fwd+bwd kernels of `op` against the reference, then time them and torch
    (reps = 0: verify only). `variant`: `_inputs`' epilogue options (bias=False, dropout=0.0)."""
    dtype = getattr(torch, dtype_name)
    result = CheckResult(op, backend, dtype_name, tuple(shape), verified=False, variant=dict(variant))
    gen = torch.Generator().manual_seed(0)
    fwd_args, bwd_args = _inputs(op, shape, dtype, device, gen, **variant)
    tensors = [a for a in fwd_args if isinstance(a, Tensor) and a.is_floating_point() and a.dim() > 0]
    reasons = backends.unavailable_reasons(backend, f"{op}_fwd", tensors) + backends.unavailable_reasons(
        backend, f"{op}_bwd", tensors)
    if reasons:
        result.note = "not run: " + "; ".join(dict.fromkeys(reasons))
        return result
    dy = (torch.randn(shape[0], shape[2], generator=gen)).to(device=device, dtype=dtype)
    ref_dtype = _reference_dtype(op)
    try:
        got = _fwd_bwd(op, backend, fwd_args, bwd_args, dy)
        same = _fwd_bwd(op, "torch", fwd_args, bwd_args, dy)
        ref = _fwd_bwd(op, "torch", _cast(fwd_args, ref_dtype), lambda out, d: _cast(bwd_args(out, d), ref_dtype),
                       dy.to(ref_dtype))
    except Exception as exc:  # a kernel that raises is a failed check, reported, not a crash
        result.note = f"raised {type(exc).__name__}: {str(exc)[:200]}"
        return result
    worst, failures = 0.0, []
    for i, (g, s, r) in enumerate(zip(got, same, ref)):
        if r.numel() == 0:
            continue
        scale = r.abs().max().item() or 1.0
        err = (g.to(ref_dtype) - r).abs().max().item()
        bound = 2 * (s.to(ref_dtype) - r).abs().max().item() + SLACK[dtype_name] * scale
        worst = max(worst, err / scale)
        if not err <= bound:  # also catches NaN
            failures.append(f"output {i}: error {err:.3g} > bound {bound:.3g}")
    result.max_rel_err = worst
    result.verified = not failures
    result.note = "; ".join(failures)
    if result.verified and reps > 0:
        result.ms = _time(lambda: _fwd_bwd(op, backend, fwd_args, bwd_args, dy), torch.device(device), reps)
        result.torch_ms = _time(lambda: _fwd_bwd(op, "torch", fwd_args, bwd_args, dy), torch.device(device), reps)
    return result


def run_checks(device, ops: Sequence[str] = OPS, backend_names: Sequence[str] = ("triton", "cuda"),
               dtypes: Sequence[str] = DTYPES, shapes: Sequence[tuple] = DEFAULT_SHAPES, reps: int = 10,
               progress: bool = True, on_result: Optional[Callable[[CheckResult], None]] = None) -> list[CheckResult]:
    """check_one for every (op, backend, dtype, shape), with a progress bar on stderr;
    `on_result(result)` runs as each one finishes (the GPU check appends it to a file there, so a
    run killed at its time limit keeps what it did)."""
    todo = [(o, b, d, s) for o in ops for b in backend_names for d in dtypes for s in shapes]
    bar = Progress(len(todo), "doctor", after=0.0) if progress else None
    results = []
    for i, (op, backend, dtype, shape) in enumerate(todo):
        if bar:
            bar.update(i, f"{op} {backend} {dtype}")
        results.append(check_one(op, backend, dtype, shape, device, reps))
        if on_result is not None:
            on_result(results[-1])
    if bar:
        bar.update(len(todo))
        bar.close()
    return results


def verified_table(results: Sequence[CheckResult], arch: str) -> dict:
    """{op_fwd|op_bwd: {arch: {dtype: backend}}}: per (op, dtype), the backend verified on every
    shape whose summed fwd+bwd time is lowest and below torch's; nothing where none is faster."""
    groups: dict = {}
    for r in results:
        if r.note.startswith("not run"):
            continue
        groups.setdefault((r.op, r.dtype), {}).setdefault(r.backend, []).append(r)
    table: dict = {}
    for (op, dtype), per_backend in sorted(groups.items()):
        ratios = {b: sum(r.ms for r in rs) / sum(r.torch_ms for r in rs)
                  for b, rs in per_backend.items() if all(r.verified for r in rs)}
        ratios = {b: q for b, q in ratios.items() if q < 1.0}
        if ratios:
            best = min(ratios, key=ratios.get)
            for suffix in ("fwd", "bwd"):
                table.setdefault(f"{op}_{suffix}", {}).setdefault(arch, {})[dtype] = best
    return table


def environment() -> dict:
    """Versions, the GPU (if any) and the native module's state."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "gpu": None, "arch": None, "driver": None}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # the triton backend will say the same per call
        env["triton"] = f"cannot be imported ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["arch"] = backends.device_arch(torch.device("cuda", 0))
        version = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
        env["driver"] = f"{version // 1000}.{version % 1000 // 10}" if version else None
    try:
        env["_cuda"] = backends.cuda.build_info()
    except Exception as exc:
        env["_cuda"] = f"not available: {exc}"
    return env


def model_shapes(model_dir: str, T: int = 2048) -> list[tuple]:
    """(T, n, m, k = min(n, m) // 16) for every distinct Linear shape of a Hugging Face model dir."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    shapes = {}
    for _, layer in named_linears(model):
        m, n = as_linear(layer).weight.shape
        shapes[(T, n, m, max(16, min(n, m) // 16))] = None
    return list(shapes)


def format_table(results: Sequence[CheckResult]) -> str:
    lines = [f"{'op':13} {'backend':7} {'dtype':9} {'shape (T,n,m,k)':22} {'check':6} {'rel err':>9} "
             f"{'ms':>9} {'torch ms':>9} {'ratio':>6}  note"]
    for r in results:
        ratio = r.ms / r.torch_ms if r.verified and r.torch_ms > 0 else float("nan")
        check = "ok" if r.verified else ("-" if r.note.startswith("not run") else "FAIL")
        lines.append(f"{r.op:13} {r.backend:7} {r.dtype:9} {str(r.shape):22} {check:6} {r.max_rel_err:9.2e} "
                     f"{r.ms:9.3f} {r.torch_ms:9.3f} {ratio:6.2f}  {r.note[:80]}")
    return "\n".join(lines)


def check_arguments(model_dir: Optional[str], reps: int) -> None:
    """Every argument, before anything runs: --model a Hugging Face model directory (checked on a
    machine without a GPU too, where it is not used), --reps >= 1."""
    check_int("reps", reps, "doctor", minimum=1)
    if model_dir is not None:
        check_model_dir(model_dir, "doctor")


def main(model_dir: Optional[str] = None, reps: int = 10,
         on_result: Optional[Callable[[CheckResult], None]] = None) -> int:
    """The command; returns the exit status (0 unless a kernel failed verification on a GPU).
    `on_result` is passed to `run_checks` (called as each check finishes)."""
    check_arguments(model_dir, reps)
    env = environment()
    print("cersa_kernels doctor")
    for key, value in env.items():
        print(f"  {key:13} {value}")
    if env["gpu"] is None:
        print("\nNo CUDA GPU: checked that torch, triton and the package import, and whether the native "
              "module is built (above).\nNot checked: the Triton and CUDA kernels against the reference, "
              "and their speed; `auto` uses torch on this machine. Run this on a GPU to verify them.")
        return 0
    shapes = model_shapes(model_dir) if model_dir else list(DEFAULT_SHAPES)
    results = run_checks(torch.device("cuda", 0), shapes=shapes, reps=reps, on_result=on_result)
    print(format_table(results))
    table = verified_table(results, env["arch"])
    path = backends.verified_cache_path(env["gpu"], env["arch"])
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": env["gpu"], "arch": env["arch"], "environment": env,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "results": [asdict(r) for r in results], "table": table}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    backends._user_table.cache_clear()
    print(f"\nverified and faster than torch on {env['arch']}: {json.dumps(table) if table else 'none'}")
    print(f"written to {path} (auto reads it; set CERSA_KERNELS_CACHE to move it)")
    failed = [r for r in results if not r.verified and not r.note.startswith("not run")]
    return 1 if failed else 0
