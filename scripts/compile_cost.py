"""What `torch.compile` costs on this machine: one adapted encoder's training step, eager against
compiled (inductor), same seeds, same batches.

    OMP_NUM_THREADS=1 python scripts/compile_cost.py                   # tiny BERT, CERSA, CPU
    OMP_NUM_THREADS=1 python scripts/compile_cost.py --model minilm    # the bundled MiniLM-L6

Prints, for each mode, the first step (for `compiled`: tracing and code generation of forward and
backward included) and the median of the later steps, then the number of later steps after which
compiling has paid for its first step (never, when a compiled step is not faster). Wall-clock
timings on a shared machine: repeat a run before trusting a difference of a few percent.
"""
import argparse
import statistics
import time

import torch

import cersa_kernels as ck


def build(model_name: str, method: str) -> torch.nn.Module:
    """An encoder with a 5-class head, adapted with `method` ("none": dense fine-tuning)."""
    import transformers

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


def step_times(model: torch.nn.Module, steps: int, batch: int, seq: int, vocab: int) -> list[float]:
    """Seconds per training step (forward, backward, AdamW), one fixed-shape batch per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = torch.randint(0, 5, (batch,), generator=g)
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--method", choices=["cersa", "lora", "none"], default="cersa")
    parser.add_argument("--steps", type=int, default=6, help="steps per mode, the first one included (>= 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=48)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (a first step and a later one), got {args.steps}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {args.model}, method {args.method}, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps per mode")
    results = {}
    for mode in ("eager", "compiled"):
        model = build(args.model, args.method)
        vocab = model.config.vocab_size
        if mode == "compiled":
            torch._dynamo.reset()
            model = torch.compile(model)
        times = step_times(model, args.steps, args.batch, args.seq, vocab)
        results[mode] = (times[0], statistics.median(times[1:]))
        print(f"{mode:9s} first step {times[0]:8.2f} s   later steps (median of {len(times) - 1}) {results[mode][1]:.3f} s")
    (eager_first, eager_later), (comp_first, comp_later) = results["eager"], results["compiled"]
    saved = eager_later - comp_later
    if saved > 0:
        print(f"compiled later steps are {eager_later / comp_later:.2f}x faster; the compile "
              f"({comp_first - eager_first:.1f} s extra on the first step) pays after {(comp_first - eager_first) / saved:.0f} steps")
    else:
        print(f"compiled later steps are {comp_later / eager_later:.2f}x the eager time: compiling never pays here")


if __name__ == "__main__":
    main()
