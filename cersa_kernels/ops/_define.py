"""What every op shares, written once: the custom-op pair (schema, fake, dispatch, autograd), the
bias gradient, token flattening. Each op file states only its math: the two schemas, the fake
shapes, which names the backward needs and which inputs it returns gradients for.

An op pair `<op>` is two torch.library custom ops:
- `cersa::<op>_fwd(<inputs>) -> <outputs>`: the first output is y, the rest are activations saved
  for the backward (marked non-differentiable);
- `cersa::<op>_bwd(dy, <backward names>, need_dx) -> (d<g> for g in gradients)`: the names are
  forward inputs or outputs; tensors among them are saved with `save_for_backward`, the rest are
  kept on ctx. dx has shape (0, n) when `need_dx` is false.
The bias gradient `Σ_T dy` is formed in the autograd formula (a reduction, no kernel of its own).
Both ops run the kernel `cersa_kernels.backends.kernel_for` selects for their tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..backends import kernel_for, use_backend

__all__ = ["OpPair", "define_op", "define_op_pair", "run_kernel", "bias_grad", "flatten_tokens"]


def _parameter_types(params: str) -> dict[str, str]:
    """'Tensor x, Tensor? bias, float s' -> {'x': 'Tensor', 'bias': 'Tensor?', 's': 'float'}."""
    return {p.split()[-1]: p.split()[0] for p in params.split(",") if p.strip()}


def _dispatch_tensors(args: Sequence[object]) -> list[Tensor]:
    # The tensors whose device/dtype choose the backend: the operands, not scalars such as the
    # CPU-resident int64 dropout seed or SNELL's 0-d threshold τ.
    return [a for a in args if isinstance(a, Tensor) and a.is_floating_point() and a.dim() > 0]


_DISPATCH: dict[str, Callable] = {}  # op name -> the function its custom op runs


def run_kernel(qualname: str, *args):
    """Run op `qualname`'s kernel on `args` exactly as its custom op does, outside the op (what
    `_alloc.AllocationRecorder` uses to look inside an op that is opaque to a dispatch mode)."""
    return _DISPATCH[qualname](*args)


def define_op(
    qualname: str, params: str, returns: str, fake: Callable, backend: Optional[Callable[..., str]] = None
) -> Callable:
    """Register `cersa::<qualname>(<params>) -> <returns>`, dispatched by `kernel_for(qualname)`;
    `backend(*args)`, if given, names the backend instead of the user's request (SNELL's merge)."""

    def dispatch(*args):
        tensors = _dispatch_tensors(args)
        if backend is None:
            return kernel_for(qualname, tensors)(*args)
        with use_backend(backend(*args)):
            return kernel_for(qualname, tensors)(*args)

    _DISPATCH[qualname] = dispatch

    op = torch.library.custom_op(f"cersa::{qualname}", dispatch, mutates_args=(), schema=f"({params}) -> {returns}")
    op.register_fake(fake)
    return getattr(torch.ops.cersa, qualname)


def bias_grad(dy: Tensor, dtype: torch.dtype) -> Tensor:
    """dbias = Σ_T dy (m,), accumulated in float64 for float64 dy and float32 otherwise, in `dtype`."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc).to(dtype)


def flatten_tokens(x: Tensor) -> tuple[Tensor, torch.Size]:
    """x (..., n) -> (x as (T, n), the leading shape to restore with `y.reshape(*lead, m)`)."""
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


@dataclass(frozen=True)
class OpPair:
    """The two registered ops of one method; `forward` is the differentiable entry point."""

    name: str
    forward: Callable  # torch.ops.cersa.<name>_fwd
    backward: Callable  # torch.ops.cersa.<name>_bwd


