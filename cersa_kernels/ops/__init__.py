"""Functional ops, each backed by torch.library custom ops `cersa::<op>_fwd` / `cersa::<op>_bwd`."""
from .lowrank import lowrank_linear

__all__ = ["lowrank_linear"]
