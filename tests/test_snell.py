"""SNELL (docs/methods.md §4): the Triton kernels (interpreted, float32) against the reference, the exact
threshold against torch.kthvalue, the reference against the math (gradcheck, autograd of the plain
formula, torch.quantile), opcheck, torch.compile, the no-m×n-buffer and saved-bytes claims, the layer
and its errors.

Near-threshold entries: the Triton kernels compute |K| with tiled ieee dots, the reference with
torch matmuls, so an entry within float error of τ could land on different sides of it. The
kernel-vs-reference tests therefore draw inputs where no |K| lies within 1e-5·max|K| of τ (checked
in float64, see `draw_inputs`); the selection itself is tested for exact equality on the very |K|
values it selects from (`kernelized_update_triton` writes them with the kernels' own tile code).
"""
import math

import pytest
import torch
from torch import nn

from cersa_kernels import SnellLinear, backends
from cersa_kernels._alloc import AllocationRecorder
from cersa_kernels.backends import cuda as cuda_backend
from cersa_kernels.backends import use_backend
from cersa_kernels.ops import snell_linear, snell_threshold
from cersa_kernels.reference import snell as ref

from tolerances import assert_matches_reference

COEFFS = (0.1, -0.1)
SPARSITIES = [0.0, 0.5, 0.9, 0.99]
MARGIN = 1e-5  # of max|K|: fp32 |K| is within ~1e-7·max|K| of exact here (measured 4e-8)


def _uniform(*shape, bound, gen, dtype=torch.float64):
    return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


def threshold_margin(A, B, coeffs, sparsity) -> float:
    """Distance (relative to max|K|) from τ to the nearest other |K|, in float64; inf for s = 0."""
    if sparsity == 0:
        return math.inf
    absK = ref.kernelized_update(A.double(), B.double(), coeffs).abs().flatten()
    k = ref.kth_rank(absK.numel(), sparsity)
    vals = absK.sort().values
    gaps = [vals[k - 1] - vals[k - 2] if k >= 2 else math.inf, vals[k] - vals[k - 1] if k < vals.numel() else math.inf]
    return float(min(gaps)) / float(vals[-1])


def draw_inputs(T, n, m, q, heads=2, sparsity=0.9, bias=True, seed=0, lead=(), coeffs=COEFFS):
    """x (*lead, T, n), W0, bias, A (heads, n, q/heads), B (heads, m, q/heads) in float32, A and B
    kaiming-like as in SnellLinear; redrawn (bounded tries) until τ is at least MARGIN·max|K| from
    every other |K|, so fp32 rounding cannot move an entry across τ."""
    d = q // heads
    for attempt in range(50):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        A = _uniform(heads, n, d, bound=1 / math.sqrt(d), gen=g)
        B = _uniform(heads, m, d, bound=1 / math.sqrt(d), gen=g)
        if threshold_margin(A, B, coeffs, sparsity) > MARGIN:
            break
    else:
        raise AssertionError("no draw with a clear threshold margin in 50 tries")
    x = torch.randn(*lead, T, n, generator=g)
    W0 = _uniform(m, n, bound=1 / math.sqrt(n), gen=g, dtype=torch.float32)
    b = torch.randn(m, generator=g) if bias else None
    return x, W0, b, A.float(), B.float()


def run(backend, x, W0, b, A, B, coeffs=COEFFS, sparsity=0.9, dy_seed=1):
    """Forward + backward through the public op; returns y, dx, dA, dB, dbias."""
    x = x.detach().requires_grad_(True)
    A = A.detach().requires_grad_(True)
    B = B.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(True)
    with use_backend(backend):
        y = snell_linear(x, W0, b, A, B, coeffs, sparsity)
        # drawn in float32 whatever y.dtype is, so every run gets the same upstream gradient
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
        y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad, None if b is None else b.grad


def oracle(x, W0, b, A, B, **kw):
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run("torch", as64(x), as64(W0), as64(b), as64(A), as64(B), **kw)


NAMES = ["y", "dx", "dA", "dB", "dbias"]


def check_against_reference(inputs, **kw):
    expected = oracle(*inputs, **kw)
    eager = run("torch", *inputs, **kw)
    got = run("triton", *inputs, **kw)
    for name, g, e, r in zip(NAMES, got, eager, expected):
        if r is None:
            assert g is None
            continue
        assert_matches_reference(g, e, r, f"{name} {kw}")


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_triton_matches_reference(sparsity):
    check_against_reference(draw_inputs(37, 130, 77, 8, sparsity=sparsity), sparsity=sparsity)


