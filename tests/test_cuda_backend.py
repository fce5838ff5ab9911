"""The CUDA C++ backend (csrc/ + python_api/ -> cersa_kernels._cuda).

On a CPU-only machine: the module is built, links and imports; build_info() matches this checkout
and this nvcc; the launchers reject bad shapes with ValueError and, without GPU memory behind the
pointers, raise the CUDA error instead of crashing; the backend explains why it cannot run; the
build decision (CERSA_SKIP_CUDA, no nvcc, CERSA_CUDA_ARCHS) is honoured.
On a GPU (`-m gpu`): a host pointer is refused and the context survives. The kernels against a
float64 oracle are tested beside their ops (test_lowrank.py, test_snell.py).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cersa_kernels.backends import BackendUnavailableError, unavailable_reasons
from cersa_kernels.backends import cuda as cuda_backend
from cersa_kernels.ops import lowrank_linear

from test_lowrank import make_inputs

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    """setup.py as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("cersa_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _load_setup()
PLAN = SETUP.cuda_build_plan()


@pytest.fixture
def native():
    """The built `_cuda` module. It must exist wherever setup.py would build it (nvcc found, no
    CERSA_SKIP_CUDA); elsewhere the test is skipped with setup.py's own reason."""
    if PLAN.nvcc is None:
        pytest.skip(f"setup.py does not build _cuda here: {PLAN.reason}")
    from cersa_kernels import _cuda

    return _cuda


# --------------------------------------------------------------------------------- build, import


def test_module_is_built_and_imports(native):
    assert set(native.KERNELS) == {"lowrank_fwd", "lowrank_bwd", "snell_delta"}
    for op in native.KERNELS:
        assert callable(getattr(native, op))


def test_build_info_matches_this_checkout_and_nvcc(native):
    info = native.build_info()
    assert info["archs"] == PLAN.archs, f"built for {info['archs']}, setup.py now asks for {PLAN.archs}"
    assert info["nvcc_version"] == SETUP.nvcc_version(PLAN.nvcc)
    assert info["source_hash"] == SETUP.source_hash(), "csrc/ or python_api/ changed since _cuda was built: rebuild it"
    major, minor = (int(v) for v in info["nvcc_version"].split(".")[:2])
    assert info["cuda_runtime_version"] == 1000 * major + 10 * minor  # the static runtime of that nvcc


# ----------------------------------------------------------------------------- launcher errors


def _cpu_operands(T=37, n=130, m=77, k=45):
    x, V, S, U, b = make_inputs(T, n, m, k)
    return x, V, S, U, b, torch.empty(T, m), torch.empty(T, k)


def _mats(*tensors):
    return [cuda_backend._matrix(t) for t in tensors]


@pytest.mark.parametrize("case", ["fwd", "bwd", "snell"])
def test_launchers_on_host_memory_raise_the_cuda_error(native, case):
    """Host pointers never reach a kernel: without a GPU the CUDA runtime's own message comes back
    (e.g. 'CUDA driver version is insufficient', 'no CUDA-capable device'); with one, the pointer check."""
    x, V, S, U, b, y, h = _cpu_operands()
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"CUDA error in \w+|is not CUDA device memory") as err:
        if case == "fwd":
            native.lowrank_fwd(*_mats(x, V, S, U, b, y, h), ws.data_ptr(), ws.numel(), 0)
        elif case == "bwd":
            dx, dS = torch.empty(37, 130), torch.empty(45, 45)
            native.lowrank_bwd(*_mats(y, h, V, S, U, dx, dS), ws.data_ptr(), ws.numel(), 0)
        else:
            A, B = torch.randn(2, 130, 4), torch.randn(2, 77, 4)
            out = torch.empty(77, 130)
            native.snell_delta(
                cuda_backend._tensor3(A), cuda_backend._tensor3(B), [0.1, -0.1], 0.0, cuda_backend._matrix(out), 0
            )
    if not torch.cuda.is_available():
        assert "CUDA error" in str(err.value)


