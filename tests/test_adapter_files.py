"""A save is one atomic commit (issue 16, item 2): whatever step of `save`, `export_peft_lora` or
`para-peft` fails (each open, write, fsync, mkdir, link and rename), and wherever a `kill -9` lands,
the directory then holds the earlier adapter or the new one, complete, never an error or a mix;
the next save removes whatever a killed one left behind."""
import builtins
import errno
import json
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import _adapter_files
from cersa_kernels.model import CONFIG_NAME, WEIGHTS_NAME
from cersa_kernels.para_peft import CONFIG_NAME as PEFT_CONFIG, WEIGHTS_NAME as PEFT_WEIGHTS

from adapter_dirs import tree

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def base():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def adapted(seed, rank):
    """A seeded LoRA model. The old and the new adapter differ in rank too, so that their configs
    differ and a mixed pair (old config, new weights) cannot pass for either."""
    model = base()
    ck.apply(model, "lora", rank=rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ck.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g))
    return model


OLD, NEW = adapted(1, rank=2), adapted(2, rank=3)
OUTPUTS = {"old": OLD(X).detach(), "new": NEW(X).detach()}


def loads_as(directory) -> str:
    """'old' or 'new': which adapter `ck.load` finds in `directory` (anything else fails the test)."""
    out = ck.load(base(), directory)(X)
    found = [name for name, expected in OUTPUTS.items() if torch.equal(out, expected)]
    assert found, "the loaded adapter is neither the old nor the new one"
    return found[0]


def visible(directory, names) -> dict:
    """What a reader that knows nothing of our layout (PEFT) finds: the bytes at the fixed names."""
    return {name: (directory / name).read_bytes() for name in names}


def peft_pair(directory):
    """The PEFT pair at the fixed names, by content (safetensors orders its metadata differently
    from one write to the next): the config, the weights' metadata and the tensors."""
    from safetensors.torch import load

    data = (directory / PEFT_WEIGHTS).read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    tensors = {k: v.tolist() for k, v in sorted(load(data).items())}
    return json.loads((directory / PEFT_CONFIG).read_text()), header.get("__metadata__"), tensors


def entries(directory) -> int:
    """How many entries the tree under `directory` holds (links not followed)."""
    return len(tree(directory))


def clean_entries(write, scratch: Path) -> int:
    """How many entries one `write(directory)` into a new directory leaves: the clean layout."""
    write(scratch)
    return entries(scratch)


# --- a failure injected at every step --------------------------------------------------------------

DISK_CALLS = ("open", "write", "fsync", "mkdir", "rename", "replace", "symlink", "link", "unlink", "rmdir")


class FailAt:
    """While active, counts every call of the os functions that change the disk (and builtins.open)
    and raises OSError(EIO) at call number `at` (None: never): a disk error at exactly that step."""

    def __init__(self, monkeypatch, at=None):
        self.monkeypatch, self.at, self.calls = monkeypatch, at, []

    def wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) == self.at:
                raise OSError(errno.EIO, f"injected failure at step {self.at} ({name})")
            return real(*args, **kwargs)

        return call

    def run(self, fn, *args, **kwargs):
        with self.monkeypatch.context() as patch:
            for name in DISK_CALLS:
                patch.setattr(os, name, self.wrap(name, getattr(os, name)))
            patch.setattr(builtins, "open", self.wrap("builtins.open", builtins.open))
            return fn(*args, **kwargs)


def plain_copy(pair: dict, directory: Path) -> Path:
    """The two files as plain files (an older cersa_kernels, PEFT's save_pretrained, or `cp`)."""
    directory.mkdir()
    for name, data in pair.items():
        (directory / name).write_bytes(data)
    return directory


