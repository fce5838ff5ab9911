"""Whole-model API: apply an adapter method to the Linear layers of any model, merge it back,
save and load the adapted layers.

    report = cersa_kernels.apply(model, method="cersa", target_modules="all-linear", energy=0.95)
    cersa_kernels.save(model, "out/")             # safetensors + JSON config
    cersa_kernels.load(fresh_model, "out/")       # rebuilds the layers, loads the weights
    cersa_kernels.merge(model)                    # adapters -> plain nn.Linear

Target selection follows PEFT: a list of names matches module-name suffixes (`"query"` matches
`encoder.layer.0.attention.self.query`), a string is a regular expression matched against the
full name, and `"all-linear"` takes every Linear (and Hugging Face Conv1D) except the model's
output embedding (`lm_head`). A list or regex that names a module no method adapts (Embedding,
LayerNorm, a container) raises, as in PEFT; a tied module (`m.l2 = m.l1`) gets one adapter under
all its names. `save` writes both files atomically, each carrying a fingerprint of the other; `load`
checks the pair and every layer against the model before it replaces anything.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "named_linears", "replace_module", "find_targets", "as_linear", "apply", "merge", "trainable_parameters",
    "save", "load", "ApplyReport", "adapter_layers", "export_peft_lora", "module_aliases", "write_adapter",
]

TargetSpec = Union[str, Sequence[str], None]
CONFIG_NAME = "cersa_config.json"
WEIGHTS_NAME = "cersa_adapter.safetensors"


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
    """`module` itself if it is an nn.Linear; an equivalent nn.Linear (weight transposed, shared
    bias values) for an HF Conv1D."""
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        w = module.weight
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear
    raise TypeError(f"expected an nn.Linear or Conv1D, got {type(module).__name__}")


def _matches(name: str, spec: TargetSpec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every qualified name it is reachable at, in module order}. A tied module
    (`m.l2 = m.l1`) has several names; the first is the one `named_modules()` gives."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _adapter_types() -> tuple[type, ...]:
    return tuple(layer_classes().values())


def _unsupported_reason(
    module: nn.Module, adapters: tuple[type, ...], inside_mha: set[int], inside_adapter: dict[int, str]
) -> Optional[str]:
    """Why no method can adapt `module` (None when it is a Linear, Conv1D or adapter layer)."""
    if id(module) in inside_adapter:
        return f"a part of the adapter layer {inside_adapter[id(module)]!r}"
    if id(module) in inside_mha:
        return f"a {type(module).__name__} inside a MultiheadAttention, which reads its weight directly (a replaced layer would be bypassed)"
    if isinstance(module, (nn.Linear,) + adapters) or is_conv1d(module):
        return None
    return f"a {type(module).__name__}, not a Linear or Conv1D layer"


def find_targets(model: nn.Module, target_modules: TargetSpec = "all-linear", exclude_modules: TargetSpec = None) -> list[str]:
    """Names of the layers selected by the PEFT-style specs (see module docstring), one per module:
    a module tied under several names (`m.l2 = m.l1`) is selected by any of them, excluded by any
    of them, and listed under its first name. "all-linear" takes every Linear/Conv1D (not lm_head,
    not MultiheadAttention's out_proj) and every adapter layer, and skips everything else. A list or
    a regex that names any other module (Embedding, LayerNorm, a container, a part of an adapter
    layer) raises ValueError naming it, as PEFT does."""
    adapters = _adapter_types()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    aliases = module_aliases(model)
    inside_mha = _inside_mha(model)
    inside_adapter = {
        id(inner): name for name, module in model.named_modules() if isinstance(module, adapters)
        for inner in module.modules() if inner is not module
    }
    names = []
    for name, module in model.named_modules():  # each module once, under its first name
        if not name or any(_matches(alias, exclude_modules) for alias in aliases[id(module)]):
            continue
        reason = _unsupported_reason(module, adapters, inside_mha, inside_adapter)
        if target_modules == "all-linear":
            if reason is None and module is not output:
                names.append(name)
            continue
        matched = [alias for alias in aliases[id(module)] if _matches(alias, target_modules)]
        if matched and reason is not None:
            raise ValueError(
                f"apply: target_modules={target_modules!r} names {matched[0]!r}, which is {reason}; "
                "name Linear layers only (or leave it out with exclude_modules)"
            )
        if matched:
            names.append(name)
    if not names:
        raise ValueError(
            f"apply: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) selects no Linear "
            f"layer; the model's Linear layers are: {[n for n, _ in named_linears(model)][:20]}"
        )
    return names


def _check_method_supports(method: str, name: str, module: nn.Module) -> None:
    """An adapter layer can only be adapted again by PiCa, and only a CersaLinear (PiCa over CERSA)."""
    from .nn import CersaLinear, PicaLinear

    if not isinstance(module, _adapter_types()) or (method == "pica" and type(module) is CersaLinear):
        return
    why = (
        "PiCa over PiCa is not supported" if method == "pica" and isinstance(module, PicaLinear)
        else "only method='pica' adapts a layer that is already adapted, and only a CersaLinear"
    )
    raise ValueError(
        f"apply(method={method!r}): layer {name!r} is already a {type(module).__name__}: {why}; "
        "merge() the model first, or leave the layer out with exclude_modules"
    )


# --- methods ------------------------------------------------------------------------------------
# Each method turns the selected layers into adapter layers. A method is a function
# (model, {name: nn.Linear}, **options) -> {name: new module}; `apply` puts them in place.

@dataclass
class ApplyReport:
    """What `apply` did: one row per replaced layer, and totals."""

    method: str
    rows: list[dict] = field(default_factory=list)

    @property
    def base_bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self.rows)

    @property
    def base_bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'layer':48s} {'m×n':>11s} {'rank':>5s} {'trainable':>10s} {'weight bytes':>14s} {'dense bytes':>12s}"]
        for r in self.rows:
            m, n = r["shape"]
            lines.append(
                f"{r['name']:48s} {m:>5d}×{n:<5d} {r['rank']:>5d} {r['trainable']:>10,d} {r['bytes_after']:>14,d} {r['bytes_before']:>12,d}"
            )
        lines.append(
            f"{'total (' + str(len(self.rows)) + ' layers, ' + self.method + ')':48s} {'':11s} {'':5s} {self.trainable:>10,d} "
            f"{self.base_bytes_after:>14,d} {self.base_bytes_before:>12,d}"
        )
        return "\n".join(lines)


def _cersa_method(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    energy: float = 0.95,
    energy_power: float = 2,
    rank: Optional[int] = None,
    energy_scope: str = "layer",
    budget: Optional[int] = None,
    budget_bytes: Optional[int] = None,
    core_dtype: Optional[torch.dtype] = torch.float32,
    **layer_options,
) -> dict[str, nn.Module]:
    """CersaLinear for each layer; `layer_options` go to CersaLinear.from_linear (max_rank,
    trainable_rank, train_bias). With global allocation the ranks come from one pooled threshold."""
    from .decompose import global_ranks
    from .nn import CersaLinear

    if energy_scope not in ("layer", "global"):
        raise ValueError(f"apply(method='cersa'): energy_scope must be 'layer' or 'global', got {energy_scope!r}")
    if budget is not None and budget_bytes is not None:
        raise ValueError("apply(method='cersa'): give budget (parameters) or budget_bytes, not both")
    ranks: dict[str, Optional[int]] = {name: rank for name in linears}
    if energy_scope == "global" or budget is not None or budget_bytes is not None:
        if rank is not None:
            raise ValueError("apply(method='cersa'): rank= fixes every layer's rank; it cannot combine with global allocation")
        if budget_bytes is not None:
            itemsize = next(iter(linears.values())).weight.element_size()
            budget = budget_bytes // itemsize
        spectra = {n: torch.linalg.svdvals(l.weight.detach().float()) for n, l in linears.items()}
        shapes = {n: (l.out_features, l.in_features) for n, l in linears.items()}
        ranks = global_ranks(spectra, shapes, energy=None if budget is not None else energy, energy_power=energy_power, budget=budget)
    return {
        name: CersaLinear.from_linear(
            linear, energy=energy, energy_power=energy_power, rank=ranks[name], core_dtype=core_dtype, **layer_options
        )
        for name, linear in linears.items()
    }


def _per_layer_method(class_name: str) -> Callable[..., dict[str, nn.Module]]:
    """A method that converts each layer on its own with `<class>.from_linear(linear, **options)`."""

    def method(model: nn.Module, linears: dict[str, nn.Linear], **layer_options) -> dict[str, nn.Module]:
        cls = layer_classes()[class_name]
        return {name: cls.from_linear(linear, **layer_options) for name, linear in linears.items()}

    method.__doc__ = f"{class_name}.from_linear on every target layer."
    return method


def _pica_method(model: nn.Module, bases: dict[str, nn.Module], rank: int = 64) -> dict[str, nn.Module]:
    """PicaLinear on every target, one shared M per role (module-name suffix). A CersaLinear target
    keeps its factors and the PiCa branch reuses its h = x·V."""
    from .nn.pica import pica_layers

    return pica_layers(bases, rank)


METHODS: dict[str, Callable[..., dict[str, nn.Module]]] = {
    "cersa": _cersa_method,
    "lora": _per_layer_method("LoraLinear"),
    "pica": _pica_method,
    "snell": _per_layer_method("SnellLinear"),
}


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} for every adapter layer `apply` put into `model`."""
    return {name: m for name, m in model.named_modules() if getattr(m, "_cersa_adapter", False)}


def apply(
    model: nn.Module,
    method: str = "cersa",
    target_modules: TargetSpec = "all-linear",
    exclude_modules: TargetSpec = None,
    freeze_base: bool = True,
    **options,
) -> ApplyReport:
    """Replace the selected Linear/Conv1D layers of `model` in place by `method`'s adapter layers.

    method: "cersa" (options: energy, energy_power, rank, max_rank, trainable_rank, train_bias,
    energy_scope="layer"|"global", budget (parameters), budget_bytes, core_dtype=torch.float32);
    "lora" (rank, alpha, dropout); "pica" (rank; one M shared per role; targets may be CersaLinear
    layers of an earlier apply, whose h = x·V the branch reuses); "snell" (rank, heads, sparsity,
    coeffs, train_bias). With freeze_base, every parameter that is not an adapter
    parameter stops requiring grad (as PEFT does). Returns an ApplyReport.
    """
    if method not in METHODS:
        raise ValueError(f"apply: method must be one of {sorted(METHODS)}, got {method!r}")
    from .nn import CersaLinear

    names = find_targets(model, target_modules, exclude_modules)
    originals = {name: model.get_submodule(name) for name in names}
    for name, module in originals.items():
        _check_method_supports(method, name, module)
    aliases = module_aliases(model)
    # CersaLinear targets (PiCa over CERSA) are passed as they are; the rest as nn.Linear
    linears = {name: m if isinstance(m, CersaLinear) else as_linear(m) for name, m in originals.items()}
    new_layers = METHODS[method](model, linears, **options)
    if freeze_base:  # before the new layers go in: they keep the requires_grad their method set
        for p in model.parameters():
            p.requires_grad_(False)
    report = ApplyReport(method)
    counted: set[int] = set()  # a shared parameter (PiCa's M) counts once, in its first layer
    for name, layer in new_layers.items():
        for inner in layer.modules():  # an adapter wrapped by the new one (CERSA under PiCa) is part of it now
            if getattr(inner, "_cersa_adapter", False):
                inner._cersa_adapter = False
        layer.layer_name = name
        layer._cersa_adapter = True
        layer._cersa_method = method
        layer._cersa_base_type = getattr(originals[name], "_cersa_base_type", type(originals[name]).__name__)
        for alias in aliases[id(originals[name])]:  # a tied module: one adapter under every name
            replace_module(model, alias, layer)
        base = linears[name]
        new_trainable = [p for p in layer.parameters() if p.requires_grad and id(p) not in counted]
        counted.update(id(p) for p in new_trainable)
        report.rows.append(
            dict(
                name=name, shape=(base.out_features, base.in_features), rank=_layer_rank(layer),
                trainable=sum(p.numel() for p in new_trainable),
                bytes_before=_base_bytes(base, base), bytes_after=_base_bytes(layer, base),
            )
        )
    return report


def _layer_rank(layer: nn.Module) -> int:
    return int(getattr(layer, "rank", 0))


def _base_bytes(layer: nn.Module, base: nn.Module) -> int:
    """Bytes that stand for the frozen base weight (a CersaLinear, or PiCa over one: its factors)."""
    for candidate in (layer, getattr(layer, "base", None)):
        if hasattr(candidate, "weight_bytes"):
            return int(candidate.weight_bytes())
    return base.weight.numel() * base.weight.element_size()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once (shared ones included once)."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by the plain nn.Linear it equals (`layer.to_linear()`), in place
    (a tied adapter by one Linear under all its names)."""
    aliases = module_aliases(model)
    for layer in adapter_layers(model).values():
        merged = layer.to_linear()
        for alias in aliases[id(layer)]:
            replace_module(model, alias, merged)
    return model


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
    written; CERSA's U, S, V are, since its W0 is gone. Both files are written to temporary names
    and renamed into place, so a failure leaves an earlier adapter in `directory` intact."""
    layers = adapter_layers(model)
    aliases = module_aliases(model)
    tensors, config = {}, {"format": FORMAT, "version": FORMAT_VERSION, "layers": {}, "trainable": []}
    for name, layer in layers.items():
        base_keys = set(getattr(type(layer), "BASE_KEYS", ()))
        trained = {k for k, p in layer.named_parameters() if p.requires_grad}
        for key, t in layer.state_dict().items():
            if key not in base_keys or key in trained:
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        config["layers"][name] = dict(
            cls=type(layer).__name__, method=layer._cersa_method, config=layer.config(),
            base_type=getattr(layer, "_cersa_base_type", "Linear"),
            trainable=[k for k, p in layer.named_parameters() if p.requires_grad],
            aliases=aliases[id(layer)],
        )
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in inside:
            tensors[pname] = p.detach().contiguous().cpu()
            config["trainable"].append(pname)
    write_adapter(directory, config, tensors)


def write_adapter(directory: Union[str, Path], config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write `config` (its fingerprint keys, if any, are recomputed) and `tensors` to `directory` as
    one fingerprinted pair, atomically. Everything is serialised before the first byte is written."""
    from ._adapter_files import CONFIG_ID_KEY, FORMAT_KEY, VERSION_KEY, config_id, serialize_tensors, sha256, write_files_atomically

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


def layer_classes() -> dict[str, type]:
    """{class name: class} of every adapter layer in cersa_kernels.nn."""
    from . import nn as cersa_nn

    return {name: obj for name in cersa_nn.__all__ if isinstance(obj := getattr(cersa_nn, name), type)}


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors `save` wrote to `directory`, checked to be one pair of a known format."""
    from ._adapter_files import CONFIG_ID_KEY, check_pair, config_id, read_json_object, read_safetensors

    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
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
    if not isinstance(config.get("trainable", []), list):
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


def _has_bias(layer: nn.Module) -> bool:
    """Whether the layer adds a bias (PiCa over CERSA: its CERSA base's)."""
    if getattr(layer, "bias", None) is not None:
        return True
    return getattr(getattr(layer, "base", None), "bias", None) is not None


def _build_layer(model, name, entry, tensors, config_path, weights_path, aliases, tied) -> nn.Module:
    """The adapter layer `entry` describes, rebuilt around the module at `name` and filled from
    `tensors`, after checking every saved type, shape and name against that module. Touches nothing
    in `model`."""
    here = f"load: {config_path}: layer {name!r}"
    if not isinstance(entry, dict) or not {"cls", "method", "config", "trainable"} <= set(entry):
        raise ValueError(f"{here}: the entry must hold 'cls', 'method', 'config' and 'trainable'")
    cls = layer_classes().get(entry["cls"])
    if cls is None:
        raise ValueError(f"{here}: unknown layer class {entry['cls']!r}; expected one of {sorted(layer_classes())}")
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{here} is not in the model") from None
    base_type = entry.get("base_type", "Linear")
    if isinstance(target, _adapter_types()):
        raise ValueError(f"{here}: the model is already adapted there (a {type(target).__name__}); load into a fresh model")
    if type(target).__name__ != base_type or not (isinstance(target, nn.Linear) or is_conv1d(target)):
        raise ValueError(f"{here} was saved over a {base_type}, the model's module there is a {type(target).__name__}")
    saved_names, names = entry.get("aliases", [name]), aliases[id(target)]
    if saved_names != names:
        raise ValueError(f"{here} was saved reachable as {saved_names}; in the model that module is reachable as {names}")
    base = as_linear(target)
    try:
        layer = cls.from_config(entry["config"], base=base, device=base.weight.device)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{here} ({entry['cls']}): cannot rebuild it from its saved config: {e!r}") from None
    got = dict(in_features=layer.in_features, out_features=layer.out_features, bias=_has_bias(layer))
    expected = dict(in_features=base.in_features, out_features=base.out_features, bias=base.bias is not None)
    if got != expected:
        raise ValueError(
            f"{here} ({entry['cls']}) was saved for {', '.join(f'{k}={v}' for k, v in got.items())}; the model's "
            f"{base_type} there has {', '.join(f'{k}={v}' for k, v in expected.items())}"
        )
    prefix = name + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    wanted = layer.state_dict()
    missing = set(wanted) - set(state) - set(getattr(cls, "BASE_KEYS", ()))
    unexpected = set(state) - set(wanted)
    if missing or unexpected:
        raise ValueError(
            f"{here} ({entry['cls']}): {weights_path} lacks tensors {sorted(missing)} and has unexpected tensors {sorted(unexpected)}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(wanted[key].shape):
            raise ValueError(
                f"{here} ({entry['cls']}): tensor {key!r} has shape {tuple(value.shape)} in {weights_path}, "
                f"the model needs {tuple(wanted[key].shape)}"
            )
    layer.load_state_dict(state, strict=False)
    parameters = dict(layer.named_parameters())
    if set(entry["trainable"]) - set(parameters):
        raise ValueError(f"{here}: trainable names {sorted(set(entry['trainable']) - set(parameters))} are not parameters of {entry['cls']}")
    layer.layer_name = name
    layer._cersa_adapter = True
    layer._cersa_method = entry["method"]
    layer._cersa_base_type = base_type
    for key, p in parameters.items():
        p.requires_grad_(key in entry["trainable"])
    for attr, tie in entry["config"].get("tied", {}).items():
        shared = tied.setdefault(tie, getattr(layer, attr))
        if shared.shape != getattr(layer, attr).shape:
            raise ValueError(f"{here}: {attr} is tied to {tie!r} of shape {tuple(shared.shape)}, its own is {tuple(getattr(layer, attr).shape)}")
        setattr(layer, attr, shared)
    return layer


def load(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Rebuild in `model` (a fresh copy of the original architecture and base weights) the adapter
    layers saved by `save`, load their weights, and set requires_grad as they were saved. Parameters
    a layer's config marks as tied (PiCa's per-role M) become one shared Parameter again, a tied
    module (`m.l2 = m.l1`) one adapter under all its names.

    All or nothing: the pair of files, every layer's type, shapes and names are checked against
    `model` before anything is replaced; on any error (one line, naming the file and the layer)
    `model` is left exactly as it was."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config, tensors = _read_adapter(directory)
    present = [(n, m) for n, m in model.named_modules() if isinstance(m, _adapter_types())]
    if present:
        name, module = present[0]
        raise ValueError(
            f"load: {config_path}: the model is already adapted (layer {name!r} is a {type(module).__name__}); "
            "load into a fresh copy of the original model"
        )
    aliases = module_aliases(model)
    tied: dict[str, nn.Parameter] = {}
    built = {
        name: _build_layer(model, name, entry, tensors, config_path, weights_path, aliases, tied)
        for name, entry in config["layers"].items()
    }
    parameters = dict(model.named_parameters())
    claimed = {k for k in tensors for name in built if k.startswith(name + ".")}
    for pname in config["trainable"]:
        if pname not in parameters or pname not in tensors:
            raise ValueError(f"load: {config_path}: trainable parameter {pname!r} is not in the model or not in {weights_path}")
        if tuple(tensors[pname].shape) != tuple(parameters[pname].shape):
            raise ValueError(
                f"load: {config_path}: parameter {pname!r} has shape {tuple(tensors[pname].shape)} in {weights_path}, "
                f"the model's is {tuple(parameters[pname].shape)}"
            )
        claimed.add(pname)
    if set(tensors) - claimed:
        raise ValueError(f"load: {weights_path} holds tensors no saved layer claims: {sorted(set(tensors) - claimed)[:8]}")

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
                replace_module(model, alias, layer)
        with torch.no_grad():
            for pname in config["trainable"]:
                p = parameters[pname]
                copied.append((p, p.detach().clone()))
                p.copy_(tensors[pname])
                p.requires_grad_(True)
    except BaseException:
        for alias, old in reversed(replaced):
            replace_module(model, alias, old)
        with torch.no_grad():
            for p, old in copied:
                p.copy_(old)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
    return model


# --- export --------------------------------------------------------------------------------------

def _update_over_original(layer: nn.Module, name: str):
    """The layer's update over the ORIGINAL weight W0 as LoRA factors ΔW = scale·B·A (float32).

    LoRA: s·B·A. PiCa: M·P. CERSA: U·ΔS·Vᵀ with ΔS = S − Σ_k (METHODS §1: the exported model is
    W0 + U ΔS Vᵀ, which keeps the residual σ_{k+1..} that the CERSA layer itself discarded).
    PiCa over CERSA: (U ΔS + [M | 0])·Vᵀ."""
    from .nn import CersaLinear, LoraLinear, PicaLinear
    from .para import LoraFactors

    if isinstance(layer, LoraLinear):
        return LoraFactors(A=layer.lora_A.detach().float(), B=layer.lora_B.detach().float(), scale=layer.scaling)
    cersa = layer if isinstance(layer, CersaLinear) else getattr(layer, "base", None)
    if isinstance(cersa, CersaLinear):
        B = cersa.U.float() @ cersa.delta_core().detach().float()
        if isinstance(layer, PicaLinear):
            B[:, : layer.rank] += layer.M.detach().float()
        return LoraFactors(A=cersa.V.float().T.contiguous(), B=B, scale=1.0)
    if isinstance(layer, PicaLinear):
        return LoraFactors(A=layer.P.float(), B=layer.M.detach().float(), scale=1.0)
    raise ValueError(
        f"export_peft_lora: layer {name} is a {type(layer).__name__}, whose update is not low-rank "
        "(SNELL's is sparse); merge() it instead"
    )


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
    value (exact, at each update's true rank); a lower `energy` or a `budget` (adapter parameters)
    prunes with one global threshold. Returns the PARA result (per-layer ranks)."""
    from .para import compress
    from .para_peft import write_lora_adapter

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft_lora: the model has no adapter layer (call apply first)")
    factors = {name: _update_over_original(layer, name) for name, layer in layers.items()}
    base_types = {getattr(layer, "_cersa_base_type", "Linear") for layer in layers.values()}
    if len(base_types) > 1:
        raise ValueError(f"export_peft_lora: PEFT needs one fan_in_fan_out for all modules; the targets mix {sorted(base_types)}")
    result = compress(factors, energy=energy, budget=budget)
    if not any(f is not None for f in result.adapters.values()):
        raise ValueError("export_peft_lora: every update is zero (or pruned): nothing to export")
    kept_ranks = [f.A.shape[0] for f in result.adapters.values() if f is not None]
    config = {
        "peft_type": "LORA", "task_type": None, "r": max(kept_ranks), "lora_alpha": max(kept_ranks),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": base_types == {"Conv1D"},
        "use_rslora": False, "use_dora": False, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    write_lora_adapter(directory, result.adapters, config, {name: "base_model.model." for name in factors})
    return result
