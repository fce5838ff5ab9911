"""decompose(): the cumulative-energy rank rule of docs/methods.md §1, dtypes, and every error."""
import math

import pytest
import torch

from cersa_kernels import decompose, select_rank


def weight_with_spectrum(sigma, m=40, n=30, dtype=torch.float64):
    U = torch.linalg.qr(torch.randn(m, len(sigma), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, len(sigma), dtype=torch.float64))[0]
    return (U @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ V.T).to(dtype)


def test_energy_rule_on_a_known_spectrum():
    sigma = [4.0, 3.0, 2.0, 1.0]  # σ² = 16, 9, 4, 1 -> cumulative share 16/30, 25/30, 29/30, 1
    W = weight_with_spectrum(sigma)
    for energy, k in [(0.5, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.9, 3), (0.97, 4), (1.0, 4)]:
        result = decompose(W, energy=energy, rank_multiple=1)  # the rule itself, unaligned
        assert result.rank == result.energy_rank == k, (energy, k)
        assert decompose(W, energy=energy).energy_rank == k  # aligned by default (tests/test_rank_alignment.py)
    # p = 1: σ shares 4/10, 7/10, 9/10, 1
    assert decompose(W, energy=0.7, energy_power=1, rank_multiple=1)[1].numel() == 2
    assert decompose(W, energy=0.71, energy_power=1, rank_multiple=1)[1].numel() == 3


def test_factors_reconstruct_the_truncation():
    W = torch.randn(37, 23, dtype=torch.float64)
    U, S, V = decompose(W, energy=0.9, rank_multiple=1)
    k = S.numel()
    Uf, Sf, Vhf = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, Uf[:, :k] @ torch.diag(Sf[:k]) @ Vhf[:k])
    assert U.shape == (37, k) and V.shape == (23, k)
    assert torch.all(S[:-1] >= S[1:])
    share = float((Sf[:k] ** 2).sum() / (Sf**2).sum())
    assert share >= 0.9 and float((Sf[: k - 1] ** 2).sum() / (Sf**2).sum()) < 0.9
    assert math.isclose(decompose(W, 0.9, rank_multiple=1).energy_kept, share, rel_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_results_in_the_weight_dtype(dtype):
    W = torch.randn(20, 12).to(dtype)
    U, S, V = decompose(W, rank=5)
    assert U.dtype == S.dtype == V.dtype == dtype
    assert U.device == W.device


def test_rank_and_max_rank():
    W = torch.randn(20, 12)
    assert decompose(W, rank=12)[1].numel() == 12
    assert decompose(W, energy=1.0, max_rank=3)[1].numel() == 3  # the cap wins over alignment
    assert decompose(W, rank=7, max_rank=3)[1].numel() == 3


def test_zero_weight_keeps_rank_one():
    U, S, V = decompose(torch.zeros(5, 4))
    assert S.numel() == 1


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.0001, float("nan")])
def test_energy_outside_range(energy):
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got"):
        decompose(torch.randn(4, 4), energy=energy)


def test_rank_above_min_dim():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\) = 4\], got 5"):
        decompose(torch.randn(6, 4), rank=5)
    with pytest.raises(ValueError, match=r"got 0"):
        decompose(torch.randn(6, 4), rank=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(bad):
    W = torch.randn(5, 5)
    W[2, 3] = bad
    with pytest.raises(ValueError, match="1 non-finite value"):
        decompose(W)


def test_not_2d():
    with pytest.raises(ValueError, match=r"must be 2-D \(out_features, in_features\), got shape \(2, 3, 4\)"):
        decompose(torch.randn(2, 3, 4))


def test_select_rank_bad_power():
    with pytest.raises(ValueError, match="energy_power must be > 0"):
        select_rank(torch.tensor([2.0, 1.0]), energy=0.5, energy_power=0)


def test_decompose_unpacks_as_U_sigma_V_and_truncated_svd_is_a_deprecated_alias():
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = decompose(W, rank=3)
    U, sigma, V = result
    assert sigma.shape == (3,) and U.shape == (7, 3) and V.shape == (5, 3) and result.rank == 3
    with pytest.warns(DeprecationWarning, match="decompose"):
        from cersa_kernels import truncated_svd

        old = truncated_svd(W, rank=3)
    torch.testing.assert_close(old.sigma, sigma)
