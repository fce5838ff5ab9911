"""Compile every Triton kernel variant the launchers produce for a GPU target, without a GPU.

Two steps, in two processes, because the first needs the interpreter and the second must not have it:

1. `capture(arch)` (TRITON_INTERPRET=1, as in the test process): the real launchers
   (cersa_kernels.triton.*) run on small CPU tensors on their GPU code path (`triton_interpreting`
   answers False to them, `torch.cuda.get_device_capability` answers the target arch). Every launch
   is first specialised exactly as Triton's JIT would: a JITFunction twin of the kernel, its own
   binder and `_pack_args`, for a CUDA backend of the target, give the signature (pointer dtypes,
   i32/i64), the constexprs and the attributes (divisibility by 16); then the interpreter runs it,
   so that launches depending on earlier results (SNELL's radix select) see real values. An
   autotuned launch records every config that survives the autotuner's pruning.
2. `python tests/triton_compile.py variants.json --arch 90` (TRITON_INTERPRET=0): each variant is
   compiled with `triton.compile(ASTSource(fn, signature, constexprs, attrs),
   target=GPUTarget("cuda", arch, 32), options=...)`, its PTX is run through Triton's bundled
   `ptxas -v` for registers, stack frame and spills, and a JSON report per variant is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# Kernels whose results never steer a later launch (the GEMM launchers depend only on shapes,
# strides and dtypes): recorded but not interpreted, which would cost minutes at GPU tile sizes.
# SNELL's radix select reads its histograms back, so the SNELL kernels run.
NOT_EXECUTED = {"_gemm_kernel"}

# Per-block opt-in shared memory limits (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 90: 232448}  # A100: 163 KB, H100: 227 KB
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}  # Triton emits sm_90a PTX (wgmma) for Hopper

# Cases: name -> (kind, callable(dtype) running launchers). Dtypes every case runs in.
DTYPES = ("float32", "float16", "bfloat16")
SNELL_HEAD_DIMS_FULL = (4, 12, 32, 64, 128)
# The default subset: every SNELL kernel in bf16 at the largest head dim, and in fp16 and fp32 at
# the smallest (the tiles do not depend on d_h, and the interpreter runs d = 4 much faster).
SNELL_HEAD_DIMS_SUBSET = (128,)
SNELL_HEAD_DIMS_OTHER_DTYPES = (4,)


def _shapes():
    # odd (no stride divisible by 16) and aligned (every one is, and T large enough for a split
    # reduction): the two specialisations Triton's JIT makes of the same launch
    return [dict(T=37, n=130, m=77, k=45, r=13), dict(T=512, n=128, m=192, k=64, r=16)]


def _gemm_cases(dtype_name: str) -> None:
    import torch

    from cersa_kernels.triton import lora, lowrank, pica, pica_lowrank

    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(dtype)

    for s in _shapes():
        T, n, m, k, r = s["T"], s["n"], s["m"], s["k"], s["r"]
        x, dy = rand(T, n), rand(T, m)
        V, S, U, bias = rand(n, k), rand(k, k, dtype=torch.float32), rand(m, k), rand(m)
        for b in (bias, None):
            y, h = lowrank.lowrank_fwd_triton(x, V, S, U, b)
        for need_dx in (True, False):
            lowrank.lowrank_bwd_triton(dy, h, V, S, U, need_dx)
        W, A, Bm = rand(m, n), rand(r, n), rand(m, r)
        for p in (0.0, 0.1):
            seed = torch.tensor(1234, dtype=torch.int64)
            _, xa = lora.lora_fwd_triton(x, W, bias, A, Bm, 2.0, p, seed)
            lora.lora_bwd_triton(dy, x, xa, W, A, Bm, 2.0, p, seed, True)
        P, M = rand(r, n), rand(m, r, dtype=torch.float32)
        _, hp = pica.pica_fwd_triton(x, W, bias, P, M)
        pica.pica_bwd_triton(dy, hp, W, P, M, True)
        _, hl = pica_lowrank.pica_lowrank_fwd_triton(x, V, S, U, M, bias)
        pica_lowrank.pica_lowrank_bwd_triton(dy, hl, V, S, U, M, True)


# (format, group size): NF4 at bitsandbytes' default 64, which every tile's extent along the
# stored row divides for x·V, x·W0ᵀ (one scale per stored row and tile); int8 at 48, which none
# divides (one scale load per element): both ways of loading the scales are compiled.
QUANT_FORMATS = (("int8", 48), ("nf4", 64))


def _quant_gemm_cases(dtype_name: str) -> None:
    """Every launcher with quantized frozen weights, as the ops hold them (V, U as `.T`-views of
    stored Vᵀ, Uᵀ; W (m, n) as stored): each quantized operand position (A stored transposed, B
    stored transposed, B as stored), in both specialisations (odd and aligned shapes)."""
    import torch

    from cersa_kernels.quant import quantize
    from cersa_kernels.triton import lora, lowrank, pica, pica_lowrank

    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=dt):
        return torch.randn(*shape, generator=g).to(dtype)

    for fmt, group in QUANT_FORMATS:
        for s in _shapes():
            T, n, m, k, r = s["T"], s["n"], s["m"], s["k"], s["r"]
            x, dy, bias = rand(T, n), rand(T, m), rand(m)
            V, U = quantize(rand(k, n), fmt, group).T, quantize(rand(k, m), fmt, group).T
            W, S, A, Bm, M = quantize(rand(m, n), fmt, group), rand(k, k, dtype=torch.float32), rand(r, n), rand(m, r), rand(m, r)
            _, h = lowrank.lowrank_fwd_triton(x, V, S, U, bias)
            lowrank.lowrank_bwd_triton(dy, h, V, S, U, True)
            _, xa = lora.lora_fwd_triton(x, W, bias, A, Bm, 2.0, 0.0, torch.tensor(0))
            lora.lora_bwd_triton(dy, x, xa, W, A, Bm, 2.0, 0.0, torch.tensor(0), True)
            _, hp = pica.pica_fwd_triton(x, W, bias, A, M)
            pica.pica_bwd_triton(dy, hp, W, A, M, True)
            _, hl = pica_lowrank.pica_lowrank_fwd_triton(x, V, S, U, M, bias)
            pica_lowrank.pica_lowrank_bwd_triton(dy, hl, V, S, U, M, True)


def _snell_cases(dtype_name: str, head_dims) -> None:
    import torch

    from cersa_kernels.triton import snell

    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    T, n, m, H = 37, 130, 77, 2
    for d in head_dims:
        x, dy = torch.randn(T, n, generator=g).to(dt), torch.randn(T, m, generator=g).to(dt)
        W0, bias = torch.randn(m, n, generator=g).to(dt), torch.randn(m, generator=g).to(dt)
        A, B = torch.randn(H, n, d, generator=g).to(dt), torch.randn(H, m, d, generator=g).to(dt)
        coeffs = (0.5, 0.25)
        tau = snell.snell_threshold_triton(A, B, coeffs, 0.5)
        snell.kth_smallest_abs_triton(10, values=torch.randn(m, n, generator=g).to(dt))
        for b in (bias, None):
            snell.snell_fwd_triton(x, W0, b, A, B, coeffs, tau)
        snell.snell_bwd_triton(dy, x, W0, A, B, coeffs, tau, True)
        snell.kernelized_update_triton(A, B, coeffs)


def _tf32_case(dtype_name: str) -> None:
    """fp32 with TF32 allowed by torch: the GEMM's tl.dot input precision follows it."""
    import torch

    from cersa_kernels.triton import lowrank

    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x, V, S, U = torch.randn(64, 128), torch.randn(128, 64), torch.eye(64), torch.randn(128, 64)
        lowrank.lowrank_fwd_triton(x, V, S, U, None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def _lora_seed_case(seed_value: int) -> Callable[[str], None]:
    def run(dtype_name: str) -> None:
        import torch

        from cersa_kernels.triton import lora

        dt = getattr(torch, dtype_name)
        x, W = torch.randn(64, 128).to(dt), torch.randn(128, 128).to(dt)
        A, B = torch.randn(16, 128).to(dt), torch.randn(128, 16).to(dt)
        lora.lora_fwd_triton(x, W, None, A, B, 2.0, 0.1, torch.tensor(seed_value, dtype=torch.int64))

    return run


def _tokens_case(T: int) -> Callable[[str], None]:
    def run(dtype_name: str) -> None:
        import torch

        from cersa_kernels.triton import lowrank

        dt = getattr(torch, dtype_name)
        x, V, S, U = torch.randn(T, 128).to(dt), torch.randn(128, 32).to(dt), torch.eye(32), torch.randn(96, 32).to(dt)
        y, h = lowrank.lowrank_fwd_triton(x, V, S, U, None)
        lowrank.lowrank_bwd_triton(torch.randn(T, 96).to(dt), h, V, S, U, True)

    return run


def _layout_case(aligned: bool) -> Callable[[str], None]:
    """y = x·W0ᵀ-sized CERSA forward whose x is contiguous (every stride a multiple of 16) or a
    column slice of a wider tensor (row stride 257): the same autotune buckets, another layout."""
    def run(dtype_name: str) -> None:
        import torch

        from cersa_kernels.triton import lowrank

        dt = getattr(torch, dtype_name)
        T, n, m, k = 256, 256, 256, 128
        x = torch.randn(T, n).to(dt) if aligned else torch.randn(T, n + 1).to(dt)[:, :n]
        V, S, U = torch.randn(n, k).to(dt), torch.eye(k), torch.randn(m, k).to(dt)
        lowrank.lowrank_fwd_triton(x, V, S, U, None)

    return run


def cases(full: bool) -> tuple[dict, dict]:
    """({name: (run(dtype), dtypes)} of the sweep, the same of the extra cases tests ask for)."""
    dims = SNELL_HEAD_DIMS_FULL if full else SNELL_HEAD_DIMS_SUBSET
    sweep = {
        "gemm": (_gemm_cases, DTYPES),
        "snell": (lambda dt: _snell_cases(dt, dims), DTYPES if full else ("bfloat16",)),
        "gemm_tf32": (_tf32_case, ("float32",)),
        "gemm_quant": (_quant_gemm_cases, DTYPES),
    }
    if not full:
        sweep["snell_other_dtypes"] = (lambda dt: _snell_cases(dt, SNELL_HEAD_DIMS_OTHER_DTYPES), ("float16", "float32"))
    # for the specialisation tests only (not part of the sweep)
    extra = {f"lora_seed_{s}": (_lora_seed_case(s), DTYPES) for s in (1, 7, 2**31 + 5)}
    extra.update({f"tokens_{T}": (_tokens_case(T), ("float16",)) for T in (300, 500, 700)})
    extra.update({f"layout_{name}": (_layout_case(name == "aligned"), ("bfloat16",)) for name in ("aligned", "odd")})
    return sweep, extra


class Recorder:
    """Records each launch as Triton's JIT would specialise it, then lets the interpreter run it."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.variants: dict = {}  # json key -> variant (JSON-ready)
        self.tune_keys: list = []  # [case, kernel, autotune key] per autotuned launch
        self.case = None
        self._twins: dict = {}

    def _twin(self, interpreted):
        """A JITFunction over the same Python function: its params and binder are the JIT's."""
        from triton.runtime.jit import JITFunction, create_function_from_signature

        if interpreted not in self._twins:
            jit = JITFunction(interpreted.fn, **interpreted.kwargs)
            self._twins[interpreted] = (jit, create_function_from_signature(jit.signature, jit.params, self.backend))
        return self._twins[interpreted]

    def record(self, interpreted, args, kwargs) -> None:
        from triton import knobs

        jit, binder = self._twin(interpreted)
        kwargs = dict(kwargs, debug=kwargs.get("debug", jit.debug) or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound_args, specialization, options)
        option_kwargs = {k: kwargs[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
                         if k in kwargs}
        variant = dict(
            module=jit.fn.__module__, kernel=jit.fn.__name__, signature=signature,
            constexprs=[[list(k), v] for k, v in sorted(constexprs.items())],
            attrs=[[list(k), [list(a) for a in v]] for k, v in sorted(attrs.items())],
            num_warps=options.num_warps, num_stages=options.num_stages, options=option_kwargs,
        )
        key = json.dumps(variant, sort_keys=True, default=repr)
        self.variants.setdefault(key, dict(variant, cases=[]))
        if self.case not in self.variants[key]["cases"]:
            self.variants[key]["cases"].append(self.case)

    @contextlib.contextmanager
    def installed(self):
        """Record every launch of cersa_kernels' Triton kernels, on their GPU code path."""
        import importlib
        import pkgutil

        import torch
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction

        import cersa_kernels.triton as package

        recorder, saved = self, []

        def patch(obj, name, value):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        interpreted_run = InterpretedFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)
            if fn.fn.__name__ in NOT_EXECUTED:
                return None
            return interpreted_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def autotune_run(tuner, *args, grid, warmup, **kwargs):
            all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
            key = [all_args[k] for k in tuner.keys if k in all_args]
            key += [str(a.dtype) for a in all_args.values() if hasattr(a, "dtype")]
            recorder.tune_keys.append([recorder.case, tuner.base_fn.__name__, repr(key)])
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)  # every config the autotuner would time
            tuner.nargs = None
            for config in configs[1:]:
                recorder.record(tuner.fn, args, {**kwargs, **config.all_kwargs()})
            return run(tuner.fn, *args, grid=grid, warmup=warmup, **kwargs, **configs[0].all_kwargs())

        patch(InterpretedFunction, "run", run)
        patch(Autotuner, "run", autotune_run)
        patch(torch.cuda, "get_device_capability", lambda device=None: (recorder.arch // 10, recorder.arch % 10))
        # the launchers' GPU branch (autotuned configs, GPU tiles), with the interpreter running it
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            if hasattr(module, "triton_interpreting"):
                patch(module, "triton_interpreting", lambda: False)
        try:
            yield self
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)


def capture(arch: int, case_names=None, full: bool = False) -> Recorder:
    """Run the launcher cases (all of the sweep, or `case_names`) in every dtype; the recorder
    holds the variants. Needs TRITON_INTERPRET=1 (the kernels run on CPU tensors)."""
    import torch

    sweep, extra = cases(full)
    chosen = {n: f for n, f in {**sweep, **extra}.items() if n in case_names} if case_names else sweep
    recorder = Recorder(arch)
    with recorder.installed():
        for name, (run, dtypes) in chosen.items():
            for dtype in dtypes:
                recorder.case = f"{name}/{dtype}"
                torch.manual_seed(0)
                run(dtype)
    return recorder


def variant_id(v: dict) -> str:
    """Readable name: kernel, pointer types, how many args are 16-divisible, constexprs, launch."""
    names = list(v["signature"])
    shown = ",".join(f"{names[p[0]]}={val}" for p, val in v["constexprs"] if v["signature"][names[p[0]]] == "constexpr")
    ptrs = [t[1:] for t in v["signature"].values() if t.startswith("*")]
    return f"{v['kernel']}[{'/'.join(dict.fromkeys(ptrs))}; {_n_divisible(v)} div16]({shown}) w{v['num_warps']}s{v['num_stages']}"


def constexpr_values(v: dict) -> dict:
    names = list(v["signature"])
    return {names[p[0]]: val for p, val in v["constexprs"] if len(p) == 1}


_TILE_PREFIXES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "GROUP_", "SHIFT", "NBITS")


