"""SnellLinear: nn.Linear plus SNELL's sparse kernelized-LoRA update (docs/methods.md §4).

`y = x (W0 + ΔW_s)ᵀ + b`, W0 and b frozen, A (H×n×d_h) and B (H×m×d_h) trainable,
K[i, j] = Σ_h c_h ‖B_h[i] − A_h[j]‖, τ = the s-quantile of |K| (recomputed every call, no mask
stored), ΔW_s = K ⊙ sg(|K|) ⊙ 1[|K| > τ] (ΔW = K at sparsity 0). On the Triton backend neither K nor ΔW_s is ever
materialised.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_features_args, check_int, check_real
from ..backends import use_backend
from ..ops.snell import check_snell_config, merge_backend, snell_delta, snell_linear, snell_threshold
from ._autocast import autocast_cast
from ._quantized import is_linear4bit
from .base import AdapterLayer

__all__ = ["SnellLinear"]


class SnellLinear(AdapterLayer, method="snell"):
    """x (..., in_features) -> y (..., out_features).

    Frozen: weight W0 (out_features, in_features) and bias (out_features,) (trainable only with
    train_bias). Parameters: A (heads, in_features, d_h),
    B (heads, out_features, d_h) with d_h = rank / heads. `coeffs` (one per head) and `sparsity` ∈ [0, 1) are fixed.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        heads: int = 2,
        sparsity: float = 0.9,
        coeffs: Sequence[float] = (0.1, -0.1),
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = check_features_args(in_features, out_features, dtype, "SnellLinear")
        name = self._name()
        # types first (rank=4.0 would fail inside torch.empty, coeffs=[nan] would give a nan ΔW and
        # an undefined threshold); the ranges are the op's own checks
        rank, heads = check_int("rank", rank, name), check_int("heads", heads, name)
        if isinstance(coeffs, (str, bytes)) or not hasattr(coeffs, "__iter__"):
            raise TypeError(f"{name}: coeffs must be a sequence of one real number per head, got {coeffs!r}")
        coeffs = tuple(check_real(f"coeffs[{i}]", c, name) for i, c in enumerate(coeffs))
        check_real("sparsity", sparsity, name, finite=False)  # nan fails the range check below
        check_snell_config(rank, heads, sparsity, coeffs, name)
        self.rank = int(rank)
        self.heads = int(heads)
        self.sparsity = float(sparsity)
        self.coeffs = coeffs
        factory = dict(device=device, dtype=dtype)
        d_h = rank // heads
        self._init_frozen_base(bias, **factory)
        self.A = nn.Parameter(torch.empty(heads, in_features, d_h, **factory))
        self.B = nn.Parameter(torch.empty(heads, out_features, d_h, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W0 and bias as nn.Linear initialises them (from_linear replaces both); A and B as
        `reset_adapter` draws them."""
        if self.A.is_meta:
            return
        with torch.no_grad():
            # fresh tensors, never written in place: after from_linear they share the original layer's storage
            self.weight.data = nn.init.kaiming_uniform_(torch.empty_like(self.weight), a=math.sqrt(5))
            self.reset_adapter()
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.data = torch.empty_like(self.bias).uniform_(-bound, bound)

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A and B by kaiming-uniform(a=√5) per head, each head's (rows, d_h) matrix treated like an
        nn.Linear weight (fan_in = d_h), so ΔW starts small but not zero (docs/methods.md §4)."""
        for h in range(self.heads):
            nn.init.kaiming_uniform_(self.A[h], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B[h], a=math.sqrt(5))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int = 8,
        heads: int = 2,
        sparsity: float = 0.9,
        coeffs: Sequence[float] = (0.1, -0.1),
        train_bias: bool = False,
    ) -> "SnellLinear":
        """Wrap `linear`: its weight becomes the frozen W0 (shared, not copied), its bias is copied
        (frozen unless train_bias); A and B are freshly initialised."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SnellLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, rank, heads, sparsity, coeffs,
            bias=linear.bias is not None, device="meta", dtype=w.dtype,
        )
        layer._copy_frozen_base(linear, train_bias)  # shares W0; allocates A, B, bias on its device
        layer.reset_adapter()
        return layer

    BASE_KEYS = ("weight", "bias")

    @classmethod
    def adapt(cls, bases: dict[str, nn.Module], base_format: Optional[str] = None, base_group_size=None, **options):
        """Per layer, as every method; a quantized W0 (`base_format`) is refused: SNELL forms W0 + ΔW_s
        as one dense m×n sum in every forward (docs/quantization.md)."""
        if base_format is not None or base_group_size is not None:
            name = next(iter(bases), "?")
            raise ValueError(
                f"apply(method='snell'): layer {name!r}: base_format={base_format!r} is not supported: SNELL forms "
                "W0 + ΔW_s densely in every forward, so a quantized W0 saves nothing (use 'lora' or 'pica')"
            )
        return super().adapt(bases, **options)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        if is_linear4bit(module):
            return ("a bitsandbytes Linear4bit (a quantized W0), which SNELL does not support: it forms W0 + ΔW_s "
                    "densely in every forward (use 'lora' or 'pica' over it)")
        return super().unsupported_reason(module)

    def config(self) -> dict:
        """What `from_config` needs to rebuild this layer around the original Linear."""
        return dict(rank=self.rank, heads=self.heads, sparsity=self.sparsity, coeffs=list(self.coeffs))

    @classmethod
    def from_config(cls, config: dict, base: nn.Linear, device=None) -> "SnellLinear":
        """The layer around `base` (W0 and bias copied); A and B come from a state_dict."""
        return cls.from_linear(base, config["rank"], config["heads"], config["sparsity"], tuple(config["coeffs"]))

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias, A, B = autocast_cast(x, self.weight, self.bias, self.A, self.B)
        return snell_linear(x, weight, bias, A, B, self.coeffs, self.sparsity, layer=self._name())

    @torch.no_grad()
    def threshold(self) -> Tensor:
        """τ (0-d) for the current A, B: the same op the forward uses (-inf when sparsity = 0)."""
        return snell_threshold(self.A, self.B, self.coeffs, self.sparsity, layer=self._name())

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """ΔW_s (out_features, in_features): the sparse update (K itself at sparsity 0), formed once
        (the merge): on the CUDA kernel where built and on CUDA tensors, else the reference, under
        every backend setting. τ comes from the reference selection (the merge forms the m×n
        matrix anyway, and the `cuda` backend has no selection kernel)."""
        with use_backend("torch"):
            tau = float(self.threshold())
        return snell_delta(self.A, self.B, self.coeffs, tau)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"heads={self.heads}, sparsity={self.sparsity}, coeffs={self.coeffs}, "
            f"trainable={self.A.numel() + self.B.numel()}, bias={self.bias is not None}"
        )
