"""PARA: post-optimisation, data-free rank allocation across all the adapters of a model (docs/methods.md §3).

Every adapter layer hands PARA its update as ΔW = s·B·A (`para_update()`, cersa_kernels.nn.base):
LoRA its own factors, CERSA B = U·ΔS and A = Vᵀ, PiCa B = M and A = P (M's spectrum: P has
orthonormal rows; layers sharing one M are one adapter). Thin QR B = Q_B R_B, Aᵀ = Q_A R_A gives a
small core C = s·R_B R_Aᵀ whose SVD carries the spectrum. The SVD of each core (no m×n matrix is formed) gives σ; every σ of every adapter is pooled, one
global threshold τ is set, and each adapter is rebuilt with k_l = #{σ ≥ τ}: the rebuilt ΔW is the
dense rank-k_l truncation of ΔW exactly (0 removes the adapter), written back by the layer's
`apply_para_update` (a LoRA layer of the new rank; CERSA's S; PiCa's M).

Threshold modes: `energy=ε` (τ = the σ at which the pooled, descending Σσ² first reaches ε·total)
or `budget=N` (the smallest τ whose kept adapters fit in N parameters). Parameters are counted per
adapter as min(k·(rows + cols), rows·cols) of its core: a rank-k factorisation or the dense core,
whichever is smaller (LoRA: k·(m+n); CERSA's ΔS: min(2k·k_l, k²); PiCa's M: min(k_l·(m+r), m·r)),
and also as what `export_peft_lora` writes (`export_params`: k_l·(m+n) LoRA factors per layer).
A σ at the rounding floor of its update (`para_spectrum`) is zero: it is not rank.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_int
from .decompose import decompose, select_rank
from .nn.base import AdapterLayer, LowRankUpdate
from .nn.tree import module_aliases, replace_module

__all__ = ["ParaLayer", "ParaResult", "compress", "para_spectrum"]


def __getattr__(name: str):
    # LoraFactors carried CERSA and PiCa updates too: it is nn.base.LowRankUpdate now
    if name == "LoraFactors":
        warnings.warn("cersa_kernels.para.LoraFactors is now cersa_kernels.nn.LowRankUpdate", DeprecationWarning, stacklevel=2)
        return LowRankUpdate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ParaLayer:
    """One adapter's outcome: kind ∈ {lora, cersa, pica}, rank before/after, parameters before/after,
    the share of its own Σσ² kept, and export_params: the LoRA parameters `export_peft_lora` writes
    for it at rank_after, k·(m + n) per layer it updates (a PiCa M once per layer sharing it; CERSA's
    ΔS as LoRA factors over W0, where params_after counts its k×k core)."""

    name: str
    kind: str
    rank_before: int
    rank_after: int
    params_before: int
    params_after: int
    energy_kept: float
    export_params: int = 0


@dataclass
class ParaResult:
    """What `compress` did. ranks: {adapter name: k_l}; adapters: the rebuilt LowRankUpdate (None when
    removed) in dict mode, empty for a model (rebuilt in place)."""

    threshold: float
    energy_kept: float
    layers: list[ParaLayer]
    adapters: dict[str, Optional[LowRankUpdate]] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank_after for layer in self.layers}

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def export_params_after(self) -> int:
        """The LoRA parameters `export_peft_lora` writes after this compression (modules_to_save not
        counted; a PicaCersaLinear's two updates are exported as one LoRA of at most their summed rank)."""
        return sum(layer.export_params for layer in self.layers)

    @property
    def reduction(self) -> float:
        """Fraction of adapter parameters removed, in [0, 1]."""
        return 1.0 - self.params_after / max(self.params_before, 1)


@dataclass
class _Spectrum:
    name: str
    kind: str
    left: Tensor  # (rows of ΔW, q), orthonormal columns
    sigma: Tensor  # (q,) descending, float64 on CPU
    right: Tensor  # (cols of ΔW, q), orthonormal columns
    core_shape: tuple[int, int]  # the stored core whose parameters are counted
    target: object  # what to rebuild: a module, or the dict key
    layers: int = 1  # adapter layers the update is applied in (a shared PiCa M: each layer of its role)

    def export_cost(self, k: int) -> int:
        """LoRA parameters of the rank-k update as PEFT export writes it: k·(m + n) per layer."""
        return k * (self.left.shape[0] + self.right.shape[0]) * self.layers

    def cost(self, k: int) -> int:
        rows, cols = self.core_shape
        return min(k * (rows + cols), rows * cols) if k > 0 else 0


def _svd_of_core(core: Tensor, layer: str) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD of a small core (float32, float64 for float64): U (rows, q), σ (q,), V (cols, q)."""
    svd = decompose(core, rank=min(core.shape), layer=layer)
    return svd.U, svd.sigma, svd.V


def para_spectrum(
    B: Tensor, A: Tensor, scale: float, layer: str = "para", noise: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """ΔW = scale·B·A as L·diag(σ)·Rᵀ without forming it: B (m, r), A (r, n) -> L (m, r), σ (r,), R (n, r).

    σ at or below the rounding floor max(m, n)·eps·σ_max (eps of the working dtype), or below the
    update's own `noise` bound (LowRankUpdate.noise), is set to 0: such a σ is the rounding error of
    the factors, not a direction of ΔW, and would otherwise count as rank (an update PARA truncated to
    rank k and written back in float32 comes back with full rank)."""
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    QB, RB = torch.linalg.qr(B.detach().to(work))
    QA, RA = torch.linalg.qr(A.detach().to(work).T)
    Uc, sigma, Vc = _svd_of_core(scale * (RB @ RA.T), layer)
    if sigma.numel():
        floor = max(max(B.shape[0], A.shape[1]) * torch.finfo(work).eps * float(sigma[0]), float(noise))
        sigma = sigma.masked_fill(sigma <= floor, 0.0)
    return QB @ Uc, sigma, QA @ Vc


def _collect_model(model: nn.Module) -> list[_Spectrum]:
    """One spectrum per adapter update of `model`, through each layer's PARA hooks (nn.base)."""
    spectra: list[_Spectrum] = []
    seen: set[object] = set()
    sharing: dict[object, int] = {}  # para_key -> how many adapter layers hold that update
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            sharing[module.para_key()] = sharing.get(module.para_key(), 0) + 1
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer) or module.para_key() in seen:
            continue  # a shared update (PiCa's M) is one adapter: compressed once, through its first layer
        update = module.para_update()
        if update is None:
            continue
        seen.add(module.para_key())
        label = name + module.para_label
        L, s, R = para_spectrum(update.B, update.A, update.scale, layer=f"para ({label})", noise=update.noise)
        spectra.append(_Spectrum(label, module.method, L, s, R, module.para_core_shape(), (name, module, update.scale),
                                 sharing[module.para_key()]))
    return spectra


