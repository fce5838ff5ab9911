"""Benchmark entries of the ops over quantized frozen weights (cersa_kernels.quant: int8 / NF4 in
groups of 64 along the stored row, one float32 absmax per group).

- `lowrank_q` (cersa::lowrank_q, the lowrank op with CERSA's frozen factors V (n×k) and U (m×k)
  quantized; variants int8, nf4): rows `lowrank_q-<backend>` (the op reading the codes), `dequant+lowrank` (what a user without
  quantized kernels runs: dequantize both factors, then the unquantized op, every call),
  `fp-factors` (the op over the float factors: the unquantized speed) and `dense` (nn.Linear).
- `lora_q` (cersa::lora_q, W0 (m×n) quantized; variants int8, nf4; dropout off): rows `lora_q-<backend>`,
  `dequant+lora`, `fp-W0` (the op over the float W0), and for nf4 `bnb+peft` (bitsandbytes
  `Linear4bit` NF4 + PEFT LoRA, as QLoRA users run it) and `bnb+peft-patched` (the same model after
  `patch_peft`: our op over bitsandbytes' storage).

extra_info adds, per row: `operand_bytes` (the bytes of the frozen and trained operands as that row
stores them: codes + absmax for a quantized operand, bitsandbytes' codes + absmax + code table for
the bnb rows), `materialized_bytes` (the dense copies of the quantized weight a row writes, and reads
back, in one call: see `_materialized`; 0 where the kernel reads the codes) and `read_bytes` (the
bytes one call reads at least: its operands as stored, the activations of the mode, and those copies).
Small shapes run on the CPU in CI; the LLM shapes (d = 4096, k = 2048; MLP 4096 → 11008) are
marked gpu. The groups, timing and the rest of extra_info come from bench_harness.
"""
from __future__ import annotations

import torch
from torch import nn

from cersa_kernels.ops import lora_linear, lowrank_linear
from cersa_kernels.quant import QuantizedTensor, quantize

from bench_harness import DENSE, DEVICE, Baseline, BenchOp, Forward, benchmark_test
from test_bench_lora import ALPHA
from test_bench_lora import flops as lora_flops
from test_bench_lowrank import flops as lowrank_flops
from test_bench_lowrank import make as lowrank_make

FORMATS = {fmt: {"format": fmt} for fmt in ("int8", "nf4")}
GROUP = 64


def _bytes(t) -> int:
    if t is None or isinstance(t, (int, float, str)):
        return 0
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def _materialized(row: str, mode: str, dense: int) -> int:
    """Bytes of dense copies of the quantized weight(s) (`dense` bytes each time) a row writes in one
    call of `mode`: the torch reference dequantizes inside each product that reads the weight (once
    in forward, once in backward; `bnb+peft-patched` runs it under auto, which picks torch until a
    quantized kernel is verified), bitsandbytes' matmul_4bit dequantizes W0 in forward and again in
    backward, `dequant+<op>` dequantizes once in forward (its backward reuses the saved copy), the
    Triton kernels dequantize tiles in registers, the float rows hold no quantized weight."""
    if row.endswith("-torch") or row in ("bnb+peft", "bnb+peft-patched"):
        per_mode = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}
    elif row.startswith("dequant+"):
        per_mode = {"fwd": 1, "bwd": 0, "fwd+bwd": 1}
    else:
        per_mode = {"fwd": 0, "bwd": 0, "fwd+bwd": 0}
    return per_mode[mode] * dense


# --- lowrank over quantized factors ----------------------------------------------------------------

def quantize_factors(i: dict) -> dict:
    """V and U as QuantizedTensors of the case's dtype and device (the float factors kept as Vf, Uf
    for the unquantized rows)."""
    i = dict(i, Vf=i["V"], Uf=i["U"])
    i["V"], i["U"] = (quantize(i[name].detach(), i["format"], GROUP) for name in ("Vf", "Uf"))
    return i


def dequant_lowrank(i, dims):
    x, S, bias, V, U = i["x"], i["S"], i["bias"], i["V"], i["U"]
    return Forward(lambda: lowrank_linear(x, V.dequantize(), S, U.dequantize(), bias))


def fp_factors(i, dims):
    x, S, bias, V, U = i["x"], i["S"], i["bias"], i["Vf"], i["Uf"]
    return Forward(lambda: lowrank_linear(x, V, S, U, bias), (V, U))


def lowrank_extra(i, dims, row, mode):
    T, n, m, k = dims["T"], dims["n"], dims["m"], dims["k"]
    e = i["x"].element_size()
    factors = (i["Vf"], i["Uf"]) if row in ("fp-factors",) else (i["V"], i["U"])
    if row == "dense":
        operands = e * (m * n + m)
    else:
        operands = sum(_bytes(f) for f in factors) + _bytes(i["S"]) + _bytes(i["bias"])
    materialized = _materialized(row, mode, sum(q.dense_nbytes() for q in (i["V"], i["U"])))
    fwd = e * T * n + operands
    bwd = e * T * m + e * T * (n if row == "dense" else k) + operands  # dy and x (dense) or h = x V
    read = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] + materialized  # each copy read back once
    return dict(operand_bytes=operands, materialized_bytes=materialized, read_bytes=read)


