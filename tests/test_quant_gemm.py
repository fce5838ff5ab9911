"""The dequantizing Triton GEMM (interpreted): `_gemm` with int8 / NF4 operands, and every launcher
fed QuantizedTensor frozen weights, against a float64 oracle on the dequantized operands
(tolerances.py's 2× rule); the launchers never allocate a dequantized copy (AllocationRecorder)."""
import zlib

import pytest
import torch

from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.quant import dense, quantize
from cersa_kernels.reference import lora as ref_lora
from cersa_kernels.reference import lowrank as ref_lowrank
from cersa_kernels.reference import pica as ref_pica
from cersa_kernels.reference import pica_lowrank as ref_pica_lowrank
from cersa_kernels.triton import lora, lowrank, pica, pica_lowrank
from cersa_kernels.triton.gemm import _gemm

from tolerances import assert_matches_reference

FORMATS = ["int8", "nf4"]
DTYPES = [torch.float32, torch.float16]
T, N, M, K, R = 37, 130, 77, 45, 13  # odd sizes: no stride or row length is a multiple of 16


def _gen(*case):
    """A generator seeded from the test case (str hashes change between processes; crc32 does not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _rand(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _quantized(rows, cols, fmt, group, dtype, gen, transposed=False):
    """A random (rows, cols) frozen operand, stored as (rows, cols) or, when `transposed`, as its
    transpose (cols, rows) and viewed through `.T` (how the ops store Vᵀ and Uᵀ)."""
    if transposed:
        return quantize(_rand(cols, rows, gen=gen, dtype=dtype), fmt, group).T
    return quantize(_rand(rows, cols, gen=gen, dtype=dtype), fmt, group)


def _divisor_group(length):
    """A group size dividing `length` (the largest proper divisor, or the length itself)."""
    return max([d for d in range(2, length) if length % d == 0] or [length])


# --- _gemm -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", ["divides", "64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["stored", "stored_T"])
@pytest.mark.parametrize("position", ["a", "b"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_dequantizes_one_operand(fmt, position, transposed, group, dtype):
    """(37×130) @ (130×77) with one operand quantized, against float64 on the dequantized operands;
    and bit-identical to the same kernel given the dequantized operand as a dense tensor (the tile
    holds exactly quant.dense's values)."""
    gen = _gen(fmt, position, transposed, group)
    rows, cols = (T, N) if position == "a" else (N, M)
    stored_row = rows if transposed else cols
    gs = _divisor_group(stored_row) if group == "divides" else 64
    assert (stored_row % gs == 0) == (group == "divides")
    q = _quantized(rows, cols, fmt, gs, dtype, gen, transposed)
    other = _rand(N, M, gen=gen, dtype=dtype) if position == "a" else _rand(T, N, gen=gen, dtype=dtype)
    a, b = (q, other) if position == "a" else (other, q)
    da, db = dense(a), dense(b)
    got = _gemm(a, b, dtype)
    assert_matches_reference(got, da @ db, da.double() @ db.double(), f"{fmt} {position} {gs}")
    assert torch.equal(got, _gemm(da, db, dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_both_operands_quantized_with_bias_and_split(fmt):
    gen = torch.Generator().manual_seed(5)
    a = _quantized(T, N, fmt, 64, torch.float32, gen, transposed=True)
    b = _quantized(N, M, fmt, 50, torch.float32, gen)
    bias = _rand(M, gen=gen)
    da, db = dense(a), dense(b)
    assert_matches_reference(_gemm(a, b, torch.float32, bias=bias), da @ db + bias, da.double() @ db.double() + bias.double())
    # a reduction split over programs (fp32 partials): K = 700 rows in 3 slices
    a, b = _quantized(19, 700, fmt, 64, torch.float32, gen, True), _quantized(700, 33, fmt, 64, torch.float32, gen)
    da, db = dense(a), dense(b)
    assert_matches_reference(_gemm(a, b, torch.float32, split=3), da @ db, da.double() @ db.double(), "split")


def test_gemm_reads_only_the_first_k_rows_of_b():
    gen = torch.Generator().manual_seed(6)
    b = _quantized(K, N, "nf4", 64, torch.float32, gen)
    a = _rand(T, R, gen=gen)
    db = dense(b)[:R]
    assert_matches_reference(_gemm(a, b, torch.float32), a @ db, a.double() @ db.double())


# --- the launchers -------------------------------------------------------------------------------------

def _frozen(fmt, group, dtype, gen):
    """Frozen weights as the ops hold them: V (n, k) and U (m, k) as `.T`-views of stored Vᵀ, Uᵀ;
    W (m, n) as stored."""
    return dict(
        V=_quantized(N, K, fmt, group, dtype, gen, transposed=True),
        U=_quantized(M, K, fmt, group, dtype, gen, transposed=True),
        W=_quantized(M, N, fmt, group, dtype, gen),
    )


def _trainable(dtype, gen):
    return dict(
        x=_rand(T, N, gen=gen, dtype=dtype), dy=_rand(T, M, gen=gen, dtype=dtype), bias=_rand(M, gen=gen, dtype=dtype),
        S=torch.eye(K) + 0.1 * _rand(K, K, gen=gen), A=_rand(R, N, gen=gen, dtype=dtype),
        B=_rand(M, R, gen=gen, dtype=dtype), P=_rand(R, N, gen=gen, dtype=dtype), Mp=_rand(M, R, gen=gen),
        seed=torch.tensor(1234),
    )


# op name -> (fwd(launcher or reference, weights, inputs), bwd(..., h)); `h` is the forward's saved
# activation, the same tensor for every backend, so that the backward is compared on its own.
def _lowrank(impl):
    fwd, bwd = (lowrank.lowrank_fwd_triton, lowrank.lowrank_bwd_triton) if impl == "triton" else (
        ref_lowrank.lowrank_fwd, ref_lowrank.lowrank_bwd)
    return (lambda w, i: fwd(i["x"], w["V"], i["S"], w["U"], i["bias"]),
            lambda w, i, h: bwd(i["dy"], h, w["V"], i["S"], w["U"], True))


def _lora(impl, p=0.1):
    fwd, bwd = (lora.lora_fwd_triton, lora.lora_bwd_triton) if impl == "triton" else (ref_lora.lora_fwd, ref_lora.lora_bwd)
    return (lambda w, i: fwd(i["x"], w["W"], i["bias"], i["A"], i["B"], 2.0, p, i["seed"]),
            lambda w, i, h: bwd(i["dy"], i["x"], h, w["W"], i["A"], i["B"], 2.0, p, i["seed"], True))


def _pica(impl):
    fwd, bwd = (pica.pica_fwd_triton, pica.pica_bwd_triton) if impl == "triton" else (ref_pica.pica_fwd, ref_pica.pica_bwd)
    return (lambda w, i: fwd(i["x"], w["W"], i["bias"], i["P"], i["Mp"]),
            lambda w, i, h: bwd(i["dy"], h, w["W"], i["P"], i["Mp"], True))


def _pica_lowrank(impl):
    fwd, bwd = (pica_lowrank.pica_lowrank_fwd_triton, pica_lowrank.pica_lowrank_bwd_triton) if impl == "triton" else (
        ref_pica_lowrank.pica_lowrank_fwd, ref_pica_lowrank.pica_lowrank_bwd)
    return (lambda w, i: fwd(i["x"], w["V"], i["S"], w["U"], i["Mp"], i["bias"]),
            lambda w, i, h: bwd(i["dy"], h, w["V"], i["S"], w["U"], i["Mp"], True))


OPS = {"lowrank": _lowrank, "lora": _lora, "pica": _pica, "pica_lowrank": _pica_lowrank}
FWD_NAMES = ["y", "saved"]
BWD_NAMES = {"lowrank": ["dx", "dS"], "lora": ["dx", "dA", "dB"], "pica": ["dx", "dM"], "pica_lowrank": ["dx", "dS", "dM"]}


def _to64(d):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [64, 13])  # 13 divides n = 130 (V, W), not m = 77 (U); 64 divides neither
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", list(OPS))
def test_launcher_matches_reference_on_dequantized_weights(op, fmt, group, dtype):
    """Forward and every gradient of the launcher with quantized frozen weights, against the
    reference on the dequantized weights (float64 oracle, same-dtype eager for the 2× rule). The
    forward and its saved activation equal the dense launch on the dequantized weights bit for bit."""
    gen = _gen(op, fmt, group)
    w, i = _frozen(fmt, group, dtype, gen), _trainable(dtype, gen)
    wd = {k: dense(v) for k, v in w.items()}
    fwd, bwd = OPS[op]("triton")
    rfwd, rbwd = OPS[op]("torch")
    got = fwd(w, i)
    for name, g, e, r in zip(FWD_NAMES, got, rfwd(wd, i), rfwd(_to64(wd), _to64(i))):
        assert_matches_reference(g, e, r, f"{op} {fmt} {name}")
    for name, g, d in zip(FWD_NAMES, got, fwd(wd, i)):
        assert torch.equal(g, d), f"{op} {fmt} {name}: differs from the dense launch"
    h = got[1]
    for name, g, e, r in zip(BWD_NAMES[op], bwd(w, i, h), rbwd(wd, i, h), rbwd(_to64(wd), _to64(i), h.double())):
        assert_matches_reference(g, e, r, f"{op} {fmt} d{name}")


# --- no dequantized copy -------------------------------------------------------------------------------

class _KeepingRecorder(AllocationRecorder):
    """Also keeps each allocated tensor, to read its values once the call is over."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def on_allocation(self, func, tensor):
        super().on_allocation(func, tensor)
        self.tensors.append(tensor)


def _copies_of(q, tensors):
    """The tensors holding q's dequantized values (in any float dtype, as stored or transposed)."""
    d = dense(q, torch.float64)
    found = []
    for t in tensors:
        if t.is_floating_point() and t.numel() == d.numel():
            t64 = t.detach().double().reshape(-1)
            if any(torch.allclose(t64, v.reshape(-1), rtol=1e-2, atol=1e-3) for v in (d, d.T.contiguous())):
                found.append(t)
    return found


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", list(OPS))
def test_launchers_allocate_no_dequantized_copy(op, fmt):
    """Forward + backward of each launcher under the allocation recorder: no allocated tensor holds a
    frozen weight's dequantized values. For W (m×n, LoRA and PiCa) no tensor of m·n elements is
    allocated at all (it is larger than any other tensor of the call); U (m×k) and V (n×k) have the
    size of the products U·S (forward) and S·Vᵀ (backward), the only allocations of that size.
    The same recorder around quant.dense sees its copy (the check can fail)."""
    gen = torch.Generator().manual_seed(7)
    w, i = _frozen(fmt, 64, torch.float32, gen), _trainable(torch.float32, gen)
    fwd, bwd = OPS[op]("triton")
    with _KeepingRecorder() as rec:
        _, h = fwd(w, i)
        bwd(w, i, h)
    assert len(rec.allocations) >= 4  # the recorder sees the launchers' outputs
    used = ["W"] if op in ("lora", "pica") else ["V", "U"]
    for name in used:
        assert not _copies_of(w[name], rec.tensors), f"{op}: a dequantized copy of {name}"
    sizes = [a.numel for a in rec.allocations]
    if op in ("lora", "pica"):
        assert M * N not in sizes
    else:
        assert sizes.count(M * K) == 1 and sizes.count(N * K) == 1  # U·S (F for PiCa) and S·Vᵀ
    with _KeepingRecorder() as rec:
        dense(w[used[0]])
    assert _copies_of(w[used[0]], rec.tensors)
