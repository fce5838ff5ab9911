"""quant.py on its own: int8 / NF4 round-trip error bounds, bit-compatibility with bitsandbytes'
NF4 (packed bytes, absmax and dequantized values identical), the exact byte count, transposed
views, padding when the group size does not divide the row, the op-argument parts, and the errors."""
import math

import bitsandbytes.functional as bnbf
import pytest
import torch

from cersa_kernels import quant
from cersa_kernels.quant import FORMATS, NF4_CODE, QuantizedTensor, dense, from_parts, quantize, quantized_bytes, to_parts

# (rows, cols, group size): dividing rows, a group size that divides nothing, one longer than the
# row, and an odd element count (the last NF4 byte holds one code).
SHAPES = [(16, 128, 64), (37, 130, 64), (7, 13, 5), (5, 9, 64), (77, 45, 32)]
SHAPE_IDS = [f"{r}x{c}-g{g}" for r, c, g in SHAPES]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def group_absmax(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |W| of each element's group, broadcast to W's shape (the oracle of the absmax layout)."""
    rows, cols = W.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for start in range(0, cols, group_size):
        block = W[:, start:start + group_size].double()
        out[:, start:start + group_size] = block.abs().amax(1, keepdim=True)
    return out


@pytest.mark.parametrize("rows,cols,group_size", SHAPES, ids=SHAPE_IDS)
def test_int8_round_trip_is_within_half_a_step_of_each_group(rows, cols, group_size):
    W = randn(rows, cols, seed=rows)
    q = quantize(W, "int8", group_size)
    amax = group_absmax(W, group_size)
    err = (q.dequantize().double() - W.double()).abs()
    # half a step of 127 levels per sign, plus the float32 rounding of code·absmax/127
    assert (err <= amax / 254 * (1 + 1e-5) + 1e-7).all(), float((err - amax / 254).max())
    assert torch.equal(q.absmax.double(), amax[:, ::group_size].reshape(-1))
    assert q.data.abs().max() <= 127 and q.data.abs().max() == 127  # the absmax element maps to ±127


@pytest.mark.parametrize("rows,cols,group_size", SHAPES, ids=SHAPE_IDS)
def test_nf4_picks_the_nearest_code_of_each_scaled_element(rows, cols, group_size):
    W = randn(rows, cols, seed=rows + 1)
    q = quantize(W, "nf4", group_size)
    amax = group_absmax(W, group_size)
    scaled = (W.double() / amax).reshape(-1, 1)
    codes = torch.tensor(NF4_CODE, dtype=torch.float64)
    nearest = (scaled - codes).abs().min(1).values
    got = (q.dequantize().double().reshape(-1, 1) / amax.reshape(-1, 1) - scaled).abs().reshape(-1)
    assert (got <= nearest + 1e-6).all(), float((got - nearest).max())
    # so the error is at most half the widest gap between neighbouring codes, times the absmax
    half_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
    assert ((q.dequantize().double() - W.double()).abs() <= amax * (half_gap + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(77, 128), (5, 64), (3, 192), (48, 4096)], ids=str)
def test_nf4_is_bit_identical_to_bitsandbytes(shape, dtype):
    """bitsandbytes' flat blockwise layout equals ours when the group size divides the row."""
    W = randn(*shape, seed=sum(shape), dtype=dtype)
    packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize(W, "nf4", 64)
    assert torch.equal(packed.reshape(-1), q.data)
    assert torch.equal(state.absmax, q.absmax)
    assert torch.equal(bnbf.dequantize_4bit(packed, state), q.dequantize())
    assert q.dequantize().dtype == dtype


def test_nf4_code_table_is_bitsandbytes_own():
    assert torch.equal(quant.code_table(), bnbf.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,cols,group_size", SHAPES, ids=SHAPE_IDS)
def test_nbytes_is_exactly_codes_plus_four_bytes_per_group(fmt, rows, cols, group_size):
    q = quantize(randn(rows, cols), fmt, group_size)
    codes = rows * cols if fmt == "int8" else math.ceil(rows * cols / 2)
    expected = codes + 4 * rows * math.ceil(cols / group_size)
    assert q.nbytes == expected == quantized_bytes(rows, cols, fmt, group_size)
    assert q.nbytes == q.data.numel() * q.data.element_size() + q.absmax.numel() * 4
    assert q.dense_nbytes() == rows * cols * 4
    assert q.T.nbytes == q.nbytes  # a view: the same storage


@pytest.mark.parametrize("fmt", FORMATS)
def test_transposed_view_is_the_transpose_and_shares_storage(fmt):
    Wt = randn(45, 130)  # stored like a layer's Vᵀ (k, n), grouped along n
    q = quantize(Wt, fmt, 64)
    v = q.T
    assert v.shape == (130, 45) and v.size(0) == 130 and v.size() == torch.Size((130, 45)) and v.dim() == 2
    assert v.transposed and not v.T.transposed and v.T.shape == q.shape
    assert v.data is q.data and v.absmax is q.absmax
    assert torch.equal(v.dequantize(), q.dequantize().T)
    assert torch.equal(dense(v), q.dequantize().T) and torch.equal(dense(v, torch.float64), q.dequantize().T.double())
    assert not v.requires_grad and v.device == Wt.device and v.dtype == Wt.dtype


def test_padding_never_reaches_the_values():
    """Groups cut at the row end: a huge value in the next row's first group changes nothing."""
    W = randn(3, 13, seed=5)
    base = quantize(W, "nf4", 5).dequantize()
    W2 = W.clone()
    W2[1, 0] = 1e3  # the first group of row 1 only
    got = quantize(W2, "nf4", 5).dequantize()
    assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
    assert torch.equal(got[1, 5:], base[1, 5:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_zero_group_dequantizes_to_zeros(fmt):
    W = randn(4, 16, seed=2)
    W[1, :8] = 0
    out = quantize(W, fmt, 8).dequantize()
    assert torch.equal(out[1, :8], torch.zeros(8)) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_the_operand_keeps_its_dtype(dtype):
    q = quantize(randn(6, 10, dtype=dtype), "int8", 4)
    assert q.dtype == dtype and q.dequantize().dtype == dtype and q.dequantize(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_parts_round_trip(fmt, transpose):
    q = quantize(randn(9, 21, dtype=torch.bfloat16), fmt, 8)
    q = q.T if transpose else q
    data, absmax, meta = to_parts(q)
    assert data is q.data and absmax is q.absmax and all(isinstance(v, int) for v in meta)
    back = from_parts(data, absmax, meta)
    assert (back.shape, back.format, back.group_size, back.dtype, back.transposed) == (
        q.shape, q.format, q.group_size, q.dtype, q.transposed)
    assert torch.equal(back.dequantize(), q.dequantize())
    W = randn(3, 4)
    assert to_parts(W) == (W, None, []) and from_parts(W, None, []) is W


# ---- errors ----------------------------------------------------------------------------------------


def test_unknown_format_is_refused_naming_the_caller():
    with pytest.raises(ValueError, match=r"blocks\.0\.q: unknown quantization format 'fp4'; expected one of \['int8', 'nf4'\]"):
        quantize(randn(4, 8), "fp4", where="blocks.0.q")
    q = quantize(randn(4, 8), "int8")
    with pytest.raises(ValueError, match="QuantizedTensor: unknown quantization format 'int4'"):
        QuantizedTensor(q.data, q.absmax, q.stored_shape, "int4", q.group_size, q.dtype)
    with pytest.raises(ValueError, match="quantized_bytes: unknown quantization format"):
        quantized_bytes(4, 8, "nf8")


@pytest.mark.parametrize("group_size", [0, -3, 2.5, True, "64"], ids=repr)
def test_bad_group_size_is_refused(group_size):
    with pytest.raises(ValueError, match=r"layer\.w: group_size must be a positive int"):
        quantize(randn(4, 8), "nf4", group_size, where="layer.w")
    q = quantize(randn(4, 8), "nf4", 4)
    with pytest.raises(ValueError, match="QuantizedTensor: group_size must be a positive int"):
        QuantizedTensor(q.data, q.absmax, q.stored_shape, "nf4", group_size, q.dtype)


def test_a_tensor_that_requires_grad_is_refused():
    with pytest.raises(ValueError, match="layer: cannot quantize a tensor that requires grad"):
        quantize(randn(4, 8).requires_grad_(), "int8", where="layer")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_values_are_refused(fmt, value):
    W = randn(4, 8)
    W[2, 3] = value
    with pytest.raises(ValueError, match="layer: the tensor to quantize holds NaN or Inf"):
        quantize(W, fmt, where="layer")


@pytest.mark.parametrize("bad", [torch.randn(8), torch.randn(2, 3, 4), torch.ones(3, 4, dtype=torch.int32), [[1.0]]],
                         ids=["1-D", "3-D", "int", "list"])
def test_only_a_2d_floating_tensor_can_be_quantized(bad):
    with pytest.raises(ValueError, match="layer: expected a 2-D floating-point tensor"):
        quantize(bad, "int8", where="layer")


def test_inconsistent_parts_are_refused():
    q = quantize(randn(4, 8), "nf4", 4)
    with pytest.raises(ValueError, match="nf4 data for 4×8 must be 16 torch.uint8 elements, got 15"):
        QuantizedTensor(q.data[:15], q.absmax, (4, 8), "nf4", 4, torch.float32)
    with pytest.raises(ValueError, match="absmax for 4×8 in groups of 4 must be 8 float32 values"):
        QuantizedTensor(q.data, q.absmax.double(), (4, 8), "nf4", 4, torch.float32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        QuantizedTensor(q.data, q.absmax, (4, 8), "nf4", 4, torch.int32)
    with pytest.raises(ValueError, match="from_parts: meta must be"):
        from_parts(q.data, q.absmax, [7, 4, 4, 8, 0, 2])


def test_to_a_dtype_changes_what_the_operand_stands_for_not_its_codes():
    """Autocast casts frozen weights with `t.to(dtype)`: a quantized one keeps its codes."""
    q = quantize(randn(6, 10), "nf4", 4).T
    b = q.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.data is q.data and b.absmax is q.absmax and b.transposed
    assert torch.equal(b.dequantize(), q.dequantize().bfloat16())
    assert q.to(torch.float32) is q and q.to("cpu") is q and q.to(device="cpu", dtype=torch.float32) is q
    c = q.to("cpu", torch.float16)
    assert c.dtype == torch.float16 and c.device == torch.device("cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        q.to(torch.int8)


def unpack_nf4(data: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of packed NF4 bytes, high nibble first (bitsandbytes' order)."""
    return torch.stack(((data >> 4), (data & 0x0F)), dim=1).reshape(-1)[:numel].long()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nf4_on_a_gpu_agrees_with_bitsandbytes_cuda_kernel(dtype):
    """bitsandbytes' CUDA kernel scales by a reciprocal and compares with rounded midpoints, so a
    value within float32 rounding of a midpoint between two codes may round either way; every other
    code, every absmax and the dequantization of bitsandbytes' own bytes must be identical."""
    W = randn(96, 4096, seed=3, dtype=dtype).cuda()
    packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize(W, "nf4", 64)
    assert q.data.is_cuda and torch.equal(state.absmax, q.absmax)
    theirs = QuantizedTensor(packed.reshape(-1), state.absmax, tuple(W.shape), "nf4", 64, dtype)
    assert torch.equal(theirs.dequantize(), bnbf.dequantize_4bit(packed, state))
    ours_codes, their_codes = unpack_nf4(q.data, W.numel()), unpack_nf4(theirs.data, W.numel())
    scaled = (W.float().reshape(-1, 64) / q.absmax[:, None]).reshape(-1)
    codes = quant.code_table(W.device)
    midpoints = (codes[1:] + codes[:-1]) / 2
    near_a_midpoint = (scaled[:, None] - midpoints).abs().min(1).values < 1e-6
    differ = ours_codes != their_codes
    assert not (differ & ~near_a_midpoint).any(), int((differ & ~near_a_midpoint).sum())