LOWRANK_QUANT = BenchOp(
    op="lowrank_q", dims=("T", "n", "m", "k"),
    cpu_shapes=[(256, 512, 512, 128)],
    gpu_shapes=[(8192, 4096, 4096, 2048), (8192, 4096, 11008, 2048)],
    make=lowrank_make, prepare=quantize_factors, extra=lowrank_extra,
    call=lambda i: lowrank_linear(i["x"], i["V"], i["S"], i["U"], i["bias"]),
    flops=lowrank_flops, grads=("x", "S"), backends=("torch", "triton"),
    baselines=(Baseline("dequant+lowrank", dequant_lowrank), Baseline("fp-factors", fp_factors), DENSE),
    variants=FORMATS,
)

test_lowrank_quant = benchmark_test(LOWRANK_QUANT)


# --- lora over a quantized W0 ----------------------------------------------------------------------

def lora_make(draw, T, n, m, r):
    return dict(x=draw.randn(T, n), W=draw.randn(m, n, scale=n**-0.5), bias=draw.randn(m),
                A=draw.randn(r, n, scale=n**-0.5), B=draw.randn(m, r, scale=0.01))


def quantize_w0(i: dict) -> dict:
    return dict(i, Wf=i["W"], W=quantize(i["W"].detach(), i["format"], GROUP))


def _lora(i, W):
    return lora_linear(i["x"], W, i["A"], i["B"], i["bias"], ALPHA / i["A"].shape[0])


def dequant_lora(i, dims):
    return Forward(lambda: _lora(i, i["W"].dequantize()))


def fp_w0(i, dims):
    return Forward(lambda: _lora(i, i["Wf"]), (i["Wf"],))


def _bnb_peft(i, dims, patched: bool):
    """bitsandbytes Linear4bit NF4 (blocksize 64, float32 absmax: BitsAndBytesConfig's defaults)
    holding W0 and bias, wrapped by PEFT's LoRA with the entry's A, B and scale."""
    import bitsandbytes as bnb
    import peft

    from cersa_kernels.peft_interop import patch_peft

    x, W, dtype = i["x"], i["Wf"], i["x"].dtype
    base = bnb.nn.Linear4bit(dims["n"], dims["m"], compute_dtype=dtype, compress_statistics=False, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(W.detach().float().cpu(), requires_grad=False, compress_statistics=False,
                                    quant_type="nf4", blocksize=GROUP)
    base.bias = nn.Parameter(i["bias"].detach().clone().cpu(), requires_grad=False)
    holder = nn.Module()
    holder.proj = base.to(DEVICE)
    r = i["A"].shape[0]
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(i["A"])
        layer.lora_B["default"].weight.copy_(i["B"])
    if patched:
        patch_peft(model)
    state = layer.base_layer.weight.quant_state
    return Forward(lambda: layer(x),
                   (layer.base_layer.weight, layer.base_layer.bias, state.absmax, state.code))


def lora_extra(i, dims, row, mode):
    T, n, m, r = dims["T"], dims["n"], dims["m"], dims["r"]
    e = i["x"].element_size()
    others = _bytes(i["A"]) + _bytes(i["B"]) + _bytes(i["bias"])
    if row == "dense":
        operands, others = e * (m * n + m), 0
    elif row == "fp-W0":
        operands = _bytes(i["Wf"])
    elif row.startswith("bnb+peft"):
        operands = m * n // 2 + 4 * (m * n // GROUP) + 4 * 16  # bitsandbytes' codes, absmax, code table
    else:
        operands = _bytes(i["W"])
    operands += others
    materialized = _materialized(row, mode, i["W"].dense_nbytes())
    fwd = e * T * n + operands
    bwd = e * T * m + e * T * n + (0 if row == "dense" else e * T * r) + operands  # dy, x, x·Aᵀ
    read = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] + materialized  # each copy read back once
    return dict(operand_bytes=operands, materialized_bytes=materialized, read_bytes=read)


def _is_nf4(variant) -> bool:
    return variant["format"] == "nf4"


LORA_QUANT = BenchOp(
    op="lora_q", dims=("T", "n", "m", "r"),
    cpu_shapes=[(256, 512, 512, 16)],
    gpu_shapes=[(8192, 4096, 4096, 16), (8192, 4096, 11008, 16)],
    make=lora_make, prepare=quantize_w0, extra=lora_extra,
    call=lambda i: _lora(i, i["W"]),
    flops=lora_flops, grads=("x", "A", "B"),
    baselines=(
        Baseline("dequant+lora", dequant_lora), Baseline("fp-W0", fp_w0),
        Baseline("bnb+peft", lambda i, d: _bnb_peft(i, d, patched=False), applies=_is_nf4),
        Baseline("bnb+peft-patched", lambda i, d: _bnb_peft(i, d, patched=True), applies=_is_nf4),
        DENSE,
    ),
    variants=FORMATS,
)

test_lora_quant = benchmark_test(LORA_QUANT)
