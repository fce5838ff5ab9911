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
- the large GEMM tiles (128×128×64, 128×256×64: aligned 16-bit launches only) are compiled where
  the pruning keeps them (`LARGE_TILES_BY_ARCH`), spill nothing, fit the arch's shared memory
  within `gemm.pipeline_shared_bytes`, and use wgmma (sm_90) / mma.sync (sm_80);
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


# The large tiles of triton/gemm.py: (BLOCK_M, BLOCK_N, BLOCK_K, stages) each arch must compile,
# i.e. those its pruning keeps. 128×256 at 3 stages needs 144 KB (fits either arch) but spills
# 12–48 B with mma.sync on sm_80: sm_90 only.
LARGE_TILES_BY_ARCH = {90: {(128, 256, 64, 3), (128, 128, 64, 4), (128, 128, 64, 3)},
                       80: {(128, 128, 64, 4), (128, 128, 64, 3)}}


def _tile(report):
    c = report["constexprs"]
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], report["num_stages"])


def _large(report) -> bool:
    c = report["constexprs"]
    return report["kernel"] == "_gemm_kernel" and c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_large_tiles_compile_spill_free_on_tensor_cores(reports, arch):
    """Every large config the pruning keeps on this arch, in bf16 with every epilogue the launchers
    give it (bias, residual, dropout on the product), and no other (no fp32, no 128×256 on sm_80)."""
    from cersa_kernels.triton.gemm import pipeline_shared_bytes

    large = [r for r in reports[arch] if _large(r)]
    assert {_tile(r) for r in large} == LARGE_TILES_BY_ARCH[arch]
    assert all(_is_16bit(r) and "*fp32" not in r["pointer_types"] for r in large)
    for flag in ("HAS_BIAS", "HAS_RESIDUAL"):
        assert any(r["constexprs"][flag] for r in large), flag
    assert any(r["constexprs"]["DROP"] == 3 for r in large)
    instr = "wgmma" if arch == 90 else "mma_sync"
    bad = [f"{r['id']}: {r.get('error') or (r['spill_stores'], r['shared'], r[instr])}" for r in large
           if r.get("error") or r["spill_stores"] or r["shared"] > tc.SHARED_LIMIT[arch] or not r[instr]]
    assert not bad
    # the pruning's estimate bounds what the compiler allocates (exact on sm_90)
    for r in large:
        bm, bn, bk, stages = _tile(r)
        import triton

        cfg = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_stages=stages)
        assert r["shared"] <= pipeline_shared_bytes(cfg, 2), r["id"]


def _odd_args(v) -> set:
    """The base pointers, sizes and strides of A, B, C that the JIT did not specialise as divisible
    by 16 (a stride of 1 is a constexpr: not odd)."""
    names = list(v["signature"])
    divisible = {names[p[0]] for p, spec in v["attrs"] if spec}
    args = ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
            "stride_cm", "stride_cn")
    return {a for a in args if v["signature"][a] != "constexpr" and a not in divisible}


def test_large_tiles_only_for_aligned_launches_and_tuned_apart():
    """The same CERSA forward with x contiguous or a column slice (row stride 257): the same
    autotune buckets, but TUNE_ALIGNED tells x·V's keys apart, and no large-tile config is ever
    recorded for a launch the JIT does not specialise as aligned throughout."""
    recorder = tc.capture(90, ["layout_aligned", "layout_odd"])
    keys = {}
    for case, kernel, key in recorder.tune_keys:
        keys.setdefault(case.split("/")[0], []).append(key)
    assert len(keys["layout_aligned"]) == len(keys["layout_odd"]) == 3  # U·S, x·V, h·(US)ᵀ
    assert keys["layout_aligned"][1] != keys["layout_odd"][1]  # x·V: the one product x is in
    assert [keys["layout_aligned"][i] for i in (0, 2)] == [keys["layout_odd"][i] for i in (0, 2)]
    gemms = [v for v in recorder.variants.values() if v["kernel"] == "_gemm_kernel"]
    large = [v for v in gemms if tc.is_large_tile(v)]
    assert large and not [tc.variant_id(v) for v in large if _odd_args(v)]
    odd_x = [v for v in gemms if "stride_am" in _odd_args(v)]
    assert odd_x and not [v for v in odd_x if tc.is_large_tile(v)]  # x·V of the odd case: base tiles only


