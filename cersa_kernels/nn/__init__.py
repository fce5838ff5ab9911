"""nn.Module layers built on the fused ops, all on one interface (`base.AdapterLayer`), and the
module-tree helpers the whole-model tools share (`tree`)."""
from .base import AdapterLayer, LowRankUpdate, adapter_classes, method_classes
from .cersa import CersaLinear
from .lora import LoraLinear
from .pica import PicaCersaLinear, PicaLinear, apply_pica
from .snell import SnellLinear

__all__ = [
    "AdapterLayer", "LowRankUpdate", "adapter_classes", "method_classes",
    "CersaLinear", "LoraLinear", "PicaLinear", "PicaCersaLinear", "SnellLinear", "apply_pica",
]
