"""What every method of the registry (registry.METHODS, and the STACKS of one method over another)
must satisfy on a small model: torch.compile(fullgraph=True) forward + backward equal to eager with
no graph break, autocast keeping trainable tensors and their gradients in fp32, and
train -> save -> load -> merge reproducing the outputs. The same concerns on Hugging Face models
are test_model.py's and test_training_stacks.py's, over the same registry."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import cersa_kernels as ck

from registry import METHODS, STACKS, adapted_net, case_of, grads, layer_class, library_methods

EVERY = sorted(METHODS) + sorted(STACKS)


def test_every_library_method_has_a_registry_entry():
    assert library_methods() == sorted(METHODS)


@pytest.mark.parametrize("method", EVERY)
def test_torch_compile_fullgraph_of_an_adapted_model(method):
    case = case_of(method)
    options = dict(case.options, train_bias=True) if case.train_bias else None
    net = adapted_net(method=method, options=options)
    x = torch.randn(4, 7, 32, requires_grad=True)
    expected = grads(net, x) + [x.grad.clone()]
    trainable = ck.trainable_parameters(net)
    assert not case.train_bias or any(p.ndim == 1 for p in trainable)  # a trained bias is in the graph
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, fullgraph=True)
    x.grad = None
    net.zero_grad()
    compiled(x).square().mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    for g, e in zip([p.grad for p in trainable] + [x.grad], expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", EVERY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_trainable_tensors_and_their_gradients_in_fp32(dtype, method):
    # SNELL's mask is discontinuous: half-precision A, B move |K| values near τ across it, which
    # changes those gradient entries outright. Compared there without sparsification.
    net = adapted_net(method=method, options=case_of(method).autocast_options)
    x = torch.randn(4, 7, 32)
    expected = grads(net, x)
    net.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        y = net(x)
        assert net.blocks[0].up(x).dtype == dtype
    y.float().square().mean().backward()
    for p, e in zip(ck.trainable_parameters(net), expected):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        # half-precision activations: a few % of the gradient's scale
        torch.testing.assert_close(p.grad, e, atol=0.05 * float(e.abs().max()), rtol=0.05)


@pytest.mark.parametrize("method", EVERY)
def test_train_save_load_merge_round_trip(method, tmp_path):
    net = adapted_net(method=method)
    torch.manual_seed(0)
    original = type(net)()  # the base weights as a user reloads them: same seed as adapted_net's
    assert all(isinstance(net.blocks[i].up, layer_class(method)) for i in range(2))
    trainable = ck.trainable_parameters(net)
    assert len(trainable) == case_of(method).trainable(
        [{"name": f"blocks.{i}.{role}"} for i in range(2) for role in ("up", "down")]
    )
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(6, 32, generator=g), torch.randn(6, 8, generator=g)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), target).backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))  # every trainable tensor moved
    with torch.no_grad():
        expected = net(x)
    ck.save(net, tmp_path)
    fresh = ck.load(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
        merged = ck.merge(net)
        assert not any(isinstance(m, ck.nn.AdapterLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-4)
