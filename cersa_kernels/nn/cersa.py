"""CersaLinear: a drop-in nn.Linear whose frozen weight is kept only as energy-truncated SVD factors.

`W' = U S Vᵀ` with U (m×k), V (n×k) frozen (Parameters with requires_grad=False, so FSDP2 shards
them) and a dense trainable core S (k×k) initialised
to diag(σ_1..σ_k) (docs/methods.md §1). The dense weight is not stored. With `factor_format`
("int8" | "nf4") U and V are stored quantized and S starts at the least-squares refit of the core
to the quantized factors (docs/quantization.md).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import quant
from .._checks import check_features_args, check_int, check_layer_dtype
from .._progress import Progress
from ..decompose import RANK_MULTIPLE, align_ranks, cersa_weight_bytes, decompose, global_ranks
from ..ops.lowrank import lowrank_linear
from ..quant import QuantizedTensor
from ._autocast import autocast_cast
from ._merge import merged_linear
from ._quantized import DEFAULT_GROUP_SIZE, QuantSpec, check_quant_options, frozen_weight_of, weight_dtype_of
from .base import AdapterLayer, LowRankUpdate

__all__ = ["CersaLinear", "project_core"]


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 layers (tests, exact checks), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _random_orthonormal(rows: int, cols: int, device, dtype) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, device=device, dtype=torch.float32))
    return q.to(dtype)


def project_core(U: Tensor, V: Tensor, B: Tensor, A: Tensor, orthonormal: bool = False) -> Tensor:
    """The k×k core C minimising ‖B A − U C Vᵀ‖_F, for U (m×k), V (n×k) of full column rank and an
    update B A (B (m×r), A (r×n)): C = (UᵀU)⁻¹ (UᵀB) (A V) (VᵀV)⁻¹. Only k×k and k×r products and
    k×k solves (float64): no m×n matrix. `orthonormal` (UᵀU = VᵀV = I) skips the solves.

    It is the refit of a quantized layer's initial core (B A = U_k Σ_k V_kᵀ over the dequantized
    Û, V̂) and PARA's write-back of a truncated update (which lies in span(U) ⊗ span(V): exact)."""
    left, right = U.T @ B, A @ V  # (k, r), (r, k)
    if not orthonormal:
        f64 = torch.float64
        left = torch.linalg.solve(U.to(f64).T @ U.to(f64), left.to(f64))
        right = torch.linalg.solve(V.to(f64).T @ V.to(f64), right.to(f64).T).T  # right · (VᵀV)⁻¹, VᵀV symmetric
    return (left @ right).to(B.dtype)


