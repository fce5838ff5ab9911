"""Command line: `python -m cersa_kernels <command>`.

  minilm [--energy A]   convert the real MiniLM encoder to CersaLinear and report k, energy, bytes, drift
  analyze MODEL_DIR [--energy 0.9 0.95] [--plot out.png]
                        per-Linear ranks, bytes and break-even, and the global-allocation alternative
  para-peft IN OUT [--energy E | --budget N]   PARA rank allocation of a PEFT LoRA adapter directory
  doctor [--model DIR]  environment; on a GPU, verify and time every kernel, write the table auto reads
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cersa_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    minilm = commands.add_parser("minilm", help="convert the real MiniLM encoder to CersaLinear and report")
    minilm.add_argument("--energy", type=float, default=0.95, help="energy share α kept per layer (default 0.95)")
    analyze = commands.add_parser("analyze", help="energy/rank/memory analysis of a Hugging Face model directory")
    analyze.add_argument("model_dir")
    analyze.add_argument("--energy", type=float, nargs="+", default=[0.9, 0.95])
    analyze.add_argument("--plot", default=None, help="write a PNG of the energy curves here")
    para = commands.add_parser("para-peft", help="PARA: re-allocate the ranks of a PEFT LoRA adapter directory")
    para.add_argument("in_dir")
    para.add_argument("out_dir")
    para.add_argument("--energy", type=float, default=None, help="share ε of the pooled Σσ² kept (default 0.95)")
    para.add_argument("--budget", type=int, default=None, help="instead: most adapter parameters to keep")
    doctor = commands.add_parser("doctor", help="environment; on a GPU verify and time every kernel for auto")
    doctor.add_argument("--model", default=None, help="time at this Hugging Face model directory's Linear shapes")
    doctor.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (default 10)")
    args = parser.parse_args(argv)
    if args.command == "analyze":
        from .analyze import main as analyze_main

        analyze_main(args.model_dir, args.energy, args.plot)
    elif args.command == "minilm":
        from .demo import main as minilm_main

        minilm_main(energy=args.energy)
    elif args.command == "para-peft":
        from .para_peft import main as para_peft_main

        para_peft_main(args.in_dir, args.out_dir, energy=args.energy, budget=args.budget)
    elif args.command == "doctor":
        from .doctor import main as doctor_main

        raise SystemExit(doctor_main(args.model, reps=args.reps))


if __name__ == "__main__":
    main()
