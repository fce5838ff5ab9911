"""Energy-truncated SVD of a frozen weight (docs/methods.md §1).

`W (m×n) ≈ U_k diag(σ_k) V_kᵀ`, with k the smallest rank whose share of the spectral energy
`Σ_{i≤k} σ_i^p / Σ_i σ_i^p` reaches α. The SVD runs in float32 (float64 for float64 weights) on the
weight's device and the factors come back in the weight's dtype and on that device.

When k ≤ min(m, n)/4 suffices and p = 2, a seeded randomized SVD (range finder with power
iterations) replaces the full SVD: the total energy is ‖W‖²_F, so only the leading singular values
are needed (docs/usage.md, "Conversion at scale"). An energy- or budget-chosen k is rounded up to a
multiple of `RANK_MULTIPLE` (matrix-multiply libraries are slow at ranks like 819).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import quant
from ._checks import check_int, check_real

__all__ = [
    "decompose", "align_rank", "align_ranks", "RANK_MULTIPLE", "truncated_svd", "select_rank", "energy_curve", "TruncatedSVD", "global_ranks", "cersa_parameter_count",
    "cersa_weight_bytes",
]


RANK_MULTIPLE = 16  # energy/budget-chosen ranks round up to this (1: off); docs/usage.md
ALIGN_MIN_DIM = 128  # below this min(m, n) a rank keeps its k: 16 is a large share of such a layer, its GEMMs tiny
RANDOMIZED_MIN_DIM = 512  # svd="auto": below this min(m, n) the exact SVD is cheap enough
OVERSAMPLE = 16  # extra sketch columns beyond the largest rank trusted from a sketch: max(16, k/4)
POWER_ITERATIONS = 2  # subspace iterations of the range finder (torch.svd_lowrank's niter)
SEED = 0  # the randomized SVD draws from its own torch.Generator: same weight, same factors
SVD_METHODS = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class TruncatedSVD:
    """The kept factors and what was kept.

    U: (m, k), sigma: (k,) the kept singular values (a vector: not CERSA's k×k core S), V: (n, k),
    in the weight's dtype and device. Unpacks as `U, sigma, V = decompose(weight)`.
    spectrum: float64 on CPU, the singular values computed: all min(m, n) of them (method "exact"),
    or the leading l ≥ k of the sketch (method "randomized").
    energy_kept: share of the p-energy the k kept values hold, in [0, 1] (randomized: Σ_{i≤k} σ̂_i² /
    ‖W‖²_F, exactly the share the factors reconstruct, ‖W − U diag(σ) Vᵀ‖²_F = (1 − energy_kept)‖W‖²_F).
    energy_rank: the k the energy rule (or max_rank) chose before alignment to `rank_multiple`;
    equal to the rank when rank= was given or alignment is off.
    method: "exact" (full SVD) or "randomized".
    """

    U: Tensor
    sigma: Tensor
    V: Tensor
    spectrum: Tensor
    energy_power: float
    energy_kept: float
    energy_rank: int = 0
    method: str = "exact"

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    def __iter__(self):
        return iter((self.U, self.sigma, self.V))

    def __getitem__(self, index):
        return (self.U, self.sigma, self.V)[index]

    def __len__(self) -> int:
        return 3


def check_energy(energy: float | None, energy_power: float, layer: str) -> None:
    """energy in (0, 1] (None: not used, e.g. a budget is given) and a finite energy_power > 0.
    Checked even when a rank is given: a bad value is a bug in the call whichever rule wins, and
    energy_power also shapes the reported energy_kept."""
    if energy is not None and not 0.0 < check_real("energy", energy, layer, finite=False) <= 1.0:
        raise ValueError(f"{layer}: energy must be in (0, 1], got {energy}")
    if not 0.0 < check_real("energy_power", energy_power, layer, finite=False) < float("inf"):
        raise ValueError(f"{layer}: energy_power must be > 0 and finite (1 or 2 in docs/methods.md §1), got {energy_power}")


def energy_curve(spectrum: Tensor, energy_power: float = 2) -> Tensor:
    """Cumulative energy share of a descending spectrum: (r,) float64, last entry exactly 1.

    An all-zero spectrum has no energy to share; its curve is all ones (rank 1 keeps "everything").
    """
    weights = spectrum.detach().to("cpu", torch.float64).clamp_min(0) ** float(energy_power)
    cumulative = torch.cumsum(weights, 0)
    total = cumulative[-1]
    if total <= 0:
        return torch.ones_like(cumulative)
    return cumulative / total


def select_rank(
    spectrum: Tensor,
    energy: float = 0.95,
    energy_power: float = 2,
    rank: int | None = None,
    max_rank: int | None = None,
    layer: str = "select_rank",
) -> int:
    """k = min{k : energy share of σ_1..σ_k ≥ energy}, or `rank` when given; capped by `max_rank`.

    spectrum: (r,) singular values, descending.
    """
    full = spectrum.numel()
    check_energy(energy, energy_power, layer)
    if rank is not None:
        k = check_int("rank", rank, layer)
        if not 1 <= k <= full:
            raise ValueError(f"{layer}: rank must be in [1, min(m, n) = {full}], got {rank}")
    else:
        curve = energy_curve(spectrum, energy_power)
        # First index whose cumulative share reaches the target; the curve ends at exactly 1.
        k = int(torch.searchsorted(curve, torch.tensor([float(energy)], dtype=torch.float64)).item()) + 1
        k = min(k, full)
    if max_rank is not None:
        k = min(k, check_int("max_rank", max_rank, layer, minimum=1))
    return k


def align_rank(k: int, multiple: int, full: int, max_rank: int | None = None) -> int:
    """k rounded up to a multiple of `multiple`, capped at `full` = min(m, n) and at `max_rank`
    (never below k: rounding only adds energy). multiple = 1, or a layer with min(m, n) <
    ALIGN_MIN_DIM, leaves k as it is."""
    if full < ALIGN_MIN_DIM:
        return k
    aligned = min(-(-k // multiple) * multiple, full)
    if max_rank is not None:
        aligned = min(aligned, max_rank)
    return max(aligned, k)


def _frobenius_energy(w: Tensor, block_elements: int = 1 << 16) -> float:
    """‖w‖²_F as a Python float: the total σ² energy, without any singular value. Summed in float64
    over blocks of rows (a transient of ≤ block_elements): a float32 vector_norm of an 11008×4096
    weight came out 0.7% low, which moves an energy-chosen k by ~20."""
    rows = max(1, block_elements // max(1, w.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=w.device)  # on the device: one sync at the end
    for i in range(0, w.shape[0], rows):
        total += w[i : i + rows].to(torch.float64).square().sum()
    return float(total)


def _oversample(k: int) -> int:
    """Sketch columns beyond k: the error of the k-th vector falls with the gap (Halko et al. §10)."""
    return max(OVERSAMPLE, k // 4)


def _sketch_svd(w: Tensor, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of w (m, n) on a sketch of `width` columns (Halko, Martinsson & Tropp 2011,
    Alg. 4.4): Q (m, width) spans w·Ω after POWER_ITERATIONS re-orthonormalised passes, then the
    exact SVD of the small B = Qᵀw (width, n). Returns U (m, width), σ̂ (width,) descending,
    Vh (width, n); U diag(σ̂) Vh = Q Qᵀ w, an orthogonal projection of w, so σ̂_i ≤ σ_i.
    Transients: three (m or n) × width blocks and B; no m×n matrix."""
    m, n = w.shape
    omega = torch.randn(n, width, generator=generator, device=w.device, dtype=w.dtype)
    Q = torch.linalg.qr(w @ omega).Q
    for _ in range(POWER_ITERATIONS):  # QR between passes keeps small σ from drowning in round-off
        Q = torch.linalg.qr(w @ torch.linalg.qr(w.T @ Q).Q).Q
    Ub, sigma, Vh = torch.linalg.svd(Q.T @ w, full_matrices=False)
    return Q @ Ub, sigma, Vh


def _randomized(w: Tensor, energy: float, rank: int | None, max_rank: int | None, rank_multiple: int, seed: int):
    """(U, σ̂, Vh, k, energy_rank, kept) from sketches, or None where the exact SVD is needed.

    rank given: one sketch of rank + oversample columns. Energy rule: sketches of 128, 256, ...
    trusted columns (+ oversample), up to min(m, n)/4 (or max_rank); k is the first index where
    Σσ̂² reaches energy·‖W‖²_F. σ̂_i ≤ σ_i, so k ≥ the exact k and the kept energy is ≥ the target.
    None when the target is not reached within min(m, n)/4, or when the sketch shows it cannot be:
    kept + (cap − s)·σ̂_s² < target (σ̂_s² is then taken as the largest energy a later value adds)."""
    full = min(w.shape)
    total = _frobenius_energy(w)
    generator = torch.Generator(device=w.device)
    generator.manual_seed(seed)
    if total <= 0:
        return None  # an all-zero weight: the exact path's rank-1 answer
    if rank is not None:
        U, sigma, Vh = _sketch_svd(w, min(rank + _oversample(rank), full), generator)
        kept = float((sigma[:rank].double() ** 2).sum()) / total
        return U, sigma, Vh, rank, rank, min(kept, 1.0)
    cap = full // 4 if max_rank is None else min(full // 4, max_rank)
    trusted = min(128, cap)
    while True:
        U, sigma, Vh = _sketch_svd(w, min(trusted + _oversample(trusted), full), generator)
        shares = torch.cumsum(sigma.to("cpu", torch.float64) ** 2, 0) / total
        reached = int(torch.searchsorted(shares[:trusted], torch.tensor([float(energy)], dtype=torch.float64)))
        if reached < trusted or (max_rank is not None and trusted >= max_rank):
            k = min(reached + 1, trusted)
            aligned = align_rank(k, rank_multiple, full, max_rank)
            if aligned <= sigma.numel():
                return U, sigma, Vh, aligned, k, min(float(shares[aligned - 1]), 1.0)
        elif trusted >= cap:
            return None
        else:
            floor = float(sigma[trusted - 1]) ** 2 / total  # σ̂_s²: a value past s adds at most about this
            if float(shares[trusted - 1]) + (cap - trusted) * floor < energy:
                return None
        trusted = min(2 * trusted, cap) if trusted < cap else trusted + rank_multiple


def decompose(
    weight: Tensor,
    energy: float = 0.95,
    energy_power: float = 2,
    rank: int | None = None,
    max_rank: int | None = None,
    *,
    layer: str = "decompose",
    rank_multiple: int = RANK_MULTIPLE,
    svd: str = "auto",
    seed: int = SEED,
) -> TruncatedSVD:
    """Energy-truncated SVD: `weight (m, n) ≈ U @ diag(sigma) @ V.T`.

    Returns a TruncatedSVD: U (m, k), sigma (k,) the kept singular values (descending), V (n, k) in
    the weight's dtype and device (it unpacks as `U, sigma, V`), plus the spectrum computed and the
    energy kept. k is the smallest rank holding `energy` of Σσ^energy_power, capped by `max_rank`,
    then rounded up to a multiple of `rank_multiple` (capped at min(m, n) and max_rank; 1: off;
    `energy_rank` keeps the unrounded k); an explicit `rank` is taken as it is.
    svd: "exact" (torch.linalg.svd), "randomized" (a seeded sketch whenever k ≤ min(m, n)/4 and
    energy_power = 2, else exact), "auto" (randomized from min(m, n) ≥ RANDOMIZED_MIN_DIM).
    Raises ValueError for energy outside (0, 1] (checked even when `rank` is given), a rank outside
    [1, min(m, n)], a non-finite or meta weight, a weight that is not 2-D, an unknown svd; TypeError
    for a rank that is not an int (2.7, True). `layer` names the caller in errors.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"{layer}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{layer}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{layer}: weight is empty, shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{layer}: weight must be floating point, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError(f"{layer}: weight is a meta tensor (shape {tuple(weight.shape)}, no data); load or materialise it first")
    check_energy(energy, energy_power, layer)
    full = min(weight.shape)
    if rank is not None:  # before the SVD: a wrong type or size should not cost a decomposition first
        check_int("rank", rank, layer)
        if not 1 <= rank <= full:
            raise ValueError(f"{layer}: rank must be in [1, min(m, n) = {full}], got {rank}")
    if max_rank is not None:
        check_int("max_rank", max_rank, layer, minimum=1)
    rank_multiple = check_int("rank_multiple", rank_multiple, layer, minimum=1)
    if svd not in SVD_METHODS:
        raise ValueError(f"{layer}: svd must be one of {SVD_METHODS}, got {svd!r}")
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype)  # no copy for a float32 weight; stays on its device
    # A nan/inf makes the sum non-finite; the sum allocates nothing W-sized (isfinite(w) allocates an
    # m×n float and three m×n masks). Only a non-finite (or overflowing) sum pays for the count.
    if not bool(torch.isfinite(w.sum())):
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            raise ValueError(f"{layer}: weight has {bad} non-finite value(s) (nan/inf); cannot decompose")
    fixed = None if rank is None else (rank if max_rank is None else min(rank, max_rank))
    # energy 1 keeps every σ > 0: k = min(m, n), or max_rank (then a fixed rank, as the exact rule gives)
    everything = rank is None and float(energy) >= 1.0
    if everything:
        fixed = max_rank
    sketched = None
    if (svd == "randomized" or (svd == "auto" and full >= RANDOMIZED_MIN_DIM)) and float(energy_power) == 2.0 and (
        (fixed is None and not everything) or (fixed is not None and fixed <= full // 4)
    ):
        sketched = _randomized(w, energy, fixed, max_rank, rank_multiple, seed)
    if sketched is not None:
        U, sigma, Vh, k, energy_rank, kept = sketched
        method = "randomized"
    else:
        U, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
        energy_rank = select_rank(sigma, energy, energy_power, rank, max_rank, layer)
        # an all-zero weight keeps rank 1: aligned columns would hold no energy at all
        aligned = rank is None and float(sigma[0]) > 0
        k = align_rank(energy_rank, rank_multiple, full, max_rank) if aligned else energy_rank
        kept = float(energy_curve(sigma, energy_power)[k - 1])
        method = "exact"
    return TruncatedSVD(
        U=U[:, :k].to(weight.dtype).contiguous(),
        sigma=sigma[:k].to(weight.dtype).contiguous(),
        V=Vh[:k].T.to(weight.dtype).contiguous(),
        spectrum=sigma.to("cpu", torch.float64),
        energy_power=float(energy_power),
        energy_kept=kept,
        energy_rank=energy_rank,
        method=method,
    )


def truncated_svd(weight: Tensor, energy: float = 0.95, energy_power: float = 2, rank: int | None = None,
                  max_rank: int | None = None, where: str = "decompose") -> TruncatedSVD:
    """Deprecated: `decompose` returns the same TruncatedSVD (its caller argument is `layer`)."""
    warnings.warn("cersa_kernels.truncated_svd is deprecated: decompose() returns the same result", DeprecationWarning,
                  stacklevel=2)
    return decompose(weight, energy, energy_power, rank, max_rank, layer=where)


def cersa_parameter_count(m: int, n: int, k: int) -> int:
    """Elements CersaLinear keeps for an m×n weight at rank k: U (m×k), V (n×k), S (k×k), sigma (k)."""
    return k * (m + n + k + 1)


def cersa_weight_bytes(
    m: int, n: int, k: int, *, factor_format: Optional[str] = None, factor_group_size: int = quant.DEFAULT_GROUP_SIZE,
    factor_element_size: int = 4, core_element_size: int = 4, refit: bool = True,
) -> int:
    """Exact bytes CersaLinear keeps for an m×n weight at rank k (bias excluded): U and V (dense, or
    quantized as Uᵀ (k, m) and Vᵀ (k, n) grouped along m and n: quant.quantized_bytes), the core S
    (k×k) and sigma (k), plus the refitted initial core (k×k) when the factors are quantized and
    `refit` (docs/quantization.md)."""
    if factor_format is None:
        return k * (m + n) * factor_element_size + (k * k + k) * core_element_size
    factors = quant.quantized_bytes(k, m, factor_format, factor_group_size) + quant.quantized_bytes(
        k, n, factor_format, factor_group_size
    )
    return factors + (k * k * (2 if refit else 1) + k) * core_element_size


def global_ranks(
    spectra: dict[str, Tensor],
    shapes: dict[str, tuple[int, int]],
    energy: float | None = 0.95,
    energy_power: float = 2,
    budget: int | None = None,
    cost: Optional[Callable[[int, int, int], int]] = None,
) -> dict[str, int]:
    """One σᵖ threshold across all layers (docs/methods.md §1 pooled over a model), so the rank goes where
    the spectrum needs it. Every layer keeps at least rank 1.

    spectra: {name: (r,) descending singular values}; shapes: {name: (m, n)}.
    energy: keep the largest pooled σᵖ until their sum reaches `energy` of the pooled total.
    budget: instead, keep the largest pooled σᵖ while Σ_l cost(m_l, n_l, k_l) ≤ budget; `cost` defaults
    to cersa_parameter_count (a budget in parameters); CERSA's budget_bytes passes cersa_weight_bytes.
    Returns {name: k}.
    """
    names = list(spectra)
    if budget is not None:
        budget = check_int("budget", budget, "global_ranks", minimum=0)
    elif energy is None:
        raise ValueError("global_ranks: give energy or budget, got neither")
    check_energy(energy, energy_power, "global_ranks")
    if not names:
        return {}
    values = torch.cat([spectra[n].detach().to("cpu", torch.float64).clamp_min(0) ** float(energy_power) for n in names])
    owner = torch.cat([torch.full((spectra[n].numel(),), i, dtype=torch.long) for i, n in enumerate(names)])
    order = torch.argsort(values, descending=True, stable=True)
    ranks = {n: 1 for n in names}
    if budget is None:
        cumulative = torch.cumsum(values[order], 0)
        total = float(cumulative[-1])
        if total > 0:
            kept = int(torch.searchsorted(cumulative / total, torch.tensor([float(energy)], dtype=torch.float64))) + 1
            counts = torch.bincount(owner[order[: min(kept, len(order))]], minlength=len(names))
            ranks = {n: max(1, int(c)) for n, c in zip(names, counts)}
        return ranks
    cost = cost or cersa_parameter_count
    used = sum(cost(*shapes[n], 1) for n in names)
    if used > budget:
        unit = "parameters" if cost is cersa_parameter_count else "bytes"
        raise ValueError(f"global_ranks: budget {budget} is below the {used} {unit} that rank 1 on every layer needs")
    seen = {n: 0 for n in names}
    for index in order.tolist():
        name = names[int(owner[index])]
        seen[name] += 1
        if seen[name] == 1:  # each layer's largest value is already in (rank 1)
            continue
        m, n = shapes[name]
        step = cost(m, n, seen[name]) - cost(m, n, seen[name] - 1)  # cost of rank k over rank k-1
        if used + step > budget:
            break  # one threshold: everything below this value is dropped, everywhere
        used += step
        ranks[name] = seen[name]
    return ranks


def align_ranks(
    ranks: dict[str, int],
    shapes: dict[str, tuple[int, int]],
    multiple: int = RANK_MULTIPLE,
    budget: int | None = None,
    cost: Optional[Callable[[int, int, int], int]] = None,
) -> dict[str, int]:
    """Round pooled ranks ({name: k}, shapes {name: (m, n)}) to multiples of `multiple` (1: as they
    are). Without a budget each rounds up (align_rank). With a budget (in `cost` units, default
    cersa_parameter_count) all round up if the total still fits; otherwise each starts rounded down
    (a k below `multiple` stays), then in the order given rounds up while the total stays within the
    budget, and a layer still rounded down gets its own k back where that fits. So alignment never
    breaks a budget the unaligned ranks met; a layer rounded down (some energy given back) paid
    for another's rounding up."""
    multiple = check_int("rank_multiple", multiple, "align_ranks", minimum=1)
    up = {n: align_rank(k, multiple, min(shapes[n])) for n, k in ranks.items()}
    if budget is None or multiple == 1:
        return up if budget is None else dict(ranks)
    cost = cost or cersa_parameter_count
    total = lambda chosen: sum(cost(*shapes[n], k) for n, k in chosen.items())  # noqa: E731
    if total(up) <= budget:
        return up
    chosen = {n: k // multiple * multiple if k >= multiple and up[n] != k else k for n, k in ranks.items()}
    used = total(chosen)
    for target in (up, ranks):  # round up where it fits, then give the rest back their own k where it fits
        for n in ranks:
            if chosen[n] < target[n]:
                step = cost(*shapes[n], target[n]) - cost(*shapes[n], chosen[n])
                if used + step <= budget:
                    chosen[n], used = target[n], used + step
    return chosen
