"""Command line: `python -m cersa_kernels <command>`.

  minilm [--energy A]   convert the real MiniLM encoder to CersaLinear and report k, energy, bytes, drift
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cersa_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    minilm = commands.add_parser("minilm", help="convert the real MiniLM encoder to CersaLinear and report")
    minilm.add_argument("--energy", type=float, default=0.95, help="energy share α kept per layer (default 0.95)")
    args = parser.parse_args(argv)
    if args.command == "minilm":
        from .demo import main as minilm_main

        minilm_main(energy=args.energy)


if __name__ == "__main__":
    main()
