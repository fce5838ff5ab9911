"""Layers over quantized frozen operands (docs/quantization.md): CERSA with int8 / NF4 factors and
the least-squares core refit, LoRA and PiCa over a quantized W0, bitsandbytes Linear4bit read in
place; their bytes, forward/backward against a float64 eager computation on the dequantized
weights, save/load (file size, validation), merge, PEFT export, and the errors."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import quant
from cersa_kernels.decompose import cersa_weight_bytes
from cersa_kernels.model import CONFIG_NAME, WEIGHTS_NAME
from cersa_kernels.nn import CersaLinear, LoraLinear, PicaCersaLinear, PicaLinear

FORMATS = ["int8", "nf4"]


def linear(n=96, m=64, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias)


def net(seed=0, d=32, hidden=48):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def perturb(model, seed=5, scale=0.05):
    """Stand-in for training: a non-zero update in every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ck.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


# --- CERSA: construction, bytes, refit -----------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("refit", [True, False])
def test_cersa_stores_quantized_factors_and_counts_their_exact_bytes(fmt, refit):
    m, n, k, g = 64, 100, 12, 64  # n = 100: the last group of each Vᵀ row is padded (36 of 64)
    layer = CersaLinear.from_linear(linear(n, m), rank=k, factor_format=fmt, factor_group_size=g, refit=refit)
    state = layer.state_dict()
    assert "U" not in state and "V" not in state  # no dense factor kept
    codes = torch.int8 if fmt == "int8" else torch.uint8
    per_byte = 1 if fmt == "int8" else 2
    assert state["U_data"].dtype == codes and state["U_data"].numel() == math.ceil(k * m / per_byte)
    assert state["V_data"].dtype == codes and state["V_data"].numel() == math.ceil(k * n / per_byte)
    assert state["U_absmax"].dtype == torch.float32 and state["U_absmax"].numel() == k * math.ceil(m / g)
    assert state["V_absmax"].numel() == k * math.ceil(n / g)
    assert ("core_init" in state) == refit
    U, V = layer.factors()
    assert isinstance(U, quant.QuantizedTensor) and tuple(U.shape) == (m, k) and tuple(V.shape) == (n, k)
    # the byte formula of docs/quantization.md, written out
    codes_bytes = math.ceil(k * m / per_byte) + math.ceil(k * n / per_byte)
    formula = codes_bytes + 4 * k * math.ceil(m / g) + 4 * k * math.ceil(n / g) + 4 * (k * k * (2 if refit else 1) + k)
    assert layer.weight_bytes() == layer.base_weight_bytes() == formula
    assert cersa_weight_bytes(m, n, k, factor_format=fmt, factor_group_size=g, refit=refit) == formula
    assert f"factor_format={fmt}" in repr(layer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_refit_is_the_least_squares_core_and_beats_diag_sigma(fmt):
    lin = linear(96, 64)
    dense = CersaLinear.from_linear(lin, rank=24)
    W_k = dense.dense_weight().double()
    errors = {}
    for refit in (False, True):
        layer = CersaLinear.from_linear(lin, rank=24, factor_format=fmt, refit=refit)
        errors[refit] = rel_error(layer.dense_weight().double(), W_k)
        assert torch.count_nonzero(layer.delta_core()) == 0  # step 0: ΔS = S − S* = 0
    assert errors[True] < 0.9 * errors[False], errors
    # optimality: the residual is orthogonal to the factors' span, Ûᵀ (W_k − Û S* V̂ᵀ) V̂ = 0
    U, V = layer.dense_factors(torch.float64)
    residual = W_k - U @ layer.initial_core().double() @ V.T
    assert float((U.T @ residual @ V).abs().max()) < 1e-5 * float(W_k.abs().max())
    torch.testing.assert_close(layer.sigma, dense.sigma)  # sigma keeps the original spectrum


def test_refit_with_a_trainable_block_keeps_the_rest_of_s_star():
    layer = CersaLinear.from_linear(linear(), rank=10, trainable_rank=4, factor_format="nf4")
    assert layer.S.shape == (4, 4)
    torch.testing.assert_close(layer.core().detach(), layer.core_init)
    with torch.no_grad():
        layer.S.add_(1.0)
    delta = layer.delta_core().detach()
    assert torch.count_nonzero(delta[4:]) == 0 and torch.count_nonzero(delta[:, 4:]) == 0
    torch.testing.assert_close(delta[:4, :4], torch.ones(4, 4))


def test_budget_bytes_counts_the_format_and_buys_more_rank_at_4_bits():
    budget = 8_000
    ranks = {}
    for fmt in (None, "int8", "nf4"):
        model = net()
        report = ck.apply(model, "cersa", budget_bytes=budget, factor_format=fmt)
        layers = ck.adapter_layers(model).values()
        assert sum(layer.weight_bytes() for layer in layers) <= budget
        assert report.base_bytes_after == sum(layer.weight_bytes() for layer in layers)
        ranks[fmt] = sum(layer.rank for layer in layers)
    assert ranks[None] < ranks["int8"] < ranks["nf4"], ranks


@pytest.mark.parametrize("cast", ["bfloat16", "double", "half"])
def test_dtype_casts_keep_codes_and_float32_absmax(cast):
    layer = CersaLinear.from_linear(linear(), rank=8, factor_format="nf4")
    data, absmax = layer.U_data.clone(), layer.U_absmax.clone()
    getattr(layer, cast)()
    dtype = {"bfloat16": torch.bfloat16, "double": torch.float64, "half": torch.float16}[cast]
    assert layer.U_absmax.dtype == torch.float32 and torch.equal(layer.U_absmax, absmax)
    assert torch.equal(layer.U_data, data)
    assert layer.S.dtype == dtype and layer.factors()[0].dtype == dtype  # the operand stands for the new dtype


# --- LoRA / PiCa over a quantized W0 -------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_and_pica_bases_are_stored_quantized(fmt):
    lin = linear(100, 64)
    q = quant.quantize(lin.weight.detach(), fmt, 32)
    for layer in (LoraLinear.from_linear(lin, 4, base_format=fmt, base_group_size=32),
                  PicaLinear(lin, 4, base_format=fmt, base_group_size=32)):
        state = layer.state_dict()
        assert "weight" not in state
        assert torch.equal(state["weight_data"], q.data) and torch.equal(state["weight_absmax"], q.absmax)
        assert layer.base_weight_bytes() == quant.quantized_bytes(64, 100, fmt, 32) == q.nbytes
        merged = layer.to_linear()  # merge dequantizes into a dense Linear of the original dtype
        assert merged.weight.dtype == torch.float32
        torch.testing.assert_close(merged.weight, q.dequantize() + layer.delta_weight().detach())


def test_apply_report_counts_quantized_bytes():
    model = net()
    report = ck.apply(model, "lora", rank=4, base_format="nf4", base_group_size=16)
    for row in report.rows:
        m, n = row["shape"]
        assert row["bytes_before"] == 4 * m * n
        assert row["bytes_after"] == quant.quantized_bytes(m, n, "nf4", 16)


# --- forward / backward against float64 on the dequantized weights -------------------------------

def _oracle_check(layer, weight64, trainable, x):
    """layer(x) and its gradients against y = x Wᵀ + b in float64, W = weight64(params) built from
    the dequantized operands."""
    y = layer(x)
    g = torch.Generator().manual_seed(9)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x] + [p for _, p in trainable], dy)
    x64 = x.detach().double().requires_grad_(True)
    params64 = {name: p.detach().double().requires_grad_(True) for name, p in trainable}
    bias = layer.bias.detach().double() if layer.bias is not None else 0.0
    y64 = x64 @ weight64(params64).T + bias
    want = torch.autograd.grad(y64, [x64] + list(params64.values()), dy.double())
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-4)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cersa_forward_backward_matches_float64_on_dequantized_factors(fmt):
    layer = CersaLinear.from_linear(linear(100, 64), rank=12, factor_format=fmt, factor_group_size=32,
                                    core_dtype=torch.float32)
    perturb(layer)
    U, V = layer.dense_factors(torch.float64)
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _oracle_check(layer, lambda p: U @ p["S"] @ V.T, [("S", layer.S)], x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_forward_backward_matches_float64_on_dequantized_base(fmt):
    layer = LoraLinear.from_linear(linear(100, 64), 4, alpha=8, base_format=fmt, base_group_size=32)
    perturb(layer)
    W = layer.frozen_weight().dequantize(torch.float64)
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _oracle_check(layer, lambda p: W + layer.scaling * p["lora_B"] @ p["lora_A"],
                  [("lora_A", layer.lora_A), ("lora_B", layer.lora_B)], x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pica_forward_backward_matches_float64_on_dequantized_base(fmt):
    layer = PicaLinear(linear(100, 64), 4, base_format=fmt, base_group_size=32)
    perturb(layer)
    W, P = layer.frozen_weight().dequantize(torch.float64), layer.P.double()
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _oracle_check(layer, lambda p: W + p["M"] @ P, [("M", layer.M)], x)


def test_pica_over_quantized_cersa_forward_backward_and_para():
    base = CersaLinear.from_linear(linear(100, 64), rank=12, factor_format="nf4", factor_group_size=32)
    layer = PicaCersaLinear(base, 4)
    perturb(layer)
    U, V = base.dense_factors(torch.float64)
    x = torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(1), requires_grad=True)
    _oracle_check(layer, lambda p: U @ base.S.detach().double() @ V.T + p["M"] @ V[:, :4].T, [("M", layer.M)], x)
    # PARA write-back through the non-orthonormal V̂: energy 1.0 rebuilds M exactly
    M = layer.M.detach().clone()
    ck.para.compress(nn.ModuleList([layer]), energy=1.0)
    torch.testing.assert_close(layer.M.detach(), M, atol=1e-5, rtol=1e-4)


def test_para_on_quantized_cersa_rebuilds_s_through_the_dequantized_factors():
    model = net()
    ck.apply(model, "cersa", rank=6, factor_format="nf4", factor_group_size=16)
    perturb(model)
    cores = [layer.S.detach().clone() for layer in ck.adapter_layers(model).values()]
    ck.para.compress(model, energy=1.0)
    for layer, S in zip(ck.adapter_layers(model).values(), cores):
        torch.testing.assert_close(layer.S.detach(), S, atol=1e-5, rtol=1e-4)


# --- files: save/load, validation, merge, PEFT export ---------------------------------------------

def _file_bytes(model, directory):
    ck.save(model, directory)
    return (directory / WEIGHTS_NAME).stat().st_size


def test_cersa_nf4_adapter_file_is_about_an_eighth_of_fp32(tmp_path):
    sizes = {}
    for fmt in (None, "nf4"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 512, bias=False))
        ck.apply(model, "cersa", rank=16, factor_format=fmt, refit=False)
        sizes[fmt] = _file_bytes(model, tmp_path / str(fmt))
        fresh = nn.Sequential(nn.Linear(512, 512, bias=False))
        ck.load(fresh, tmp_path / str(fmt))
        x = torch.randn(4, 512)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
        saved, loaded = model.state_dict(), fresh.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # 4 bits + one fp32 absmax per 64 = 4.5 bits per factor element, against 32: 0.14; the k×k core
    # and the safetensors header add a little (measured 0.164 here)
    assert 0.12 < sizes["nf4"] / sizes[None] < 0.17, sizes


