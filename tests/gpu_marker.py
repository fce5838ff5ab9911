"""The one rule for `@pytest.mark.gpu`, shared by tests/conftest.py and benchmarks/conftest.py:
without a CUDA GPU those items skip cleanly."""
import pytest
import torch


def skip_gpu_items_without_a_gpu(items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold directory names, so a
        # checkout in a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
