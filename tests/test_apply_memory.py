"""`apply` never holds two copies of the model (issue 19, item 4), counted in tensor bytes.

Every storage alive during `apply` is tracked: the model's own at the start (by weak reference, so
the moment `apply` drops an original weight is seen) and every tensor an op allocates inside
(`LiveTensorTracker`, a TorchDispatchMode). LAPACK's own SVD workspace is not a torch tensor and is
not seen; the SVD's outputs are. The bounds are a few layers, the model has 8 layers, so a copy of
the model (the earlier `copy_` of every base weight) or a conversion that keeps every dense weight
until the last layer is built fails them.
"""
import gc

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import cersa_kernels as ck
from cersa_kernels.compare.measure import LiveTensorTracker

LAYERS, D = 8, 96


class _AllStorages(LiveTensorTracker):
    """LiveTensorTracker that also follows storages that existed before the block (the model's)."""

    def __init__(self, tensors):
        super().__init__(0)
        for t in tensors:
            storage = t.untyped_storage()
            self._live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.start = sum(n for _, n in self._live.values())
        self.peak_bytes = self.start

    def on_allocation(self, func, tensor):
        if not tensor.is_meta:  # a layer built on the meta device first holds no memory
            super().on_allocation(func, tensor)


@pytest.fixture(autouse=True, scope="module")
def _warm_up():
    """The first op under a dispatch mode imports parts of torch lazily, and a frame of that import
    (kept by a reference cycle until the next gc) would hold the layer being converted: warm up once."""
    with _AllStorages([]):
        ck.apply(nn.Sequential(nn.Linear(8, 8)), "cersa", rank=2)
    gc.collect()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(D, D) for _ in range(LAYERS)])


def _tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _measure(method, keep_originals=False, **options):
    """(start, peak, end) live tensor bytes around `ck.apply(model, method, **options)`;
    `keep_originals` holds the original layers until apply returns (what an apply that builds every
    layer before it swaps any in does)."""
    model = _model()
    kept = list(model) if keep_originals else []
    gc.collect()
    with _AllStorages(list(model.parameters())) as tracker:
        ck.apply(model, method, **options)
        kept.clear()
    gc.collect()
    return tracker.start, tracker.peak_bytes, _tensor_bytes(model)


def _one_layer_peak(method, **options):
    """Peak live bytes of converting ONE layer of the model alone, above its dense weight: the most
    a layer-by-layer apply may add over the larger of the model before and after."""
    model = nn.Sequential(_model()[0])
    gc.collect()
    with _AllStorages(list(model.parameters())) as tracker:
        ck.apply(model, method, **options)
    return tracker.peak_bytes - tracker.start


LAYER_BYTES = D * D * 4

CASES = [
    ("lora", dict(rank=4)), ("snell", dict(rank=4, sparsity=0.5)), ("pica", dict(rank=4)),
    ("lora", dict(rank=4, base_format="int8")), ("pica", dict(rank=4, base_format="nf4")),
    # factors bigger than the dense weight (k(m+n+k) > mn at k = 80 of 96): holding every dense
    # weight until the last factors exist would peak near start + end
    ("cersa", dict(rank=80)), ("cersa", dict(rank=80, factor_format="int8")), ("cersa", dict(rank=16)),
]


@pytest.mark.parametrize("method,options", CASES)
def test_apply_adds_at_most_one_layer_s_conversion(method, options):
    """Peak − max(before, after) ≤ what converting one layer alone adds (+1% of the model for the
    bookkeeping): the model is never held twice, a dense weight is freed as its layer is built."""
    start, peak, end = _measure(method, **options)
    one = _one_layer_peak(method, **options)
    assert peak - max(start, end) <= one + 0.01 * start, (start, peak, end, one)


@pytest.mark.parametrize("method,options", [c for c in CASES if c[0] == "cersa" or "base_format" in c[1]])
def test_the_bound_fails_when_the_originals_stay_alive(method, options):
    """The check above can fail: the same apply with every original layer held until it returns
    (so no dense weight is freed early) exceeds it."""
    start, peak, end = _measure(method, keep_originals=True, **options)
    one = _one_layer_peak(method, **options)
    assert peak - max(start, end) > one + 0.01 * start, (start, peak, end, one)


@pytest.mark.parametrize("method,options", CASES[:3])
def test_frozen_base_is_shared_not_copied(method, options):
    """LoRA, SNELL and PiCa keep the model's own weights: the rise is the adapters (PiCa: and P,
    from one SVD per layer, alive one at a time)."""
    start, peak, end = _measure(method, **options)
    adapters = end - start
    assert adapters < 0.25 * start
    transient = 3 * LAYER_BYTES if method == "pica" else 0
    assert peak - start <= adapters + 0.05 * start + transient, (start, peak, end)


def test_the_base_weight_is_the_original_storage():
    model = _model()
    ptrs = [layer.weight.data_ptr() for layer in model]
    ck.apply(model, "lora", rank=4)
    assert [layer.weight.data_ptr() for layer in model] == ptrs
    assert all(not layer.weight.requires_grad for layer in model)


def test_gpt2_conv1d_weights_are_viewed_not_copied():
    """A GPT-2 Conv1D (in, out) weight becomes the adapter's (out, in) weight as a transposed view
    of the same storage; the converted model computes what it did."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=16))
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).last_hidden_state
    ptrs = {n: m.weight.untyped_storage().data_ptr() for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    ck.apply(model, "lora", rank=2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ck.LoraLinear)}
    assert set(layers) == set(ptrs)
    assert all(layers[n].weight.untyped_storage().data_ptr() == ptr for n, ptr in ptrs.items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, before)  # B = 0: step 0 is the model


@pytest.mark.parametrize("method", ["lora", "snell"])
def test_reset_parameters_never_writes_into_the_original_storage(method):
    """The base weight (and bias) are the original layer's storage after from_linear: a later
    reset_parameters (meta-device or FSDP init flows call it) draws fresh tensors instead of
    overwriting the original model's values."""
    torch.manual_seed(0)
    original = nn.Linear(24, 20)
    kept = (original.weight.detach().clone(), original.bias.detach().clone())
    layer = ck.nn.method_classes()[method].from_linear(original, rank=4)
    assert layer.weight.data_ptr() == original.weight.data_ptr()
    layer.reset_parameters()
    assert torch.equal(original.weight, kept[0]) and torch.equal(original.bias, kept[1])
    assert not torch.equal(layer.weight, kept[0])


def test_a_base_weight_of_the_wrong_shape_leaves_the_weight_as_it_was():
    """A state dict bringing W0 gives the layer a tensor of its own before torch copies into it;
    when torch refuses the shape, the layer keeps its (the original's) values, not fresh memory."""
    torch.manual_seed(0)
    original = nn.Linear(24, 20)
    layer = ck.LoraLinear.from_linear(original, rank=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.ones(20, 23)}, strict=False)
    assert layer.weight.data_ptr() == original.weight.data_ptr()
    assert torch.equal(layer.weight, original.weight)
