"""One config object (AdapterConfig): apply takes it, save writes it, load reads it and can fill a
model adapted with it; the trainable-parameter report counts what requires grad; PEFT habits
(`r=`, `lora_alpha=`, a string target, a PEFT directory given to load) get a hint, not a raw error."""
import json

import pytest
import torch
import transformers
from torch import nn

import cersa_kernels as ck
from cersa_kernels import AdapterConfig


def two_layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)
    return transformers.BertModel(cfg)


def x():
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def test_repr_shows_what_was_set_and_dict_round_trips_through_json():
    config = AdapterConfig("cersa", target_modules=["0"], options={"energy": 0.9, "core_dtype": torch.bfloat16})
    assert repr(config) == "AdapterConfig(method='cersa', target_modules=['0'], options={'energy': 0.9, 'core_dtype': torch.bfloat16})"
    assert repr(AdapterConfig("lora")) == "AdapterConfig(method='lora')"
    again = AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.options["core_dtype"] is torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        AdapterConfig.from_dict({"method": "lora", "rank": 4})


def test_apply_takes_a_config_as_it_takes_keywords():
    a, b = two_layers(), two_layers()
    torch.manual_seed(3)  # LoRA's A is drawn at apply
    ck.apply(a, AdapterConfig("lora", target_modules=["0"], options={"rank": 3, "alpha": 6}))
    torch.manual_seed(3)
    ck.apply(b, "lora", target_modules=["0"], rank=3, alpha=6)
    assert type(a[0]) is type(b[0]) and a[0].rank == b[0].rank == 3 and isinstance(a[2], nn.Linear)
    with torch.no_grad():
        a[0].lora_B.fill_(0.1)
        b[0].lora_B.fill_(0.1)
    assert torch.equal(a(x()), b(x()))
    with pytest.raises(TypeError, match="an AdapterConfig or keyword arguments, not both"):
        ck.apply(two_layers(), AdapterConfig("lora"), rank=2)


def test_save_writes_the_config_and_load_reads_it_into_a_plain_or_an_adapted_model(tmp_path):
    config = AdapterConfig("cersa", options={"energy": 0.9})
    model = two_layers()
    ck.apply(model, config)
    with torch.no_grad():
        model[0].S.add_(0.05)
    ck.save(model, tmp_path)
    written = json.loads((tmp_path / "cersa_config.json").read_text())
    assert written["adapter_configs"] == [config.to_dict()]

    plain = ck.load(two_layers(), tmp_path)
    assert ck.adapter_configs(plain) == [config]
    assert torch.equal(plain(x()), model(x()))

    adapted = two_layers()
    ck.apply(adapted, ck.adapter_configs(plain)[0])
    assert not torch.equal(adapted(x()), model(x()))  # S as initialised, not as trained
    ck.load(adapted, tmp_path)
    assert torch.equal(adapted(x()), model(x()))
    assert [p.requires_grad for p in adapted.parameters()] == [p.requires_grad for p in model.parameters()]

    other = two_layers()
    ck.apply(other, "cersa", energy=0.5)  # other ranks: refused, and nothing is touched
    before = other(x())
    with pytest.raises(ValueError, match=r"layer '0' was saved as a CersaLinear with config .*the model's layer there"):
        ck.load(other, tmp_path)
    assert torch.equal(other(x()), before)


def test_the_report_and_print_trainable_parameters_count_what_requires_grad(capsys):
    model = two_layers()
    report = ck.apply(model, "lora", target_modules=["0"], rank=2, freeze_base=False)
    requiring = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora, unadapted = 2 * (12 + 10), 10 * 6 + 6  # freeze_base=False: layer 2 trains too (before: reported 44)
    assert report.trainable == requiring == lora + unadapted and report.other_trainable == unadapted
    ck.print_trainable_parameters(model)
    line = f"trainable params: {requiring:,d} || all params: {total:,d} || trainable%: {100 * requiring / total:.4f}"
    assert capsys.readouterr().out.strip() == line
    assert line in str(report)

    frozen = two_layers()
    ck.apply(frozen, "lora", rank=2)
    ck.print_trainable_parameters(frozen)
    adapters = 2 * (12 + 10) + 2 * (10 + 6)
    assert capsys.readouterr().out.startswith(f"trainable params: {adapters:,d} || all params: ")


def test_parameter_groups_keep_decay_off_s_and_biases():
    model = two_layers()
    ck.apply(model, "cersa", target_modules=["0"], energy=0.9)
    ck.apply(model, "lora", target_modules=["2"], rank=2)
    model[0].bias.requires_grad_(True)
    decay, no_decay = ck.trainable_parameters(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[2].lora_A), id(model[2].lora_B)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].S), id(model[0].bias)}
    torch.optim.AdamW(ck.trainable_parameters(model, weight_decay=0.1))  # what the groups are for


@pytest.mark.parametrize("key,hint", [("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout")])
def test_peft_keywords_get_ours(key, hint):
    with pytest.raises(TypeError, match=rf"unknown option {key}=.*did you mean {hint}="):
        ck.apply(two_layers(), "lora", **{key: 4})


def test_a_string_target_that_matches_nothing_gets_a_hint():
    with pytest.raises(ValueError, match=r"target_modules='query'.*did you mean \['encoder\.layer\.0\.attention\.self\.query'\].*"
                                         r"regular expression matched against the FULL module name.*\['query'\]"):
        ck.apply(tiny_bert(), "lora", target_modules="query", rank=2)
    with pytest.raises(ValueError, match=r"did you mean \[.*'encoder\.layer\.0\.attention\.self\.query'"):
        ck.apply(tiny_bert(), "lora", target_modules=["qeury"], rank=2)


def test_load_on_a_peft_directory_points_to_from_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a PEFT adapter directory.*cersa_kernels\.from_peft\(model, "):
        ck.load(two_layers(), tmp_path)
