"""Triton kernels for SNELL (docs/methods.md §4) that never hold an m×n matrix in memory.

Every m×n quantity (K, D_h, the mask, G = dyᵀx, E_h) exists only as a register tile. One jit
helper, `_kernel_tile`, builds a tile of K from A and B and every kernel calls it (the selection,
the forward, dx, dA/dB, and the test helper `kernelized_update_triton`):
D_h = sqrt_rn(Σ_d (b_d − a_d)²), the squares summed in order d = 0, 1, …, and K = Σ_h c_h D_h in
head order, every product and sum rounded on its own (the kernels are compiled without contraction,
`_NO_CONTRACTION`, so the bits are the torch reference's and the interpreter's). Each entry is computed alone, with no reduction across
the tile, so its bits depend neither on the tile shape nor on the register layout the compiler
picks: τ, the forward's mask, dx's and dA/dB's masks are the same by construction. sqrt and the
division in E are correctly rounded (`tl.sqrt_rn`, `tl.div_rn`, never sqrt.approx / div.full).
Direct differences (not ‖b‖² + ‖a‖² − 2b·a) at every d_h: no cancellation at small d_h, no
d_h-wide register tile, and no more work than an ieee `tl.dot` that pads d_h to 16 (twice its
CUDA-core work at d_h ≥ 32). The reference sums the same way.

s = 0 travels as τ = −inf and means ΔW = K (plain kernelized LoRA); otherwise
ΔW_s = K · mag with mag = |K| ⊙ 1[|K| > τ], a product, so a NaN in K (from A, B or c) reaches y
as it does in the reference (a `where(keep, K·|K|, 0)` would turn it into 0).

- Threshold (`snell_threshold_triton`): an exact radix select on the int32 bit pattern of |K|
  (fp32, non-negative, so the bit pattern orders like the value; NaN sorts last, as in
  torch.kthvalue). Three passes over all tiles, each a histogram of the next bit field (bits
  30..20, 19..10, 9..0) among the entries whose higher bits match the prefix found so far; a
  cumulative sum on the device picks the bucket holding the k-th smallest. After pass 3 the prefix
  *is* the bit pattern of the k-th smallest |K|, with no m×n buffer and no host synchronisation.
- Forward (`_snell_fwd_kernel`): per (T-tile, m-tile), loop over n-tiles: W tile = W0 tile + ΔW_s
  tile (fp32), acc += x_tile @ W_tileᵀ; bias in the epilogue.
- dx (`_snell_dx_kernel`): per (T-tile, n-tile), loop over m-tiles: acc += dy_tile @ W_tile.
- dA, dB (`_snell_dab_kernel`): per (m-tile, n-tile), G tile = Σ_T dy_tileᵀ x_tile, G' = G ⊙ mag,
  then per head E_h = G' ⊘ D_h and, per feature d, the direct sums
  dB_h[i, d] = c_h Σ_j E_ij (B_id − A_jd), dA_h[j, d] = −c_h Σ_i E_ij (B_id − A_jd) (c_h applied
  after the tiles are summed, as in the reference).
  Deterministic under `torch.use_deterministic_algorithms(True)`: each tile then writes its partial
  sums to its own slot (fp32, (n-tiles, H, m, d_h) and (m-tiles, H, n, d_h), i.e. m·n·q/BLOCK
  values each) and they are summed in a fixed order. Otherwise relaxed fp32 atomics (faster; the
  last bits may differ run to run on a GPU).

Tiles come from `snell_configs(dtype, d_h, arch)`, chosen per arch and dtype so that every launch
fits the arch's shared memory and the 16-bit paths do not spill.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_interpreting
from ..reference.snell import kth_rank

__all__ = [
    "snell_configs",
    "kth_smallest_abs_triton",
    "snell_threshold_triton",
    "snell_fwd_triton",
    "snell_bwd_triton",
    "kernelized_update_triton",
]


@triton.jit
def _i64(x):
    """x (an index, a loop counter or a constexpr) as int64, so that its products with strides and
    the pointer offsets built from them cannot wrap at 2^31 elements."""
    return tl.cast(x, tl.int64)


@triton.jit
def _head_distance(
    a_ptr, b_ptr, h, offs_m, offs_n, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """D_h tile (BM, BN) fp32 = sqrt_rn(Σ_dd (B[h, i, dd] − A[h, j, dd])²), dd in increasing order,
    each product and sum rounded separately (no contraction); rows/columns outside the matrix read zeros."""
    b_rows = b_ptr + (_i64(h) * stride_bh + offs_m * stride_bm)
    a_rows = a_ptr + (_i64(h) * stride_ah + offs_n * stride_an)
    sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for dd in range(0, d):
        b = tl.load(b_rows + _i64(dd) * stride_bd, mask=offs_m < m, other=0.0).to(tl.float32)
        a = tl.load(a_rows + _i64(dd) * stride_ad, mask=offs_n < n, other=0.0).to(tl.float32)
        diff = b[:, None] - a[None, :]
        sq = sq + diff * diff  # rounded twice, never contracted: see _NO_CONTRACTION
    return tl.sqrt_rn(sq)


@triton.jit
def _kernel_tile(
    a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """K tile (BM, BN) fp32: Σ_h c_h D_h in head order, no contraction. The one |K| of every SNELL kernel."""
    k = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in tl.static_range(H):
        dist = _head_distance(a_ptr, b_ptr, h, offs_m, offs_n, m, n, d,
                              stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, BLOCK_M, BLOCK_N)
        k = k + tl.load(c_ptr + _i64(h)) * dist
    return k


@triton.jit
def _magnitude(k, tau):
    """The stop-gradient factor: 1 where τ = −inf (s = 0: ΔW = K), else |K| ⊙ 1[|K| > τ]."""
    absk = tl.abs(k)
    return tl.where(tau == float("-inf"), 1.0, tl.where(absk > tau, absk, 0.0))


@triton.jit
def _weight_tile(
    w0_ptr, a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d, stride_wm, stride_wn,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(W0 + ΔW_s) tile (BM, BN) fp32, zero outside the matrix."""
    inside = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    w = tl.load(w0_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn, mask=inside, other=0.0)
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
    # the bounds `where` only clears the padding (a NaN/Inf coefficient times D = 0 there)
    return w.to(tl.float32) + tl.where(inside, k * _magnitude(k, tau), 0.0)


