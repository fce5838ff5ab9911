"""One serialisable description of an adapter: what `apply` takes, `save` writes into
cersa_config.json and `load` reads back.

    config = AdapterConfig("lora", target_modules=["query", "value"], task="seq_cls", options={"rank": 8})
    ck.apply(model, config)        # the same as ck.apply(model, "lora", target_modules=..., task=..., rank=8)

Task presets choose the modules trained whole (`modules_to_save`) the way PEFT's task types do:
a classification or question-answering model trains its task head (`classifier`, `score`,
`qa_outputs`: the children outside the backbone, found by `nn.tree.head_modules`); a language
model or a feature extractor trains none (its output embedding is tied to, or is, pretrained).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

__all__ = ["AdapterConfig", "TASKS", "task_name"]

# our name -> (PEFT's TaskType value, whether the task head is trained whole)
TASKS: dict[str, tuple[str, bool]] = {
    "seq_cls": ("SEQ_CLS", True),
    "token_cls": ("TOKEN_CLS", True),
    "question_ans": ("QUESTION_ANS", True),
    "causal_lm": ("CAUSAL_LM", False),
    "seq2seq_lm": ("SEQ_2_SEQ_LM", False),
    "feature_extraction": ("FEATURE_EXTRACTION", False),
}
_FROM_PEFT = {peft: ours for ours, (peft, _) in TASKS.items()}


def task_name(task: Optional[str]) -> Optional[str]:
    """Our name of a task given as ours ("seq_cls") or as PEFT's TaskType ("SEQ_CLS", TaskType.SEQ_CLS)."""
    if task is None:
        return None
    value = getattr(task, "value", task)  # a peft.TaskType member is a str enum
    if isinstance(value, str):
        if value.lower() in TASKS:
            return value.lower()
        if value.upper() in _FROM_PEFT:
            return _FROM_PEFT[value.upper()]
    raise ValueError(f"apply: task must be one of {sorted(TASKS)} (or PEFT's {sorted(_FROM_PEFT)}), got {task!r}")


def _encode(value: Any) -> Any:
    """JSON-able form of an option value: a torch.dtype as "torch.<name>", containers element-wise."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("torch.") and isinstance(getattr(torch, value[6:], None), torch.dtype):
        return getattr(torch, value[6:])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


@dataclass
class AdapterConfig:
    """What `ck.apply(model, config)` does. method: "cersa" | "lora" | "pica" | "snell";
    target_modules / exclude_modules: as `apply`'s (a regex string, a list of name suffixes,
    "all-linear"); modules_to_save: modules trained whole (a list of names or name suffixes);
    task: a preset choosing modules_to_save (see TASKS); options: the method's keyword options
    (rank, energy, alpha, ...). `repr` shows only what was set."""

    method: str = "cersa"
    target_modules: Union[str, list[str], None] = "all-linear"
    exclude_modules: Union[str, list[str], None] = None
    modules_to_save: Optional[list[str]] = None
    task: Optional[str] = None
    freeze_base: bool = True
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set, frozenset)):
                setattr(self, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))
        self.task = task_name(self.task)
        if not isinstance(self.options, dict):
            raise TypeError(f"AdapterConfig: options must be a dict of the method's keyword options, got {self.options!r}")

    def to_dict(self) -> dict:
        """JSON-able dict (torch dtypes as "torch.<name>")."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**{k: _decode(v) for k, v in data.items()})

    def __repr__(self) -> str:
        defaults = AdapterConfig()
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name == "method" or getattr(self, f.name) != getattr(defaults, f.name)]
        return f"AdapterConfig({', '.join(shown)})"
