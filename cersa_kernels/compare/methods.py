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
    """kind: 'probe' (encoder frozen), 'full' (everything trains), 'apply' (ck.apply(method=...,
    **options)) or 'qlora' (bitsandbytes + PEFT, unpatched: see worker.build_qlora; options are
    LoraConfig's); budget_fraction: CERSA global allocation with budget_bytes = this × the dense
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
    # quantized frozen weights: CERSA's U, V (factor_format) or LoRA's W0 (base_format) stored int8 /
    # NF4 in groups of 64 along the row, one float32 absmax per group (cersa_kernels.quant)
    Method("cersa-a0.95-int8", "apply", 1e-3, "cersa", dict(energy=0.95, factor_format="int8")),
    Method("cersa-a0.95-nf4", "apply", 1e-3, "cersa", dict(energy=0.95, factor_format="nf4")),
    Method("cersa-a0.9-nf4", "apply", 1e-3, "cersa", dict(energy=0.9, factor_format="nf4")),
    Method("lora-r8-nf4", "apply", 1e-3, "lora", dict(rank=8, base_format="nf4")),
    # the anchor: QLoRA as its users build it, bitsandbytes Linear4bit NF4 + PEFT LoRA, r = 8 and
    # scale alpha/r = 1 as lora-r8 (LoraLinear's default alpha = r), every Linear of the encoder
    Method("qlora-r8", "qlora", 1e-3, options=dict(r=8, lora_alpha=8, lora_dropout=0.0)),
)}
QUANT_METHODS = ("cersa-a0.95-int8", "cersa-a0.95-nf4", "cersa-a0.9-nf4", "lora-r8-nf4", "qlora-r8")
# the default run stays about ten minutes on 2 cores: the quantized rows are asked for by name
# (`--methods cersa-a0.95 cersa-a0.95-int8 ... qlora-r8`, docs/compare.md)
DEFAULT_METHODS = tuple(name for name in METHODS if name not in QUANT_METHODS)
