"""The test registry of methods: per-method test options in one place, keyed by the methods the
library registers (`cersa_kernels.nn.method_classes()`). The method-level suites
(tests/test_methods_contract.py, test_model.py's whole-model and load tests, the distributed test)
iterate over it; the op-level registry is op_harness.OPS. Adding a method adds one METHODS entry
(test_every_library_method_has_a_registry_entry fails until it is there)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import cersa_kernels as ck
from cersa_kernels.nn import adapter_classes, method_classes


def _one_per_layer(rows) -> int:
    return len(rows)


def _two_per_layer(rows) -> int:
    return 2 * len(rows)


def _one_per_role(rows) -> int:
    """PiCa shares one M per role (the last name component) across its layers."""
    return len({r["name"].rsplit(".", 1)[-1] for r in rows})


@dataclass(frozen=True)
class MethodCase:
    """options: `apply` options on the small test models; trainable(rows): the number of trainable
    tensors for `apply`'s report rows; autocast_options: options for the autocast test where the
    default ones do not fit (SNELL: without sparsification, see there); train_bias: whether the
    layer takes train_bias (then the compile test trains one bias too)."""

    options: dict
    trainable: Callable
    autocast_options: Optional[dict] = None
    train_bias: bool = False
    under: Optional[str] = None  # a method applied first (PiCa over CERSA)
    method: str = field(default="")  # the `apply` method of a STACKS entry
    layer: str = field(default="")  # the class name of a STACKS entry's layers


METHODS = {
    "cersa": MethodCase(dict(energy=0.9), _one_per_layer, train_bias=True),
    "lora": MethodCase(dict(rank=4, alpha=8), _two_per_layer),
    "pica": MethodCase(dict(rank=4), _one_per_role),
    "snell": MethodCase(dict(rank=8, sparsity=0.5), _two_per_layer, autocast_options=dict(rank=4, sparsity=0.0),
                        train_bias=True),
}

# Stacks: a method applied over another one's layers (PiCa over CERSA: PicaCersaLinear), and the
# quantized variants of a method (its frozen operands stored int8 / NF4, docs/quantization.md):
# every method-level suite that iterates over STACKS runs them too. Group size 16 divides the test
# model's 32 and 48.
STACKS = {
    "pica-on-cersa": MethodCase(
        dict(rank=4), _one_per_role,  # one M per role; CERSA's S is frozen under PiCa
        under="cersa", method="pica", layer="PicaCersaLinear",
    ),
    "cersa-nf4": MethodCase(
        dict(energy=0.9, factor_format="nf4", factor_group_size=16), _one_per_layer, train_bias=True,
        method="cersa", layer="CersaLinear",
    ),
    "lora-nf4": MethodCase(
        dict(rank=4, alpha=8, base_format="nf4", base_group_size=16), _two_per_layer, method="lora", layer="LoraLinear",
    ),
    "pica-int8": MethodCase(
        dict(rank=4, base_format="int8", base_group_size=16), _one_per_role, method="pica", layer="PicaLinear",
    ),
}


def method_of(name: str) -> str:
    """The `apply` method name of a METHODS or STACKS key."""
    return (STACKS.get(name) or METHODS[name]).method or name


def case_of(name: str) -> MethodCase:
    return STACKS.get(name) or METHODS[name]


def library_methods() -> list[str]:
    """The methods the package itself registers (test-only ones defined in test files excluded)."""
    return sorted(m for m, cls in method_classes().items() if cls.__module__.startswith("cersa_kernels."))


def layer_class(name: str) -> type:
    """The AdapterLayer class `apply(model, name)` puts in place."""
    layer = case_of(name).layer
    return adapter_classes()[layer] if layer else method_classes()[method_of(name)]


def apply(model, name: str, options: Optional[dict] = None, **kwargs):
    """`ck.apply` of a METHODS or STACKS entry (its base method first, if any)."""
    case = case_of(name)
    if case.under is not None:
        ck.apply(model, case.under, **METHODS[case.under].options, **kwargs)
    return ck.apply(model, method_of(name), **(case.options if options is None else options), **kwargs)


# --- the small model every method-level test adapts ------------------------------------------------

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


class Block(nn.Module):
    def __init__(self, d=32, hidden=48):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Net(nn.Module):
    """x (..., 32) -> (..., 8): two residual blocks (shared roles up/down) and a head."""

    def __init__(self, checkpointing=None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)
        self.checkpointing = checkpointing  # None, "reentrant" or "non-reentrant"

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
            else:
                x = block(x)
        return self.head(x)


def adapted_net(seed=0, method="cersa", options=None, **kwargs):
    """Net (seeded) with every block layer adapted by `method` (a METHODS or STACKS key); trainable
    tensors that start at zero (LoRA's B, PiCa's M) are perturbed so every one gets a gradient."""
    torch.manual_seed(seed)
    net = Net(**kwargs)
    apply(net, method, options, exclude_modules=["head"])
    if method != "cersa":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in ck.trainable_parameters(net):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


def grads(net, x):
    net.zero_grad()
    net(x).square().mean().backward()
    return [p.grad.clone() for p in ck.trainable_parameters(net)]