def inject_everywhere(monkeypatch, tmp_path, make_old, write_new, check):
    """For each step i of `write_new(directory)`, on a fresh copy of the old state (`make_old`):
    fail at i, `check` the directory (returns 'old' or 'new'), then save again and expect the new
    adapter and no leftovers. Returns the outcomes of the steps whose failure failed the write, and
    the calls counted."""
    dry = make_old(tmp_path / "dry")
    counter = FailAt(monkeypatch)
    counter.run(write_new, dry)
    steps = len(counter.calls)
    assert steps >= 8, counter.calls  # files, fsyncs, the commit: a real sequence was counted
    clean = clean_entries(write_new, tmp_path / "clean")
    outcomes = []
    for at in range(1, steps + 1):
        directory = make_old(tmp_path / f"at-{at}")
        try:
            FailAt(monkeypatch, at).run(write_new, directory)
        except OSError as error:
            assert error.errno == errno.EIO, error
            outcomes.append(check(directory))
        else:  # a failure the writer may absorb (removing garbage, a hard link it can copy instead)
            assert check(directory) == "new", (at, counter.calls[at - 1])
        write_new(directory)  # the next save completes and removes what the failed one left
        assert check(directory) == "new", at
        assert entries(directory) == clean, (at, counter.calls[at - 1], sorted(os.walk(directory)))
    return outcomes, counter.calls


@pytest.mark.parametrize("layout", ["ours", "plain"])
def test_save_failing_at_any_step_leaves_the_old_or_the_new_adapter(layout, monkeypatch, tmp_path):
    def make_old(directory):
        ck.save(OLD, directory)
        if layout == "plain":  # the same two files, written as plain files
            pair = visible(directory, [CONFIG_NAME, WEIGHTS_NAME])
            return plain_copy(pair, directory.with_name(directory.name + "-plain"))
        return directory

    outcomes, calls = inject_everywhere(monkeypatch, tmp_path, make_old, lambda d: ck.save(NEW, d), loads_as)
    assert "old" in outcomes and "new" in outcomes, outcomes  # failures before and after the commit point
    # once the new adapter is visible, no later failure takes it away again
    assert outcomes == sorted(outcomes, key=["old", "new"].index), (calls, outcomes)


@pytest.mark.parametrize("writer", ["export_peft_lora", "para_peft"])
def test_peft_output_failing_at_any_step_is_the_old_or_the_new_pair(writer, monkeypatch, tmp_path):
    """PEFT reads `adapter_config.json` and `adapter_model.safetensors` straight from the directory:
    at every step those two paths hold one whole pair, the old or the new."""
    from cersa_kernels.para_peft import para_peft

    names = [PEFT_CONFIG, PEFT_WEIGHTS]
    ck.export_peft_lora(OLD, tmp_path / "old-export")
    ck.export_peft_lora(NEW, tmp_path / "new-export")
    if writer == "export_peft_lora":
        write_new = lambda d: ck.export_peft_lora(NEW, d)  # noqa: E731
        old = tmp_path / "old-export"
    else:
        write_new = lambda d: para_peft(tmp_path / "new-export", d, energy=0.99)  # noqa: E731
        para_peft(tmp_path / "old-export", tmp_path / "old-para", energy=0.99)
        old = tmp_path / "old-para"
    write_new(tmp_path / "new")
    pairs = {"old": peft_pair(old), "new": peft_pair(tmp_path / "new")}
    assert pairs["old"][0] != pairs["new"][0]  # the configs differ: a mixed pair would be neither

    def make_old(directory):
        return plain_copy(visible(old, names), directory)

    def check(directory):
        found = [name for name, pair in pairs.items() if peft_pair(directory) == pair]
        assert found, "the directory holds neither the old nor the new PEFT pair"
        return found[0]

    outcomes, _ = inject_everywhere(monkeypatch, tmp_path, make_old, write_new, check)
    assert "old" in outcomes and "new" in outcomes, outcomes


