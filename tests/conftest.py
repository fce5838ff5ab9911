"""Test setup. TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set
here, before cersa_kernels.triton is ever imported: the Triton kernels then run on CPU tensors.
(`auto` never picks the interpreter; tests ask for the triton backend by name.)

Every test starts from the same global state (seeds, default dtype, deterministic flags, grad
mode, environment) and whatever it changes is put back, so the order tests run in never matters:
`pytest --test-order=reverse` or `--test-order=shuffle:SEED` checks exactly that."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from gpu_marker import skip_gpu_items_without_a_gpu  # noqa: E402

# One hypothesis profile for every property test: a fixed example sequence (derandomize) and no
# per-example deadline (the Triton interpreter's first call of a kernel is slow).
settings.register_profile("cersa", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("cersa")


def pytest_addoption(parser):
    parser.addoption(
        "--test-order",
        default="collected",
        help="run the collected tests in order 'collected' (default), 'reverse' or 'shuffle:SEED' "
        "(a fixed permutation): the suite must pass in every order",
    )


def reorder(items: list, order: str) -> None:
    """Reorder `items` in place: 'collected', 'reverse' or 'shuffle:SEED' (deterministic per SEED)."""
    if order == "collected":
        return
    if order == "reverse":
        items.reverse()
        return
    kind, _, seed = order.partition(":")
    if kind != "shuffle" or not seed.lstrip("-").isdigit():
        raise pytest.UsageError(f"--test-order must be 'collected', 'reverse' or 'shuffle:SEED', got {order!r}")
    random.Random(int(seed)).shuffle(items)


def pytest_collection_modifyitems(config, items):
    reorder(items, config.getoption("--test-order"))
    skip_gpu_items_without_a_gpu(items)


@pytest.fixture(autouse=True)
def _seed():
    """Seed every generator a test may draw from without one of its own."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Put back the process-wide settings a test may change (a leak would make tests order-dependent)."""
    env = dict(os.environ)
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    grad = torch.is_grad_enabled()
    threads = torch.get_num_threads()
    yield
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
