"""The one tolerance table of the test suite, and the accumulation rule every kernel test uses.

For ops that accumulate (every GEMM here) a kernel is judged against a float64 oracle:
    max|out − ref64| ≤ 2·max|out_torch_same_dtype − ref64| + atol·scale
so a kernel may be at most twice as far from exact as eager PyTorch in the same dtype.
"""
import torch

ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def assert_matches_reference(out: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor, what: str = ""):
    """Accumulation rule; atol is relative to the oracle's magnitude (outputs are O(1) or larger)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = max(1.0, float(ref64.abs().max()))
    err = float((out.double() - ref64).abs().max())
    eager_err = float((torch_same_dtype.double() - ref64).abs().max())
    budget = 2 * eager_err + ATOL[out.dtype] * scale
    assert err <= budget, f"{what}: max error {err:.3e} > budget {budget:.3e} (eager same-dtype error {eager_err:.3e})"