class CersaLinear(AdapterLayer, method="cersa"):
    """y = x V Sᵀ Uᵀ + bias, for x (..., in_features) -> y (..., out_features).

    Frozen Parameters (requires_grad=False: sharded by FSDP2, never trained): U (out_features, rank),
    V (in_features, rank). Buffers: sigma (rank,) the initial singular values Σ_k (so
    ΔS = S − diag(sigma) is always known), energy_kept (scalar). Trainable: S, (r, r) with
    r = trainable_rank (default rank): the top-left r×r block of the k×k core trains, the rest stays
    diag(sigma[r:]); bias (out_features,), frozen unless `bias.requires_grad_(True)`.

    With factor_format ("int8" | "nf4"): no U, V; the frozen U_data/U_absmax hold Uᵀ (rank, out_features)
    and V_data/V_absmax hold Vᵀ (rank, in_features), quantized in groups of factor_group_size along
    out_features / in_features; `factors()` gives U, V as QuantizedTensors (logical (m, k), (n, k)).
    With refit (default) the frozen core_init (rank, rank) holds the least-squares core S* of the
    quantized factors, S starts there and ΔS = S − S*; without, S* = diag(sigma).
    """

    NO_WEIGHT_DECAY = ("S",)  # S starts at Σ_k: weight decay would pull it towards 0 (docs/methods.md §1)

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
        factor_format: Optional[str] = None,
        factor_group_size: int = DEFAULT_GROUP_SIZE,
        refit: bool = True,
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
        self.factor_format = check_quant_options("factor_format", factor_format, factor_group_size, "CersaLinear")
        self.factor_group_size = int(factor_group_size)
        self.refit = bool(refit) and self.factor_format is not None  # dense U, V are orthonormal: S* = Σ_k
        self.base_dtype = dtype or torch.get_default_dtype()
        if self.factor_format is None:  # frozen Parameters, not buffers: FSDP2 shards them
            self._set_frozen("U", torch.empty(out_features, rank, **factory))
            self._set_frozen("V", torch.empty(in_features, rank, **factory))
        else:
            for name, length in (("U", out_features), ("V", in_features)):
                spec = QuantSpec((rank, length), self.factor_format, self.factor_group_size, transposed=True)
                self._register_quantized(name, spec, device)
        # S and sigma may live in a wider dtype than U, V (core_dtype=torch.float32 keeps an fp32
        # core and fp32 gradients beside bf16 factors); the op casts S for the matmuls.
        core = dict(device=device, dtype=core_dtype or dtype)
        self.register_buffer("sigma", torch.empty(rank, **core))
        self.register_buffer("energy_kept", torch.ones((), dtype=torch.float32, device=device))
        if self.refit:  # a k×k frozen operand of the forward (trainable_rank < k): sharded as U, V
            self._set_frozen("core_init", torch.empty(rank, rank, **core))
        self.S = nn.Parameter(torch.empty(trainable_rank, trainable_rank, **core))
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random orthonormal U, V and a flat spectrum with the Frobenius scale of nn.Linear's
        default init (E‖W‖² = out_features/3), truncated to the rank. `from_linear` overwrites all."""
        if self.sigma.is_meta:
            return
        with torch.no_grad():
            device = self.sigma.device
            U = _random_orthonormal(self.out_features, self.rank, device, self.base_dtype)
            V = _random_orthonormal(self.in_features, self.rank, device, self.base_dtype)
            self.sigma.fill_(math.sqrt(self.out_features / (3 * min(self.in_features, self.out_features))))
            self.energy_kept.fill_(self.rank / min(self.in_features, self.out_features))
            self._set_factors(U, V)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def _set_factors(self, U: Tensor, V: Tensor) -> None:
        """Store U (m×k), V (n×k) (quantized as Uᵀ, Vᵀ in a quantized layer) and start S at the core
        of these factors: diag(sigma), or with refit the least-squares S* over the dequantized Û, V̂
        (docs/quantization.md)."""
        if self.factor_format is None:
            for name, t in (("U", U), ("V", V)):
                if getattr(self, name).data_ptr() != t.data_ptr():  # from_linear hands over its own
                    getattr(self, name).copy_(t)
            S0 = torch.diag(self.sigma)
        else:
            self._store_quantized("U", U.T)
            self._store_quantized("V", V.T)
            S0 = torch.diag(self.sigma.to(torch.float64))
            if self.refit:  # S* = argmin ‖U Σ_k Vᵀ − Û S V̂ᵀ‖_F
                U_hat, V_hat = self.dense_factors(torch.float64)
                S0 = project_core(U_hat, V_hat, U.to(torch.float64) @ S0, V.to(torch.float64).T)
                self.core_init.copy_(S0)
        self.S.copy_(S0[: self.trainable_rank, : self.trainable_rank])

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
        factor_format: Optional[str] = None,
        factor_group_size: int = DEFAULT_GROUP_SIZE,
        refit: bool = True,
        rank_multiple: int = RANK_MULTIPLE,
    ) -> "CersaLinear":
        """Replace `linear` by its energy-truncated SVD (docs/methods.md §1); the bias is copied (frozen
        unless train_bias). The SVD runs in float32 on the weight's device; an energy-chosen rank is
        rounded up to a multiple of `rank_multiple` (1: off; `decompose`). `trainable_rank` is
        capped at the k chosen (k is not known in advance when it comes from `energy`).
        `core_dtype` (default: the weight's dtype) is the dtype of S and sigma. `factor_format`
        ("int8" | "nf4", groups of `factor_group_size`) stores U and V quantized, and `refit` starts
        S at the least-squares core of the quantized factors (docs/quantization.md). A bitsandbytes
        Linear4bit is dequantized once (transiently) for the SVD."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CersaLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        check_layer_dtype("core_dtype", core_dtype, "CersaLinear.from_linear")
        check_quant_options("factor_format", factor_format, factor_group_size, "CersaLinear.from_linear")
        if trainable_rank is not None:
            check_int("trainable_rank", trainable_rank, "CersaLinear.from_linear", minimum=1)
        w = quant.dense(frozen_weight_of(linear))
        svd = decompose(w, energy, energy_power, rank, max_rank, layer="CersaLinear.from_linear",
                        rank_multiple=rank_multiple)
        layer = cls(
            linear.in_features, linear.out_features, svd.rank, bias=linear.bias is not None,
            device="meta", dtype=w.dtype, core_dtype=core_dtype,
            trainable_rank=None if trainable_rank is None else min(trainable_rank, svd.rank),
            factor_format=factor_format, factor_group_size=factor_group_size, refit=refit,
        )
        if factor_format is None:  # the SVD's own (contiguous, fresh) U, V become the factors: no copy
            layer._set_frozen("U", svd.U)
            layer._set_frozen("V", svd.V)
        layer._materialize(w.device)
        layer.energy_rank = svd.energy_rank  # the k before alignment, for apply's report (not state)
        with torch.no_grad():
            layer.sigma.copy_(svd.spectrum[: svd.rank])  # float64 spectrum: exact in any core dtype
            layer.energy_kept.fill_(svd.energy_kept)
            layer._set_factors(svd.U, svd.V)
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
        factor_format: Optional[str] = None,
        factor_group_size: int = DEFAULT_GROUP_SIZE,
        refit: bool = True,
        rank_multiple: int = RANK_MULTIPLE,
        progress: Optional[bool] = None,
        **layer_options,
    ) -> dict[str, "CersaLinear"]:
        """CersaLinear for each layer; `layer_options` go to from_linear (max_rank, trainable_rank,
        train_bias). energy_scope="global", `budget` (parameters) or `budget_bytes` choose the ranks
        with one threshold pooled over every layer's spectrum (`decompose.global_ranks`); a
        `budget_bytes` counts the real bytes of the chosen factor format (`cersa_weight_bytes`), so
        it buys more rank at 4 bits. Energy- and budget-chosen ranks round up to multiples of
        `rank_multiple` (1: off; `decompose.align_ranks`: a budget is never exceeded); rank= is
        taken as it is. progress: a per-layer bar with an ETA on stderr (None: only on a terminal,
        never in tests; True / False: always / never)."""
        layer = "apply(method='cersa')"
        check_quant_options("factor_format", factor_format, factor_group_size, layer)
        check_int("rank_multiple", rank_multiple, layer, minimum=1)
        quant_options = dict(factor_format=factor_format, factor_group_size=factor_group_size, refit=refit)
        if energy_scope not in ("layer", "global"):
            raise ValueError(f"{layer}: energy_scope must be 'layer' or 'global', got {energy_scope!r}")
        if budget is not None and budget_bytes is not None:
            raise ValueError(f"{layer}: give budget (parameters) or budget_bytes, not both")
        shapes = {n: (b.out_features, b.in_features) for n, b in bases.items()}
        # the ETA weighs each layer by its SVD's work, m·n·min(m, n)
        bar = Progress({n: m * k * min(m, k) for n, (m, k) in shapes.items()}, "apply(cersa)", enabled=progress)
        ranks: dict[str, Optional[int]] = {name: rank for name in bases}
        energy_ranks: dict[str, int] = {}
        if energy_scope == "global" or budget is not None or budget_bytes is not None:
            if rank is not None:
                raise ValueError(f"{layer}: rank= fixes every layer's rank; it cannot combine with global allocation")
            cost = None
            if budget_bytes is not None:
                budget = check_int("budget_bytes", budget_bytes, layer, minimum=0)
                factor_size = torch.empty((), dtype=weight_dtype_of(next(iter(bases.values())))).element_size()
                core_size = torch.empty((), dtype=core_dtype).element_size() if core_dtype is not None else factor_size

                def cost(m: int, n: int, k: int) -> int:
                    return cersa_weight_bytes(
                        m, n, k, factor_format=factor_format, factor_group_size=factor_group_size,
                        factor_element_size=factor_size, core_element_size=core_size, refit=refit,
                    )
            spectra = {n: torch.linalg.svdvals(quant.dense(frozen_weight_of(b), torch.float32)) for n, b in bases.items()}
            energy_ranks = global_ranks(
                spectra, shapes, energy=None if budget is not None else energy, energy_power=energy_power, budget=budget,
                cost=cost,
            )
            ranks = align_ranks(energy_ranks, shapes, rank_multiple, budget=budget, cost=cost)

        def build(name: str, base: nn.Linear) -> "CersaLinear":
            adapted = cls.from_linear(
                base, energy=energy, energy_power=energy_power, rank=ranks[name], core_dtype=core_dtype,
                rank_multiple=rank_multiple, **quant_options, **layer_options,
            )
            if name in energy_ranks:  # the pooled rule's k before alignment (from_linear saw a fixed rank)
                adapted.energy_rank = min(energy_ranks[name], adapted.rank)
            bar.done(name)
            return adapted

        try:
            return cls._build_each(bases, build)
        finally:
            bar.close()

    # --- the factors and the core --------------------------------------------------------------------

    def factors(self) -> tuple[Union[Tensor, QuantizedTensor], Union[Tensor, QuantizedTensor]]:
        """(U (m×k), V (n×k)): the buffers, or QuantizedTensors over the quantized buffers (rebuilt
        here, no copy) standing for the layer's base dtype."""
        if self.factor_format is None:
            return self.U, self.V
        return self.quantized("U"), self.quantized("V")

    def dense_factors(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(U, V) as dense tensors in `dtype` (default: theirs): the dequantized Û, V̂ (new tensors)
        in a quantized layer, the buffers themselves in a dense one."""
        return tuple(quant.dense(t, dtype) for t in self.factors())

    def initial_core(self) -> Tensor:
        """S* (k×k), the core at step 0 in S's dtype: diag(sigma), or the refitted core_init."""
        return self.core_init if self.refit else torch.diag(self.sigma.to(self.S.dtype))

    def core(self) -> Tensor:
        """The full k×k core S: the trainable block, completed by the initial core S* when
        trainable_rank < k (diag(sigma) there without refit)."""
        r = self.trainable_rank
        if r == self.rank:
            return self.S
        if not self.refit:
            frozen = torch.diag(self.sigma[r:].to(self.S.dtype))
            return torch.block_diag(self.S, frozen)
        init = self.core_init.to(self.S.dtype)
        return torch.cat((torch.cat((self.S, init[:r, r:]), 1), init[r:]), 0)

    def delta_core(self) -> Tensor:
        """ΔS = S − S* (k×k): the learned update, what PARA prunes and LoRA export writes (S* = Σ_k
        for dense factors)."""
        return self.core() - self.initial_core().to(self.S.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # S is not cast: the op takes an fp32 core beside half-precision factors (fp32 dS)
        U, V = self.factors()
        x, U, V, bias = autocast_cast(x, U, V, self.bias)
        return lowrank_linear(x, V, self.core(), U, bias, layer=self._name())

    def config(self) -> dict:
        """What `from_config` needs to rebuild an empty layer of this shape (for save/load)."""
        config = dict(
            in_features=self.in_features, out_features=self.out_features, rank=self.rank,
            bias=self.bias is not None, trainable_rank=self.trainable_rank,
            dtype=str(self.base_dtype).replace("torch.", ""), core_dtype=str(self.S.dtype).replace("torch.", ""),
        )
        if self.factor_format is not None:  # dense layers keep the config they always had
            config.update(factor_format=self.factor_format, factor_group_size=self.factor_group_size, refit=self.refit)
        return config

    @classmethod
    def from_config(cls, config: dict, base: Optional[nn.Module] = None, device=None) -> "CersaLinear":
        """An empty layer from `config()`; the weights come from a state_dict. `base` is unused:
        CERSA keeps no reference to the original weight."""
        return cls(
            config["in_features"], config["out_features"], config["rank"], bias=config["bias"], device=device,
            dtype=getattr(torch, config["dtype"]), trainable_rank=config["trainable_rank"],
            core_dtype=getattr(torch, config["core_dtype"]), factor_format=config.get("factor_format"),
            factor_group_size=config.get("factor_group_size", DEFAULT_GROUP_SIZE), refit=config.get("refit", True),
        )

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Merge into a plain nn.Linear with weight U S Vᵀ (computed in float32; Û, V̂ dequantized)."""
        return merged_linear(self.dense_weight(), self.bias, self.base_dtype)

    def dense_weight(self) -> Tensor:
        """U S Vᵀ (out, in) in float32: the weight this layer applies."""
        U, V = self.dense_factors(torch.float32)
        return U @ self.core().detach().float() @ V.T

    def delta_weight(self) -> Tensor:
        """U ΔS Vᵀ (out, in) in float32: the learned update over the layer at step 0."""
        U, V = self.dense_factors(torch.float32)
        return U @ self.delta_core().float() @ V.T

    def lowrank_update(self) -> LowRankUpdate:
        """The update over the ORIGINAL W0 that PEFT export writes: U ΔS Vᵀ (B = U ΔS, A = Vᵀ), over
        the dequantized Û, V̂ that the forward applies when quantized. W0 + U ΔS Vᵀ keeps the residual
        σ_{k+1..} (and the quantization error) that this layer itself discarded (docs/methods.md §1)."""
        work = _work_dtype(self.S)
        U, V = self.dense_factors(work)
        # ΔS = S − S* is rounded at the scale of S* (σ_1 of W0), not of ΔS: PARA's noise floor
        noise = torch.finfo(self.S.dtype).eps * float(torch.linalg.matrix_norm(self.initial_core().detach().float()))
        return LowRankUpdate(A=V.T.contiguous(), B=U @ self.delta_core().detach().to(work), scale=1.0, noise=noise)

    def para_core_shape(self) -> tuple[int, int]:
        return self.rank, self.rank  # PARA prunes ΔS, stored as the dense k×k core

    @torch.no_grad()
    def apply_para_update(self, update: Optional[LowRankUpdate]) -> None:
        """S = S* + ΔS' with ΔS' the core of PARA's truncated ΔW' (it lies in the factors' span):
        Uᵀ ΔW' V for orthonormal U, V, the least-squares `project_core` for dequantized Û, V̂."""
        work = _work_dtype(self.S)
        delta = torch.zeros(self.rank, self.rank, device=self.sigma.device, dtype=work)
        if update is not None:
            U, V = self.dense_factors(work)
            delta = project_core(
                U, V, update.scale * update.B.to(work), update.A.to(work), orthonormal=self.factor_format is None
            )
        S = self.initial_core().to(work) + delta
        self.S.copy_(S[: self.trainable_rank, : self.trainable_rank])
        return None

    def weight_bytes(self) -> int:
        """Bytes of everything that stands for the dense weight (bias excluded): U and V (their codes
        and absmax when quantized), S, sigma, and core_init with refit: `cersa_weight_bytes`."""
        dense = [self.S, self.sigma] + ([self.U, self.V] if self.factor_format is None else [])
        if self.refit:
            dense.append(self.core_init)
        return self.quantized_bytes() + sum(t.numel() * t.element_size() for t in dense)

    def base_weight_bytes(self) -> int:
        return self.weight_bytes()

    def weight_dtype(self) -> torch.dtype:
        return self.base_dtype  # U and V (dense or quantized) stand for W0; S may be kept wider (core_dtype)

    def dense_weight_bytes(self) -> int:
        return self.in_features * self.out_features * torch.empty((), dtype=self.base_dtype).element_size()

    def extra_repr(self) -> str:
        dense = self.dense_weight_bytes()
        quantized = "" if self.factor_format is None else (
            f"factor_format={self.factor_format}, factor_group_size={self.factor_group_size}, refit={self.refit}, "
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"trainable_rank={self.trainable_rank}, energy_kept={float(self.energy_kept):.4f}, {quantized}"
            f"weight_bytes={self.weight_bytes()} vs dense {dense} ({self.weight_bytes() / dense:.1%}), "
            f"bias={self.bias is not None}"
        )
