"""The CUDA module's 16-bit lowrank GEMM runs on tensor cores for every arch setup.py builds.

csrc/lowrank.cu is compiled to a cubin per arch of setup.py's default list with nvcc (on every
machine), and its SASS, from the cuobjdump that ships inside Triton's NVIDIA backend, must
contain HMMA (warp-level tensor-core MMA; wmma::mma_sync compiles to it on sm_80 and sm_90) in
every fp16 and bf16 instantiation of gemm_kernel, and none in the fp32 one (CUDA cores: a check
that the pattern can fail).
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


def sass_by_function(cubin: Path) -> dict:
    """{mangled function name: SASS text} of a cubin."""
    text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_16bit_lowrank_gemm_uses_tensor_cores(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is on every machine of this project (see setup.py)"
    cubin = tmp_path / f"lowrank_sm{arch}.cubin"
    subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "csrc" / "lowrank.cu"), "-o", str(cubin)], check=True, capture_output=True)
    gemms = {name: sass for name, sass in sass_by_function(cubin).items() if "gemm_kernel" in name}
    half = {n: s for n, s in gemms.items() if "__half" in n or "bfloat16" in n}
    fp32 = {n: s for n, s in gemms.items() if n not in half}
    assert any("__half" in n for n in half) and any("bfloat16" in n for n in half), sorted(gemms)
    assert not [n for n, s in half.items() if "HMMA" not in s]
    assert fp32 and not [n for n, s in fp32.items() if "HMMA" in s]
