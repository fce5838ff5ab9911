"""Functional ops, each backed by torch.library custom ops `cersa::<op>_fwd` / `cersa::<op>_bwd`."""
from .lowrank import lowrank_linear
from .snell import snell_delta, snell_linear, snell_threshold

__all__ = ["lowrank_linear"]
__all__ += ["snell_linear", "snell_threshold", "snell_delta"]
from .lora import lora_linear  # noqa: E402

__all__ += ["lora_linear"]
from .pica import pica_linear, pica_lowrank_linear  # noqa: E402

__all__ += ["pica_linear", "pica_lowrank_linear"]
