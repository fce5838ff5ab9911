"""`python -m cersa_kernels doctor`: the CPU path for real, and the GPU loop on CPU tensors
(the Triton interpreter against torch), which is the same code a GPU runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cersa_kernels import backends, doctor

ROOT = Path(__file__).resolve().parents[1]
CPU_SHAPE = ((37, 130, 77, 45),)  # odd sizes, small: the interpreter is slow


def test_cpu_machine_reports_what_it_could_not_check_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CERSA_KERNELS_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "cersa_kernels", "doctor"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"torch         {torch.__version__}" in out.stdout
    assert "No CUDA GPU" in out.stdout and "Not checked" in out.stdout
    assert "_cuda" in out.stdout
    assert not list(tmp_path.iterdir())  # nothing verified, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("op", doctor.OPS)
def test_triton_kernels_verify_against_torch_under_the_interpreter(op):
    results = doctor.run_checks("cpu", ops=[op], backend_names=["triton"], dtypes=["float32"],
                                shapes=CPU_SHAPE, reps=1, progress=False)
    assert len(results) == 1
    r = results[0]
    assert r.verified, r.note
    assert r.ms > 0 and r.torch_ms > 0


def test_a_wrong_kernel_fails_verification(monkeypatch):
    load = backends._load_kernel
    real = load("triton", "lowrank_fwd")

    def off_by_a_bit(*args):
        y, h = real(*args)
        return y * 1.001, h

    monkeypatch.setattr(backends, "_load_kernel", lambda b, op: off_by_a_bit if (b, op) == ("triton", "lowrank_fwd")
                        else load(b, op))
    r = doctor.check_one("lowrank", "triton", "float32", CPU_SHAPE[0], "cpu", reps=1)
    assert not r.verified and "output 0" in r.note


def test_a_backend_that_cannot_run_is_reported_not_run():
    r = doctor.check_one("lowrank", "cuda", "float32", CPU_SHAPE[0], "cpu", reps=1)
    assert not r.verified and r.note.startswith("not run")


def result(op, backend, dtype, verified, ms, torch_ms, shape=(1, 2, 3, 4)):
    return doctor.CheckResult(op, backend, dtype, shape, verified, ms=ms, torch_ms=torch_ms)


def test_verified_table_keeps_only_backends_verified_everywhere_and_faster():
    results = [
        result("lowrank", "triton", "bfloat16", True, 1.0, 2.0), result("lowrank", "triton", "bfloat16", True, 1.0, 2.0, (5,)),
        result("lowrank", "cuda", "bfloat16", True, 0.5, 2.0), result("lowrank", "cuda", "bfloat16", False, 0.1, 2.0, (5,)),
        result("lowrank", "triton", "float16", True, 3.0, 2.0),  # verified, slower
        result("lora", "triton", "float32", False, 0.1, 2.0),  # faster, wrong
    ]
    assert doctor.verified_table(results, "sm_90") == {
        "lowrank_fwd": {"sm_90": {"bfloat16": "triton"}}, "lowrank_bwd": {"sm_90": {"bfloat16": "triton"}}}


def test_the_written_cache_is_what_auto_reads(monkeypatch, tmp_path):
    """The GPU branch of main, with the GPU and the checks faked: it writes the cache auto reads."""
    monkeypatch.setenv("CERSA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(doctor, "environment", lambda: {"gpu": "GPU X", "arch": "sm_90", "torch": torch.__version__})
    monkeypatch.setattr(doctor, "run_checks", lambda device, shapes, reps, on_result=None: [
        result("lowrank", "triton", "bfloat16", True, 1.0, 2.0)])
    assert doctor.main() == 0
    doc = json.loads(backends.verified_cache_path("GPU X", "sm_90").read_text())
    assert doc["device"] == "GPU X" and doc["results"][0]["verified"] is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setattr(backends, "_tuned_table", lambda: {})

    class FakeCudaTensor:
        is_cuda = True
        dtype = torch.bfloat16
        device = torch.device("cuda", 0)

    try:
        assert backends._auto_candidates("lowrank_bwd", [FakeCudaTensor()]) == ["triton", "torch"]
    finally:
        backends._user_table.cache_clear()


def test_model_shapes_are_the_models_distinct_linear_shapes(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=50, max_position_embeddings=16)
    BertModel(config).save_pretrained(tmp_path)
    shapes = doctor.model_shapes(str(tmp_path), T=128)
    # (T, n, m, k): q/k/v/o and the pooler are 32→32, the MLP 32→64 and 64→32
    assert sorted(shapes) == [(128, 32, 32, 16), (128, 32, 64, 16), (128, 64, 32, 16)]
