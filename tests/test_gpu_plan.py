"""The staged GPU check fits a 15-minute lease: its dry run (scripts/gpu_check.py plan) records every
Triton launch each stage makes, on CPU tensors under the launch recorder of tests/triton_compile.py,
and prices it; the plan must stay under 12 minutes in total and 6 minutes per stage, machine start
included. Also: the stages append as they go, and verification runs compile each variant once."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _gpu_check()


@pytest.fixture(scope="module")
def plan(gpu_check):
    return gpu_check.plan(90)


@pytest.mark.slow
def test_the_plan_fits_the_lease(plan, gpu_check):
    print(json.dumps(plan["stages"], indent=1))
    over = {r["stage"]: r["seconds"] for r in plan["stages"] if r["seconds"] > gpu_check.BUDGET_STAGE_S}
    assert not over, f"stages over {gpu_check.BUDGET_STAGE_S} s: {over}"
    assert plan["total_seconds"] <= gpu_check.BUDGET_TOTAL_S, plan["total_seconds"]


@pytest.mark.slow
def test_verification_stages_do_not_autotune(plan):
    """With CERSA_TRITON_AUTOTUNE=0 the smoke and doctor stages compile each variant once: no tuning
    session, and (much) fewer GEMM compiles than autotune configs would cost."""
    by_stage = {r["stage"]: r for r in plan["stages"]}
    for stage in ("smoke", "doctor"):
        assert by_stage[stage]["autotune_sessions"] == 0, by_stage[stage]
        assert by_stage[stage]["launches"] > 0 and by_stage[stage]["gemm_compiles"] > 0


def test_the_autotune_switch_pins_one_config_among_the_compiled_ones(monkeypatch):
    from cersa_kernels.triton import gemm

    monkeypatch.setenv("CERSA_TRITON_AUTOTUNE", "0")
    assert not gemm.autotune_enabled()
    monkeypatch.setenv("CERSA_TRITON_AUTOTUNE", "1")
    assert gemm.autotune_enabled()
    for M in (1, 64, 127, 128, 8192):
        for quantized in (False, True):
            cfg = gemm.pinned_config(M, quantized)
            assert cfg in (gemm._QUANT_GPU_CONFIGS if quantized else gemm._GPU_CONFIGS)
    assert gemm.pinned_config(8192, False).kwargs["BLOCK_M"] == 128


def test_each_item_is_on_disk_when_it_finishes(gpu_check, tmp_path, monkeypatch):
    """A stage killed at its limit keeps what it did: every result is a flushed JSON line."""
    monkeypatch.setenv("OUT", str(tmp_path))
    gpu_check.append("smoke", {"item": 1})
    gpu_check.append("smoke", {"item": 2})
    lines = (tmp_path / "smoke.jsonl").read_text().splitlines()
    assert [json.loads(line)["item"] for line in lines] == [1, 2]


@pytest.mark.parametrize("op", ["lowrank", "lora", "pica", "pica_lowrank", "snell"])
def test_smoke_runs_on_cpu_tensors_and_streams_its_results(gpu_check, tmp_path, monkeypatch, op):
    """The smoke stage's loop on CPU tensors (Triton under the interpreter: the interpreter smoke
    run .ci/run also makes under the GPU machines' triton), every op, the ragged shape, fp32 and
    fp16, each epilogue variant: verified against the reference and written as it finishes."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "SMOKE_SHAPES", ((37, 130, 77, 45),))
    monkeypatch.setattr(gpu_check, "SMOKE_DTYPES", ("float32", "float16"))
    monkeypatch.setattr(gpu_check, "SMOKE_BACKENDS", ("triton",))
    assert gpu_check.smoke(device="cpu", build=False, ops=[op]) == 0
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["verified"] for r in rows), rows
    assert len({json.dumps(r["variant"]) for r in rows}) == 2


def test_preflight_names_what_is_missing(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "REQUIRED", ("torch", "no_such_package_xyz"))
    assert gpu_check.preflight() == 1
    rows = [json.loads(line) for line in (tmp_path / "preflight.jsonl").read_text().splitlines()]
    assert any(r.get("package") == "no_such_package_xyz" and "error" in r for r in rows)
