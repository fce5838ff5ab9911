"""What `torch.compile` costs on this machine: one adapted encoder's training step, eager against
compiled (inductor), same seeds, same batches.

    OMP_NUM_THREADS=1 python scripts/compile_cost.py                   # tiny BERT, CERSA, CPU
    OMP_NUM_THREADS=1 python scripts/compile_cost.py --model minilm    # the bundled MiniLM-L6

Inductor keeps compiled code in an on-disk cache, so a second run of the same model compiles much
faster than the first: by default the run uses a fresh, empty cache (the cost a user pays once);
`--cache-dir DIR` reuses DIR (run twice with the same DIR for the warm-cache cost).
`--recompiles` instead times what a loop that changes shape pays: the same compiled model trained
at its shape, at a smaller batch (a short last batch), at a shorter length, then run in eval mode.

Eager and compiled steps alternate (two copies of the model, same init and batches), so a slow
spell of a shared machine hits both alike. Prints, for each mode, the first two steps (for
`compiled`: tracing and code generation of forward and backward included; its second step compiles
a second, smaller graph) and the median of the later steps, then the number of later steps after
which compiling has paid for its first steps (never, when a compiled step is not faster).
Wall-clock timings on a shared machine: repeat a run before trusting a difference of a few percent.
"""
import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time

import torch

import cersa_kernels as ck


def build(model_name: str, method: str) -> torch.nn.Module:
    """An encoder with a 5-class head, adapted with `method` ("none": dense fine-tuning)."""
    import transformers

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" notice
    torch.manual_seed(0)
    if model_name == "minilm":
        from cersa_kernels.analyze import bundled_minilm_dir

        model = transformers.AutoModelForSequenceClassification.from_pretrained(bundled_minilm_dir(), num_labels=5)
    else:
        config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=512, max_position_embeddings=64, num_labels=5)
        model = transformers.BertForSequenceClassification(config)
    if method == "cersa":
        ck.apply(model, "cersa", target_modules=["query", "key", "value", "dense"], energy=0.95)
    elif method == "lora":
        ck.apply(model, "lora", target_modules=["query", "key", "value", "dense"], rank=8)
    return model.train()


class Run:
    """One model's training loop (forward, backward, AdamW) over fixed-shape seeded batches."""

    def __init__(self, model: torch.nn.Module, batch: int, seq: int):
        self.model, self.batch, self.seq = model, batch, seq
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        self.g = torch.Generator().manual_seed(1)
        self.vocab = model.config.vocab_size

    def step(self) -> float:
        """Seconds for one training step."""
        ids = torch.randint(0, self.vocab, (self.batch, self.seq), generator=self.g)
        labels = torch.randint(0, 5, (self.batch,), generator=self.g)
        start = time.perf_counter()
        self.model(input_ids=ids, labels=labels).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def recompiles(model_name: str, method: str, batch: int, seq: int) -> None:
    """Seconds of the compiled model's steps at changing shapes, with dynamo's count of graphs."""
    from torch._dynamo.utils import counters

    model = torch.compile(build(model_name, method))
    run = Run(model, batch, seq)
    for label, shape in [("first step", (batch, seq)), ("same shape", (batch, seq)),
                         ("smaller batch", (batch - 3, seq)), ("shorter sequence", (batch, seq - 8))]:
        run.batch, run.seq = shape
        seconds = run.step()
        graphs = counters["stats"]["unique_graphs"]
        print(f"{label:17s} {shape[0]} x {shape[1]}: {seconds:7.2f} s, graphs compiled so far {graphs}")
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=torch.randint(0, run.vocab, (batch, seq), generator=run.g))
    print(f"{'eval mode':17s} {batch} x {seq}: {time.perf_counter() - start:7.2f} s, graphs compiled so far "
          f"{counters['stats']['unique_graphs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--method", choices=["cersa", "lora", "none"], default="cersa")
    parser.add_argument("--steps", type=int, default=16, help="steps per mode, the first two included (>= 3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--cache-dir", help="inductor's cache directory (default: a fresh empty one)")
    parser.add_argument("--recompiles", action="store_true", help="time the recompiles of changing shapes instead")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps must be >= 3 (two first steps and a later one), got {args.steps}")
    if args.batch < 4 or args.seq < 9:
        parser.error(f"--batch must be >= 4 and --seq >= 9 (--recompiles shrinks both), got {args.batch}, {args.seq}")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor-cold-")
    if not args.cache_dir:
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles, which is below

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.model}, method {args.method}, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps per mode, "
          f"inductor cache {'given: ' + cache if args.cache_dir else 'fresh (cold)'}")
    if args.recompiles:
        recompiles(args.model, args.method, args.batch, args.seq)
        return
    eager = Run(build(args.model, args.method), args.batch, args.seq)
    compiled = Run(torch.compile(build(args.model, args.method)), args.batch, args.seq)
    times = {"eager": [], "compiled": []}
    for _ in range(args.steps):  # interleaved, so a slow spell of a shared machine hits both alike
        times["eager"].append(eager.step())
        times["compiled"].append(compiled.step())
    # the second compiled step compiles a second, smaller graph (about 1 s): "first" is steps 1-2
    results = {mode: (t[0] + t[1], statistics.median(t[2:])) for mode, t in times.items()}
    for mode, (one, rest) in results.items():
        print(f"{mode:9s} first 2 steps {one:8.2f} s   later steps (median of {args.steps - 2}) {rest:.3f} s")
    (eager_first, eager_later), (comp_first, comp_later) = results["eager"], results["compiled"]
    saved = eager_later - comp_later
    if saved > 0:
        extra = comp_first - eager_first
        print(f"compiled later steps are {eager_later / comp_later:.2f}x faster; the compile "
              f"({extra:.1f} s extra on the first two steps) pays after {extra / saved:.0f} steps")
    else:
        print(f"compiled later steps are {comp_later / eager_later:.2f}x the eager time: compiling never pays here")


if __name__ == "__main__":
    main()
