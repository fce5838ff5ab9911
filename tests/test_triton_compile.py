"""Every Triton kernel variant the launchers produce, compiled for sm_90 (H100) and sm_80 (A100)
on this CPU-only machine (see tests/triton_compile.py for how the variants are captured).

Default: the representative subset of `triton_compile.select` (a few minutes on 2 cores);
CERSA_FULL_COMPILE_SWEEP=1 compiles every captured variant (every dtype, tile config, flag
combination and SNELL head dim; an hour or more). Compiled kernels go to a temporary
TRITON_CACHE_DIR, never into the repository.

Bounds asserted (per variant, per arch):
- shared memory <= the arch's opt-in per-block maximum (`SHARED_LIMIT`), for every config that
  survives the autotuner's pruning (all of them are recorded);
- 16-bit variants (fp16/bf16 operands) spill at most SPILL_BOUND_16BIT bytes (ptxas -v);
  fp32 spills are printed, not bounded (fp32 GEMMs without TF32 run on CUDA cores);
- 16-bit GEMM tiles with BLOCK_M >= 64 use wgmma on sm_90 and mma.sync on sm_80;
- no pointer offset is a 32-bit integer (an i32 index product wraps past 2^31 elements);
- GEMMs with a quantized operand (int8, NF4: `QUANTIZED_POSITIONS`): each one the launchers
  produce is compiled, 16-bit ones spill nothing, and those with BLOCK_M >= 64 run tl.dot on the
  dequantized tiles with wgmma (sm_90) / mma.sync (sm_80).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_compile as tc
from cersa_kernels.reference.lora import dropout_params

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("CERSA_FULL_COMPILE_SWEEP", "0") not in ("", "0")
ARCHS = (90, 80)
# Bytes of spill stores a 16-bit kernel may have: a handful of registers' worth, so that a kernel
# that keeps its tiles in registers passes and one whose tiles live in local memory does not.
SPILL_BOUND_16BIT = 64


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{arch: [report per compiled variant]}: captured here, compiled in one subprocess per arch
    (TRITON_INTERPRET=0), both arches at once."""
    tmp = tmp_path_factory.mktemp("triton_compile")
    procs = {}
    for arch in ARCHS:
        variants = tc.select(list(tc.capture(arch, full=FULL).variants.values()), FULL)
        path = tmp / f"variants_sm{arch}.json"
        path.write_text(json.dumps(variants))
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / f"cache_sm{arch}"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs[arch] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "triton_compile.py"), str(path),
                                        "--arch", str(arch)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, f"compiling for sm_{arch} crashed:\n{stderr[-4000:]}"
        out[arch] = json.loads(stdout)
    for arch, reps in out.items():  # the table a reader of the CI log wants
        print(f"\nsm_{arch}: {len(reps)} variants")
        for r in reps:
            print(f"  {r.get('shared', '-'):>7} B smem {r.get('registers', '-'):>4} regs "
                  f"{r.get('spill_stores', '-'):>6} B spill  {r['id'][:150]}")
    return out


def _is_16bit(report) -> bool:
    return any(t in ("*fp16", "*bf16") for t in report["pointer_types"])


def _failures(reports, arch, bad):
    return [f"{r['id']}: {bad(r)}" for r in reports[arch] if bad(r)]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles(reports, arch):
    assert reports[arch], "no variant captured"
    assert not _failures(reports, arch, lambda r: r.get("error"))


