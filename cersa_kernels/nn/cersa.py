"""CersaLinear: a drop-in nn.Linear whose frozen weight is kept only as energy-truncated SVD factors.

`W' = U S Vᵀ` with U (m×k), V (n×k) frozen buffers and a dense trainable core S (k×k) initialised
to diag(σ_1..σ_k) (docs/methods.md §1). The dense weight is not stored.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_features_args, check_int, check_layer_dtype
from ..decompose import decompose, global_ranks
from ..ops.lowrank import lowrank_linear
from ._autocast import autocast_cast
from ._merge import merged_linear
from .base import AdapterLayer, LowRankUpdate

__all__ = ["CersaLinear"]


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 layers (tests, exact checks), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _random_orthonormal(rows: int, cols: int, device, dtype) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, device=device, dtype=torch.float32))
    return q.to(dtype)


class CersaLinear(AdapterLayer, method="cersa"):
    """y = x V Sᵀ Uᵀ + bias, for x (..., in_features) -> y (..., out_features).

    Buffers: U (out_features, rank), V (in_features, rank), sigma (rank,) the initial singular values
    Σ_k (so ΔS = S − diag(sigma) is always known), energy_kept (scalar). Parameters: S, (r, r) with
    r = trainable_rank (default rank): the top-left r×r block of the k×k core trains, the rest stays
    diag(sigma[r:]); bias (out_features,), frozen unless `bias.requires_grad_(True)`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        trainable_rank: Optional[int] = None,
        core_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_features, out_features = check_features_args(in_features, out_features, dtype, "CersaLinear")
        check_layer_dtype("core_dtype", core_dtype, "CersaLinear")
        rank = check_int("rank", rank, "CersaLinear")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"CersaLinear: rank must be in [1, min(in_features, out_features) = "
                f"{min(in_features, out_features)}], got {rank}"
            )
        trainable_rank = rank if trainable_rank is None else check_int("trainable_rank", trainable_rank, "CersaLinear")
        if not 1 <= trainable_rank <= rank:
            raise ValueError(f"CersaLinear: trainable_rank must be in [1, rank = {rank}], got {trainable_rank}")
        factory = dict(device=device, dtype=dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.trainable_rank = int(trainable_rank)
        self.register_buffer("U", torch.empty(out_features, rank, **factory))
        self.register_buffer("V", torch.empty(in_features, rank, **factory))
        # S and sigma may live in a wider dtype than U, V (core_dtype=torch.float32 keeps an fp32
        # core and fp32 gradients beside bf16 factors); the op casts S for the matmuls.
        core = dict(device=device, dtype=core_dtype or dtype)
        self.register_buffer("sigma", torch.empty(rank, **core))
        self.register_buffer("energy_kept", torch.ones((), dtype=torch.float32, device=device))
        self.S = nn.Parameter(torch.empty(trainable_rank, trainable_rank, **core))
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random orthonormal U, V and a flat spectrum with the Frobenius scale of nn.Linear's
        default init (E‖W‖² = out_features/3), truncated to the rank. `from_linear` overwrites all."""
        if self.U.is_meta:
            return
        with torch.no_grad():
            self.U.copy_(_random_orthonormal(self.out_features, self.rank, self.U.device, self.U.dtype))
            self.V.copy_(_random_orthonormal(self.in_features, self.rank, self.V.device, self.V.dtype))
            self.sigma.fill_(math.sqrt(self.out_features / (3 * min(self.in_features, self.out_features))))
            self.energy_kept.fill_(self.rank / min(self.in_features, self.out_features))
            self.S.copy_(torch.diag(self.sigma[: self.trainable_rank]))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        energy: float = 0.95,
        energy_power: float = 2,
        rank: Optional[int] = None,
        max_rank: Optional[int] = None,
        trainable_rank: Optional[int] = None,
        train_bias: bool = False,
        core_dtype: Optional[torch.dtype] = None,
    ) -> "CersaLinear":
        """Replace `linear` by its energy-truncated SVD (docs/methods.md §1); the bias is copied (frozen
        unless train_bias). The SVD runs in float32 on the weight's device. `trainable_rank` is
        capped at the k chosen (k is not known in advance when it comes from `energy`).
        `core_dtype` (default: the weight's dtype) is the dtype of S and sigma."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CersaLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        check_layer_dtype("core_dtype", core_dtype, "CersaLinear.from_linear")
        if trainable_rank is not None:
            check_int("trainable_rank", trainable_rank, "CersaLinear.from_linear", minimum=1)
        svd = decompose(linear.weight, energy, energy_power, rank, max_rank, layer="CersaLinear.from_linear")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, svd.rank, bias=linear.bias is not None,
            device="meta", dtype=w.dtype, core_dtype=core_dtype,
            trainable_rank=None if trainable_rank is None else min(trainable_rank, svd.rank),
        )
        layer.to_empty(device=w.device)
        with torch.no_grad():
            layer.U.copy_(svd.U)
            layer.V.copy_(svd.V)
            layer.sigma.copy_(svd.spectrum[: svd.rank])  # float64 spectrum: exact in any core dtype
            layer.energy_kept.fill_(svd.energy_kept)
            layer.S.copy_(torch.diag(layer.sigma[: layer.trainable_rank]))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.bias.requires_grad_(train_bias)
        return layer

    @classmethod
    def adapt(
        cls,
        bases: dict[str, nn.Linear],
        energy: float = 0.95,
        energy_power: float = 2,
        rank: Optional[int] = None,
        energy_scope: str = "layer",
        budget: Optional[int] = None,
        budget_bytes: Optional[int] = None,
        core_dtype: Optional[torch.dtype] = torch.float32,
        **layer_options,
    ) -> dict[str, "CersaLinear"]:
        """CersaLinear for each layer; `layer_options` go to from_linear (max_rank, trainable_rank,
        train_bias). energy_scope="global", `budget` (parameters) or `budget_bytes` choose the ranks
        with one threshold pooled over every layer's spectrum (`decompose.global_ranks`)."""
        layer = "apply(method='cersa')"
        if energy_scope not in ("layer", "global"):
            raise ValueError(f"{layer}: energy_scope must be 'layer' or 'global', got {energy_scope!r}")
        if budget is not None and budget_bytes is not None:
            raise ValueError(f"{layer}: give budget (parameters) or budget_bytes, not both")
        ranks: dict[str, Optional[int]] = {name: rank for name in bases}
        if energy_scope == "global" or budget is not None or budget_bytes is not None:
            if rank is not None:
                raise ValueError(f"{layer}: rank= fixes every layer's rank; it cannot combine with global allocation")
            if budget_bytes is not None:
                budget_bytes = check_int("budget_bytes", budget_bytes, layer, minimum=0)
                budget = budget_bytes // next(iter(bases.values())).weight.element_size()
            spectra = {n: torch.linalg.svdvals(b.weight.detach().float()) for n, b in bases.items()}
            shapes = {n: (b.out_features, b.in_features) for n, b in bases.items()}
            ranks = global_ranks(
                spectra, shapes, energy=None if budget is not None else energy, energy_power=energy_power, budget=budget
            )
        return {
            name: cls.from_linear(
                base, energy=energy, energy_power=energy_power, rank=ranks[name], core_dtype=core_dtype, **layer_options
            )
            for name, base in bases.items()
        }

    def core(self) -> Tensor:
        """The full k×k core S: the trainable block, completed by diag(sigma) when trainable_rank < k."""
        if self.trainable_rank == self.rank:
            return self.S
        frozen = torch.diag(self.sigma[self.trainable_rank :].to(self.S.dtype))
        return torch.block_diag(self.S, frozen)

    def delta_core(self) -> Tensor:
        """ΔS = S − Σ_k (k×k): the learned update, what PARA prunes and LoRA export writes."""
        return self.core() - torch.diag(self.sigma.to(self.S.dtype))

    def forward(self, x: Tensor) -> Tensor:
        # S is not cast: the op takes an fp32 core beside half-precision factors (fp32 dS)
        x, U, V, bias = autocast_cast(x, self.U, self.V, self.bias)
        return lowrank_linear(x, V, self.core(), U, bias, layer=self._name())

    def config(self) -> dict:
        """What `from_config` needs to rebuild an empty layer of this shape (for save/load)."""
        return dict(
            in_features=self.in_features, out_features=self.out_features, rank=self.rank,
            bias=self.bias is not None, trainable_rank=self.trainable_rank,
            dtype=str(self.U.dtype).replace("torch.", ""), core_dtype=str(self.S.dtype).replace("torch.", ""),
        )

    @classmethod
    def from_config(cls, config: dict, base: Optional[nn.Module] = None, device=None) -> "CersaLinear":
        """An empty layer from `config()`; the weights come from a state_dict. `base` is unused:
        CERSA keeps no reference to the original weight."""
        return cls(
            config["in_features"], config["out_features"], config["rank"], bias=config["bias"], device=device,
            dtype=getattr(torch, config["dtype"]), trainable_rank=config["trainable_rank"],
            core_dtype=getattr(torch, config["core_dtype"]),
        )

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge into a plain nn.Linear with weight U S Vᵀ (computed in float32)."""
        return merged_linear(self.dense_weight(), self.bias, self.U.dtype)

    def dense_weight(self) -> Tensor:
        """U S Vᵀ (out, in) in float32: the weight this layer applies."""
        return self.U.float() @ self.core().detach().float() @ self.V.float().T

    def delta_weight(self) -> Tensor:
        """U ΔS Vᵀ (out, in) in float32: the learned update over the rank-k truncation."""
        return self.U.float() @ self.delta_core().float() @ self.V.float().T

    def lowrank_update(self) -> LowRankUpdate:
        """The update over the ORIGINAL W0 that PEFT export writes: U ΔS Vᵀ (B = U ΔS, A = Vᵀ).
        W0 + U ΔS Vᵀ keeps the residual σ_{k+1..} that this layer itself discarded (docs/methods.md §1)."""
        work = _work_dtype(self.S)
        V, U = self.V.to(work), self.U.to(work)
        return LowRankUpdate(A=V.T.contiguous(), B=U @ self.delta_core().detach().to(work), scale=1.0)

    def para_core_shape(self) -> tuple[int, int]:
        return self.rank, self.rank  # PARA prunes ΔS, stored as the dense k×k core

    @torch.no_grad()
    def apply_para_update(self, update: Optional[LowRankUpdate]) -> None:
        """S = Σ_k + Uᵀ ΔW' V for PARA's truncated ΔW' (U, V orthonormal: ΔW' lies in their span)."""
        work = _work_dtype(self.S)
        delta = torch.zeros(self.rank, self.rank, device=self.U.device, dtype=work)
        if update is not None:
            U, V = self.U.to(work), self.V.to(work)
            delta = update.scale * (U.T @ update.B.to(work)) @ (update.A.to(work) @ V)
        S = torch.diag(self.sigma.to(work)) + delta
        self.S.copy_(S[: self.trainable_rank, : self.trainable_rank])
        return None

    def weight_bytes(self) -> int:
        """Bytes of everything that stands for the dense weight: U, V, S and sigma (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.U, self.V, self.S, self.sigma))

    def base_weight_bytes(self) -> int:
        return self.weight_bytes()

    def weight_dtype(self) -> torch.dtype:
        return self.U.dtype  # U and V stand for W0; S may be kept wider (core_dtype)

    def dense_weight_bytes(self) -> int:
        return self.in_features * self.out_features * self.U.element_size()

    def extra_repr(self) -> str:
        dense = self.dense_weight_bytes()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"trainable_rank={self.trainable_rank}, energy_kept={float(self.energy_kept):.4f}, "
            f"weight_bytes={self.weight_bytes()} vs dense {dense} ({self.weight_bytes() / dense:.1%}), "
            f"bias={self.bias is not None}"
        )