def test_triton_matches_reference_other_shapes():
    """3-D input without bias; 4 heads of d_h = 8 (q = 32); a column-strided x."""
    check_against_reference(draw_inputs(5, 64, 96, 16, bias=False, lead=(3,)), sparsity=0.9)
    coeffs4 = (0.1, -0.1, 0.05, -0.2)
    x, W0, b, A, B = draw_inputs(19, 33, 45, 32, heads=4, sparsity=0.7, coeffs=coeffs4)
    check_against_reference((x, W0, b, A, B), sparsity=0.7, coeffs=coeffs4)
    xs = torch.randn(37, 260)[:, ::2]
    _, W0, b, A, B = draw_inputs(37, 130, 77, 8, sparsity=0.5)
    check_against_reference((xs, W0, b, A, B), sparsity=0.5)


def test_sparsity_keeps_the_right_count():
    """On the Triton path, exactly N − k entries of ΔW_s survive (no ties in random data)."""
    from cersa_kernels.triton.snell import kernelized_update_triton

    _, _, _, A, B = draw_inputs(1, 130, 77, 8, sparsity=0.9)
    with use_backend("triton"):
        tau = snell_threshold(A, B, COEFFS, 0.9)
    absK = kernelized_update_triton(A, B, COEFFS).abs()
    N = absK.numel()
    assert int((absK > tau).sum()) == N - ref.kth_rank(N, 0.9)


# ---------------------------------------------------------------- the threshold (selection)


@pytest.mark.parametrize("shape", [(1, 1, 2), (77, 130, 4), (33, 5, 16), (200, 3, 1)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99, 0.999999])
def test_triton_threshold_is_kthvalue_of_the_same_values(shape, sparsity):
    """τ from the radix select equals torch.kthvalue on the |K| the kernels compute, bit for bit."""
    from cersa_kernels.triton.snell import kernelized_update_triton

    m, n, d = shape
    g = torch.Generator().manual_seed(m * n + d)
    A, B = torch.randn(2, n, d, generator=g), torch.randn(2, m, d, generator=g)
    with use_backend("triton"):
        tau = snell_threshold(A, B, COEFFS, sparsity)
    assert tau.dtype == torch.float32 and tau.shape == ()
    if sparsity == 0:
        assert tau == float("-inf")
        return
    absK = kernelized_update_triton(A, B, COEFFS).abs().flatten()
    expected = torch.kthvalue(absK, ref.kth_rank(absK.numel(), sparsity)).values
    assert tau.view(torch.int32) == expected.view(torch.int32), (float(tau), float(expected))


def _adversarial_values():
    g = torch.Generator().manual_seed(7)
    return {
        "ties": torch.randint(0, 4, (61, 47), generator=g).float() * torch.randn(61, 47, generator=g).sign(),
        "all_equal": torch.full((33, 65), -0.3),
        "all_zero": torch.zeros(40, 40),
        "one_by_one": torch.tensor([[-2.5]]),
        "signed_zeros_and_subnormals": torch.tensor([[0.0, -0.0, 1e-45, -1e-45], [1e-40, 3e-39, -0.0, 1e-45]]),
        "wide_range": torch.randn(50, 70, generator=g) * torch.logspace(-30, 30, 70),
        "one_bucket": 1.0 + torch.randint(0, 3, (64, 64), generator=g).float() * 2.0**-23,
    }