def test_peft_loads_the_committed_pair(tmp_path):
    """What PEFT itself loads from our layout is the adapter we exported, and is the new one after
    the next export."""
    import peft  # a required test dependency: imported, never skipped

    directory = tmp_path / "peft"
    for model in (OLD, NEW):
        ck.export_peft_lora(model, directory)
        loaded = peft.PeftModel.from_pretrained(base(), directory)
        y = model(X)
        # fp32 sums in another order (PEFT's x·Wᵀ + s·(x·Aᵀ)·Bᵀ against our fused op): float
        # tolerance relative to the output's size; a wrong pair is off by O(1)
        torch.testing.assert_close(loaded(X), y, atol=1e-5 * float(y.abs().max()), rtol=1e-4)


# --- kill -9 ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_at_random_points_of_a_save_loop(tmp_path):
    """A child process saves OLD and NEW in turn into one directory until it is killed (SIGKILL) at
    a seeded random moment; 30 times. After every kill the directory loads as OLD or NEW; the next
    save leaves nothing of the killed ones behind.

    The child is forked, so it starts at once, and it runs the disk part of `save` alone
    (`write_files_atomically` with the bytes `save` wrote for OLD and NEW): a forked child must not
    run torch code (a thread pool of the parent may hold a lock), and serialising is in memory,
    where a kill changes nothing on disk."""
    names = [CONFIG_NAME, WEIGHTS_NAME]
    pairs = []
    for model in (NEW, OLD):
        ck.save(model, tmp_path / "pair")
        pairs.append(visible(tmp_path / "pair", names))
    directory = tmp_path / "adapter"
    clean = clean_entries(lambda d: ck.save(OLD, d), tmp_path / "clean")
    ck.save(OLD, directory)
    began = time.perf_counter()
    _adapter_files.write_files_atomically(directory, pairs[0])
    one_save = time.perf_counter() - began
    rng = random.Random(16)
    interrupted, saves = 0, 0
    start = time.monotonic()
    for _ in range(30):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save until killed, one byte down the pipe per completed save
            try:
                os.close(read)
                for i in range(10**9):
                    _adapter_files.write_files_atomically(directory, pairs[i % 2])
                    os.write(write, b".")
            finally:
                os._exit(1)
        os.close(write)
        # from the child's first completed save on (a loaded machine may start it late), a random
        # moment within the next few saves
        ready, _, _ = select.select([read], [], [], 30.0)
        time.sleep(rng.uniform(0.0, 3 * one_save) if ready else 0.0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            saves += len(pipe.read())
        interrupted += entries(directory) > clean
        loads_as(directory)  # OLD or NEW, complete
    assert time.monotonic() - start < 45, time.monotonic() - start
    assert saves >= 30 and interrupted > 0, (saves, interrupted)  # every child saved, and kills landed inside saves
    ck.save(NEW, directory)
    assert entries(directory) == clean
    assert loads_as(directory) == "new"


def test_next_save_removes_temporaries_of_older_versions(tmp_path):
    """Before this layout a killed save left `.<name>.<pid>.<hex>.tmp` files: the next save removes them."""
    directory = tmp_path / "adapter"
    clean = clean_entries(lambda d: ck.save(OLD, d), tmp_path / "clean")
    ck.save(OLD, directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (directory / f".{name}.1234.abcd0123.tmp").write_bytes(b"partial")
    (directory / "notes.txt").write_text("a user's own file stays")
    ck.save(NEW, directory)
    assert entries(directory) == clean + 1  # and notes.txt
    assert (directory / "notes.txt").read_text() == "a user's own file stays"
    assert loads_as(directory) == "new"


def test_without_symbolic_links_the_files_are_renamed_into_place(tmp_path, monkeypatch):
    """Where the platform has no symbolic links (Windows) the two files are renamed into place one
    after the other, as documented; the pair is still complete after a successful save."""
    monkeypatch.setattr(_adapter_files, "LINKED_LAYOUT", False)
    ck.save(OLD, tmp_path)
    ck.save(NEW, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert not any(os.path.islink(p) for p in tmp_path.iterdir())
    assert loads_as(tmp_path) == "new"
