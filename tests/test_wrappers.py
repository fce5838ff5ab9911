"""save, load, merge, export_peft_lora and trainable_parameters see through the wrappers a training
script puts around a model: DistributedDataParallel and FSDP2's fully_shard (one gloo process on
CPU, world_size=1), torch.compile's OptimizedModule; every layer error names the layer's path."""
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import fully_shard

import cersa_kernels as ck


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """One gloo process (world_size=1) over a FileStore: what DDP and FSDP need, without a network."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build(method="lora"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    options = dict(rank=2) if method == "lora" else dict(energy=0.9)
    ck.apply(model, method, **options)
    return model


def step(model, wrapped):
    """One seeded training step through the wrapper."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=g)
    opt = torch.optim.SGD(ck.trainable_parameters(wrapped), lr=0.5)
    wrapped(x).square().mean().backward()
    opt.step()
    return x


def same_files(a, b):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["lora", "cersa"])
def test_ddp(process_group, tmp_path, method):
    model = build(method)
    ddp = nn.parallel.DistributedDataParallel(model)
    x = step(model, ddp)
    assert ck.trainable_parameters(ddp) == ck.trainable_parameters(model)
    assert ck.trainable_parameters(ddp, weight_decay=0.1) == ck.trainable_parameters(model, weight_decay=0.1)
    ck.save(ddp, tmp_path / "ddp")
    config = json.loads((tmp_path / "ddp" / "cersa_config.json").read_text())
    assert sorted(config["layers"]) == ["0", "2"]  # no "module." prefix
    fresh = ck.load(nn.Sequential(*_originals()), tmp_path / "ddp")
    assert torch.equal(fresh(x), model(x))
    ck.export_peft_lora(ddp, tmp_path / "ddp_peft")
    ck.export_peft_lora(model, tmp_path / "inner_peft")
    same_files(tmp_path / "ddp_peft", tmp_path / "inner_peft")
    expected = model(x).detach()
    assert ck.merge(ddp) is ddp and not ck.adapter_layers(model)
    # (the merged model is run bare: DDP would sync the parameters it was built over, gone with CERSA's U, V)
    torch.testing.assert_close(ddp.module(x), expected, rtol=1e-5, atol=1e-5)


def _originals():
    torch.manual_seed(0)
    return [nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)]


def test_load_into_ddp_warns(process_group, tmp_path):
    model = build()
    ck.save(model, tmp_path)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*_originals()))
    with pytest.warns(UserWarning, match="wrap the loaded model again"):
        ck.load(ddp, tmp_path)
    assert set(ck.adapter_layers(ddp.module)) == {"0", "2"}


def test_fsdp2(process_group, tmp_path):
    model = build()
    reference = build()
    fully_shard(model)
    x = step(model, model)
    step(reference, reference)  # the same step unsharded: world_size=1 shards nothing away
    names = [n for n, _ in model.named_parameters()]
    assert "0.lora_A" in names  # fully_shard keeps the module and its names
    assert [id(p) for p in ck.trainable_parameters(model)] == [id(p) for p in model.parameters() if p.requires_grad]
    ck.save(model, tmp_path / "fsdp")
    loaded = ck.load(nn.Sequential(*_originals()), tmp_path / "fsdp")
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-6, atol=1e-6)
    ck.export_peft_lora(model, tmp_path / "fsdp_peft")
    ck.export_peft_lora(reference, tmp_path / "ref_peft")
    ta, tb = load_file(tmp_path / "fsdp_peft" / "adapter_model.safetensors"), load_file(tmp_path / "ref_peft" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-6, atol=1e-6)
    assert type(model[0].lora_A).__name__ == "DTensor"  # resharded after the export
    with pytest.raises(ValueError, match="sharded by FSDP2.*merge a plain copy"):
        ck.merge(model)
    with pytest.raises(ValueError, match="sharded by FSDP2.*load into the plain model"):
        ck.load(model, tmp_path / "fsdp")


def test_compiled_model_goes_through_every_call(tmp_path):
    model = build()
    compiled = torch.compile(model)  # wrapping only: nothing here runs the compiled forward
    assert ck.trainable_parameters(compiled) == ck.trainable_parameters(model)
    ck.save(compiled, tmp_path / "c")
    assert sorted(json.loads((tmp_path / "c" / "cersa_config.json").read_text())["layers"]) == ["0", "2"]
    with torch.no_grad():
        model[0].lora_B.normal_()
    ck.export_peft_lora(compiled, tmp_path / "cp")
    ck.export_peft_lora(model, tmp_path / "mp")
    same_files(tmp_path / "cp", tmp_path / "mp")
    assert ck.merge(compiled) is compiled and not ck.adapter_layers(model)


def test_save_without_adapters_raises(tmp_path):
    with pytest.raises(ValueError, match="no adapter layer"):
        ck.save(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method,options", [("lora", dict(rank=8)), ("cersa", dict(rank=8)), ("pica", dict(rank=8))])
def test_rank_errors_name_the_layer(method, options):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match=rf"apply\(method='{method}'\).*\b2\b.*rank must be in \[1, .*2\], got 8"):
        ck.apply(model, method, **options)
    assert isinstance(model[2], nn.Linear)  # nothing replaced


def test_fsdp1_is_unwrapped_and_its_flat_parameters_are_refused_clearly(process_group, tmp_path):
    """The legacy FullyShardedDataParallel on CPU: save sees through it (no `_fsdp_wrapped_module.`
    prefix). With use_orig_params=True it hands our op views of one flat parameter that require
    grad, frozen W included; the op refuses that, naming the layer, instead of dropping W's
    gradient silently (docs/usage.md: train under FSDP2)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = build()
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    ck.save(wrapped, tmp_path / "fsdp1")
    config = json.loads((tmp_path / "fsdp1" / "cersa_config.json").read_text())
    assert sorted(config["layers"]) == ["0", "2"]
    with pytest.raises(ValueError, match="0: W is frozen and gets no gradient, but requires_grad is set on it"):
        wrapped(torch.randn(6, 16))
