"""PARA on a PEFT LoRA checkpoint: read an adapter directory, compress, write a PEFT adapter directory.

Input: `adapter_config.json` + `adapter_model.safetensors` with keys `<prefix><module>.lora_A.weight`
(r×n) and `.lora_B.weight` (m×r). Each module's scale s = alpha/r (alpha/√r with use_rslora),
resolved through the config's `rank_pattern` / `alpha_pattern` the way PEFT resolves them.
Output: the rebuilt factors and a config whose `rank_pattern` / `alpha_pattern` name every kept
module in full, with alpha' = s·k_l (s·√k_l with rslora) so each module's scale s is unchanged; a
module whose k_l = 0 is dropped from `target_modules` and from the weights (its adapter is removed).
The output is written atomically; its safetensors metadata carries the id of its config (the
config itself stays standard PEFT), and an input whose metadata names another config is refused.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from ._adapter_files import (
    CONFIG_ID_KEY, FORMAT_KEY, VERSION_KEY, check_pair, config_id, read_json_object, read_safetensors, serialize_tensors,
    write_files_atomically,
)
from ._checks import InputNotFoundError, UsageError
from ._cli_checks import check_output_dir
from .nn.base import LowRankUpdate
from .para import ParaResult, compress

__all__ = ["para_peft", "write_lora_adapter"]

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
FORMAT, FORMAT_VERSION = "peft_lora", 1  # what our safetensors metadata says we wrote

_KEY = re.compile(r"^(?P<prefix>base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's lookup: the first pattern key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def para_peft(in_dir, out_dir, energy: Optional[float] = None, budget: Optional[int] = None) -> ParaResult:
    """Compress the PEFT LoRA adapter in `in_dir` with PARA and write it to `out_dir` (see module doc)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    expected = "expected a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)"
    if not in_dir.exists():
        raise InputNotFoundError(f"para-peft: {in_dir} does not exist; {expected}")
    if not in_dir.is_dir():
        raise UsageError(f"para-peft: {in_dir} is a file; {expected}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"para-peft: the output {out_dir} is a file; expected a directory to write the adapter into")
    config_path, weights_path = in_dir / "adapter_config.json", in_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            empty = "" if any(in_dir.iterdir()) else f" ({in_dir} is an empty directory)"
            raise InputNotFoundError(f"para-peft: {path} not found{empty}; {expected}")
    config = read_json_object(config_path, "para-peft")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if key not in config:
            raise UsageError(f"para-peft: {config_path} has no {key!r} (not a PEFT LoRA adapter config)")
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), kind):
            raise UsageError(f"para-peft: {config_path} needs a number {key!r} (a LoRA config), got {config.get(key)!r}")
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"para-peft: {config_path} has peft_type={config.get('peft_type')!r}, expected 'LORA'")
    if config.get("use_dora"):
        raise UsageError(f"para-peft: {config_path} is a DoRA adapter (use_dora=true); PARA handles plain LoRA only")
    tensors, metadata, _ = read_safetensors(weights_path, "para-peft")
    if metadata.get(VERSION_KEY, str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise UsageError(
            f"para-peft: {weights_path} was written in cersa_kernels format version {metadata[VERSION_KEY]}; "
            f"this version reads {FORMAT_VERSION}"
        )
    check_pair(config, config_path, metadata, weights_path, "para-peft")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    prefixes: dict[str, str] = {}
    others = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = value
            prefixes[match["module"]] = match["prefix"] or ""
        elif ".lora_" in key:
            raise UsageError(f"para-peft: tensor {key!r} is not a lora_A/lora_B weight; only Linear LoRA is supported")
        else:
            others[key] = value  # e.g. modules_to_save: copied unchanged
    if not pairs:
        raise UsageError(f"para-peft: {weights_path} has no '...lora_A.weight' / '...lora_B.weight' tensors")
    rslora = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    adapters = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UsageError(f"para-peft: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        r = int(_pattern_value(rank_pattern, module, config["r"]))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise UsageError(
                f"para-peft: module {module!r}: config rank r={r}, but lora_A is {tuple(ab['A'].shape)} "
                f"and lora_B is {tuple(ab['B'].shape)}"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        adapters[module] = LowRankUpdate(A=ab["A"], B=ab["B"], scale=alpha / (math.sqrt(r) if rslora else r))
    if all(f.scale == 0 or not bool((f.B @ f.A).any()) for f in adapters.values()):
        raise UsageError(
            f"para-peft: every adapter in {weights_path} has ΔW = s·B·A = 0 (e.g. a LoRA that was never trained: "
            f"B starts at zero), so there is nothing to allocate ranks to"
        )
    result = compress(adapters, energy=energy, budget=budget)
    if not any(f is not None for f in result.adapters.values()):
        raise UsageError("para-peft: the threshold removes every adapter; raise energy or budget")
    write_lora_adapter(out_dir, result.adapters, config, prefixes, rslora, extra_tensors=others)
    return result


def write_lora_adapter(
    out_dir,
    adapters: dict[str, Optional[LowRankUpdate]],
    config: dict,
    prefixes: dict[str, str],
    rslora: bool = False,
    extra_tensors: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write a PEFT LoRA adapter directory: `<prefix><module>.lora_{A,B}.weight` for every adapter
    that is not None, and `config` with per-module `rank_pattern` / `alpha_pattern` (alpha' = s·k,
    s·√k with rslora, so each module's scale s is exact) and `target_modules` = the kept modules.
    Both files are serialised first, then committed together in one atomic step
    (`_adapter_files.write_files_atomically`); the safetensors metadata carries the config's id
    (`_adapter_files.config_id`)."""
    out = dict(extra_tensors or {})
    new_ranks, new_alphas = {}, {}
    for name, f in adapters.items():
        if f is None:
            continue
        k = f.A.shape[0]
        out[f"{prefixes[name]}{name}.lora_A.weight"] = f.A.contiguous()
        out[f"{prefixes[name]}{name}.lora_B.weight"] = f.B.contiguous()
        new_ranks[name] = k
        new_alphas[name] = f.scale * (math.sqrt(k) if rslora else k)
    config = dict(config, rank_pattern=new_ranks, alpha_pattern=new_alphas, target_modules=sorted(new_ranks))
    text = json.dumps(config, indent=2, sort_keys=True)
    metadata = {FORMAT_KEY: FORMAT, VERSION_KEY: str(FORMAT_VERSION), CONFIG_ID_KEY: config_id(config)}
    weights = serialize_tensors(out, metadata)
    write_files_atomically(Path(out_dir), {WEIGHTS_NAME: weights, CONFIG_NAME: text.encode()})


def check_arguments(out_dir, force: bool = False) -> None:
    """The command's own check, before any file is read: OUT_DIR is not a file, can be written, and
    holds nothing yet unless `force` (--force). The library function `para_peft` overwrites, as
    `save` does: the write is atomic, so an earlier output is replaced whole or kept whole."""
    check_output_dir(out_dir, "para-peft", refuse_nonempty=True, force=force)


def main(in_dir, out_dir, energy: Optional[float] = None, budget: Optional[int] = None, force: bool = False) -> ParaResult:
    """The `para-peft` command: compress and print one line per module and the totals."""
    check_arguments(out_dir, force)
    result = para_peft(in_dir, out_dir, energy=energy, budget=budget)
    width = max(len(layer.name) for layer in result.layers)
    print(f"{'module':<{width}}  rank  ->  new  energy kept")
    for layer in result.layers:
        print(f"{layer.name:<{width}}  {layer.rank_before:4d}  -> {layer.rank_after:4d}  {layer.energy_kept:11.4f}")
    print(
        f"threshold σ ≥ {result.threshold:.4g}; energy kept {result.energy_kept:.4f}; parameters "
        f"{result.params_before} -> {result.params_after} ({result.reduction:.1%} fewer); wrote {out_dir}"
    )
    return result
