"""Build script. The pure-Python package needs nothing special; the native module
`cersa_kernels._cuda` (csrc/ + python_api/, pybind11, no torch headers) is built here with nvcc
through ninja whenever nvcc is found.

Environment: CERSA_SKIP_CUDA=1 skips the module; CERSA_CUDA_ARCHS (default "80;90a") lists the GPU
architectures; nvcc is looked up on PATH, then in $CUDA_HOME/bin; MAX_JOBS caps ninja's parallelism.
Without nvcc the package installs without `_cuda`, and the cuda backend says why it cannot run.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["csrc/lowrank.cu", "csrc/snell.cu"]
MODULE_SOURCE = "python_api/module.cpp"
HEADERS = ["csrc/launchers.h", "csrc/common.cuh"]
DEFAULT_ARCHS = "80;90a"
_ARCH = re.compile(r"^[0-9]{2,3}[af]?$")  # 80, 90a, 100f, ...


class CudaPlan(NamedTuple):
    nvcc: Optional[str]  # None: do not build _cuda
    archs: list
    reason: str


def cuda_build_plan(env: Mapping[str, str] = os.environ) -> CudaPlan:
    """Whether and how to build `_cuda`, decided from the environment alone."""
    if env.get("CERSA_SKIP_CUDA", "0") not in ("", "0"):
        return CudaPlan(None, [], "CERSA_SKIP_CUDA is set")
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc is None and env.get("CUDA_HOME"):
        nvcc = shutil.which("nvcc", path=str(Path(env["CUDA_HOME"], "bin")))
    if nvcc is None:
        return CudaPlan(None, [], "nvcc not found on PATH or in $CUDA_HOME/bin")
    archs = [a.strip() for a in env.get("CERSA_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    bad = [a for a in archs if not _ARCH.match(a)]
    if bad or not archs:
        raise ValueError(f"CERSA_CUDA_ARCHS must list compute capabilities like '80;90a', got {env['CERSA_CUDA_ARCHS']!r}")
    old = [a for a in archs if int(a.rstrip("af")) < 80]
    if old:  # the kernels use bf16 tensor cores (WMMA), which start at sm_80
        raise ValueError(f"CERSA_CUDA_ARCHS: the kernels need compute capability 80 or newer, got {';'.join(old)}")
    return CudaPlan(nvcc, archs, f"nvcc at {nvcc}, archs {';'.join(archs)}")


def source_hash() -> str:
    """Hash of every file the module is built from (build_info() reports it; a test compares)."""
    digest = hashlib.sha256()
    for rel in sorted(CUDA_SOURCES + [MODULE_SOURCE] + HEADERS):
        digest.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return digest.hexdigest()[:16]


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def _ninja_path(p: Path) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja(plan: CudaPlan, build_dir: Path, output: Path) -> Path:
    """build.ninja: .cu files -> objects for every arch, module.cpp -> object, link with static cudart."""
    import pybind11

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in plan.archs]
    portable = [a for a in plan.archs if a.isdigit()]
    if portable:  # PTX of the oldest plain arch, so that newer GPUs can JIT the kernels
        low = min(portable, key=int)
        gencode.append(f"-gencode=arch=compute_{low},code=compute_{low}")
    common = ["-std=c++17", "-O3", "-Xcompiler=-fPIC,-fvisibility=hidden", f"-I{ROOT / 'csrc'}"]
    # Build facts go to module.cpp only, so a new hash never recompiles the kernels.
    info = [
        f'-DCERSA_ARCHS="{";".join(plan.archs)}"',
        f'-DCERSA_NVCC_VERSION="{nvcc_version(plan.nvcc)}"',
        f'-DCERSA_SOURCE_HASH="{source_hash()}"',
    ]
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    flags = lambda args: " ".join(shlex.quote(a) for a in args).replace("$", "$$")  # noqa: E731
    lines = [
        f"builddir = {_ninja_path(build_dir)}",  # ninja's log and deps files go here, not into the cwd
        f"nvcc = {shlex.quote(plan.nvcc)}",
        f"cuflags = {flags(common + gencode)}",
        f"cxxflags = {flags(common + includes + info)}",
        "rule cu\n  command = $nvcc $cuflags -MD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
        "rule cxx\n  command = $nvcc $cxxflags -MD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
        "rule link\n  command = $nvcc -shared -cudart=static $in -o $out",
    ]
    objects = []
    for rel, rule in [(s, "cu") for s in CUDA_SOURCES] + [(MODULE_SOURCE, "cxx")]:
        obj = build_dir / (Path(rel).name + ".o")
        objects.append(_ninja_path(obj))
        lines.append(f"build {objects[-1]}: {rule} {_ninja_path(ROOT / rel)}")
    lines.append(f"build {_ninja_path(output)}: link {' '.join(objects)}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


class NinjaBuildExt(build_ext):
    """Builds `_cuda` with nvcc through ninja (setuptools cannot compile .cu files)."""

    def build_extension(self, ext: Extension) -> None:
        plan = cuda_build_plan()
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        ninja_file = write_ninja(plan, build_dir, output)
        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg

            ninja = str(Path(ninja_pkg.BIN_DIR, "ninja"))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.run([ninja, "-f", str(ninja_file), "-j", jobs], check=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"building cersa_kernels._cuda failed ({exc}); set CERSA_SKIP_CUDA=1 to install without it") from exc


if __name__ == "__main__":
    plan = cuda_build_plan()
    if plan.nvcc is None:
        print(f"cersa_kernels: not building the CUDA module _cuda: {plan.reason}", file=sys.stderr)
    setup(
        ext_modules=[Extension("cersa_kernels._cuda", sources=CUDA_SOURCES + [MODULE_SOURCE])] if plan.nvcc else [],
        cmdclass={"build_ext": NinjaBuildExt},
    )