def _collect_dict(adapters: Mapping[str, LowRankUpdate]) -> list[_Spectrum]:
    spectra = []
    for name, f in adapters.items():
        if f.B.dim() != 2 or f.A.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise ValueError(f"para ({name}): expected B (m, r) and A (r, n), got B {tuple(f.B.shape)}, A {tuple(f.A.shape)}")
        L, s, R = para_spectrum(f.B, f.A, f.scale, layer=f"para ({name})", noise=f.noise)
        spectra.append(_Spectrum(name, "lora", L, s, R, (f.B.shape[0], f.A.shape[1]), name))
    return spectra


def _threshold(spectra: list[_Spectrum], energy: Optional[float], budget: Optional[int]) -> float:
    """The global τ; adapters keep every σ ≥ τ (and σ > 0). +inf keeps nothing."""
    pooled = torch.cat([sp.sigma.to("cpu", torch.float64) for sp in spectra])
    owner = torch.cat([torch.full((sp.sigma.numel(),), i) for i, sp in enumerate(spectra)])
    pooled, order = torch.sort(pooled, descending=True)
    owner = owner[order]
    positive = int((pooled > 0).sum())
    if positive == 0:
        return float("inf")
    if budget is None:
        count = select_rank(pooled[:positive], energy, 2, layer="para.compress")
        return float(pooled[count - 1])
    # Walk σ descending, adding each σ's marginal cost; cut only where σ changes, so that one
    # threshold keeps exactly the walked prefix.
    kept = [0] * len(spectra)
    total, tau = 0, float("inf")
    for j in range(positive):
        i = int(owner[j])
        total += spectra[i].cost(kept[i] + 1) - spectra[i].cost(kept[i])
        kept[i] += 1
        if total > budget:
            break
        if j + 1 == positive or pooled[j + 1] < pooled[j]:
            tau = float(pooled[j])
    return tau


