"""Whole-model API: apply an adapter method to the Linear layers of any model, merge it back,
save and load the adapted layers.

    report = cersa_kernels.apply(model, method="cersa", target_modules="all-linear", energy=0.95)
    cersa_kernels.save(model, "out/")             # safetensors + JSON config
    cersa_kernels.load(fresh_model, "out/")       # rebuilds the layers, loads the weights
    cersa_kernels.merge(model)                    # adapters -> plain nn.Linear
    cersa_kernels.apply(model, AdapterConfig("lora", task="seq_cls", options={"rank": 8}))  # one config object

Target selection follows PEFT: a list of names matches module-name suffixes (`"query"` matches
`encoder.layer.0.attention.self.query`), a string is a regular expression matched against the
full name, and `"all-linear"` takes every Linear (and Hugging Face Conv1D) except the model's
output layers (the output embedding, a task model's head: nn.tree.head_modules), which
`modules_to_save` / `task=` train whole. A list or regex that names a module no method adapts (Embedding,
LayerNorm, a container) raises, as in PEFT; a tied module (`m.l2 = m.l1`) gets one adapter under
all its names. `save` writes both files atomically, each carrying a fingerprint of the other; `load`
checks the pair and every layer against the model before it replaces anything.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:  # FSDP2 (torch >= 2.6); a torch built without distributed has none
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = ()

from ._adapter_files import (
    CONFIG_ID_KEY, FORMAT_KEY, VERSION_KEY, check_pair, config_id, read_json_object, read_safetensors,
    serialize_tensors, sha256, write_files_atomically,
)
from .config import TASKS, AdapterConfig
from .nn.base import AdapterLayer, adapter_classes, method_classes, placing_as_built
from .nn import tree
from .nn._quantized import weight_bytes_of, weight_dtype_of
from .nn.tree import TargetSpec
from .para import compress
from .para_peft import write_lora_adapter

__all__ = [
    "apply", "merge", "trainable_parameters", "save", "load", "ApplyReport", "adapter_layers", "export_peft_lora",
    "write_adapter", "print_trainable_parameters", "parameter_counts", "modules_to_save", "adapter_configs",
]

# Module-tree helpers that lived here and moved to cersa_kernels.nn.tree: still importable from
# here for one release, with a DeprecationWarning.
_MOVED_TO_TREE = ("named_linears", "replace_module", "find_targets", "as_linear", "module_aliases", "is_conv1d")


def __getattr__(name: str):
    if name in _MOVED_TO_TREE:
        warnings.warn(f"cersa_kernels.model.{name} moved to cersa_kernels.nn.tree.{name}", DeprecationWarning, stacklevel=2)
        return getattr(tree, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CONFIG_NAME = "cersa_config.json"
WEIGHTS_NAME = "cersa_adapter.safetensors"


@dataclass
class ApplyReport:
    """What `apply` did: one row per replaced layer, and totals. A row's `rank` is the layer's rank and
    `energy_rank` the k the energy/budget rule chose before alignment to a multiple (CERSA's
    rank_multiple; equal to rank for the other methods and for rank=)."""

    method: str
    rows: list[dict] = field(default_factory=list)

    @property
    def base_bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self.rows)

    @property
    def base_bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self.rows)

    other_trainable: int = 0  # parameters outside the new layers that require grad (modules_to_save, unfrozen base)
    total_params: int = 0  # every parameter of the model, each once

    @property
    def trainable(self) -> int:
        """Every parameter of the model that requires grad, each once (the new layers' and the others')."""
        return sum(r["trainable"] for r in self.rows) + self.other_trainable

    def set_totals(self, model: nn.Module, counted: set[int]) -> None:
        """other_trainable and total_params from `model` (counted: ids of the new layers' trainable ones)."""
        unique = {id(p): p for p in model.parameters()}
        self.total_params = sum(p.numel() for p in unique.values())
        self.other_trainable = sum(p.numel() for i, p in unique.items() if p.requires_grad and i not in counted)

    def __str__(self) -> str:
        lines = [f"{'layer':48s} {'m×n':>11s} {'rank':>5s} {'(rule)':>6s} {'trainable':>10s} {'weight bytes':>14s} {'dense bytes':>12s}"]
        for r in self.rows:
            m, n = r["shape"]
            chosen = r.get("energy_rank", r["rank"])
            lines.append(
                f"{r['name']:48s} {m:>5d}×{n:<5d} {r['rank']:>5d} {chosen:>6d} {r['trainable']:>10,d} {r['bytes_after']:>14,d} {r['bytes_before']:>12,d}"
            )
        lines.append(
            f"{'total (' + str(len(self.rows)) + ' layers, ' + self.method + ')':48s} {'':11s} {'':5s} {'':6s} "
            f"{sum(r['trainable'] for r in self.rows):>10,d} "
            f"{self.base_bytes_after:>14,d} {self.base_bytes_before:>12,d}"
        )
        if self.other_trainable:
            lines.append(f"{'other trainable (modules_to_save, unfrozen base)':48s} {'':11s} {'':5s} {'':6s} {self.other_trainable:>10,d}")
        if self.total_params:
            lines.append(_peft_line(self.trainable, self.total_params))
        return "\n".join(lines)


def _peft_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """{name: layer} for every adapter layer of `model` that is not part of another one (the CERSA
    base inside a PicaCersaLinear is part of it), each once, under its first name."""
    inner = {id(m) for layer in model.modules() if isinstance(layer, AdapterLayer) for m in layer.modules() if m is not layer}
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer) and id(m) not in inner}


