"""The auto-backend table: built only from verified-and-faster results, and auto's use of it."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import cersa_kernels.backends as backends

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


def load_script():
    spec = importlib.util.spec_from_file_location("make_tuned_table", ROOT / "benchmarks" / "make_tuned_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(row, mean, k, mode="fwd+bwd", dtype="bfloat16", device=H100, op="lowrank"):
    info = dict(op=op, row=row, mode=mode, dtype=dtype, device=device, T=8192, n=4096, m=4096, k=k)
    return {"extra_info": info, "stats": {"mean": mean}}


def doctor(results, device=H100, arch="sm_90"):
    return {"device": device, "arch": arch, "results": [
        dict(op=op, dtype=dt, backend=b, verified=ok) for op, dt, b, ok in results]}


def test_table_keeps_only_verified_and_faster_backends():
    runs = [{"benchmarks": [
        bench("lowrank-torch", 1.0, 256), bench("lowrank-torch", 2.0, 1024),
        bench("lowrank-triton", 0.9, 256), bench("lowrank-triton", 1.9, 1024),  # verified, faster: wins
        bench("lowrank-cuda", 0.5, 256), bench("lowrank-cuda", 0.5, 1024),  # faster but failed a check
        bench("lowrank-cuda", 0.01, 256, mode="fwd"), bench("eager", 0.01, 256),  # ignored rows
        bench("lowrank-torch", 1.0, 256, dtype="float16"), bench("lowrank-triton", 1.5, 256, dtype="float16"),  # slower
        bench("lowrank-torch", 1.0, 256, device="GPU Y"), bench("lowrank-triton", 0.1, 256, device="GPU Y"),  # no doctor
    ]}]
    docs = [doctor([("lowrank", "bfloat16", "triton", True), ("lowrank", "bfloat16", "cuda", True),
                    ("lowrank", "bfloat16", "cuda", False), ("lowrank", "float16", "triton", True)])]
    table = load_script().tuned_table(runs, docs)
    assert table == {"lowrank_fwd": {"sm_90": {"bfloat16": "triton"}}, "lowrank_bwd": {"sm_90": {"bfloat16": "triton"}}}


def test_table_covers_every_op_and_compares_within_a_variant():
    def row(op, backend, mean, p, peak=None):
        info = dict(op=op, row=f"{op}-{backend}", mode="fwd+bwd", dtype="bfloat16", device=H100, T=8192, n=4096,
                    m=4096, r=16, p=p, tflops=1.0 / mean, peak_memory_bytes=peak or 0)
        return {"extra_info": info, "stats": {"mean": mean}}

    runs = [{"benchmarks": [
        row("lora", "torch", 1.0, 0.0), row("lora", "triton", 0.5, 0.0, peak=5),  # measurements differ per row
        row("lora", "torch", 1.0, 0.1), row("lora", "triton", 1.2, 0.1),  # slower with dropout
        row("snell", "torch", 3.0, 0.0), row("snell", "triton", 1.0, 0.0),
        {"extra_info": dict(op="snell", row="snell-plain", mode="fwd+bwd", dtype="bfloat16", device=H100, p=0.0),
         "stats": {"mean": 0.001}},  # a baseline, not a backend
    ]}]
    docs = [doctor([("lora", "bfloat16", "triton", True), ("snell", "bfloat16", "triton", True)])]
    table = load_script().tuned_table(runs, docs)
    # LoRA is compared group by group (the peak-memory field must not split a group): summed over both
    # variants 0.5 + 1.2 < 1.0 + 1.0, so faster; compared on the dropout group alone it would be slower
    assert table["lora_fwd"] == {"sm_90": {"bfloat16": "triton"}}
    assert table["snell_fwd"] == {"sm_90": {"bfloat16": "triton"}} and table["snell_bwd"] == table["snell_fwd"]


class FakeCudaTensor:
    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A GPU of arch `state['arch']`, an empty user cache dir, and no committed table."""
    state = {"arch": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["arch"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setenv("CERSA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "_tuned_table", lambda: {})
    backends._user_table.cache_clear()
    yield state
    backends._user_table.cache_clear()


def test_auto_runs_torch_where_nothing_is_verified(fake_gpu):
    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["torch"]


def test_auto_runs_a_kernel_only_on_the_arch_it_was_verified_on(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "_tuned_table", lambda: {"lowrank_fwd": {"sm_90": {"bfloat16": "triton"}}})
    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["triton", "torch"]
    assert backends._auto_candidates("lowrank_bwd", [FakeCudaTensor()]) == ["torch"]  # not in the table
    fake_gpu["arch"] = (8, 0)
    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["torch"]  # verified on sm_90 only


def test_the_users_doctor_cache_wins_over_the_committed_table(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "_tuned_table", lambda: {"lowrank_fwd": {"sm_90": {"bfloat16": "triton"}}})
    path = backends.verified_cache_path("GPU X", "sm_90")
    path.write_text(json.dumps({"table": {"lowrank_fwd": {"sm_90": {"bfloat16": "cuda"}}}}))
    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["cuda", "torch"]


def test_cpu_tensors_always_go_to_torch(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "_tuned_table", lambda: {"lowrank_fwd": {"sm_90": {"float32": "triton"}}})
    assert backends.select_backend("lowrank_fwd", [torch.zeros(2)]) == "torch"


def test_forcing_a_backend_still_wins(fake_gpu, monkeypatch):
    monkeypatch.setenv("CERSA_BACKEND", "triton")
    assert backends.select_backend("lowrank_fwd", [torch.zeros(2)]) == "triton"  # the interpreter, in tests
