"""The CUDA C++ backend (csrc/ + python_api/ -> cersa_kernels._cuda).

On a CPU-only machine: the module is built, links and imports; build_info() matches this checkout
and this nvcc; the launchers reject bad shapes with ValueError and, without GPU memory behind the
pointers, raise the CUDA error instead of crashing; the backend explains why it cannot run; the
build decision (CERSA_SKIP_CUDA, no nvcc, CERSA_CUDA_ARCHS) is honoured.
On a GPU (`-m gpu`): every kernel against a float64 oracle with the accumulation rule of
tests/tolerances.py, for bf16, fp16, fp32, odd shapes, strided inputs, bias or not, need_dx False.
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

from cersa_kernels.backends import BackendUnavailableError, select_backend, unavailable_reasons, use_backend
from cersa_kernels.backends import cuda as cuda_backend
from cersa_kernels.ops import lowrank_linear
from cersa_kernels.reference.lowrank import lowrank_bwd, lowrank_fwd

from test_lowrank import make_inputs
from tolerances import assert_matches_reference

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


# ========================================================================= GPU: kernels vs float64

DEV = "cuda"
# odd and prime sizes, k = 1, a T that splits the dS reduction over blocks, k over two tiles
SHAPES = [(37, 130, 77, 45), (37, 130, 77, 1), (1000, 64, 96, 64), (5, 300, 140, 130)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _on_gpu(t, dtype, layout="contiguous"):
    """t's values on the GPU in `dtype`, in the memory layout asked for (same values every layout)."""
    t = t.to(DEV, dtype)
    if layout == "row_stride":  # every other column of a wider buffer: stride (2n, 2)
        buf = torch.zeros(t.shape[0], 2 * t.shape[1], device=DEV, dtype=dtype)
        buf[:, ::2] = t
        return buf[:, ::2]
    if layout == "transposed":
        return t.T.contiguous().T
    return t


def gpu_inputs(T, n, m, k, dtype, s_dtype=None, bias=True, layout="contiguous"):
    x, V, S, U, b = make_inputs(T, n, m, k, bias=bias)
    S = S.to(DEV, s_dtype or dtype)
    return _on_gpu(x, dtype, layout), V.to(DEV, dtype), S, U.to(DEV, dtype), None if b is None else b.to(DEV, dtype)


def as64(*ts):
    return [None if t is None else t.double() for t in ts]


def check_fwd(x, V, S, U, b, what):
    y, h = cuda_backend.lowrank_fwd_cuda(x, V, S, U, b)
    eager = lowrank_fwd(x, V, S, U, b)
    ref = lowrank_fwd(*as64(x, V, S, U, b))
    assert y.dtype == h.dtype == x.dtype
    for name, got, e, r in zip(("y", "h"), (y, h), eager, ref):
        assert_matches_reference(got, e, r, f"{name} {what}")
    return h


def check_bwd(dy, h, V, S, U, need_dx, what):
    dx, dS = cuda_backend.lowrank_bwd_cuda(dy, h, V, S, U, need_dx)
    eager = lowrank_bwd(dy, h, V, S, U, need_dx)
    ref = lowrank_bwd(*as64(dy, h, V, S, U), need_dx)
    assert dS.dtype == S.dtype, f"dS must come back in S's dtype {S.dtype}, got {dS.dtype}"
    assert_matches_reference(dS, eager[1], ref[1], f"dS {what}")
    if need_dx:
        assert_matches_reference(dx, eager[0], ref[0], f"dx {what}")
    else:
        assert dx.shape == (0, V.shape[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}k{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gpu_kernels_match_float64(shape, dtype, bias):
    x, V, S, U, b = gpu_inputs(*shape, dtype, bias=bias)
    h = check_fwd(x, V, S, U, b, f"{shape} {dtype}")
    dy = torch.randn(shape[0], shape[2], device=DEV).to(dtype)
    for need_dx in (True, False):
        check_bwd(dy, h, V, S, U, need_dx, f"{shape} {dtype} need_dx={need_dx}")


@pytest.mark.gpu
def test_gpu_empty_batch():
    x, V, S, U, b = gpu_inputs(0, 16, 8, 4, torch.float16)
    y, h = cuda_backend.lowrank_fwd_cuda(x, V, S, U, b)
    assert y.shape == (0, 8) and h.shape == (0, 4)
    dx, dS = cuda_backend.lowrank_bwd_cuda(y, h, V, S, U, True)
    assert dx.shape == (0, 16) and torch.equal(dS, torch.zeros_like(S))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "transposed"])
