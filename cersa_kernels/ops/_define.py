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

Quantized frozen operands (`quantizable=("V", "U")`): a `quant.QuantizedTensor` is not a Tensor, so
it cannot cross a schema. A second pair `cersa::<op>_q_fwd` / `cersa::<op>_q_bwd` takes each
quantizable `Tensor V` as its parts `Tensor V_data, Tensor? V_absmax, int[] V_meta`
(`quant.to_parts`; a dense operand is `(V, None, [])`); its dispatch and fake rebuild the operands
(`quant.from_parts`) and run the plain op's kernels and fakes, which then receive a QuantizedTensor.
`OpPair.__call__` picks the pair: the quantized one as soon as one operand is quantized.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .. import quant
from ..backends import BackendUnavailableError, kernel_for, select_backend, use_backend

__all__ = ["OpPair", "define_op", "define_op_pair", "run_kernel", "bias_grad", "flatten_tokens"]


def _parameter_types(params: str) -> dict[str, str]:
    """'Tensor x, Tensor? bias, float s' -> {'x': 'Tensor', 'bias': 'Tensor?', 's': 'float'}."""
    return {p.split()[-1]: p.split()[0] for p in params.split(",") if p.strip()}


def _dispatch_tensors(args: Sequence[object]) -> list:
    # The operands whose device/dtype (and format) choose the backend, not scalars such as the
    # CPU-resident int64 dropout seed or SNELL's 0-d threshold τ.
    return [
        a for a in args
        if quant.is_quantized(a) or (isinstance(a, Tensor) and a.is_floating_point() and a.dim() > 0)
    ]


def device_guard(tensors: Sequence[object]):
    """A `torch.cuda.device` guard for the first CUDA operand's device (a no-op context otherwise).
    Triton launches on the *current* device: operands on cuda:1 while cuda:0 is current would run
    on GPU 0 with GPU 1's pointers, and the autotuner would time the wrong GPU. Built lazily: no
    CUDA call until a CUDA operand is seen."""
    for t in tensors:
        if t.device.type == "cuda":
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


_DISPATCH: dict[str, Callable] = {}  # op name -> the function its custom op runs


def run_kernel(qualname: str, *args):
    """Run op `qualname`'s kernel on `args` exactly as its custom op does, outside the op (what
    `_alloc.AllocationRecorder` uses to look inside an op that is opaque to a dispatch mode)."""
    return _DISPATCH[qualname](*args)


def define_op(
    qualname: str,
    params: str,
    returns: str,
    fake: Callable,
    backend: Optional[Callable[..., str]] = None,
    unpack: Optional[Callable[[tuple], tuple]] = None,
) -> Callable:
    """Register `cersa::<qualname>(<params>) -> <returns>`, dispatched by `kernel_for(qualname)`;
    `backend(*args)`, if given, names the backend instead of the user's request (SNELL's merge);
    `unpack(args)`, if given, turns the schema's arguments into the kernel's and the fake's (the
    quantized ops rebuild their QuantizedTensor operands)."""

    def dispatch(*args):
        if unpack is not None:
            args = unpack(args)
        tensors = _dispatch_tensors(args)
        with device_guard(tensors):
            if backend is None:
                return kernel_for(qualname, tensors)(*args)
            with use_backend(backend(*args)):
                return kernel_for(qualname, tensors)(*args)

    _DISPATCH[qualname] = dispatch

    op = torch.library.custom_op(f"cersa::{qualname}", dispatch, mutates_args=(), schema=f"({params}) -> {returns}")
    op.register_fake(fake if unpack is None else (lambda *args: fake(*unpack(args))))
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
    """The registered ops of one method. Call it, `PAIR(*inputs, layer=...)`, to run the
    differentiable forward: `forward` on dense operands, `quantized_forward` on the operands' parts
    as soon as one of `quantizable` is a QuantizedTensor."""

    name: str
    forward: Callable  # torch.ops.cersa.<name>_fwd
    backward: Callable  # torch.ops.cersa.<name>_bwd
    input_names: tuple[str, ...] = ()
    quantizable: tuple[str, ...] = ()
    quantized_forward: Optional[Callable] = None  # torch.ops.cersa.<name>_q_fwd
    quantized_backward: Optional[Callable] = None  # torch.ops.cersa.<name>_q_bwd

    def __call__(self, *args, layer: str):
        if not any(quant.is_quantized(a) for a in args):
            return self.forward(*args)
        flat = []
        for name, a in zip(self.input_names, args):
            if name in self.quantizable:
                flat.extend(quant.to_parts(a))
            elif quant.is_quantized(a):
                raise TypeError(f"{layer}: {name} cannot be quantized (only {', '.join(self.quantizable) or 'none'} can)")
            else:
                flat.append(a)
        if not torch.compiler.is_compiling():
            # The dispatcher's own refusal cannot name the layer; eager calls get it here, first.
            try:
                select_backend(f"{self.name}_q_fwd", _dispatch_tensors(args))
            except BackendUnavailableError as exc:
                raise BackendUnavailableError(f"{layer}: {exc}") from None
        return self.quantized_forward(*flat)


_PARTS = {"data": "Tensor", "absmax": "Tensor?", "meta": "int[]"}  # quant.to_parts' three values


