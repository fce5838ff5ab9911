"""Triton kernels for SNELL (METHODS.md §4) that never hold an m×n matrix in memory.

Every m×n quantity (K, D_h, the mask, G = dyᵀx, E_h) exists only as a register tile. One jit
helper, `_kernel_tile`, builds a (BLOCK_M × BLOCK_N) tile of K from rows of B and A:
D_h = sqrt(max(‖b‖² + ‖a‖² − 2 b·a, 0)) (fp32, b·a by an ieee tl.dot), K = Σ_h c_h D_h. The
selection and the fused kernels all call it with the same block shape, so τ and the masks they
apply come from the same |K| values.

- Threshold (`snell_threshold_triton`): an exact radix select on the int32 bit pattern of |K|
  (fp32, non-negative, so the bit pattern orders like the value). Three passes over all tiles, each
  a histogram of the next bit field (bits 30..20, 19..10, 9..0) among the entries whose higher bits
  match the prefix found so far; a cumulative sum on the device picks the bucket holding the k-th
  smallest. After pass 3 the prefix *is* the bit pattern of the k-th smallest |K|: the exact
  torch.kthvalue answer, with no m×n buffer and no host synchronisation.
- Forward (`_snell_fwd_kernel`): per (T-tile, m-tile), loop over n-tiles: W tile = W0 tile +
  K ⊙ |K| ⊙ 1[|K| > τ] (fp32), acc += x_tile @ W_tileᵀ; bias in the epilogue. K is regenerated per
  T-tile (extra ≈ 3q/(2·BLOCK_T) of the GEMM's FLOPs on CUDA cores).
- dx (`_snell_dx_kernel`): per (T-tile, n-tile), loop over m-tiles: acc += dy_tile @ W_tile.
- dA, dB (`_snell_dab_kernel`): per (m-tile, n-tile), G tile = Σ_T dy_tileᵀ x_tile (loop over T),
  G' = G ⊙ |K| ⊙ mask, then per head E_h = G' ⊘ D_h and the partial sums
  c_h (rowsum(E_h) ⊙ B_h − E_h A_h), c_h (colsum(E_h) ⊙ A_h − E_hᵀ B_h), atomically added into
  fp32 dB (H, m, d_h) and dA (H, n, d_h).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import triton_interpreting
from ..reference.snell import kth_rank


@triton.jit
def _load_rows(ptr, h, offs, rows, d, stride_h, stride_r, stride_d, BLOCK_D: tl.constexpr):
    """(len(offs), BLOCK_D) fp32 rows `offs` of head h of a (H, rows, d) tensor, zero-padded."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs[:, None] < rows) & (offs_d[None, :] < d)
    p = ptr + h * stride_h + offs[:, None] * stride_r + offs_d[None, :] * stride_d
    return tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _head_distance(b, a):
    """D (BM, BN) = ‖b_i − a_j‖ from b (BM, BD), a (BN, BD) fp32; clamped at 0 before the sqrt."""
    bb = tl.sum(b * b, axis=1)
    aa = tl.sum(a * a, axis=1)
    ba = tl.dot(b, tl.trans(a), input_precision="ieee")
    return tl.sqrt(tl.maximum(bb[:, None] + aa[None, :] - 2.0 * ba, 0.0))


