"""nn.Module layers built on the fused ops."""
from .cersa import CersaLinear
from .snell import SnellLinear

__all__ = ["CersaLinear"]
__all__ += ["SnellLinear"]