def operand_formats(v: dict) -> tuple:
    """(A_FMT, A_STORED_T, B_FMT, B_STORED_T) of a GEMM variant: (0, False, 0, False) when dense."""
    c = constexpr_values(v)
    return (c["A_FMT"], c["A_STORED_T"], c["B_FMT"], c["B_STORED_T"])


def is_quantized_gemm(v: dict) -> bool:
    return v["kernel"] == "_gemm_kernel" and operand_formats(v)[::2] != (0, 0)


def _coverage_key(v: dict):
    """What the default subset compiles once. GEMM: pointer types, flags and quantized operand
    positions in bf16 (the layout specialisations, stride == 1, compile to the same tile code),
    pointer types and dot precision (fp32: TF32 or not) in fp16/fp32 (the pointer types tell int8
    from NF4, so each format is compiled once per dtype).
    SNELL: kernel and pointer types."""
    ptrs = tuple(sorted({t for t in v["signature"].values() if t.startswith("*")}))
    if v["kernel"] != "_gemm_kernel":
        return (v["kernel"], ptrs)
    c = constexpr_values(v)
    if "*bf16" not in ptrs:
        return (v["kernel"], ptrs, c["DOT_PRECISION"])
    return (v["kernel"], ptrs, c["HAS_BIAS"], c["HAS_RESIDUAL"], c["DROP"], operand_formats(v))


