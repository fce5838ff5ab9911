"""Export after PARA is exact: each layer PEFT receives has the rank `para.compress` kept (no rank
made of float32 rounding noise), the written parameters are PARA's count plus the modules trained
whole, and the PEFT model computes the compressed model's logits."""
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import cersa_kernels as ck
from cersa_kernels import para

from test_heads import assert_close, classifier, logits, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_layer(kept, model):
    """PARA's kept rank for each layer the export writes (a PiCa M's for every layer of its role), 0s left out."""
    out = {}
    for layer in kept.layers:
        if layer.rank_after and layer.name.endswith(".M"):
            role = layer.name[: -len(".M")].rsplit(".", 1)[-1]
            out.update({n: layer.rank_after for n in ck.adapter_layers(model) if n.rsplit(".", 1)[-1] == role})
        elif layer.rank_after:
            out[layer.name] = layer.rank_after
    return out


@pytest.mark.parametrize(
    "method,options,exact",
    [
        ("lora", dict(rank=6), True),
        ("pica", dict(rank=4, target_modules=["query", "value"]), True),  # one M per role, exported per layer
        ("cersa", dict(energy=1.0), True),  # every σ kept: W0 + U ΔS Vᵀ is the layer's own weight
        ("cersa", dict(energy=0.9), False),  # the export keeps the residual CERSA discarded (methods.md §1)
        ("cersa", dict(energy=0.9, factor_format="int8"), False),  # quantized factors: least-squares cores
    ],
)
def test_export_after_para_keeps_paras_ranks(tmp_path, method, options, exact):
    model = classifier(1)
    ck.apply(model, method, task="seq_cls", **options)
    train(model)
    kept = para.compress(model, energy=0.6)
    ranks = per_layer(kept, model)
    assert ranks and any(layer.rank_after < layer.rank_before for layer in kept.layers)  # PARA pruned something
    compressed = logits(model)

    exported = ck.export_peft_lora(model, tmp_path)
    assert {n: k for n, k in exported.ranks.items() if k} == ranks  # before the fix: up to the full rank k of each ΔS, from rounding
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks and config["modules_to_save"] == ["classifier"]
    shapes = {name: model.get_submodule(name) for name in ranks}
    written = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    by_hand = sum(k * (shapes[n].in_features + shapes[n].out_features) for n, k in ranks.items())
    # what PARA on the model reported as the export's size is what the export writes
    assert written == kept.export_params_after == exported.export_params_after == by_hand
    head = sum(p.numel() for p in model.classifier.parameters())
    assert sum(t.numel() for t in tensors.values()) == kept.export_params_after + head

    if exact:
        peft_model = peft.PeftModel.from_pretrained(classifier(3), tmp_path).eval()
        assert_close(logits(peft_model), compressed)


def test_the_rounding_floor_keeps_a_small_genuine_update():
    """A true rank-2 update far below the layer's scale stays rank 2 (the floor is relative, not absolute)."""
    g = torch.Generator().manual_seed(0)
    B, A = 1e-4 * torch.randn(40, 2, generator=g), torch.randn(2, 30, generator=g)
    _, sigma, _ = para.para_spectrum(B, A, 1.0)
    assert int((sigma > 0).sum()) == 2
    # the same update written back through a dense float32 product: rank 2 again, not 30
    dense = (B @ A).float()
    _, sigma, _ = para.para_spectrum(dense, torch.eye(30), 1.0)
    assert int((sigma > 0).sum()) == 2
