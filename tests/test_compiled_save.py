"""Saving what users hold: a `torch.compile`d model saves under its original names (no `_orig_mod.`
prefix) and loads into a fresh, uncompiled model; a model with no adapter layer is refused rather
than written whole as an "adapter"."""
import pytest
import torch
from torch import nn

import cersa_kernels as ck


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def test_a_compiled_model_saves_under_its_original_names(tmp_path):
    model = _model()
    ck.apply(model, "lora", target_modules=["0", "2"], rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    compiled = torch.compile(model)  # wraps lazily: nothing compiles until it is called
    ck.save(compiled, tmp_path)
    fresh = _model()
    assert ck.load(fresh, tmp_path) is fresh
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x))
    # and into a compiled fresh model, which is returned as given
    wrapped = torch.compile(_model())
    assert ck.load(wrapped, tmp_path) is wrapped
    torch.testing.assert_close(wrapped._orig_mod(x), model(x))


def test_a_model_without_adapters_is_not_saved_as_one(tmp_path):
    with pytest.raises(ValueError, match="no adapter layer"):
        ck.save(_model(), tmp_path)
    assert not any(tmp_path.iterdir())