def test_gpu_strided_inputs(dtype, layout):
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, dtype, layout=layout)
    assert not x.is_contiguous()
    h = check_fwd(x, V, S, U, b, layout)
    dy = _on_gpu(torch.randn(37, 77), dtype, layout)  # strided upstream gradient and strided h too
    check_bwd(dy, _on_gpu(h, dtype, layout), V, S, U, True, layout)
    check_bwd(dy, h, V.T.contiguous().T, S.T.contiguous().T, U.T.contiguous().T, True, f"{layout} weights")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fp32_master_core(dtype):
    """S kept in fp32 beside 16-bit activations: cast to x's dtype for the products, dS in fp32."""
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, dtype, s_dtype=torch.float32)
    h = check_fwd(x, V, S, U, b, "fp32 S")
    check_bwd(torch.randn(37, 77, device=DEV).to(dtype), h, V, S, U, True, "fp32 S")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_public_op_routes_to_cuda(dtype):
    """CERSA_BACKEND=cuda through the custom op and autograd, 3-D input, against the float64 oracle."""
    x, V, S, U, b = gpu_inputs(2 * 37, 130, 77, 45, dtype)
    x = x.reshape(2, 37, 130)
    dy = torch.randn(2, 37, 77, device=DEV).to(dtype)

    def run(backend, *args):
        x_, V_, S_, U_, b_ = (a.detach().clone() for a in args)
        leaves = [x_.requires_grad_(), S_.requires_grad_(), b_.requires_grad_()]
        with use_backend(backend):
            y = lowrank_linear(x_, V_, S_, U_, b_)
            y.backward(dy.to(y.dtype))
        return [y.detach()] + [t.grad for t in leaves]

    with use_backend("cuda"):
        assert select_backend("lowrank_fwd", [x, V, S, U, b]) == "cuda"
    got = run("cuda", x, V, S, U, b)
    eager = run("torch", x, V, S, U, b)
    ref = run("torch", *as64(x, V, S, U, b))
    for name, g, e, r in zip(("y", "dx", "dS", "dbias"), got, eager, ref):
        assert_matches_reference(g, e, r, f"{name} via op")


@pytest.mark.gpu
def test_gpu_opcheck():
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, torch.float32)
    with use_backend("cuda"):
        torch.library.opcheck(torch.ops.cersa.lowrank_fwd.default, (x, V, S.requires_grad_(), U, b.requires_grad_()))
        dy, h = torch.randn(37, 77, device=DEV), torch.randn(37, 45, device=DEV)
        for need_dx in (True, False):
            torch.library.opcheck(torch.ops.cersa.lowrank_bwd.default, (dy, h, V, S.detach(), U, need_dx))


