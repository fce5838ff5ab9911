"""Whole-model training step on the bundled MiniLM-L6 classifier (issue 19 item 1, the model level):
our LoRA (r = 8, alpha 16, dropout 0.1) beside PEFT's with the same configuration, and full
fine-tuning, the anchor both are timed against.

Rows (one group): `full-ft` (every parameter trains), `peft-lora` (`get_peft_model`, LoraConfig
r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type SEQ_CLS: the head
trains whole), `ck-lora` (`ck.apply(model, "lora", rank=8, alpha=16, dropout=0.1, task="seq_cls")`:
the same layers, the same head). One step = forward with labels, backward, AdamW step, zero_grad,
on a seeded batch of 8 × 48 token ids, in train mode (the model's own dropout on). extra_info:
peak_bytes (the most tensor bytes alive at once during one steady-state step, LiveTensorTracker)
and trainable parameters.

The rows of a pytest-benchmark group run one after the other, so their ratio carries the machine's
drift; the ratio itself is measured interleaved (each row's step in turn, round after round):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/test_bench_model_step.py [rounds]
"""
from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch

ROWS = ("full-ft", "peft-lora", "ck-lora")
BATCH, SEQ, LABELS = 8, 48, 5


def build_step(row: str):
    """(step(), trainable parameter count, resident()) for `row`: one training step of the bundled
    MiniLM-L6 classifier adapted as `row` says, each call on the same seeded batch; resident() is
    the bytes alive between steps (the model's tensors and AdamW's state)."""
    from transformers import AutoModelForSequenceClassification

    import cersa_kernels as ck
    from cersa_kernels.analyze import bundled_minilm_dir

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(bundled_minilm_dir(), num_labels=LABELS)
    if row == "peft-lora":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                 task_type=peft.TaskType.SEQ_CLS)
        model = peft.get_peft_model(model, config)
    elif row == "ck-lora":
        ck.apply(model, "lora", rank=8, alpha=16, dropout=0.1, task="seq_cls")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, LABELS, (BATCH,), generator=g)

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def resident() -> int:
        tensors = [*model.parameters(), *model.buffers(),
                   *(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    return step, sum(p.numel() for p in params), resident


def peak_bytes(step, resident) -> int:
    """The most tensor bytes alive at once during one steady-state step (after a warm-up step),
    what is resident between steps included."""
    from cersa_kernels.compare.measure import LiveTensorTracker

    step()
    with LiveTensorTracker(resident()) as tracker:
        step()
    return tracker.peak_bytes


@pytest.mark.parametrize("row", ROWS)
def test_minilm_step(benchmark, row):
    step, trainable, resident = build_step(row)
    benchmark.group = f"minilm-l6 step B{BATCH} T{SEQ} lora r8 p0.1 float32"
    benchmark.extra_info.update(op="model_step", row=row, trainable=trainable, peak_bytes=peak_bytes(step, resident))
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def interleaved(rounds: int = 9) -> None:
    """Each row's step in turn, `rounds` times after a warm-up; prints medians and ratios."""
    steps = {row: build_step(row) for row in ROWS}
    peaks = {row: peak_bytes(steps[row][0], steps[row][2]) for row in ROWS}
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(rounds):
        for row in ROWS:
            started = time.perf_counter()
            steps[row][0]()
            times[row].append(time.perf_counter() - started)
    median = {row: statistics.median(t) for row, t in times.items()}
    print(f"MiniLM-L6 classifier, batch {BATCH} x {SEQ}, fp32, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {rounds} interleaved rounds (medians)")
    print("| row | trainable | step s | vs full-ft | peak MiB | peak vs peft-lora |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        print(f"| {row} | {steps[row][1]:,} | {median[row]:.4f} | {median[row] / median['full-ft']:.2f}× | "
              f"{peaks[row] / 2**20:.1f} | {peaks[row] / peaks['peft-lora']:.2f}× |")
    print(f"ck-lora / peft-lora time: {median['ck-lora'] / median['peft-lora']:.3f}×")


if __name__ == "__main__":
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
