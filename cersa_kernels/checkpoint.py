"""Convert once, load small: a converted model as one self-contained checkpoint.

    ck.apply(model, "cersa", factor_format="nf4")        # once, slow (an SVD per layer)
    ck.save_converted(model, "converted/")                # every tensor of the model + the layers' configs
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)  # no memory: no dense Linear weight exists
    ck.load_converted(fresh, "converted/")                # the adapter layers, every tensor read in place

`converted/` holds `cersa_converted.safetensors` (every parameter and buffer of the model, each
tensor once: CERSA's factors, quantized or not, the adapters, and every other weight, embeddings
included) and `cersa_converted.json` (each adapter layer's class and `config()`, as `save` writes
them, the tied names and which parameters train), written in one atomic step, each file carrying
a fingerprint of the other (`_adapter_files`). `load_converted` rebuilds each adapter layer from
its config on the meta device (`from_config`, as `load` does), reads the file tensor by tensor
straight into its own memory (plain reads, no mmap: the page cache is not the process's, so the
peak is the checkpoint's size, not twice it) and assigns the tensors to the model without a copy.
Unlike `save` (an adapter over a base model that the user still has), nothing here needs the
original weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ._adapter_files import (
    CONFIG_ID_KEY, FORMAT_KEY, VERSION_KEY, check_finite, check_pair, config_id, read_json_object, serialize_tensors,
    write_files_atomically,
)
from ._checks import InputNotFoundError, UsageError
from .model import (
    _dedupe_shared, _unwrapped, adapter_layers, read_state_record, restore_state, saved_layer_target, state_record,
)
from .nn import tree
from .nn._quantized import weight_dtype_of
from .nn.base import AdapterLayer

__all__ = ["save_converted", "load_converted", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "cersa_converted.json"
WEIGHTS_NAME = "cersa_converted.safetensors"
FORMAT = "cersa_kernels-converted"
FORMAT_VERSION = 1

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _tensors_once(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """({first name: tensor} of every parameter and buffer, {first name: its other names} for a tensor
    reachable under several names (tied embeddings, PiCa's shared M), the non-persistent buffers)."""
    persistent = set(model.state_dict())
    first: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(t) in first:
            ties.setdefault(first[id(t)], []).append(name)
        else:
            first[id(t)] = name
            tensors[name] = t
    transient = [n for n in tensors if n not in persistent]  # parameters are always in state_dict
    return tensors, ties, transient


def save_converted(model: nn.Module, directory: Union[str, Path]) -> None:
    """Write `model` (adapted by `apply`, e.g. converted to CERSA) to `directory` as one checkpoint
    that `load_converted` rebuilds into a model built on the meta device. Every tensor of the model
    is written (frozen or not; a tied one once). The safetensors bytes are built in memory before
    the atomic write: saving needs the checkpoint's size on top of the model."""
    model = _unwrapped(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_converted: the model has no adapter layer (call apply first); a plain model is saved "
                         "with save_pretrained or torch.save")
    aliases = tree.module_aliases(model)
    tensors, ties, transient = _tensors_once(model)
    for key, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"save_converted: tensor {key!r} is on the meta device (the model is not loaded)")
    body = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "layers": {
            name: dict(cls=type(layer).__name__, method=layer.method, config=layer.config(), base_type=layer.base_type,
                       aliases=aliases[id(layer)])
            for name, layer in layers.items()
        },
        "ties": ties, "non_persistent": transient,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        **state_record(model),  # modules_to_save, task, the AdapterConfigs: as `save` writes them
    }
    body_id = config_id(body)
    weights = serialize_tensors(
        _dedupe_shared({k: t.detach().contiguous().cpu() for k, t in tensors.items()}),
        {FORMAT_KEY: FORMAT, VERSION_KEY: str(FORMAT_VERSION), CONFIG_ID_KEY: body_id},
    )
    text = json.dumps(dict(body, config_id=body_id, weights_sha256=hashlib.sha256(weights).hexdigest()), indent=2)
    write_files_atomically(Path(directory), {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()})


