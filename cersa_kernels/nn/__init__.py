"""nn.Module layers built on the fused ops."""
from .cersa import CersaLinear
from .snell import SnellLinear

__all__ = ["CersaLinear"]
__all__ += ["SnellLinear"]
from .lora import LoraLinear  # noqa: E402
from .pica import PicaLinear, apply_pica  # noqa: E402

__all__ += ["LoraLinear", "PicaLinear", "apply_pica"]
