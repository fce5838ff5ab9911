"""PiCa: the pica op (Triton interpreted, float32, and reference against a float64 oracle),
PicaLinear on dense and CERSA bases, apply_pica's per-role sharing, errors. The pica_lowrank op
(PiCa over CERSA): test_pica_lowrank.py; opcheck, gradcheck, compile and saved bytes of both:
test_ops_contract.py."""
import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear, PicaCersaLinear, PicaLinear
from cersa_kernels.nn.pica import apply_pica
from cersa_kernels.ops import pica_linear

from op_harness import check_triton_against_reference, on_gpu, run

# (T, n, m, r): odd and prime sizes, r = 1, and a T long enough to split dM's reduction over T.
SHAPES = [(37, 130, 77, 8), (37, 130, 77, 1), (700, 33, 19, 7)]


def orthonormal_rows(r, n, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0].T.to(dtype)


def make(T, n, m, r, bias=True, lead=None):
    return dict(
        x=torch.randn(*(lead or (T,)), n), W=torch.randn(m, n) / n**0.5, P=orthonormal_rows(r, n),
        M=torch.randn(m, r), bias=torch.randn(m) if bias else None,
    )


def pica_fn(x, W, P, M, bias):
    return pica_linear(x, W, P, M, bias)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}n{}m{}r{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pica_triton_matches_reference(shape, bias):
    inputs = make(*shape, bias=bias)
    check_triton_against_reference(pica_fn, inputs, ["x", "M"] + (["bias"] if bias else []), f"{shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1000, 257, 193, 64)], ids=lambda s: "T{}n{}m{}r{}".format(*s))
def test_triton_on_gpu(shape, dtype):
    """The PiCa op compiled on the real chip in every dtype (the interpreter's bf16 is wrong)."""
    check_triton_against_reference(pica_fn, on_gpu(make(*shape), dtype), ["x", "M", "bias"], f"pica {shape} {dtype}")


def test_3d_inputs():
    check_triton_against_reference(pica_fn, make(37, 130, 77, 8, lead=(2, 37)), ["x", "M", "bias"], "pica 3d")
    assert run("triton", pica_fn, make(37, 130, 77, 8, lead=(2, 37)), ["M"])[0].shape == (2, 37, 77)


class Block(nn.Module):
    """Two 'blocks' with the same roles, as in a transformer: q (24->24), up (24->40), plus a CERSA q."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(q=nn.Linear(24, 24), up=nn.Linear(24, 40), down=nn.Linear(40, 24))) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["down"](torch.relu(layer["up"](layer["q"](x))))
        return x


def test_apply_pica_shares_one_M_per_role_and_sums_gradients():
    model = Block()
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        before = model(x)
    Ms = apply_pica(model, rank=4, target_modules=["q", "up"])
    assert set(Ms) == {"q", "up"} and Ms["q"].shape == (24, 4) and Ms["up"].shape == (40, 4)
    assert model.layers[0]["q"].M is model.layers[1]["q"].M is Ms["q"]
    assert isinstance(model.layers[0]["down"], nn.Linear)  # not targeted
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} >= {id(Ms["q"]), id(Ms["up"])}
    torch.testing.assert_close(model(x), before)  # M = 0: step 0 is the base model exactly
    # P = V_rᵀ: the top-r RIGHT singular vectors of the weight
    layer = model.layers[1]["up"]
    Vh = torch.linalg.svd(layer.weight.double())[2][:4]
    torch.testing.assert_close((layer.P.double() @ Vh.T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # the shared M's gradient is the sum of each layer's dyᵀ·h
    with torch.no_grad():
        Ms["q"].normal_()
        Ms["up"].normal_()
    hs = {}
    for i in range(2):
        for role in ("q", "up"):
            mod = model.layers[i][role]
            mod.register_forward_hook(lambda m, inp, out, key=(i, role): hs.__setitem__(key, (inp[0], out)))
    y = model(x)
    outs = [hs[(i, "q")][1] for i in range(2)] + [hs[(i, "up")][1] for i in range(2)]
    for o in outs:
        o.retain_grad()
    y.square().sum().backward()
    for role in ("q", "up"):
        expected = sum(
            hs[(i, role)][1].grad.reshape(-1, Ms[role].shape[0]).T
            @ (hs[(i, role)][0].reshape(-1, 24) @ model.layers[i][role].P.T)
            for i in range(2)
        )
        torch.testing.assert_close(Ms[role].grad, expected, atol=1e-4, rtol=1e-4)


def test_pica_on_cersa_base_reuses_the_basis():
    linear = nn.Linear(24, 40)
    cersa = CersaLinear.from_linear(linear, rank=10)
    model = nn.Sequential(cersa)
    Ms = apply_pica(model, rank=4)
    layer = model[0]
    assert layer.base is cersa and not hasattr(layer, "P")
    torch.testing.assert_close(layer.projection(), cersa.V[:, :4].T)
    x = torch.randn(7, 24)
    with torch.no_grad():
        Ms["0"].normal_()
    torch.testing.assert_close(layer(x), cersa(x) + (x @ cersa.V[:, :4]) @ Ms["0"].T, atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()
    assert cersa.S.grad is not None and Ms["0"].grad is not None
    # the same right singular vectors a dense PiCa layer would use (up to sign)
    dense = PicaLinear(linear, 4)
    torch.testing.assert_close((dense.P @ layer.projection().T).abs(), torch.eye(4), atol=1e-4, rtol=0)


class TestErrors:
    def test_role_with_different_out_features(self):
        model = nn.ModuleDict(dict(a=nn.ModuleDict(dict(proj=nn.Linear(8, 6))), b=nn.ModuleDict(dict(proj=nn.Linear(8, 5)))))
        with pytest.raises(
            ValueError, match=r"role 'proj' .* differ in out_features: a.proj: \(out=6, in=8\), b.proj: \(out=5, in=8\)"
        ):
            apply_pica(model, rank=2)

    def test_no_match(self):
        with pytest.raises(ValueError, match=r"no nn.Linear or CersaLinear layer matches target_modules=\['k_proj'\]"):
            apply_pica(nn.Sequential(nn.Linear(4, 4)), 2, ["k_proj"])

    def test_rank_too_large(self):
        with pytest.raises(ValueError, match=r"PicaLinear \(0\): rank must be in \[1, min\(m, n\) = 4\], got 5"):
            apply_pica(nn.Sequential(nn.Linear(4, 6)), 5)
        with pytest.raises(ValueError, match=r"PicaCersaLinear \(0\): rank must be in \[1, CERSA rank k = 3\]"):
            apply_pica(nn.Sequential(CersaLinear(8, 8, 3)), 4)

    def test_op_arguments(self):
        i = make(4, 10, 6, 2)
        with pytest.raises(ValueError, match=r"q.layer: expected input with last dimension in_features=10"):
            pica_linear(torch.randn(4, 9), i["W"], i["P"], i["M"], layer="q.layer")
        with pytest.raises(ValueError, match=r"M must have shape \(6, 2\), got \(6, 3\)"):
            pica_linear(i["x"], i["W"], i["P"], torch.randn(6, 3))
        with pytest.raises(ValueError, match="P is frozen"):
            pica_linear(i["x"], i["W"], i["P"].requires_grad_(), i["M"])
        with pytest.raises(TypeError, match="dtype mismatch.*P=float64"):
            pica_linear(i["x"], i["W"], i["P"].detach().double(), i["M"])


    def test_M_shape_for_layer(self):
        with pytest.raises(ValueError, match=r"M must have shape \(out_features, rank\) = \(6, 2\), got \(5, 2\)"):
            PicaLinear(nn.Linear(4, 6), 2, nn.Parameter(torch.zeros(5, 2)))


def test_pica_over_cersa_is_its_own_class_and_the_old_spelling_still_works():
    cersa = CersaLinear.from_linear(nn.Linear(8, 8), rank=4)
    with pytest.warns(DeprecationWarning, match="PicaCersaLinear"):
        layer = PicaLinear(cersa, 2)
    assert type(layer) is PicaCersaLinear and isinstance(layer, PicaLinear) and layer.base is cersa
    assert not hasattr(layer, "P") and not hasattr(layer, "weight")
