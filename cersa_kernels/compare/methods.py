"""The methods compared, their `ck.apply` options and their learning rates.

Learning rates (AdamW, no weight decay, constant): one small table, chosen once on the validation
split with `--lr-sweep` (the sweep tries each value ×{1/3, 1, 3}); `--lr` overrides it for every
method. The classification head (a fresh 384→5 Linear on mean-pooled states) always trains, at
HEAD_LR, in every method; for the linear probe it is the only thing that trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HEAD_LR = 3e-3
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


@dataclass(frozen=True)
class Method:
    """kind: 'probe' (encoder frozen), 'full' (everything trains) or 'apply' (ck.apply(method=...,
    **options)); budget_fraction: CERSA global allocation with budget_bytes = this × the dense
    weight bytes of the target layers; para: also report PARA compression after training."""

    name: str
    kind: str
    lr: float
    method: str = ""
    options: dict = field(default_factory=dict)
    budget_fraction: float | None = None
    para: bool = False


METHODS = {m.name: m for m in (
    Method("probe", "probe", HEAD_LR),
    Method("full-ft", "full", 1e-4),
    Method("lora-r8", "apply", 1e-3, "lora", dict(rank=8), para=True),
    Method("cersa-a0.95", "apply", 1e-3, "cersa", dict(energy=0.95), para=True),
    Method("cersa-a0.9", "apply", 1e-3, "cersa", dict(energy=0.9), para=True),
    Method("cersa-global-100", "apply", 1e-3, "cersa", dict(energy_scope="global"), budget_fraction=1.0, para=True),
    Method("cersa-global-50", "apply", 1e-3, "cersa", dict(energy_scope="global"), budget_fraction=0.5, para=True),
    # PiCa shares one M per role (the module-name suffix): BERT's three kinds of `dense` differ in
    # shape and cannot share one, so PiCa adapts the attention projections, its paper's main target
    Method("pica-r64", "apply", 1e-3, "pica", dict(rank=64, target_modules=["query", "key", "value"])),
    Method("snell-s0.9", "apply", 1e-3, "snell", dict(sparsity=0.9)),
)}
DEFAULT_METHODS = tuple(METHODS)
