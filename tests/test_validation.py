"""Arguments are validated where they enter (issue 9 item 7): each bad value raises ValueError or
TypeError naming the layer or caller, the expected and the actual value, instead of being
truncated (rank=2.7 -> 2), reinterpreted (rank=True -> 1), turned into nan, or failing deep inside
torch with a message that names neither."""
import numpy as np
import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear, LoraLinear, PicaLinear, SnellLinear, decompose, global_ranks, select_rank
from cersa_kernels.ops import (
    lora_linear, lowrank_linear, pica_linear, pica_lowrank_linear, snell_delta, snell_linear, snell_threshold,
)
from cersa_kernels.nn import LowRankUpdate as LoraFactors
from cersa_kernels.para import compress


def linear(n=8, m=6):
    torch.manual_seed(0)
    return nn.Linear(n, m)


def weight(m=6, n=8):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(1))


# ---- rank: an int, not a bool or a float ------------------------------------------------------

RANK_CALLERS = {
    "decompose": lambda rank: decompose(weight(), rank=rank),
    "select_rank": lambda rank: select_rank(torch.tensor([3.0, 2.0, 1.0]), rank=rank),
    "CersaLinear.from_linear": lambda rank: CersaLinear.from_linear(linear(), rank=rank),
    "CersaLinear": lambda rank: CersaLinear(8, 6, rank),
    "LoraLinear": lambda rank: LoraLinear.from_linear(linear(), rank),
    r"PicaLinear \(Linear\)": lambda rank: PicaLinear(linear(), rank),
}


@pytest.mark.parametrize("rank", [2.7, 2.0, True, "2"], ids=["2.7", "2.0", "True", "str"])
@pytest.mark.parametrize("caller", list(RANK_CALLERS), ids=lambda c: c.split(" ")[0])
def test_rank_must_be_an_int(caller, rank):
    with pytest.raises(TypeError, match=rf"^{caller}: rank must be an int, got {rank!r} \({type(rank).__name__}\)"):
        RANK_CALLERS[caller](rank)


@pytest.mark.parametrize("caller", list(RANK_CALLERS), ids=lambda c: c.split(" ")[0])
def test_integral_ranks_still_accepted(caller):
    """NumPy integers (e.g. from a config read with numpy) are ints, not a mistake."""
    RANK_CALLERS[caller](np.int64(2))


def test_trainable_rank_and_max_rank_must_be_ints():
    with pytest.raises(TypeError, match=r"CersaLinear: trainable_rank must be an int, got 1.5"):
        CersaLinear(8, 6, 2, trainable_rank=1.5)
    with pytest.raises(TypeError, match=r"CersaLinear.from_linear: trainable_rank must be an int, got True"):
        CersaLinear.from_linear(linear(), rank=2, trainable_rank=True)
    with pytest.raises(TypeError, match=r"decompose: max_rank must be an int, got 2.5"):
        decompose(weight(), max_rank=2.5)


def test_layer_features_must_be_positive_ints():
    with pytest.raises(TypeError, match=r"LoraLinear: in_features must be an int, got 8.0 \(float\)"):
        LoraLinear(8.0, 6, 2)
    with pytest.raises(ValueError, match=r"SnellLinear: in_features must be in \[1, inf\], got 0"):
        SnellLinear(0, 6)


# ---- energy and energy_power: checked even when rank is given ------------------------------------

