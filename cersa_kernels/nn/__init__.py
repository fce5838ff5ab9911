"""nn.Module layers built on the fused ops."""
from .cersa import CersaLinear

__all__ = ["CersaLinear"]
from .lora import LoraLinear  # noqa: E402
from .pica import PicaLinear, apply_pica  # noqa: E402

__all__ += ["LoraLinear", "PicaLinear", "apply_pica"]
