"""The LoRA op and LoraLinear: Triton (interpreted, float32) and reference against a float64 oracle,
reproducible dropout, gradcheck, opcheck, torch.compile, saved bytes, errors."""
import pytest
import torch
from torch import nn

from cersa_kernels import LoraLinear
from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.backends import use_backend
from cersa_kernels.ops import lora_linear
from cersa_kernels.reference.lora import dropout_keep, hash32

from op_harness import check_triton_against_reference, on_gpu, run

# (T, n, m, r): odd and prime sizes, r = 1, and a T long enough to split the reductions over T.
SHAPES = [(37, 130, 77, 8), (37, 130, 77, 1), (700, 33, 19, 7)]


def make(T, n, m, r, bias=True, lead=None, dtype=torch.float32):
    x = torch.randn(*(lead or (T,)), n, dtype=dtype)
    return dict(
        x=x, W=torch.randn(m, n, dtype=dtype) / n**0.5, A=torch.randn(r, n, dtype=dtype) / n**0.5,
        B=torch.randn(m, r, dtype=dtype), bias=torch.randn(m, dtype=dtype) if bias else None,
    )


def grads_of(inputs):
    return ["x", "A", "B"] + (["bias"] if inputs["bias"] is not None else [])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_triton_matches_reference(shape, bias, p):
    inputs = make(*shape, bias=bias)
    fn = lambda x, W, A, B, bias: lora_linear(x, W, A, B, bias, scale=1.7, dropout_p=p, seed=1234)  # noqa: E731
    check_triton_against_reference(fn, inputs, grads_of(inputs), f"{shape} bias={bias} p={p}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1000, 257, 193, 16)], ids=lambda s: "T{}n{}m{}r{}".format(*s))
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_triton_on_gpu(shape, dtype, p):
    """The compiled Triton kernels on the real chip in every dtype (the interpreter's bf16 is wrong)."""
    inputs = on_gpu(make(*shape), dtype)
    fn = lambda x, W, A, B, bias: lora_linear(x, W, A, B, bias, scale=1.7, dropout_p=p, seed=1234)  # noqa: E731
    check_triton_against_reference(fn, inputs, grads_of(inputs), f"{shape} {dtype} p={p}")


def test_triton_3d_input():
    inputs = make(37, 130, 77, 8, lead=(2, 37))
    fn = lambda x, W, A, B, bias: lora_linear(x, W, A, B, bias, scale=0.5, dropout_p=0.2, seed=7)  # noqa: E731
    check_triton_against_reference(fn, inputs, grads_of(inputs), "3d")
    assert run("triton", fn, inputs, ["A"])[0].shape == (2, 37, 77)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_forward_and_backward_use_the_same_mask(backend):
    """Against plain autograd over an explicit mask: forward and every gradient agree, so the
    backward regenerated exactly the forward's mask (on Triton: the in-kernel hash is the reference's)."""
    T, n, m, r, p, s = 37, 130, 77, 8, 0.4, 2.0
    inputs = make(T, n, m, r)
    keep = dropout_keep(T, n, p, torch.tensor(99))
    y, g = run(backend, lambda x, W, A, B, bias: lora_linear(x, W, A, B, bias, s, p, 99), inputs, ["x", "A", "B"])

    def composed(x, W, A, B, bias):
        return x @ W.T + bias + s * ((x * keep / (1 - p)) @ A.T) @ B.T

    y_ref, g_ref = run("torch", composed, inputs, ["x", "A", "B"])
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-4, rtol=1e-4, msg=k)


def test_dropout_mask_is_a_function_of_the_seed():
    a = dropout_keep(64, 130, 0.3, torch.tensor(5))
    assert torch.equal(a, dropout_keep(64, 130, 0.3, torch.tensor(5)))
    assert not torch.equal(a, dropout_keep(64, 130, 0.3, torch.tensor(6)))
    rate = 1 - a.float().mean().item()
    assert abs(rate - 0.3) < 0.03, rate  # 8320 draws: 5 standard deviations
    assert dropout_keep(8, 8, 0.0, torch.tensor(5)).all()
    assert hash32(0) == 0 and hash32(1) != hash32(2) < 2**32


