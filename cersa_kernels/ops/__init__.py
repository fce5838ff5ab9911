"""Functional ops, each backed by torch.library custom ops `cersa::<op>_fwd` / `cersa::<op>_bwd`."""
from .lowrank import lowrank_linear

__all__ = ["lowrank_linear"]
from .lora import lora_linear  # noqa: E402

__all__ += ["lora_linear"]
from .pica import pica_linear, pica_lowrank_linear  # noqa: E402

__all__ += ["pica_linear", "pica_lowrank_linear"]
