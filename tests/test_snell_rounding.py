"""SNELL keeps the entries with |K| > τ, so every kernel that compares |K| with τ must compute |K|
with the same bits as whatever computed τ (the doctor and the merge take τ from the reference).
A compiler that contracts a*b + c into one fma rounds once instead of twice: this file shows, with
an fma-emulating oracle on CPU (float64 product, one rounding to fp32; the interpreter never
contracts), that contraction moves |K| by an ulp often enough to change the kept set at τ; the
kernels are therefore compiled without contraction (triton/snell.py `_NO_CONTRACTION`, csrc/snell.cu
`__fmul_rn`/`__fadd_rn`), which tests/test_triton_compile.py checks in the PTX."""
import pytest
import torch

from cersa_kernels.backends import use_backend
from cersa_kernels.reference import snell as ref
from cersa_kernels.triton import snell as tl_snell

COEFFS = (0.1, -0.1)


def _factors(n=130, m=77, d=22, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(H, n, d, generator=g).half().float()  # fp16 values, as a half-precision layer holds
    B = torch.randn(H, m, d, generator=g).half().float()
    return A, B


def contracted_abs_k(A, B, coeffs):
    """|K| as a compiler that fuses every a*b + c would compute it: each step rounded once."""
    sq = torch.zeros(A.shape[0], B.shape[1], A.shape[1], dtype=torch.float32)
    for dd in range(A.shape[2]):
        diff = B[:, :, dd, None] - A[:, None, :, dd]
        sq = (sq.double() + diff.double() * diff.double()).float()
    D = sq.sqrt()
    k = torch.zeros(B.shape[1], A.shape[1], dtype=torch.float32)
    for h, c in enumerate(coeffs):
        k = (k.double() + float(torch.tensor(c, dtype=torch.float32)) * D[h].double()).float()
    return k.abs()


def test_contraction_would_change_the_kept_set():
    A, B = _factors()
    exact = ref.kernelized_update(A, B, COEFFS).abs()
    fused = contracted_abs_k(A, B, COEFFS)
    differ = (exact != fused).float().mean().item()
    assert differ > 0.01, f"only {differ:.2%} of |K| entries differ: the oracle does not emulate fma"
    flips = 0
    for s in (0.1, 0.25, 0.5, 0.75, 0.9):
        tau = ref.snell_threshold(A, B, COEFFS, s)
        flips += int(((exact > tau) != (fused > tau)).sum())
    assert flips > 0, "no entry crossed τ: pick factors where contraction matters"


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_triton_kernels_keep_exactly_the_references_entries(sparsity):
    """Without contraction the kernels' |K| is the reference's bit for bit: τ from either backend,
    and the kept set at τ, agree exactly."""
    A, B = _factors(seed=1)
    tau_ref = ref.snell_threshold(A, B, COEFFS, sparsity)
    tau_tl = tl_snell.snell_threshold_triton(A, B, COEFFS, sparsity)
    assert tau_tl.item() == tau_ref.item()
    K_tl = tl_snell.kernelized_update_triton(A, B, COEFFS)
    K_ref = ref.kernelized_update(A, B, COEFFS)
    assert torch.equal(K_tl, K_ref)
    assert torch.equal(K_tl.abs() > tau_ref, K_ref.abs() > tau_ref)


def test_every_snell_launch_is_compiled_without_contraction(monkeypatch):
    """Each SNELL launch passes enable_fp_fusion=False (what the compile test then sees in PTX)."""
    seen = []
    for name in ("_snell_select_kernel", "_snell_fwd_kernel", "_snell_dab_kernel", "_snell_dx_kernel",
                 "_kernelized_update_tiles"):
        kernel = getattr(tl_snell, name)

        class Spy:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((self.name, kwargs.get("enable_fp_fusion")))
                    return self.kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(tl_snell, name, Spy(kernel, name))
    A, B = _factors(n=20, m=12, d=4, seed=2)
    x, dy = torch.randn(5, 20), torch.randn(5, 12)
    W0, bias = torch.randn(12, 20), torch.randn(12)
    tau = tl_snell.snell_threshold_triton(A, B, COEFFS, 0.5)
    tl_snell.snell_fwd_triton(x, W0, bias, A, B, COEFFS, tau)
    tl_snell.snell_bwd_triton(dy, x, W0, A, B, COEFFS, tau, True)
    tl_snell.kernelized_update_triton(A, B, COEFFS)
    assert {name for name, _ in seen} == {"_snell_select_kernel", "_snell_fwd_kernel", "_snell_dab_kernel",
                                          "_snell_dx_kernel", "_kernelized_update_tiles"}
    assert all(flag is False for _, flag in seen), seen
