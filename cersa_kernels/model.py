"""Whole-model helpers: find and replace the Linear layers of a model."""
from __future__ import annotations

from typing import Callable, Iterator

from torch import nn

__all__ = ["named_linears", "replace_module"]


def named_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(qualified name, layer) for every nn.Linear in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