@pytest.mark.parametrize("case", list(_adversarial_values()))
def test_triton_select_adversarial_values(case):
    """The radix select over given values (ties, constants, zeros, subnormals, a 1×1 matrix, values
    that differ only in the last bit) equals torch.kthvalue for the first, middle and last rank."""
    from cersa_kernels.triton.snell import kth_smallest_abs_triton

    v = _adversarial_values()[case]
    absv = v.abs().flatten()
    N = absv.numel()
    for k in sorted({1, 2 if N > 1 else 1, (N + 1) // 2, N - 1 if N > 1 else 1, N}):
        got = kth_smallest_abs_triton(k, values=v)
        expected = torch.kthvalue(absv, k).values
        assert got.view(torch.int32) == expected.view(torch.int32), (case, k, float(got), float(expected))


def test_all_equal_kernel_drops_everything():
    """A = B = 0: every K is 0, τ = 0, and `|K| > τ` keeps nothing: y is the frozen layer's output."""
    x, W0, b, A, B = draw_inputs(9, 40, 24, 8, sparsity=0.0)
    A, B = torch.zeros_like(A), torch.zeros_like(B)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            assert snell_threshold(A, B, COEFFS, 0.5) == 0
            y = snell_linear(x, W0, b, A, B, COEFFS, 0.5)
        torch.testing.assert_close(y, x @ W0.T + b)


@pytest.mark.slow
def test_triton_select_above_2_24_elements():
    """4097² > 2^24 values (where torch.quantile refuses); 512×512 tiles keep the interpreter at ~6 s."""
    from cersa_kernels.triton.snell import kth_smallest_abs_triton

    v = torch.randn(4097, 4097, generator=torch.Generator().manual_seed(3))
    N = v.numel()
    assert N > 2**24
    k = ref.kth_rank(N, 0.99)
    got = kth_smallest_abs_triton(k, values=v, block=512)
    assert got.view(torch.int32) == torch.kthvalue(v.abs().flatten(), k).values.view(torch.int32)


def test_reference_threshold_above_2_24_elements():
    """The torch path works on a 4097×4097 K: τ is an entry of |K| with fewer than k entries below
    it and at least k at or below it (the definition of the k-th smallest), where quantile fails."""
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(2, 4097, 1, generator=g), torch.randn(2, 4097, 1, generator=g)
    tau = ref.snell_threshold(A, B, COEFFS, 0.9)
    absK = ref.kernelized_update(A, B, COEFFS).abs()
    N, k = absK.numel(), ref.kth_rank(absK.numel(), 0.9)
    assert N > 2**24
    assert int((absK < tau).sum()) < k <= int((absK <= tau).sum())
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(absK.flatten()[: 2**24 + 1], 0.9)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("ties", [False, True])
def test_kthvalue_threshold_keeps_what_quantile_keeps(sparsity, ties):
    """docs/methods.md §4: `|K| > kthvalue(|K|, ⌊s(N−1)⌋+1)` keeps exactly the entries `|K| > quantile(|K|, s)`
    keeps (float64, so the interpolation does not round onto the next value)."""
    g = torch.Generator().manual_seed(11)
    v = torch.randn(37, 41, generator=g, dtype=torch.float64)
    if ties:
        v = v.round()
    absv = v.abs().flatten()
    k = ref.kth_rank(absv.numel(), sparsity)
    kth = torch.kthvalue(absv, k).values
    q = torch.quantile(absv, sparsity)
    assert torch.equal(absv > kth, absv > q)


def test_threshold_and_delta_contract():
    """snell_delta(A, B, coeffs, tau): K·|K| where |K| > tau, in A's dtype (the cuda kernel's contract).
    The kept set is the float32 selection both τ and snell_delta make (compared with itself, never
    with a float64 selection: an entry equal to τ in float32 may lie above it in float64); the kept
    values are compared with float64."""
    _, _, _, A, B = draw_inputs(1, 30, 20, 8, sparsity=0.5)
    tau = float(ref.snell_threshold(A, B, COEFFS, 0.5))
    kept = ref.kernelized_update(A, B, COEFFS).abs() > tau  # float32, like tau
    K64 = ref.kernelized_update(A.double(), B.double(), COEFFS)
    expected = torch.where(kept, K64 * K64.abs(), 0.0)
    got = ref.snell_delta(A, B, COEFFS, tau)
    assert got.dtype == A.dtype and got.shape == (20, 30)
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=1e-5)
    assert int(kept.sum()) == 600 - ref.kth_rank(600, 0.5)
    assert torch.equal(got != 0, kept)


def test_delta_at_sparsity_zero_is_K():
    """τ = −inf (s = 0): ΔW = K, no |K| scaling (docs/methods.md §4), against float64 K."""
    _, _, _, A, B = draw_inputs(1, 30, 20, 8, sparsity=0.0)
    K64 = ref.kernelized_update(A.double(), B.double(), COEFFS)
    torch.testing.assert_close(ref.snell_delta(A, B, COEFFS, float("-inf")).double(), K64, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- the reference is the math


def small64(sparsity=0.5, seed=0):
    x, W0, b, A, B = draw_inputs(6, 9, 7, 4, sparsity=sparsity, seed=seed)
    return tuple(t.double() for t in (x, W0, b, A, B))


def plain_snell(x, W0, b, A, B, coeffs, sparsity):
    """docs/methods.md §4 written independently (float64 for an oracle): norms of the full differences,
    torch.quantile, sg via detach; s = 0 is plain kernelized LoRA."""
    K = sum(c * torch.linalg.vector_norm(B[h][:, None, :] - A[h][None, :, :], dim=-1) for h, c in enumerate(coeffs))
    if sparsity == 0:  # plain kernelized LoRA: ΔW = K (docs/methods.md §4)
        return x @ (W0 + K).T + b
    mag = K.abs().detach()
    mag = mag * (mag > torch.quantile(mag.flatten(), sparsity))
    return x @ (W0 + K * mag).T + b


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_reference_matches_plain_autograd(sparsity):
    x, W0, b, A, B = small64(sparsity)
    got = run("torch", x, W0, b, A, B, sparsity=sparsity)
    xs, As, Bs, bs = (t.clone().requires_grad_(True) for t in (x, A, B, b))
    y = plain_snell(xs, W0, bs, As, Bs, COEFFS, sparsity)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).double())
    for name, g, e in zip(NAMES, got, (y.detach(), xs.grad, As.grad, Bs.grad, bs.grad)):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=name)


