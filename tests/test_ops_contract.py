"""What every op of the registry (op_harness.OPS) must satisfy, one parametrized test per concern:
`torch.library.opcheck` on every custom op a call runs (forward, backward and helpers such as
SNELL's threshold), float64 gradcheck on the reference, `torch.compile(fullgraph=True)` forward +
backward without a graph break, and the exact bytes autograd saves (each op's count is its
registry entry's `saved`). Adding an op adds one OPS entry and these tests cover it; its quantized
variants (`OpCase.quant_variants`: frozen operands as QuantizedTensors, run by the `<op>_q_*` ops)
are covered the same way, and must save exactly the dense op's activations."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from cersa_kernels.backends import use_backend
from cersa_kernels.quant import QuantizedTensor

from op_harness import OPS, grads_present, run, saved_bytes

BACKENDS = ["torch", "triton"]
CASES = [
    pytest.param(op, variant, id=f"{op}{'-' + variant if variant else ''}") for op in OPS for variant in OPS[op].all_variants()
]


def cases_on(settings):
    """CASES × `settings` (tuples, the backend first), less the quantized variants a backend refuses
    by design (OpCase.serves; that refusal is tested in tests/test_quant_ops.py)."""
    return [
        pytest.param(op, variant, *setting, id="-".join([case.id, *map(str, setting)]))
        for case in CASES
        for op, variant in [case.values]
        for setting in settings
        if OPS[op].serves(variant, setting[0])
    ]


class CersaCalls(TorchDispatchMode):
    """Keeps every cersa op overload a call runs, with its arguments, and runs it as usual.
    (Not _alloc.AllocationRecorder, which runs each op's kernel in place of the op to see the
    allocations inside it; opcheck needs the op calls themselves, with their arguments.)"""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "cersa":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def opcheck_arguments(func, args, grads):
    """Fresh copies of a recorded call's arguments; a forward's inputs named in `grads` require grad
    (so opcheck tests the autograd registration), and a backward runs with need_dx True and False."""
    names = [a.name for a in func._schema.arguments]
    fresh = [
        a.detach().clone().requires_grad_(func._opname.endswith("_fwd") and name in grads and a.is_floating_point())
        if isinstance(a, torch.Tensor) else a
        for name, a in zip(names, args)
    ]
    if "need_dx" not in names:
        return [fresh]
    at = names.index("need_dx")
    return [fresh[:at] + [need_dx] + fresh[at + 1:] for need_dx in (True, False)]


@pytest.mark.parametrize("op,variant,backend", cases_on([(b,) for b in BACKENDS]))
def test_opcheck_every_custom_op_a_call_runs(op, variant, backend):
    case = OPS[op]
    inputs = case.draw(9, 40, 24, 8, variant=variant)  # small: opcheck runs each op many times
    grads = grads_present(case, inputs)
    with use_backend(backend):
        with CersaCalls() as rec:
            run(backend, case.call, inputs, grads)
        ran = {func._opname for func, _ in rec.calls}
        assert any(name.endswith("_fwd") for name in ran) and any(name.endswith("_bwd") for name in ran), ran
        for func, args in rec.calls:
            for checked in opcheck_arguments(func, args, grads):
                torch.library.opcheck(func, tuple(checked))


@pytest.mark.parametrize("op,variant", CASES)
def test_reference_gradcheck_float64(op, variant):
    case = OPS[op]
    inputs = case.draw(6, 9, 7, 3, torch.float64, variant=variant)
    names = case.gradcheck_grads or case.grads
    rest = {k: v for k, v in inputs.items() if k not in names}
    with use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *diff: case.call(**rest, **dict(zip(names, diff))),
            tuple(inputs[k].clone().requires_grad_() for k in names),
        )


@pytest.mark.parametrize("op,variant,backend", cases_on([(b,) for b in BACKENDS]))
def test_torch_compile_fullgraph_forward_backward(op, variant, backend):
    case = OPS[op]
    inputs = case.draw(10, 24, 12, 4, variant=variant)
    inputs["x"] = inputs["x"].reshape(2, 5, 24)  # leading dimensions are flattened inside the graph
    grads = grads_present(case, inputs)
    torch._dynamo.reset()
    counters.clear()
    y_eager, g_eager = run(backend, case.call, inputs, grads)
    y, g = run(backend, torch.compile(case.call, fullgraph=True), inputs, grads)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(g[name], g_eager[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "op,variant,backend,dtype",
    cases_on([("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32)]),
)
def test_saved_bytes_are_exactly_the_declared_activations(op, variant, backend, dtype):
    """autograd keeps the registry's byte count for one call (3-D x: over all T tokens), nothing else
    but the op's own weights, and the call stays differentiable with only that kept."""
    case = OPS[op]
    T, n = 74, 130
    inputs = case.draw(T, n, 77, 8, dtype, variant=variant)
    x = inputs["x"].reshape(2, T // 2, n).requires_grad_()
    weights = {k: v for k, v in inputs.items() if k != "x" and isinstance(v, (torch.Tensor, QuantizedTensor))}
    for k in case.grads:
        if k != "x" and weights.get(k) is not None:
            weights[k].requires_grad_()
    with use_backend(backend):
        total, y, shapes = saved_bytes(lambda: case.call(**dict(inputs, x=x, **weights)), weights.values())
        assert total == case.saved(dict(inputs, x=x), T), f"{op}: saved {shapes}"
        y.sum().backward()
    assert x.grad is not None and all(w.grad is not None for k, w in weights.items() if w.requires_grad)