@pytest.mark.slow
def test_every_launcher_kernel_is_covered(reports):
    """Each @triton.jit kernel of cersa_kernels.triton that a launcher launches was compiled."""
    import importlib
    import pkgutil

    import cersa_kernels.triton as package

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels |= {name for name, obj in vars(module).items()
                    if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction")}
    for arch in ARCHS:
        assert kernels <= {r["kernel"] for r in reports[arch]}, kernels - {r["kernel"] for r in reports[arch]}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_within_the_arch_limit(reports, arch):
    limit = tc.SHARED_LIMIT[arch]
    assert not _failures(reports, arch, lambda r: "shared" in r and r["shared"] > limit and f"{r['shared']} B > {limit} B")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_variants_do_not_spill(reports, arch):
    assert not _failures(reports, arch, lambda r: _is_16bit(r) and r.get("spill_stores", 0) > SPILL_BOUND_16BIT
                         and f"{r['spill_stores']} B spill stores, {r['stack']} B stack")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_gemm_tiles_use_tensor_cores(reports, arch):
    instr = "wgmma" if arch == 90 else "mma_sync"
    tiles = [r for r in reports[arch] if r["kernel"] == "_gemm_kernel" and _is_16bit(r)
             and r["constexprs"]["BLOCK_M"] >= 64 and "error" not in r]
    assert tiles
    assert not [r["id"] for r in tiles if not r[instr]]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_gemm_uses_tf32_tensor_cores_when_torch_allows(reports, arch):
    instr = "wgmma" if arch == 90 else "mma_sync"
    fp32 = [r for r in reports[arch] if r["kernel"] == "_gemm_kernel" and r["pointer_types"] == ["*fp32"]]
    by_precision = {p: [r[instr] for r in fp32 if r["constexprs"]["DOT_PRECISION"] == p] for p in ("tf32", "ieee")}
    assert by_precision["tf32"] and all(by_precision["tf32"])
    assert by_precision["ieee"] and not any(by_precision["ieee"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_pointer_offsets_are_int64(reports, arch):
    assert not _failures(reports, arch, lambda r: r.get("i32_addptr"))


# Quantized operands: `_quant_gemm_cases` runs every launcher with int8 and NF4 frozen weights.
# (A_FMT, A_STORED_T, B_FMT, B_STORED_T) of each quantized GEMM the launchers make, per format:
# U·S (A = U, stored Uᵀ), x·V, x·W0ᵀ and dy·U (B stored transposed), S·Vᵀ and dy·W0 (B as stored).
QUANTIZED_POSITIONS = {(f, True, 0, False) for f in (1, 2)} | {(0, False, f, t) for f in (1, 2) for t in (False, True)}


def _quantized(report) -> bool:
    return report["kernel"] == "_gemm_kernel" and (report["constexprs"]["A_FMT"] or report["constexprs"]["B_FMT"])


def _position(report):
    c = report["constexprs"]
    return (c["A_FMT"], c["A_STORED_T"], c["B_FMT"], c["B_STORED_T"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_quantized_operand_position_is_compiled(reports, arch):
    """Every position in bf16; the default subset compiles fp16 and fp32 once per format (the same
    dequantizing code; the full sweep every position)."""
    for dtype in ("*bf16", "*fp16", "*fp32"):
        quantized = [r for r in reports[arch] if _quantized(r) and dtype in r["pointer_types"]]
        if dtype == "*bf16" or FULL:
            assert QUANTIZED_POSITIONS <= {_position(r) for r in quantized}, dtype
        assert {f for r in quantized for f in _position(r)[::2]} - {0} == {1, 2}, dtype


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_quantized_gemms_do_not_spill(reports, arch):
    assert not _failures(reports, arch, lambda r: _quantized(r) and _is_16bit(r) and r.get("spill_stores", 0)
                         and f"{r['spill_stores']} B spill stores")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_gemm_tiles_use_tensor_cores(reports, arch):
    """tl.dot on the dequantized tiles of every 16-bit quantized position is a tensor-core MMA."""
    instr = "wgmma" if arch == 90 else "mma_sync"
    tiles = [r for r in reports[arch] if _quantized(r) and _is_16bit(r) and r["constexprs"]["BLOCK_M"] >= 64
             and "error" not in r]
    assert QUANTIZED_POSITIONS <= {_position(r) for r in tiles}
    assert not [r["id"] for r in tiles if not r[instr]]


# Specialisation, without compiling: what the JIT would key its cache on.

def _seeds_covering_key_types():
    """Seeds whose dropout keys are < 2^31 and >= 2^31, divisible by 16 and not: each of these
    would be a different i32/i64 type or divisibility attribute if the key were specialised."""
    found = {}
    for seed in range(10_000):
        key = dropout_params(0.1, torch.tensor(seed))[0]
        found.setdefault((key >= 2**31, key % 16 == 0), seed)
        if len(found) == 4:
            return sorted(found.values())
    raise AssertionError(f"no seed covers every key class: {found}")


def test_new_dropout_seeds_reuse_the_compiled_kernel(monkeypatch):
    from cersa_kernels.triton import lora

    seeds = _seeds_covering_key_types()
    recorder = tc.Recorder(90)
    x, W = torch.randn(64, 128, dtype=torch.float16), torch.randn(128, 128, dtype=torch.float16)
    A, B = torch.randn(16, 128, dtype=torch.float16), torch.randn(128, 16, dtype=torch.float16)
    with recorder.installed():
        for seed in seeds:
            recorder.case = seed
            lora.lora_fwd_triton(x, W, None, A, B, 2.0, 0.1, torch.tensor(seed))
    dropped = [v for v in recorder.variants.values() if tc.constexpr_values(v)["DROP"] != 0]
    assert dropped and all(sorted(v["cases"]) == seeds for v in dropped)


def test_autotune_key_buckets_the_token_count():
    recorder = tc.capture(90, ["tokens_300", "tokens_500", "tokens_700"])
    by_case = {}
    for case, kernel, key in recorder.tune_keys:
        by_case.setdefault(case.split("/")[0], []).append(key)
    assert by_case["tokens_300"] == by_case["tokens_500"]  # both round up to 512 tokens
    assert by_case["tokens_300"] != by_case["tokens_700"]


def test_dot_precision_follows_allow_tf32():
    from cersa_kernels.triton.gemm import dot_precision

    allowed = torch.backends.cuda.matmul.allow_tf32  # a property of torch's module object
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "tf32"  # ignored for 16-bit operands
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_snell_kernels_compute_abs_k_without_contraction(reports, arch):
    """SNELL's kernels are compiled with enable_fp_fusion=False: the |K| they compare with τ is then
    rounded after every operation, the bits of the torch reference (which computes τ for the
    doctor and the merge) and of the interpreter. Checked in the PTX: no fp32 fma in the selection
    kernel (no tl.dot there) nor in any 16-bit SNELL kernel (its dots are mma, not fma)."""
    snell = [r for r in reports[arch] if r["kernel"] != "_gemm_kernel"]
    assert snell, "no SNELL kernel captured"
    bad = [r["id"] for r in snell if not r.get("error") and r.get("fma_f32", 0) > 0
           and (r["kernel"] == "_snell_select_kernel" or _is_16bit(r))]
    assert not bad, f"SNELL kernels with fused fp32 multiply-adds: {bad}"
