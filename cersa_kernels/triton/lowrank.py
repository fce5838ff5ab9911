"""Triton kernels for the CERSA low-rank op (METHODS.md §1).

Every product in the op is a skinny GEMM, so one tiled kernel, `_lowrank_gemm_kernel`, serves them
all: it takes any strides (transposes are free views, x may have a row stride), accumulates in
fp32, adds the bias in its epilogue, and can split the reduction dimension over programs.

Forward (writes h and y, nothing else of size T):
    US = U S                   (m×k, independent of T: S is folded into U once per call)
    h  = x V                   (T×k, saved for backward)
    y  = h (US)ᵀ + b           (bias fused into the epilogue)
Backward:
    g  = dy U                  (T×k, computed once)
    dS = gᵀ h                  (k×k, reduction over T split across programs, fp32 partials)
    SVt = S Vᵀ                 (k×n, independent of T: S is folded into Vᵀ once per call)
    dx = g SVt                 (skipped when x needs no gradient)
Folding S into the k×m / k×n factor costs 2k²·(m or n) FLOPs per call instead of 2k²·T for a
separate (T×k)·(k×k) pass, and no T×k intermediate is written for it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import triton_interpreting


@triton.jit
def _lowrank_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[s] = A[:, Ks] @ B[Ks, :] (+ bias) for the s-th slice Ks of the reduction dimension."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-tiles share the B tiles they read while they are in L2.
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        in_k = offs_k < k_end
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & in_k[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=in_k[:, None] & (offs_n[None, :] < N), other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + split * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# The interpreter runs one fixed config (autotuning with several configs does not work there);
# on a GPU the autotuner picks per (M, N, K) among tile shapes that suit Ampere and Hopper.
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
_GPU_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5), (32, 64, 64, 4, 4),
    ]
]


@functools.lru_cache(maxsize=1)
def _tuned_kernel():
    return triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "K_PER_SPLIT"])(_lowrank_gemm_kernel)


# dS reduces over T: split it so that small k (few output tiles) still fills the GPU.
_MIN_ROWS_PER_SPLIT = 256


def _num_programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _gemm(a: Tensor, b: Tensor, out_dtype: torch.dtype, bias: Optional[Tensor] = None, split: int = 1) -> Tensor:
    """a (M, K) @ b (K, N) (+ bias (N,)) -> (M, N) in out_dtype. With split > 1 the reduction over
    K is cut into `split` slices run by separate programs into fp32 partials, then summed."""
    M, K = a.shape
    N = b.shape[1]
    rows_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), 64) * 64  # whole BLOCK_K steps
    split = triton.cdiv(max(K, 1), rows_per_split)
    assert bias is None or split == 1, "the bias epilogue would add the bias once per slice"
    partial_dtype = torch.float32 if split > 1 else out_dtype
    out = torch.empty((split, M, N), device=a.device, dtype=partial_dtype)
    if out.numel() == 0 or K == 0:
        out = out.zero_()[0] if bias is None else bias.to(out_dtype).expand(M, N).clone()
        return out.to(out_dtype)
    args = (
        a, b, out, bias if bias is not None else a,
        M, N, K, rows_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(),
    )
    meta = dict(HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    if triton_interpreting():
        grid = (triton.cdiv(M, 64) * triton.cdiv(N, 64), split)
        _lowrank_gemm_kernel[grid](*args, **meta, **_INTERPRETER_CONFIG)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)

        _tuned_kernel()[grid](*args, **meta)
    return out[0] if split == 1 else out.sum(0).to(out_dtype)


def _ds_split(T: int, k: int, device: torch.device) -> int:
    tiles = triton.cdiv(k, 64) ** 2
    by_occupancy = max(1, _num_programs_wanted(device) // tiles)
    return max(1, min(by_occupancy, triton.cdiv(T, _MIN_ROWS_PER_SPLIT)))


def lowrank_fwd_triton(x: Tensor, V: Tensor, S: Tensor, U: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """x (T, n), V (n, k), S (k, k), U (m, k), bias (m,) -> y (T, m), h (T, k)."""
    US = _gemm(U, S.to(x.dtype), x.dtype)
    h = _gemm(x, V, x.dtype)
    y = _gemm(h, US.T, x.dtype, bias=bias)
    return y, h


def lowrank_bwd_triton(dy: Tensor, h: Tensor, V: Tensor, S: Tensor, U: Tensor, need_dx: bool) -> tuple[Tensor, Tensor]:
    """dy (T, m), h (T, k) -> dx (T, n) (empty (0, n) unless need_dx), dS (k, k) in S's dtype."""
    T, k = h.shape
    g = _gemm(dy, U, dy.dtype)
    split = _ds_split(T, k, dy.device)
    dS = _gemm(g.T, h, S.dtype, split=split)
    if not need_dx:
        return dy.new_empty((0, V.shape[0])), dS
    SVt = _gemm(S.to(dy.dtype), V.T, dy.dtype)
    return _gemm(g, SVt, dy.dtype), dS
