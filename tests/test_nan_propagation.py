"""NaN and Inf reach the output and every gradient as they do in the reference, on every
CPU-runnable backend: one non-finite value is injected into each input, weight, scalar
coefficient and the upstream gradient of every op, and the NaN and ±Inf patterns of y and of each
gradient must equal the reference's. A kernel that masks with `where` (or drops a tile) swallows
a NaN that the reference propagates, and this test sees it.

The reference is the op's math under plain autograd (`OpCase.eager`); for SNELL it is the `torch`
backend itself: autograd through the clamped sqrt of its distances gives a zero gradient at a NaN
(clamp's backward masks it), which the reference's explicit backward formulas do not."""
import math

import pytest
import torch

from op_harness import OPS, grads_present, run

# Small odd sizes: several tiles in no dimension, but T, n, m all differ so a transposed pattern shows.
T, N, M, R = 5, 13, 7, 4
BACKENDS = ["torch", "triton"]
VALUES = {"nan": math.nan, "inf": math.inf}
REFERENCE_IS_THE_TORCH_BACKEND = {"snell_linear"}


def draw(op, variant):
    case = OPS[op]
    return case, case.draw(T, N, M, R, torch.float32, True, torch.Generator().manual_seed(7), variant=variant)


def targets(op, variant):
    """Every floating input (tensors and scalar coefficients) and the upstream gradient."""
    _, inputs = draw(op, variant)
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if op == "snell_linear":
        names.append("coeffs")
    if op == "lora_linear":
        names.append("scale")
    return names + ["dy"]


CASES = [
    pytest.param(op, variant, target, id=f"{op}{'-' + variant if variant else ''}-{target}")
    for op in OPS
    for variant in OPS[op].variants
    for target in targets(op, variant)
]


def poison(t: torch.Tensor, value: float) -> None:
    """Set one interior entry (the middle one in row-major order) to `value`, in place (any strides)."""
    t[torch.unravel_index(torch.tensor(t.numel() // 2), t.shape)] = value


def call_and_grads(backend, case, inputs, target, value, reference):
    inputs = dict(inputs)
    edit_dy = None
    if target == "dy":
        edit_dy = lambda dy: poison(dy, value)  # noqa: E731
    elif target == "coeffs":
        inputs["coeffs"] = (value,) + tuple(inputs["coeffs"][1:])
    elif target == "scale":
        inputs["scale"] = value
    else:
        inputs[target] = inputs[target].clone()
        poison(inputs[target], value)
    fn = case.eager if reference and case.name not in REFERENCE_IS_THE_TORCH_BACKEND else case.call
    return run("torch" if reference else backend, fn, inputs, grads_present(case, inputs), edit_dy=edit_dy)


def assert_same_pattern(got, expected, value, what):
    """The non-finite entries must be the same ones. Which of them are ±Inf and which NaN
    (∞ − ∞) depends on the order a sum is taken in, so after an Inf only finiteness is compared;
    after a NaN (no Inf arises from one) the NaN entries are."""
    tests = [("non-finite", lambda t: ~torch.isfinite(t))]
    if value == "nan":
        tests.append(("NaN", torch.isnan))
    for kind, test in tests:
        g, e = test(got), test(expected)
        if not torch.equal(g, e):
            missing = int((e & ~g).sum())
            extra = int((g & ~e).sum())
            raise AssertionError(
                f"{what}: {kind} pattern differs from the reference: {missing} of its {int(e.sum())} {kind} "
                f"entries missing, {extra} extra (shape {tuple(got.shape)})"
            )


@pytest.mark.parametrize("value", list(VALUES), ids=list(VALUES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,variant,target", CASES)
def test_non_finite_propagates_like_the_reference(op, variant, target, backend, value):
    case, inputs = draw(op, variant)
    v = VALUES[value]
    y_ref, g_ref = call_and_grads(backend, case, inputs, target, v, reference=True)
    y, g = call_and_grads(backend, case, inputs, target, v, reference=False)
    # the injection must reach the reference at all, or the test could not fail
    assert not torch.isfinite(y_ref).all() or any(not torch.isfinite(r).all() for r in g_ref.values()), (
        f"{op}: a {value} in {target} changes nothing in the reference"
    )
    assert_same_pattern(y, y_ref, value, f"{op} {variant} {backend}: y with {value} in {target}")
    for name in g_ref:
        assert g[name] is not None, f"{op} {backend}: no gradient for {name}"
        assert_same_pattern(g[name], g_ref[name], value, f"{op} {variant} {backend}: d{name} with {value} in {target}")