def test_reference_gradcheck_float64_of_A_and_B():
    """A and B through the backward formula, against finite differences of the surrogate where
    sg(|K|)·mask is the constant it is in backward (x and bias: tests/test_ops_contract.py)."""
    x, W0, b, A, B = small64(0.5)
    tau = ref.snell_threshold(A, B, COEFFS, 0.5)
    _, _, mag = ref._sparse_delta(A, B, COEFFS, tau)

    class Surrogate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_, A_, B_):
            ctx.save_for_backward(x_, A_, B_)
            K = sum(c * torch.linalg.vector_norm(B_[h][:, None] - A_[h][None], dim=-1) for h, c in enumerate(COEFFS))
            return x_ @ (W0 + K * mag).T + b

        @staticmethod
        def backward(ctx, dy):
            x_, A_, B_ = ctx.saved_tensors
            return ref.snell_bwd(dy, x_, W0, A_, B_, COEFFS, tau, True)

    assert torch.autograd.gradcheck(Surrogate.apply, tuple(t.clone().requires_grad_() for t in (x, A, B)))


# ---------------------------------------------------------------- memory claims
# (cersa_kernels._alloc.AllocationRecorder: what counts as an allocation, and how cersa ops are seen)


def _record_layer_step(backend, layer, x):
    with use_backend(backend), AllocationRecorder() as rec:
        layer(x).sum().backward()
    return rec


def test_triton_path_allocates_no_m_by_n_tensor():
    """Forward and backward of the Triton path create no tensor of ≥ m·n elements. m·n = 10010 is
    larger than every other tensor of the call (x: T·n = 4810), and W0 (m×n) is the layer's own:
    it exists before the call and is never copied. The same recorder on the reference path does see
    m×n tensors, so the check can fail."""
    T, n, m = 37, 130, 77
    layer = SnellLinear.from_linear(nn.Linear(n, m), rank=8, sparsity=0.9, train_bias=True)
    x = torch.randn(T, n, requires_grad=True)
    rec = _record_layer_step("triton", layer, x)
    assert set(rec.cersa_ops) == {"snell_threshold", "snell_fwd", "snell_bwd"}
    assert len(rec.allocations) > 10  # the recorder sees the kernels' own allocations
    biggest = rec.largest()
    assert biggest.numel < m * n, f"an m×n-sized tensor was allocated: {biggest}"
    assert biggest.shape == (T, n)  # dx (x.grad)
    assert _record_layer_step("torch", layer, x).largest().numel >= m * n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_reference_and_allocates_no_m_by_n(dtype):
    """On a GPU: fwd + bwd against the fp64 reference, and the peak memory of the call stays far
    below one m×n buffer of the compute dtype."""
    T, n, m = 512, 2048, 1536
    layer = SnellLinear.from_linear(nn.Linear(n, m), rank=16, sparsity=0.9).cuda().to(dtype)
    x = torch.randn(T, n, device="cuda", dtype=dtype, requires_grad=True)
    with use_backend("triton"):
        layer(x).sum().backward()  # compile the kernels first
        x.grad = None
        layer.zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = layer(x)
        y.sum().backward()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # The claim is about m×n buffers, not the call's own T-sized tensors, which are alive together
    # at the peak: y and dy (T×m), dx (T×n), dA, dB. What is left beyond them must stay far below
    # one m×n buffer (without subtracting them a correct kernel measured 7.34 MB against a 6.29 MB
    # bound in fp32).
    es = torch.empty((), dtype=dtype).element_size()
    own = (2 * T * m + T * n) * es + 2 * (layer.A.numel() + layer.B.numel()) * 4
    assert peak - own < m * n * 4 // 4, f"peak {peak} bytes, {peak - own} beyond y, dy, dx, dA, dB; one fp32 m×n buffer is {m * n * 4}"
    args = (x.detach().double(), layer.weight.double(), layer.bias.double(), layer.A.double(), layer.B.double())
    r = run("torch", *[a.cpu() for a in args], sparsity=0.9)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(y.detach().cpu().double(), r[0], atol=tol * float(r[0].abs().max()), rtol=tol)


