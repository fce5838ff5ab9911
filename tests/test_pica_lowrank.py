"""The pica_lowrank op (PiCa over CERSA in one op: the branch reuses CERSA's h = x V): Triton
(interpreted, float32) and reference against a float64 oracle, 2-D and 3-D, on a GPU in every dtype,
equality with the unfused composition, and its argument errors. Its opcheck, gradcheck, compile and
saved bytes: test_ops_contract.py."""
import pytest
import torch

from cersa_kernels.ops import lowrank_linear, pica_lowrank_linear

from op_harness import check_triton_against_reference, on_gpu, run
from test_pica import SHAPES, orthonormal_rows


def make_lowrank(T, n, m, r, k=45, bias=True, lead=None):
    k = min(max(k, r), n, m)
    return dict(
        x=torch.randn(*(lead or (T,)), n), V=orthonormal_rows(k, n).T.contiguous(),
        S=torch.diag(torch.rand(k) + 0.5) + 0.1 * torch.randn(k, k), U=orthonormal_rows(k, m).T.contiguous(),
        M=torch.randn(m, r), bias=torch.randn(m) if bias else None,
    )


def lowrank_fn(x, V, S, U, M, bias):
    return pica_lowrank_linear(x, V, S, U, M, bias)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pica_lowrank_triton_matches_reference(shape, bias):
    inputs = make_lowrank(*shape, bias=bias)
    check_triton_against_reference(lowrank_fn, inputs, ["x", "S", "M"] + (["bias"] if bias else []), f"{shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1000, 257, 193, 64)], ids=lambda s: "T{}n{}m{}r{}".format(*s))
def test_triton_on_gpu(shape, dtype):
    """Compiled on the real chip in every dtype (the interpreter's bf16 is wrong)."""
    check_triton_against_reference(
        lowrank_fn, on_gpu(make_lowrank(*shape), dtype), ["x", "S", "M", "bias"], f"pica_lowrank {shape} {dtype}"
    )


def test_3d_inputs():
    inputs = make_lowrank(37, 130, 77, 8, lead=(2, 37))
    check_triton_against_reference(lowrank_fn, inputs, ["x", "S", "M", "bias"], "pica_lowrank 3d")
    assert run("triton", lowrank_fn, inputs, ["M"])[0].shape == (2, 37, 77)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_cersa_pica_equals_the_unfused_composition(backend):
    """PiCa on a CERSA base in one op == CERSA op + a separate PiCa branch with P = V[:, :r]ᵀ
    projected again; also for r = k, the largest rank the fusion allows."""
    for r in (8, 45):
        i = make_lowrank(37, 130, 77, r)

        def unfused(x, V, S, U, M, bias):
            return lowrank_linear(x, V, S, U, bias) + (x @ V[:, :r]) @ M.T

        y, g = run(backend, lowrank_fn, i, ["x", "S", "M", "bias"])
        y_ref, g_ref = run("torch", unfused, i, ["x", "S", "M", "bias"])
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        for k in g:
            torch.testing.assert_close(g[k], g_ref[k], atol=1e-4, rtol=1e-4, msg=k)
        # dM = dyᵀ · h[:, :r]
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(g["M"], dy.T @ (i["x"] @ i["V"][:, :r]), atol=1e-4, rtol=1e-4)


def test_op_arguments():
    j = make_lowrank(4, 10, 6, 5, k=4)
    with pytest.raises(ValueError, match=r"PiCa rank r must be <= the CERSA rank k = 5 to reuse h = x V, got r = 6"):
        pica_lowrank_linear(j["x"], j["V"], j["S"], j["U"], torch.randn(6, 6))
