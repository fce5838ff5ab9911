"""Whole-model API: apply an adapter method to the Linear layers of any model, merge it back,
save and load the adapted layers.

    report = cersa_kernels.apply(model, method="cersa", target_modules="all-linear", energy=0.95)
    cersa_kernels.save(model, "out/")             # safetensors + JSON config
    cersa_kernels.load(fresh_model, "out/")       # rebuilds the layers, loads the weights
    cersa_kernels.merge(model)                    # adapters -> plain nn.Linear

Target selection follows PEFT: a list of names matches module-name suffixes (`"query"` matches
`encoder.layer.0.attention.self.query`), a string is a regular expression matched against the
full name, and `"all-linear"` takes every Linear (and Hugging Face Conv1D) except the model's
output embedding (`lm_head`).
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
    "save", "load", "ApplyReport", "adapter_layers", "export_peft_lora",
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
    inside_mha = {
        id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention) for child in module.children()
    }
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and id(module) not in inside_mha:
            yield name, module


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


def find_targets(model: nn.Module, target_modules: TargetSpec = "all-linear", exclude_modules: TargetSpec = None) -> list[str]:
    """Names of the Linear/Conv1D layers selected by the PEFT-style specs (see module docstring)."""
    from .nn import CersaLinear

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = list(named_linears(model)) + [(n, m) for n, m in model.named_modules() if isinstance(m, CersaLinear)]
    names = []
    for name, module in candidates:
        if target_modules == "all-linear":
            chosen = module is not output
        else:
            chosen = _matches(name, target_modules)
        if chosen and not _matches(name, exclude_modules):
            names.append(name)
    if not names:
        raise ValueError(
            f"apply: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) selects no Linear "
            f"layer; the model's Linear layers are: {[n for n, _ in named_linears(model)][:20]}"
        )
    return names


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
    # CersaLinear targets (PiCa over CERSA) are passed as they are; the rest as nn.Linear
    linears = {name: m if isinstance(m, CersaLinear) else as_linear(m) for name, m in originals.items()}
    if method != "pica" and any(isinstance(m, CersaLinear) for m in linears.values()):
        raise ValueError(f"apply(method={method!r}): targets {[n for n, m in linears.items() if isinstance(m, CersaLinear)]} "
                         "are already CersaLinear; only method='pica' adapts a CersaLinear")
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
        replace_module(model, name, layer)
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
    """Replace every adapter layer by the plain nn.Linear it equals (`layer.to_linear()`), in place."""
    for name, layer in adapter_layers(model).items():
        replace_module(model, name, layer.to_linear())
    return model


# --- save / load --------------------------------------------------------------------------------

def save(model: nn.Module, directory: Union[str, Path]) -> None:
    """Write the adapter layers (and any other trainable parameter) of `model` to `directory`:
    `cersa_adapter.safetensors` and `cersa_config.json` (class, method and config of each layer).
    Frozen base weights that the original model already holds (a layer's BASE_KEYS) are not written;
    CERSA's U, S, V are, since its W0 is gone."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = adapter_layers(model)
    tensors, config = {}, {"format": "cersa_kernels", "version": 1, "layers": {}, "trainable": []}
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
        )
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in inside:
            tensors[pname] = p.detach().contiguous().cpu()
            config["trainable"].append(pname)
    save_file(_dedupe_shared(tensors), str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each key its own copy."""
    seen, out = set(), {}
    for key, t in tensors.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def layer_classes() -> dict[str, type]:
    from . import nn as cersa_nn

    return {name: getattr(cersa_nn, name) for name in cersa_nn.__all__}


def load(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Rebuild in `model` (a fresh copy of the original architecture and base weights) the adapter
    layers saved by `save`, load their weights, and set requires_grad as they were saved. Parameters
    a layer's config marks as tied (PiCa's per-role M) become one shared Parameter again."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    classes = layer_classes()
    for p in model.parameters():
        p.requires_grad_(False)
    tied: dict[str, nn.Parameter] = {}
    for name, entry in config["layers"].items():
        base = model.get_submodule(name)
        device = next(iter(base.parameters())).device
        layer = classes[entry["cls"]].from_config(entry["config"], base=as_linear(base), device=device)
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        allowed = set(getattr(type(layer), "BASE_KEYS", ()))
        if unexpected or set(missing) - allowed:
            raise ValueError(
                f"load: layer {name} ({entry['cls']}) expected keys {sorted(set(layer.state_dict()) - allowed)}, "
                f"missing {sorted(set(missing) - allowed)}, unexpected {sorted(unexpected)}"
            )
        layer.layer_name = name
        layer._cersa_adapter = True
        layer._cersa_method = entry["method"]
        layer._cersa_base_type = entry.get("base_type", "Linear")
        for key, p in layer.named_parameters():
            p.requires_grad_(key in entry["trainable"])
        for attr, tie in entry["config"].get("tied", {}).items():
            setattr(layer, attr, tied.setdefault(tie, getattr(layer, attr)))
        replace_module(model, name, layer)
    for pname in config["trainable"]:
        p = dict(model.named_parameters())[pname]
        with torch.no_grad():
            p.copy_(tensors[pname])
        p.requires_grad_(True)
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
