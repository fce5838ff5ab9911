"""decompose(svd="randomized"): the seeded sketch picks k from ‖W‖²_F (docs/usage.md, "Conversion
at scale"): k within the stated bound of the exact rule, the energy kept ≥ the target, factors that
reconstruct W within 2% of the exact truncation's error, no m×n buffer, and the exact fallbacks."""
import pytest
import torch

from cersa_kernels import decompose
from cersa_kernels.compare.measure import LiveTensorTracker
from cersa_kernels.decompose import RANDOMIZED_MIN_DIM, _frobenius_energy


def decaying(m, n, decay, seed=0):
    """float32 (m, n) with singular values i^-decay (float64 orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return ((U * torch.arange(1, r + 1, dtype=torch.float64) ** -decay) @ V.T).float()


def residual(W64, svd):
    """‖W − U diag(σ) Vᵀ‖_F in float64."""
    approx = (svd.U.double() * svd.sigma.double()) @ svd.V.double().T
    return float(torch.linalg.norm(W64 - approx))


CASES = [  # (m, n, decay, energy): odd shapes, both orientations, k from 2 to ~60 (all ≤ d/4)
    (300, 257, 1.0, 0.95), (257, 300, 0.75, 0.9), (513, 640, 1.5, 0.9), (701, 389, 0.75, 0.9), (389, 701, 1.0, 0.97),
]


@pytest.mark.parametrize("m, n, decay, energy", CASES)
def test_energy_rank_matches_the_exact_rule(m, n, decay, energy):
    W = decaying(m, n, decay)
    W64 = W.double()
    exact = decompose(W, energy, rank_multiple=1, svd="exact")
    fast = decompose(W, energy, rank_multiple=1, svd="randomized")
    assert fast.method == "randomized" and exact.method == "exact"
    k, k_hat = exact.rank, fast.rank
    assert k - 1 <= k_hat <= k + max(1, k // 50), (k, k_hat)  # docs: k̂ ≥ k in exact arithmetic
    sigma = torch.linalg.svdvals(W64)
    total = float(sigma.square().sum())
    kept = 1 - residual(W64, fast) ** 2 / total  # the energy the factors really hold
    assert kept >= energy - 1e-5
    assert fast.energy_kept == pytest.approx(kept, rel=1e-4)
    best = float(sigma[k_hat:].square().sum().sqrt())  # the exact truncation at the same rank
    assert residual(W64, fast) <= 1.02 * best
    assert fast.U.shape == (m, k_hat) and fast.V.shape == (n, k_hat) and fast.spectrum.numel() >= k_hat
    torch.testing.assert_close(fast.U.T @ fast.U, torch.eye(k_hat), atol=1e-4, rtol=0)


@pytest.mark.parametrize("m, n, rank", [(300, 257, 7), (257, 300, 40), (701, 389, 97)])
def test_fixed_rank_reconstructs_like_the_exact_truncation(m, n, rank):
    W = decaying(m, n, 0.5, seed=1)  # slow decay: the hardest case for a sketch
    fast = decompose(W, rank=rank, svd="randomized")
    assert fast.method == "randomized" and fast.rank == fast.energy_rank == rank
    sigma = torch.linalg.svdvals(W.double())
    assert residual(W.double(), fast) <= 1.02 * float(sigma[rank:].square().sum().sqrt())
    # σ̂_i ≤ σ_i (a projection of W); the leading half within 1%, the last few lag most (docs)
    assert bool((fast.sigma.double() <= sigma[:rank] * (1 + 1e-5)).all())
    torch.testing.assert_close(fast.sigma[: rank // 2].double(), sigma[: rank // 2], rtol=1e-2, atol=0)


def test_seeded_and_leaves_the_global_generator_alone():
    W = decaying(300, 257, 1.0)
    state = torch.random.get_rng_state()
    a, b = decompose(W, 0.9, svd="randomized"), decompose(W, 0.9, svd="randomized")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.method == "randomized" and torch.equal(a.U, b.U) and torch.equal(a.sigma, b.sigma)
    c = decompose(W, 0.9, svd="randomized", seed=1)
    assert c.rank == a.rank and not torch.equal(c.U, a.U)


def test_fallbacks_to_the_exact_svd():
    flat = torch.randn(300, 260, generator=torch.Generator().manual_seed(0))  # energy 0.95 needs k ≈ 0.7 d
    svd = decompose(flat, 0.95, rank_multiple=1, svd="randomized")
    assert svd.method == "exact" and svd.rank > 260 // 4
    assert svd.rank == decompose(flat, 0.95, rank_multiple=1, svd="exact").rank
    W = decaying(300, 257, 1.0)
    assert decompose(W, 0.9, energy_power=1, svd="randomized").method == "exact"  # Σσ needs every σ
    assert decompose(W, rank=257 // 4 + 1, svd="randomized").method == "exact"  # beyond d/4
    assert decompose(W, 0.9, svd="exact").method == "exact"
    assert decompose(torch.zeros(300, 257), svd="randomized").rank == 1
    assert min(W.shape) < RANDOMIZED_MIN_DIM and decompose(W, 0.9).method == "exact"  # "auto": small is exact
    big = decaying(RANDOMIZED_MIN_DIM, RANDOMIZED_MIN_DIM + 3, 1.0)
    assert decompose(big, 0.9).method == "randomized"


def test_max_rank_caps_the_sketch():
    W = decaying(300, 257, 0.5)
    for energy in (0.99, 1.0):  # 1.0 keeps every σ: only max_rank stops short of min(m, n)
        svd = decompose(W, energy=energy, max_rank=10, svd="randomized")
        assert svd.method == "randomized" and svd.rank == svd.energy_rank == 10
    low = decaying(300, 40, 1.0) @ torch.randn(40, 257, generator=torch.Generator().manual_seed(3))  # rank 40
    full = decompose(low, energy=1.0, svd="randomized")
    assert full.method == "exact" and full.rank == decompose(low, energy=1.0, svd="exact").rank


def test_no_m_by_n_buffer():
    """The sketch's transients are (m or n) × l blocks: nothing the size of W. The exact SVD's U, Vh
    are W-sized already (LAPACK's own workspace is invisible to the tracker)."""
    W = decaying(1024, 768, 1.0)
    weight_bytes = W.numel() * W.element_size()
    with LiveTensorTracker(0) as fast:
        assert decompose(W, rank=32, svd="randomized").method == "randomized"
    with LiveTensorTracker(0) as exact:
        decompose(W, rank=32, svd="exact")
    assert fast.peak_bytes <= 0.5 * weight_bytes < weight_bytes <= exact.peak_bytes


def test_bad_svd_method():
    with pytest.raises(ValueError, match=r"my\.layer: svd must be one of \('auto', 'exact', 'randomized'\), got 'lanczos'"):
        decompose(torch.randn(4, 4), svd="lanczos", layer="my.layer")


def test_total_energy_is_summed_in_float64():
    """The energy target is a share of ‖W‖²_F: a float32 reduction over millions of entries is off
    by a fraction of a percent, enough to move k (k̂ < k was measured at 11008×4096 with one)."""
    W = torch.randn(3001, 1000, generator=torch.Generator().manual_seed(0)) + 0.5
    exact = float(W.double().square().sum())
    assert _frobenius_energy(W) == pytest.approx(exact, rel=1e-12)
    assert _frobenius_energy(W, block_elements=777) == pytest.approx(exact, rel=1e-12)  # ragged last block
