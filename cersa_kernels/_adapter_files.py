"""Adapter files on disk: a JSON config beside a safetensors file, written in one atomic commit
(`write_files_atomically`, the one writer of `save`, `export_peft_lora` and `para-peft`) and paired
by fingerprints, read back with one-line errors that name the file.

Pairing: `config_id(config)` is the sha256 of the config's canonical JSON; the safetensors metadata
stores it (`cersa_kernels_config_id`), so weights written with another config are refused. Our own
format also stores the sha256 of the safetensors bytes in the config; a PEFT adapter_config.json
stays standard (PEFT warns about any key it does not know), so there the metadata carries the pair.
"""
from __future__ import annotations

import contextlib
import errno
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


# --- writing: one atomic commit for a set of files ---------------------------------------------
#
# A reader (ours, or PEFT's `from_pretrained`) opens fixed names in the directory, and two files can
# not be renamed into place in one step. So the fixed names are symbolic links through one pointer,
# and a save commits by replacing that one pointer (os.replace of a symlink: atomic on POSIX):
#
#   DIR/cersa_config.json          -> .cersa_kernels/cersa_adapter+cersa_config/cersa_config.json
#   DIR/cersa_adapter.safetensors  -> .cersa_kernels/cersa_adapter+cersa_config/cersa_adapter.safetensors
#   DIR/.cersa_kernels/cersa_adapter+cersa_config           -> cersa_adapter+cersa_config.<token>
#   DIR/.cersa_kernels/cersa_adapter+cersa_config.<token>/   the files of one save, complete
#   DIR/.cersa_kernels/cersa_adapter+cersa_config.lock       serialises the saves to DIR
#
# At every instant each fixed name resolves through the pointer to one complete generation: the
# earlier one until the pointer is replaced, the new one after. Everything else a failed or killed
# save leaves (a partial generation, a temporary link) is never reachable from a fixed name, and
# the next save removes it. All links are relative, so the directory can be moved or copied.

STATE_DIR = ".cersa_kernels"
# Symbolic links and flock: POSIX. Elsewhere (Windows) the files are renamed into place one after
# the other, and a crash between the renames leaves a pair the fingerprints refuse.
LINKED_LAYOUT = os.name == "posix"


def _slot_name(names) -> str:
    """The pointer's name for one set of files: the stems of their names, sorted."""
    return "+".join(sorted(Path(name).stem for name in names))