def _with_parts(names: Sequence[str], quantizable: Sequence[str]) -> list[str]:
    """`names` with each quantizable V replaced by V_data, V_absmax, V_meta."""
    return [part for n in names for part in ([f"{n}_{p}" for p in _PARTS] if n in quantizable else [n])]


def _unpacker(names: Sequence[str], quantizable: Sequence[str]) -> Callable[[tuple], tuple]:
    """Turns a quantized op's arguments (over `_with_parts(names)`) back into `names`' values."""

    def unpack(args: tuple) -> tuple:
        values, it = [], iter(args)
        for n in names:
            values.append(quant.from_parts(next(it), next(it), next(it)) if n in quantizable else next(it))
        values.extend(it)  # the backward's trailing need_dx
        return tuple(values)

    return unpack


def _schema(types: Mapping[str, str]) -> str:
    return ", ".join(f"{t} {n}" for n, t in types.items())


def _register_pair(
    qualname: str,
    input_types: Mapping[str, str],
    outputs: Sequence[str],
    backward_uses: Sequence[str],
    gradients: Sequence[str],
    fake_forward: Callable,
    fake_backward: Callable,
    bias: Optional[str],
    save_when: Mapping[str, Callable[[dict], bool]],
    unpack_forward: Optional[Callable] = None,
    unpack_backward: Optional[Callable] = None,
) -> tuple[Callable, Callable]:
    """Register `cersa::<qualname>_fwd` / `_bwd` over `input_types` and the autograd formula."""
    input_names = list(input_types)
    fwd_returns = "Tensor" if len(outputs) == 1 else "(" + ", ".join("Tensor" for _ in outputs) + ")"
    bwd_types = {"dy": "Tensor", **{n: input_types.get(n, "Tensor") for n in backward_uses}, "need_dx": "bool"}
    bwd_returns = "(" + ", ".join("Tensor" for _ in gradients) + ")"
    fwd = define_op(f"{qualname}_fwd", _schema(input_types), fwd_returns, fake_forward, unpack=unpack_forward)
    bwd = define_op(f"{qualname}_bwd", _schema(bwd_types), bwd_returns, fake_backward, unpack=unpack_backward)
    tensor_uses = [n for n in backward_uses if bwd_types[n].startswith("Tensor")]

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

    torch.library.register_autograd(f"cersa::{qualname}_fwd", backward, setup_context=setup_context)
    return fwd, bwd


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
    quantizable: Sequence[str] = (),
) -> OpPair:
    """Register `cersa::<name>_fwd` / `cersa::<name>_bwd` and the autograd formula that joins them.

    inputs: the forward's schema parameters, e.g. "Tensor x, Tensor V, Tensor S, Tensor U, Tensor? bias";
    outputs: names of the forward's tensor outputs, y first (one name: the op returns y alone);
    backward_uses: names (forward inputs or outputs) passed to the backward op between dy and
    need_dx, in order; gradients: the inputs the backward op returns gradients for, x first;
    bias: the input whose gradient is Σ_T dy (None: no bias input);
    save_when: {name: predicate(non-tensor inputs)}: save that tensor only when it holds (LoRA's
    dropout seed is kept only when there is a mask to regenerate); a zero int64 scalar stands in;
    quantizable: frozen `Tensor` inputs that may be QuantizedTensors: registers the pair
    `cersa::<name>_q_fwd` / `_q_bwd` too (module docstring), which runs the same kernels.
    """
    input_types = _parameter_types(inputs)
    input_names = list(input_types)
    if gradients[0] != "x" or any(g not in input_names for g in gradients):
        raise ValueError(f"define_op_pair({name!r}): gradients must be forward inputs, x first; got {gradients}")
    save_when = dict(save_when or {})
    for n in list(backward_uses) + list(save_when):  # before anything is registered
        if n not in input_names and n not in outputs:
            raise ValueError(f"define_op_pair({name!r}): {n!r} is neither a forward input nor an output")
    quantizable = tuple(quantizable)
    for n in quantizable:
        if input_types.get(n) != "Tensor" or n in gradients or n in save_when:
            raise ValueError(f"define_op_pair({name!r}): quantizable {n!r} must be a frozen Tensor input")
    common = dict(outputs=outputs, gradients=gradients, bias=bias, save_when=save_when)
    fwd, bwd = _register_pair(
        name, input_types, backward_uses=backward_uses, fake_forward=fake_forward, fake_backward=fake_backward,
        **common,
    )
    if not quantizable:
        return OpPair(name, fwd, bwd, tuple(input_names))
    # Every quantizable operand becomes three parameters; the fakes are the plain ones, behind unpack.
    q_types = {}
    for n, t in input_types.items():
        q_types.update({f"{n}_{p}": pt for p, pt in _PARTS.items()} if n in quantizable else {n: t})
    q_fwd, q_bwd = _register_pair(
        f"{name}_q", q_types, backward_uses=_with_parts(backward_uses, quantizable),
        fake_forward=fake_forward, fake_backward=fake_backward,
        unpack_forward=_unpacker(input_names, quantizable),
        unpack_backward=_unpacker(["dy", *backward_uses], quantizable), **common,
    )
    return OpPair(name, fwd, bwd, tuple(input_names), quantizable, q_fwd, q_bwd)
