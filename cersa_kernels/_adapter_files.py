"""Adapter files on disk: a JSON config beside a safetensors file, written atomically and paired by
fingerprints, read back with one-line errors that name the file.

Pairing: `config_id(config)` is the sha256 of the config's canonical JSON; the safetensors metadata
stores it (`cersa_kernels_config_id`), so weights written with another config are refused. Our own
format also stores the sha256 of the safetensors bytes in the config; a PEFT adapter_config.json
stays standard (PEFT warns about any key it does not know), so there the metadata carries the pair.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Optional

import torch

from ._checks import InputNotFoundError, UsageError

CONFIG_ID_KEY = "cersa_kernels_config_id"
VERSION_KEY = "cersa_kernels_version"
FORMAT_KEY = "cersa_kernels_format"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_id(config: dict) -> str:
    """sha256 of the canonical JSON of `config` (key order and whitespace do not count)."""
    return sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of `tensors` (metadata values are strings); nothing touches the disk."""
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt", **metadata})


def write_files_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Write every {name: bytes} to a temporary name in `directory`, then rename each into place
    (os.replace). A failure before the renames leaves the earlier files untouched; temporaries are
    removed whatever happens. Between two renames the pair is mixed, which the fingerprints refuse."""
    directory.mkdir(parents=True, exist_ok=True)
    temporaries: dict[str, Path] = {}
    try:
        for name, data in files.items():
            tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            temporaries[name] = tmp
            with open(tmp, "xb") as f:  # "x": never another writer's file; honours the umask
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def read_json_object(path: Path, layer: str) -> dict:
    """The JSON object in `path`; InputNotFoundError / UsageError naming the file otherwise."""
    if not path.is_file():
        raise InputNotFoundError(f"{layer}: {path} not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{layer}: {path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{layer}: {path} must hold a JSON object, got a JSON {type(value).__name__}")
    return value


def read_safetensors(path: Path, layer: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, sha256 of the file bytes) of the safetensors file `path`; a missing,
    corrupted or truncated file raises an error naming it."""
    from safetensors.torch import load

    if not path.is_file():
        raise InputNotFoundError(f"{layer}: {path} not found")
    data = path.read_bytes()
    try:
        tensors = dict(sorted(load(data).items()))  # by name, as safetensors' load_file gives them
        header_size = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then JSON header
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on bad bytes
        raise UsageError(f"{layer}: {path} is not a readable safetensors file, corrupted or truncated ({_one_line(e)})") from None
    return tensors, metadata, sha256(data)


def check_pair(config: dict, config_path: Path, metadata: dict, weights_path: Path, layer: str,
               expected_id: Optional[str] = None) -> None:
    """Refuse weights whose metadata names another config than `config` (`expected_id`, default
    config_id(config)). Weights without our metadata (written by PEFT itself) are not checked."""
    saved_id = metadata.get(CONFIG_ID_KEY)
    if saved_id is None:
        return
    expected_id = config_id(config) if expected_id is None else expected_id
    if saved_id != expected_id:
        raise UsageError(
            f"{layer}: {weights_path} and {config_path} do not belong together: the weights' fingerprint names "
            f"config {saved_id[:12]}…, the config is {expected_id[:12]}… (one file was replaced, edited or "
            "left from another save); save the adapter again"
        )


def check_safetensors_file(path, layer: str) -> None:
    """Reads the header of a .safetensors file (not its data): UsageError naming the file when it is
    corrupted or truncated (the header's offsets must cover the file exactly)."""
    from safetensors import SafetensorError, safe_open  # optional dependency (the `interop` extra)

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{layer}: {path} is not a readable safetensors file ({error})") from None