def is_plain_gemm(v: dict) -> bool:
    c = constexpr_values(v)
    return v["kernel"] == "_gemm_kernel" and not c["HAS_BIAS"] and not c["HAS_RESIDUAL"] and c["DROP"] == 0


def is_large_tile(v: dict) -> bool:
    """A GEMM variant with one of gemm.py's large tiles (128×128 or more: aligned 16-bit layouts only)."""
    c = constexpr_values(v)
    return v["kernel"] == "_gemm_kernel" and c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128


def _tile_volume(v: dict) -> int:
    c = constexpr_values(v)
    return c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("BLOCK_K", 1)


def _n_divisible(v: dict) -> int:
    """How many arguments the JIT specialised as divisible by 16."""
    return sum(1 for _, spec in v["attrs"] if spec)


def select(variants: list, full: bool) -> list:
    """Every variant (full), or the representative subset: one variant per coverage key (its
    smallest tile: the quickest to compile), plus every autotune config of two plain bf16 GEMM
    layouts, the least and the most 16-divisible (odd strides: element-wise loads, the tile in
    registers; aligned: the cp.async/TMA pipeline in shared memory), so that each config's shared
    memory, spills and wgmma use are checked in both specialisations on each arch; the same for
    the plain bf16 GEMM with an NF4 B stored transposed (x·V, x·W0ᵀ: the T-sized dequantizing
    products, and the format with the most work per element), over the quantized configs; and
    every bf16 variant with a large tile (each large config the pruning keeps, with every epilogue
    the launchers give it: bias, residual, dropout on the product)."""
    if full:
        return variants

    def layout(v):
        strides = {k: x for k, x in constexpr_values(v).items() if k.startswith("stride")}
        return json.dumps([v["signature"], strides, v["attrs"]])

    plain = {layout(v): _n_divisible(v) for v in variants if is_plain_gemm(v)
             and set(v["signature"][p] for p in ("a_ptr", "b_ptr", "c_ptr")) == {"*bf16"}}
    nf4_b = {layout(v): _n_divisible(v) for v in variants if is_plain_gemm(v) and operand_formats(v) == (0, False, 2, True)
             and v["signature"]["a_ptr"] == "*bf16"}
    every_config = set()
    for layouts in (plain, nf4_b):
        every_config |= {min(layouts, key=layouts.get), max(layouts, key=layouts.get)} if layouts else set()
    chosen, seen = [], set()
    for v in sorted(variants, key=_tile_volume):  # stable: capture order within a tile size
        key = _coverage_key(v)
        if (is_plain_gemm(v) and layout(v) in every_config) or (is_large_tile(v) and "*bf16" in v["signature"].values()):
            seen.add(key)
            chosen.append(v)
            continue
        if key not in seen:
            seen.add(key)
            chosen.append(v)
    return chosen


