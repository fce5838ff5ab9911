"""Command line: `python -m cersa_kernels <command>`.

  minilm [--energy A] [--model-dir DIR]
                        convert the real MiniLM encoder to CersaLinear and report k, energy, bytes, drift
  analyze [MODEL_DIR] [--energy 0.9 0.95] [--plot out.png] [--target-share 0.5]
                        per-Linear ranks, bytes and break-even, the global-allocation alternative, and
                        the budget that holds a share of the dense bytes (no MODEL_DIR: the bundled MiniLM)
  para-peft IN OUT [--energy E | --budget N] [--force]
                        PARA rank allocation of a PEFT LoRA adapter directory
  compare [--methods ...] [--seeds N] [--device cuda] [--quick]
                        fine-tune MiniLM on BBC news with every method: accuracy vs peak training memory
  doctor [--model DIR]  environment; on a GPU, verify and time every kernel, write the table auto reads

Every command checks all of its arguments before it loads a model or trains: argparse `type=`
functions (`_cli_checks`) for each number, then the command's own check function (the first thing
its `main` does) for paths, devices, optional packages and the data. A user's mistake prints one
line `error: …` on stderr and exits with status 2; `UsageError` marks those. Any other exception
is a bug and keeps its traceback.
Adding a command: one `_add_<command>` that builds its subparser and sets `run`, listed in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys

from ._checks import UsageError
from ._cli_checks import fraction, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so a bad argument
    reaches the one error handler in `main` like every other user mistake."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see --help)")


# Each command imports its module when it runs: `--help` and argument errors stay instant
# (no torch/transformers import before the arguments are known to be right).
def _run_minilm(args) -> None:
    from .demo import main as minilm_main

    minilm_main(energy=args.energy, model_dir=args.model_dir)


def _run_analyze(args) -> None:
    from .analyze import main as analyze_main

    analyze_main(args.model_dir, args.energy, args.plot, target_share=args.target_share)


def _run_para_peft(args) -> None:
    from .para_peft import main as para_peft_main

    para_peft_main(args.in_dir, args.out_dir, energy=args.energy, budget=args.budget, force=args.force)


def _add_minilm(commands) -> None:
    p = commands.add_parser("minilm", help="convert the real MiniLM encoder to CersaLinear and report")
    p.add_argument("--energy", type=fraction, default=0.95, help="energy share α kept per layer (default 0.95)")
    p.add_argument("--model-dir", default=None, help="a Hugging Face BERT-style model directory (default: the bundled MiniLM)")
    p.set_defaults(run=_run_minilm)


def _add_analyze(commands) -> None:
    p = commands.add_parser("analyze", help="energy/rank/memory analysis of a Hugging Face model directory")
    p.add_argument("model_dir", nargs="?", default=None, help="model directory (default: the bundled MiniLM)")
    p.add_argument("--energy", type=fraction, nargs="+", default=[0.9, 0.95])
    p.add_argument("--plot", default=None, help="write a PNG of the energy curves here (needs the `plot` extra)")
    p.add_argument("--target-share", type=fraction, default=0.5,
                   help="end with the budget_bytes (and per-layer α) that holds this share of the dense Linear bytes (default 0.5)")
    p.set_defaults(run=_run_analyze)


def _add_para_peft(commands) -> None:
    p = commands.add_parser("para-peft", help="PARA: re-allocate the ranks of a PEFT LoRA adapter directory")
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=fraction, default=None, help="share ε of the pooled Σσ² kept (default 0.95)")
    rule.add_argument("--budget", type=positive_int, default=None, help="instead: most adapter parameters to keep")
    p.add_argument("--force", action="store_true", help="write into OUT_DIR even if it already holds files")
    p.set_defaults(run=_run_para_peft)


def _run_compare(args) -> None:
    from .compare.cli import run as compare_run

    compare_run(args)


def _add_compare(commands) -> None:
    from .compare.cli import add_arguments  # argparse only: no torch import

    p = commands.add_parser("compare", help="fine-tune MiniLM on BBC news with every method and compare")
    add_arguments(p)
    p.set_defaults(run=_run_compare)


def _run_doctor(args) -> None:
    from .doctor import main as doctor_main

    status = doctor_main(args.model, reps=args.reps)
    if status:
        raise SystemExit(status)


def _add_doctor(commands) -> None:
    p = commands.add_parser("doctor", help="environment; on a GPU verify and time every kernel for auto")
    p.add_argument("--model", default=None, help="time at this Hugging Face model directory's Linear shapes")
    p.add_argument("--reps", type=positive_int, default=10, help="timed repetitions per measurement (default 10)")
    p.set_defaults(run=_run_doctor)


COMMANDS = (_add_compare, _add_minilm, _add_analyze, _add_para_peft, _add_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cersa_kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv=None) -> None:
    """Parse `argv` (default sys.argv[1:]) and run the command; a UsageError becomes one line
    `error: …` on stderr and SystemExit(2)."""
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except UsageError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, whatever the message
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