def _lora_factors(L: Tensor, sigma: Tensor, R: Tensor, scale: float, like: Tensor) -> LowRankUpdate:
    """B', A' with scale·B'·A' = L diag(σ) Rᵀ: σ/|scale| is split evenly, the sign goes to B'."""
    root = (sigma / abs(scale)).sqrt()
    sign = 1.0 if scale > 0 else -1.0
    B = (sign * L * root).to(like.dtype)
    A = (root[:, None] * R.T).to(like.dtype)
    return LowRankUpdate(A=A.to(like.device), B=B.to(like.device), scale=scale)


def _rebuild(sp: _Spectrum, k: int, model: Optional[nn.Module], dict_input: Mapping) -> Optional[LowRankUpdate]:
    """Write the rank-k truncation L_k diag(σ_k) R_kᵀ back into the adapter (dict mode: return it)."""
    L, s, R = sp.left[:, :k], sp.sigma[:k].to(sp.left.dtype), sp.right[:, :k]
    if model is None:  # dict of LowRankUpdate
        f = dict_input[sp.target]
        return None if k == 0 else _lora_factors(L, s, R, f.scale, f.B)
    name, layer, scale = sp.target
    replacement = layer.apply_para_update(None if k == 0 else _lora_factors(L, s, R, scale, like=L))
    if replacement is not None:  # e.g. a LoRA of the new rank, or the bare base at rank 0
        for alias in module_aliases(model)[id(layer)]:
            replace_module(model, alias, replacement)
    return None


def compress(
    model_or_adapters: Union[nn.Module, Mapping[str, LowRankUpdate]],
    energy: Optional[float] = None,
    budget: Optional[int] = None,
) -> ParaResult:
    """PARA over every adapter of a model (LoraLinear, CersaLinear's ΔS, PicaLinear's shared M),
    rebuilt in place, or over a dict {name: LowRankUpdate} (the rebuilt factors come back in
    `result.adapters`, None where k_l = 0).

    Exactly one of `energy` (ε in (0, 1]; the default 0.95 when neither is given) or `budget` (the
    most adapter parameters to keep, counted as in the module docstring) sets the global threshold.
    Returns a ParaResult: per-adapter ranks, parameters before/after, the threshold and the share
    of the pooled Σσ² kept.
    """
    if energy is not None and budget is not None:
        raise ValueError(f"para.compress: give energy or budget, not both (got energy={energy}, budget={budget})")
    if budget is None and energy is None:
        energy = 0.95
    if budget is not None:  # a count of parameters: 2.5 or True is a mistake, not 2 or 1
        budget = check_int("budget", budget, "para.compress")
    if budget is not None and budget < 0:
        raise ValueError(f"para.compress: budget must be a non-negative number of parameters, got {budget}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"para.compress: energy must be in (0, 1], got {energy}")
    is_model = isinstance(model_or_adapters, nn.Module)
    spectra = _collect_model(model_or_adapters) if is_model else _collect_dict(model_or_adapters)
    if not spectra:
        raise ValueError("para.compress: found no adapter with a low-rank update (LoRA, CERSA, PiCa), nor a dict of LowRankUpdate")
    tau = _threshold(spectra, energy, budget)
    total = sum(float((sp.sigma.double() ** 2).sum()) for sp in spectra)
    kept_energy = 0.0
    layers, rebuilt = [], {}
    for sp in spectra:
        sig = sp.sigma.to("cpu", torch.float64)
        k = int(((sig >= tau) & (sig > 0)).sum())
        own = float((sig**2).sum())
        kept = float((sig[:k] ** 2).sum())
        kept_energy += kept
        layers.append(ParaLayer(sp.name, sp.kind, sig.numel(), k, sp.cost(sig.numel()), sp.cost(k),
                                kept / own if own > 0 else 1.0, sp.export_cost(k)))
        out = _rebuild(sp, k, model_or_adapters if is_model else None, model_or_adapters)
        if not is_model:
            rebuilt[sp.name] = out
    return ParaResult(threshold=tau, energy_kept=kept_energy / total if total > 0 else 1.0, layers=layers,
                      adapters=rebuilt)
