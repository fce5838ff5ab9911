"""What a launch on a GPU must not get wrong, checked on CPU where it can be (issue: one GPU lease
verifies every kernel): the device a kernel runs on, and host synchronisations per step."""
import contextlib

import pytest
import torch

from cersa_kernels.backends import use_backend
from cersa_kernels.ops import _define, snell_linear
from cersa_kernels.triton import snell as tl_snell


class _OnDevice:
    """Stands for a CUDA operand on a CPU machine: the guard reads only `.device`."""

    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_every_op_launches_under_a_guard_for_its_operands_device():
    guard = _define.device_guard([torch.ones(2), _OnDevice(1)])
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built, not entered: no CUDA call
    assert isinstance(_define.device_guard([torch.ones(2)]), contextlib.nullcontext)


def test_the_dispatch_enters_the_guard(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording(tensors):
        entered.append([tuple(t.shape) for t in tensors])
        yield

    monkeypatch.setattr(_define, "device_guard", recording)
    from cersa_kernels.ops import lowrank_linear

    x, V, S, U = torch.randn(3, 5), torch.randn(5, 2), torch.randn(2, 2), torch.randn(4, 2)
    lowrank_linear(x, V, S, U)
    assert entered and (3, 5) in entered[0]


def test_snell_coefficients_are_made_once_per_device():
    """torch.tensor(list, device=cuda) is a synchronising host-to-device copy: made once, reused."""
    a = tl_snell._coeffs([0.1, -0.1], "cpu")
    assert tl_snell._coeffs((0.1, -0.1), torch.device("cpu")) is a
    assert tl_snell._coeffs([0.2, -0.1], "cpu") is not a


@pytest.mark.gpu
def test_a_snell_training_step_never_synchronises_the_host():
    x = torch.randn(64, 96, device="cuda")
    W0, bias = torch.randn(80, 96, device="cuda"), torch.randn(80, device="cuda")
    A = torch.randn(2, 96, 4, device="cuda", requires_grad=True)
    B = torch.randn(2, 80, 4, device="cuda", requires_grad=True)
    with use_backend("triton"):
        snell_linear(x, W0, bias, A, B, (0.1, -0.1), 0.5).sum().backward()  # warm: compiles, caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            snell_linear(x, W0, bias, A, B, (0.1, -0.1), 0.5).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_operands_on_the_second_gpu_run_there():
    from cersa_kernels.ops import lowrank_linear

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x, V, S, U = (torch.randn(s, device=dev) for s in ((37, 130), (130, 45), (45, 45), (77, 45)))
    with use_backend("triton"):
        y = lowrank_linear(x, V, S, U)
    torch.testing.assert_close(y, ((x @ V) @ S.T) @ U.T, rtol=2e-3, atol=2e-3)
