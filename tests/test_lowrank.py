"""The CERSA low-rank op: Triton (interpreted, float32) and reference against a float64 oracle,
forward and every gradient; backend selection; on a GPU the Triton and _cuda kernels in every dtype
(opcheck, gradcheck, compile and saved bytes: test_ops_contract.py)."""
import pytest
import torch

from cersa_kernels.backends import BackendUnavailableError, select_backend, use_backend
from cersa_kernels.backends import cuda as cuda_backend
from cersa_kernels.ops import lowrank_linear
from cersa_kernels.reference.lowrank import lowrank_bwd, lowrank_fwd

from tolerances import assert_matches_reference

# (T, n, m, k): odd and prime sizes, k = 1, a T large enough to split the dS reduction over programs.
SHAPES = [(37, 130, 77, 45), (37, 130, 77, 1), (5, 64, 96, 64), (700, 33, 19, 7)]


def make_inputs(T, n, m, k, dtype=torch.float32, bias=True, layout="contiguous"):
    """Random (never zero) inputs; x in the requested memory layout, leading dims (T,) or (a, b)."""
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].to(dtype)
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64))[0].to(dtype)
    S = (torch.diag(torch.rand(k, dtype=torch.float64) + 0.5) + 0.1 * torch.randn(k, k, dtype=torch.float64)).to(dtype)
    b = torch.randn(m, dtype=dtype) if bias else None
    if layout == "contiguous":
        x = torch.randn(T, n, dtype=dtype)
    elif layout == "row_stride":  # every other column of a wider buffer: a 2-D view with a row stride
        x = torch.randn(T, 2 * n, dtype=dtype)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(n, T, dtype=dtype).T
    elif layout == "3d":
        x = torch.randn(1, T, n, dtype=dtype).expand(2, T, n).clone()[:, :, :]  # (2, T, n)
        x = x + torch.randn_like(x)
    else:
        raise AssertionError(layout)
    return x, V, S, U, b


def run(backend, x, V, S, U, b, dy_seed=1):
    """Forward + backward through the public op; returns y, dx, dS, dbias."""
    x = x.detach().requires_grad_(True)
    S = S.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    with use_backend(backend):
        y = lowrank_linear(x, V, S, U, b)
        # drawn in float32 whatever y.dtype is, so every run gets the same upstream gradient
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.device, y.dtype)
        y.backward(dy)
    return y.detach(), x.grad, S.grad, None if b is None else b.grad


