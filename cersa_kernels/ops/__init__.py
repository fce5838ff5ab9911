"""Functional ops, each backed by a torch.library custom op pair `cersa::<op>_fwd` / `cersa::<op>_bwd`
(defined once in `_define.py`; each op file states its math and shapes)."""
from .lora import lora_linear
from .lowrank import lowrank_linear
from .pica import pica_linear
from .pica_lowrank import pica_lowrank_linear
from .snell import snell_delta, snell_linear, snell_threshold

__all__ = ["lowrank_linear", "lora_linear", "pica_linear", "pica_lowrank_linear", "snell_linear", "snell_threshold", "snell_delta"]
