"""What the commands check before they do any work: argparse `type=` functions for the numbers,
and the pre-flight pieces each command's own check function (`compare.cli.check`,
`analyze.check_arguments`, `para_peft.check_arguments`, `doctor.check_arguments`) is built from:
an optional package, a device, an output directory or file. Each failure is a `UsageError`, which
the command line prints as one line `error: …` with exit status 2, before any model loads.
"""
from __future__ import annotations

import argparse
import importlib
import math
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ._checks import UsageError

__all__ = [
    "positive_int", "fraction", "finite_positive_float", "require_module", "check_device", "check_output_dir",
    "check_output_file",
]


def _parse(text: str, kind: Callable, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _parse(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a share in (0, 1] (an energy α or ε, a share of bytes)."""
    value = _parse(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:  # nan fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def finite_positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    value = _parse(text, float, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def require_module(module: str, command: str, needed_by: str, install: str) -> None:
    """Import `module` now (a broken install fails here too, not after the work): `needed_by`
    says what asked for it, `install` how to get it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{command}: {needed_by} needs {module}: pip install {install} ({exc})") from None


def check_device(text: str, command: str, option: str = "--device") -> str:
    """`text` as a device this process can use: cpu, cuda or cuda:N with N a visible GPU."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{command}: {option} {text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise UsageError(f"{command}: {option} {text}: expected cpu, cuda or cuda:N, got a {device.type} device")
    if not torch.cuda.is_available():
        why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible to this process")
        raise UsageError(f"{command}: {option} {text}: {why}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"{command}: {option} {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return text


def _probe_writable(directory: Path, target: Path, command: str) -> None:
    """A file can be created in `directory` (tried for real: permissions, read-only mounts, root)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UsageError(f"{command}: cannot write {target}: {directory} is not writable ({exc.strerror})") from None


def check_output_dir(path, command: str, *, refuse_nonempty: bool = False, force: bool = False) -> Path:
    """`path` can become the output directory: not a file, not under a file, writable (its nearest
    existing ancestor when it does not exist yet; nothing is created). `refuse_nonempty`: a
    directory that already holds files needs `force` (the command's --force)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{command}: the output {path} is a file; expected a directory to write into")
    if refuse_nonempty and not force and path.is_dir() and any(path.iterdir()):
        held = sorted(p.name for p in path.iterdir())
        listed = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise UsageError(f"{command}: the output directory {path} is not empty ({listed}); pass --force to "
                         "overwrite it, or name a new directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{command}: cannot create the output directory {path}: {existing} is a file")
    _probe_writable(existing, path, command)
    return path


def check_output_file(path, command: str, option: str) -> Path:
    """`path` can be written as a file: not a directory, its directory exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{command}: cannot write {option} {path}: it is a directory; name a file")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{command}: cannot write {option} {path}: directory {path.parent} does not exist")
    _probe_writable(parent, path, command)
    return path

