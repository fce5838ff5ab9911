"""LoraLinear: a frozen nn.Linear plus a trainable low-rank update on the fused `cersa::lora` op.

`y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ` with A (r×n) kaiming-uniform, B (m×r) zero, s = alpha/r
(docs/methods.md §5, PEFT's convention). Only x and x·Aᵀ are saved for backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_features_args, check_int, check_real
from ..ops.lora import lora_linear
from ._autocast import autocast_cast
from ._merge import merged_linear
from .base import AdapterLayer, LowRankUpdate

__all__ = ["LoraLinear"]


class LoraLinear(AdapterLayer, method="lora"):
    """x (..., in_features) -> y (..., out_features).

    Frozen: `weight` (out, in) and `bias` (out,) (parameters with requires_grad=False, so a state
    dict has nn.Linear's keys). Trainable: `lora_A` (rank, in), `lora_B` (out, rank).
    Dropout (training mode only) draws a fresh seed from torch's RNG at every call and passes it to
    the op, which regenerates the mask in backward: `torch.manual_seed` reproduces a run.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
        bias: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        in_features, out_features = check_features_args(in_features, out_features, dtype, "LoraLinear")
        rank = check_int("rank", rank, "LoraLinear")
        if alpha is not None:
            check_real("alpha", alpha, "LoraLinear")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"LoraLinear: rank must be in [1, min(in_features, out_features) = "
                f"{min(in_features, out_features)}], got {rank}"
            )
        if not 0.0 <= check_real("dropout", dropout, "LoraLinear") < 1.0:
            raise ValueError(f"LoraLinear: dropout must be in [0, 1), got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self._init_frozen_base(bias, **factory)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """W0, bias as nn.Linear would draw them (from_linear overwrites); A kaiming-uniform, B zero."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None, dropout: float = 0.0) -> "LoraLinear":
        """Wrap `linear` (its weight and bias are copied and frozen); step 0 equals `linear` exactly."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoraLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None,
            device="meta", dtype=w.dtype,
        )
        layer.to_empty(device=w.device)
        layer._copy_frozen_base(linear)
        layer.reset_adapter()
        return layer

    BASE_KEYS = ("weight", "bias")

    def config(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout)

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "LoraLinear":
        """The layer around the original Linear `base`; lora_A and lora_B come from a state_dict."""
        return cls.from_linear(base, config["rank"], config["alpha"], config["dropout"])

    def forward(self, x: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        # the seed lives on the CPU: the kernels read it as a Python int, which must not sync a GPU
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else None
        x, weight, A, B, bias = autocast_cast(x, self.weight, self.lora_A, self.lora_B, self.bias)
        return lora_linear(x, weight, A, B, bias, self.scaling, p, seed, layer=self._name())

    def delta_weight(self) -> Tensor:
        """ΔW = s·B·A (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def lowrank_update(self) -> LowRankUpdate:
        """s·B·A, over the original weight W0 (which this layer keeps)."""
        work = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return LowRankUpdate(A=self.lora_A.detach().to(work), B=self.lora_B.detach().to(work), scale=self.scaling)

    @torch.no_grad()
    def apply_para_update(self, update: Optional[LowRankUpdate]) -> nn.Module:
        """A LoraLinear of PARA's rank k with the same scale s (alpha' = s·k), or, at rank 0, the
        frozen base Linear alone (the adapter is removed)."""
        if update is None:
            return merged_linear(self.weight, self.bias, self.weight.dtype).requires_grad_(False).train(self.training)
        k = update.A.shape[0]
        new = LoraLinear(
            self.in_features, self.out_features, k, alpha=update.scale * k, dropout=self.dropout,
            bias=self.bias is not None, device="meta", dtype=self.weight.dtype,
        )
        new.to_empty(device=self.weight.device)
        new.weight.copy_(self.weight)
        if self.bias is not None:
            new.bias.copy_(self.bias)
            new.bias.requires_grad_(self.bias.requires_grad)
        new.lora_A.copy_(update.A)
        new.lora_B.copy_(update.B)
        new.layer_name, new.base_type = self.layer_name, self.base_type
        return new.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, dropout={self.dropout:g}, bias={self.bias is not None}"
        )
