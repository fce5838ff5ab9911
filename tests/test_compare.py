"""`python -m cersa_kernels compare --quick`: the same code as the default run on a few dozen
articles, two methods (one CERSA) and a handful of steps, each in its own spawned process."""
import json

import pytest
import torch

from cersa_kernels.__main__ import main
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