@pytest.mark.parametrize("method,options", [
    ("cersa", dict(rank=6, factor_format="nf4", factor_group_size=16)),
    ("lora", dict(rank=4, base_format="int8", base_group_size=16)),
    ("pica", dict(rank=4, base_format="nf4", base_group_size=16)),
])
def test_save_load_merge_round_trip(method, options, tmp_path):
    original = net()
    model = copy.deepcopy(original)
    ck.apply(model, method, **options)
    perturb(model)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    ck.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    saved = config["layers"]["0"]["config"]
    key = "factor_format" if method == "cersa" else "base_format"
    assert saved[key] == options[key] and saved[key.replace("format", "group_size")] == 16
    fresh = ck.load(copy.deepcopy(original), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
        merged = ck.merge(model)
        assert all(type(m) is nn.Linear for m in (merged[0], merged[2]))
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-4)


def _rewrite(directory, edit_config=None, edit_tensors=None):
    """A self-consistent pair (fingerprints recomputed) with the config or tensors edited."""
    from safetensors.torch import load_file

    from cersa_kernels.model import write_adapter

    config = json.loads((directory / CONFIG_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if edit_config:
        edit_config(config["layers"]["0"]["config"])
    if edit_tensors:
        edit_tensors(tensors)
    write_adapter(directory, config, tensors)


def test_load_validates_format_group_size_and_shapes(tmp_path):
    model = net()
    ck.apply(model, "cersa", rank=6, factor_format="nf4", factor_group_size=16)
    ck.save(model, tmp_path / "a")
    cases = [
        (dict(factor_format="int8"), r"layer '0'.*U_data.*(shape|dtype).*int8 in groups of 16"),
        (dict(factor_group_size=8), r"layer '0'.*U_absmax.*shape \(18,\).*needs \(36,\).*groups of 8"),
        (dict(factor_format="fp4"), r"layer '0'.*unknown factor_format 'fp4'"),
    ]
    for i, (edit, message) in enumerate(cases):
        directory = tmp_path / f"case{i}"
        ck.save(model, directory)
        _rewrite(directory, edit_config=lambda c, e=edit: c.update(e))
        fresh = net()
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ValueError, match=message):
            ck.load(fresh, directory)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    directory = tmp_path / "dtype"
    ck.save(model, directory)
    _rewrite(directory, edit_tensors=lambda t: t.update({"0.U_data": t["0.U_data"].view(torch.int8)}))
    with pytest.raises(ValueError, match=r"layer '0'.*'U_data' is int8.*needs uint8 \(U is stored nf4"):
        ck.load(net(), directory)


@pytest.mark.parametrize("method,options", [
    ("cersa", dict(energy=0.9, factor_format="nf4", factor_group_size=16)),
    ("lora", dict(rank=4, alpha=8, base_format="nf4", base_group_size=16)),
    ("pica", dict(rank=4, base_format="int8", base_group_size=16)),
])
def test_export_peft_round_trip_over_the_original_dense_model(method, options, tmp_path):
    import peft  # required test dependency: imported, never skipped
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    original = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(original)
    ck.apply(model, method, **options)
    perturb(model)
    ck.export_peft_lora(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    want = copy.deepcopy(original)
    with torch.no_grad():  # the update over the ORIGINAL dense W0, from the dequantized factors
        for name, layer in ck.adapter_layers(model).items():
            want.get_submodule(name).weight.add_(layer.lowrank_update().delta_weight())
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
        got, expected, base = loaded(input_ids=ids).logits, want(input_ids=ids).logits, original(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


# --- bitsandbytes Linear4bit ---------------------------------------------------------------------

def linear4bit(n=128, m=32, nested=False, seed=0):
    import bitsandbytes as bnb  # required test dependency (CI installs it): imported, never skipped
    lin = linear(n, m, seed)
    layer = bnb.nn.Linear4bit(n, m, quant_type="nf4", compress_statistics=nested, compute_dtype=torch.float32)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("method", ["lora", "pica"])
@pytest.mark.parametrize("nested", [False, True])
def test_linear4bit_packed_weight_is_read_in_place(method, nested):
    import bitsandbytes.functional as bnb_functional

    model = nn.Sequential(linear4bit(nested=nested))
    w = model[0].weight
    dense = bnb_functional.dequantize_4bit(w.data, w.quant_state)
    report = ck.apply(model, method, rank=4)
    layer = model[0]
    assert layer.base_type == "Linear4bit" and layer.base_format == "nf4" and layer.base_group_size == 64
    assert layer.weight_data.data_ptr() == w.data.data_ptr()  # a view: no copy of the codes
    if not nested:
        assert layer.weight_absmax.data_ptr() == w.quant_state.absmax.data_ptr()
    assert "weight" not in layer.state_dict()
    torch.testing.assert_close(layer.frozen_weight().dequantize(), dense, atol=0, rtol=0)
    assert report.rows[0]["bytes_before"] >= w.numel()  # packed codes and absmax, not the dense weight


def test_linear4bit_lora_forward_matches_bitsandbytes_and_reloads(tmp_path):
    bnb_layer = linear4bit()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = bnb_layer(x)
    model = nn.Sequential(bnb_layer)
    ck.apply(model, "lora", rank=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)  # step 0 is the Linear4bit
    perturb(model)
    with torch.no_grad():
        expected = model(x)
    ck.save(model, tmp_path)
    fresh = ck.load(nn.Sequential(linear4bit()), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)


def test_cersa_over_linear4bit_decomposes_the_dequantized_weight():
    import bitsandbytes.functional as bnb_functional

    layer4 = linear4bit()
    dense = bnb_functional.dequantize_4bit(layer4.weight.data, layer4.weight.quant_state)
    model = nn.Sequential(layer4)
    ck.apply(model, "cersa", rank=32, factor_format="nf4")
    cersa = model[0]
    assert isinstance(cersa, CersaLinear) and cersa.base_type == "Linear4bit"
    assert rel_error(cersa.dense_weight(), dense) < 0.15  # full rank 32: only the NF4 error of the factors


def test_linear4bit_refusals_name_the_layer():
    import bitsandbytes as bnb  # required test dependency (CI installs it): imported, never skipped
    odd = nn.Sequential(nn.Linear(8, 8))
    odd.add_module("q", linear4bit(n=96))  # 96 is not a multiple of the block size 64
    with pytest.raises(ValueError, match=r"layer 'q'.*in_features=96, not a multiple of its block size 64"):
        ck.apply(odd, "lora", rank=2)
    with pytest.raises(ValueError, match=r"layer '0'.*Linear4bit.*SNELL"):
        ck.apply(nn.Sequential(linear4bit()), "snell", rank=4)
    with pytest.raises(ValueError, match=r"layer '0'.*Linear4bit \(nf4, block size 64\).*base_format='int8'"):
        ck.apply(nn.Sequential(linear4bit()), "lora", rank=4, base_format="int8")
    fp4 = bnb.nn.Linear4bit(128, 32, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match=r"layer '0'.*quant_type='fp4'"):
        ck.apply(nn.Sequential(fp4), "pica", rank=4)


# --- errors -------------------------------------------------------------------------------------

def test_option_errors_are_clear():
    with pytest.raises(ValueError, match=r"apply\(method='cersa'\): unknown factor_format 'int4'; expected None"):
        ck.apply(net(), "cersa", factor_format="int4")
    with pytest.raises(ValueError, match=r"layer '0'.*unknown base_format 'fp8'"):
        ck.apply(net(), "lora", rank=2, base_format="fp8")
    with pytest.raises(ValueError, match=r"PicaLinear \(0\): base_group_size must be in \[1"):
        ck.apply(net(), "pica", rank=2, base_format="nf4", base_group_size=0)
    with pytest.raises(ValueError, match=r"apply\(method='snell'\): layer '0': base_format='nf4' is not supported"):
        ck.apply(net(), "snell", rank=4, base_format="nf4")
    model = net()
    ck.apply(model, "cersa", energy=0.9)
    with pytest.raises(ValueError, match=r"layer '0' is a CersaLinear: base_format='nf4' does not apply"):
        ck.apply(model, "pica", rank=2, base_format="nf4")


def test_quantizing_a_trainable_tensor_is_refused_and_layers_quantize_a_frozen_copy():
    lin = linear()
    assert lin.weight.requires_grad
    with pytest.raises(ValueError, match=r"blocks.0.up: cannot quantize a tensor that requires grad"):
        quant.quantize(lin.weight, "nf4", where="blocks.0.up")
    layer = LoraLinear.from_linear(lin, 2, base_format="nf4")  # W0 is frozen: a detached copy is quantized
    assert not layer.frozen_weight().requires_grad


def test_a_group_size_that_does_not_divide_the_row_pads():
    layer = LoraLinear.from_linear(linear(100, 64), 2, base_format="int8", base_group_size=64)
    assert layer.weight_absmax.numel() == 64 * 2  # ceil(100 / 64) groups per row, the last one of 36
    assert layer.base_weight_bytes() == 64 * 100 + 4 * 64 * 2


def test_a_backend_that_cannot_serve_a_quantized_layer_names_it():
    from cersa_kernels.backends import BackendUnavailableError, use_backend

    model = net()
    ck.apply(model, "cersa", rank=4, factor_format="nf4", factor_group_size=16)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match=r"^0: CERSA_BACKEND=cuda cannot run"):
        model(torch.randn(2, 32))  # the layer's path in the model ("0") opens the message


@pytest.mark.parametrize("kind", ["cersa-nf4", "lora-int8", "pica-nf4", "pica-on-cersa-int8"])
def test_quantized_layers_on_the_triton_kernels_match_the_torch_reference(kind):
    # CPU CI runs the Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py)
    from cersa_kernels.backends import use_backend

    lin = linear(40, 24)
    layer = {
        "cersa-nf4": lambda: CersaLinear.from_linear(lin, rank=6, factor_format="nf4", factor_group_size=16),
        "lora-int8": lambda: LoraLinear.from_linear(lin, 4, base_format="int8", base_group_size=16),
        "pica-nf4": lambda: PicaLinear(lin, 4, base_format="nf4", base_group_size=16),
        "pica-on-cersa-int8": lambda: PicaCersaLinear(
            CersaLinear.from_linear(lin, rank=6, factor_format="int8", factor_group_size=16), 3
        ),
    }[kind]()
    perturb(layer)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            y = layer(x)
            results.append([y.detach(), *torch.autograd.grad(y.square().sum(), [x, *trainable])])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_para_over_a_quantized_lora_base_shares_it_and_keeps_a_pruned_layer_quantized():
    model = net()
    ck.apply(model, "lora", rank=4, base_format="nf4", base_group_size=16)
    with torch.no_grad():
        model[0].lora_B.normal_(generator=torch.Generator().manual_seed(4))  # model[2]'s B stays 0: rank 0
    codes = {i: model[i].weight_data.data_ptr() for i in (0, 2)}
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    result = ck.para.compress(model, energy=1.0)
    assert result.ranks["2"] == 0
    for i in (0, 2):
        assert isinstance(model[i], LoraLinear) and model[i].weight_data.data_ptr() == codes[i]  # shared, not copied
    assert model[2].rank == 1 and torch.count_nonzero(model[2].lora_B) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
