"""Module-tree helpers shared by the whole-model tools: find the layers a PEFT-style target spec
selects, replace a module at a dotted path, see a GPT-2 Conv1D as the nn.Linear it is.

Target selection follows PEFT: a list of names matches module-name suffixes (`"query"` matches
`encoder.layer.0.attention.self.query`), a string is a regular expression matched against the
full name, and `"all-linear"` takes every Linear (and Hugging Face Conv1D) except the model's
output layers: its output embedding (`get_output_embeddings()`, e.g. `lm_head`) and, for a
Hugging Face task model, the task head, found structurally as the child modules outside the
backbone that `base_model_prefix` names (`classifier`, `score`, `qa_outputs`, `lm_head`, ...):
a head is trained whole through `modules_to_save`, never given a low-rank adapter. A bitsandbytes `Linear4bit` (an nn.Linear subclass whose weight is
packed NF4) is a Linear target like any other: the layers read its packed weight in place
(`_quantized.frozen_weight_of`), and the method's `unsupported_reason` refuses one it cannot read.
A list or regex that names a module no method adapts (Embedding,
LayerNorm, a container) raises, as in PEFT; a tied module (`m.l2 = m.l1`) is one target under
all its names.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from typing import Iterator, Optional, Sequence, Union

from torch import nn

from ._quantized import is_linear4bit
from .base import AdapterLayer

__all__ = [
    "TargetSpec", "is_conv1d", "is_linear4bit", "named_linears", "replace_module", "as_linear", "module_aliases",
    "find_targets", "head_modules", "output_modules", "resolve_modules", "closest_names",
]

TargetSpec = Union[str, Sequence[str], None]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a Linear with its weight stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def named_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) for every nn.Linear and HF Conv1D in `model`, in module order.
    nn.MultiheadAttention's out_proj is left out: that module reads its weight directly, so a
    replaced layer would be bypassed."""
    inside_mha = _inside_mha(model)
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and id(module) not in inside_mha:
            yield name, module


def _inside_mha(model: nn.Module) -> set[int]:
    """ids of the children of every nn.MultiheadAttention (its out_proj): not replaceable."""
    return {id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention) for child in module.children()}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def as_linear(module: nn.Module) -> nn.Linear:
    """`module` itself if it is an nn.Linear (a bitsandbytes Linear4bit too: its packed weight is
    read in place by the layers, never dequantized here); an equivalent nn.Linear for an HF Conv1D,
    whose weight is the transposed VIEW of the Conv1D's (out, in), no copy, and whose bias is the
    Conv1D's: `apply` then never holds a second copy of a GPT-2 weight."""
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        w = module.weight
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w.detach().T, requires_grad=w.requires_grad)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
        return linear
    raise TypeError(f"expected an nn.Linear or Conv1D, got {type(module).__name__}")


def _matches(name: str, spec: TargetSpec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task head of a Hugging Face task model: the children of `model` outside its
    backbone (the child `model.base_model_prefix` names, e.g. `bert`, `model`, `transformer`) that
    hold parameters: `["classifier"]` for BertForSequenceClassification, `["score"]` for
    LlamaForSequenceClassification, `["lm_head"]` for an untied causal LM. [] for a model that is
    its own backbone (BertModel) and for a model without `base_model_prefix` (a plain nn.Module)."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        return []
    return [name for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())]


def output_modules(model: nn.Module) -> set[int]:
    """ids of the modules `"all-linear"` leaves out as the model's output layers: the output
    embedding and every module inside the task head (`head_modules`)."""
    out = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, nn.Module):
        out.add(id(output))
    for name in head_modules(model):
        out.update(id(m) for m in model.get_submodule(name).modules())
    return out


def closest_names(word: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The names of `names` closest to `word` (difflib), also comparing `word` with each name's last part."""
    by_last = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], name)
    close = difflib.get_close_matches(word, list(names), n=n, cutoff=0.6)
    close += [by_last[k] for k in difflib.get_close_matches(word.rsplit(".", 1)[-1], list(by_last), n=n, cutoff=0.6)]
    return list(dict.fromkeys(close))[:n]