BAD_CALLS = {
    "V rows": (lambda x, V, S, U, b, y, h: (x, V[:-1], S, U, b, y, h), "V must have shape (130, 45), got (129, 45)"),
    "U dtype": (lambda x, V, S, U, b, y, h: (x, V, S, U.half(), b, y, h), "U must be float32, got float16"),
    "S dtype": (
        lambda x, V, S, U, b, y, h: (x.half(), V.half(), S.bfloat16(), U.half(), b.half(), y.half(), h.half()),
        "S must be float16 (x's dtype) or float32, got bfloat16",
    ),
    "bias len": (lambda x, V, S, U, b, y, h: (x, V, S, U, b[:-1], y, h), "bias must have shape (1, 77), got (1, 76)"),
    "y shape": (lambda x, V, S, U, b, y, h: (x, V, S, U, b, y[:, :-1], h), "y must have shape (37, 77), got (37, 76)"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_launcher_rejects_bad_shapes_and_dtypes_before_touching_cuda(native, case):
    change, message = BAD_CALLS[case]
    operands = change(*_cpu_operands())
    with pytest.raises(ValueError, match=re.escape(message)):
        native.lowrank_fwd(*_mats(*operands), 0, 1 << 20, 0)


def test_launcher_rejects_small_workspace_and_bad_dtype_code(native):
    x, V, S, U, b, y, h = _cpu_operands()
    need = native.lowrank_fwd_workspace_bytes(*_mats(x, V, S, U))
    assert need >= 77 * 45 * 4  # U·S lives there
    with pytest.raises(ValueError, match=f"workspace too small: need {need} bytes, got {need - 1}"):
        native.lowrank_fwd(*_mats(x, V, S, U, b, y, h), 0, need - 1, 0)
    bad = list(cuda_backend._matrix(x))
    bad[1] = 7
    with pytest.raises(ValueError, match="dtype code must be 0 .* got 7"):
        native.lowrank_fwd_workspace_bytes(tuple(bad), *_mats(V, S, U))
    with pytest.raises(ValueError, match=r"coeffs must hold one value per head \(H=2\), got 1"):
        A = cuda_backend._tensor3(torch.randn(2, 5, 3))
        native.snell_delta(A, A, [0.1], 0.0, cuda_backend._matrix(torch.empty(5, 5)), 0)


# ------------------------------------------------------------------------------ backend choice


def test_forced_cuda_backend_on_cpu_lists_every_reason(monkeypatch):
    monkeypatch.setenv("CERSA_BACKEND", "cuda")
    x, V, S, U, b = (t.double() for t in make_inputs(4, 8, 8, 2))
    with pytest.raises(BackendUnavailableError, match="CERSA_BACKEND=cuda cannot run cersa::lowrank_fwd") as err:
        lowrank_linear(x, V, S, U, b)
    assert "the cuda backend needs CUDA tensors" in str(err.value)
    assert "dtype float64 is not supported by the cuda backend" in str(err.value)


def test_reasons_for_unknown_op_and_mixed_dtypes():
    x = torch.randn(3, 4)
    reasons = unavailable_reasons("cuda", "pica_fwd", [x.half(), x.bfloat16()])
    assert any("tensors mix bfloat16/float16" in r for r in reasons), reasons
    if PLAN.nvcc is not None:
        assert any("_cuda has no kernel for pica_fwd (it has lowrank_fwd, lowrank_bwd, snell_delta)" in r for r in reasons)
    fp32_master = unavailable_reasons("cuda", "lowrank_fwd", [x.bfloat16(), x])  # S in fp32 is supported
    assert not any("dtype" in r or "mix" in r for r in fp32_master), fp32_master


def test_wrappers_called_directly_on_cpu_say_why():
    x, V, S, U, b = make_inputs(4, 8, 8, 2)
    with pytest.raises(RuntimeError, match="the cuda backend cannot run lowrank_fwd: .*needs CUDA tensors"):
        cuda_backend.lowrank_fwd_cuda(x, V, S, U, b)
    with pytest.raises(RuntimeError, match="the cuda backend cannot run snell_delta: .*needs CUDA tensors"):
        cuda_backend.snell_delta_cuda(torch.randn(2, 5, 3), torch.randn(2, 4, 3), (0.1, -0.1), 0.0)


# ------------------------------------------------------------------ the skip path of the build


def test_build_plan_honours_the_environment():
    path = os.environ["PATH"]
    skip = SETUP.cuda_build_plan({"PATH": path, "CERSA_SKIP_CUDA": "1"})
    assert skip.nvcc is None and skip.reason == "CERSA_SKIP_CUDA is set"
    assert SETUP.cuda_build_plan({"PATH": "/nonexistent"}).reason == "nvcc not found on PATH or in $CUDA_HOME/bin"
    if PLAN.nvcc is None:
        return
    default = SETUP.cuda_build_plan({"PATH": path})
    assert default.nvcc == PLAN.nvcc and default.archs == ["80", "90a"]
    assert SETUP.cuda_build_plan({"PATH": path, "CERSA_CUDA_ARCHS": "86; 90a"}).archs == ["86", "90a"]
    cuda_home = str(Path(PLAN.nvcc).resolve().parents[1])
    assert SETUP.cuda_build_plan({"PATH": "/nonexistent", "CUDA_HOME": cuda_home}).nvcc is not None
    with pytest.raises(ValueError, match="CERSA_CUDA_ARCHS must list compute capabilities like '80;90a', got 'sm_80'"):
        SETUP.cuda_build_plan({"PATH": path, "CERSA_CUDA_ARCHS": "sm_80"})
    with pytest.raises(ValueError, match="need compute capability 80 or newer, got 75"):
        SETUP.cuda_build_plan({"PATH": path, "CERSA_CUDA_ARCHS": "75;80"})


def test_build_with_skip_variable_builds_nothing(tmp_path):
    env = dict(os.environ, CERSA_SKIP_CUDA="1")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "tmp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "not building the CUDA module _cuda: CERSA_SKIP_CUDA is set" in done.stderr
    assert not list(tmp_path.rglob("_cuda*")), "a module was built although CERSA_SKIP_CUDA=1"


def test_backend_reports_a_missing_module(monkeypatch):
    """What a user of a CERSA_SKIP_CUDA / no-nvcc install sees."""
    monkeypatch.setitem(sys.modules, "cersa_kernels._cuda", None)  # import now fails as if never built
    cuda_backend._load.cache_clear()
    try:
        reasons = unavailable_reasons("cuda", "lowrank_fwd", [torch.randn(2, 2)])
        assert reasons[0].startswith("the native module cersa_kernels._cuda is not built (")
        assert "CERSA_SKIP_CUDA is not set" in reasons[0] and "nvcc is on PATH" in reasons[0]
        with pytest.raises(RuntimeError, match="cersa_kernels._cuda is not built"):
            cuda_backend.build_info()
    finally:
        cuda_backend._load.cache_clear()


# ========================================================================= GPU
# (the kernels against a float64 oracle live beside their ops: test_lowrank.py, test_snell.py)

DEV = "cuda"


@pytest.mark.gpu
def test_gpu_host_pointer_is_refused_and_the_context_survives(native):
    x, V, S, U, b, y, h = _cpu_operands()
    ws = torch.empty(1 << 20, dtype=torch.uint8, device=DEV)
    with pytest.raises(RuntimeError, match="x is not CUDA device memory"):
        native.lowrank_fwd(*_mats(x, V, S, U, b, y, h), ws.data_ptr(), ws.numel(), 0)
    assert float(torch.ones(4, device=DEV).sum()) == 4.0
