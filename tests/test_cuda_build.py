"""The CUDA module's GEMM, read from its SASS for every arch setup.py builds.

csrc/lowrank.cu is compiled to a cubin per arch of setup.py's default list with nvcc (on every
machine) and disassembled with the cuobjdump that ships inside Triton's NVIDIA backend:
- every fp16 and bf16 instantiation of gemm_kernel has HMMA (warp-level tensor-core MMA;
  wmma::mma_sync compiles to it on sm_80 and sm_90), the fp32 ones none (CUDA cores: a check that
  the pattern can fail);
- the operand tiles stream through the cp.async pipeline: in the K loop of every instantiation
  (the backward branch whose body holds the MMAs or FMAs) are 16-byte global->shared copies
  (LDGSTS.E.BYPASS.128, cp.async.cg 16 B), the wait on the pipeline (DEPBAR) and one barrier;
  in 16-bit the loop body holds a whole 128×128×32 step per warp, 32 HMMA.16816 (2 k-substeps ×
  4×2 WMMA 16×16×16 tiles × 2); the element-wise fallback for ragged and unaligned chunks is in
  the loop too (LDG.E.U16 / LDG.E);
- no instantiation spills (ptxas -v: 0 bytes of spill stores; at 2 blocks per SM, i.e. 128
  registers, bf16 spilled 12–24 B inside the K loop on sm_80, hence 1 block of 8 warps per SM).
The kernels cannot run without a GPU: their numbers are checked on one (tests/test_lowrank.py -m gpu).
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from triton import knobs

from test_cuda_backend import SETUP  # setup.py loaded as a module, once

ROOT = Path(__file__).resolve().parents[1]


ARCHS = SETUP.DEFAULT_ARCHS.split(";")
HMMA_PER_K_STEP_16BIT = 32
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)")


def sass_by_function(cubin: Path) -> dict:
    """{mangled function name: SASS text} of a cubin."""
    text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


def _opcode(instruction: str) -> str:
    """The opcode of a SASS instruction, past its predicate (`@P0 BRA 0x260` -> `BRA`)."""
    words = instruction.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def loops(sass: str) -> list:
    """The instruction lists of the loop bodies of one function: for each backward branch, the
    instructions from its target to it (nested loops appear once each)."""
    instructions = [(int(addr, 16), ins.strip()) for addr, ins in _LINE.findall(sass)]
    bodies = []
    for addr, ins in instructions:
        match = _BRANCH.search(ins)
        if match and int(match.group(1), 16) < addr:
            bodies.append([i for a, i in instructions if int(match.group(1), 16) <= a <= addr])
    return bodies


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: ({gemm_kernel name: SASS}, ptxas -v text)}: lowrank.cu compiled once per arch."""
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is on every machine of this project (see setup.py)"
    out = {}
    for arch in ARCHS:
        cubin = tmp_path_factory.mktemp("cubin") / f"lowrank_sm{arch}.cubin"
        done = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++17", "-O3", "-Xptxas", "-v",
                               f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "lowrank.cu"), "-o", str(cubin)],
                              check=True, capture_output=True, text=True)
        gemms = {name: sass for name, sass in sass_by_function(cubin).items() if "gemm_kernel" in name}
        out[arch] = (gemms, done.stdout + done.stderr)
    return out


def _split(gemms):
    half = {n: s for n, s in gemms.items() if "__half" in n or "bfloat16" in n}
    return half, {n: s for n, s in gemms.items() if n not in half}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_lowrank_gemm_uses_tensor_cores(compiled, arch):
    half, fp32 = _split(compiled[arch][0])
    assert any("__half" in n for n in half) and any("bfloat16" in n for n in half), sorted(half)
    assert not [n for n, s in half.items() if "HMMA" not in s]
    assert fp32 and not [n for n, s in fp32.items() if "HMMA" in s]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_k_loop_streams_16_byte_cp_async_copies(compiled, arch):
    """Every instantiation (each dtype, output type and operand layout: 4 layouts × 5 type pairs)
    has a K loop holding its MMAs or FMAs, LDGSTS.E.BYPASS.128 copies, the cp.async wait and a
    barrier; the 16-bit loops one full step of HMMA; the scalar fallback loads exist."""
    gemms = compiled[arch][0]
    half, fp32 = _split(gemms)
    assert len(gemms) == 20, sorted(gemms)
    bad = {}
    for name, sass in gemms.items():
        is_half = name in half
        math = "HMMA" if is_half else "FFMA"
        k_loops = [b for b in loops(sass) if any("LDGSTS" in i for i in b) and any(_opcode(i).startswith(math) for i in b)]
        if not k_loops:
            bad[name] = "no loop with both cp.async copies and the MMAs/FMAs"
            continue
        body = k_loops[0]
        copies = [i for i in body if "LDGSTS" in i]
        if not all("LDGSTS.E.BYPASS.128" in i for i in copies):
            bad[name] = f"copies other than 16-byte cp.async.cg: {sorted(set(copies))[:3]}"
        elif not any("DEPBAR" in i for i in body) or not any("BAR.SYNC" in i for i in body):
            bad[name] = "no cp.async wait or barrier in the K loop"
        elif is_half and sum("HMMA.16816" in i for i in body) != HMMA_PER_K_STEP_16BIT:
            bad[name] = f"{sum('HMMA.16816' in i for i in body)} HMMA in the K loop"
        elif not any(_opcode(i).startswith("LDG.E") for i in body):
            bad[name] = "no element-wise fallback load in the K loop"
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_register_spills_are_bounded(compiled, arch):
    ptxas = compiled[arch][1]
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", ptxas)]
    assert spills and max(spills) == 0, max(spills)
