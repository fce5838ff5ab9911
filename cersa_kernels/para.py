"""PARA: post-optimisation, data-free rank allocation across all the adapters of a model (METHODS.md §3).

Every adapter is an update ΔW = L·C·Rᵀ whose small core C carries the spectrum:
- LoRA (ΔW = s·B·A): thin QR B = Q_B R_B, Aᵀ = Q_A R_A, C = s·R_B R_Aᵀ (r0×r0); L = Q_B, R = Q_A.
- CERSA (ΔW = U·ΔS·Vᵀ, U and V orthonormal): C = ΔS = S − Σ (k×k), compressed in the U/V basis.
- PiCa (ΔW_l = M·P_l for every layer l sharing M, P_l orthonormal rows): C = M (m×r), one adapter.
The SVD of each core (no m×n matrix is formed) gives σ; every σ of every adapter is pooled, one
global threshold τ is set, and each adapter is rebuilt with k_l = #{σ ≥ τ}: the rebuilt ΔW is the
dense rank-k_l truncation of ΔW exactly (0 removes the adapter).

Threshold modes: `energy=ε` (τ = the σ at which the pooled, descending Σσ² first reaches ε·total)
or `budget=N` (the smallest τ whose kept adapters fit in N parameters). Parameters are counted per
adapter as min(k·(rows + cols), rows·cols) of its core: a rank-k factorisation or the dense core,
whichever is smaller (LoRA: k·(m+n); CERSA's ΔS: min(2k·k_l, k²); PiCa's M: min(k_l·(m+r), m·r)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .decompose import select_rank, truncated_svd
from .model import replace_module

__all__ = ["LoraFactors", "ParaLayer", "ParaResult", "compress", "para_spectrum"]


@dataclass(frozen=True)
class LoraFactors:
    """A LoRA update ΔW = scale·B·A: A (r, n), B (m, r). The input and output of dict-mode PARA."""

    A: Tensor
    B: Tensor
    scale: float

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class ParaLayer:
    """One adapter's outcome: kind ∈ {lora, cersa, pica}, rank before/after, parameters before/after,
    and the share of its own Σσ² kept."""

    name: str
    kind: str
    rank_before: int
    rank_after: int
    params_before: int
    params_after: int
    energy_kept: float


@dataclass
class ParaResult:
    """What `compress` did. ranks: {adapter name: k_l}; adapters: the rebuilt LoraFactors (None when
    removed) in dict mode, empty for a model (rebuilt in place)."""

    threshold: float
    energy_kept: float
    layers: list[ParaLayer]
    adapters: dict[str, Optional[LoraFactors]] = field(default_factory=dict)

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

    def cost(self, k: int) -> int:
        rows, cols = self.core_shape
        return min(k * (rows + cols), rows * cols) if k > 0 else 0


def _svd_of_core(core: Tensor, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD of a small core (float32, float64 for float64): U (rows, q), σ (q,), V (cols, q)."""
    svd = truncated_svd(core, rank=min(core.shape), where=where)
    return svd.U, svd.sigma, svd.V


def para_spectrum(B: Tensor, A: Tensor, scale: float, where: str = "para") -> tuple[Tensor, Tensor, Tensor]:
    """ΔW = scale·B·A as L·diag(σ)·Rᵀ without forming it: B (m, r), A (r, n) -> L (m, r), σ (r,), R (n, r)."""
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    QB, RB = torch.linalg.qr(B.detach().to(work))
    QA, RA = torch.linalg.qr(A.detach().to(work).T)
    Uc, sigma, Vc = _svd_of_core(scale * (RB @ RA.T), where)
    return QB @ Uc, sigma, QA @ Vc


def _collect_model(model: nn.Module) -> list[_Spectrum]:
    from .nn.cersa import CersaLinear
    from .nn.lora import LoraLinear
    from .nn.pica import PicaLinear

    spectra: list[_Spectrum] = []
    seen_M: dict[int, _Spectrum] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            L, s, R = para_spectrum(module.lora_B, module.lora_A, module.scaling, where=f"para ({name})")
            spectra.append(_Spectrum(name, "lora", L, s, R, (module.out_features, module.in_features), module))
        elif isinstance(module, CersaLinear):
            L, s, R = _svd_of_core(module.delta_core().detach(), where=f"para ({name})")
            spectra.append(_Spectrum(name, "cersa", L, s, R, (module.rank, module.rank), module))
        elif isinstance(module, PicaLinear):
            if id(module.M) in seen_M:  # a shared M is one adapter: compressed once
                seen_M[id(module.M)].target.append(module)
                continue
            L, s, R = _svd_of_core(module.M.detach(), where=f"para ({name}.M)")
            spec = _Spectrum(f"{name}.M", "pica", L, s, R, tuple(module.M.shape), [module])
            seen_M[id(module.M)] = spec
            spectra.append(spec)
    return spectra