# ---------------------------------------------------------------- the layer


def test_from_linear_state_and_init():
    linear = nn.Linear(130, 77)
    layer = SnellLinear.from_linear(linear, rank=8, heads=2, sparsity=0.9, coeffs=(0.1, -0.1))
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert "weight" in dict(layer.named_parameters())  # frozen Parameter, like every layer's W0 (nn.Linear's keys)
    assert layer.A.shape == (2, 130, 4) and layer.B.shape == (2, 77, 4)
    assert layer.A.requires_grad and layer.B.requires_grad
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["A", "B"]
    bound = 1 / math.sqrt(4)  # kaiming-uniform(a=√5) with fan_in = d_h
    for t in (layer.A.detach(), layer.B.detach()):
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.8 * bound
    assert SnellLinear.from_linear(linear, train_bias=True).bias.requires_grad


def test_to_linear_matches_forward_and_uses_snell_delta(monkeypatch):
    layer = SnellLinear.from_linear(nn.Linear(130, 77), rank=8, sparsity=0.9)
    x = torch.randn(4, 130)
    requested = []
    real = backends.kernel_for

    def spy(op, tensors):
        requested.append(op)
        return real(op, tensors)

    import cersa_kernels.ops._define as op_definitions  # every op dispatches through its kernel_for

    monkeypatch.setattr(op_definitions, "kernel_for", spy)
    merged = layer.to_linear()
    assert "snell_delta" in requested and "snell_threshold" in requested
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    assert isinstance(merged, nn.Linear) and not isinstance(merged, SnellLinear)


def test_state_dict_round_trip_and_repr():
    layer = SnellLinear.from_linear(nn.Linear(30, 20), rank=8, heads=2, sparsity=0.5)
    fresh = SnellLinear(30, 20, rank=8, heads=2, sparsity=0.5)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 30)
    torch.testing.assert_close(fresh(x), layer(x))
    text = repr(layer)
    assert "rank=8, heads=2, sparsity=0.5, coeffs=(0.1, -0.1)" in text and "trainable=400" in text


LAYER = r"SnellLinear\(in_features=16, out_features=8\)"


class TestErrors:
    def test_wrong_in_features(self):
        layer = SnellLinear(16, 8, rank=4)
        layer.layer_name = "encoder.0.q_proj"
        expected = r"encoder.0.q_proj: expected input with last dimension in_features=16, got shape \(2, 15\)"
        with pytest.raises(ValueError, match=expected):
            layer(torch.randn(2, 15))

    @pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
    def test_sparsity_outside_range(self, sparsity):
        expected = rf"{LAYER}: sparsity must be in \[0, 1\), got {sparsity}"
        with pytest.raises(ValueError, match=expected):
            SnellLinear(16, 8, rank=4, sparsity=sparsity)
        A, B = torch.randn(2, 16, 2), torch.randn(2, 8, 2)
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            snell_linear(torch.randn(2, 16), torch.randn(8, 16), None, A, B, COEFFS, sparsity)

    def test_heads_not_dividing_rank(self):
        with pytest.raises(ValueError, match=rf"{LAYER}: heads must be ≥ 1 and divide rank; got rank=9, heads=2"):
            SnellLinear(16, 8, rank=9, heads=2)

    def test_coeffs_length(self):
        with pytest.raises(ValueError, match=rf"{LAYER}: expected one coefficient per head \(2\), got 3: \(0.1, -0.1, 0.2\)"):
            SnellLinear(16, 8, rank=4, heads=2, coeffs=(0.1, -0.1, 0.2))
        with pytest.raises(ValueError, match=r"snell_linear: expected one coefficient per head \(2\), got 1"):
            snell_linear(torch.randn(2, 16), torch.randn(8, 16), None, torch.randn(2, 16, 2), torch.randn(2, 8, 2),
                         (0.1,))

    def test_factor_shapes(self):
        with pytest.raises(ValueError, match=r"snell_linear: B must have shape \(2, 8, 2\), got \(2, 9, 2\)"):
            snell_linear(torch.randn(2, 16), torch.randn(8, 16), None, torch.randn(2, 16, 2), torch.randn(2, 9, 2))

    def test_frozen_weight_with_grad(self):
        with pytest.raises(ValueError, match="W0 is frozen"):
            snell_linear(torch.randn(2, 16), torch.randn(8, 16, requires_grad=True), None,
                         torch.randn(2, 16, 2), torch.randn(2, 8, 2))

    def test_dtype_mismatch(self):
        layer = SnellLinear(16, 8, rank=4)
        with pytest.raises(TypeError, match="dtype mismatch"):
            layer(torch.randn(2, 16, dtype=torch.float64))

    def test_not_a_linear(self):
        with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
            SnellLinear.from_linear(nn.Conv1d(3, 3, 1))