def _nargs(dtype=torch.bfloat16, aligned=1, M=4096, N=4096):
    return dict(a_ptr=torch.empty(16, 16, dtype=dtype), TUNE_ALIGNED=aligned, TUNE_M=M, TUNE_N=N)


def _kept_large(monkeypatch, arch, nargs, **meta):
    from cersa_kernels.triton import gemm

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: arch)
    kept = gemm._prune_configs(gemm._GPU_CONFIGS, nargs, **{"DROP": 0, **meta})
    assert all(c in kept for c in gemm._BASE_GPU_CONFIGS)  # the base configs are never pruned
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept if c in gemm._LARGE_GPU_CONFIGS}


def test_large_tiles_are_pruned_to_aligned_16bit_launches_that_fit(monkeypatch):
    from cersa_kernels.triton.gemm import DROP_A, DROP_B, DROP_C

    every = {(128, 256, 3), (128, 128, 4), (128, 128, 3)}
    assert _kept_large(monkeypatch, (9, 0), _nargs()) == every
    assert _kept_large(monkeypatch, (9, 0), _nargs(torch.float16), DROP=DROP_C) == every
    assert _kept_large(monkeypatch, (8, 0), _nargs()) == {(128, 128, 4), (128, 128, 3)}  # 128×256 spills there
    assert _kept_large(monkeypatch, (8, 6), _nargs()) == {(128, 128, 3)}  # 99 KB: 96 KB fits, 128 KB does not
    assert _kept_large(monkeypatch, (9, 0), _nargs(N=128)) == {(128, 128, 4), (128, 128, 3)}
    for nargs, meta in [(_nargs(aligned=0), {}), (_nargs(torch.float32), {}), (_nargs(M=64), {}),
                        (_nargs(N=64), {}), (_nargs(), {"DROP": DROP_A}), (_nargs(), {"DROP": DROP_B})]:
        assert _kept_large(monkeypatch, (9, 0), nargs, **meta) == set(), (nargs, meta)


def test_layout_aligned_wants_16_byte_bases_strides_and_sizes():
    from cersa_kernels.triton.gemm import layout_aligned

    x = torch.empty(64, 256, dtype=torch.bfloat16)
    assert layout_aligned((x, 256, 1), (x.T, 1, 256), 64, 256, 4096)
    assert not layout_aligned((x[:, 1:], 256, 1))  # base 2 bytes past a 16-byte boundary
    wide = torch.empty(64, 257, dtype=torch.bfloat16)
    assert not layout_aligned((wide, 257, 1))
    assert not layout_aligned((x, 256, 2))  # a non-unit inner stride, not a multiple of 16
    assert not layout_aligned((x, 256, 1), 4093)  # a ragged token count


def test_pinned_configs_are_base_configs():
    """With autotuning off every launch uses a config no pruning ever drops (valid for any layout
    and device, in particular never a large tile)."""
    from cersa_kernels.triton import gemm

    for M in (1, 64, 128, 8192):
        assert gemm.pinned_config(M, False) in gemm._BASE_GPU_CONFIGS
        assert gemm.pinned_config(M, False) not in gemm._LARGE_GPU_CONFIGS


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


def test_the_tile_model_prices_the_configs_gemm_py_has():
    """scripts/tile_model.py (docs/kernels.md's expected fractions of cuBLAS) models the tiles the
    autotuner has, and no kernel beats its cuBLAS bound (which is ideal by construction)."""
    import importlib.util

    from cersa_kernels.triton import gemm

    spec = importlib.util.spec_from_file_location("tile_model", ROOT / "scripts" / "tile_model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)

    def tiles(configs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}

    assert {(t["bm"], t["bn"], t["bk"]) for t in model.TRITON_BASE} == tiles(gemm._BASE_GPU_CONFIGS)
    assert {(t["bm"], t["bn"], t["bk"]) for t in model.TRITON_LARGE} == tiles(gemm._LARGE_GPU_CONFIGS)
    rows = model.rows()
    assert rows and all(r[k] <= 1.0 for r in rows for k in ("triton_before", "triton_now", "cuda_before", "cuda_now"))
    assert all(r["triton_now"] >= r["triton_before"] for r in rows)
