"""nn.Module layers built on the fused ops."""
from .cersa import CersaLinear

__all__ = ["CersaLinear"]
