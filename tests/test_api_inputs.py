"""Issue 16 items 3, 6 (SNELL coefficients) and 8: a second `apply` leaves the first one's adapters
trainable; non-finite or wrongly typed layer options, a bad target regex and dropout seeds that
differ only above bit 32 get a clear error or a distinct mask, never a raw or silent failure."""
import math

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import LoraLinear, SnellLinear
from cersa_kernels.backends import use_backend
from cersa_kernels.ops import lora_linear
from cersa_kernels.reference.lora import dropout_params, hash32


def two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))


# ---- item 3: a second apply keeps the first one's adapters trainable -----------------------------

def test_second_apply_keeps_earlier_adapters_trainable():
    model = two_linears()
    first = ck.apply(model, "lora", target_modules=["0"], rank=2)
    second = ck.apply(model, "cersa", target_modules=["1"], rank=3)
    lora, cersa = model[0], model[1]
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad
    assert not lora.weight.requires_grad and not lora.bias.requires_grad  # its frozen base stays frozen
    expected = {id(lora.lora_A), id(lora.lora_B), id(cersa.S)}
    assert {id(p) for p in ck.trainable_parameters(model)} == expected
    requiring = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # each report counts everything that requires grad after its apply; its rows, the layers it made
    assert second.trainable == requiring == 2 * 8 + 8 * 2 + 3 * 3
    assert first.trainable == sum(r["trainable"] for r in first.rows) == 2 * 8 + 8 * 2
    assert sum(r["trainable"] for r in second.rows) == 3 * 3 and second.other_trainable == 2 * 8 + 8 * 2
    # and training reaches both adapters
    model(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0 and cersa.S.grad is not None


def test_second_apply_still_freezes_what_is_no_adapter():
    model = two_linears()
    model.head = nn.Linear(6, 2)
    ck.apply(model, "lora", target_modules=["0"], rank=2)
    model.head.requires_grad_(True)  # e.g. a head the user trains: the next apply freezes it, as documented
    ck.apply(model, "snell", target_modules=["1"], rank=2, heads=1, coeffs=(0.1,), sparsity=0.0)
    assert not model.head.weight.requires_grad and model[0].lora_A.requires_grad and model[1].A.requires_grad


def test_pica_over_cersa_still_freezes_the_cersa_core_it_adapts():
    """The layers adapted now are this method's base: their S freezes unless freeze_base=False."""
    model = two_linears()
    ck.apply(model, "cersa", rank=4)
    ck.apply(model, "pica", target_modules=["0"], rank=2)
    assert not model[0].base.S.requires_grad and model[0].M.requires_grad
    assert model[1].S.requires_grad  # the CERSA layer PiCa did not touch keeps training


# ---- item 6: SNELL coefficients (and every float option of a layer) must be finite ---------------

SNELL = r"SnellLinear\(in_features=16, out_features=8\)"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_snell_coeffs_must_be_finite(bad):
    with pytest.raises(ValueError, match=rf"^{SNELL}: coeffs\[1\] must be finite, got {bad}$"):
        SnellLinear(16, 8, rank=4, heads=2, coeffs=[0.1, bad])
    with pytest.raises(ValueError, match=r"^SnellLinear\(in_features=6, out_features=4\): coeffs\[0\] must be finite"):
        SnellLinear.from_linear(nn.Linear(6, 4), rank=2, heads=2, coeffs=(bad, bad))


def test_snell_coeffs_must_be_numbers():
    with pytest.raises(TypeError, match=rf"^{SNELL}: coeffs must be a sequence of one real number per head, got 0.1$"):
        SnellLinear(16, 8, rank=4, heads=1, coeffs=0.1)
    with pytest.raises(TypeError, match=rf"^{SNELL}: coeffs\[0\] must be a real number, got '0.1' \(str\)$"):
        SnellLinear(16, 8, rank=4, heads=1, coeffs=["0.1"])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_snell_sparsity_must_be_finite(bad):
    with pytest.raises(ValueError, match=rf"^{SNELL}: sparsity must be in \[0, 1\), got {bad}$"):
        SnellLinear(16, 8, rank=4, sparsity=bad)
    with pytest.raises(TypeError, match=rf"^{SNELL}: sparsity must be a real number, got '0.5' \(str\)$"):
        SnellLinear(16, 8, rank=4, sparsity="0.5")


@pytest.mark.parametrize("option", ["alpha", "dropout"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_lora_float_options_must_be_finite(option, bad):
    """Already refused before issue 16 (check_real); kept here beside SNELL's so every float option
    of a layer is covered."""
    with pytest.raises(ValueError, match=rf"^LoraLinear: {option} must be finite, got {bad}$"):
        LoraLinear.from_linear(nn.Linear(8, 6), 2, **{option: bad})


# ---- item 8: clear errors where users got raw ones -----------------------------------------------

@pytest.mark.parametrize("option", ["target_modules", "exclude_modules"])
def test_bad_target_regex_names_the_option_and_the_pattern(option):
    options = {"target_modules": "all-linear", option: "("}
    with pytest.raises(ValueError, match=rf"^apply: {option}='\(' is not a valid regular expression \(missing \)"):
        ck.apply(two_linears(), "lora", rank=2, **options)


@pytest.mark.parametrize("spec", [5, ["0", 1], (name for name in ["0"])], ids=["int", "list-with-int", "generator"])
def test_target_spec_of_the_wrong_type(spec):
    with pytest.raises(TypeError, match=r"^apply: target_modules must be a regex string, a list of module names or None"):
        ck.apply(two_linears(), "lora", target_modules=spec, rank=2)


def test_target_spec_collections_still_accepted():
    for spec in (("1",), {"1"}, {"1": None}.keys()):
        assert [row["name"] for row in ck.apply(two_linears(), "lora", target_modules=spec, rank=2).rows] == ["1"]


@pytest.mark.parametrize("option", ["rank", "heads"])
def test_snell_rank_and_heads_must_be_ints(option):
    with pytest.raises(TypeError, match=rf"^{SNELL}: {option} must be an int, got 2.0 \(float\)$"):
        SnellLinear(16, 8, **{"rank": 4, "heads": 2, option: 2.0})
    with pytest.raises(TypeError, match=rf"^{SNELL}: {option} must be an int, got True \(bool\)$"):
        SnellLinear(16, 8, **{"rank": 4, "heads": 2, option: True})


def lora_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(5, 16, generator=g), torch.randn(6, 16, generator=g), torch.randn(2, 16, generator=g),
            torch.randn(6, 2, generator=g))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dropout_seeds_differing_above_bit_32_give_different_masks(backend):
    x, W, A, B = lora_inputs()
    with use_backend(backend):
        low, high = (lora_linear(x, W, A, B, None, 1.0, 0.5, seed) for seed in (5, 5 + 2**32))
        negative = lora_linear(x, W, A, B, None, 1.0, 0.5, 5 - 2**32)  # the same low word, another high one
    assert not torch.equal(low, high) and not torch.equal(low, negative) and not torch.equal(high, negative)


@pytest.mark.parametrize("seed", [5 + 2**32, -3, 2**63 - 1, -(2**63)])
def test_high_seed_bits_agree_between_reference_and_triton(seed):
    """The key is computed once (reference.lora.dropout_params) for both backends: same bits."""
    x, W, A, B = lora_inputs()
    A.requires_grad_(True)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            y = lora_linear(x, W, A, B, None, 1.0, 0.5, seed)
            (dA,) = torch.autograd.grad(y.sum(), A)
        results[backend] = (y, dA)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-5)


def test_seeds_below_2_32_keep_their_mask():
    """Folding the high word in changes no mask of a seed in [0, 2³²): the key is still hash32(seed)."""
    for seed in (0, 5, 2**31 - 2, 2**32 - 1):
        assert dropout_params(0.1, torch.tensor(seed))[0] == hash32(seed)
