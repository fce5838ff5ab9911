"""The auto-backend table built from GPU benchmark JSON, and auto's use of it."""
import importlib.util
from pathlib import Path

import torch

import cersa_kernels.backends as backends

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("make_tuned_table", ROOT / "benchmarks" / "make_tuned_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(row, mode, mean, k, dtype="bfloat16", device="NVIDIA H100"):
    info = dict(op="lowrank", row=row, mode=mode, dtype=dtype, device=device, T=8192, n=4096, m=4096, k=k)
    return {"extra_info": info, "stats": {"mean": mean}}


def test_fastest_backend_over_all_shapes_wins():
    runs = [{"benchmarks": [
        bench("cersa-triton", "fwd+bwd", 1.0, 256), bench("cersa-cuda", "fwd+bwd", 0.8, 256),
        bench("cersa-triton", "fwd+bwd", 2.0, 1024), bench("cersa-cuda", "fwd+bwd", 2.5, 1024),
        bench("cersa-torch", "fwd+bwd", 0.1, 256),  # measured on one shape only: not comparable
        bench("cersa-cuda", "fwd", 0.01, 256), bench("eager", "fwd+bwd", 0.01, 256),  # ignored rows
        bench("cersa-cuda", "fwd+bwd", 1.0, 256, dtype="float16"),
    ]}]
    table = load_script().tuned_table(runs)
    assert table["lowrank_fwd"]["NVIDIA H100"] == {"bfloat16": "triton", "float16": "cuda"}
    assert table["lowrank_bwd"] == table["lowrank_fwd"]


def test_auto_reads_the_table_first(monkeypatch):
    monkeypatch.setattr(backends, "_tuned_table", lambda: {"lowrank_fwd": {"GPU X": {"float16": "cuda"}}})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")

    class FakeCudaTensor:
        is_cuda = True
        dtype = torch.float16
        device = torch.device("cuda", 0)

    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["cuda", "triton", "torch"]
    assert backends._auto_candidates("lowrank_bwd", [FakeCudaTensor()]) == ["triton", "cuda", "torch"]
