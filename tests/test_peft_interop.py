"""PEFT interop against the real `peft` package: from_peft (a PEFT LoRA adapter directory into our
LoraLinear layers), the round trip PEFT -> ours -> train -> PARA -> export_peft_lora -> PEFT,
patch_peft / unpatch_peft (PEFT's lora.Linear on our op, in place), the bytes autograd saves per
patched layer, and the errors a PEFT user meets. Tiny random-init transformers models, offline."""
import copy
import json
import os

import peft
import pytest
import torch
import transformers
from torch import nn

import cersa_kernels as ck
from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.nn import LoraLinear
from cersa_kernels.para import compress
from cersa_kernels.peft_interop import from_peft, patch_peft, unpatch_peft
from cersa_kernels.reference.lora import dropout_keep

from op_harness import saved_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 96


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg).eval()


def outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# init_lora_weights=False: PEFT draws a non-zero B, so the adapter changes the outputs
CONFIGS = {
    "llama": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"up_proj": 3},
    ),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, rank_pattern={"c_fc": 3}),
    "bert": dict(r=3, lora_alpha=5, target_modules=["query", "value", "dense"], lora_dropout=0.1),
}


def peft_adapter(base, directory, adapter_name="default", **options):
    """A PEFT LoRA adapter directory written by PEFT itself; returns its config as saved."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options), adapter_name)
    model.save_pretrained(directory)
    sub = directory if adapter_name == "default" else directory / adapter_name
    return json.loads((sub / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_from_peft_matches_peft_from_pretrained(kind, tmp_path):
    base = tiny(kind)
    peft_adapter(base, tmp_path, **CONFIGS[kind])
    ours = copy.deepcopy(base)
    report = from_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert sorted(r["name"] for r in report.rows) == sorted(peft_layers)
    for name, theirs_layer in peft_layers.items():  # per-module rank and scale as PEFT resolved them
        layer = ours.get_submodule(name)
        assert isinstance(layer, LoraLinear)
        assert layer.rank == theirs_layer.r["default"]
        assert layer.scaling == pytest.approx(theirs_layer.scaling["default"], rel=1e-12)
        assert layer.dropout == CONFIGS[kind].get("lora_dropout", 0.0)
    assert [p for p in ours.parameters() if p.requires_grad] == [
        p for layer in ck.model.adapter_layers(ours).values() for p in (layer.lora_A, layer.lora_B)
    ]
    if kind == "llama":  # the patterns took effect
        assert ours.get_submodule("model.layers.1.self_attn.q_proj").rank == 6
        assert ours.get_submodule("model.layers.0.self_attn.q_proj").rank == 4
        assert ours.get_submodule("model.layers.0.self_attn.v_proj").rank == 2
        assert ours.get_submodule("model.layers.0.mlp.up_proj").scaling == pytest.approx(3 / 2)  # 3/√4 (rslora)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        got, want, plain = outputs(ours, ids), outputs(theirs, ids), outputs(base, ids)
    assert (want - plain).abs().max() > 1e-2  # the adapter is not trivially zero
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_round_trip_peft_ours_train_para_export_peft(kind, tmp_path):
    base = tiny(kind)
    peft_adapter(base, tmp_path / "in", **dict(CONFIGS[kind], lora_dropout=0.1))
    ours = copy.deepcopy(base)
    from_peft(ours, tmp_path / "in")
    ours.train()
    opt = torch.optim.AdamW(ck.trainable_parameters(ours), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 12))
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for _ in range(3):
        loss = ours(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in ours.named_parameters() if p.requires_grad)
    ours.eval()
    result = compress(ours, energy=0.9)
    assert result.params_after < result.params_before  # PARA pruned something
    exported = ck.export_peft_lora(ours, tmp_path / "out")
    assert exported.ranks == result.ranks  # energy=1.0 export keeps the compressed ranks exactly
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    test_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(outputs(theirs, test_ids), outputs(ours, test_ids), atol=2e-5, rtol=1e-4)


# --- refusals ----------------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(target_modules=["q_proj"], use_dora=True), r"DoRA \(use_dora=True\)"),
        (dict(target_modules=["q_proj"], bias="lora_only"), r"bias training \(bias='lora_only'\)"),
        (dict(target_modules=["q_proj"], lora_bias=True), r"lora_bias=True"),
        (dict(target_modules=["q_proj", "embed_tokens"]), r"embedding LoRA for \['model\.embed_tokens'\]"),
    ],
)
def test_from_peft_refuses_what_lora_linear_cannot_reproduce(options, message, tmp_path):
    base = tiny("llama")
    peft_adapter(base, tmp_path, r=2, **options)
    with pytest.raises(ValueError, match=message):
        from_peft(copy.deepcopy(base), tmp_path)


def test_from_peft_refuses_conv_lora_naming_the_module(tmp_path):
    torch.manual_seed(0)
    net = ConvNet()
    peft_adapter(net, tmp_path, r=2, target_modules=["conv", "fc"])
    with pytest.raises(ValueError, match=r"module 'conv' is a Conv2d"):
        from_peft(ConvNet(), tmp_path)


def test_from_peft_refuses_non_lora_adapters(tmp_path):
    base = tiny("llama")
    peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a LOHA adapter; only LoRA"):
        from_peft(copy.deepcopy(base), tmp_path)


def test_from_peft_refuses_an_adapter_for_another_model(tmp_path):
    peft_adapter(tiny("llama"), tmp_path, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"adapts 'model\.layers\.0\.self_attn\.q_proj', which the model does not have"):
        from_peft(tiny("gpt2"), tmp_path)


# --- patch_peft ------------------------------------------------------------------------------------

class CountCersaOps(AllocationRecorder):
    """The cersa::lora_fwd / lora_bwd calls that run under it: `calls` {"fwd": n, "bwd": n}."""

    @property
    def calls(self):
        return {kind: self.cersa_ops.count(f"lora_{kind}") for kind in ("fwd", "bwd")}


def peft_model(kind, **options):
    config = dict(CONFIGS[kind], lora_dropout=0.0)
    config.update(options)
    return peft.get_peft_model(tiny(kind), peft.LoraConfig(init_lora_weights=False, **config))


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = outputs(model, ids).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_patched_forward_and_grads_match_peft(kind):
    model = peft_model(kind)
    names_before = [n for n, _ in model.named_parameters()]
    keys_before = list(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    want_loss, want_grads = loss_and_grads(model, ids)
    patched = patch_peft(model)
    assert len(patched) == sum(isinstance(m, peft.tuners.lora.Linear) for m in model.modules()) > 0
    with CountCersaOps() as count:
        got_loss, got_grads = loss_and_grads(model, ids)
    assert count.calls == {"fwd": len(patched), "bwd": len(patched)}  # every LoRA layer ran on our op
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    assert sorted(got_grads) == sorted(want_grads) and len(got_grads) == 2 * len(patched)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert [n for n, _ in model.named_parameters()] == names_before and list(model.state_dict()) == keys_before
    assert unpatch_peft(model) == patched
    with CountCersaOps() as count:
        torch.testing.assert_close(loss_and_grads(model, ids)[0], want_loss)
    assert count.calls == {"fwd": 0, "bwd": 0}


def test_patched_model_keeps_peft_features(tmp_path):
    model = peft_model("llama").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), model.disable_adapter():
        base_out = outputs(model, ids)
    with torch.no_grad():
        want = outputs(model, ids)
    # a second adapter, then switch: both must run on our op and match PEFT
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "q_proj"], init_lora_weights=False))
    model.set_adapter("other")
    with torch.no_grad():
        want_other = outputs(model, ids)
    model.set_adapter("default")
    patch_peft(model)
    with torch.no_grad(), CountCersaOps() as count:
        torch.testing.assert_close(outputs(model, ids), want, atol=1e-6, rtol=1e-5)
        with model.disable_adapter():  # PEFT's path: the base model alone, no op call
            torch.testing.assert_close(outputs(model, ids), base_out)
        assert count.calls["fwd"] == 6  # q, v, up in 2 layers (k_proj has no "default": PEFT's path)
        model.set_adapter("other")
        torch.testing.assert_close(outputs(model, ids), want_other, atol=1e-6, rtol=1e-5)
        assert count.calls["fwd"] == 6 + 4  # q, k in 2 layers (v, up have no "other": PEFT's path)
        model.set_adapter("default")
    # save_pretrained writes PEFT's format; a fresh PEFT model loads it to the same outputs
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(reloaded, ids), want, atol=1e-6, rtol=1e-5)
    # deepcopy keeps the patch, bound to the copy
    twin = copy.deepcopy(model)
    with torch.no_grad(), CountCersaOps() as count:
        torch.testing.assert_close(outputs(twin, ids), want, atol=1e-6, rtol=1e-5)
    assert count.calls["fwd"] == 6
    # merge_and_unload: plain Linear layers with W0 + s·B·A
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, ids), want, atol=1e-5, rtol=1e-4)


def single_layer(p, T=64, n=96, m=40, r=8, seed=0):
    """The PEFT lora.Linear over one nn.Linear(n, m), in training mode, and an input (T, n)."""
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(n, m))
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc"], lora_dropout=p, init_lora_weights=False))
    layer = model.base_model.model.fc
    return model.train(), layer, torch.randn(T, n, requires_grad=True)


def test_patched_dropout_mask_is_ours_regenerated_from_a_seed():
    p, T, n = 0.3, 64, 96
    model, layer, x = single_layer(p, T=T, n=n)
    patch_peft(model)
    with torch.no_grad():  # make both the output and dx show the mask: W0 = 0, A = B = 1
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(1.0)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)  # the draw the patched forward makes
    torch.manual_seed(123)
    y = layer(torch.ones(T, n, requires_grad=True))
    keep = dropout_keep(T, n, p, seed)
    s, r = layer.scaling["default"], layer.r["default"]
    bias = layer.base_layer.bias.detach()
    # y[t, :] = b + s·r·Σ_j keep[t, j]/(1−p)
    torch.testing.assert_close(y - bias, (s * r * keep.sum(1, keepdim=True) / (1 - p)).expand_as(y), atol=1e-4, rtol=1e-5)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept  # 6144 draws: 5 standard deviations
    xin = torch.ones(T, n, requires_grad=True)
    torch.manual_seed(123)
    layer(xin).sum().backward()  # dx = drop'(g A): the same mask, regenerated from the seed
    expected_dx = torch.where(keep, s * y.shape[1] * r / (1 - p), 0.0)
    torch.testing.assert_close(xin.grad, expected_dx, atol=1e-4, rtol=1e-5)
    model.eval()  # eval: no dropout, no seed drawn
    state = torch.get_rng_state()
    layer(torch.ones(T, n))
    assert torch.equal(torch.get_rng_state(), state)


def saved_activation_bytes(layer, x):
    """Bytes autograd saves for one call of `layer`, without the layer's own parameters; the call
    stays differentiable with what was saved."""
    total, y, _ = saved_bytes(lambda: layer(x), list(layer.parameters()))
    y.sum().backward()
    return total


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_per_patched_layer_against_peft(p):
    T, n, r = 64, 96, 8
    model, layer, x = single_layer(p, T=T, n=n, r=r)
    peft_bytes = saved_activation_bytes(layer, x)
    patch_peft(model)
    ours = saved_activation_bytes(layer, x)
    # ours: x (T·n fp32) and x·Aᵀ (T·r fp32), plus the 8-byte seed when dropout is on
    assert ours == 4 * T * (n + r) + (8 if p > 0 else 0)
    # PEFT: the same without dropout (x for lora_A; the frozen base Linear keeps no activation);
    # with it, lora_A keeps the dropped copy of x instead, and dropout keeps its mask (float32 on CPU)
    assert peft_bytes == 4 * T * (n + r) + (4 * T * n if p > 0 else 0)
    print(f"saved bytes per layer, T={T} n={n} r={r} p={p}: PEFT {peft_bytes}, patched {ours}")


# --- errors a PEFT user meets ------------------------------------------------------------------------

def test_patch_errors_name_the_module():
    with pytest.raises(ValueError, match=r"patch_peft: Sequential has no PEFT LoRA layer"):
        patch_peft(nn.Sequential(nn.Linear(4, 4)))
    conv = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, target_modules=["conv", "fc"]))
    with pytest.raises(ValueError, match=r"base_model\.model\.conv is a LoRA Conv2d over a Conv2d"):
        patch_peft(conv)
    emb = peft_model("llama", target_modules=["q_proj", "embed_tokens"], rank_pattern={}, alpha_pattern={})
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.embed_tokens is a LoRA Embedding over a Embedding"):
        patch_peft(emb)
    dora = peft_model("llama", target_modules=["q_proj"], use_dora=True, rank_pattern={}, alpha_pattern={})
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj uses \['DoraLinearVariant'\]"):
        patch_peft(dora)
    mixed = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]), mixed=True)
    mixed.add_adapter("loha", peft.LoHaConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj is a peft\.tuners\.loha\.layer\.Linear .*mixed adapter types"):
        patch_peft(mixed)
    # nothing was patched by a refused call
    assert all("forward" not in m.__dict__ for model in (conv, emb, dora, mixed) for m in model.modules())


# --- issue 16 item 9: refuse or serve, never crash later ---------------------------------------------

def two_layer_peft(**options):
    """A PEFT LoRA model over fc (8 -> 6) -> fc2 (6 -> 4), adapter "default" on fc only."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(8, 6))
    net.add_module("fc2", nn.Linear(6, 4))
    return peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False, **options))


