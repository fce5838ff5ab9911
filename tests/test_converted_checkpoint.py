"""Convert once, load small (issue 19, item 8): `save_converted` writes a converted model as one
checkpoint, `load_converted` rebuilds it into a model built on the meta device without allocating
any dense Linear weight, its peak live tensor bytes within 1.2× the checkpoint's size."""
import json

import pytest
import torch
import transformers
from torch import nn

import cersa_kernels as ck
from cersa_kernels.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_converted, save_converted
from cersa_kernels.compare.measure import LiveTensorTracker

from registry import Net, adapted_net

HIDDEN, INTER = 64, 96


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=50, tie_word_embeddings=True,
    )


def converted(**options):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ck.apply(model, "cersa", **options)
    return model


class _Allocations(LiveTensorTracker):
    """Peak live bytes of the tensors allocated inside the block, and their shapes."""

    def __init__(self):
        super().__init__(0)
        self.shapes = []

    def on_allocation(self, func, tensor):
        if not tensor.is_meta:
            super().on_allocation(func, tensor)
            self.shapes.append(tuple(tensor.shape))


IDS = torch.tensor([[1, 5, 7, 11, 3]])


@pytest.mark.parametrize("options", [dict(energy=0.9), dict(energy=0.9, factor_format="int8", factor_group_size=32),
                                     dict(rank=24, factor_format="nf4", factor_group_size=32)])
def test_converted_llama_loads_into_a_meta_model_without_dense_weights(tmp_path, options):
    model = converted(**options)
    save_converted(model, tmp_path)
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(llama_config()).eval()
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    with _Allocations() as tracker:
        load_converted(fresh, tmp_path)
    assert tracker.peak_bytes <= 1.2 * size, (tracker.peak_bytes, size)
    dense = {(HIDDEN, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)}
    assert not dense & set(tracker.shapes)  # no dense Linear weight, not even for a moment
    assert not [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # the tie survives
    assert set(fresh.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert tracker.peak_bytes > 0.5 * size  # the tracker saw the file's tensors being read


@pytest.mark.parametrize("method", ["lora", "pica", "snell", "cersa-nf4", "pica-on-cersa", "lora-nf4"])
def test_every_method_round_trips(tmp_path, method):
    model = adapted_net(method=method)
    save_converted(model, tmp_path)
    with torch.device("meta"):
        fresh = Net()
    load_converted(fresh, tmp_path)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    if method.startswith("pica"):  # one M per role, shared again
        assert fresh.blocks[0].up.M is fresh.blocks[1].up.M
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == trainable
    fresh(x).square().mean().backward()  # it trains
    assert all(p.grad is not None for p in ck.trainable_parameters(fresh))


def test_refusals_name_the_file(tmp_path):
    save_converted(converted(energy=0.9), tmp_path)
    other = llama_config()
    other.intermediate_size = INTER + 16
    with torch.device("meta"):
        wrong = transformers.LlamaForCausalLM(other)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.(gate|up|down)_proj'.*was saved for"):
        load_converted(wrong, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["trainable"] = []
    (tmp_path / CONFIG_NAME).unlink()  # a link into the atomic layout: replace it, do not write through it
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(llama_config())
    with pytest.raises(ValueError, match=r"do not belong together"):
        load_converted(fresh, tmp_path)
    nan = converted(energy=0.9)
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.S[0, 0] = float("nan")
    save_converted(nan, tmp_path / "nan")
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(llama_config())
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.S'.*1 NaN"):
        load_converted(fresh, tmp_path / "nan")
    with pytest.raises(ValueError, match="no adapter layer"):
        save_converted(nn.Linear(2, 2), tmp_path / "plain")


def test_heads_task_and_configs_survive_the_converted_checkpoint(tmp_path):
    """What apply recorded (modules_to_save, task, its AdapterConfig) is written and restored as
    `save`/`load` do, so a later export or save of the loaded model still carries the head."""
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    ck.apply(model, "lora", rank=2, task="seq_cls")
    ck.save_converted(model, tmp_path)
    with torch.device("meta"):
        fresh = transformers.BertForSequenceClassification(config)
    load_converted(fresh, tmp_path)
    assert ck.modules_to_save(fresh) == ck.modules_to_save(model) == ["classifier"]
    assert ck.adapter_configs(fresh) == ck.adapter_configs(model)
    assert all(p.requires_grad for p in fresh.classifier.parameters())