def oracle(x, V, S, U, b):
    """Same call in float64 on the reference."""
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run("torch", as64(x), as64(V), as64(S), as64(U), as64(b))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}k{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_matches_reference(shape, bias):
    inputs = make_inputs(*shape, bias=bias)
    expected = oracle(*inputs)
    eager = run("torch", *inputs)
    got = run("triton", *inputs)
    for name, g, e, r in zip(["y", "dx", "dS", "dbias"], got, eager, expected):
        if r is None:
            assert g is None
            continue
        assert_matches_reference(g, e, r, f"{name} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [(s, "contiguous") for s in SHAPES + [(1000, 257, 193, 130)]]
    + [(SHAPES[0], "row_stride"), (SHAPES[0], "transposed"), (SHAPES[0], "3d")],
    ids=lambda v: v if isinstance(v, str) else "T{}n{}m{}k{}".format(*v),
)
def test_triton_on_gpu(shape, layout, dtype):
    """The compiled Triton kernels on the real chip in every dtype (the interpreter's bf16 is wrong)."""
    inputs = [None if t is None else t.to("cuda", dtype) for t in make_inputs(*shape, layout=layout)]
    expected = oracle(*inputs)
    eager = run("torch", *inputs)
    got = run("triton", *inputs)
    for name, g, e, r in zip(["y", "dx", "dS", "dbias"], got, eager, expected):
        assert_matches_reference(g, e, r, f"{name} {shape} {layout} {dtype}")


@pytest.mark.parametrize("layout", ["row_stride", "transposed", "3d"])
def test_triton_layouts(layout):
    inputs = make_inputs(37, 130, 77, 45, layout=layout)
    assert inputs[0].is_contiguous() == (layout == "3d")
    expected = oracle(*inputs)
    eager = run("torch", *inputs)
    got = run("triton", *inputs)
    assert got[0].shape == inputs[0].shape[:-1] + (77,)
    for name, g, e, r in zip(["y", "dx", "dS", "dbias"], got, eager, expected):
        assert_matches_reference(g, e, r, f"{name} {layout}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_dx_when_input_needs_no_grad(backend):
    x, V, S, U, b = make_inputs(37, 130, 77, 45)
    S = S.requires_grad_(True)
    with use_backend(backend):
        lowrank_linear(x, V, S, U, b).sum().backward()
    r_S = S.detach().double().requires_grad_(True)
    lowrank_linear(x.double(), V.double(), r_S, U.double(), b.double()).sum().backward()
    torch.testing.assert_close(S.grad.double(), r_S.grad, atol=1e-4, rtol=1e-5)
    dx, dS = torch.ops.cersa.lowrank_bwd(torch.randn(37, 77), torch.randn(37, 45), V, S.detach(), U, False)
    assert dx.shape == (0, 130) and dS.shape == (45, 45)


def test_fp32_master_core_with_lower_precision_activations():
    """S may be kept in fp32 beside fp16 weights: dS comes back in fp32."""
    x, V, S, U, b = make_inputs(37, 64, 48, 16)
    S32 = S.clone().requires_grad_(True)
    with use_backend("triton"):
        y = lowrank_linear(x.half(), V.half(), S32, U.half(), b.half())
        y.float().sum().backward()
    assert y.dtype == torch.float16 and S32.grad.dtype == torch.float32
    ref_S = S.double().requires_grad_(True)
    lowrank_linear(x.double(), V.double(), ref_S, U.double(), b.double()).sum().backward()
    torch.testing.assert_close(S32.grad.double(), ref_S.grad, atol=0.5, rtol=2e-2)


def test_reference_functions_are_the_math():
    """The reference is the literal formula of docs/methods.md §1 (transposes included)."""
    x, V, S, U, b = (t.double() for t in make_inputs(5, 6, 7, 3))
    y, h = lowrank_fwd(x, V, S, U, b)
    torch.testing.assert_close(y, x @ (U @ S @ V.T).T + b)
    dy = torch.randn(5, 7, dtype=torch.float64)
    dx, dS = lowrank_bwd(dy, h, V, S, U, True)
    torch.testing.assert_close(dS, (dy @ U).T @ (x @ V))
    torch.testing.assert_close(dx, dy @ (U @ S @ V.T))


class TestBackendSelection:
    def test_forced_cuda_on_cpu_lists_reasons(self, monkeypatch):
        monkeypatch.setenv("CERSA_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError, match="CERSA_BACKEND=cuda cannot run cersa::lowrank_fwd") as e:
            lowrank_linear(*make_inputs(4, 8, 8, 2))
        assert "needs CUDA tensors" in str(e.value)

    def test_forced_triton_bf16_under_interpreter(self):
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="bfloat16 tl.dot is wrong"):
            lowrank_linear(*make_inputs(4, 8, 8, 2, dtype=torch.bfloat16))

    def test_forced_triton_on_cpu_without_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="Triton needs CUDA tensors"):
            lowrank_linear(*make_inputs(4, 8, 8, 2))

    def test_unknown_name(self, monkeypatch):
        monkeypatch.setenv("CERSA_BACKEND", "tpu")
        with pytest.raises(ValueError, match="CERSA_BACKEND must be one of auto, torch, triton, cuda; got 'tpu'"):
            lowrank_linear(*make_inputs(4, 8, 8, 2))

    def test_auto_on_cpu_is_the_reference(self, monkeypatch):
        import cersa_kernels.backends as backends

        monkeypatch.setenv("CERSA_BACKEND", "auto")
        assert backends.select_backend("lowrank_fwd", [torch.randn(2, 2)]) == "torch"


# ---------------------------------------------------------------- the _cuda kernels on a GPU, vs float64

DEV = "cuda"
# odd and prime sizes, k = 1, a T that splits the dS reduction over blocks, k over two tiles
CUDA_SHAPES = [(37, 130, 77, 45), (37, 130, 77, 1), (1000, 64, 96, 64), (5, 300, 140, 130)]
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
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "T{}n{}m{}k{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_kernels_match_float64(shape, dtype, bias):
    x, V, S, U, b = gpu_inputs(*shape, dtype, bias=bias)
    h = check_fwd(x, V, S, U, b, f"{shape} {dtype}")
    dy = torch.randn(shape[0], shape[2], device=DEV).to(dtype)
    for need_dx in (True, False):
        check_bwd(dy, h, V, S, U, need_dx, f"{shape} {dtype} need_dx={need_dx}")


@pytest.mark.gpu
def test_cuda_empty_batch():
    x, V, S, U, b = gpu_inputs(0, 16, 8, 4, torch.float16)
    y, h = cuda_backend.lowrank_fwd_cuda(x, V, S, U, b)
    assert y.shape == (0, 8) and h.shape == (0, 4)
    dx, dS = cuda_backend.lowrank_bwd_cuda(y, h, V, S, U, True)
    assert dx.shape == (0, 16) and torch.equal(dS, torch.zeros_like(S))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_stride", "transposed"])
def test_cuda_strided_inputs(dtype, layout):
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, dtype, layout=layout)
    assert not x.is_contiguous()
    h = check_fwd(x, V, S, U, b, layout)
    dy = _on_gpu(torch.randn(37, 77), dtype, layout)  # strided upstream gradient and strided h too
    check_bwd(dy, _on_gpu(h, dtype, layout), V, S, U, True, layout)
    check_bwd(dy, h, V.T.contiguous().T, S.T.contiguous().T, U.T.contiguous().T, True, f"{layout} weights")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_fp32_master_core(dtype):
    """S kept in fp32 beside 16-bit activations: cast to x's dtype for the products, dS in fp32."""
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, dtype, s_dtype=torch.float32)
    h = check_fwd(x, V, S, U, b, "fp32 S")
    check_bwd(torch.randn(37, 77, device=DEV).to(dtype), h, V, S, U, True, "fp32 S")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_public_op_routes_to_cuda(dtype):
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
def test_cuda_opcheck():
    x, V, S, U, b = gpu_inputs(37, 130, 77, 45, torch.float32)
    with use_backend("cuda"):
        torch.library.opcheck(torch.ops.cersa.lowrank_fwd.default, (x, V, S.requires_grad_(), U, b.requires_grad_()))
        dy, h = torch.randn(37, 77, device=DEV), torch.randn(37, 45, device=DEV)
        for need_dx in (True, False):
            torch.library.opcheck(torch.ops.cersa.lowrank_bwd.default, (dy, h, V, S.detach(), U, need_dx))


@pytest.mark.gpu
def test_cuda_kernels_run_on_the_current_stream():
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