def test_patch_refuses_a_trainable_base_weight_naming_the_module():
    model = two_layer_peft()
    model.base_model.model.fc.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"^patch_peft: .*base_model\.model\.fc has a base weight that requires grad"):
        patch_peft(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_base_weight_made_trainable_after_patching_runs_peft_and_gets_its_gradient():
    model = two_layer_peft()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    weight = model.base_model.model.fc.base_layer.weight
    weight.requires_grad_(True)
    model(x).sum().backward()
    want = weight.grad.clone()
    weight.requires_grad_(False)
    weight.grad = None
    patch_peft(model)
    weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"base weight of 'base_model\.model\.fc' requires grad.*PEFT's own forward"):
        with CountCersaOps() as count:
            model(x).sum().backward()
    assert count.calls["fwd"] == 0
    torch.testing.assert_close(weight.grad, want)


def test_double_backward_raises_one_clear_error():
    model = two_layer_peft()
    patch_peft(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)  # first order is fine
    with pytest.raises(RuntimeError, match=r"^patch_peft: layer 'base_model\.model\.fc': the fused op cersa::lora has "
                                           r"no double backward.*create_graph=True.*unpatch_peft\(model\)"):
        g.square().sum().backward()
    # the way out works: PEFT's forward supports the gradient penalty
    unpatch_peft(model)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert model.base_model.model.fc.lora_A["default"].weight.grad is not None


def test_adapter_added_after_patching_runs_on_our_op(tmp_path):
    reference = two_layer_peft()
    other = peft.LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(reference)
    patch_peft(model)
    torch.manual_seed(5)
    reference.add_adapter("other", other)
    torch.manual_seed(5)  # the same draw of the new lora weights
    model.add_adapter("other", copy.deepcopy(other))
    for adapter in ("other", "default"):
        reference.set_adapter(adapter)
        model.set_adapter(adapter)
        with torch.no_grad(), CountCersaOps() as count:
            torch.testing.assert_close(model(x), reference(x))
        assert count.calls["fwd"] == 1, adapter  # fc2 for "other", fc for "default"
    # load_adapter goes through add_adapter: patched too
    reference.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = two_layer_peft()
    patch_peft(loaded)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    reference.set_adapter("other")
    with torch.no_grad(), CountCersaOps() as count:
        torch.testing.assert_close(loaded(x), reference(x))
    assert count.calls["fwd"] == 1
    assert unpatch_peft(loaded) == ["base_model.model.fc", "base_model.model.fc2"]
    assert "add_adapter" not in loaded.__dict__
