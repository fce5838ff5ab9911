"""The ops with quantized frozen operands (`quant.QuantizedTensor`, run by `cersa::<op>_q_fwd/_q_bwd`).

Every quantized variant of the registry (op_harness.OpCase.quant_variants: each frozen operand in
int8 and in NF4, and one operand alone) against a float64 oracle computed on the DEQUANTIZED
operands, forward and every gradient, under the 2×-eager rule (tolerances.py), at odd shapes, on the
`torch` backend and on `triton` (the Triton launchers read quantized operands once their module lists
the format in QUANTIZED_FORMATS). Also: which ops a call runs, the bytes autograd saves, one graph
node per op under torch.compile, the torch reference's one-transient rule, the backend selection
and the errors. opcheck, torch.compile and the saved-bytes count of every variant run in
tests/test_ops_contract.py, over the same registry."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cersa_kernels import backends, ops, quant
from cersa_kernels.backends import BackendUnavailableError, use_backend
from cersa_kernels.quant import QuantizedTensor, quantize

from op_harness import OPS, check_against_reference, dequantized, grads_present, on_gpu, quantized, run, saved_bytes

T, N, M, R = 37, 130, 77, 45  # odd everywhere; R is CERSA's k (45), LoRA's and PiCa's rank
QUANT_OPS = [op for op in OPS if OPS[op].quantizable]
# SNELL's Triton kernels read W0 tiles themselves, not through the shared GEMM: its quantized
# variants run on torch only (OpCase.quantized_backends); the triton backend's refusal is tested below.
TRITON_QUANT_OPS = [op for op in QUANT_OPS if "triton" in OPS[op].quantized_backends]


def variants(op_names):
    return [pytest.param(op, v, id=f"{op}-{v}") for op in op_names for v in OPS[op].quant_variants()]


def draw(op, variant, T=T, n=N, m=M, r=R, dtype=torch.float32, seed=7):
    return OPS[op].draw(T, n, m, r, dtype, True, torch.Generator().manual_seed(seed), variant=variant)


# ---- numbers: forward and every gradient against the oracle on the dequantized operands -------------


@pytest.mark.parametrize("op,variant", variants(QUANT_OPS))
def test_torch_backend_matches_the_oracle_on_the_dequantized_operands(op, variant):
    case = OPS[op]
    inputs = draw(op, variant)
    assert any(quant.is_quantized(v) for v in inputs.values())
    check_against_reference("torch", case.call, inputs, grads_present(case, inputs), f"{op} {variant}")


@pytest.mark.parametrize("op,variant", variants(TRITON_QUANT_OPS))
def test_triton_backend_matches_the_oracle_on_the_dequantized_operands(op, variant):
    """The acceptance test of the quantized Triton GEMM (fails until the launchers read the format)."""
    case = OPS[op]
    inputs = draw(op, variant)
    check_against_reference("triton", case.call, inputs, grads_present(case, inputs), f"{op} {variant}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group_size", [32, 37, 256], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_group_sizes_that_divide_nothing_or_exceed_the_row(op, group_size, backend):
    case = OPS[op]
    base = case.draw(T, N, M, R, gen=torch.Generator().manual_seed(3))
    inputs = quantized(base, {n: "nf4" for n in case.quantizable}, case.quantizable, group_size)
    check_against_reference(backend, case.call, inputs, grads_present(case, inputs), f"{op} g{group_size}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,variant", [("lowrank_linear", "q-nf4"), ("lora_linear", "q-int8")])
def test_without_an_input_gradient_the_backward_skips_dx(op, variant, backend):
    case = OPS[op]
    inputs = draw(op, variant, T=9)
    grads = [g for g in grads_present(case, inputs) if g != "x"]  # x without grad: need_dx is false
    check_against_reference(backend, case.call, inputs, grads, f"{op} {variant} without dx")


# ---- what runs, what is saved, what torch.compile sees ---------------------------------------------


class CersaOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cersa":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", QUANT_OPS)
def test_a_quantized_operand_selects_the_q_ops_and_dense_ones_the_plain_ops(op):
    case = OPS[op]
    base_variant = next(iter(case.variants))
    pair = op.removesuffix("_linear")
    for variant, expected in ((base_variant, pair), (next(iter(case.quant_variants())), f"{pair}_q")):
        inputs = draw(op, variant, T=5, n=13, m=7, r=4)
        with CersaOps() as rec:
            run("torch", case.call, inputs, grads_present(case, inputs))
        assert [n for n in rec.names if n.endswith(("_fwd", "_bwd"))] == [f"{expected}_fwd", f"{expected}_bwd"], rec.names


@pytest.mark.parametrize("op,variant", variants(QUANT_OPS))
def test_saved_activations_equal_the_dense_op_s_and_the_rest_is_the_quantized_buffers(op, variant):
    """Autograd keeps the dense op's activations, byte for byte, plus each quantized operand's own
    data and absmax (weights, never a dequantized copy)."""
    case = OPS[op]
    inputs = draw(op, variant, T=T)
    dense_inputs = dequantized(inputs)
    grads = grads_present(case, inputs)

    def call(values):
        ins = {k: (v.detach().clone().requires_grad_(k in grads) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in values.items()}
        weights = [v for k, v in ins.items() if k != "x" and isinstance(v, (torch.Tensor, QuantizedTensor))]
        return ins, weights

    with use_backend("torch"):
        ins, weights = call(inputs)
        quantized_bytes, y, shapes = saved_bytes(lambda: case.call(**ins), weights)
        ins_d, weights_d = call(dense_inputs)
        dense_bytes, _, _ = saved_bytes(lambda: case.call(**ins_d), weights_d)
        assert quantized_bytes == dense_bytes == case.saved(inputs, T), shapes
        dense_weights = [v for v in weights if not quant.is_quantized(v)]
        with_buffers, _, _ = saved_bytes(lambda: case.call(**ins), dense_weights)
        buffers = sum(v.nbytes for v in inputs.values() if quant.is_quantized(v))
        assert with_buffers == quantized_bytes + buffers
        y.sum().backward()


@pytest.mark.parametrize("op,variant", variants(QUANT_OPS))
def test_torch_compile_sees_one_node_per_op(op, variant):
    case = OPS[op]
    inputs = draw(op, variant, T=6, n=24, m=12, r=4)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with use_backend("torch"):
        y = torch.compile(case.call, fullgraph=True, backend=record)(**inputs)
    nodes = [str(n.target) for g in graphs for n in g.graph.nodes if str(n.target).startswith("cersa.")]
    fwd = [n for n in nodes if n.endswith("_fwd")]
    assert fwd == [f"cersa.{op.removesuffix('_linear')}_q_fwd"], nodes
    with use_backend("torch"):
        torch.testing.assert_close(y, case.call(**inputs))


def test_torch_compile_takes_the_transposed_view_inside_the_graph():
    """The layers keep Vᵀ and Uᵀ quantized and pass `.T` views from inside their forward."""
    inputs = draw("lowrank_linear", "", T=10, n=24, m=12, r=4)
    Vt, Ut = quantize(inputs["V"].T.contiguous(), "nf4"), quantize(inputs["U"].T.contiguous(), "int8")

    def forward(x, S, bias):
        return ops.lowrank_linear(x, Vt.T, S, Ut.T, bias)

    torch._dynamo.reset()
    args = {k: inputs[k] for k in ("x", "S", "bias")}
    with use_backend("torch"):
        y, g = run("torch", torch.compile(forward, fullgraph=True), args, ["x", "S", "bias"])
        y_ref, g_ref = run("torch", forward, args, ["x", "S", "bias"])
    torch.testing.assert_close(y, y_ref)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k])


# ---- the torch reference dequantizes one operand at a time --------------------------------------------


@pytest.mark.parametrize("op", QUANT_OPS)
def test_the_torch_reference_holds_one_dequantized_operand_at_a_time(op, monkeypatch):
    """Every dense copy of a quantized operand is freed before the next one is made, in forward and
    backward: the transient that docs/kernels.md states."""
    case = OPS[op]
    inputs = draw(op, next(iter(case.quant_variants())), T=8, n=20, m=14, r=6)
    alive, made, peak = set(), [], [0]
    original = QuantizedTensor.dequantize

    def tracked(self, dtype=None):
        out = original(self, dtype)
        key = len(made)
        made.append(key)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(out, alive.discard, key)
        return out

    monkeypatch.setattr(QuantizedTensor, "dequantize", tracked)
    run("torch", case.call, inputs, grads_present(case, inputs))
    assert made and peak[0] == 1, (len(made), peak[0])
    assert not alive


# ---- backend selection -------------------------------------------------------------------------------


def test_the_q_ops_run_the_plain_ops_kernels():
    assert backends.plain_op("lowrank_q_fwd") == "lowrank_fwd" and backends.plain_op("pica_lowrank_q_bwd") == "pica_lowrank_bwd"
    assert backends.plain_op("lowrank_fwd") == "lowrank_fwd" and backends.plain_op("snell_threshold") == "snell_threshold"
    from cersa_kernels.reference import lowrank as ref

    assert backends._load_kernel("torch", "lowrank_q_fwd") is ref.lowrank_fwd
    assert backends._kernel_location("triton", "lora_q_bwd") == ("cersa_kernels.triton.lora", "lora_bwd_triton")
    assert backends._kernel_location("cuda", "lowrank_q_fwd") == ("cersa_kernels.backends.cuda", "lowrank_fwd_cuda")


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_cuda_refuses_quantized_operands_naming_the_layer_and_the_format(fmt):
    inputs = quantized(draw("lora_linear", "", T=4, n=8, m=6, r=2), {"W": fmt}, {"W": False})
    with use_backend("cuda"), pytest.raises(BackendUnavailableError) as info:
        ops.lora_linear(inputs["x"], inputs["W"], inputs["A"], inputs["B"], inputs["bias"], layer="blocks.3.mlp.up")
    message = str(info.value)
    assert message.startswith("blocks.3.mlp.up: CERSA_BACKEND=cuda cannot run cersa::lora_q_fwd"), message
    assert f"quantized {fmt} operands: the cuda backend's kernels read dense operands only" in message


def test_triton_serves_exactly_the_formats_its_module_lists(monkeypatch):
    import cersa_kernels.triton.lowrank as tl_lowrank

    x = torch.randn(4, 8)
    Vq = quantize(torch.randn(3, 8), "nf4").T
    Uq = quantize(torch.randn(3, 5), "int8").T
    monkeypatch.setattr(tl_lowrank, "QUANTIZED_FORMATS", (), raising=False)
    reasons = backends.unavailable_reasons("triton", "lowrank_q_fwd", [x, Vq, Uq])
    assert any("quantized int8/nf4 operands: the Triton kernels of lowrank_fwd do not read them" in r for r in reasons)
    monkeypatch.setattr(tl_lowrank, "QUANTIZED_FORMATS", ("int8",))
    reasons = backends.unavailable_reasons("triton", "lowrank_q_fwd", [x, Vq, Uq])
    assert any("quantized nf4 operands" in r for r in reasons), reasons
    monkeypatch.setattr(tl_lowrank, "QUANTIZED_FORMATS", ("int8", "nf4"))
    assert backends.unavailable_reasons("triton", "lowrank_q_fwd", [x, Vq, Uq]) == []
    assert backends.unavailable_reasons("torch", "lowrank_q_fwd", [x, Vq, Uq]) == []


def test_snell_on_triton_refuses_a_quantized_w0_naming_the_layer():
    inputs = draw("snell_linear", "s0-q-nf4", T=4, n=8, m=6, r=4)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match=r"(?s)^enc\.ffn: .*quantized nf4 operands"):
        ops.snell_linear(inputs["x"], inputs["W0"], inputs["bias"], inputs["A"], inputs["B"], inputs["coeffs"],
                         inputs["sparsity"], layer="enc.ffn")


class FakeCudaTensor:
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


def test_auto_runs_quantized_ops_on_torch_even_where_the_dense_kernel_is_verified(monkeypatch):
    monkeypatch.setattr(backends, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(backends, "_user_table", lambda name, arch: {})
    monkeypatch.setattr(backends, "_tuned_table", lambda: {"lowrank_fwd": {"sm_90": {"bfloat16": "triton"}}})
    assert backends._auto_candidates("lowrank_fwd", [FakeCudaTensor()]) == ["triton", "torch"]
    assert backends._auto_candidates("lowrank_q_fwd", [FakeCudaTensor()]) == ["torch"]
    x = torch.randn(4, 8)
    assert backends.select_backend("lowrank_q_fwd", [x, quantize(torch.randn(3, 8), "nf4").T]) == "torch"


# ---- errors --------------------------------------------------------------------------------------------


def test_a_quantized_operand_of_the_wrong_shape_is_refused_naming_the_layer():
    i = draw("lowrank_linear", "", T=4, n=8, m=6, r=3)
    bad_U = quantize(torch.randn(2, 6), "nf4").T  # (6, 2): rank 2 where V has k = 3
    with pytest.raises(ValueError, match=r"^attn\.q: U must have shape \(6, 3\), got \(6, 2\)"):
        ops.lowrank_linear(i["x"], quantize(i["V"].T.contiguous(), "int8").T, i["S"], bad_U, layer="attn.q")
    untransposed = quantize(i["V"].T.contiguous(), "int8")  # (3, 8): Vᵀ given where V is expected
    with pytest.raises(ValueError, match=r"^attn\.q: expected input with last dimension in_features=3"):
        ops.lowrank_linear(i["x"], untransposed, i["S"], i["U"], i["bias"], layer="attn.q")
    j = draw("lora_linear", "", T=4, n=8, m=6, r=2)
    with pytest.raises(ValueError, match=r"^mlp\.up: expected input with last dimension in_features=6"):
        ops.lora_linear(j["x"], quantize(j["W"], "nf4").T, j["A"], j["B"], layer="mlp.up")


def test_a_quantized_operand_of_another_dtype_is_refused_naming_the_layer():
    j = draw("lora_linear", "", T=4, n=8, m=6, r=2)
    with pytest.raises(TypeError, match=r"^mlp\.up: dtype mismatch.*W=bfloat16"):
        ops.lora_linear(j["x"], quantize(j["W"].bfloat16(), "int8"), j["A"], j["B"], layer="mlp.up")


@pytest.mark.parametrize("op,name", [("lowrank_linear", "S"), ("lora_linear", "A"), ("pica_linear", "P"),
                                     ("pica_lowrank_linear", "M"), ("lowrank_linear", "x")])
def test_an_operand_that_cannot_be_quantized_is_refused_naming_the_layer(op, name):
    case = OPS[op]
    inputs = draw(op, next(iter(case.variants)), T=4, n=8, m=6, r=3)
    t = inputs[name]
    inputs[name] = quantize(t if t.dim() == 2 else t.reshape(1, -1), "int8")
    allowed = ", ".join(case.quantizable)
    with pytest.raises(TypeError, match=rf"{op}: {name} must be a torch.Tensor, got a QuantizedTensor \(only {allowed} can"):
        case.call(**inputs)


def test_autocast_casts_a_quantized_weight_like_a_dense_one():
    """nn/_autocast.autocast_cast calls `t.to(dtype)` on every input: a quantized W takes the dtype
    (its codes unchanged) and the op runs in it."""
    from cersa_kernels.nn._autocast import autocast_cast

    j = draw("lora_linear", "", T=4, n=8, m=6, r=2)
    Wq = quantize(j["W"], "nf4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, W, A, B = autocast_cast(j["x"], Wq, j["A"], j["B"])
    assert W.dtype == torch.bfloat16 and W.data is Wq.data
    with use_backend("torch"):
        y = ops.lora_linear(x, W, A, B)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ops.lora_linear(x, W.dequantize(), A, B).float())


# ---- on a GPU (`pytest -m gpu`): the compiled quantized Triton GEMM in every dtype ----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op,variant", variants(TRITON_QUANT_OPS))
def test_triton_on_gpu_matches_the_oracle_on_the_dequantized_operands(op, variant, dtype):
    """Quantized on the GPU (the interpreter's bf16 is wrong, so 16-bit is checked here only)."""
    case = OPS[op]
    base, formats = case.quant_variants()[variant]
    dense_inputs = on_gpu(case.draw(T, N, M, R, gen=torch.Generator().manual_seed(7), variant=base), dtype)
    inputs = quantized(dense_inputs, formats, case.quantizable)
    check_against_reference("triton", case.call, inputs, grads_present(case, inputs), f"{op} {variant} {dtype}")


@pytest.mark.gpu
def test_auto_runs_quantized_ops_on_torch_on_a_gpu():
    x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    Vq = quantize(torch.randn(3, 8, device="cuda", dtype=torch.bfloat16), "nf4").T
    assert backends.select_backend("lowrank_q_fwd", [x, Vq]) == "torch"
