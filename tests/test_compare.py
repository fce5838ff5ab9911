"""`python -m cersa_kernels compare --quick`: the same code as the default run on a few dozen
articles, two methods (one CERSA) and a handful of steps, each in its own spawned process."""
import errno
import json
import os

import pytest
import torch

from cersa_kernels.__main__ import main
from cersa_kernels._checks import UsageError
from cersa_kernels.compare.data import stratified_split
from cersa_kernels.compare.report import FIELDS, PARA_FIELDS


def test_split_is_fixed_stratified_and_disjoint():
    train, val, test, names = stratified_split(4, 2, 3)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert [train.labels.count(c) for c in range(5)] == [4] * 5 and len(val.labels) == 10 and len(test.labels) == 15
    assert not (set(train.texts) & set(test.texts)) and not (set(train.texts) & set(val.texts))
    bigger = stratified_split(6, 2, 3)  # more training articles move nothing out of test
    assert bigger[2].texts == test.texts and set(train.texts) <= set(bigger[0].texts)


@pytest.mark.slow
def test_quick_compare_writes_every_field(tmp_path, capsys):
    main(["compare", "--quick", "--methods", "lora-r8", "cersa-a0.95", "--max-steps", "6", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "accuracy_vs_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cersa-a0.95 |" in (tmp_path / "results.md").read_text()
    assert str(tmp_path) in capsys.readouterr().out
    assert [r["method"] for r in results["runs"]] == ["lora-r8", "cersa-a0.95"]
    for run in results["runs"]:
        for key, kind in FIELDS.items():
            assert isinstance(run[key], kind), (run["method"], key, run[key])
        for key, kind in PARA_FIELDS.items():
            assert isinstance(run["para"][key], kind), (run["method"], "para", key)
        losses = run["losses"]
        assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, (run["method"], losses)
        parts = run["weight_bytes"] + run["grad_bytes"] + run["optimizer_bytes"] + run["saved_activation_bytes"]
        # the four parts coexist at the end of the forward (grads persist), so they fit in the peak
        assert 0 < parts <= run["peak_train_bytes"], (run["method"], parts, run["peak_train_bytes"])
        assert run["saved_activation_bytes"] > 0 and run["optimizer_bytes"] >= 2 * run["grad_bytes"] > 0  # AdamW: m, v
        assert 0 <= run["test"]["accuracy"] <= 1 and 0 <= run["test"]["macro_f1"] <= 1
        assert run["para"]["params_after"] <= run["para"]["params_before"]
    backends = {r["method"]: r["backends"] for r in results["runs"]}
    assert backends["cersa-a0.95"] == {"lowrank_bwd": "torch", "lowrank_fwd": "torch"}
    assert backends["lora-r8"] == {"lora_bwd": "torch", "lora_fwd": "torch"}
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"lora-r8", "lora-r8 + PARA", "cersa-a0.95", "cersa-a0.95 + PARA"}
    assert "cersa-a0.95:" in results["verdict"] and "vs LoRA" in results["verdict"]


def test_quick_compare_runs_the_rows_without_adapter_layers(tmp_path):
    """The probe and full fine-tuning have no adapter layer, which ck.save refuses: their saved
    bytes are their trainable tensors (the head; every parameter), measured all the same."""
    main(["compare", "--quick", "--methods", "probe", "full-ft", "--max-steps", "2", "--no-plot", "--out", str(tmp_path)])
    runs = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == {"probe", "full-ft"}
    head_bytes = 4 * runs["probe"]["trainable_params"]
    assert head_bytes < runs["probe"]["adapter_bytes"] < head_bytes + 4096  # fp32 tensors + a small header
    assert runs["full-ft"]["adapter_bytes"] >= 4 * runs["full-ft"]["trainable_params"]


def test_training_batches_are_full_and_every_method_gets_the_same_order():
    from cersa_kernels.compare.worker import training_batches

    batches = training_batches(200, 16, epochs=4, max_steps=None, seed=3)
    assert len(batches) == 4 * (200 // 16) and all(b.numel() == 16 for b in batches)  # 200 % 16 = 8 dropped
    first_epoch = torch.cat(batches[:12])
    assert first_epoch.unique().numel() == 192  # no article twice within an epoch
    again = training_batches(200, 16, epochs=4, max_steps=None, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert len(training_batches(200, 16, epochs=4, max_steps=30, seed=3)) == 30
    with pytest.raises(ValueError, match="cannot fill one batch"):
        training_batches(10, 16, epochs=1, max_steps=None, seed=0)


# --- the quantized rows: cheap checks of their construction, measurement and report (no MiniLM) ----

def test_quantized_rows_are_named_choices_outside_the_default_run():
    import argparse

    from cersa_kernels.compare.cli import add_arguments
    from cersa_kernels.compare.methods import DEFAULT_METHODS, METHODS, QUANT_METHODS

    assert QUANT_METHODS == ("cersa-a0.95-int8", "cersa-a0.95-nf4", "cersa-a0.9-nf4", "lora-r8-nf4", "qlora-r8")
    assert set(QUANT_METHODS) <= set(METHODS) and not set(QUANT_METHODS) & set(DEFAULT_METHODS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).methods == list(DEFAULT_METHODS)
    assert parser.parse_args(["--methods", "lora-r8-nf4", "qlora-r8"]).methods == ["lora-r8-nf4", "qlora-r8"]
    # qlora-r8 is lora-r8's adapter (rank 8, scale alpha/r = 1, no dropout) over bitsandbytes NF4
    assert METHODS["qlora-r8"].options == dict(r=8, lora_alpha=8, lora_dropout=0.0)
    assert METHODS["lora-r8-nf4"].options == dict(METHODS["lora-r8"].options, base_format="nf4")


def test_frozen_bytes_count_quantized_storage_once():
    import bitsandbytes as bnb
    from torch import nn

    from cersa_kernels.compare.measure import frozen_bytes
    from cersa_kernels.quant import quantize

    torch.manual_seed(0)
    dense = nn.Linear(128, 64).requires_grad_(False)
    assert frozen_bytes(dense) == 4 * (64 * 128 + 64)
    for nested in (False, True):
        q = bnb.nn.Linear4bit(128, 64, compress_statistics=nested, quant_type="nf4").to("cpu").requires_grad_(False)
        state = q.weight.quant_state
        nested_bytes = 4 * state.state2.absmax.numel() + 4 * state.state2.code.numel() if nested else 0
        absmax = (1 if nested else 4) * 64 * 128 // 64  # uint8 codes of the absmax when nested
        assert frozen_bytes(q) == 64 * 128 // 2 + absmax + 4 * 16 + nested_bytes + 4 * 64, nested
    holder = nn.Module()
    holder.w = quantize(torch.randn(64, 128), "int8")  # a QuantizedTensor attribute, not a buffer
    holder.register_buffer("same_codes", holder.w.data)  # also a buffer: counted once
    assert frozen_bytes(holder) == 64 * 128 + 4 * 64 * 2


def test_qlora_row_is_bitsandbytes_config_then_peft_and_its_bytes_are_measured(tmp_path):
    """The qlora-r8 construction on a tiny BERT: Linear4bit NF4 everywhere from BitsAndBytesConfig
    (blocksize 64, float32 absmax), PEFT LoRA on every Linear, frozen Linear bytes = codes + absmax +
    bias + the 16-value code table of each layer, against the dense fp32 bytes."""
    import bitsandbytes as bnb
    import peft

    from cersa_kernels.compare.methods import METHODS
    from cersa_kernels.compare.worker import (
        Classifier, adapt, linear_dense_bytes, linear_frozen_bytes, linear_positions, load_encoder,
    )

    encoder = load_encoder(_tiny_bert_dir(tmp_path), METHODS["qlora-r8"], "cpu", "fp32")
    positions = linear_positions(encoder)
    assert len(positions) == 6 and all(isinstance(encoder.get_submodule(n), bnb.nn.Linear4bit) for n in positions)
    assert {encoder.get_submodule(n).weight.quant_state.blocksize for n in positions} == {64}
    assert not any(encoder.get_submodule(n).weight.quant_state.nested for n in positions)
    shapes = [(64, 64)] * 4 + [(128, 64), (64, 128)]  # q, k, v, attention out; intermediate, output
    dense = linear_dense_bytes(encoder, positions)
    assert dense == sum(4 * (m * n + m) for m, n in shapes)
    model = Classifier(encoder, 5)
    adapt(model, METHODS["qlora-r8"])
    assert isinstance(model.encoder, peft.PeftModel)
    lora_layers = [m for m in model.encoder.modules() if isinstance(m, peft.tuners.lora.bnb.Linear4bit)]
    assert len(lora_layers) == 6 and all(m.r["default"] == 8 and m.scaling["default"] == 1.0 for m in lora_layers)
    frozen = linear_frozen_bytes(model.encoder, positions)
    expected = sum(m * n // 2 + 4 * m * n // 64 + 4 * m + 4 * 16 for m, n in shapes)  # each layer its code table
    assert frozen == expected and frozen / dense < 0.16
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, torch.ones_like(ids)).sum().backward()
    assert all(m.lora_B["default"].weight.grad is not None for m in lora_layers)


def _fake_run(method, seed, accuracy, linear_frozen, sec_per_step, peak):
    run = fake_run(dict(method=method, seed=seed, lr=1e-3))
    run.update(test=dict(accuracy=accuracy, macro_f1=accuracy), val=dict(accuracy=accuracy),
               linear_frozen_bytes=linear_frozen, linear_dense_bytes=1000, sec_per_step=sec_per_step,
               peak_train_bytes=peak)
    return run


def test_verdict_sets_each_quantized_row_against_what_it_quantizes_and_lora_nf4_against_qlora():
    from cersa_kernels.compare.report import markdown_table, summarise, verdict

    runs = [_fake_run("cersa-a0.95", s, 0.93, 1100, 1.0, 300) for s in range(2)]
    runs += [_fake_run("cersa-a0.95-nf4", s, 0.925, 155, 1.2, 250) for s in range(2)]
    runs += [_fake_run("lora-r8-nf4", s, 0.94, 142, 0.9, 200) for s in range(2)]
    runs += [_fake_run("qlora-r8", s, 0.935, 141, 1.0, 210) for s in range(2)]
    rows = summarise(runs)
    words = verdict(rows)
    assert "cersa-a0.95-nf4: frozen Linear bytes 0.155× the dense fp32 Linear layers; -0.5 pt vs cersa-a0.95 (0.141× its frozen Linear bytes)." in words
    assert "qlora-r8: frozen Linear bytes 0.141× the dense fp32 Linear layers." in words
    assert ("lora-r8-nf4 vs qlora-r8 (bitsandbytes + PEFT): +0.5 pt, 1.007× its frozen Linear bytes, 0.90× its s/step, "
            "0.95× its peak training memory.") in words
    assert "| frozen Linear MB |" in markdown_table(rows)


# ---- issue 16 item 10: an interrupted or failed compare leaves no results file claiming completeness ----
# Training is replaced by a stub (no MiniLM): what is tested is what the command writes, and when.

def fake_run(config: dict) -> dict:
    """What worker.run_one returns, with every field of the right type (values made up)."""
    values = {int: 1, float: 1.0, str: "x", list: [1.0], dict: {}, bool: False}
    run = {key: values[kind] for key, kind in FIELDS.items()}
    return dict(run, method=config["method"], seed=config["seed"], lr=config["lr"],
                val={"accuracy": 0.5}, test={"accuracy": 0.5, "macro_f1": 0.5})


ARGS = ["--in-process", "--methods", "probe", "lora-r8"]


def run_compare(monkeypatch, out, runner=fake_run):
    from cersa_kernels.compare import cli, worker

    monkeypatch.setattr(worker, "run_one", runner)
    return cli.main([*ARGS, "--no-plot", "--out", str(out)])


def test_compare_with_a_stub_training_writes_its_results(monkeypatch, tmp_path):
    """The stub itself: with nothing failing, the three files are written (so the tests below can fail)."""
    results = run_compare(monkeypatch, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert "| lora-r8 |" in (tmp_path / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_ctrl_c_during_training_writes_nothing(monkeypatch, tmp_path):
    calls = []

    def interrupted(config):
        calls.append(config["method"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_run(config)

    with pytest.raises(KeyboardInterrupt):
        run_compare(monkeypatch, tmp_path, interrupted)
    assert calls == ["probe", "lora-r8"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", [1, 2, 3], ids=["results.md", "png", "results.json"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_failure_while_writing_leaves_no_results(monkeypatch, tmp_path, capsys, failing, error):
    """The disk fills up (or Ctrl-C comes) while the n-th file is written: none of the three is
    left, no temporary either, and the table was printed before anything was written."""
    real_fsync, count = os.fsync, []

    def fsync(fd):
        count.append(fd)
        if len(count) == failing:
            raise error
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if isinstance(error, OSError):
        expected = pytest.raises(UsageError, match=r"^compare: could not write the results to .*No space left on device.*"
                                                   r"results\.json was not written")
    else:
        expected = pytest.raises(KeyboardInterrupt)
    with expected:
        run_with_plot(monkeypatch, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert "| lora-r8 |" in capsys.readouterr().out


def run_with_plot(monkeypatch, out):
    """run_compare with the plot on (three files), its PNG rendering stubbed: no matplotlib work."""
    from cersa_kernels.compare import cli, report, worker

    monkeypatch.setattr(worker, "run_one", fake_run)
    monkeypatch.setattr(report, "plot_png", lambda rows: b"\x89PNG\r\n\x1a\n")
    return cli.main([*ARGS, "--out", str(out)])


def test_an_unwritable_output_directory_fails_before_training(monkeypatch, tmp_path, capsys):
    """--out under a regular file (root ignores permissions, not that): one `error:` line and exit
    status 2, before any method is trained."""
    (tmp_path / "file").write_text("")
    calls = []
    monkeypatch.setattr("cersa_kernels.compare.worker.run_one", lambda config: calls.append(config) or fake_run(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *ARGS, "--out", str(tmp_path / "file" / "out")])
    assert exit_info.value.code == 2 and calls == []
    assert capsys.readouterr().err.startswith(
        f"error: compare: cannot create the output directory {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file")


def test_a_results_file_that_cannot_be_written_leaves_no_results_json(monkeypatch, tmp_path):
    """results.md cannot be written (here: a directory is in its place). Before issue 16, results.json
    was written first and stayed, claiming a complete run; now it is written last, or not at all."""
    (tmp_path / "results.md").mkdir()
    with pytest.raises(UsageError, match=r"^compare: could not write the results to .*results\.json was not written"):
        run_compare(monkeypatch, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"] and (tmp_path / "results.md").is_dir()


def _tiny_bert_dir(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=16)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    return str(tmp_path)


def test_our_quantized_rows_hold_the_bytes_their_formats_promise(tmp_path):
    """lora-r8-nf4 stores W0 as codes + one float32 absmax per 64 (qlora-r8's bytes but for
    bitsandbytes' 64-byte code table per layer); CERSA's NF4 factors weigh less than its int8 ones,
    which weigh less than the float32 factors."""
    from cersa_kernels.compare.methods import METHODS
    from cersa_kernels.compare.worker import Classifier, adapt, linear_frozen_bytes, linear_positions, load_encoder

    directory = _tiny_bert_dir(tmp_path)
    shapes = [(64, 64)] * 4 + [(128, 64), (64, 128)]
    measured = {}
    for name in ("lora-r8-nf4", "qlora-r8", "cersa-a0.95", "cersa-a0.95-int8", "cersa-a0.95-nf4"):
        encoder = load_encoder(directory, METHODS[name], "cpu", "fp32")
        positions = linear_positions(encoder)
        model = Classifier(encoder, 5)
        adapt(model, METHODS[name])
        measured[name] = linear_frozen_bytes(model.encoder, positions)
    assert measured["lora-r8-nf4"] == sum(m * n // 2 + 4 * m * n // 64 + 4 * m for m, n in shapes)
    assert measured["qlora-r8"] - measured["lora-r8-nf4"] == 6 * 4 * 16  # bitsandbytes' code table per layer
    assert measured["cersa-a0.95-nf4"] < measured["cersa-a0.95-int8"] < measured["cersa-a0.95"]