def write_files_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Make `directory/<name>` hold `files[name]` for every name, in one atomic commit (see the
    layout above): a failure or a kill at any step leaves every name with its earlier content. The
    bytes are written and fsync'ed before the commit, the commit is fsync'ed after it. Files of the
    directory under other names are left alone."""
    directory = Path(directory)
    if not LINKED_LAYOUT:
        write_files_renamed(directory, files)
        return
    _make_dir(directory)
    state = directory / STATE_DIR
    _make_dir(state)
    slot = _slot_name(files)
    with _locked(state / f"{slot}.lock"):  # under the lock no other save's generation is in progress
        _remove_leftovers(directory, state, slot, files)
        if not all(_is_our_link(directory, slot, name) for name in files):
            _adopt(directory, state, slot, files)
        generation = _write_generation(state, slot, files)
        earlier = _point(state, slot, generation)  # the commit
        if earlier is not None:
            _remove_quietly(state / earlier)


def write_files_renamed(directory: Path, files: dict[str, bytes]) -> None:
    """Each file to a temporary name, fsync'ed, then renamed into place, in `files`' order: plain
    files (no links), each one atomic by itself; the pair is not. What `write_files_atomically`
    does without symbolic links, and what `compare` uses for results meant to be committed to git,
    where the last file written (results.json) marks a complete run."""
    directory.mkdir(parents=True, exist_ok=True)
    temporaries: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temporaries[name] = directory / f".{name}.{secrets.token_hex(8)}.tmp"
            _write_file(temporaries[name], data)
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temporaries.values():
            _remove_quietly(tmp)


def _link_target(slot: str, name: str) -> str:
    return f"{STATE_DIR}/{slot}/{name}"


def _is_our_link(directory: Path, slot: str, name: str) -> bool:
    path = directory / name
    return os.path.islink(path) and os.readlink(path) == _link_target(slot, name)


def _adopt(directory: Path, state: Path, slot: str, files: dict[str, bytes]) -> None:
    """Turn fixed names that hold files of their own (an older save, PEFT's save_pretrained, a
    copy) into our links without changing what they hold: first a generation with their current
    content (hard links, copies where the file system has none) becomes the pointer's target, then
    each name is replaced by its link, which resolves to the same bytes."""
    generation = state / f"{slot}.{secrets.token_hex(8)}"
    os.mkdir(generation)
    for name in files:
        if (directory / name).is_file():  # a missing file or a dangling link stays missing
            source = os.path.realpath(directory / name)
            try:
                os.link(source, generation / name)
            except OSError:
                with open(source, "rb") as f:
                    _write_file(generation / name, f.read())
    _fsync_dir(generation)
    earlier = _point(state, slot, generation)
    for name in files:
        if not _is_our_link(directory, slot, name):
            _replace_by_link(directory / name, _link_target(slot, name))
    _fsync_dir(directory)
    if earlier is not None:
        _remove_quietly(state / earlier)


def _write_generation(state: Path, slot: str, files: dict[str, bytes]) -> Path:
    """A new generation directory holding every file, all durable before anything points at it."""
    generation = state / f"{slot}.{secrets.token_hex(8)}"
    os.mkdir(generation)
    for name, data in files.items():
        _write_file(generation / name, data)
    _fsync_dir(generation)
    return generation


def _point(state: Path, slot: str, generation: Path):
    """Point `state/slot` at `generation` in one os.replace; returns the generation it pointed at."""
    pointer = state / slot
    earlier = os.readlink(pointer) if os.path.islink(pointer) else None
    _replace_by_link(pointer, generation.name)
    _fsync_dir(state)
    return earlier


def _replace_by_link(path: Path, target: str) -> None:
    """Replace `path` by a symbolic link to `target` atomically: a new link, renamed over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_leftovers(directory: Path, state: Path, slot: str, files) -> None:
    """Remove what failed or killed saves of this slot left: generations the pointer does not name,
    temporary links, and the `.<name>.*.tmp` files of this and of earlier versions."""
    pointer = state / slot
    current = os.readlink(pointer) if os.path.islink(pointer) else None
    for entry in os.listdir(state):
        if entry.startswith(f"{slot}.") and entry not in (current, f"{slot}.lock"):
            _remove_quietly(state / entry)
        elif entry.startswith(f".{slot}.") and entry.endswith(".tmp"):
            _remove_quietly(state / entry)
    for entry in os.listdir(directory):
        if entry.endswith(".tmp") and any(entry.startswith(f".{name}.") for name in files):
            _remove_quietly(directory / entry)


def _remove_quietly(path: Path) -> None:
    """Remove a file, a link or a flat directory of files. Best effort: this is only garbage that no
    fixed name reaches, so an error here must not fail a save that has committed; the next save
    tries again."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            for entry in os.listdir(path):
                os.unlink(path / entry)
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to a new file (never another writer's: O_EXCL; honours the umask), fsync'ed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (the names written or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:  # some file systems refuse fsync on a directory: nothing to do there
            raise
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on `path` for the duration (released by the kernel if the process dies)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    check_finite(tensors, path, layer)
    return tensors, metadata, sha256(data)


def check_finite(tensors: dict[str, torch.Tensor], path: Path, layer: str) -> None:
    """UsageError naming the first floating-point tensor that holds a NaN or an infinity: an adapter
    with one gives NaN outputs (or NaN ranks in PARA), however well the fingerprints match."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            found = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
            raise UsageError(
                f"{layer}: tensor {key!r} in {path} holds non-finite values ({found} of {t.numel()}); a model with it "
                "computes NaN: use an adapter saved before training diverged"
            )


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
