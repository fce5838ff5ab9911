"""export_peft_lora: CERSA, PiCa and LoRA updates written as a PEFT LoRA adapter over the original
weights, loaded by the real `peft` package, against W0 + ΔW computed by hand; PiCa over CERSA
through the whole-model API."""
import copy
import json
import os

import peft
import pytest
import torch
import transformers

import cersa_kernels as ck
from cersa_kernels.nn import CersaLinear, PicaCersaLinear, PicaLinear

from adapter_dirs import tree

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def perturb(model):
    """Stand-in for training: random non-zero updates in every trainable tensor."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ck.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def expected_model(original, adapted):
    """The original model with every adapted layer's weight replaced by W0 + ΔW (docs/methods.md §1: for
    CERSA, W0 + U ΔS Vᵀ keeps the residual the CERSA layer discarded)."""
    from cersa_kernels.model import adapter_layers
    from cersa_kernels.nn.tree import is_conv1d

    model = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in adapter_layers(adapted).items():
            dw = layer.lowrank_update().delta_weight()
            target = model.get_submodule(name)
            target.weight.add_(dw.T if is_conv1d(target) else dw)
    return model


@pytest.mark.parametrize(
    "kind,method,options",
    [
        ("llama", "cersa", dict(energy=0.9)),
        ("llama", "lora", dict(rank=4, alpha=8)),
        ("llama", "pica", dict(rank=4)),
        ("gpt2", "cersa", dict(energy=0.9)),  # Conv1D targets: fan_in_fan_out
    ],
)
def test_export_loads_in_peft_and_matches_w0_plus_delta(kind, method, options, tmp_path):
    original = tiny(kind)
    model = copy.deepcopy(original)
    ck.apply(model, method, **options)
    perturb(model)
    result = ck.export_peft_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    assert set(config["rank_pattern"]) == set(result.ranks)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = expected_model(original, model)(input_ids=ids).logits
        base = original(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the update is not trivially zero
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_export_prunes_with_para_energy(tmp_path):
    original = tiny("llama")
    model = copy.deepcopy(original)
    ck.apply(model, "lora", rank=8, alpha=8)
    perturb(model)
    exact = ck.export_peft_lora(model, tmp_path / "exact")
    pruned = ck.export_peft_lora(model, tmp_path / "pruned", energy=0.8)
    assert sum(pruned.ranks.values()) < sum(exact.ranks.values())
    assert pruned.energy_kept >= 0.8
    peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "pruned")


def test_export_refuses_snell_and_mixed_layer_types(tmp_path):
    model = tiny("llama")
    ck.apply(model, "snell", rank=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="SnellLinear, whose update is not low-rank"):
        ck.export_peft_lora(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter layer"):
        ck.export_peft_lora(tiny("llama"), tmp_path)


def test_pica_over_cersa_through_apply_save_load_merge_export(tmp_path):
    original = tiny("llama")
    model = copy.deepcopy(original)
    ck.apply(model, "cersa", energy=0.9)
    report = ck.apply(model, "pica", target_modules=["q_proj", "v_proj"], rank=3, freeze_base=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PicaCersaLinear) and isinstance(layer, PicaLinear) and isinstance(layer.base, CersaLinear)
    assert layer.M is model.model.layers[1].self_attn.q_proj.M  # shared per role
    assert report.rows[0]["bytes_after"] == layer.base.weight_bytes()
    perturb(model)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    ck.save(model, tmp_path / "saved")
    fresh = ck.load(copy.deepcopy(original), tmp_path / "saved")
    q0, q1 = fresh.model.layers[0].self_attn.q_proj, fresh.model.layers[1].self_attn.q_proj
    assert isinstance(q0, PicaCersaLinear) and q0.M is q1.M and q0.M.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=0, rtol=0)
    ck.export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, expected_model(original, model)(input_ids=ids).logits, atol=2e-5, rtol=1e-4
        )
        ck.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


# --- export output fingerprinted and written atomically (issue 9, item 5) -----------------------

def test_export_is_fingerprinted_standard_peft_and_atomic(tmp_path, monkeypatch):
    import warnings

    import safetensors.torch
    from safetensors import safe_open

    from cersa_kernels._adapter_files import config_id
    from cersa_kernels.para_peft import para_peft

    original = tiny("llama")
    model = copy.deepcopy(original)
    ck.apply(model, "lora", rank=8, alpha=8)
    perturb(model)
    ck.export_peft_lora(model, tmp_path / "a")
    ck.export_peft_lora(model, tmp_path / "b", energy=0.8)  # other ranks: another config
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["cersa_kernels_config_id"] == config_id(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a")
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # no key PEFT does not know

    before = tree(tmp_path / "a")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save", disk_full)
        patch.setattr(safetensors.torch, "save_file", disk_full)
        with pytest.raises(OSError, match="disk full"):
            ck.export_peft_lora(model, tmp_path / "a", energy=0.8)
    assert tree(tmp_path / "a") == before

    (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match="do not belong together"):
        para_peft(tmp_path / "a", tmp_path / "c")