@triton.jit
def _snell_select_kernel(
    a_ptr, b_ptr, c_ptr, v_ptr, prefix_ptr, hist_ptr, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, stride_vm, stride_vn,
    FROM_VALUES: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Histogram of bits [SHIFT, SHIFT + NBITS) of |K| over the entries whose bits above
    SHIFT + NBITS equal *prefix_ptr; added into hist_ptr (2^NBITS int32 counters)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    inside = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    if FROM_VALUES:  # |values| of a given matrix: lets tests feed adversarial values
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, mask=inside, other=0.0)
        absk = tl.abs(v.to(tl.float32))
    else:
        k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                         stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
        absk = tl.abs(k)
    bits = absk.to(tl.int32, bitcast=True)
    prefix = tl.load(prefix_ptr)
    valid = inside & ((bits >> (SHIFT + NBITS)) == prefix)
    NBINS: tl.constexpr = 1 << NBITS
    bucket = tl.where(valid, (bits >> SHIFT) & (NBINS - 1), 0)
    hist = tl.histogram(tl.reshape(bucket, (BLOCK_M * BLOCK_N,)), NBINS)
    # invalid entries were counted in bin 0: take them out (tl.histogram's mask is not in every triton)
    n_invalid = tl.sum(tl.where(valid, 0, 1))
    bins = tl.arange(0, NBINS)
    hist = hist - tl.where(bins == 0, n_invalid, 0)
    tl.atomic_add(hist_ptr + _i64(bins), hist, sem="relaxed")  # integer counts: exact in any order