def test_lora_linear_dropout_reproducible_under_manual_seed():
    layer = LoraLinear.from_linear(nn.Linear(130, 77), rank=8, alpha=16, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(37, 130)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    torch.manual_seed(4)
    y3 = layer(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.to_linear()(x), atol=1e-5, rtol=1e-5)


def test_from_linear_initial_state_and_merge():
    linear = nn.Linear(130, 77)
    layer = LoraLinear.from_linear(linear, rank=8, alpha=16)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(5, 130)
    torch.testing.assert_close(layer(x), linear(x))  # B = 0: step 0 is the base layer exactly
    nn.init.normal_(layer.lora_B)
    torch.testing.assert_close(layer(x), layer.to_linear()(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_torch_compile_draws_the_dropout_seed_inside_the_graph():
    """The layer's dropout seed is drawn in the compiled graph (the op itself: tests/test_ops_contract.py)."""
    torch._dynamo.reset()
    layer = LoraLinear.from_linear(nn.Linear(130, 77), 8, dropout=0.1)
    torch.compile(layer, fullgraph=True)(torch.randn(37, 130)).sum().backward()
    assert layer.lora_A.grad is not None


class TestErrors:
    def test_wrong_in_features(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(ValueError, match=r"my.layer: expected input with last dimension in_features=10, got shape \(4, 11\)"):
            lora_linear(torch.randn(4, 11), i["W"], i["A"], i["B"], layer="my.layer")

    def test_wrong_factor_shapes(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(ValueError, match=r"B must have shape \(6, 2\), got \(6, 3\)"):
            lora_linear(i["x"], i["W"], i["A"], torch.randn(6, 3))
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
            lora_linear(i["x"], i["W"], i["A"], i["B"], torch.randn(5))

    def test_dtype_mismatch(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(TypeError, match="dtype mismatch.*A=float64"):
            lora_linear(i["x"], i["W"], i["A"].double(), i["B"])

    def test_frozen_weight(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(ValueError, match="W is frozen"):
            lora_linear(i["x"], i["W"].requires_grad_(), i["A"], i["B"])

    def test_dropout_arguments(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
            lora_linear(i["x"], i["W"], i["A"], i["B"], dropout_p=1.0, seed=1)
        with pytest.raises(ValueError, match="dropout_p=0.1 needs an explicit seed"):
            lora_linear(i["x"], i["W"], i["A"], i["B"], dropout_p=0.1)
        with pytest.raises(TypeError, match="seed must be an int64 scalar tensor, got torch.float32"):
            lora_linear(i["x"], i["W"], i["A"], i["B"], dropout_p=0.1, seed=torch.tensor(1.0))

    def test_layer_arguments(self):
        with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\) = 6\], got 7"):
            LoraLinear(10, 6, 7)
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
            LoraLinear(10, 6, 2, dropout=1.5)
        with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
            LoraLinear.from_linear(nn.Conv1d(2, 2, 1), 1)


def test_triton_dropout_never_materialises_the_mask():
    """The Triton forward applies the mask inside the GEMM: no T×n mask (bool) or counter (int64)
    tensor is created. The reference creates them in row chunks (so the probe can see them), none
    of them T×n. Float T×n tensors are not probed: the interpreter copies every float argument to
    launch a kernel."""
    from cersa_kernels.reference.lora import lora_fwd
    from cersa_kernels.triton.lora import lora_fwd_triton

    T, n, m, r = 37, 130, 77, 8
    i = make(T, n, m, r)
    masks = {}
    # the kernels themselves (the custom op is one opaque node to a dispatch mode)
    for kernel in (lora_fwd_triton, lora_fwd):
        with torch.no_grad(), AllocationRecorder() as rec:
            kernel(i["x"], i["W"], i["bias"], i["A"], i["B"], 2.0, 0.3, torch.tensor(5))
        # bool (1 byte) and int64 (8 bytes) allocations only
        masks[kernel] = [a.numel for a in rec.allocations if a.nbytes in (a.numel, 8 * a.numel) and a.numel > 1]
    assert T * n not in masks[lora_fwd_triton], masks[lora_fwd_triton]
    assert masks[lora_fwd] and max(masks[lora_fwd]) < T * n, masks[lora_fwd]


def test_allocation_recorder_runs_lora_with_dropout_on_triton():
    # the recorder runs an op through the op's own dispatch: the CPU int64 dropout seed is not an
    # operand that chooses the backend (it once made the recorder refuse LoRA on triton)
    g = torch.Generator().manual_seed(4)
    x, W, A, B = (torch.randn(*s, generator=g) for s in ((5, 8), (6, 8), (2, 8), (6, 2)))
    with use_backend("triton"), torch.no_grad(), AllocationRecorder() as rec:
        y = lora_linear(x, W, A, B, None, 1.0, 0.3, seed=7)
    assert rec.cersa_ops == ["lora_fwd"] and y.shape == (5, 6)