# PEFT's LoraConfig keywords -> ours (apply refuses the PEFT spelling with the one to use)
_PEFT_HABITS = {
    "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "task_type": "task",
    "target_modules_regex": "target_modules (a string is a regex)",
}
_STATE_ATTR = "_cersa_kernels_state"  # on the model: {"configs": [AdapterConfig...], "modules_to_save": [...]}


def _model_state(model: nn.Module) -> dict:
    """What apply/load recorded on `model`: the AdapterConfig of every apply, the modules trained whole."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = {"configs": [], "modules_to_save": [], "task": None}
        model.__dict__[_STATE_ATTR] = state  # a plain attribute: nn.Module's __setattr__ would not register it anyway
    return state


def adapter_configs(model: nn.Module) -> list[AdapterConfig]:
    """The AdapterConfig of every `apply` on `model`, in order (what `load` read back from the file)."""
    return list(_model_state(_unwrapped(model))["configs"])


def modules_to_save(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that apply/load train whole (its `modules_to_save`)."""
    return list(_model_state(_unwrapped(model))["modules_to_save"])


def apply(
    model: nn.Module,
    method: Union[str, AdapterConfig] = "cersa",
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec = None,
    freeze_base: bool = True,
    modules_to_save: Optional[list[str]] = None,
    task: Optional[str] = None,
    **options,
) -> ApplyReport:
    """Replace the selected Linear/Conv1D layers of `model` in place by `method`'s adapter layers.

    method: "cersa" (options: energy, energy_power, rank, max_rank, trainable_rank, train_bias,
    energy_scope="layer"|"global", budget (parameters), budget_bytes, core_dtype=torch.float32,
    factor_format=None|"int8"|"nf4", factor_group_size=64, refit=True);
    "lora" (rank, alpha, dropout, base_format=None|"int8"|"nf4", base_group_size=64); "pica" (rank,
    base_format, base_group_size; one M shared per role; targets may be CersaLinear layers of an
    earlier apply, whose h = x·V the branch reuses); "snell" (rank, heads, sparsity, coeffs,
    train_bias). bitsandbytes Linear4bit targets are read in place (docs/quantization.md). With
    freeze_base, every parameter that is not an adapter parameter stops requiring grad (as PEFT
    does); the layers of an earlier apply keep theirs, except those adapted now (PiCa over CERSA
    freezes S unless freeze_base=False).

    `method` may be an AdapterConfig (cersa_kernels.config) instead of the keywords. `"all-linear"`
    leaves out the model's output layers (output embedding, task head: nn.tree.head_modules).
    modules_to_save: modules (names or name suffixes) trained whole: the modules themselves are
    unfrozen, not copied (the model is adapted in place, so the original would only cost memory);
    `save` writes them, `load` restores them, `merge` keeps them, `export_peft_lora` writes them as
    PEFT's modules_to_save. task: a preset that chooses modules_to_save as PEFT's task types do
    ("seq_cls", "token_cls", "question_ans": the task head; "causal_lm", "seq2seq_lm",
    "feature_extraction": none). Returns an ApplyReport.
    """
    if isinstance(method, AdapterConfig):
        given = dict(target_modules=target_modules, exclude_modules=exclude_modules, freeze_base=freeze_base,
                     modules_to_save=modules_to_save, task=task, **options)
        defaults = dict(target_modules="all-linear", exclude_modules=None, freeze_base=True, modules_to_save=None, task=None)
        extra = sorted(k for k, v in given.items() if k not in defaults or v != defaults[k])
        if extra:
            raise TypeError(f"apply: give an AdapterConfig or keyword arguments, not both (got the config and {extra})")
        config = method
    else:
        config = AdapterConfig(method, target_modules, exclude_modules, modules_to_save, task, freeze_base, dict(options))
    for key in config.options:
        if key in _PEFT_HABITS:
            raise TypeError(f"apply: unknown option {key}=...; did you mean {_PEFT_HABITS[key]}=? ({key!r} is PEFT's name)")
    model = _unwrapped(model)
    method, options, freeze_base = config.method, dict(config.options), config.freeze_base
    methods = method_classes()
    if method not in methods:
        raise ValueError(f"apply: method must be one of {sorted(methods)}, got {method!r}")
    cls = methods[method]
    saved = config.modules_to_save
    if saved is None and config.task is not None:
        saved = tree.head_modules(model) if TASKS[config.task][1] else []
    saved = tree.resolve_modules(model, saved) if saved else []
    _check_untied(model, saved)
    names = tree.find_targets(model, config.target_modules, config.exclude_modules, keep=saved)
    originals = {name: model.get_submodule(name) for name in names}
    aliases = tree.module_aliases(model)
    # adapter layers (PiCa over CERSA) are passed as they are; the rest as nn.Linear (GPT-2's Conv1D too)
    bases = {name: m if isinstance(m, AdapterLayer) else tree.as_linear(m) for name, m in originals.items()}
    for name, base in bases.items():  # an adapter layer already in place, PiCa over PiCa, ...
        reason = cls.unsupported_reason(base)
        if reason is not None:
            raise ValueError(
                f"apply(method={method!r}): layer {name!r} is {reason}; merge() the model first, or leave the "
                "layer out with exclude_modules"
            )
    # Adapter layers of an earlier apply keep their trainable state under freeze_base: only the
    # parameters that are no adapter's are frozen, and those of the layers adapted now (CERSA under
    # PiCa), which become this method's base. Ids only: no reference may keep a dense weight alive.
    targets = {id(m) for m in originals.values()}
    earlier = {id(p) for layer in adapter_layers(model).values() if id(layer) not in targets for p in layer.parameters()}
    reused = {id(p) for m in originals.values() if isinstance(m, AdapterLayer) for p in m.parameters()}
    # What the report and the swap need of each original, taken now: `place` then drops the
    # original (and its base) the moment its layer exists, so a dense weight is freed layer by layer.
    info = {
        name: dict(aliases=aliases[id(m)], training=m.training,
                   base_type=m.base_type if isinstance(m, AdapterLayer) else type(m).__name__,
                   shape=(bases[name].out_features, bases[name].in_features),
                   before=bases[name].base_weight_bytes() if isinstance(bases[name], AdapterLayer)
                   else weight_bytes_of(bases[name]))
        for name, m in originals.items()
    }
    del originals
    base = None  # the check loop's last base
    report = ApplyReport(method)
    counted: set[int] = set()  # a shared parameter (PiCa's M) counts once, in its first layer

    def place(name: str, layer: AdapterLayer) -> None:
        row = info[name]
        layer.layer_name, layer.base_type = name, row["base_type"]
        layer.train(row["training"])  # a new module starts in training mode: keep the model's (dropout)
        for alias in row["aliases"]:  # a tied module: one adapter under every name
            tree.replace_module(model, alias, layer)
        bases.pop(name)
        if freeze_base:  # the layers adapted now (CERSA under PiCa) become this method's frozen base
            for p in layer.parameters():
                if id(p) in reused:
                    p.requires_grad_(False)
        new_trainable = [p for p in layer.parameters() if p.requires_grad and id(p) not in counted]
        counted.update(id(p) for p in new_trainable)
        report.rows.append(dict(
            name=name, shape=row["shape"], rank=layer.rank, energy_rank=getattr(layer, "energy_rank", layer.rank),
            trainable=sum(p.numel() for p in new_trainable),
            bytes_before=row["before"], bytes_after=layer.base_weight_bytes(),
        ))

    try:
        with placing_as_built(place):
            new_layers = cls.adapt(bases, **options)
    except BaseException as error:
        if report.rows:  # error.__notes__, not add_note: Python 3.10 has no add_note
            error.__notes__ = [*getattr(error, "__notes__", []),
                               f"apply(method={method!r}): layers {[r['name'] for r in report.rows]} were converted "
                               "before the error and stay in place (each original layer is dropped as soon as its "
                               "replacement exists)"]
        if isinstance(error, ValueError) and not str(error).startswith("apply"):
            # every error names the layer (a method's own adapt names it its way)
            named = ValueError(f"apply(method={method!r}): {error}")
            named.__notes__ = list(getattr(error, "__notes__", []))
            raise named.with_traceback(error.__traceback__) from None
        raise
    for name in [n for n in new_layers if n in bases]:  # an adapt that builds without `built` (a user method)
        place(name, new_layers[name])
    if freeze_base:  # the new layers keep the requires_grad their method set
        own = {id(p) for layer in new_layers.values() for p in layer.parameters()} - reused
        for p in model.parameters():
            if id(p) not in earlier and id(p) not in own:
                p.requires_grad_(False)
    for name in saved:  # trained whole, after freeze_base froze everything else
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    state = _model_state(model)
    state["configs"].append(config)
    state["modules_to_save"] = list(dict.fromkeys(state["modules_to_save"] + saved))
    state["task"] = config.task or state["task"]
    _warn_frozen_head(model, state["modules_to_save"])
    report.set_totals(model, counted)
    return report