# ---------------------------------------------------------------- issue 9: s = 0, NaN/Inf, small d_h, merge


def plain_oracle(x, W0, b, A, B, sparsity, coeffs=COEFFS, dy_seed=1):
    """y, dx, dA, dB of `plain_snell` in float64 by autograd, with the upstream gradient `run` uses."""
    x, A, B = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    y = plain_snell(x, W0.double(), b.double(), A, B, coeffs, sparsity)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).double())
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_both_backends_match_the_independent_float64_transcription(sparsity):
    """y, dx, dA, dB of both CPU backends against `plain_snell` in float64 (s = 0: ΔW = K, no |K|
    scaling). The float32 reference is the eager baseline of the 2×-error rule for Triton."""
    inputs = draw_inputs(37, 130, 77, 8, sparsity=sparsity)
    expected = plain_oracle(*inputs, sparsity)
    eager = run("torch", *inputs, sparsity=sparsity)[:4]
    got = run("triton", *inputs, sparsity=sparsity)[:4]
    for name, e, g, r in zip(NAMES, eager, got, expected):
        scale = max(1.0, float(r.abs().max()))
        assert float((e.double() - r).abs().max()) <= 1e-5 * scale, f"torch {name} s={sparsity}"
        assert_matches_reference(g, e, r, f"triton {name} s={sparsity}")


def _nan_cases():
    return [(where, v) for where in ("A", "B", "c", "x", "W0") for v in (float("nan"), float("inf"))]


