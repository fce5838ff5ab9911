"""CersaLinear: conversion, merge, state_dict, repr, errors, saved activation bytes, torch.compile."""
import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear


def test_full_energy_reproduces_the_linear():
    lin = nn.Linear(130, 77).double()
    layer = CersaLinear.from_linear(lin, energy=1.0)
    assert layer.rank == 77
    x = torch.randn(5, 11, 130, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-10, rtol=1e-10)
    lin32 = nn.Linear(130, 77)
    torch.testing.assert_close(CersaLinear.from_linear(lin32, energy=1.0)(x.float()), lin32(x.float()), atol=2e-5, rtol=1e-4)


def test_from_linear_state():
    lin = nn.Linear(64, 48)
    layer = CersaLinear.from_linear(lin, energy=0.9, rank_multiple=1)  # the energy rule itself, unaligned
    k = layer.rank
    assert layer.energy_rank == k
    sigma = torch.linalg.svdvals(lin.weight.detach())
    share = (sigma[:k] ** 2).sum() / (sigma**2).sum()
    assert share >= 0.9 > (sigma[: k - 1] ** 2).sum() / (sigma**2).sum()
    assert float(layer.energy_kept) == pytest.approx(float(share), rel=1e-5)
    torch.testing.assert_close(layer.S.detach(), torch.diag(sigma[:k]), atol=1e-5, rtol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["S"]
    # U and V are frozen Parameters (FSDP2 shards parameters, not buffers); state-dict keys unchanged
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {"U", "V", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"sigma", "energy_kept"}
    assert set(layer.state_dict()) == {"U", "V", "S", "bias", "sigma", "energy_kept"}
    torch.testing.assert_close(layer.bias.detach(), lin.bias.detach())
    assert CersaLinear.from_linear(lin, rank=5, train_bias=True).bias.requires_grad
    # step 0 is the rank-k truncation of W0
    Uf, Sf, Vhf = torch.linalg.svd(lin.weight.detach())
    torch.testing.assert_close(layer.to_linear().weight, Uf[:, :k] @ torch.diag(Sf[:k]) @ Vhf[:k], atol=1e-5, rtol=1e-4)


def test_trainable_rank_block():
    layer = CersaLinear.from_linear(nn.Linear(40, 30), rank=12, trainable_rank=4)
    assert layer.S.shape == (4, 4)
    x = torch.randn(7, 40)
    layer(x).square().sum().backward()
    assert layer.S.grad.shape == (4, 4) and layer.S.grad.abs().sum() > 0
    core = layer.core()
    torch.testing.assert_close(core[4:, 4:], torch.diag(layer.sigma[4:]))
    assert core[:4, 4:].abs().sum() == 0
    torch.testing.assert_close(layer.delta_core(), torch.zeros(12, 12))
    # from_linear caps the trainable block at the k it chose
    assert CersaLinear.from_linear(nn.Linear(40, 30), rank=3, trainable_rank=8).trainable_rank == 3


def test_to_linear_after_training_matches_forward():
    layer = CersaLinear.from_linear(nn.Linear(50, 20), energy=0.8)
    with torch.no_grad():
        layer.S.add_(0.05 * torch.randn_like(layer.S))
    x = torch.randn(9, 50)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip():
    src = CersaLinear.from_linear(nn.Linear(33, 21), energy=0.85, trainable_rank=None)
    with torch.no_grad():
        src.S.add_(torch.randn_like(src.S))
    dst = CersaLinear(33, 21, src.rank)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 33)
    torch.testing.assert_close(dst(x), src(x))
    assert float(dst.energy_kept) == float(src.energy_kept)
    assert repr(dst) == repr(src)


def test_extra_repr():
    layer = CersaLinear.from_linear(nn.Linear(100, 100, bias=False), rank=10)
    text = repr(layer)
    assert "rank=10" in text and "energy_kept=" in text
    # U, V: 100×10 each, S 10×10, sigma 10, float32 -> (2000 + 100 + 10) * 4
    assert f"weight_bytes={2110 * 4} vs dense {100 * 100 * 4}" in text


class TestErrors:
    def test_wrong_in_features(self):
        layer = CersaLinear(16, 8, 4)
        layer.layer_name = "encoder.layer.0.query"
        with pytest.raises(ValueError, match=r"encoder.layer.0.query: expected input with last dimension in_features=16, got shape \(3, 15\)"):
            layer(torch.randn(3, 15))

    def test_dtype_mismatch(self):
        layer = CersaLinear(16, 8, 4)
        with pytest.raises(TypeError, match=r"CersaLinear\(in_features=16, out_features=8\): dtype mismatch, expected every tensor in torch.float64 like x, got x=float64, V=float32"):
            layer(torch.randn(3, 16, dtype=torch.float64))

    def test_device_mismatch(self):
        layer = CersaLinear(16, 8, 4)
        with pytest.raises(RuntimeError, match="device mismatch, expected every tensor in meta like x, got x=meta, V=cpu"):
            layer(torch.randn(3, 16, device="meta"))

    def test_rank_too_large(self):
        with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\) = 8\], got 9"):
            CersaLinear(16, 8, 9)
        with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\) = 8\], got 9"):
            CersaLinear.from_linear(nn.Linear(16, 8), rank=9)

    def test_trainable_rank_too_large(self):
        with pytest.raises(ValueError, match=r"trainable_rank must be in \[1, rank = 4\], got 5"):
            CersaLinear(16, 8, 4, trainable_rank=5)

    def test_not_a_linear(self):
        with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
            CersaLinear.from_linear(nn.Conv1d(3, 3, 1))

    def test_frozen_factor_with_grad(self):
        layer = CersaLinear(16, 8, 4)
        layer.U.requires_grad_(True)
        with pytest.raises(ValueError, match="U is frozen"):
            layer(torch.randn(2, 16))
