"""`load` refuses what would give silently wrong results (issue 16, items 4-7), for every method of
the test registry, with one line naming the layer (or tensor), the file and both values: an adapter
saved in another dtype (4), over a Linear with another bias (5), holding non-finite values (6), or
holding a tensor its config does not declare, such as a frozen base weight (7). Each refusal leaves
the model as it was."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cersa_kernels as ck
from cersa_kernels.model import CONFIG_NAME, WEIGHTS_NAME, write_adapter

from registry import METHODS, STACKS, apply, case_of, method_of

EVERY = sorted(METHODS) + sorted(STACKS)
WITH_BASE_KEYS = [m for m in EVERY if case_of(m).under is None and method_of(m) != "cersa"]  # LoRA, PiCa, SNELL keep W0


class Small(nn.Module):
    """Two Linear layers (roles `a` and `b`) and a head, seeded, in `dtype`, with or without bias."""

    def __init__(self, bias=True, dtype=torch.float32, seed=3):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(16, 16, bias=bias)
        self.b = nn.Linear(16, 16, bias=bias)
        self.head = nn.Linear(16, 4)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def saved(tmp_path, method, **model_options):
    """`method` applied to a Small (not its head), perturbed (seeded), saved; returns the directory."""
    model = Small(**model_options)
    apply(model, method, exclude_modules=["head"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ck.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    directory = tmp_path / method
    ck.save(model, directory)
    return directory


def state(model):
    return {name: id(m) for name, m in model.named_modules()}, {
        name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()
    }


def refused(model, directory, *fragments) -> str:
    """`ck.load` raises one line holding every fragment, and leaves `model` as it was."""
    (modules, params) = state(model)
    with pytest.raises(ValueError) as info:
        ck.load(model, directory)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert {name: id(m) for name, m in model.named_modules()} == modules
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name][0]) and p.requires_grad == params[name][1], name
    return message


def rewritten(directory, edit_tensors=None, edit_config=None):
    """The saved pair with its tensors and/or config edited, written back with fingerprints that
    match (anyone can recompute them: what the fingerprints cannot refuse, load must)."""
    config = json.loads((directory / CONFIG_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    write_adapter(directory, config, tensors)
    return directory


# --- item 4: another dtype ---------------------------------------------------------------------------

@pytest.mark.parametrize("saved_dtype,model_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-into-fp32", "fp32-into-bf16"])
@pytest.mark.parametrize("method", EVERY)
def test_adapter_saved_in_another_dtype_is_refused(method, saved_dtype, model_dtype, tmp_path):
    directory = saved(tmp_path, method, dtype=saved_dtype)
    name = lambda dtype: str(dtype).replace("torch.", "")  # noqa: E731
    refused(Small(dtype=model_dtype), directory, "layer 'a'", str(directory), name(saved_dtype), name(model_dtype))


def test_same_dtype_still_loads_and_runs(tmp_path):
    for method in EVERY:
        directory = saved(tmp_path, method, dtype=torch.bfloat16)
        model = ck.load(Small(dtype=torch.bfloat16), directory)
        assert model(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- item 5: another bias ----------------------------------------------------------------------------

@pytest.mark.parametrize("saved_bias", [True, False], ids=["bias-into-no-bias", "no-bias-into-bias"])
@pytest.mark.parametrize("method", EVERY)
def test_adapter_saved_over_another_bias_is_refused(method, saved_bias, tmp_path):
    directory = saved(tmp_path, method, bias=saved_bias)
    refused(Small(bias=not saved_bias), directory, "layer 'a'", f"bias={saved_bias}", f"bias={not saved_bias}",
            str(directory))


# --- item 6: non-finite values -------------------------------------------------------------------------

def first_adapter_tensor(tensors) -> str:
    """The first saved tensor of layer `a` that is floating point (a factor, a core, M, ...)."""
    return next(k for k, t in tensors.items() if k.startswith("a.") and t.is_floating_point() and t.numel() > 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", EVERY)
def test_non_finite_tensor_is_refused_naming_it(method, value, tmp_path):
    directory = saved(tmp_path, method)
    key = first_adapter_tensor(load_file(str(directory / WEIGHTS_NAME)))

    def poison(tensors):
        tensors[key].view(-1)[1] = value

    rewritten(directory, poison)
    refused(Small(), directory, repr(key), str(directory / WEIGHTS_NAME), "NaN" if value != value else "infinite")


# --- item 7: only the declared tensors -------------------------------------------------------------------

@pytest.mark.parametrize("method", EVERY)
def test_undeclared_base_weight_in_the_file_is_refused(method, tmp_path):
    """A hand-edited file that adds `a.weight` (LoRA's, PiCa's, SNELL's frozen W0; no CERSA tensor)
    must not overwrite the model's weight: the layer's config does not declare it as saved."""
    directory = saved(tmp_path, method)

    def add_weight(tensors):
        tensors["a.weight"] = torch.full((16, 16), 7.0)

    rewritten(directory, add_weight)
    refused(Small(), directory, "layer 'a'", "'weight'", str(directory / WEIGHTS_NAME))


@pytest.mark.parametrize("method", WITH_BASE_KEYS)
def test_trained_base_tensor_is_loaded_when_declared(method, tmp_path):
    """The rule is the config's declaration, not the name: a bias saved because it trained (listed
    in the layer's trainable names) loads, and one not listed is refused."""
    directory = saved(tmp_path, method)
    bias = torch.arange(16.0)

    def add_bias(tensors):
        tensors["a.bias"] = bias

    def declare(config):
        config["layers"]["a"]["trainable"].append("bias")

    rewritten(directory, add_bias)
    refused(Small(), directory, "layer 'a'", "'bias'")
    rewritten(directory, edit_config=declare)
    model = ck.load(Small(), directory)
    assert torch.equal(model.a.bias.detach(), bias) and model.a.bias.requires_grad


def test_declared_tensor_missing_from_the_file_is_refused(tmp_path):
    directory = saved(tmp_path, "lora")
    rewritten(directory, edit_config=lambda config: config["layers"]["a"]["trainable"].append("bias"))
    refused(Small(), directory, "layer 'a'", "'bias'", str(directory / WEIGHTS_NAME))


def test_top_level_parameter_inside_a_saved_layer_is_refused(tmp_path):
    """The top-level trainable list names parameters outside the adapter layers (a head): a file
    that lists the frozen weight of a saved layer there is refused, not copied, whether or not the
    layer's own entry declares it too."""
    directory = saved(tmp_path, "lora")

    def add_weight(tensors):
        tensors["b.weight"] = torch.full((16, 16), 7.0)

    def declare_at_top(config):
        config["trainable"].append("b.weight")

    def declare_in_layer(config):
        config["layers"]["b"]["trainable"].append("weight")

    rewritten(directory, add_weight, declare_at_top)
    refused(Small(), directory, "layer 'b'", "'weight'")
    rewritten(directory, edit_config=declare_in_layer)
    refused(Small(), directory, "'b.weight' is inside the saved layer 'b'")


def test_top_level_tensor_not_declared_is_refused(tmp_path):
    directory = saved(tmp_path, "lora")

    def add_head(tensors):
        tensors["head.weight"] = torch.full((4, 16), 7.0)

    rewritten(directory, add_head)
    refused(Small(), directory, "'head.weight'", str(directory / WEIGHTS_NAME))