@pytest.mark.parametrize(
    "call",
    [
        lambda **kw: decompose(weight(), rank=2, **kw),
        lambda **kw: CersaLinear.from_linear(linear(), rank=2, **kw),
        lambda **kw: select_rank(torch.tensor([3.0, 2.0, 1.0]), rank=2, **kw),
    ],
    ids=["decompose", "CersaLinear.from_linear", "select_rank"],
)
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(energy=1.5), ValueError, r"energy must be in \(0, 1\], got 1.5"),
        (dict(energy=0.0), ValueError, r"energy must be in \(0, 1\], got 0.0"),
        (dict(energy="high"), TypeError, r"energy must be a real number, got 'high' \(str\)"),
        (dict(energy_power=float("inf")), ValueError, r"energy_power must be > 0 and finite .*, got inf"),
        (dict(energy_power=float("nan")), ValueError, r"energy_power must be > 0 and finite .*, got nan"),
        (dict(energy_power=0), ValueError, r"energy_power must be > 0 and finite .*, got 0"),
        (dict(energy_power=True), TypeError, r"energy_power must be a real number, got True \(bool\)"),
    ],
    ids=["energy>1", "energy=0", "energy-str", "power-inf", "power-nan", "power-0", "power-bool"],
)
def test_energy_checked_even_with_rank(call, kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


def test_energy_power_inf_no_longer_gives_nan_energy_kept():
    """The case the issue reported: energy_power=inf with a rank gave energy_kept = nan."""
    with pytest.raises(ValueError, match=r"^CersaLinear.from_linear: energy_power must be > 0 and finite"):
        CersaLinear.from_linear(linear(), rank=2, energy_power=float("inf"))


# ---- budget: an integer count of parameters ----------------------------------------------------

@pytest.mark.parametrize("budget", [20.5, 20.0, True], ids=["20.5", "20.0", "True"])
def test_global_ranks_budget_must_be_an_int(budget):
    with pytest.raises(TypeError, match=rf"^global_ranks: budget must be an int, got {budget!r}"):
        global_ranks({"a": torch.tensor([3.0, 2.0, 1.0])}, {"a": (3, 3)}, energy=None, budget=budget)


def test_global_ranks_needs_energy_or_budget():
    with pytest.raises(ValueError, match="global_ranks: give energy or budget, got neither"):
        global_ranks({"a": torch.tensor([1.0])}, {"a": (1, 1)}, energy=None, budget=None)


@pytest.mark.parametrize("budget", [20.0, True], ids=["20.0", "True"])
def test_para_budget_must_be_an_int(budget):
    g = torch.Generator().manual_seed(2)
    adapters = {"a": LoraFactors(A=torch.randn(2, 8, generator=g), B=torch.randn(6, 2, generator=g), scale=1.0)}
    with pytest.raises(TypeError, match=rf"^para.compress: budget must be an int, got {budget!r}"):
        compress(adapters, budget=budget)


# ---- dtype of a layer: floating point ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize(
    "layer, build",
    [
        ("CersaLinear", lambda d: CersaLinear(8, 6, 2, dtype=d)),
        ("LoraLinear", lambda d: LoraLinear(8, 6, 2, dtype=d)),
        ("SnellLinear", lambda d: SnellLinear(8, 6, dtype=d)),
    ],
    ids=["cersa", "lora", "snell"],
)
def test_layer_dtype_must_be_floating(layer, build, dtype):
    name = str(dtype).replace("torch.", "")
    with pytest.raises(TypeError, match=rf"^{layer}: dtype must be a floating-point dtype \(float16, .*\), got {name}$"):
        build(dtype)


def test_core_dtype_must_be_floating_and_a_dtype():
    with pytest.raises(TypeError, match=r"CersaLinear: core_dtype must be a floating-point dtype .*, got int32"):
        CersaLinear(8, 6, 2, core_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"CersaLinear.from_linear: core_dtype must be a torch.dtype, got 'float32'"):
        CersaLinear.from_linear(linear(), rank=2, core_dtype="float32")


# ---- meta tensors, non-Linear bases --------------------------------------------------------------

def test_decompose_rejects_meta_tensors():
    with pytest.raises(ValueError, match=r"^decompose: weight is a meta tensor \(shape \(4, 5\), no data\)"):
        decompose(torch.empty(4, 5, device="meta"))
    with pytest.raises(ValueError, match=r"^CersaLinear.from_linear: weight is a meta tensor"):
        CersaLinear.from_linear(nn.Linear(5, 4, device="meta"))


@pytest.mark.parametrize("module", [nn.Embedding(5, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 1)], ids=lambda m: type(m).__name__)
def test_pica_over_a_non_linear_module(module):
    name = type(module).__name__
    with pytest.raises(TypeError, match=rf"^PicaLinear \({name}\): base must be an nn.Linear or a CersaLinear, got {name}$"):
        PicaLinear(module, 2)
    with pytest.raises(TypeError, match=rf"^PicaLinear \(enc.emb\): base must be .*, got {name}$"):
        PicaLinear(module, 2, layer_name="enc.emb")


# ---- dropout seed: inside int64 ------------------------------------------------------------------

def lora_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70], ids=["2^63", "-2^63-1", "2^70"])
def test_dropout_seed_outside_int64(seed):
    x, W, A, B = lora_inputs()
    with pytest.raises(ValueError, match=rf"^lora_linear: seed \(int64\) must be in \[-9223372036854775808, 9223372036854775807\], got {seed}$"):
        lora_linear(x, W, A, B, None, 1.0, 0.5, seed)


