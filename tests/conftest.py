"""Test setup. TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set
here, before cersa_kernels.triton is ever imported: the Triton kernels then run on CPU tensors.
(`auto` never picks the interpreter; tests ask for the triton backend by name.)"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold directory names, so a
        # checkout in a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