def _check_untied(model: nn.Module, saved: list[str]) -> None:
    """A module trained whole must own its parameters: one tied to a module outside it (GPT-2's
    lm_head is the input embedding) would train that module too, and PEFT, which trains a copy,
    would restore another model from the export."""
    for name in saved:
        inside = {id(p) for p in model.get_submodule(name).parameters()}
        outside = [f"{m}.{k}" if m else k for m, module in model.named_modules(remove_duplicate=False)
                   if m != name and not m.startswith(name + ".")
                   for k, p in module.named_parameters(recurse=False) if id(p) in inside]
        if outside:
            raise ValueError(
                f"apply: modules_to_save entry {name!r} shares its parameters with {outside[:3]} (tied weights); "
                "a module trained whole must own its parameters (untie them first, or adapt it instead)"
            )


def _warn_frozen_head(model: nn.Module, saved: list[str]) -> None:
    """A task head left frozen and unadapted keeps its random init: warn, naming the fix."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in tree.head_modules(model):
        head = model.get_submodule(name)
        if name in saved or any(m is output for m in head.modules()):
            continue  # trained whole, or a language-model head (the pretrained output embedding)
        if not any(p.requires_grad for p in head.parameters()) and not adapter_layers(head):
            warnings.warn(
                f"apply: the task head {name!r} of {type(model).__name__} is frozen and not adapted, so it keeps "
                f"the weights it was built with; train it with modules_to_save=[{name!r}] or task='seq_cls' "
                "(as PEFT's task_type does)", stacklevel=3,
            )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside the wrappers that add a prefix to every name: `torch.compile`'s
    OptimizedModule (`_orig_mod`), DistributedDataParallel and FSDP1's FullyShardedDataParallel
    (`module`), nested in any order; else `model`. (FSDP2's `fully_shard` keeps the module and its
    names.) save, load and export name layers as the original model does, so a checkpoint of a
    wrapped model loads into a plain one."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and (
            isinstance(model, DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel"
        ):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextlib.contextmanager
def _gathered(model: nn.Module):
    """Every FSDP2 (`fully_shard`) module of `model` unsharded for the duration (its parameters are
    plain tensors then, as PARA's QR and SVD need), resharded after; nothing for another model."""
    sharded = [m for m in model.modules() if FSDPModule and isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()


def trainable_parameters(model: nn.Module, weight_decay: Optional[float] = None) -> list:
    """The parameters that require grad, each once (shared ones included once).

    With `weight_decay`: optimizer parameter groups instead, `[{"params": [...], "weight_decay":
    weight_decay}, {"params": [...], "weight_decay": 0.0}]`: no decay on biases and other 1-D
    parameters (norms), nor on what a layer lists in NO_WEIGHT_DECAY (CERSA's S: decay would pull S
    towards 0, not towards its initial Σ_k; docs/methods.md §1). Empty groups are left out."""
    seen, out, no_decay = set(), [], set()
    for module in _unwrapped(model).modules():
        skip = getattr(module, "NO_WEIGHT_DECAY", ()) if isinstance(module, AdapterLayer) else ()
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
                if p.dim() < 2 or name in skip:
                    no_decay.add(id(p))
    if weight_decay is None:
        return out
    groups = [
        {"params": [p for p in out if id(p) not in no_decay], "weight_decay": float(weight_decay)},
        {"params": [p for p in out if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters) of `model`, each shared parameter once."""
    unique = {id(p): p for p in _unwrapped(model).parameters()}
    return sum(p.numel() for p in unique.values() if p.requires_grad), sum(p.numel() for p in unique.values())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: `trainable params: X || all params: Y || trainable%: Z` (what requires
    grad, against every parameter, frozen operands included; CERSA's are fewer than the original model's: W0 is gone)."""
    print(_peft_line(*parameter_counts(model)))


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by the plain nn.Linear it equals (`layer.to_linear()`), in place
    (a tied adapter by one Linear under all its names). modules_to_save stay as they are, trained.
    Returns `model` (a wrapper such as DDP or torch.compile's is merged inside and returned)."""
    given, model = model, _unwrapped(model)
    if FSDPModule and any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            "merge: the model is sharded by FSDP2 (fully_shard), whose parameter groups would keep the replaced "
            "layers; save it (ck.save) and merge a plain copy: ck.merge(ck.load(fresh_model, directory))"
        )
    aliases = tree.module_aliases(model)
    for layer in adapter_layers(model).values():
        merged = layer.to_linear()
        for alias in aliases[id(layer)]:
            tree.replace_module(model, alias, merged)
    return given


# --- save / load --------------------------------------------------------------------------------
# The config and the weights name each other (see _adapter_files): the config stores the sha256 of
# the safetensors bytes, the safetensors metadata the id of the config, so a mixed pair is refused.
FORMAT = "cersa_kernels"
FORMAT_VERSION = 2  # 2: fingerprints, layer aliases; version 1 files carry no fingerprint
_FINGERPRINT_KEYS = ("config_id", "weights_sha256")


def save(model: nn.Module, directory: Union[str, Path]) -> None:
    """Write the adapter layers (and any other trainable parameter) of `model` to `directory`:
    `cersa_adapter.safetensors` and `cersa_config.json` (class, method, config and names of each
    layer). Frozen base weights that the original model already holds (a layer's BASE_KEYS) are not
    written; CERSA's U, S, V are, since its W0 is gone. Both files are committed in one atomic step
    (`_adapter_files.write_files_atomically`): a failure or a kill at any point leaves an earlier
    adapter in `directory` intact. A `torch.compile`d model is saved under its original names."""
    model = _unwrapped(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "save: the model has no adapter layer (call apply first); a model whose own parameters "
            "train is saved with torch.save or save_pretrained, not as an adapter"
        )
    aliases = tree.module_aliases(model)
    tensors, config = {}, {"format": FORMAT, "version": FORMAT_VERSION, "layers": {}, "trainable": []}
    for name, layer in layers.items():
        base_keys = set(layer.BASE_KEYS)
        trained = {k for k, p in layer.named_parameters() if p.requires_grad}
        for key, t in layer.state_dict().items():
            if key not in base_keys or key in trained:
                tensors[f"{name}.{key}"] = _full_tensor(t).detach().contiguous().cpu()
        config["layers"][name] = dict(
            cls=type(layer).__name__, method=layer.method, config=layer.config(), base_type=layer.base_type,
            trainable=[k for k, p in layer.named_parameters() if p.requires_grad],
            aliases=aliases[id(layer)],
            bias=layer.bias is not None,  # LoRA's, PiCa's and SNELL's configs do not say: load compares it
        )
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    state = _model_state(model)
    whole = {id(p) for name in state["modules_to_save"] for p in model.get_submodule(name).parameters()}
    for pname, p in model.named_parameters():
        if (p.requires_grad or id(p) in whole) and id(p) not in inside:
            tensors[pname] = _full_tensor(p).detach().contiguous().cpu()
            config["trainable"].append(pname)
    config.update(state_record(model))
    write_adapter(directory, config, tensors)


def state_record(model: nn.Module) -> dict:
    """What apply recorded on `model`, as a saved config holds it: modules_to_save, task and the
    AdapterConfigs apply was given (JSON-able: a value JSON cannot hold is written as its str)."""
    state = _model_state(model)
    return dict(modules_to_save=list(state["modules_to_save"]), task=state["task"],
                adapter_configs=[json.loads(json.dumps(c.to_dict(), default=str)) for c in state["configs"]])


def read_state_record(model: nn.Module, config: dict, here: str) -> dict:
    """The state `state_record` wrote into `config`, checked against `model` (every modules_to_save
    entry a module of it, every AdapterConfig readable); `restore` it once the load succeeded."""
    saved = config.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"{here}: 'modules_to_save' must be a list of module names, got {saved!r}")
    for name in saved:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{here}: modules_to_save names {name!r}, which is not a module of the model") from None
    try:
        configs = [AdapterConfig.from_dict(c) for c in config.get("adapter_configs", [])]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{here}: 'adapter_configs' is not a list of AdapterConfig dicts ({e})") from None
    return dict(configs=configs, modules_to_save=list(saved), task=config.get("task"))


def restore_state(model: nn.Module, record: dict) -> None:
    """Put a `read_state_record` result on `model`, as apply would have left it."""
    _model_state(model).update(record)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) parameter, gathered; any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def write_adapter(directory: Union[str, Path], config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `config` (its fingerprint keys, if any, are recomputed) and `tensors` to `directory` as
    one fingerprinted pair, atomically. Everything is serialised before the first byte is written."""
    body = {k: v for k, v in config.items() if k not in _FINGERPRINT_KEYS}
    body_id = config_id(body)
    weights = serialize_tensors(
        _dedupe_shared(tensors), {FORMAT_KEY: FORMAT, VERSION_KEY: str(FORMAT_VERSION), CONFIG_ID_KEY: body_id}
    )
    text = json.dumps(dict(body, config_id=body_id, weights_sha256=sha256(weights)), indent=2)
    write_files_atomically(Path(directory), {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()})


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each key its own copy."""
    seen, out = set(), {}
    for key, t in tensors.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors `save` wrote to `directory`, checked to be one pair of a known format."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.exists() and (directory / "adapter_config.json").is_file():
        raise ValueError(
            f"load: {directory} is a PEFT adapter directory (adapter_config.json, no {CONFIG_NAME}); load it with "
            f"cersa_kernels.from_peft(model, {str(directory)!r})"
        )
    config = read_json_object(config_path, "load")
    if config.get("format") != FORMAT:
        raise ValueError(f"load: {config_path} is not a cersa_kernels adapter config (format={config.get('format')!r})")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"load: {config_path} has format version {config.get('version')!r}; this cersa_kernels reads version "
            f"{FORMAT_VERSION} (version 1 carried no fingerprint pairing it with its weights)"
        )
    if not isinstance(config.get("layers"), dict):
        raise ValueError(f"load: {config_path} has no 'layers' object (the adapter layers saved by `save`)")
    trainable = config.get("trainable", [])
    if not isinstance(trainable, list) or not all(isinstance(name, str) for name in trainable):
        raise ValueError(f"load: {config_path}: 'trainable' must be a list of parameter names")
    tensors, metadata, weights_sha = read_safetensors(weights_path, "load")
    body = {k: v for k, v in config.items() if k not in _FINGERPRINT_KEYS}
    if config.get("weights_sha256") != weights_sha or CONFIG_ID_KEY not in metadata:
        raise ValueError(
            f"load: {weights_path} and {config_path} do not belong together: the weights' fingerprint "
            f"{weights_sha[:12]}… is not the one the config names ({str(config.get('weights_sha256'))[:12]}…); "
            "one file was replaced or left from another save; save the adapter again"
        )
    check_pair(body, config_path, metadata, weights_path, "load")
    return config, tensors


def saved_layer_target(model: nn.Module, name: str, entry: dict, here: str, error: type = ValueError):
    """(the adapter class a saved layer entry names, the plain Linear/Conv1D at `name` it was saved
    over), checked: a class we know, a module the model has, of the saved type, not adapted yet.
    `here` starts every message; `error` is the exception raised (load: ValueError)."""
    classes = adapter_classes()
    cls = classes.get(entry.get("cls"))
    if cls is None:
        raise error(f"{here}: unknown layer class {entry.get('cls')!r}; expected one of {sorted(classes)}")
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise error(f"{here} is not in the model") from None
    base_type = entry.get("base_type", "Linear")
    if isinstance(target, AdapterLayer):
        raise error(f"{here}: the model is already adapted there (a {type(target).__name__}); load into a fresh model")
    if type(target).__name__ != base_type or not (isinstance(target, nn.Linear) or tree.is_conv1d(target)):
        raise error(f"{here} was saved over a {base_type}, the model's module there is a {type(target).__name__}")
    return cls, target


def _build_layer(model, name, entry, tensors, config_path, weights_path, aliases, tied) -> nn.Module:
    """The adapter layer `entry` describes, rebuilt around the module at `name` and filled from
    `tensors`, after checking every saved type, shape and name against that module. Touches nothing
    in `model`."""
    here = f"load: {config_path}: layer {name!r}"
    if not isinstance(entry, dict) or not {"cls", "method", "config", "trainable"} <= set(entry):
        raise ValueError(f"{here}: the entry must hold 'cls', 'method', 'config' and 'trainable'")
    cls, target = saved_layer_target(model, name, entry, here)
    base_type = entry.get("base_type", "Linear")
    saved_names, names = entry.get("aliases", [name]), aliases[id(target)]
    if saved_names != names:
        raise ValueError(f"{here} was saved reachable as {saved_names}; in the model that module is reachable as {names}")
    trainable = entry["trainable"]
    if not isinstance(trainable, list) or not all(isinstance(k, str) for k in trainable):
        raise ValueError(f"{here}: 'trainable' must be a list of parameter names, got {trainable!r}")
    saved_bias = entry.get("bias")  # absent in files written before it was recorded
    if saved_bias is not None and not isinstance(saved_bias, bool):
        raise ValueError(f"{here}: 'bias' must be true or false, got {saved_bias!r}")
    base = tree.as_linear(target)
    try:
        layer = cls.from_config(entry["config"], base=base, device=base.weight.device)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{here} ({entry['cls']}): cannot rebuild it from its saved config: {e!r}") from None
    # What the layer was saved over, against the model's module: the rebuilt layer speaks for the
    # shapes and the dtype (CERSA's come from its config, the others' from the model's Linear),
    # the entry's `bias` for the bias (a LoRA, PiCa or SNELL layer takes the model's bias as it is)
    rebuilt = dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None,
                   dtype=_dtype_name(layer.weight_dtype()))
    expected = dict(in_features=base.in_features, out_features=base.out_features, bias=base.bias is not None,
                    dtype=_dtype_name(weight_dtype_of(base)))  # a Linear4bit's stands for its original dtype
    for got in (dict(rebuilt, bias=rebuilt["bias"] if saved_bias is None else saved_bias), rebuilt):
        if got != expected:
            raise ValueError(
                f"{here} ({entry['cls']}) was saved for {', '.join(f'{k}={v}' for k, v in got.items())}; the model's "
                f"{base_type} there has {', '.join(f'{k}={v}' for k, v in expected.items())}"
            )
    parameters = dict(layer.named_parameters())
    if set(trainable) - set(parameters):
        raise ValueError(f"{here}: trainable names {sorted(set(trainable) - set(parameters))} are not parameters of {entry['cls']}")
    prefix = name + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    wanted = layer.state_dict()
    # Exactly what `save` writes: every tensor but the frozen base ones the model already holds,
    # and those only when trained. Anything else in the file (a hand-edited W0, say) is refused,
    # never copied over the model's own weights.
    declared = {k for k in wanted if k not in cls.BASE_KEYS or k in trainable}
    missing, unexpected = sorted(declared - set(state)), sorted(set(state) - declared)
    if missing or unexpected:
        frozen = [k for k in unexpected if k in wanted]
        found = ([f"lacks tensors {missing} that its entry declares"] if missing else []) + (
            [f"holds tensors {unexpected} that its entry does not declare"] if unexpected else [])
        why = (f" ({frozen}: the model's own frozen base tensors, saved only when trained, i.e. listed in the "
               "layer's 'trainable'; load never overwrites them otherwise)") if frozen else ""
        raise ValueError(f"{here} ({entry['cls']}): {weights_path} {' and '.join(found)}{why}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(wanted[key].shape):
            raise ValueError(
                f"{here} ({entry['cls']}): tensor {key!r} has shape {tuple(value.shape)} in {weights_path}, "
                f"the model needs {tuple(wanted[key].shape)}{layer.state_hint(key)}"
            )
        if value.dtype != wanted[key].dtype:  # load_state_dict would cast it silently (quantized codes too)
            raise ValueError(
                f"{here} ({entry['cls']}): tensor {key!r} is {_dtype_name(value.dtype)} in {weights_path}, the layer "
                f"rebuilt over the model's {_dtype_name(weight_dtype_of(base))} {base_type} needs "
                f"{_dtype_name(wanted[key].dtype)}{layer.state_hint(key)}"
            )
    layer.load_state_dict(state, strict=False)
    layer.layer_name, layer.base_type = name, base_type
    for key, p in parameters.items():
        p.requires_grad_(key in trainable)
    for attr, tie in entry["config"].get("tied", {}).items():
        shared = tied.setdefault(tie, getattr(layer, attr))
        if shared.shape != getattr(layer, attr).shape:
            raise ValueError(f"{here}: {attr} is tied to {tie!r} of shape {tuple(shared.shape)}, its own is {tuple(getattr(layer, attr).shape)}")
        setattr(layer, attr, shared)
    return layer


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _fill_plan(model, config, tensors, config_path, weights_path, aliases):
    """`load` into a model adapted already: every saved layer must be there, of the saved class,
    config and names, and every adapter layer of the model must be saved; returns the (model tensor,
    saved value) pairs to copy and the requires_grad of each layer parameter. Touches nothing."""
    layers, saved = adapter_layers(model), config["layers"]
    if set(layers) != set(saved):
        raise ValueError(
            f"load: {config_path}: the model is adapted at {sorted(layers)[:6]}, the adapter was saved at "
            f"{sorted(saved)[:6]}; load into a fresh copy of the original model, or one adapted with the saved config"
        )
    fills, grads = [], []
    for name, entry in saved.items():
        layer, here = layers[name], f"load: {config_path}: layer {name!r}"
        if not isinstance(entry, dict) or not {"cls", "config", "trainable"} <= set(entry):
            raise ValueError(f"{here}: the entry must hold 'cls', 'method', 'config' and 'trainable'")
        if type(layer).__name__ != entry["cls"] or _canonical(layer.config()) != _canonical(entry["config"]):
            raise ValueError(
                f"{here} was saved as a {entry['cls']} with config {entry['config']}; the model's layer there is a "
                f"{type(layer).__name__} with config {layer.config()}: load into a fresh copy of the original model"
            )
        if entry.get("aliases", [name]) != aliases[id(layer)]:
            raise ValueError(f"{here} was saved reachable as {entry.get('aliases')}; in the model it is reachable as {aliases[id(layer)]}")
        parameters, wanted = dict(layer.named_parameters()), layer.state_dict()
        trainable = entry["trainable"]
        if not isinstance(trainable, list) or set(trainable) - set(parameters):
            raise ValueError(f"{here}: 'trainable' {trainable!r} must name parameters of {entry['cls']}")
        declared = {k for k in wanted if k not in layer.BASE_KEYS or k in trainable}
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if set(state) != declared:
            raise ValueError(
                f"{here} ({entry['cls']}): {weights_path} holds tensors {sorted(state)}, the layer declares {sorted(declared)}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(wanted[key].shape) or value.dtype != wanted[key].dtype:
                raise ValueError(
                    f"{here} ({entry['cls']}): tensor {key!r} is {_dtype_name(value.dtype)} of shape {tuple(value.shape)} "
                    f"in {weights_path}, the model's is {_dtype_name(wanted[key].dtype)} of shape {tuple(wanted[key].shape)}"
                )
            fills.append((wanted[key], value))  # state_dict's tensors share the layer's storage
        grads.extend((p, key in trainable) for key, p in parameters.items())
    return fills, grads


def load(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Rebuild in `model` (a fresh copy of the original architecture and base weights) the adapter
    layers saved by `save`, load their weights, and set requires_grad as they were saved. A model
    adapted already the same way (`apply` with the saved AdapterConfig) gets the saved tensors
    copied into its layers instead. Parameters
    a layer's config marks as tied (PiCa's per-role M) become one shared Parameter again, a tied
    module (`m.l2 = m.l1`) one adapter under all its names.

    All or nothing: the pair of files, every layer's type, shapes, bias, dtype and names, the
    tensors (exactly those the config declares, every value finite) are checked against `model`
    before anything is replaced; on any error (one line, naming the file and the layer or tensor)
    `model` is left exactly as it was. Nothing is cast: an adapter in another dtype is refused.

    Load before wrapping the model for training (DDP, FSDP): a DDP wrapper is seen through, with a
    warning (it syncs the gradients of the parameters it was built over, not of the new layers'),
    a model sharded by FSDP2 is refused."""
    given, model = model, _unwrapped(model)
    if FSDPModule and any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("load: the model is sharded by FSDP2 (fully_shard); load into the plain model, then shard it")
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config, tensors = _read_adapter(directory)
    aliases = tree.module_aliases(model)
    tied: dict[str, nn.Parameter] = {}
    fills: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a tensor of the model's own layer, its saved value)
    layer_grads: list[tuple[nn.Parameter, bool]] = []
    if adapter_layers(model):  # adapted already (e.g. apply(model, config)): fill its layers in place
        built = {}
        fills, layer_grads = _fill_plan(model, config, tensors, config_path, weights_path, aliases)
    else:
        built = {
            name: _build_layer(model, name, entry, tensors, config_path, weights_path, aliases, tied)
            for name, entry in config["layers"].items()
        }
    parameters = dict(model.named_parameters())
    claimed = {k for k in tensors for name in config["layers"] if k.startswith(name + ".")}
    # the top-level list names parameters outside the adapter layers (a head): a layer's own tensors
    # are what its entry declares, and a name inside one (its frozen W0) is never copied over
    layer_names = {alias: name for name in config["layers"] for alias in aliases[id(model.get_submodule(name))]}
    for pname in config.get("trainable", []):
        owner = next((layer_names[a] for a in layer_names if pname.startswith(a + ".")), None)
        if owner is not None:
            raise ValueError(
                f"load: {config_path}: trainable parameter {pname!r} is inside the saved layer {owner!r}; only that "
                "layer's entry declares its tensors"
            )
        if pname not in parameters or pname not in tensors:
            raise ValueError(f"load: {config_path}: trainable parameter {pname!r} is not in the model or not in {weights_path}")
        if tuple(tensors[pname].shape) != tuple(parameters[pname].shape) or tensors[pname].dtype != parameters[pname].dtype:
            raise ValueError(
                f"load: {config_path}: parameter {pname!r} is {_dtype_name(tensors[pname].dtype)} of shape "
                f"{tuple(tensors[pname].shape)} in {weights_path}, the model's is {_dtype_name(parameters[pname].dtype)} "
                f"of shape {tuple(parameters[pname].shape)}"
            )
        claimed.add(pname)
    if set(tensors) - claimed:
        raise ValueError(f"load: {weights_path} holds tensors no saved layer claims: {sorted(set(tensors) - claimed)[:8]}")
    record = read_state_record(model, config, f"load: {config_path}")

    # Everything is checked; put it in place, and undo it all if anything still fails.
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    replaced: list[tuple[str, nn.Module]] = []
    copied: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for p, _ in requires_grad:
            p.requires_grad_(False)
        for name, layer in built.items():
            for alias in aliases[id(model.get_submodule(name))]:
                replaced.append((alias, model.get_submodule(alias)))
                tree.replace_module(model, alias, layer)
        for p, flag in layer_grads:
            p.requires_grad_(flag)
        with torch.no_grad():
            for target, value in fills:
                copied.append((target, target.detach().clone()))
                target.copy_(value)
            for pname in config.get("trainable", []):
                p = parameters[pname]
                copied.append((p, p.detach().clone()))
                p.copy_(tensors[pname])
                p.requires_grad_(True)
    except BaseException:
        for alias, old in reversed(replaced):
            tree.replace_module(model, alias, old)
        with torch.no_grad():
            for p, old in copied:
                p.copy_(old)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    restore_state(model, record)
    if _has_ddp(given):
        warnings.warn("load: the model is wrapped in DistributedDataParallel, which syncs the gradients of the "
                      "parameters it was built over: wrap the loaded model again before training it", stacklevel=2)
    return given


def _has_ddp(model: nn.Module) -> bool:
    while model is not None and not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        model = inner if isinstance(inner, nn.Module) else None
    return model is not None


# --- export --------------------------------------------------------------------------------------

def export_peft_lora(
    model: nn.Module,
    directory: Union[str, Path],
    energy: Optional[float] = 1.0,
    budget: Optional[int] = None,
    base_model_name_or_path: Optional[str] = None,
):
    """Write the CERSA, PiCa and LoRA updates of `model` as one PEFT LoRA adapter over the original
    weights (`adapter_config.json` + `adapter_model.safetensors`, per-module `rank_pattern` /
    `alpha_pattern`), loadable with `peft.PeftModel.from_pretrained(original_model, directory)`.

    Ranks come from PARA over all the updates: `energy=1.0` (default) keeps every non-zero singular
    value (exact, at each update's true rank: a σ at the rounding floor is zero, so after
    `para.compress` each layer keeps the rank PARA gave it); a lower `energy` or a `budget` (adapter
    parameters) prunes with one global threshold. modules_to_save are written in PEFT's
    modules_to_save format, with the task's PEFT task_type. Returns the PARA result (per-layer
    ranks; `params_after` is the number of LoRA parameters written, modules_to_save not counted)."""
    model = _unwrapped(model)
    with _gathered(model):
        return _export_peft_lora(model, directory, energy, budget, base_model_name_or_path)


def _export_peft_lora(model, directory, energy, budget, base_model_name_or_path):
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft_lora: the model has no adapter layer (call apply first)")
    factors = {name: layer.lowrank_update() for name, layer in layers.items()}
    for name, update in factors.items():
        if update is None:
            raise ValueError(
                f"export_peft_lora: layer {name} is a {type(layers[name]).__name__}, whose update is not low-rank "
                "(SNELL's is sparse); merge() it instead"
            )
    base_types = {layer.base_type for layer in layers.values()}
    if len({t == "Conv1D" for t in base_types}) > 1:  # Linear and bitsandbytes Linear4bit share a layout
        raise ValueError(f"export_peft_lora: PEFT needs one fan_in_fan_out for all modules; the targets mix {sorted(base_types)}")
    result = compress(factors, energy=energy, budget=budget)
    if not any(f is not None for f in result.adapters.values()):
        raise ValueError("export_peft_lora: every update is zero (or pruned): nothing to export")
    kept_ranks = [f.A.shape[0] for f in result.adapters.values() if f is not None]
    state = _model_state(model)
    # modules_to_save as PEFT writes them: the module's own state-dict keys under base_model.model.
    heads = {f"base_model.model.{name}.{key}": _full_tensor(t).detach().contiguous().cpu()
             for name in state["modules_to_save"] for key, t in model.get_submodule(name).state_dict().items()}
    config = {
        "peft_type": "LORA", "task_type": TASKS[state["task"]][0] if state["task"] else None,
        "modules_to_save": list(state["modules_to_save"]) or None, "r": max(kept_ranks), "lora_alpha": max(kept_ranks),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": base_types == {"Conv1D"},
        "use_rslora": False, "use_dora": False, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    write_lora_adapter(directory, result.adapters, config, {name: "base_model.model." for name in factors},
                       extra_tensors=heads)
    return result
