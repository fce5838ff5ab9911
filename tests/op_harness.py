"""Shared driver of the op tests: run a functional forward + backward on a backend, and compare the
Triton kernels and the float32 reference against a float64 oracle (tolerances.py's rule)."""
import torch

from cersa_kernels.backends import use_backend

from tolerances import assert_matches_reference


def run(backend, fn, inputs, grads, dy_seed=1):
    """fn(**inputs) forward + backward on `backend`; returns (y, {name: grad}) for names in `grads`."""
    ins = {
        k: (v.detach().clone().requires_grad_(k in grads) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    with use_backend(backend):
        y = fn(**ins)
        # drawn in float32 whatever y.dtype is, so every run (oracle included) gets the same dy
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.device, y.dtype)
        y.backward(dy)
    return y.detach(), {k: ins[k].grad for k in grads}


def as64(inputs):
    return {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()
    }


def on_gpu(inputs, dtype):
    """The inputs on the GPU in `dtype` (integer tensors, e.g. a seed, stay where they are)."""
    return {
        k: (v.to("cuda", dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }


def check_triton_against_reference(fn, inputs, grads, what=""):
    """Triton within twice the same-dtype reference's error of the float64 oracle (tolerances.py)."""
    y64, g64 = run("torch", fn, as64(inputs), grads)
    y32, g32 = run("torch", fn, inputs, grads)
    yt, gt = run("triton", fn, inputs, grads)
    assert_matches_reference(yt, y32, y64, f"y {what}")
    for k in grads:
        assert gt[k] is not None, f"d{k} {what}: no gradient"
        assert_matches_reference(gt[k], g32[k], g64[k], f"d{k} {what}")


def saved_bytes(fn, own):
    """Bytes autograd saves for one call of fn(), except tensors sharing storage with `own` (weights)."""
    ptrs = {t.untyped_storage().data_ptr() for t in own if t is not None}
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out
