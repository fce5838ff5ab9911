"""Shared driver of the op tests: run a functional forward + backward on a backend, and compare the
Triton kernels and the float32 reference against a float64 oracle (tolerances.py's rule). Inputs may
hold quantized frozen operands (`quant.QuantizedTensor`): the oracle and the same-dtype comparator
then run on the dequantized operands."""
import torch

from cersa_kernels import quant
from cersa_kernels.backends import use_backend

from tolerances import assert_matches_reference


def run(backend, fn, inputs, grads, dy_seed=1, edit_dy=None, views=None):
    """fn(**inputs) forward + backward on `backend`; returns (y, {name: grad}) for names in `grads`.
    `edit_dy(dy)`, if given, changes the upstream gradient in place (e.g. to inject a NaN).
    `views` {name: f}, if given: fn gets f(input) instead of that input (and y.backward gets f(dy)
    for the name "dy"), e.g. a non-contiguous view holding the same values; a gradient is then the
    one of that view (clone() would make a strided or expanded input contiguous again)."""
    views = views or {}
    ins = {
        k: (v.detach().clone().requires_grad_(k in grads) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    for k, f in views.items():
        if k in ins:
            ins[k] = f(ins[k])
            if ins[k].requires_grad:
                ins[k].retain_grad()
    with use_backend(backend):
        y = fn(**ins)
        # drawn in float32 whatever y.dtype is, so every run (oracle included) gets the same dy
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.device, y.dtype)
        if edit_dy is not None:
            edit_dy(dy)
        if "dy" in views:
            dy = views["dy"](dy)
        y.backward(dy)
    return y.detach(), {k: ins[k].grad for k in grads}


def as64(inputs):
    """The inputs in float64, quantized operands dequantized (the float64 oracle's inputs)."""
    return {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in dequantized(inputs, torch.float64).items()
    }


def dequantized(inputs, dtype=None):
    """The inputs with every QuantizedTensor replaced by its dense value (in `dtype`, default its own)."""
    return {k: (v.dequantize(dtype) if quant.is_quantized(v) else v) for k, v in inputs.items()}


def quantized(inputs, formats, transposed, group_size=quant.DEFAULT_GROUP_SIZE):
    """The inputs with each operand of `formats` ({name: format}) quantized; an operand with
    `transposed[name]` is stored as its transpose and given as the `.T` view (how the CERSA layers
    keep Vᵀ and Uᵀ, grouped along n and m)."""
    out = dict(inputs)
    for name, fmt in formats.items():
        t = inputs[name]
        if transposed[name]:
            out[name] = quant.quantize(t.T.contiguous(), fmt, group_size).T
        else:
            out[name] = quant.quantize(t, fmt, group_size)
    return out


def on_gpu(inputs, dtype):
    """The inputs on the GPU in `dtype` (integer tensors, e.g. a seed, stay where they are)."""
    return {
        k: (v.to("cuda", dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }


def check_against_reference(backend, fn, inputs, grads, what=""):
    """`backend` within twice the same-dtype reference's error of the float64 oracle (tolerances.py);
    both run on the dequantized operands where `inputs` holds quantized ones."""
    y64, g64 = run("torch", fn, as64(inputs), grads)
    y32, g32 = run("torch", fn, dequantized(inputs), grads)
    yt, gt = run(backend, fn, inputs, grads)
    assert_matches_reference(yt, y32, y64, f"y {what}")
    for k in grads:
        assert gt[k] is not None, f"d{k} {what}: no gradient"
        assert_matches_reference(gt[k], g32[k], g64[k], f"d{k} {what}")


def check_triton_against_reference(fn, inputs, grads, what=""):
    """Triton within twice the same-dtype reference's error of the float64 oracle (tolerances.py)."""
    check_against_reference("triton", fn, inputs, grads, what)


def weight_buffers(values):
    """The tensors behind `values` (tensors, QuantizedTensors' data and absmax, None skipped)."""
    out = []
    for v in values:
        if quant.is_quantized(v):
            out.extend((v.data, v.absmax))
        elif v is not None:
            out.append(v)
    return out


def saved_bytes(fn, own):
    """Bytes autograd saves for one call of fn(), except tensors sharing storage with `own` (weights);
    returns (bytes, fn's output, the saved tensors' shapes)."""
    ptrs = {t.untyped_storage().data_ptr() for t in weight_buffers(own)}
    shapes, sizes = [], []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            sizes.append(t.numel() * t.element_size())
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out, shapes


# One description per public op, shared by the NaN-propagation and property tests: how to draw its
# inputs, how to call it, which inputs get gradients, and its differentiable eager reference.
import inspect  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

from cersa_kernels import ops  # noqa: E402
from cersa_kernels.reference import lora as ref_lora, lowrank as ref_lowrank  # noqa: E402
from cersa_kernels.reference import pica as ref_pica, pica_lowrank as ref_pica_lowrank  # noqa: E402
from cersa_kernels.reference import snell as ref_snell  # noqa: E402

SNELL_COEFFS = (0.1, -0.1)
LORA_SCALE, LORA_SEED = 1.7, 1234


@dataclass(frozen=True)
class OpCase:
    """One op of the registry; every op-level suite (tests/test_ops_contract.py, NaN propagation,
    properties) iterates over `OPS`, so adding an op means adding one entry here.

    `make(T, n, m, r, dtype, bias, gen, **kw)` -> inputs dict; `call(**inputs)` the public op;
    `grads` the inputs that get a gradient; `eager` the op's math (docs/methods.md) under plain autograd,
    composed from the reference modules: the same-dtype comparator and the float64 oracle;
    `saved(inputs, T)` the exact bytes autograd keeps for one call over T tokens (beside the op's
    own weights); `variants` {id: keyword arguments}, each passed to `make` if it takes it, else
    set as an input; `gradcheck_grads` the inputs float64 gradcheck differentiates (default: grads);
    `quantizable` {frozen operand: stored transposed?}: the operands the op takes quantized, which
    give the `quant_variants` (each in every format, and the first one alone), run on
    `quantized_backends`."""

    name: str
    make: Callable
    call: Callable
    grads: tuple
    eager: Callable
    saved: Callable
    variants: dict = field(default_factory=lambda: {"": {}})
    gradcheck_grads: Optional[tuple] = None
    quantizable: dict = field(default_factory=dict)
    quantized_backends: tuple = ("torch", "triton")  # the backends meant to serve quant_variants

    def serves(self, variant, backend) -> bool:
        """Whether `backend` is meant to run `variant` (every dense one; a quantized one if listed)."""
        return variant not in self.quant_variants() or backend in self.quantized_backends

    def quant_variants(self) -> dict:
        """{id: (base variant, {operand: format})}: every quantizable operand in int8, then in nf4
        (on the first variant), and the first operand alone in nf4 (the others dense)."""
        base = next(iter(self.variants))
        prefix = f"{base}-" if base else ""
        out = {f"{prefix}q-{fmt}": (base, {n: fmt for n in self.quantizable}) for fmt in quant.FORMATS}
        if len(self.quantizable) > 1:
            first = next(iter(self.quantizable))
            out[f"{prefix}q-{first}-nf4"] = (base, {first: "nf4"})
        return out

    def all_variants(self) -> list:
        """The ids of every variant, dense then quantized."""
        return [*self.variants, *self.quant_variants()]

    def draw(self, T, n, m, r, dtype=torch.float32, bias=True, gen=None, variant=""):
        """Inputs of variant `variant`, dense or quantized (gen: a fresh seeded Generator when None)."""
        if variant in self.quant_variants():
            base, formats = self.quant_variants()[variant]
            return quantized(self.draw(T, n, m, r, dtype, bias, gen, base), formats, self.quantizable)
        kw = self.variants[variant]
        takes = inspect.signature(self.make).parameters
        gen = torch.Generator().manual_seed(7) if gen is None else gen
        inputs = self.make(T, n, m, r, dtype, bias, gen, **{k: v for k, v in kw.items() if k in takes})
        inputs.update({k: v for k, v in kw.items() if k not in takes})
        return inputs


def _randn(gen, dtype, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _orthonormal(gen, dtype, rows, cols):
    """rows × cols with orthonormal columns (cols ≤ rows)."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0].to(dtype)


def _bias(gen, dtype, m, bias):
    return _randn(gen, dtype, m) if bias else None


def make_lowrank(T, n, m, r, dtype, bias, gen):
    k = min(r, n, m)
    S = torch.diag(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5) + 0.1 * _randn(gen, torch.float64, k, k)
    return dict(x=_randn(gen, dtype, T, n), V=_orthonormal(gen, dtype, n, k), S=S.to(dtype),
                U=_orthonormal(gen, dtype, m, k), bias=_bias(gen, dtype, m, bias))


def make_lora(T, n, m, r, dtype, bias, gen):
    return dict(x=_randn(gen, dtype, T, n), W=_randn(gen, dtype, m, n) / n**0.5, A=_randn(gen, dtype, r, n) / n**0.5,
                B=_randn(gen, dtype, m, r), bias=_bias(gen, dtype, m, bias))


def make_pica(T, n, m, r, dtype, bias, gen):
    r = min(r, n)
    return dict(x=_randn(gen, dtype, T, n), W=_randn(gen, dtype, m, n) / n**0.5,
                P=_orthonormal(gen, dtype, n, r).T, M=_randn(gen, dtype, m, r), bias=_bias(gen, dtype, m, bias))


def make_pica_lowrank(T, n, m, r, dtype, bias, gen):
    inputs = make_lowrank(T, n, m, r, dtype, bias, gen)
    k = inputs["S"].shape[0]
    inputs["M"] = _randn(gen, dtype, m, max(1, k // 2))
    return inputs


def snell_threshold_margin(A, B, coeffs, sparsity) -> float:
    """Distance, relative to max|K| and in float64, from τ to the nearest other |K|; inf for s = 0."""
    if sparsity == 0:
        return math.inf
    vals = ref_snell.kernelized_update(A.double(), B.double(), coeffs).abs().flatten().sort().values
    k = ref_snell.kth_rank(vals.numel(), sparsity)
    below = vals[k - 1] - vals[k - 2] if k >= 2 else math.inf
    above = vals[k] - vals[k - 1] if k < vals.numel() else math.inf
    return float(min(below, above)) / float(vals[-1])


SNELL_MARGIN = 1e-5  # of max|K|: fp32 |K| is within ~1e-7·max|K| of exact at these sizes


def make_snell(T, n, m, r, dtype, bias, gen, sparsity=0.5, heads=2):
    """A, B kaiming-like as in SnellLinear (r = heads·d_h), redrawn (bounded tries) until τ is
    SNELL_MARGIN·max|K| away from every other |K|, so rounding cannot move an entry across τ."""
    d = max(1, r // heads)
    bound = 1 / math.sqrt(d)
    for _ in range(50):
        # the margin is measured on the values the op gets (after the cast to dtype)
        A = ((torch.rand(heads, n, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)
        B = ((torch.rand(heads, m, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)
        if snell_threshold_margin(A, B, SNELL_COEFFS, sparsity) > SNELL_MARGIN:
            break
    else:
        raise AssertionError(f"snell: no draw with a clear threshold margin in 50 tries (s={sparsity})")
    return dict(x=_randn(gen, dtype, T, n), W0=_randn(gen, dtype, m, n) / n**0.5, bias=_bias(gen, dtype, m, bias),
                A=A, B=B, coeffs=SNELL_COEFFS, sparsity=sparsity)


def _lora_call(x, W, A, B, bias, scale=LORA_SCALE, dropout_p=0.0):
    return ops.lora_linear(x, W, A, B, bias, scale=scale, dropout_p=dropout_p, seed=LORA_SEED)


def _lora_eager(x, W, A, B, bias, scale=LORA_SCALE, dropout_p=0.0):
    lead = x.shape[:-1]
    y, _ = ref_lora.lora_fwd(x.reshape(-1, x.shape[-1]), W, bias, A, B, scale, dropout_p,
                             torch.tensor(LORA_SEED, dtype=torch.int64))
    return y.reshape(*lead, W.shape[0])


def _flat(fwd, out_features):
    """An eager reference `fwd(x2d, ...) -> (y, saved)` applied to x of any leading shape."""
    def call(x, *args):
        return fwd(x.reshape(-1, x.shape[-1]), *args)[0].reshape(*x.shape[:-1], out_features(*args))
    return call


def _snell_eager(x, W0, bias, A, B, coeffs, sparsity):
    """docs/methods.md §4 under autograd: ΔW_s = K for s = 0, else K ⊙ sg(|K|) ⊙ 1[|K| > τ], τ the
    reference's selection on |K| in the same precision as K (so the kept set is the reference's)."""
    K = ref_snell.kernelized_update(A, B, coeffs)
    if sparsity == 0:
        delta = K
    else:
        tau = ref_snell.snell_threshold(A.detach(), B.detach(), coeffs, sparsity)
        absK = K.detach().abs()
        delta = K * torch.where(absK > tau, absK, torch.zeros_like(absK))
    W = (W0.to(delta.dtype) + delta).to(x.dtype)
    y = x @ W.T
    return y if bias is None else y + bias


def _itemsize(inputs):
    return inputs["x"].element_size()


OPS = {
    "lowrank_linear": OpCase(
        "lowrank_linear", make_lowrank, lambda x, V, S, U, bias: ops.lowrank_linear(x, V, S, U, bias),
        ("x", "S", "bias"),
        lambda x, V, S, U, bias: _flat(ref_lowrank.lowrank_fwd, lambda V, S, U, b: U.shape[0])(x, V, S, U, bias),
        saved=lambda i, T: T * i["S"].shape[0] * _itemsize(i),  # h = x V only
        quantizable={"V": True, "U": True},  # the layer stores Vᵀ and Uᵀ, passes .T views
    ),
    "lora_linear": OpCase(
        "lora_linear", make_lora, _lora_call, ("x", "A", "B", "bias"), _lora_eager,
        # x and x Aᵀ, plus the 8-byte seed when a mask must be regenerated; never a T×n mask
        saved=lambda i, T: T * (i["x"].shape[-1] + i["A"].shape[0]) * _itemsize(i) + (8 if i.get("dropout_p") else 0),
        variants={"": {}, "drop0.3": {"dropout_p": 0.3}},
        quantizable={"W": False},
    ),
    "pica_linear": OpCase(
        "pica_linear", make_pica, lambda x, W, P, M, bias: ops.pica_linear(x, W, P, M, bias), ("x", "M", "bias"),
        lambda x, W, P, M, bias: _flat(ref_pica.pica_fwd, lambda W, b, P, M: W.shape[0])(x, W, bias, P, M),
        saved=lambda i, T: T * i["P"].shape[0] * _itemsize(i),  # h = x Pᵀ only: not x, nothing for W0
        quantizable={"W": False},
    ),
    "pica_lowrank_linear": OpCase(
        "pica_lowrank_linear", make_pica_lowrank,
        lambda x, V, S, U, M, bias: ops.pica_lowrank_linear(x, V, S, U, M, bias), ("x", "S", "M", "bias"),
        lambda x, V, S, U, M, bias: _flat(ref_pica_lowrank.pica_lowrank_fwd, lambda V, S, U, M, b: U.shape[0])(
            x, V, S, U, M, bias),
        saved=lambda i, T: T * i["S"].shape[0] * _itemsize(i),  # CERSA's h = x V: the PiCa branch adds nothing
        quantizable={"V": True, "U": True},
    ),
    "snell_linear": OpCase(
        "snell_linear", make_snell,
        lambda x, W0, bias, A, B, coeffs, sparsity: ops.snell_linear(x, W0, bias, A, B, coeffs, sparsity),
        ("x", "A", "B", "bias"), _snell_eager,
        saved=lambda i, T: T * i["x"].shape[-1] * _itemsize(i) + 4,  # x and the fp32 scalar τ
        variants={"s0": {"sparsity": 0.0}, "s0.5": {"sparsity": 0.5}},
        # backward treats sg(|K|)·mask as a constant, which finite differences of A, B do not:
        # those two are gradchecked against a surrogate in test_snell.py
        gradcheck_grads=("x", "bias"),
        quantizable={"W0": False},
        quantized_backends=("torch",),  # its Triton kernels read W0 tiles themselves: refused
    ),
}


def grads_present(case: OpCase, inputs: dict) -> list:
    """The case's gradient names, less bias when there is none."""
    return [g for g in case.grads if inputs.get(g) is not None]