def _collect_dict(adapters: Mapping[str, LoraFactors]) -> list[_Spectrum]:
    spectra = []
    for name, f in adapters.items():
        if f.B.dim() != 2 or f.A.dim() != 2 or f.B.shape[1] != f.A.shape[0]:
            raise ValueError(f"para ({name}): expected B (m, r) and A (r, n), got B {tuple(f.B.shape)}, A {tuple(f.A.shape)}")
        L, s, R = para_spectrum(f.B, f.A, f.scale, where=f"para ({name})")
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
        count = select_rank(pooled[:positive], energy, 2, where="para.compress")
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


def _lora_factors(L: Tensor, sigma: Tensor, R: Tensor, scale: float, like: Tensor) -> LoraFactors:
    """B', A' with scale·B'·A' = L diag(σ) Rᵀ: σ/|scale| is split evenly, the sign goes to B'."""
    root = (sigma / abs(scale)).sqrt()
    sign = 1.0 if scale > 0 else -1.0
    B = (sign * L * root).to(like.dtype)
    A = (root[:, None] * R.T).to(like.dtype)
    return LoraFactors(A=A.to(like.device), B=B.to(like.device), scale=scale)


def _rebuild(sp: _Spectrum, k: int, model: Optional[nn.Module], dict_input: Mapping) -> Optional[LoraFactors]:
    """Write the rank-k truncation L_k diag(σ_k) R_kᵀ back into the adapter (dict mode: return it)."""
    L, s, R = sp.left[:, :k], sp.sigma[:k].to(sp.left.dtype), sp.right[:, :k]
    if sp.kind == "cersa":
        layer = sp.target
        with torch.no_grad():
            S = torch.diag(layer.sigma).to(L.dtype) + (L * s) @ R.T
            layer.S.copy_(S[: layer.trainable_rank, : layer.trainable_rank])
        return None
    if sp.kind == "pica":
        with torch.no_grad():
            sp.target[0].M.copy_((L * s) @ R.T)  # every layer of the role holds this same M
        return None
    if model is None:  # dict of LoraFactors
        f = dict_input[sp.target]
        return None if k == 0 else _lora_factors(L, s, R, f.scale, f.B)
    from .nn.lora import LoraLinear

    layer = sp.target
    if k == 0:  # the adapter is removed: the frozen base layer alone
        base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                         device=layer.weight.device, dtype=layer.weight.dtype).requires_grad_(False)
        with torch.no_grad():
            base.weight.copy_(layer.weight)
            if layer.bias is not None:
                base.bias.copy_(layer.bias)
        replace_module(model, sp.name, base)
        return None
    # keep the layer's scale s exact: alpha' = s·k
    f = _lora_factors(L, s, R, layer.scaling, layer.weight)
    new = LoraLinear(layer.in_features, layer.out_features, k, alpha=layer.scaling * k, dropout=layer.dropout,
                     bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype)
    new.to_empty(device=layer.weight.device)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        new.lora_A.copy_(f.A)
        new.lora_B.copy_(f.B)
    new.layer_name = layer.layer_name
    new.train(layer.training)  # a new module starts in training mode (its dropout would turn on)
    # the markers `apply` set: without them save / export_peft_lora no longer see the layer
    for attr in ("_cersa_adapter", "_cersa_method", "_cersa_base_type"):
        if hasattr(layer, attr):
            setattr(new, attr, getattr(layer, attr))
    replace_module(model, sp.name, new)
    return None


def compress(
    model_or_adapters: Union[nn.Module, Mapping[str, LoraFactors]],
    energy: Optional[float] = None,
    budget: Optional[int] = None,
) -> ParaResult:
    """PARA over every adapter of a model (LoraLinear, CersaLinear's ΔS, PicaLinear's shared M),
    rebuilt in place, or over a dict {name: LoraFactors} (the rebuilt factors come back in
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
    if budget is not None and (int(budget) != budget or budget < 0):
        raise ValueError(f"para.compress: budget must be a non-negative number of parameters, got {budget}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"para.compress: energy must be in (0, 1], got {energy}")
    is_model = isinstance(model_or_adapters, nn.Module)
    spectra = _collect_model(model_or_adapters) if is_model else _collect_dict(model_or_adapters)
    if not spectra:
        raise ValueError("para.compress: found no adapter (LoraLinear, CersaLinear, PicaLinear, or LoraFactors)")
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
                                kept / own if own > 0 else 1.0))
        out = _rebuild(sp, k, model_or_adapters if is_model else None, model_or_adapters)
        if not is_model:
            rebuilt[sp.name] = out
    return ParaResult(threshold=tau, energy_kept=kept_energy / total if total > 0 else 1.0, layers=layers,
                      adapters=rebuilt)
