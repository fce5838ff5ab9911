"""Meet PEFT users where they are: load a PEFT LoRA adapter into our layers, run a PEFT model's
LoRA layers on our fused `cersa::lora` op in place, and save our adapters from the HF Trainer.

    report = from_peft(model, "adapter_dir")   # PEFT checkpoint -> LoraLinear layers (ck.save/para/export work)
    names = patch_peft(peft_model)             # PEFT's lora.Linear layers compute through cersa::lora
    unpatch_peft(peft_model)                   # PEFT's own forward again
    trainer = Trainer(..., callbacks=[trainer_callback()])  # ck.save(model) beside every checkpoint

`peft`, `transformers` and `bitsandbytes` are imported inside the functions that need them, so
that `import cersa_kernels` stays light (it does not pull in transformers); there is no import cycle.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .config import TASKS, task_name
from .model import ApplyReport, _model_state as model_state, adapter_layers, apply, save
from .nn.tree import as_linear, is_conv1d, resolve_modules
from .ops import lora_linear
from .nn._quantized import frozen_weight_of, is_linear4bit, linear4bit_problem
from .quant import QuantizedTensor

__all__ = ["from_peft", "patch_peft", "unpatch_peft", "trainer_callback", "bnb_nf4_view"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# `<base_model.model.><module>.lora_A.weight`: the keys PEFT's save_pretrained writes for a Linear
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


# --- from_peft: a PEFT LoRA adapter directory -> our LoraLinear layers ----------------------------

def _unsupported_features(config) -> list[str]:
    """What in a LoraConfig our LoraLinear cannot reproduce, each as 'what (field=value)'."""
    found = []
    for f in dataclasses.fields(config):  # DoRA and every other LoRA variant PEFT registers
        value = getattr(config, f.name)
        if f.metadata.get("is_lora_variant") and value:
            label = "DoRA" if f.name == "use_dora" else "a LoRA variant"
            found.append(f"{label} ({f.name}={value!r})")
        if f.name == "init_lora_weights" and value in f.metadata.get("lora_variants", ()):
            found.append(f"a LoRA variant (init_lora_weights={value!r})")
    if config.bias != "none":
        found.append(f"bias training (bias={config.bias!r})")
    if getattr(config, "lora_bias", False):
        found.append("a bias on lora_B (lora_bias=True)")
    for name in ("trainable_token_indices", "target_parameters", "layer_replication", "megatron_config"):
        value = getattr(config, name, None)
        if value:
            found.append(f"{name}={value!r}")
    return found


def from_peft(model: nn.Module, adapter_dir: Union[str, Path], dropout: float | None = None) -> ApplyReport:
    """Replace, in place, every Linear / HF Conv1D of `model` (the original base model, as given to
    `get_peft_model`) that the PEFT LoRA adapter in `adapter_dir` adapts by a `LoraLinear` holding
    the adapter's lora_A (r, n) and lora_B (m, r), so that `model` computes what
    `PeftModel.from_pretrained(model, adapter_dir)` computes.

    Per module, r and alpha come from `rank_pattern` / `alpha_pattern` with PEFT's own key matching
    (`peft.utils.other.get_pattern_key`); the scale is alpha/r, alpha/√r with `use_rslora` (stored
    as LoraLinear alpha' = scale·r, the same scale). Conv1D bases are read transposed, as PEFT's
    `fan_in_fan_out` does. `dropout` defaults to the adapter's `lora_dropout`. Every other parameter
    of `model` is frozen (as PEFT does). DoRA and other LoRA variants, bias training, embedding or
    Conv LoRA and non-LoRA adapters raise a ValueError naming what is unsupported.
    Returns the ApplyReport of the replaced layers; `cersa_kernels.save`, `para.compress` and
    `export_peft_lora` work on the result.
    """
    import peft
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"from_peft: {path} not found (expected a PEFT LoRA adapter directory)")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"from_peft: {config_path} is a {peft_type} adapter; only LoRA (peft_type='LORA') is supported")
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    unsupported = _unsupported_features(config)
    if unsupported:
        raise ValueError(f"from_peft: {config_path} uses what LoraLinear does not support: {'; '.join(unsupported)}")

    tensors = load_file(str(weights_path))
    embedding = sorted({k.split(".lora_embedding_")[0].removeprefix("base_model.model.") for k in tensors if ".lora_embedding_" in k})
    if embedding:
        raise ValueError(
            f"from_peft: {weights_path} holds embedding LoRA for {embedding}; LoRA is supported on nn.Linear and "
            "Hugging Face Conv1D layers only"
        )
    # PEFT's modules_to_save (a SEQ_CLS adapter's head): full modules, their state under
    # `base_model.model.<module>.<key>` (`<module>.modules_to_save.<adapter>.<key>` in older files).
    # A name that selects no module is skipped, as PEFT does (its task types list classifier and score).
    saved = resolve_modules(model, list(config.modules_to_save or []), "modules_to_save", strict=False)
    state = model.state_dict()
    heads: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.removeprefix("base_model.model."))
        if not any(name.startswith(module + ".") for module in saved):
            raise ValueError(
                f"from_peft: {weights_path} holds {key!r}, which is neither a Linear LoRA weight (lora_A / lora_B) nor "
                f"a tensor of the modules_to_save {saved}"
            )
        if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
            got = tuple(state[name].shape) if name in state else "no such tensor"
            raise ValueError(f"from_peft: {weights_path}: {key!r} has shape {tuple(tensor.shape)}, the model's {name!r}: {got}")
        heads[name] = tensor
    if not pairs:
        raise ValueError(f"from_peft: {weights_path} has no '...lora_A.weight' / '...lora_B.weight' tensors")

    scale_of_r = (lambda r: r**0.5) if config.use_rslora else (lambda r: r)
    groups: dict[tuple[int, float], list[str]] = {}  # (rank, our alpha) -> modules: one apply call each
    for module, ab in pairs.items():
        try:
            base = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"from_peft: the adapter adapts {module!r}, which the model does not have") from None
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise ValueError(
                f"from_peft: module {module!r} is a {type(base).__name__}; LoRA is supported on nn.Linear and "
                "Hugging Face Conv1D layers only"
            )
        if set(ab) != {"A", "B"}:
            raise ValueError(f"from_peft: module {module!r} has lora_{''.join(sorted(ab))} but not both lora_A and lora_B")
        r = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r))
        alpha = float(config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha))
        linear = as_linear(base)
        if tuple(ab["A"].shape) != (r, linear.in_features) or tuple(ab["B"].shape) != (linear.out_features, r):
            raise ValueError(
                f"from_peft: module {module!r} (in={linear.in_features}, out={linear.out_features}, r={r} from the "
                f"config): expected lora_A {(r, linear.in_features)} and lora_B {(linear.out_features, r)}, got "
                f"{tuple(ab['A'].shape)} and {tuple(ab['B'].shape)}"
            )
        groups.setdefault((r, alpha / scale_of_r(r) * r), []).append(module)

    for p in model.parameters():  # as PEFT: only the adapters train
        p.requires_grad_(False)
    report = ApplyReport("lora")
    p_drop = config.lora_dropout if dropout is None else dropout
    for (r, alpha), modules in groups.items():
        pattern = "|".join(re.escape(m) for m in modules)
        part = apply(model, "lora", target_modules=f"(?:{pattern})", freeze_base=False, rank=r, alpha=alpha,
                     dropout=p_drop, modules_to_save=saved or None)
        report.rows.extend(part.rows)
        with torch.no_grad():
            for module in modules:
                layer = model.get_submodule(module)
                layer.lora_A.copy_(pairs[module]["A"])
                layer.lora_B.copy_(pairs[module]["B"])
    with torch.no_grad():
        for name, tensor in heads.items():
            state[name].copy_(tensor)  # state_dict's tensors share the module's storage
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type in {peft_name for peft_name, _ in TASKS.values()}:
        model_state(model)["task"] = task_name(task_type)
    report.set_totals(model, {id(p) for layer in adapter_layers(model).values() for p in layer.parameters() if p.requires_grad})
    return report


# --- patch_peft: PEFT's lora.Linear layers on our op, in place ------------------------------------

def bnb_nf4_view(base: nn.Module, name: str, dtype: torch.dtype | None = None) -> QuantizedTensor:
    """The frozen weight of a bitsandbytes NF4 `Linear4bit` as a `QuantizedTensor` over bitsandbytes'
    own storage: the packed codes are a view (same data_ptr, no copy) and so is the absmax unless it
    is itself quantized. `dtype`: what the operand computes in (default: the layer's compute_dtype,
    else bitsandbytes' stored dtype).

    The view is the quantized layers' own (`nn._quantized.frozen_weight_of`, one reading of
    bitsandbytes' layout for the package): bitsandbytes quantizes the row-major (out, in) weight in
    flat blocks of `blocksize`; when the blocksize divides in_features each block lies inside one
    row and the layout is exactly `cersa_kernels.quant`'s (groups of `blocksize` along the row).
    With `compress_statistics=True` (bitsandbytes' default, `quant_state.nested`) the absmax is
    itself 8-bit blockwise quantized: it is dequantized with bitsandbytes' own
    `dequantize_blockwise` (+ the offset), as bitsandbytes' forward does, into a float32 vector of
    out·in/blocksize values (1/blocksize of the weight's elements) on every call. Raises
    ValueError naming `name` for any other layout."""
    problem = linear4bit_problem(base)
    if problem:
        raise ValueError(f"{name}: {problem}")
    view = frozen_weight_of(base)
    return dataclasses.replace(view, dtype=dtype or getattr(base, "compute_dtype", None) or view.dtype)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the op's differentiable operands (x, A, B). Their gradients come from
    `cersa::lora_bwd`, which has no autograd formula of its own; under create_graph=True (a gradient
    penalty, a Hessian-vector product) each gradient is passed on through `_RefuseBackward`, so that
    differentiating it again raises one error naming the op and the way out, instead of torch's
    'no autograd formula was registered' from deep inside autograd. First-order training is
    unchanged: nothing is saved and the gradients pass through as they are."""

    @staticmethod
    def forward(ctx, name: str, *tensors: Tensor):
        ctx.name = name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs a backward in grad mode only for create_graph=True
            grads = tuple(None if g is None else _RefuseBackward.apply(ctx.name, g) for g in grads)
        return (None, *grads)


class _RefuseBackward(torch.autograd.Function):
    """Identity whose backward raises: marks a gradient computed by `cersa::lora_bwd`."""

    @staticmethod
    def forward(ctx, name: str, grad: Tensor) -> Tensor:
        ctx.name = name
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            f"patch_peft: layer {ctx.name!r}: the fused op cersa::lora has no double backward, and this loss "
            "differentiates its gradient again (create_graph=True, e.g. a gradient penalty); call "
            "cersa_kernels.peft_interop.unpatch_peft(model) to train such a loss with PEFT's own forward"
        )


class _OnCersaLora:
    """The forward of one patched PEFT `lora.Linear`: y = base(x) + s·B(A(drop(x))) through the fused
    `cersa::lora` op when one plain-LoRA adapter is active, PEFT's own forward otherwise (adapters
    disabled, merged, several active, a mixed `adapter_names` batch, extra forward arguments).

    An object (not a closure) so that deepcopy and pickle of the model keep working: it holds the
    layer, and a copy of the layer gets a copy of this object pointing at the copy."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        self.layer, self.name = layer, name
        self.warned = False

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layer
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant:
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.get_base_layer()
        if base.weight.requires_grad and torch.is_grad_enabled():
            # made trainable after patch_peft (which refuses it): our op has no dW, PEFT's forward does
            if not self.warned:  # once per layer, not at every step
                self.warned = True
                warnings.warn(f"patch_peft: the base weight of {self.name!r} requires grad; the fused op computes "
                              "no gradient for it, so this layer runs PEFT's own forward (freeze it to use the op)",
                              stacklevel=2)
            return type(layer).forward(layer, x, *args, **kwargs)
        adapter = active[0]
        qlora = is_linear4bit(base)
        in_dtype = x.dtype
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        drop = layer.lora_dropout[adapter]
        p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
        # our mask: regenerated in backward from this seed, never stored; drawn from torch's RNG so
        # torch.manual_seed (and the Trainer's saved RNG state) reproduces it
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if p > 0 else None
        # The op wants one dtype. Under autocast that is autocast's dtype (the dispatcher does not
        # autocast a custom op); else the base weight's: PEFT keeps float32 adapters over a 16-bit
        # base. Gradients flow back through the casts, so float32 adapters get float32 gradients.
        # A bitsandbytes 4-bit base computes in its compute_dtype (x's dtype until it is set).
        if qlora:
            dtype = base.compute_dtype or x.dtype
        else:
            weight = base.weight.t() if is_conv1d(base) else base.weight  # Conv1D stores (in, out)
            dtype = weight.dtype
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if qlora:  # bitsandbytes' packed NF4 storage itself, viewed (no copy, no dequantized W)
            weight = bnb_nf4_view(base, self.name, dtype)
        else:
            weight = weight.to(dtype)
        x, A, B, bias = (None if t is None else t.to(dtype) for t in (x, A, B, base.bias))
        if torch.is_grad_enabled():
            x, A, B = _NoDoubleBackward.apply(self.name, x, A, B)
        y = lora_linear(x, weight, A, B, bias, layer.scaling[adapter], p, seed, layer=self.name)
        return y.to(in_dtype) if qlora else y  # as bitsandbytes' Linear4bit: the output in the input's dtype


class _PatchNewAdapters:
    """`peft_model.add_adapter` after `patch_peft` (PEFT's `load_adapter` goes through it too): PEFT's
    own add_adapter, then the LoRA layers it created are patched as well, so a new adapter never
    silently runs PEFT's code. Layers the op cannot serve (a DoRA adapter, ...) keep PEFT's forward,
    with a warning naming them. An object, like `_OnCersaLora`, so deepcopy and pickle work."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        result = type(self.model).add_adapter(self.model, *args, **kwargs)
        layers, problems = _lora_layers(self.model)
        for name, module in layers.items():
            if not isinstance(module.__dict__.get("forward"), _OnCersaLora):
                module.forward = _OnCersaLora(module, name)
        if problems:
            warnings.warn("patch_peft: after add_adapter these layers run PEFT's own forward: " + "; ".join(problems),
                          stacklevel=2)
        return result


def _lora_layers(peft_model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """{name: module} of every PEFT tuner layer the op can serve, and why each other one cannot."""
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers, problems = {}, []
    for name, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        qlora = isinstance(module, LoraLayer) and is_linear4bit(module.get_base_layer())
        if not isinstance(module, LoraLayer):
            problems.append(f"{name} is a {type(module).__module__}.{type(module).__name__} (not a LoRA layer: mixed adapter types)")
        elif qlora and linear4bit_problem(module.get_base_layer()):
            problems.append(f"{name}: {linear4bit_problem(module.get_base_layer())}")
        elif not qlora and not isinstance(module, PeftLoraLinear):  # QLoRA: PEFT's lora.bnb.Linear4bit
            problems.append(f"{name} is a LoRA {type(module).__name__} over a {type(module.get_base_layer()).__name__} "
                            "(only LoRA on nn.Linear / Conv1D runs on our op)")
        elif not (isinstance(module.get_base_layer(), nn.Linear) or is_conv1d(module.get_base_layer())):
            problems.append(f"{name} wraps a {type(module.get_base_layer()).__name__}, not an nn.Linear / Conv1D")
        elif not qlora and not module.get_base_layer().weight.is_floating_point():  # e.g. bitsandbytes Linear8bitLt
            problems.append(f"{name} wraps a {type(module.get_base_layer()).__name__} with a "
                            f"{module.get_base_layer().weight.dtype} weight (only floating-point or bitsandbytes NF4 "
                            "Linear4bit weights run on our op)")
        elif module.lora_variant:
            problems.append(f"{name} uses {sorted(type(v).__name__ for v in module.lora_variant.values())} for adapters "
                            f"{sorted(module.lora_variant)} (DoRA / LoRA variants are not supported)")
        elif any(module.lora_bias.values()):
            problems.append(f"{name} has a bias on lora_B (lora_bias=True), which our op does not compute")
        elif module.get_base_layer().weight.requires_grad:
            problems.append(f"{name} has a base weight that requires grad, for which our op computes no gradient "
                            "(freeze it with requires_grad_(False), or train it unpatched)")
        else:
            layers[name] = module
    return layers, problems


def patch_peft(peft_model: nn.Module) -> list[str]:
    """Make every PEFT LoRA `Linear` of `peft_model` compute through the fused `cersa::lora` op, in place.

    PEFT's modules, parameter names, state_dict, save_pretrained, merge_and_unload, disable_adapter()
    and set_adapter() are unchanged: only each layer's `forward` is replaced (an instance attribute,
    see `_OnCersaLora`), and the active adapter, its scaling and dropout are read at every call.
    Autograd saves x and x·Aᵀ per layer; with dropout, the mask is our counter-based one, regenerated
    from an 8-byte seed instead of saved. Raises ValueError naming every layer it cannot serve (no
    LoRA layer at all, LoRA over Conv2d / Embedding, DoRA, lora_bias, other adapter types).
    A base weight that requires grad is refused too (the op computes no dW); made trainable after
    patching, that layer runs PEFT's forward with a warning. A loss that differentiates a gradient
    again (create_graph=True) raises a RuntimeError naming the op when it reaches it: use
    `unpatch_peft` for it. Adapters added later with `add_adapter` / `load_adapter` are patched too.
    Returns the names of the patched layers.
    """
    layers, problems = _lora_layers(peft_model)
    if problems:
        raise ValueError("patch_peft: cannot run these layers on the cersa lora op: " + "; ".join(problems))
    if not layers:
        raise ValueError(f"patch_peft: {type(peft_model).__name__} has no PEFT LoRA layer (expected a PeftModel from get_peft_model)")
    for name, module in layers.items():
        module.forward = _OnCersaLora(module, name)
    if hasattr(type(peft_model), "add_adapter"):
        peft_model.add_adapter = _PatchNewAdapters(peft_model)
    return sorted(layers)


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Give every layer `patch_peft` patched its PEFT forward back. Returns their names."""
    restored = []
    if isinstance(peft_model.__dict__.get("add_adapter"), _PatchNewAdapters):
        del peft_model.add_adapter
    for name, module in peft_model.named_modules():
        if isinstance(module.__dict__.get("forward"), _OnCersaLora):
            del module.forward
            restored.append(name)
    return sorted(restored)


# --- HF Trainer: save our adapter beside every checkpoint ------------------------------------------

ADAPTER_SUBDIR = "cersa_adapter"


def trainer_callback(subdir: str = ADAPTER_SUBDIR):
    """A `transformers.TrainerCallback` that writes `cersa_kernels.save(model, <checkpoint>/<subdir>)`
    at every Trainer checkpoint (and `<output_dir>/<subdir>` at the end of training), so that
    `cersa_kernels.load(fresh_model, that_dir)` rebuilds the adapter layers without the Trainer.
    (The Trainer's own checkpoint, the whole state dict, is what `resume_from_checkpoint` reads.)"""
    from transformers import TrainerCallback

    class CersaSaveCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            save(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}", subdir))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            save(model, os.path.join(args.output_dir, subdir))

    return CersaSaveCallback()
