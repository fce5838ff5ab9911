"""patch_peft on QLoRA: a PEFT LoRA model over bitsandbytes `Linear4bit` NF4 layers runs the
cersa::lora op directly over bitsandbytes' packed storage (a `QuantizedTensor` view, no copy of
the codes), with outputs and gradients equal to bitsandbytes + PEFT unpatched; the layouts our
format cannot express are refused with the module's name. bitsandbytes quantizes and computes
Linear4bit on the CPU (`.to("cpu")`), so all of this runs without a GPU."""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import peft
import pytest
import torch
from torch import nn

from cersa_kernels.peft_interop import bnb_nf4_view, patch_peft, unpatch_peft

IN, HIDDEN, OUT = 128, 192, 64


def nf4_linear(linear: nn.Linear, *, nested: bool = True, blocksize: int = 64, quant_type: str = "nf4",
               compute_dtype=torch.float32) -> nn.Module:
    """`linear` as a bitsandbytes Linear4bit, quantized the way `BitsAndBytesConfig(load_in_4bit=True)`
    quantizes it (its weights copied in, then moved to the device, which quantizes)."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, compress_statistics=nested,
                                 quant_type=quant_type, blocksize=blocksize)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


class MLP(nn.Module):
    def __init__(self, **quant):
        super().__init__()
        torch.manual_seed(0)
        self.up = nf4_linear(nn.Linear(IN, HIDDEN), **quant)
        self.down = nf4_linear(nn.Linear(HIDDEN, OUT, bias=False), **quant)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def qlora(model: nn.Module, **options) -> nn.Module:
    torch.manual_seed(1)  # init_lora_weights=False: PEFT draws a non-zero B, so the adapter matters
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, **options)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "float-absmax"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_view_shares_bitsandbytes_storage_and_dequantizes_exactly(nested, blocksize):
    torch.manual_seed(0)
    layer = nf4_linear(nn.Linear(IN, HIDDEN), nested=nested, blocksize=blocksize)
    view = bnb_nf4_view(layer, "up")
    state = layer.weight.quant_state
    assert view.data.data_ptr() == layer.weight.data.data_ptr()  # the codes are bitsandbytes' own
    assert view.shape == (HIDDEN, IN) and view.group_size == blocksize and view.dtype == torch.float32
    if not nested:
        assert view.absmax.data_ptr() == state.absmax.data_ptr()
    # nested: bitsandbytes' 8-bit absmax dequantized, 1/blocksize of the weight's elements
    assert view.absmax.numel() == HIDDEN * IN // blocksize
    assert torch.equal(view.dequantize(), bnb_functional.dequantize_4bit(layer.weight.data, state))
    assert view.nbytes == HIDDEN * IN // 2 + 4 * HIDDEN * IN // blocksize


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "float-absmax"])
def test_patched_qlora_matches_bitsandbytes_and_peft(nested):
    theirs = qlora(MLP(nested=nested))
    ours = copy.deepcopy(theirs)
    assert patch_peft(ours) == ["base_model.model.down", "base_model.model.up"]
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    dy = torch.randn(3, 5, OUT, generator=torch.Generator().manual_seed(3))
    results = []
    for model in (theirs, ours):
        model.train()
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.backward(dy)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((y.detach(), xi.grad, grads))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert y1.dtype == y0.dtype == torch.float32
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    assert sorted(g1) == sorted(g0) and len(g0) == 4  # lora_A, lora_B of both layers
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=name)
    assert unpatch_peft(ours) == ["base_model.model.down", "base_model.model.up"]
    torch.testing.assert_close(ours(x), theirs(x))


def test_patched_qlora_computes_in_the_compute_dtype_and_returns_the_input_dtype():
    """A bf16 compute dtype (QLoRA's usual bnb_4bit_compute_dtype) over float32 inputs and adapters:
    like bitsandbytes, the base GEMM runs in bf16 and the output comes back in x's dtype."""
    theirs = qlora(MLP(compute_dtype=torch.bfloat16))
    ours = copy.deepcopy(theirs)
    patch_peft(ours)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(4))
    y0, y1 = theirs(x), ours(x)
    assert y1.dtype == y0.dtype == torch.float32
    # ours also runs the adapters in bf16 (one dtype per op); PEFT keeps them in float32
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-2)


def test_patched_qlora_falls_back_to_peft_when_adapters_are_disabled():
    theirs = qlora(MLP())
    ours = copy.deepcopy(theirs)
    patch_peft(ours)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(5))
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def tiny_bert_in_4bit(tmp_path, nested: bool):
    """A tiny BERT saved, then loaded the way QLoRA users load a model: `from_pretrained` with a
    `BitsAndBytesConfig` (on the CPU), then `get_peft_model`, which wraps every Linear4bit in PEFT's
    `lora.bnb.Linear4bit`."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # train mode, same outputs
    transformers.BertModel(config).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                            bnb_4bit_use_double_quant=nested)
    model = transformers.AutoModel.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], init_lora_weights=False)
    return peft.get_peft_model(model, lora)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "float-absmax"])
def test_patched_qlora_bert_from_bitsandbytes_config_matches_peft(tmp_path, nested):
    theirs = tiny_bert_in_4bit(tmp_path, nested)
    layers = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.bnb.Linear4bit)]
    assert len(layers) == 2 * 5 + 1  # query, value and three dense per layer; the pooler's dense
    ours = copy.deepcopy(theirs)
    assert patch_peft(ours) == sorted(layers)
    embeds = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(6))
    dy = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(7))
    results = []
    for model in (theirs, ours):
        model.train()
        x = embeds.clone().requires_grad_(True)
        y = model(inputs_embeds=x).last_hidden_state
        y.backward(dy)
        results.append((y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-5)
    assert sorted(g1) == sorted(g0) and len(g0) == 2 * len(layers)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "quant, message",
    [
        (dict(quant_type="fp4"), "quant_type='fp4'; only 'nf4' is read"),
        (dict(blocksize=128), "in_features=192, not a multiple of its block size 128"),
    ],
    ids=["fp4", "blocks-straddle-rows"],
)
def test_patch_peft_refuses_bnb_layouts_it_cannot_view_naming_the_module(quant, message):
    model = qlora(MLP(**quant))
    with pytest.raises(ValueError, match="base_model.model.down: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        patch_peft(model)
    assert "forward" not in model.base_model.model.up.__dict__  # a refused call patches nothing


def test_patch_peft_refuses_a_linear4bit_that_is_not_quantized_yet():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", bnb.nn.Linear4bit(IN, OUT, quant_type="nf4"))  # never moved to a device
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"base_model.model.proj: a bitsandbytes Linear4bit whose weight is not quantized yet"):
        patch_peft(model)


def test_patch_peft_refuses_8bit_bitsandbytes_layers_naming_the_module():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False).to("cpu"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"base_model.model.proj wraps a Linear8bitLt with a torch.int8 weight"):
        patch_peft(model)