def _read_streaming(path: Path, device) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, sha256 of the file) of a safetensors file, each tensor read straight into
    a tensor of its own (one allocation each, no second copy, no mmap), the hash taken on the way."""
    if not path.is_file():
        raise InputNotFoundError(f"load_converted: {path} not found")
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            header_size = int.from_bytes(head, "little")
            if len(head) < 8 or 8 + header_size > size:
                raise ValueError("the header runs past the end of the file")
            header_bytes = f.read(header_size)
            header = json.loads(header_bytes)
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"load_converted: {path} is not a readable safetensors file ({e})") from None
        digest.update(head)
        digest.update(header_bytes)
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + header_size
        tensors: dict[str, torch.Tensor] = {}
        position = 0
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None or begin != position or start + end > size:
                raise UsageError(f"load_converted: {path}: tensor {name!r} has an unreadable dtype or offsets "
                                 f"({info['dtype']}, {begin}..{end}); the file is corrupted or truncated")
            t = torch.empty(info["shape"], dtype=dtype)
            if t.numel() * t.element_size() != end - begin:
                raise UsageError(f"load_converted: {path}: tensor {name!r} of shape {info['shape']} does not fill "
                                 f"its {end - begin} bytes; the file is corrupted")
            if t.numel():
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(view) != len(view):
                    raise UsageError(f"load_converted: {path} is truncated (in tensor {name!r})")
                digest.update(view)
            _check_finite_by_chunks(name, t, path)
            tensors[name] = t if device is None else t.to(device)
            position = end
        if start + position != size:
            raise UsageError(f"load_converted: {path} has {size - start - position} bytes after its last tensor")
    return tensors, metadata, digest.hexdigest()


def _check_finite_by_chunks(name: str, t: torch.Tensor, path: Path) -> None:
    """`check_finite` of one tensor, over chunks of 2^20 elements: its whole-tensor temporaries (a
    bool per element) would otherwise stay in the process's heap (+36% RSS on a 91 MB checkpoint)."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), 1 << 20):
        if not bool(torch.isfinite(flat[start : start + (1 << 20)]).all()):
            check_finite({name: t}, path, "load_converted")  # raises, counting the whole tensor


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module, _, leaf = key.rpartition(".")
    return (model.get_submodule(module) if module else model), leaf


def load_converted(model: nn.Module, directory: Union[str, Path], device: Optional[Union[str, torch.device]] = None
                   ) -> nn.Module:
    """Rebuild in `model` (the original architecture, best built on the meta device) the checkpoint
    `save_converted` wrote: the adapter layers from their configs, then every tensor of the file
    assigned in place (no copy; on `device` if given, else the CPU). A dense Linear weight of the
    original model is never allocated. Parameters train as they did when saved. Every name, shape
    and dtype is checked before the model is changed; an error names the file and the tensor."""
    given, model = model, _unwrapped(model)
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = read_json_object(config_path, "load_converted")
    if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
        raise UsageError(f"load_converted: {config_path} is not a converted checkpoint of this version "
                         f"(format={config.get('format')!r}, version={config.get('version')!r}; expected {FORMAT!r}, "
                         f"{FORMAT_VERSION})")
    tensors, metadata, digest = _read_streaming(weights_path, device)
    body = {k: v for k, v in config.items() if k not in ("config_id", "weights_sha256")}
    if config.get("weights_sha256") != digest:
        raise UsageError(f"load_converted: {weights_path} and {config_path} do not belong together (the weights' "
                         "fingerprint is not the one the config names); save the model again")
    check_pair(body, config_path, metadata, weights_path, "load_converted")

    built: dict[str, AdapterLayer] = {}
    for name, entry in config["layers"].items():
        here = f"load_converted: {config_path}: layer {name!r}"
        cls, target = saved_layer_target(model, name, entry, here, UsageError)
        base = tree.as_linear(target)
        layer = cls.from_config(entry["config"], base=base, device=base.weight.device)
        got = (layer.in_features, layer.out_features, layer.weight_dtype())
        want = (base.in_features, base.out_features, weight_dtype_of(base))
        if got != want:
            raise UsageError(f"{here} ({entry['cls']}) was saved for (in_features, out_features, dtype) {got}; the "
                             f"model's {entry['base_type']} there has {want}")
        layer.layer_name, layer.base_type = name, entry["base_type"]
        built[name] = layer
    try:
        record = read_state_record(model, config, f"load_converted: {config_path}")
    except ValueError as e:
        raise UsageError(str(e)) from None

    # what the model will hold, name by name (the new layers in place of their targets), against the file
    replaced = {alias: name for name, entry in config["layers"].items() for alias in entry["aliases"]}

    def expected():
        for key, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            if not any(key.startswith(alias + ".") for alias in replaced):
                yield key, t
        for alias, name in replaced.items():
            layer = built[name]
            for key, t in list(layer.named_parameters(remove_duplicate=False)) + list(layer.named_buffers(remove_duplicate=False)):
                yield f"{alias}.{key}", t

    wanted = dict(expected())
    tied = {alias for aliases in config.get("ties", {}).values() for alias in aliases}
    missing = sorted(set(wanted) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise UsageError(f"load_converted: {weights_path} does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (is it the same architecture and config?)")
    for key, t in tensors.items():
        want = wanted[key]
        if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
            raise UsageError(f"load_converted: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)} in {weights_path}, "
                             f"the model needs {want.dtype} of shape {tuple(want.shape)}")

    # Everything fits: put the layers in, then every tensor (the file's own memory, no copy).
    for alias, name in replaced.items():
        tree.replace_module(model, alias, built[name])
    trainable = set(config.get("trainable", []))
    with torch.no_grad():
        for key, t in tensors.items():
            owner, leaf = _owner(model, key)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=key in trainable and t.is_floating_point())
            else:
                owner._buffers[leaf] = t
        for key, aliases in config.get("ties", {}).items():
            owner, leaf = _owner(model, key)
            shared = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
            for alias in aliases:
                module, name = _owner(model, alias)
                (module._parameters if name in module._parameters else module._buffers)[name] = shared
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UsageError(f"load_converted: {weights_path} leaves tensors of the model on the meta device: {left[:8]}")
    restore_state(model, record)
    return given
