"""Energy-truncated SVD of a frozen weight (docs/methods.md §1).

`W (m×n) ≈ U_k diag(σ_k) V_kᵀ`, with k the smallest rank whose share of the spectral energy
`Σ_{i≤k} σ_i^p / Σ_i σ_i^p` reaches α. The SVD runs in float32 (float64 for float64 weights) and
the factors come back in the weight's dtype and on its device.
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
    "decompose", "truncated_svd", "select_rank", "energy_curve", "TruncatedSVD", "global_ranks", "cersa_parameter_count",
    "cersa_weight_bytes",
]


@dataclass(frozen=True)
class TruncatedSVD:
    """The kept factors and what was kept.

    U: (m, k), sigma: (k,) the kept singular values (a vector: not CERSA's k×k core S), V: (n, k),
    in the weight's dtype and device. Unpacks as `U, sigma, V = decompose(weight)`.
    spectrum: (min(m, n),) float64 on CPU, every singular value of the weight.
    energy_kept: share of the p-energy the k kept values hold, in [0, 1].
    """

    U: Tensor
    sigma: Tensor
    V: Tensor
    spectrum: Tensor
    energy_power: float
    energy_kept: float

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


def decompose(
    weight: Tensor,
    energy: float = 0.95,
    energy_power: float = 2,
    rank: int | None = None,
    max_rank: int | None = None,
    *,
    layer: str = "decompose",
) -> TruncatedSVD:
    """Energy-truncated SVD: `weight (m, n) ≈ U @ diag(sigma) @ V.T`.

    Returns a TruncatedSVD: U (m, k), sigma (k,) the kept singular values (descending), V (n, k) in
    the weight's dtype and device (it unpacks as `U, sigma, V`), plus the full spectrum and the
    energy kept. k is the smallest rank holding `energy` of Σσ^energy_power, or `rank` when given,
    capped by `max_rank`. Raises ValueError for energy outside (0, 1] (checked even when `rank` is
    given), a rank outside [1, min(m, n)], a non-finite or meta weight, or a weight that is not 2-D;
    TypeError for a rank that is not an int (2.7, True). `layer` names the caller in errors.
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
    if rank is not None:  # before the SVD: a wrong type should not cost a decomposition first
        check_int("rank", rank, layer)
    if max_rank is not None:
        check_int("max_rank", max_rank, layer, minimum=1)
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(work_dtype)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{layer}: weight has {bad} non-finite value(s) (nan/inf); cannot decompose")
    U, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
    k = select_rank(sigma, energy, energy_power, rank, max_rank, layer)
    curve = energy_curve(sigma, energy_power)
    return TruncatedSVD(
        U=U[:, :k].to(weight.dtype).contiguous(),
        sigma=sigma[:k].to(weight.dtype).contiguous(),
        V=Vh[:k].T.to(weight.dtype).contiguous(),
        spectrum=sigma.to("cpu", torch.float64),
        energy_power=float(energy_power),
        energy_kept=float(curve[k - 1]),
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