@pytest.mark.parametrize("where,value", _nan_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_nan_and_inf_propagate_like_the_reference(where, value, sparsity):
    """One NaN/Inf in A, B, a coefficient, x or W0: each backend's y and every gradient are NaN
    exactly where the reference's are (a masked `where` must not turn it into a number)."""
    x, W0, b, A, B = draw_inputs(9, 40, 24, 8, sparsity=sparsity)
    coeffs = list(COEFFS)
    if where == "c":
        coeffs[1] = value
    else:
        t = {"A": A, "B": B, "x": x, "W0": W0}[where]
        t.view(-1)[3] = value
    results = {be: run(be, x, W0, b, A, B, coeffs=tuple(coeffs), sparsity=sparsity) for be in ("torch", "triton")}
    expected_any = False
    for name, r, g in zip(NAMES, results["torch"], results["triton"]):
        expected_any |= not bool(r.isfinite().all())
        assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN pattern differs ({where}={value})"
        assert torch.equal(g.isinf(), r.isinf()), f"{name}: Inf pattern differs ({where}={value})"
    assert expected_any  # the injected value does reach the outputs


@pytest.mark.parametrize("d_h", [1, 2, 4, 16])
def test_gradients_accurate_at_small_head_size(d_h):
    """d_h = 1 is where ‖b‖² + ‖a‖² − 2b·a cancelled (dA/dB off by 4e-2 relative): both float32
    backends within 1e-5 of the float64 oracle (the reference) and Triton within the 2×-eager rule."""
    inputs = draw_inputs(37, 130, 77, 2 * d_h, sparsity=0.5, seed=d_h)
    expected = plain_oracle(*inputs, 0.5)
    eager = run("torch", *inputs, sparsity=0.5)[:4]
    got = run("triton", *inputs, sparsity=0.5)[:4]
    for name, e, g, r in zip(NAMES, eager, got, expected):
        scale = max(1.0, float(r.abs().max()))
        assert float((e.double() - r).abs().max()) <= 1e-5 * scale, f"torch {name} d_h={d_h}"
        assert_matches_reference(g, e, r, f"triton {name} d_h={d_h}")


@pytest.mark.parametrize("setting", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_merge_works_under_every_backend_setting(setting, sparsity, monkeypatch):
    """to_linear / delta_weight under CERSA_BACKEND=<setting> on CPU tensors: the reference merge
    (no CUDA tensors), equal to the layer's own reference forward."""
    monkeypatch.setenv("CERSA_BACKEND", setting)
    layer = SnellLinear.from_linear(nn.Linear(130, 77), rank=8, sparsity=sparsity)
    x = torch.randn(4, 130, generator=torch.Generator().manual_seed(2))
    merged = layer.to_linear()
    delta = layer.delta_weight()
    with use_backend("torch"):
        expected = layer(x)
        tau = snell_threshold(layer.A, layer.B, COEFFS, sparsity)
    torch.testing.assert_close(delta, ref.snell_delta(layer.A.detach(), layer.B.detach(), COEFFS, float(tau)))
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- issue 12: one |K|, determinism


def test_every_kernel_sees_the_same_K_bits():
    """The forward (x = I, W0 = 0: y = ΔW_sᵀ exactly) and dx (dy = I: dx = ΔW_s) rebuild exactly
    the |K| bits the selection kernel's K tiles have, at s = 0 (ΔW = K) and s = 0.5 (K·|K| kept
    where |K| > τ), with different tile shapes for the selection."""
    from cersa_kernels.triton.snell import kernelized_update_triton, kth_smallest_abs_triton, snell_bwd_triton, snell_fwd_triton

    m, n = 45, 70
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(2, n, 3, generator=g), torch.randn(2, m, 3, generator=g)
    K = kernelized_update_triton(A, B, COEFFS)
    for sparsity in (0.0, 0.5):
        if sparsity == 0:
            tau, expected = torch.tensor(float("-inf")), K
        else:
            k = ref.kth_rank(m * n, sparsity)
            tau = kth_smallest_abs_triton(k, A, B, COEFFS, block=16)
            assert tau.view(torch.int32) == torch.kthvalue(K.abs().flatten(), k).values.view(torch.int32)
            expected = torch.where(K.abs() > tau, K * K.abs(), 0.0)
        y = snell_fwd_triton(torch.eye(n), torch.zeros(m, n), None, A, B, COEFFS, tau)
        dx, _, _ = snell_bwd_triton(torch.eye(m), torch.zeros(m, n), torch.zeros(m, n), A, B, COEFFS, tau, True)
        assert torch.equal(y.T, expected) and torch.equal(dx, expected), sparsity


def test_dab_is_bitwise_repeatable_when_deterministic():
    """Under torch.use_deterministic_algorithms(True) dA/dB come from per-tile partials summed in a
    fixed order: two runs agree bit for bit, and agree with the atomic path within float error."""
    from cersa_kernels.triton.snell import snell_bwd_triton

    x, W0, _, A, B = draw_inputs(37, 130, 77, 8, sparsity=0.5)
    dy = torch.randn(37, 77, generator=torch.Generator().manual_seed(3))
    tau = snell_threshold(A, B, COEFFS, 0.5)
    atomic = snell_bwd_triton(dy, x, W0, A, B, COEFFS, tau, False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = snell_bwd_triton(dy, x, W0, A, B, COEFFS, tau, False)
        second = snell_bwd_triton(dy, x, W0, A, B, COEFFS, tau, False)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b, c in zip(first[1:], second[1:], atomic[1:]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


_COMPILE_SCRIPT = r"""
import os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from cersa_kernels.triton import snell as S
kernels = {"select": S._snell_select_kernel, "fwd": S._snell_fwd_kernel, "dx": S._snell_dx_kernel,
           "dab": S._snell_dab_kernel, "matrix": S._kernelized_update_tiles}
flags = {"select": dict(FROM_VALUES=False, SHIFT=20, NBITS=11), "fwd": dict(HAS_BIAS=True, DOT_PRECISION="tf32"),
         "dx": dict(DOT_PRECISION="tf32"), "dab": dict(DOT_PRECISION="tf32", DETERMINISTIC=sys.argv[1] == "True"), "matrix": {}}
fp32_ptrs = {"c_ptr", "tau_ptr", "da_ptr", "db_ptr", "out_ptr"}
for name, fn in kernels.items():
    cfg = dict(S.snell_configs(torch.bfloat16, 4, 90)[name])
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    const = {**cfg, **flags[name], "H": 2}
    sig = {a: "constexpr" if a in const else ("*fp32" if a in fp32_ptrs else "*i32" if a in ("prefix_ptr", "hist_ptr")
           else "*bf16") if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    ptx = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    atom = re.search(r"\b(atom|red)\.[\w.]*add\.f32", ptx) is not None
    print(name, "sqrt.rn" in ptx, "sqrt.approx" in ptx, "div.rn" in ptx, "div.full" in ptx or "div.approx" in ptx, atom)
"""


@pytest.mark.slow
def test_compiled_kernels_use_correctly_rounded_sqrt_and_division():
    """Compiled for sm_90 (bf16 tiles, in a subprocess: the interpreter is on here): every kernel's
    |K| uses sqrt.rn and never sqrt.approx; dA/dB divide with div.rn; the deterministic dA/dB
    variant has no float atomics."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for det in (False, True):
        out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(det)], cwd=root,
                             capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
        assert out.returncode == 0, out.stderr[-3000:]
        rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
        assert set(rows) == {"select", "fwd", "dx", "dab", "matrix"}
        for name, (sqrt_rn, sqrt_approx, div_rn, div_approx, float_atomics) in rows.items():
            assert sqrt_rn == "True" and sqrt_approx == "False" and div_approx == "False", (name, rows[name])
            if name == "dab":
                assert div_rn == "True" and float_atomics == str(not det), (det, rows[name])


# ---------------------------------------------------------------- the _cuda snell_delta kernel on a GPU, vs float64

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def snell_ref64(A, B, coeffs, tau):
    """K[i, j] = Σ_h c_h‖B[h, i] − A[h, j]‖₂ in float64; K·|K| where |K| > tau, else 0 (docs/methods.md §4)."""
    A, B = A.double(), B.double()
    K = sum(c * (B[h][:, None, :] - A[h][None, :, :]).pow(2).sum(-1).sqrt() for h, c in enumerate(coeffs))
    return torch.where(K.abs() > tau, K * K.abs(), torch.zeros_like(K)), K


def _tau_in_a_gap(K):
    """A threshold near the median |K| with no |K| within fp32 reach of it, so the mask is exact."""
    v = K.abs().flatten().sort().values
    lo, hi = int(0.4 * v.numel()), int(0.6 * v.numel())
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-4 * float(v[-1]), "no usable gap; change the seed"
    return float(v[lo + i] + gaps[i] / 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(2, 130, 77, 4), (2, 64, 33, 8), (3, 37, 45, 40)], ids=lambda d: "H{}n{}m{}d{}".format(*d))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_cuda_snell_delta_matches_float64(dtype, dims, sparse):
    H, n, m, d = dims
    coeffs = (0.1, -0.1) if H == 2 else (0.5, -0.2, 0.1)
    bound = 1 / d**0.5  # kaiming-uniform(a=√5) scale of SNELL's init
    A = (torch.rand(H, n, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    B = (torch.rand(H, m, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    _, K = snell_ref64(A, B, coeffs, 0.0)
    tau = _tau_in_a_gap(K) if sparse else 0.0
    ref, _ = snell_ref64(A, B, coeffs, tau)
    out = cuda_backend.snell_delta_cuda(A, B, coeffs, tau)
    assert out.shape == (m, n) and out.dtype == dtype
    # the float64 rule |K| > tau, after rounding to the dtype (tiny K·|K| underflow in fp16)
    assert torch.equal(out != 0, ref.to(dtype) != 0), "kept entries differ from the float64 rule |K| > tau"
    if sparse:
        assert 0.3 < float((ref != 0).double().mean()) < 0.7
    assert_matches_reference(out, ref.to(dtype), ref, f"snell {dims} {dtype}")
    # K is fp32 whatever the dtype: apart from the final rounding, the error is fp32-sized
    rounding = float((ref.to(dtype).double() - ref).abs().max())
    err = float((out.double() - ref).abs().max())
    assert err <= 2 * rounding + 1e-5 * float(ref.abs().max()), f"snell error {err:.3e}, rounding alone {rounding:.3e}"
    # strided views of the same values give the same answer
    A_t = A.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(cuda_backend.snell_delta_cuda(A_t, B, coeffs, tau), out, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_snell_delta_agrees_with_the_snell_reference(dtype):
    """The two sides of the snell_delta contract: the CUDA kernel and reference.snell.snell_delta."""
    H, n, m, d = 2, 130, 77, 4
    bound = 1 / d**0.5
    A = (torch.rand(H, n, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    B = (torch.rand(H, m, d, device=DEV) * 2 - 1).mul(bound).to(dtype)
    _, K = snell_ref64(A, B, (0.1, -0.1), 0.0)
    tau = _tau_in_a_gap(K)
    expected = ref.snell_delta(A, B, (0.1, -0.1), tau)
    out = cuda_backend.snell_delta_cuda(A, B, (0.1, -0.1), tau)
    assert torch.equal(out != 0, expected != 0)
    assert_matches_reference(out, expected, snell_ref64(A, B, (0.1, -0.1), tau)[0], f"snell reference {dtype}")
