"""Record the tensors a call allocates, on any device, through a TorchDispatchMode.

Used by the tests (to prove that no m×n buffer appears) and by the CPU benchmarks (which have no
torch.cuda.max_memory_allocated). An allocation is an op output whose storage is none of the op's
inputs' storages: views, in-place results and copies into existing tensors are not allocations.
cersa custom ops are opaque to a dispatch mode, so the recorder runs them through the op's own
dispatch (`ops._define.run_kernel`) with itself re-entered, and the aten ops inside the kernel function are seen too. Triton
launches allocate nothing through aten (the Triton interpreter's host copies of kernel arguments go
through UntypedStorage and are not recorded: they would not exist on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops._define import run_kernel


@dataclass
class Allocation:
    op: str
    shape: tuple
    numel: int
    nbytes: int


class AllocationRecorder(TorchDispatchMode):
    """`with AllocationRecorder() as rec: fn()`; then `rec.allocations`, `rec.largest()`,
    `rec.total_bytes()` and `rec.cersa_ops` (the custom ops that ran)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []
        self.cersa_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "cersa":
            self.cersa_ops.append(func._opname)
            with self:  # the op's own dispatch (backend choice included), with this mode re-entered
                return run_kernel(func._opname, *args, *kwargs.values())
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.on_allocation(func, o)
        return out

    def on_allocation(self, func, tensor: torch.Tensor) -> None:
        """Called for each tensor an op allocates; subclasses may also keep the tensor's storage."""
        self.allocations.append(
            Allocation(str(func), tuple(tensor.shape), tensor.numel(), tensor.numel() * tensor.element_size())
        )

    def largest(self) -> Allocation:
        return max(self.allocations, key=lambda a: a.numel)

    def total_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocations)