def define_op_pair(
    name: str,
    *,
    inputs: str,
    outputs: Sequence[str],
    backward_uses: Sequence[str],
    gradients: Sequence[str],
    fake_forward: Callable,
    fake_backward: Callable,
    bias: Optional[str] = "bias",
    save_when: Optional[Mapping[str, Callable[[dict], bool]]] = None,
) -> OpPair:
    """Register `cersa::<name>_fwd` / `cersa::<name>_bwd` and the autograd formula that joins them.

    inputs: the forward's schema parameters, e.g. "Tensor x, Tensor V, Tensor S, Tensor U, Tensor? bias";
    outputs: names of the forward's tensor outputs, y first (one name: the op returns y alone);
    backward_uses: names (forward inputs or outputs) passed to the backward op between dy and
    need_dx, in order; gradients: the inputs the backward op returns gradients for, x first;
    bias: the input whose gradient is Σ_T dy (None: no bias input);
    save_when: {name: predicate(non-tensor inputs)}: save that tensor only when it holds (LoRA's
    dropout seed is kept only when there is a mask to regenerate); a zero int64 scalar stands in.
    """
    input_types = _parameter_types(inputs)
    input_names = list(input_types)
    if gradients[0] != "x" or any(g not in input_names for g in gradients):
        raise ValueError(f"define_op_pair({name!r}): gradients must be forward inputs, x first; got {gradients}")
    save_when = dict(save_when or {})
    for n in list(backward_uses) + list(save_when):  # before anything is registered
        if n not in input_names and n not in outputs:
            raise ValueError(f"define_op_pair({name!r}): {n!r} is neither a forward input nor an output")

    def bwd_type(n: str) -> str:
        return input_types.get(n, "Tensor").rstrip("?")

    fwd_returns = "Tensor" if len(outputs) == 1 else "(" + ", ".join("Tensor" for _ in outputs) + ")"
    bwd_params = ", ".join(["Tensor dy"] + [f"{bwd_type(n)} {n}" for n in backward_uses] + ["bool need_dx"])
    bwd_returns = "(" + ", ".join("Tensor" for _ in gradients) + ")"
    fwd = define_op(f"{name}_fwd", inputs, fwd_returns, fake_forward)
    bwd = define_op(f"{name}_bwd", bwd_params, bwd_returns, fake_backward)
    tensor_uses = [n for n in backward_uses if bwd_type(n) == "Tensor"]

    def setup_context(ctx, inputs, output):
        values = dict(zip(input_names, inputs))
        outs = (output,) if len(outputs) == 1 else tuple(output)
        values.update(zip(outputs, outs))
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outs[1:])
        # no zero tensors for the activations' (never used) gradients: one T×k (CERSA's h) or
        # T×r more alive through the backward than plain autograd keeps at its peak
        ctx.set_materialize_grads(False)
        constants = {n: v for n, v in values.items() if not isinstance(v, Tensor) and v is not None}
        ctx.constants = {n: values[n] for n in backward_uses if n not in tensor_uses}
        ctx.dropped = {n for n, keep in save_when.items() if not keep(constants)}
        ctx.save_for_backward(*(values[n] for n in tensor_uses if n not in ctx.dropped))
        ctx.bias_dtype = values[bias].dtype if bias is not None and values.get(bias) is not None else None

    def backward(ctx, dy, *_activation_grads):
        if dy is None:  # no gradient reached y (grads are not materialised): every gradient is zero
            return (None,) * len(input_names)
        saved = iter(ctx.saved_tensors)
        tensors = {
            n: (torch.zeros((), dtype=torch.int64) if n in ctx.dropped else next(saved)) for n in tensor_uses
        }
        needs = dict(zip(input_names, ctx.needs_input_grad))
        grads: dict[str, Optional[Tensor]] = {}
        if any(needs[g] for g in gradients):
            args = [tensors[n] if n in tensors else ctx.constants[n] for n in backward_uses]
            grads = dict(zip(gradients, bwd(dy, *args, needs["x"])))
        if bias is not None and needs[bias]:
            grads[bias] = bias_grad(dy, ctx.bias_dtype)
        return tuple(grads.get(n) if needs[n] else None for n in input_names)

    torch.library.register_autograd(f"cersa::{name}_fwd", backward, setup_context=setup_context)
    return OpPair(name, fwd, bwd)

