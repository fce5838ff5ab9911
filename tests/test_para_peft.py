"""PARA on a real PEFT checkpoint: a tiny random Llama (built offline from a config), a LoRA adapter
made and saved by the `peft` package, `python -m cersa_kernels para-peft`, and the result loaded
back with `peft` against the exact truncation (each ΔW replaced by its dense rank-k_l truncation)."""
import copy
import json
import math

import peft
import pytest
import torch
import transformers

from cersa_kernels.__main__ import main

from adapter_dirs import tree

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_adapter(path, use_rslora=False):
    """Save a PEFT LoRA adapter with random (non-zero) lora_B and per-module ranks/alphas."""
    base = tiny_llama()
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, use_rslora=use_rslora,
        rank_pattern={"up_proj": 6}, alpha_pattern={"down_proj": 5},
    )
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (name, p) in enumerate(n_p for n_p in model.named_parameters() if "lora_B" in n_p[0]):
            # spectra that decay at different rates, so the global threshold gives different ranks
            p.copy_(torch.randn(p.shape, generator=g) * torch.logspace(0, -0.3 * (i % 5), p.shape[1]))
    model.save_pretrained(path)
    return model


def delta_weights(peft_model):
    """{module name: s·B·A in float64} from a loaded PEFT model."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A = module.lora_A["default"].weight.double()
            B = module.lora_B["default"].weight.double()
            out[name] = module.scaling["default"] * (B @ A)
    return out


def truncate(dw, k):
    U, S, Vh = torch.linalg.svd(dw)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_para_peft_cli_round_trip(tmp_path, capsys, use_rslora):
    original = make_adapter(tmp_path / "in", use_rslora)
    before = {k: v.detach() for k, v in delta_weights(original).items()}
    assert len(before) == 2 * len(TARGETS)

    main(["para-peft", str(tmp_path / "in"), str(tmp_path / "out"), "--energy", "0.9"])
    printed = capsys.readouterr().out
    assert "energy kept" in printed and "fewer" in printed

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    after = delta_weights(loaded)
    assert set(after) == set(ranks)  # a module with k_l = 0 is gone from the adapter
    # The global threshold: different modules keep different ranks, and 90% of the pooled energy.
    assert len(set(ranks.values())) > 1
    total = sum(float(torch.linalg.svdvals(dw).pow(2).sum()) for dw in before.values())
    kept = 0.0
    for name, dw in before.items():
        k = ranks.get(name, 0)
        expected = truncate(dw, k)
        got = after.get(name, torch.zeros_like(dw))
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4, msg=f"{name} (k={k})")
        kept += float(torch.linalg.svdvals(expected).pow(2).sum())
        if k:  # the scale alpha'/k' (alpha'/√k' with rslora) is the module's original scale
            module = loaded.base_model.model.get_submodule(name)
            orig = original.base_model.model.get_submodule(name)
            assert math.isclose(module.scaling["default"], orig.scaling["default"], rel_tol=1e-12)
    assert kept / total >= 0.9

    # The loaded model's outputs equal the base model with each ΔW replaced by its truncation.
    reference = tiny_llama()
    with torch.no_grad():
        for name, dw in before.items():
            layer = reference.get_submodule(name)
            layer.weight += truncate(dw, ranks.get(name, 0)).to(layer.weight.dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)
        # and the truncation changed something: the test can tell a no-op from a compression
        assert not torch.allclose(original(ids).logits, reference(ids).logits, atol=1e-4)


def test_para_peft_budget_and_removal(tmp_path):
    make_adapter(tmp_path / "in")
    from cersa_kernels.para_peft import para_peft

    result = para_peft(tmp_path / "in", tmp_path / "out", budget=400)
    assert result.params_after <= 400 < result.params_before
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    removed = [layer.name for layer in result.layers if layer.rank_after == 0]
    assert removed, "a budget this small must remove some modules"
    assert sorted(config["target_modules"]) == sorted(n for n, k in result.ranks.items() if k > 0)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert not any(name + ".lora_A" in key for key in keys for name in removed)
    peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out")  # loads


def test_para_peft_errors(tmp_path):
    from cersa_kernels.para_peft import para_peft

    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        para_peft(tmp_path, tmp_path / "out")
    make_adapter(tmp_path / "in")
    cfg = json.loads((tmp_path / "in" / "adapter_config.json").read_text())
    (tmp_path / "in" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="DoRA adapter"):
        para_peft(tmp_path / "in", tmp_path / "out")
    (tmp_path / "in" / "adapter_config.json").write_text(json.dumps(dict(cfg, r=4, rank_pattern={})))
    with pytest.raises(ValueError, match=r"module .model.layers.0.mlp.down_proj.: config rank r=4, but lora_A is \(8, 48\)"):
        para_peft(tmp_path / "in", tmp_path / "out")


# --- output fingerprinted and written atomically; unreadable input refused (issue 9, item 5) ------


def test_para_peft_output_is_fingerprinted_and_a_mixed_pair_refused(tmp_path):
    from safetensors import safe_open

    from cersa_kernels._adapter_files import config_id
    from cersa_kernels.para_peft import para_peft

    make_adapter(tmp_path / "in")
    para_peft(tmp_path / "in", tmp_path / "a", energy=0.9)
    para_peft(tmp_path / "in", tmp_path / "b", energy=0.5)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["cersa_kernels_version"] == "1"
    assert metadata["cersa_kernels_config_id"] == config_id(config)
    assert not any(key.startswith("cersa") for key in config)  # the PEFT config stays standard
    para_peft(tmp_path / "a", tmp_path / "again", energy=0.8)  # our own output reads back
    (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"adapter_model.safetensors and .*adapter_config.json do not belong together"):
        para_peft(tmp_path / "a", tmp_path / "c", energy=0.9)


def test_para_peft_failed_write_leaves_earlier_output_intact(tmp_path, monkeypatch):
    import safetensors.torch

    from cersa_kernels.para_peft import para_peft

    make_adapter(tmp_path / "in")
    para_peft(tmp_path / "in", tmp_path / "out", energy=0.9)
    before = tree(tmp_path / "out")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", disk_full)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        para_peft(tmp_path / "in", tmp_path / "out", energy=0.5)
    assert tree(tmp_path / "out") == before  # everything as it was, no temporaries


def test_para_peft_unreadable_input_names_the_file(tmp_path):
    from cersa_kernels.para_peft import para_peft

    make_adapter(tmp_path / "in")
    weights, config = tmp_path / "in" / "adapter_model.safetensors", tmp_path / "in" / "adapter_config.json"
    data, text = weights.read_bytes(), config.read_text()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{weights}.*corrupted or truncated"):
        para_peft(tmp_path / "in", tmp_path / "out")
    weights.write_bytes(data)
    config.write_text(text[:-5])
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        para_peft(tmp_path / "in", tmp_path / "out")
    config.write_text('"LORA"')
    with pytest.raises(ValueError, match=rf"{config} must hold a JSON object"):
        para_peft(tmp_path / "in", tmp_path / "out")
    config.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "lora_alpha"}))
    with pytest.raises(ValueError, match=rf"{config} has no 'lora_alpha'"):
        para_peft(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