@triton.jit
def _kernel_tile(
    a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """K tile (BM, BN) fp32: Σ_h c_h ‖B[h, i] − A[h, j]‖ for i in offs_m, j in offs_n."""
    k = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in tl.static_range(H):
        b = _load_rows(b_ptr, h, offs_m, m, d, stride_bh, stride_bm, stride_bd, BLOCK_D)
        a = _load_rows(a_ptr, h, offs_n, n, d, stride_ah, stride_an, stride_ad, BLOCK_D)
        k += tl.load(c_ptr + h) * _head_distance(b, a)
    return k


@triton.jit
def _sparse_delta_tile(
    a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ΔW_s tile (BM, BN) fp32 = K·|K| where |K| > τ (and inside the matrix), else 0."""
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N, BLOCK_D)
    absk = tl.abs(k)
    keep = (absk > tau) & (offs_m[:, None] < m) & (offs_n[None, :] < n)
    return tl.where(keep, k * absk, 0.0)


@triton.jit
def _snell_select_kernel(
    a_ptr, b_ptr, c_ptr, v_ptr, prefix_ptr, hist_ptr, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, stride_vm, stride_vn,
    FROM_VALUES: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
                         stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N, BLOCK_D)
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
    tl.atomic_add(hist_ptr + bins, hist)


@triton.jit
def _snell_fwd_kernel(
    x_ptr, w0_ptr, bias_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, y_ptr, T, m, n, d,
    stride_xt, stride_xn, stride_wm, stride_wn, stride_yt, stride_ym,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
        w = tl.load(w0_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                    mask=(offs_m[:, None] < m) & (offs_n[None, :] < n), other=0.0).to(tl.float32)
        w += _sparse_delta_tile(a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d,
                                stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
                                H, BLOCK_M, BLOCK_N, BLOCK_D)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=offs_m < m, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_m[None, :] * stride_ym, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_m[None, :] < m))


@triton.jit
def _snell_dx_kernel(
    dy_ptr, w0_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, dx_ptr, T, m, n, d,
    stride_dyt, stride_dym, stride_wm, stride_wn, stride_dxt, stride_dxn,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    DOT_PRECISION: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
        w = tl.load(w0_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                    mask=(offs_m[:, None] < m) & (offs_n[None, :] < n), other=0.0).to(tl.float32)
        w += _sparse_delta_tile(a_ptr, b_ptr, c_ptr, tau, offs_m, offs_n, m, n, d,
                                stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
                                H, BLOCK_M, BLOCK_N, BLOCK_D)
        acc = tl.dot(g, w.to(g.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(dx_ptr + offs_t[:, None] * stride_dxt + offs_n[None, :] * stride_dxn, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_t[:, None] < T) & (offs_n[None, :] < n))


@triton.jit
def _snell_dab_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, c_ptr, tau_ptr, da_ptr, db_ptr, T, m, n, d,
    stride_dyt, stride_dym, stride_xt, stride_xn,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd,
    DOT_PRECISION: tl.constexpr, H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For one (m-tile, n-tile): G = dyᵀx over all T, then this tile's share of dA and dB.
    da_ptr, db_ptr: contiguous fp32 (H, n, d) and (H, m, d) accumulators."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        dyt = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_t[None, :] * stride_dyt,
                      mask=(offs_m[:, None] < m) & (offs_t[None, :] < T), other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_n[None, :] * stride_xn,
                    mask=(offs_t[:, None] < T) & (offs_n[None, :] < n), other=0.0)
        g = tl.dot(dyt, x, g, input_precision=DOT_PRECISION)
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N, BLOCK_D)
    absk = tl.abs(k)
    keep = (absk > tl.load(tau_ptr)) & (offs_m[:, None] < m) & (offs_n[None, :] < n)
    gp = tl.where(keep, g * absk, 0.0)
    offs_d = tl.arange(0, BLOCK_D)
    for h in tl.static_range(H):
        b = _load_rows(b_ptr, h, offs_m, m, d, stride_bh, stride_bm, stride_bd, BLOCK_D)
        a = _load_rows(a_ptr, h, offs_n, n, d, stride_ah, stride_an, stride_ad, BLOCK_D)
        dist = _head_distance(b, a)
        e = tl.where(dist > 0, gp / tl.where(dist > 0, dist, 1.0), 0.0)
        c = tl.load(c_ptr + h)
        db = c * (tl.sum(e, axis=1)[:, None] * b - tl.dot(e, a, input_precision="ieee"))
        da = c * (tl.sum(e, axis=0)[:, None] * a - tl.dot(tl.trans(e), b, input_precision="ieee"))
        tl.atomic_add(db_ptr + h * m * d + offs_m[:, None] * d + offs_d[None, :], db,
                      mask=(offs_m[:, None] < m) & (offs_d[None, :] < d))
        tl.atomic_add(da_ptr + h * n * d + offs_n[:, None] * d + offs_d[None, :], da,
                      mask=(offs_n[:, None] < n) & (offs_d[None, :] < d))


# One fixed tile shape. The interpreter cannot autotune; GPU tuning waits for a GPU run.
# The selection and the fused kernels use the same (BLOCK_M, BLOCK_N) for K, so the K values
# behind τ and behind the masks come from identical tile computations.
_INTERPRETER_BLOCKS = dict(BLOCK_T=32, BLOCK_M=32, BLOCK_N=32)
_GPU_BLOCKS = dict(BLOCK_T=64, BLOCK_M=64, BLOCK_N=64)
_GPU_LAUNCH = dict(num_warps=4, num_stages=2)
# Radix passes over the 31 value bits of a non-negative fp32: (shift, bits).
_RADIX_PASSES = ((20, 11), (10, 10), (0, 10))


def _blocks():
    return _INTERPRETER_BLOCKS if triton_interpreting() else _GPU_BLOCKS


def _launch(kernel, grid, *args, **meta):
    if triton_interpreting():
        kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **_GPU_LAUNCH)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension ≥ 16


def _coeffs(coeffs: Sequence[float], device) -> Tensor:
    return torch.tensor([float(c) for c in coeffs], dtype=torch.float32, device=device)


def _factor_args(A: Tensor, B: Tensor):
    return (*A.stride(), *B.stride())


def _dot_precision(t: Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


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
    bm = block or _blocks()["BLOCK_M"]
    bn = block or _blocks()["BLOCK_N"]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    prefix = torch.zeros(1, dtype=torch.int64, device=device)
    rank = torch.full((1,), k, dtype=torch.int64, device=device)
    for shift, nbits in _RADIX_PASSES:
        hist = torch.zeros(1 << nbits, dtype=torch.int32, device=device)
        _launch(
            _snell_select_kernel, grid,
            A, B, c, v, prefix.to(torch.int32), hist, m, n, d, *_factor_args(A, B), *v_strides,
            FROM_VALUES=values is not None, SHIFT=shift, NBITS=nbits, H=H,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(d),
        )
        cum = hist.cumsum(0)  # int64
        bucket = torch.searchsorted(cum, rank)  # first bucket whose cumulative count reaches rank
        rank = rank - (cum[bucket] - hist[bucket])  # rank among the entries of that bucket
        prefix = (prefix << nbits) | bucket
    return prefix.to(torch.int32).view(torch.float32).reshape(())


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
    blk = _blocks()
    grid = (triton.cdiv(T, blk["BLOCK_T"]), triton.cdiv(m, blk["BLOCK_M"]))
    _launch(
        _snell_fwd_kernel, grid,
        x, W0, bias if bias is not None else x, A, B, _coeffs(coeffs, x.device), tau.to(torch.float32), y,
        T, m, n, d, *x.stride(), *W0.stride(), *y.stride(), *_factor_args(A, B),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x), H=H, BLOCK_D=_block_d(d), **blk,
    )
    return y


def snell_bwd_triton(
    dy: Tensor, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, coeffs: Sequence[float], tau: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dy (T, m) -> dx (T, n) (empty (0, n) unless need_dx), dA (H, n, d), dB (H, m, d) in A's dtype."""
    T, n = x.shape
    m = W0.shape[0]
    H, _, d = A.shape
    blk = _blocks()
    c = _coeffs(coeffs, x.device)
    tau32 = tau.to(torch.float32)
    dA = torch.zeros((H, n, d), dtype=torch.float32, device=x.device)
    dB = torch.zeros((H, m, d), dtype=torch.float32, device=x.device)
    if T > 0:
        grid = (triton.cdiv(m, blk["BLOCK_M"]), triton.cdiv(n, blk["BLOCK_N"]))
        _launch(
            _snell_dab_kernel, grid,
            dy, x, A, B, c, tau32, dA, dB, T, m, n, d, *dy.stride(), *x.stride(), *_factor_args(A, B),
            DOT_PRECISION=_dot_precision(x), H=H, BLOCK_D=_block_d(d), **blk,
        )
    if need_dx:
        dx = torch.empty((T, n), dtype=dy.dtype, device=dy.device)
        if dx.numel() > 0:
            grid = (triton.cdiv(T, blk["BLOCK_T"]), triton.cdiv(n, blk["BLOCK_N"]))
            _launch(
                _snell_dx_kernel, grid,
                dy, W0, A, B, c, tau32, dx, T, m, n, d, *dy.stride(), *W0.stride(), *dx.stride(),
                *_factor_args(A, B), DOT_PRECISION=_dot_precision(dy), H=H, BLOCK_D=_block_d(d), **blk,
            )
    else:
        dx = dy.new_empty((0, n))
    return dx, dA.to(A.dtype), dB.to(B.dtype)


def kernel_matrix_triton(A: Tensor, B: Tensor, coeffs: Sequence[float]) -> Tensor:
    """K (m, n) fp32 written by `_kernel_tile` with the kernels' block shape: for tests, which
    compare the radix select with torch.kthvalue on exactly these values (this IS an m×n buffer)."""
    H, n, d = A.shape
    m = B.shape[1]
    out = torch.empty((m, n), dtype=torch.float32, device=A.device)
    blk = _blocks()
    grid = (triton.cdiv(m, blk["BLOCK_M"]), triton.cdiv(n, blk["BLOCK_N"]))
    _launch(_kernel_matrix_kernel, grid, A, B, _coeffs(coeffs, A.device), out, m, n, d, *_factor_args(A, B),
            *out.stride(), H=H, BLOCK_M=blk["BLOCK_M"], BLOCK_N=blk["BLOCK_N"], BLOCK_D=_block_d(d))
    return out


@triton.jit
def _kernel_matrix_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, m, n, d,
    stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, stride_om, stride_on,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k = _kernel_tile(a_ptr, b_ptr, c_ptr, offs_m, offs_n, m, n, d,
                     stride_ah, stride_an, stride_ad, stride_bh, stride_bm, stride_bd, H, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, k,
             mask=(offs_m[:, None] < m) & (offs_n[None, :] < n))
