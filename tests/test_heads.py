"""Task heads and modules_to_save: a tiny BERT-shaped sequence classifier (MiniLM's layout, built
offline from a config) is adapted with the seq_cls preset, trained a few steps, saved, loaded into a
fresh model whose head has another random init, merged, and exported to PEFT: every path gives the
trained model's logits."""
import os
import warnings

import peft
import pytest
import torch
import transformers

import cersa_kernels as ck
from cersa_kernels.nn import tree

from tolerances import ATOL

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = 3


def classifier(head_seed: int, kind: str = "bert"):
    """The same backbone every time (seed 0), the head drawn from `head_seed`: what a user gets from
    from_pretrained(..., num_labels=3), whose head is freshly initialised."""
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, num_labels=LABELS,
        )
        model = transformers.BertForSequenceClassification(cfg)
        head = model.classifier
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, num_labels=LABELS, pad_token_id=0,
        )
        model = transformers.LlamaForSequenceClassification(cfg)
        head = model.score
    torch.manual_seed(head_seed)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 64, (4, 8), generator=g), torch.tensor([0, 1, 2, 1])


def train(model, steps=4):
    x, y = batch()
    opt = torch.optim.AdamW(ck.trainable_parameters(model, weight_decay=0.01), lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch()[0]).logits


def assert_close(got, ref):
    """Float tolerance relative to the output's magnitude (tests/tolerances.py)."""
    tol = ATOL[torch.float32] * max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol, f"max |Δ| {(got - ref).abs().max().item():.3g} > {tol:.3g}"


def test_head_modules_are_found_structurally():
    assert tree.head_modules(classifier(1)) == ["classifier"]
    assert tree.head_modules(classifier(1, "llama")) == ["score"]
    bare = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=48))
    assert tree.head_modules(bare) == []  # its own backbone: no head
    assert tree.head_modules(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []  # not a task model


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_all_linear_leaves_the_head_out(kind):
    model = classifier(1, kind)
    head = tree.head_modules(model)[0]
    names = tree.find_targets(model, "all-linear")
    assert names and not any(n == head or n.startswith(head + ".") for n in names)
    with pytest.warns(UserWarning, match=rf"task head '{head}'.*frozen.*modules_to_save"):
        ck.apply(model, "lora", rank=2)
    assert not any(p.requires_grad for p in model.get_submodule(head).parameters())


def test_seq_cls_preset_trains_the_head_whole():
    model = classifier(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no frozen-head warning: the preset trains it
        report = ck.apply(model, "lora", task="seq_cls", rank=2)
    assert ck.modules_to_save(model) == ["classifier"]
    assert all(p.requires_grad for p in model.classifier.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report.other_trainable == head
    assert report.trainable == sum(p.numel() for p in ck.trainable_parameters(model))


@pytest.mark.parametrize("method,options", [("lora", dict(rank=4)), ("cersa", dict(energy=1.0))])
@pytest.mark.parametrize("spec", [dict(task="seq_cls"), dict(modules_to_save=["classifier"])])
def test_train_save_load_merge_export_give_the_same_logits(tmp_path, method, options, spec):
    model = train(_adapted(method, spec, options))
    ref = logits(model)
    assert not torch.allclose(logits(classifier(2)), ref, atol=1e-2)  # another head: the test can fail

    ck.save(model, tmp_path / "ours")
    fresh = ck.load(classifier(2), tmp_path / "ours")
    assert_close(logits(fresh), ref)
    assert ck.modules_to_save(fresh) == ["classifier"]

    # CERSA at energy 1.0 keeps every σ: W0 + U ΔS Vᵀ is its own weight, so the LoRA export is exact too
    ck.export_peft_lora(model, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(classifier(3), tmp_path / "peft").eval()
    assert_close(logits(exported), ref)
    via_peft = classifier(4)
    ck.from_peft(via_peft, tmp_path / "peft")  # the export read back into our LoRA layers
    assert_close(logits(via_peft), ref)

    ck.merge(fresh)
    assert not ck.adapter_layers(fresh)
    assert_close(logits(fresh), ref)


def _adapted(method, spec, options):
    model = classifier(1)
    ck.apply(model, method, **spec, **options)
    return model


def test_modules_to_save_errors_name_the_module():
    model = classifier(1)
    with pytest.raises(ValueError, match=r"modules_to_save entry 'clasifier'.*did you mean.*'classifier'"):
        ck.apply(model, "lora", rank=2, modules_to_save=["clasifier"])
    with pytest.raises(ValueError, match=r"names 'classifier', which modules_to_save entry 'classifier' trains whole"):
        ck.apply(model, "lora", rank=2, target_modules=["classifier", "query"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"task must be one of"):
        ck.apply(model, "lora", rank=2, task="classification")
    assert not ck.adapter_layers(model)


def test_peft_task_type_names_are_accepted():
    model = classifier(1)
    ck.apply(model, "lora", rank=2, task=peft.TaskType.SEQ_CLS)
    assert ck.modules_to_save(model) == ["classifier"]


def test_from_peft_restores_peft_modules_to_save(tmp_path):
    """A SEQ_CLS adapter written by PEFT itself (its head in modules_to_save) loads through from_peft."""
    theirs = peft.get_peft_model(classifier(1), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():  # stand-in for training the head PEFT keeps a copy of
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(0.3)
    theirs.save_pretrained(tmp_path)
    ref = logits(theirs.eval())
    ours = classifier(2)
    ck.from_peft(ours, tmp_path)
    assert ck.modules_to_save(ours) == ["classifier"] and all(p.requires_grad for p in ours.classifier.parameters())
    assert_close(logits(ours), ref)
    # and back: our export of it is what PEFT loads
    ck.export_peft_lora(ours, tmp_path / "again")
    assert_close(logits(peft.PeftModel.from_pretrained(classifier(3), tmp_path / "again").eval()), ref)


def test_a_tied_module_cannot_be_trained_whole():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)  # lm_head.weight is the input embedding
    with pytest.raises(ValueError, match=r"'lm_head' shares its parameters with \['transformer\.wte\.weight'\]"):
        ck.apply(model, "lora", rank=2, modules_to_save=["lm_head"])
