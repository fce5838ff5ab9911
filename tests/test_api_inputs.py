"""Issue 16 items 3, 6 (SNELL coefficients) and 8: a second `apply` leaves the first one's adapters
trainable; non-finite or wrongly typed layer options, a bad target regex and dropout seeds that
differ only above bit 32 get a clear error or a distinct mask, never a raw or silent failure."""
import torch
from torch import nn

import cersa_kernels as ck


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
    assert first.trainable + second.trainable == requiring == 2 * 8 + 8 * 2 + 3 * 3
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