def resolve_modules(model: nn.Module, entries: Sequence[str], option: str = "modules_to_save", strict: bool = True) -> list[str]:
    """Names of the modules that `entries` select (each entry a module name or a name suffix, as
    PEFT's modules_to_save: `"classifier"` matches `classifier` and `x.classifier`), each once,
    under its first name. An entry that selects no module raises ValueError with the closest names
    (with strict=False it is skipped, as PEFT skips the head names of its task type that a model lacks)."""
    if isinstance(entries, str) or not isinstance(entries, Collection) or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"apply: {option} must be a list of module names, got {entries!r}")
    aliases = module_aliases(model)
    names = []
    for entry in entries:
        found = [name for name, module in model.named_modules()
                 if name and any(a == entry or a.endswith("." + entry) for a in aliases[id(module)])]
        if not found and not strict:
            continue
        if not found:
            every = [n for n, _ in model.named_modules() if n]
            hint = closest_names(entry, every)
            raise ValueError(
                f"apply: {option} entry {entry!r} names no module of {type(model).__name__}"
                + (f"; did you mean {hint}?" if hint else "")
                + (f" (the task head here is {head_modules(model)})" if head_modules(model) else "")
            )
        names.extend(n for n in found if n not in names)
    return names


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every qualified name it is reachable at, in module order}. A tied module
    (`m.l2 = m.l1`) has several names; the first is the one `named_modules()` gives."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _unsupported_reason(module: nn.Module, inside_mha: set[int], inside_adapter: dict[int, str]) -> Optional[str]:
    """Why no method can adapt `module` (None when it is a Linear, Conv1D or adapter layer)."""
    if id(module) in inside_adapter:
        return f"a part of the adapter layer {inside_adapter[id(module)]!r}"
    if id(module) in inside_mha:
        return f"a {type(module).__name__} inside a MultiheadAttention, which reads its weight directly (a replaced layer would be bypassed)"
    if isinstance(module, (nn.Linear, AdapterLayer)) or is_conv1d(module):
        return None
    return f"a {type(module).__name__}, not a Linear or Conv1D layer"


def _check_spec(option: str, spec: TargetSpec) -> None:
    """A target spec is None, a regular expression (str) or a sequence of module-name suffixes: a
    bad regex or a non-str entry fails here naming the option, not as re.error / TypeError later."""
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as exc:
            raise ValueError(
                f"apply: {option}={spec!r} is not a valid regular expression ({exc}); a string is matched as a "
                "regex against the full module name, a list of names matches name suffixes"
            ) from None
        return
    # a collection (list, tuple, set, dict keys), not a one-shot iterator: every module reads it again
    if not isinstance(spec, Collection) or not all(isinstance(s, str) for s in spec):
        raise TypeError(
            f"apply: {option} must be a regex string, a list of module names or None, got {spec!r}"
        )


def find_targets(
    model: nn.Module, target_modules: TargetSpec = "all-linear", exclude_modules: TargetSpec = None,
    keep: Collection[str] = (),
) -> list[str]:
    """Names of the layers selected by the PEFT-style specs (see module docstring), one per module:
    a module tied under several names (`m.l2 = m.l1`) is selected by any of them, excluded by any
    of them, and listed under its first name. "all-linear" takes every Linear/Conv1D (not lm_head,
    not MultiheadAttention's out_proj) and every adapter layer, and skips everything else. A list or
    a regex that names any other module (Embedding, LayerNorm, a container, a part of an adapter
    layer) raises ValueError naming it, as PEFT does. `keep`: names of modules trained whole
    (modules_to_save); nothing inside them is a target, and a spec that names one raises."""
    _check_spec("target_modules", target_modules)
    _check_spec("exclude_modules", exclude_modules)
    output = output_modules(model)
    aliases = module_aliases(model)
    kept = {id(inner): name for name in keep for inner in model.get_submodule(name).modules()}
    inside_mha = _inside_mha(model)
    inside_adapter = {
        id(inner): name for name, module in model.named_modules() if isinstance(module, AdapterLayer)
        for inner in module.modules() if inner is not module
    }
    names = []
    for name, module in model.named_modules():  # each module once, under its first name
        if not name or any(_matches(alias, exclude_modules) for alias in aliases[id(module)]):
            continue
        reason = _unsupported_reason(module, inside_mha, inside_adapter)
        if target_modules == "all-linear":
            if reason is None and id(module) not in output and id(module) not in kept:
                names.append(name)
            continue
        matched = [alias for alias in aliases[id(module)] if _matches(alias, target_modules)]
        if matched and id(module) in kept:
            raise ValueError(
                f"apply: target_modules={target_modules!r} names {matched[0]!r}, which modules_to_save entry "
                f"{kept[id(module)]!r} trains whole; a module is either adapted or saved, not both"
            )
        if matched and reason is not None:
            raise ValueError(
                f"apply: target_modules={target_modules!r} names {matched[0]!r}, which is {reason}; "
                "name Linear layers only (or leave it out with exclude_modules)"
            )
        if matched:
            names.append(name)
    if not names:
        linears = [n for n, _ in named_linears(model)]
        hint = ""
        if isinstance(target_modules, str) and target_modules != "all-linear":
            close = closest_names(target_modules, linears)
            hint = ((f"; did you mean {close}?" if close else "") +
                    f" A string is a regular expression matched against the FULL module name (e.g. '.*{target_modules}'); "
                    f"a list of names matches name suffixes (e.g. [{target_modules!r}])")
        elif not isinstance(target_modules, str) and target_modules is not None:
            close = [c for t in target_modules for c in closest_names(t, linears)]
            hint = f"; did you mean {list(dict.fromkeys(close))[:5]}?" if close else ""
        raise ValueError(
            f"apply: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) selects no Linear "
            f"layer{hint}; the model's {len(linears)} Linear layers include: {linears[:12]}"
        )
    return names
