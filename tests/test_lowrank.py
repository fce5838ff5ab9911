"""The CERSA low-rank op: Triton (interpreted, float32) and reference against a float64 oracle,
forward and every gradient; gradcheck, opcheck and backend selection."""
import pytest
import torch

from cersa_kernels.backends import BackendUnavailableError, use_backend
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
        assert T % 1 == 0
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