@pytest.mark.gpu
def test_gpu_kernels_run_on_the_current_stream():
    """x is written on a side stream after a long sleep; kernels launched on another stream would
    read it before it is written."""
    x, V, S, U, b = gpu_inputs(512, 256, 256, 64, torch.float16)
    expected, _ = cuda_backend.lowrank_fwd_cuda(x, V, S, U, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        late = torch.empty_like(x)
        torch.cuda._sleep(50_000_000)
        late.copy_(x)
        y, _ = cuda_backend.lowrank_fwd_cuda(late, V, S, U, b)
    side.synchronize()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_host_pointer_is_refused_and_the_context_survives(native):
    x, V, S, U, b, y, h = _cpu_operands()
    ws = torch.empty(1 << 20, dtype=torch.uint8, device=DEV)
    with pytest.raises(RuntimeError, match="x is not CUDA device memory"):
        native.lowrank_fwd(*_mats(x, V, S, U, b, y, h), ws.data_ptr(), ws.numel(), 0)
    assert float(torch.ones(4, device=DEV).sum()) == 4.0


def snell_ref64(A, B, coeffs, tau):
    """K[i, j] = Σ_h c_h‖B[h, i] − A[h, j]‖₂ in float64; K·|K| where |K| > tau, else 0 (docs/methods.md §4)."""
    A, B = A.double(), B.double()
    K = sum(c * (B[h][:, None, :] - A[h][None, :, :]).pow(2).sum(-1).sqrt() for h, c in enumerate(coeffs))
    return torch.where(K.abs() > tau, K * K.abs(), torch.zeros_like(K)), K


def _tau_in_a_gap(K):
    """A threshold near the median |K| with no |K| within fp32 reach of it, so the mask is exact."""
    v = K.abs().flatten().sort().values
    lo, hi = int(0.4 * v.numel()), int(0.6 * v.numel())
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-4 * float(v[-1]), "no usable gap; change the seed"
    return float(v[lo + i] + gaps[i] / 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(2, 130, 77, 4), (2, 64, 33, 8), (3, 37, 45, 40)], ids=lambda d: "H{}n{}m{}d{}".format(*d))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gpu_snell_delta_matches_float64(dtype, dims, sparse):
    H, n, m, d = dims
    coeffs = (0.1, -0.1) if H == 2 else (0.5, -0.2, 0.1)
    bound = 1 / d**0.5  # kaiming-uniform(a=√5) scale of SNELL's init
    A = (torch.rand(H, n, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    B = (torch.rand(H, m, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    _, K = snell_ref64(A, B, coeffs, 0.0)
    tau = _tau_in_a_gap(K) if sparse else 0.0
    ref, _ = snell_ref64(A, B, coeffs, tau)
    out = cuda_backend.snell_delta_cuda(A, B, coeffs, tau)
    assert out.shape == (m, n) and out.dtype == dtype
    # the float64 rule |K| > tau, after rounding to the dtype (tiny K·|K| underflow in fp16)
    assert torch.equal(out != 0, ref.to(dtype) != 0), "kept entries differ from the float64 rule |K| > tau"
    if sparse:
        assert 0.3 < float((ref != 0).double().mean()) < 0.7
    assert_matches_reference(out, ref.to(dtype), ref, f"snell {dims} {dtype}")
    # K is fp32 whatever the dtype: apart from the final rounding, the error is fp32-sized
    rounding = float((ref.to(dtype).double() - ref).abs().max())
    err = float((out.double() - ref).abs().max())
    assert err <= 2 * rounding + 1e-5 * float(ref.abs().max()), f"snell error {err:.3e}, rounding alone {rounding:.3e}"
    # strided views of the same values give the same answer
    A_t = A.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(cuda_backend.snell_delta_cuda(A_t, B, coeffs, tau), out, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_snell_delta_agrees_with_the_snell_reference(dtype):
    """The two sides of the snell_delta contract: the CUDA kernel and reference.snell.snell_delta."""
    from cersa_kernels.reference.snell import snell_delta

    H, n, m, d = 2, 130, 77, 4
    bound = 1 / d**0.5
    A = (torch.rand(H, n, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    B = (torch.rand(H, m, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    _, K = snell_ref64(A, B, (0.1, -0.1), 0.0)
    tau = _tau_in_a_gap(K)
    ref = snell_delta(A, B, (0.1, -0.1), tau)
    out = cuda_backend.snell_delta_cuda(A, B, (0.1, -0.1), tau)
    assert torch.equal(out != 0, ref != 0)
    assert_matches_reference(out, ref, snell_ref64(A, B, (0.1, -0.1), tau)[0], f"snell reference {dtype}")