@pytest.mark.parametrize("seed", [2.5, True], ids=["2.5", "True"])
def test_dropout_seed_must_be_an_int(seed):
    x, W, A, B = lora_inputs()
    with pytest.raises(TypeError, match=rf"^lora_linear: seed \(int64\) must be an int, got {seed!r}"):
        lora_linear(x, W, A, B, None, 1.0, 0.5, seed)


def test_dropout_seed_at_int64_bounds_is_accepted():
    """Both ends of int64 are valid seeds and give the same result as the equal int64 tensor."""
    x, W, A, B = lora_inputs()
    for seed in (2**63 - 1, -(2**63)):
        expected = lora_linear(x, W, A, B, None, 1.0, 0.5, torch.tensor(seed, dtype=torch.int64))
        torch.testing.assert_close(lora_linear(x, W, A, B, None, 1.0, 0.5, seed), expected, rtol=0, atol=0)


# ---- a Python list where a tensor is expected -----------------------------------------------------

def as_list(t):
    return t.tolist()


def op_cases():
    g = torch.Generator().manual_seed(4)
    x, W, V, U = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(8, 4, generator=g), torch.randn(6, 4, generator=g)
    S, P, M = torch.randn(4, 4, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    A, B = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    SA, SB = torch.randn(2, 8, 2, generator=g), torch.randn(2, 6, 2, generator=g)
    return {
        "lowrank_linear": (lowrank_linear, dict(x=x, V=V, S=S, U=U)),
        "lora_linear": (lora_linear, dict(x=x, W=W, A=A, B=B)),
        "pica_linear": (pica_linear, dict(x=x, W=W, P=P, M=M)),
        "pica_lowrank_linear": (pica_lowrank_linear, dict(x=x, V=V, S=S, U=U, M=M[:, :2])),
        "snell_linear": (lambda x, W0, A, B: snell_linear(x, W0, None, A, B), dict(x=x, W0=W, A=SA, B=SB)),
    }


@pytest.mark.parametrize(
    "op, arg",
    [(op, arg) for op, (_, kwargs) in op_cases().items() for arg in kwargs],
    ids=lambda v: v,
)
def test_python_list_instead_of_a_tensor_in_ops(op, arg):
    fn, kwargs = op_cases()[op]
    kwargs = dict(kwargs, **{arg: as_list(kwargs[arg])})
    with pytest.raises(TypeError, match=rf"^{op}: {arg} must be a torch.Tensor, got list$"):
        fn(*kwargs.values())


@pytest.mark.parametrize(
    "build",
    [
        lambda: CersaLinear.from_linear(linear(), rank=2),
        lambda: LoraLinear.from_linear(linear(), 2),
        lambda: PicaLinear(linear(), 2),
        lambda: SnellLinear.from_linear(linear(), rank=4, heads=2),
    ],
    ids=["cersa", "lora", "pica", "snell"],
)
def test_python_list_as_layer_input(build):
    layer = build()
    layer.layer_name = "encoder.q"
    with pytest.raises(TypeError, match=r"^encoder.q: x must be a torch.Tensor, got list$"):
        layer([[0.5] * 8])


# ---- SNELL factors with zero rows ------------------------------------------------------------------

@pytest.mark.parametrize(
    "A_shape, B_shape, bad",
    [((2, 0, 2), (2, 6, 2), "A"), ((2, 8, 2), (2, 0, 2), "B"), ((0, 8, 2), (0, 6, 2), "A"), ((2, 8, 0), (2, 6, 0), "A")],
    ids=["A-no-rows", "B-no-rows", "no-heads", "no-columns"],
)
def test_snell_factors_with_zero_rows(A_shape, B_shape, bad):
    A, B = torch.randn(A_shape), torch.randn(B_shape)
    coeffs = (0.1, -0.1)[: A_shape[0]]
    shape = A_shape if bad == "A" else B_shape
    message = rf"{bad} must have at least one head, row and column, got shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"^snell_threshold: {message}$"):
        snell_threshold(A, B, coeffs, 0.5)
    with pytest.raises(ValueError, match=rf"^snell_delta: {message}$"):
        snell_delta(A, B, coeffs, 0.0)
    n, m = A_shape[1], B_shape[1]
    with pytest.raises(ValueError, match=rf"^snell_linear: {message}$"):
        snell_linear(torch.randn(3, n), torch.randn(m, n), None, A, B, coeffs, 0.5)
