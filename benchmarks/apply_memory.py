"""Peak resident memory of `ck.apply` (and of loading a converted checkpoint), beside PEFT's
`get_peft_model`, on a random-init Llama-style model (issue 19, items 4 and 8).

    OMP_NUM_THREADS=1 python benchmarks/apply_memory.py               # all cases, writes the table
    python benchmarks/apply_memory.py --cases peft-lora ck-lora        # some cases
    python benchmarks/apply_memory.py --layers 1 --hidden 256          # a quick look
    python benchmarks/apply_memory.py --model minilm --cases ck-cersa load-ck-cersa   # the bundled MiniLM-L6

Each case runs in a fresh process: build the model (seeded), `gc.collect()`, read VmRSS, reset the
kernel's high-water mark (/proc/self/clear_refs), run the step, read VmHWM. "peak rise" is VmHWM −
VmRSS before; "end rise" what stays after; "transient" is the peak above the larger of the two
(what the step holds only while it runs). The model size is its tensor bytes. `svd-largest` is
the reference for CERSA: `decompose` of the model's largest Linear weight alone, in a process of
its own (its peak rise, LAPACK's workspace included). Not a pytest-benchmark suite: it measures
memory, not time (tests/test_apply_memory.py asserts the property on a small model by counting
tensor bytes). Writes benchmarks/results/apply-memory-cpu.md (and .json).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    "peft-lora": "PEFT get_peft_model, LoRA r=16, all-linear",
    "ck-lora": "ck.apply(model, 'lora', rank=16)",
    "ck-lora-int8": "ck.apply(model, 'lora', rank=16, base_format='int8')",
    "ck-snell": "ck.apply(model, 'snell', rank=8)",
    "ck-pica": "ck.apply(model, 'pica', rank=16)",
    "ck-cersa": "ck.apply(model, 'cersa') (energy 0.95), then ck.save_converted",
    "ck-cersa-r256-int8": "ck.apply(model, 'cersa', rank=256, factor_format='int8'), then ck.save_converted",
    "svd-largest": "decompose(largest Linear weight) alone",
    "convert-largest-r256-int8": "CersaLinear.from_linear(largest Linear, rank=256, factor_format='int8') alone",
    "load-ck-cersa": "ck.load_converted of the ck-cersa checkpoint into a meta-device model",
    "load-ck-cersa-r256-int8": "ck.load_converted of the ck-cersa-r256-int8 checkpoint into a meta-device model",
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128 or 1, num_key_value_heads=args.hidden // 128 or 1,
        vocab_size=args.vocab, tie_word_embeddings=False,
    )


def _new_model(args, meta: bool = False):
    """The measured model: the random-init Llama config, or the bundled pretrained MiniLM-L6
    (`--model minilm`, real spectra); on the meta device (no memory) for the load cases."""
    import torch
    from transformers import AutoConfig, AutoModel, LlamaForCausalLM

    if args.model == "minilm":
        from cersa_kernels.analyze import bundled_minilm_dir

        if not meta:
            model = AutoModel.from_pretrained(bundled_minilm_dir())
            with torch.no_grad():  # the weights arrive memory-mapped from the file, resident only once
                for t in list(model.parameters()) + list(model.buffers()):  # read: own them, so RSS counts them now
                    t.data = t.data.clone()
            return model
        with torch.device("meta"):
            return AutoModel.from_config(AutoConfig.from_pretrained(bundled_minilm_dir()))
    if not meta:
        return LlamaForCausalLM(_config(args))
    with torch.device("meta"):
        return LlamaForCausalLM(_config(args))


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _child(case: str, args) -> dict:
    """Run one case in this (fresh) process; return its measurements."""
    import torch

    import cersa_kernels as ck
    from cersa_kernels.decompose import decompose

    torch.manual_seed(0)
    checkpoint = Path(args.work) / case.removeprefix("load-")
    if case.startswith("load-"):
        model = _new_model(args, meta=True)
        size = sum(f.stat().st_size for f in checkpoint.iterdir())
        step = lambda: ck.load_converted(model, checkpoint)  # noqa: E731
    else:
        model = _new_model(args)
        size = _tensor_bytes(model)
        if case == "peft-lora":
            import peft

            def step():
                return peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))
        elif case == "svd-largest":
            largest = max((m for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
            weight = largest.weight.detach()
            del model
            size = weight.numel() * weight.element_size()

            def step():
                return decompose(weight, 0.95)
        elif case == "convert-largest-r256-int8":
            largest = max((m for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
            del model
            size = largest.weight.numel() * largest.weight.element_size()

            def step():
                return ck.CersaLinear.from_linear(largest, rank=256, factor_format="int8")
        else:
            method, options = {
                "ck-lora": ("lora", dict(rank=16)), "ck-lora-int8": ("lora", dict(rank=16, base_format="int8")),
                "ck-snell": ("snell", dict(rank=8)), "ck-pica": ("pica", dict(rank=16)),
                "ck-cersa": ("cersa", {}), "ck-cersa-r256-int8": ("cersa", dict(rank=256, factor_format="int8")),
            }[case]

            def step():
                return ck.apply(model, method, **options)
    gc.collect()
    before = _status("VmRSS")
    reset = Path("/proc/self/clear_refs")
    reset.write_text("5")
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    del result
    gc.collect()
    after = _status("VmRSS")
    out = dict(case=case, what=CASES[case], size=size, before=before, peak=peak, after=after, seconds=seconds)
    if case.startswith("ck-cersa"):
        shutil_rmtree(checkpoint)
        ck.save_converted(model, checkpoint)
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.iterdir())
    if case.startswith("load-"):
        out["tensor_bytes"] = _tensor_bytes(model)  # what the loaded model holds (vs the file's size)
        x = torch.randint(0, model.config.vocab_size, (1, 8))
        output = model(x)
        output = output.logits if hasattr(output, "logits") else output.last_hidden_state
        out["logits_finite"] = bool(torch.isfinite(output).all())
    return out


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _table(rows: list[dict], args) -> str:
    GB = 1e9
    model = next((r["size"] for r in rows if r["case"] == "peft-lora"), None)
    lines = [
        "# Peak RSS of apply and of loading a converted checkpoint (CPU)",
        "",
        f"Written by `benchmarks/apply_memory.py` on {time.strftime('%Y-%m-%d', time.gmtime())}: "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {args.torch}, "
        f"transformers {args.transformers}, peft {args.peft}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        (f"Model: random-init LlamaForCausalLM, hidden {args.hidden}, intermediate {args.intermediate}, "
         f"{args.layers} layers, vocab {args.vocab}, fp32" if args.model == "llama"
         else "Model: the bundled pretrained MiniLM-L6 encoder (BertModel), fp32")
        + (f": {model / GB:.3f} GB of tensors." if model else "."),
        "Each row is a fresh process; RSS high-water reset through /proc/self/clear_refs before the step.",
        "peak rise = VmHWM − VmRSS before; end rise = VmRSS after − before; transient = VmHWM − max(before, after).",
        "",
        "| case | what | size (GB) | peak rise (GB) | end rise (GB) | transient (GB) | peak rise / model | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rise, end = r["peak"] - r["before"], r["after"] - r["before"]
        transient = r["peak"] - max(r["before"], r["after"])
        ratio = f"{rise / model:+.3f}×" if model else "—"
        lines.append(
            f"| {r['case']} | {r['what']} | {r['size'] / GB:.3f} | {rise / GB:.3f} | {end / GB:+.3f} | "
            f"{transient / GB:.3f} | {ratio} | {r['seconds']:.1f} |"
        )
    checks = []
    by = {r["case"]: r for r in rows}
    if "peft-lora" in by and "ck-lora" in by and model:
        peft_rise = by["peft-lora"]["peak"] - by["peft-lora"]["before"]
        ck_rise = by["ck-lora"]["peak"] - by["ck-lora"]["before"]
        checks.append(
            f"- LoRA: ck peak rise {ck_rise / GB:.3f} GB vs PEFT {peft_rise / GB:.3f} GB + 5% of the model "
            f"({(peft_rise + 0.05 * model) / GB:.3f} GB): {'met' if ck_rise <= peft_rise + 0.05 * model else 'MISSED'}."
        )
    if "svd-largest" in by:
        svd = by["svd-largest"]["peak"] - by["svd-largest"]["before"]
        for case, alone in (("ck-cersa", None), ("ck-cersa-r256-int8", "convert-largest-r256-int8")):
            if case in by:
                r = by[case]
                transient = r["peak"] - max(r["before"], r["after"])
                line = (f"- {case}: transient {transient / GB:.3f} GB vs the largest layer's SVD alone {svd / GB:.3f} GB: "
                        f"{'met' if transient <= svd else 'MISSED'}")
                if alone in by:  # the same conversion of the largest layer alone: SVD, quantize, refit
                    one = by[alone]["peak"] - by[alone]["before"]
                    line += (f"; vs converting the largest layer alone with the same options {one / GB:.3f} GB: "
                             f"{'met' if transient <= one else 'MISSED'}")
                checks.append(line + ".")
    for case in ("load-ck-cersa", "load-ck-cersa-r256-int8"):
        if case in by:
            r = by[case]
            rise = r["peak"] - r["before"]
            checks.append(
                f"- {case}: peak rise {rise / GB:.3f} GB vs 1.2 × the checkpoint ({1.2 * r['size'] / GB:.3f} GB): "
                f"{'met' if rise <= 1.2 * r['size'] else 'MISSED'} ({rise / r['size']:.2f}×); the loaded model's tensors: "
                f"{r['tensor_bytes'] / GB:.3f} GB (the rest of the rise is the process's, not tensors); logits finite: "
                f"{r.get('logits_finite')}."
            )
    return "\n".join(lines + [""] + checks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--model", choices=("llama", "minilm"), default="llama",
                        help="llama: the random-init config below; minilm: the bundled pretrained MiniLM-L6")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--work", default=None, help="where the converted checkpoints go (default: a temp dir)")
    parser.add_argument("--out", default=None,
                        help="table path without suffix ('' for none; default benchmarks/results/apply-memory-cpu[-minilm])")
    parser.add_argument("--append", action="store_true", help="add the cases to the last run's table (same shape)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("apply-memory-cpu" if args.model == "llama" else "apply-memory-cpu-minilm"))
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return
    import peft
    import torch
    import transformers

    args.torch, args.transformers, args.peft = torch.__version__, transformers.__version__, peft.__version__
    work = args.work or tempfile.mkdtemp(prefix="apply_memory_")
    shape = ["--model", args.model, "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
             "--vocab", str(args.vocab), "--work", work]
    rows = []
    if args.append:  # keep the rows of the last run, re-measure only the cases given
        rows = [r for r in json.loads(Path(args.out + ".json").read_text())["rows"] if r["case"] not in args.cases]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for case in args.cases:
        done = subprocess.run([sys.executable, __file__, "--child", case, *shape], capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{case} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after every case: a long run that is stopped keeps what it measured
            Path(args.out + ".json").write_text(json.dumps(dict(rows=rows, shape=shape[:-2]), indent=1) + "\n")
            Path(args.out + ".md").write_text(_table(rows, args))
    if args.out:
        print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
