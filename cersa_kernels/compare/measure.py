"""Memory and backend measurements of one training step.

- Peak live tensor bytes on a CPU: `LiveTensorTracker`, a TorchDispatchMode (the allocation
  recorder of `cersa_kernels._alloc`) that keeps a weak reference to the storage of every tensor an
  op allocates and, after every op, adds up the bytes of those still alive; plus the bytes alive
  when the step began (weights, gradients, optimizer state, the batch). On a GPU:
  torch.cuda.max_memory_allocated.
- Saved activations: `SavedActivations`, saved_tensors_hooks over the step's forward, counting each
  storage once and leaving out the storages of parameters and buffers (those are weights).
- Which backend ran each cersa op: the tracker asks `backends.select_backend` for every custom op
  it sees, with the op's own tensors, as the op's dispatch does.
- Peak resident memory of the process: VmHWM, reset through /proc/self/clear_refs before training.
- Weight bytes: parameters, buffers and quantized storage that is neither (a `QuantizedTensor`
  attribute; bitsandbytes' quantization state), each storage once.
"""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .. import backends
from .._alloc import AllocationRecorder
from ..quant import QuantizedTensor


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared storage counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class LiveTensorTracker(AllocationRecorder):
    """`with LiveTensorTracker(baseline_bytes) as tracker: step()`; then `tracker.peak_bytes` (the
    most tensor bytes alive at once, baseline included) and `tracker.backends` ({op: backend})."""

    def __init__(self, baseline_bytes: int):
        super().__init__()
        self.baseline_bytes = int(baseline_bytes)
        self.peak_bytes = self.baseline_bytes
        self.backends: dict[str, str] = {}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def on_allocation(self, func, tensor: torch.Tensor) -> None:
        super().on_allocation(func, tensor)
        storage = tensor.untyped_storage()
        self._live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cersa":
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.backends[func._opname] = backends.select_backend(func._opname, tensors)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._live = {ptr: entry for ptr, entry in self._live.items() if not entry[0].expired()}
        live = self.baseline_bytes + sum(nbytes for _, nbytes in self._live.values())
        self.peak_bytes = max(self.peak_bytes, live)
        return out


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd saves for backward inside this block, without the weights' own storages."""

    def __init__(self, weights: Iterable[torch.Tensor]):
        self._exclude = {t.untyped_storage().data_ptr() for t in weights}
        self._seen: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude and storage.device.type != "meta":
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())


_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process; ru_maxrss where /proc lacks it."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def quantized_storage(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of quantized weights that are neither parameters nor buffers: the codes and absmax
    of every `QuantizedTensor` a module holds as an attribute, and bitsandbytes' quantization state
    (absmax, code table, and the nested absmax of double quantization) of every 4-bit parameter.
    (A parameter or buffer listed again is counted once by `storage_bytes`.)"""
    found = []
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, QuantizedTensor):
                found += [value.data, value.absmax]
        for p in m.parameters(recurse=False):
            state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
            while state is not None:
                found += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
                state = getattr(state, "state2", None)
    return found


def weight_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor that holds a weight of `module`: parameters, buffers and quantized storage."""
    return list(module.parameters()) + list(module.buffers()) + quantized_storage(module)


def frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """`module`'s weights that do not train (quantized storage included: it never trains)."""
    return [t for t in weight_tensors(module) if not t.requires_grad]


def frozen_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of `module`'s frozen weights."""
    return storage_bytes(frozen_tensors(module))