_PTXAS_LINE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int, workdir: Path) -> dict:
    from triton import knobs

    path = workdir / "k.ptx"
    path.write_text(ptx)
    out = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={PTXAS_ARCH[arch]}", str(path), "-o",
                          str(workdir / "k.cubin")], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    return {k: max([int(x) for x in rx.findall(text)] or [0]) for k, rx in _PTXAS_LINE.items()}


def compile_variant(v: dict, arch: int, workdir: Path) -> dict:
    """Compile one recorded variant for sm_<arch>; shared memory, code facts and ptxas usage."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    report = dict(id=variant_id(v), kernel=v["kernel"], cases=v["cases"], constexprs=constexpr_values(v),
                  num_warps=v["num_warps"], num_stages=v["num_stages"],
                  pointer_types=sorted({t for t in v["signature"].values() if t.startswith("*")}))
    target = GPUTarget("cuda", arch, 32)
    start = time.time()
    try:
        fn = getattr(importlib.import_module(v["module"]), v["kernel"])
        constexprs = {tuple(p): val for p, val in v["constexprs"]}
        attrs = {tuple(p): [tuple(a) for a in spec] for p, spec in v["attrs"]}
        options = make_backend(target).parse_options(dict(v["options"]))
        compiled = triton.compile(ASTSource(fn, v["signature"], constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # reported, and asserted on by the test
        report["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        return report
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    report.update(
        shared=compiled.metadata.shared,
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        # fused multiply-adds in fp32: a contracted a*b + c rounds once, not twice (SNELL's |K|)
        fma_f32=len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        # pointer offsets of 32 bits: an i32 index product can wrap past 2^31 elements
        i32_addptr=[line.strip()[:240] for line in ttir.splitlines()
                    if "tt.addptr" in line and re.search(r"(, |x)i32>? loc", line)],
        **ptxas_usage(ptx, arch, workdir),
    )
    report["seconds"] = round(time.time() - start, 2)
    return report


def main(argv=None) -> None:
    """Compile the variants of a JSON file (a list, as `capture` records them) for one arch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("variants_json")
    parser.add_argument("--arch", type=int, required=True, choices=sorted(SHARED_LIMIT))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile with TRITON_INTERPRET=0: ASTSource needs the compiled JIT's kernels")
    variants = json.loads(Path(args.variants_json).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        reports = [compile_variant(v, args.arch, Path(tmp)) for v in variants]
    json.dump(reports, sys.stdout)


if __name__ == "__main__":
    main()