@triton.jit
def _snell_fwd_kernel(
    x_ptr, w0_ptr, bias_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, y_ptr, T, m, n, d,
    stride_xt, stride_xn, stride_wm, stride_wn, stride_yt, stride_ym, stride_bias,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y tile (BT, BM) = Σ_n-tiles x_tile @ (W0 + ΔW_s)_tileᵀ (+ bias)."""
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tau = tl.load(tau_ptr)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                    mask=(offs_t[:, None] < T) & (offs_n[None, :] < n), other=0.0)
        w = _weight_tile(w0_ptr, a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d, stride_wm, stride_wn,
                         stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m * stride_bias, mask=offs_m < m, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :] * stride_ym, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_m[None, :] < m))


@triton.jit
def _snell_dx_kernel(
    dy_ptr, w0_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, dx_ptr, T, m, n, d,
    stride_dyt, stride_dym, stride_wm, stride_wn, stride_dxt, stride_dxn,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    DOT_PRECISION: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx tile (BT, BN) = Σ_m-tiles dy_tile @ (W0 + ΔW_s)_tile."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tau = tl.load(tau_ptr)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        g = tl.load(dy_ptr + offs_t[:, None] * stride_dyt + offs_m[None, :] * stride_dym,
                    mask=(offs_t[:, None] < T) & (offs_m[None, :] < m), other=0.0)
        w = _weight_tile(w0_ptr, a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d, stride_wm, stride_wn,
                         stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
        acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + offs_t[:, None] * stride_dxt + offs_n[None, :] * stride_dxn, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_n[None, :] < n))


@triton.jit
def _snell_dab_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, da_ptr, db_ptr, T, m, n, d,
    stride_dyt, stride_dym, stride_xt, stride_xn,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    DOT_PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For one (m-tile, n-tile): G = dyᵀx over all T, then this tile's share of dA/c_h and dB/c_h
    (the launcher scales by c_h once the tiles are summed, as the reference does, so that an
    infinite c_h times sums of either sign gives the reference's ±inf, not inf − inf = NaN).
    DETERMINISTIC: da_ptr (m-tiles, H, n, d), db_ptr (n-tiles, H, m, d) fp32 partials, one slot per
    tile, every entry written; else da_ptr (H, n, d), db_ptr (H, m, d) fp32 accumulators (atomics)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m = offs_m < m
    in_n = offs_n < n
    inside = in_m[:, None] & in_n[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        dyt = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_t[None, :] * stride_dyt,
                      mask=in_m[:, None] & (offs_t[None, :] < T), other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                    mask=(offs_t[:, None] < T) & in_n[None, :], other=0.0)
        g = tl.dot(dyt, x, g, input_precision=DOT_PRECISION)
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
    gp = g * _magnitude(k, tl.load(tau_ptr))
    if DETERMINISTIC:
        db_base = db_ptr + pid_n.to(tl.int64) * H * m * d
        da_base = da_ptr + pid_m.to(tl.int64) * H * n * d
    else:
        db_base = db_ptr
        da_base = da_ptr
    for h in tl.static_range(H):
        dist = _head_distance(a_ptr, b_ptr, h, offs_m, offs_n, m, n, d,
                              stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, BLOCK_M, BLOCK_N)
        # E = G'/D, 0 where D = 0; a NaN D (NaN in A or B) gives a NaN E, as in the reference
        e = tl.where(dist == 0.0, 0.0, tl.div_rn(gp, dist))
        b_rows = b_ptr + (_i64(h) * stride_bh + offs_m * stride_bm)
        a_rows = a_ptr + (_i64(h) * stride_ah + offs_n * stride_an)
        db_rows = db_base + (_i64(h) * m * d + offs_m * d)
        da_rows = da_base + (_i64(h) * n * d + offs_n * d)
        for dd in range(0, d):
            b = tl.load(b_rows + _i64(dd) * stride_bd, mask=in_m, other=0.0).to(tl.float32)
            a = tl.load(a_rows + _i64(dd) * stride_ad, mask=in_n, other=0.0).to(tl.float32)
            # padding contributes exactly 0 (0·(b − a) would be NaN for an infinite b or a)
            p = tl.where(inside, e * (b[:, None] - a[None, :]), 0.0)
            db = tl.sum(p, axis=1)
            da = -tl.sum(p, axis=0)
            if DETERMINISTIC:
                tl.store(db_rows + _i64(dd), db, mask=in_m)
                tl.store(da_rows + _i64(dd), da, mask=in_n)
            else:
                tl.atomic_add(db_rows + _i64(dd), db, mask=in_m, sem="relaxed")
                tl.atomic_add(da_rows + _i64(dd), da, mask=in_n, sem="relaxed")


@triton.jit
def _kernelized_update_tiles(
    a_ptr, b_ptr, c_ptr, out_ptr, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, stride_om, stride_on,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, k,
             mask=(offs_m[:, None] < m) & (offs_n[None, :] < n))


# ---------------------------------------------------------------- launch configurations

# Shared memory per block (bytes) of the archs we target; others get the smaller one.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_INTERPRETER_BLOCK = 32  # every tile dimension under the interpreter (its time grows with programs)
_BLOCKS = {"select": ("BLOCK_M", "BLOCK_N"), "matrix": ("BLOCK_M", "BLOCK_N"),
           "fwd": ("BLOCK_T", "BLOCK_M", "BLOCK_N"), "dx": ("BLOCK_T", "BLOCK_M", "BLOCK_N"),
           "dab": ("BLOCK_T", "BLOCK_M", "BLOCK_N")}
# Measured with ptxas (sm_80 and sm_90): these compile with no spill in fp16/bf16, and every one
# fits an A100's shared memory. |K| has no d_h-wide tile (the d loop runs over scalars), so d_h
# changes no tile.
_GPU_CONFIGS = {
    "16bit": {
        "select": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
        "fwd": dict(BLOCK_T=64, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "dx": dict(BLOCK_T=64, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "dab": dict(BLOCK_T=32, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "matrix": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
    },
    "32bit": {
        "select": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
        "fwd": dict(BLOCK_T=64, BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        "dx": dict(BLOCK_T=64, BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        "dab": dict(BLOCK_T=32, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        "matrix": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
    },
}
KERNELS = ("select", "fwd", "dx", "dab", "matrix")


def snell_configs(dtype: torch.dtype, d_h: int, arch: Optional[int]) -> dict[str, dict]:
    """{kernel: launch config} for every SNELL kernel ("select", "fwd", "dx", "dab", "matrix"):
    tile sizes (BLOCK_*) plus num_warps/num_stages, for inputs of `dtype` with head size `d_h` on
    compute capability `arch` (e.g. 80, 90; None = the Triton interpreter: tiles only)."""
    if arch is None:
        return {k: {key: _INTERPRETER_BLOCK for key in _BLOCKS[k]} for k in KERNELS}
    family = "32bit" if dtype == torch.float32 else "16bit"
    return {k: dict(v) for k, v in _GPU_CONFIGS[family].items()}


def _arch(t: Tensor) -> Optional[int]:
    if triton_interpreting() and not t.is_cuda:
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _config(kernel: str, t: Tensor, d_h: int) -> dict:
    return snell_configs(t.dtype, d_h, _arch(t))[kernel]


# Every SNELL kernel is compiled without floating-point contraction (no a*b + c fused into one
# fma): |K| is then rounded after every operation, exactly as the torch reference and the
# interpreter compute it, so a threshold τ taken from any backend selects the same entries in
# every kernel (with fma, 15-23% of |K| entries move by 1 ulp and an entry equal to τ can flip).
_NO_CONTRACTION = dict(enable_fp_fusion=False)


def _coeffs(coeffs: Sequence[float], device) -> Tensor:
    # a new contiguous vector: the kernels read c_h at c_ptr + h. Every caller tensor (x, W0, bias,
    # A, B, dy, values) goes in with its own strides; τ is 0-d (one element at its data_ptr); the
    # other buffers (dA, dB, the histogram, the prefix, the outputs) are allocated here, contiguous.
    # Made once per (coefficients, device): torch.tensor(list, device=cuda) at every call is a
    # host-to-device copy that synchronises the host, three times per SNELL layer per step. The
    # cached vector is never written to.
    return _coeffs_on(tuple(float(c) for c in coeffs), torch.device(device))


@functools.lru_cache(maxsize=64)
def _coeffs_on(coeffs: tuple, device: torch.device) -> Tensor:
    return torch.tensor(coeffs, dtype=torch.float32, device=device)


def _factor_args(A: Tensor, B: Tensor):
    return (*A.stride(), *B.stride())


def _dot_precision(t: Tensor) -> str:
    """fp32 follows torch.backends.cuda.matmul.allow_tf32 on a GPU (ieee under the interpreter)."""
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def kth_smallest_abs_triton(
    k: int, A: Optional[Tensor] = None, B: Optional[Tensor] = None, coeffs: Sequence[float] = (),
    values: Optional[Tensor] = None, block: Optional[int] = None,
) -> Tensor:
    """The k-th smallest (1-based) of |K| (K from A (H, n, d), B (H, m, d), coeffs), or of |values|
    (m, n) when given, as a 0-d fp32 tensor, by an exact three-pass radix select on the fp32 bits.
    No m×n buffer is created; nothing waits on the host. `block` overrides the tile (tests)."""
    if values is not None:
        m, n = values.shape
        device, H, d = values.device, 1, 1
        A = B = values.new_zeros((1, 1, 1), dtype=torch.float32)  # unused by the FROM_VALUES kernel
        c = torch.zeros(1, dtype=torch.float32, device=device)
        v, v_strides = values, values.stride()
    else:
        H, n, d = A.shape
        m = B.shape[1]
        device = A.device
        c = _coeffs(coeffs, device)
        v, v_strides = A, (0, 0)
    N = m * n
    if not 1 <= k <= N:
        raise ValueError(f"kth_smallest_abs_triton: k must be in [1, {N}], got {k}")
    if N >= 2**31:
        raise ValueError(f"kth_smallest_abs_triton: {N} entries overflow the int32 histogram counters")
    cfg = _config("select", v if values is not None else A, d)
    if block:
        cfg = {**cfg, "BLOCK_M": block, "BLOCK_N": block}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    prefix = torch.zeros(1, dtype=torch.int64, device=device)
    rank = torch.full((1,), k, dtype=torch.int64, device=device)
    for shift, nbits in _RADIX_PASSES:
        hist = torch.zeros(1 << nbits, dtype=torch.int32, device=device)
        _snell_select_kernel[grid](
            A, B, c, v, prefix.to(torch.int32), hist, m, n, d, *_factor_args(A, B), *v_strides,
            FROM_VALUES=values is not None, SHIFT=shift, NBITS=nbits, H=H, **cfg, **_NO_CONTRACTION)
        cum = hist.cumsum(0)  # int64
        bucket = torch.searchsorted(cum, rank)  # first bucket whose cumulative count reaches rank
        rank = rank - (cum[bucket] - hist[bucket])  # rank among the entries of that bucket
        prefix = (prefix << nbits) | bucket
    return prefix.to(torch.int32).view(torch.float32).reshape(())


# Radix passes over the 31 value bits of a non-negative fp32: (shift, bits).
_RADIX_PASSES = ((20, 11), (10, 10), (0, 10))


def snell_threshold_triton(A: Tensor, B: Tensor, coeffs: Sequence[float], sparsity: float) -> Tensor:
    """τ (0-d fp32): the k-th smallest |K|, k = ⌊s·(m·n − 1)⌋ + 1; -inf for s = 0."""
    if sparsity == 0:
        return torch.full((), float("-inf"), dtype=torch.float32, device=A.device)
    N = A.shape[1] * B.shape[1]
    return kth_smallest_abs_triton(kth_rank(N, sparsity), A, B, coeffs)


def snell_fwd_triton(
    x: Tensor, W0: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor
) -> Tensor:
    """x (T, n), W0 (m, n), bias (m,), A (H, n, d), B (H, m, d), tau (0-d) -> y (T, m)."""
    T, n = x.shape
    m = W0.shape[0]
    H, _, d = A.shape
    y = torch.empty((T, m), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    cfg = _config("fwd", x, d)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _snell_fwd_kernel[grid](
        x, W0, bias if bias is not None else x, A, B, _coeffs(coeffs, x.device), tau.to(torch.float32), y,
        T, m, n, d, *x.stride(), *W0.stride(), *y.stride(), bias.stride(0) if bias is not None else 0,
        *_factor_args(A, B),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x), H=H, **cfg, **_NO_CONTRACTION)
    return y


def snell_bwd_triton(
    dy: Tensor, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m) -> dx (T, n) (empty (0, n) unless need_dx), dA (H, n, d), dB (H, m, d) in A's dtype.
    dA, dB are bitwise reproducible under torch.use_deterministic_algorithms(True) (module docstring)."""
    T, n = x.shape
    m = W0.shape[0]
    H, _, d = A.shape
    c = _coeffs(coeffs, x.device)
    tau32 = tau.to(torch.float32)
    cfg = _config("dab", x, d)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    deterministic = torch.are_deterministic_algorithms_enabled()
    f32 = dict(dtype=torch.float32, device=x.device)
    # new contiguous buffers, indexed as such by the kernel ((h·n + j)·d + dd), hence no strides
    if deterministic:  # every slot is written by its tile
        dA = torch.empty((grid[0], H, n, d), **f32)
        dB = torch.empty((grid[1], H, m, d), **f32)
    else:
        dA = torch.zeros((H, n, d), **f32)
        dB = torch.zeros((H, m, d), **f32)
    if T > 0:
        _snell_dab_kernel[grid](
            dy, x, A, B, c, tau32, dA, dB, T, m, n, d, *dy.stride(), *x.stride(), *_factor_args(A, B),
            DOT_PRECISION=_dot_precision(x), DETERMINISTIC=deterministic, H=H, **cfg, **_NO_CONTRACTION)
    elif deterministic:
        dA.zero_()
        dB.zero_()
    if deterministic:
        dA, dB = dA.sum(0), dB.sum(0)  # a fixed-order reduction over the tiles
    dA, dB = dA * c[:, None, None], dB * c[:, None, None]
    if need_dx:
        dx = torch.empty((T, n), dtype=dy.dtype, device=dy.device)
        if dx.numel() > 0:
            cfg = _config("dx", dy, d)
            grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(n, cfg["BLOCK_N"]))
            _snell_dx_kernel[grid](
                dy, W0, A, B, c, tau32, dx, T, m, n, d, *dy.stride(), *W0.stride(), *dx.stride(),
                *_factor_args(A, B), DOT_PRECISION=_dot_precision(dy), H=H, **cfg, **_NO_CONTRACTION)
    else:
        dx = dy.new_empty((0, n))
    return dx, dA.to(A.dtype), dB.to(B.dtype)


def kernelized_update_triton(A: Tensor, B: Tensor, coeffs: Sequence[float]) -> Tensor:
    """K (m, n) fp32 written by `_kernel_tile`: for tests, which compare the radix select with
    torch.kthvalue on exactly these values (this IS an m×n buffer)."""
    H, n, d = A.shape
    m = B.shape[1]
    out = torch.empty((m, n), dtype=torch.float32, device=A.device)
    cfg = _config("matrix", A, d)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _kernelized_update_tiles[grid](A, B, _coeffs(coeffs, A.device), out, m, n, d, *_factor_args(A, B),
                                *out.stride(), H=H, **cfg, **_NO_CONTRACTION)
    return out
