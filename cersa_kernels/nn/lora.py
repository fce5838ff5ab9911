"""LoraLinear: a frozen nn.Linear plus a trainable low-rank update on the fused `cersa::lora` op.

`y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ` with A (r×n) kaiming-uniform, B (m×r) zero, s = alpha/r
(docs/methods.md §5, PEFT's convention). Only x and x·Aᵀ are saved for backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import quant
from .._checks import check_features_args, check_int, check_real
from ..ops.lora import lora_linear
from ._autocast import autocast_cast
from ._merge import merged_linear
from ._quantized import DEFAULT_GROUP_SIZE, resolve_base_format, weight_dtype_of
from .base import AdapterLayer, LowRankUpdate

__all__ = ["LoraLinear"]


class LoraLinear(AdapterLayer, method="lora"):
    """x (..., in_features) -> y (..., out_features).

    Frozen: `weight` (out, in) and `bias` (out,) (parameters with requires_grad=False, so a state
    dict has nn.Linear's keys); with `base_format` ("int8" | "nf4") the buffers `weight_data`,
    `weight_absmax` instead (docs/quantization.md). Trainable: `lora_A` (rank, in), `lora_B` (out, rank).
    Dropout (training mode only) draws a fresh seed from torch's RNG at every call and passes it to
    the op, which regenerates the mask in backward: `torch.manual_seed` reproduces a run.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
        bias: bool = True, device=None, dtype=None, base_format: Optional[str] = None,
        base_group_size: int = DEFAULT_GROUP_SIZE,
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
        self._init_frozen_base(bias, **factory, base_format=base_format, base_group_size=base_group_size)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """W0, bias as nn.Linear would draw them (from_linear overwrites; a quantized base quantizes
        the draw); A kaiming-uniform, B zero."""
        if self.lora_A.is_meta:
            return
        w = torch.empty(self.out_features, self.in_features, device=self.lora_A.device, dtype=self.base_dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        with torch.no_grad():
            if self.base_format is None:  # rebound, never written in place: after from_linear W0 is the original's storage
                self.weight.data = w
            else:
                self._store_quantized("weight", w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            self.bias.data = nn.init.uniform_(torch.empty_like(self.bias), -bound, bound)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
        base_format: Optional[str] = None, base_group_size: Optional[int] = None,
    ) -> "LoraLinear":
        """Wrap `linear` (its weight is shared, not copied, and frozen; its bias copied and frozen);
        step 0 equals `linear` exactly.
        `base_format` ("int8" | "nf4", groups of `base_group_size`, default 64) stores W0 quantized:
        step 0 is then the dequantized Ŵ0. A bitsandbytes Linear4bit is read in place (its packed
        weight is viewed, not copied), whatever base_format (unset, or its own nf4 layout)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoraLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        base_format, base_group_size = resolve_base_format(linear, base_format, base_group_size, "LoraLinear.from_linear")
        layer = cls(
            linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None,
            device="meta", dtype=weight_dtype_of(linear), base_format=base_format, base_group_size=base_group_size,
        )
        layer._copy_frozen_base(linear)  # shares the weight; allocates the rest on its device
        layer.reset_adapter()
        return layer

    # A quantized W0 is rebuilt from the original model at load (requantized: deterministic, or the
    # Linear4bit viewed again), so its codes are base keys too.
    BASE_KEYS = ("weight", "weight_data", "weight_absmax", "bias")

    def config(self) -> dict:
        config = dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout)
        if self.base_format is not None:
            config.update(base_format=self.base_format, base_group_size=self.base_group_size)
        return config

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "LoraLinear":
        """The layer around the original Linear `base`; lora_A and lora_B come from a state_dict."""
        return cls.from_linear(
            base, config["rank"], config["alpha"], config["dropout"], config.get("base_format"),
            config.get("base_group_size"),
        )

    def forward(self, x: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        # the seed lives on the CPU: the kernels read it as a Python int, which must not sync a GPU
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else None
        x, weight, A, B, bias = autocast_cast(x, self.frozen_weight(), self.lora_A, self.lora_B, self.bias)
        return lora_linear(x, weight, A, B, bias, self.scaling, p, seed, layer=self._name())

    def delta_weight(self) -> Tensor:
        """ΔW = s·B·A (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def lowrank_update(self) -> LowRankUpdate:
        """s·B·A, over the original weight W0 (which this layer keeps)."""
        work = torch.float64 if self.base_dtype == torch.float64 else torch.float32
        return LowRankUpdate(A=self.lora_A.detach().to(work), B=self.lora_B.detach().to(work), scale=self.scaling)

    @torch.no_grad()
    def apply_para_update(self, update: Optional[LowRankUpdate]) -> nn.Module:
        """A LoraLinear of PARA's rank k with the same scale s (alpha' = s·k), or, at rank 0, the
        frozen base Linear alone (the adapter is removed). A quantized base is shared with the new
        layer; at rank 0 it stays a LoraLinear with B = 0 (rank 1): returning an nn.Linear would
        dequantize W0 into a dense copy."""
        quantized = self.base_format is not None
        if update is None and not quantized:
            return merged_linear(self.weight, self.bias, self.weight.dtype).requires_grad_(False).train(self.training)
        if update is None:
            update = LowRankUpdate(
                A=self.lora_A.new_zeros(1, self.in_features), B=self.lora_B.new_zeros(self.out_features, 1),
                scale=self.scaling,
            )
        k = update.A.shape[0]
        new = LoraLinear(
            self.in_features, self.out_features, k, alpha=update.scale * k, dropout=self.dropout,
            bias=self.bias is not None, device="meta", dtype=self.base_dtype, base_format=self.base_format,
            base_group_size=self.base_group_size,
        )
        if not quantized:
            new.weight = nn.Parameter(self.weight.detach(), requires_grad=False)  # shared, not copied
        new._materialize(self.lora_A.device)
        if quantized:
            new._store_quantized("weight", self.frozen_weight())  # the same buffers: no copy
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
