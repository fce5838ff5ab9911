"""A method defined here, in one small class, goes through every whole-model tool without any
library edit: apply, train, save, load, merge, PARA and PEFT export. This is the proof that
adding a method means adding its layer (and op) file, not editing model.py and para.py."""
import copy

import peft
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels.nn import AdapterLayer, LowRankUpdate
from cersa_kernels.para import compress


class ScaledIdentityLinear(AdapterLayer, method="test-scaled-identity"):
    """y = x W0ᵀ + b + alpha·x[..., :m] padded to m: a frozen base plus ΔW = alpha·I (out, in)
    (the identity on the first min(m, n) coordinates), one trainable scalar."""

    BASE_KEYS = ("weight", "bias")

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = min(in_features, out_features)
        self._init_frozen_base(bias, device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear):
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device, linear.weight.dtype)
        layer._copy_frozen_base(linear)
        return layer

    def config(self):
        return {}

    @classmethod
    def from_config(cls, config, base, device=None):
        return cls.from_linear(base)

    def _identity(self):
        return torch.eye(self.out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.weight + self.alpha * self._identity(), self.bias)

    def delta_weight(self):
        return self.alpha * self._identity()

    def lowrank_update(self):
        eye = self._identity().float()
        return LowRankUpdate(A=eye[: self.rank], B=self.alpha.detach().float() * eye[:, : self.rank], scale=1.0)

    @torch.no_grad()
    def apply_para_update(self, update):
        # every σ of alpha·I is |alpha|: PARA keeps all of them or none
        kept = 0.0 if update is None else float(torch.diagonal(update.delta_weight()).mean())
        self.alpha.fill_(kept)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))


def test_a_method_defined_outside_the_library_goes_through_every_tool(tmp_path):
    original = make_model()
    model = copy.deepcopy(original)
    report = ck.apply(model, "test-scaled-identity")
    assert [row["name"] for row in report.rows] == ["0", "2"] and report.trainable == 2
    assert isinstance(model[0], ScaledIdentityLinear) and model[0].layer_name == "0"

    # train: the loss falls, and only the adapter's alphas learn
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g)
    optimizer = torch.optim.SGD(ck.trainable_parameters(model), lr=0.1)
    losses = []
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] and float(model[0].alpha) != 0.0
    assert len(ck.trainable_parameters(model)) == 2

    # save -> load into a fresh model: the same outputs
    ck.save(model, tmp_path / "adapter")
    fresh = ck.load(copy.deepcopy(original), tmp_path / "adapter")
    assert isinstance(fresh[2], ScaledIdentityLinear)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    # merge -> plain Linear layers with the same outputs
    merged = ck.merge(copy.deepcopy(model))
    assert type(merged[0]) is nn.Linear
    torch.testing.assert_close(merged(x), model(x), atol=1e-6, rtol=1e-6)

    # PEFT export: PEFT's own LoRA over the original model reproduces ours
    result = ck.export_peft_lora(model, tmp_path / "peft")
    assert result.ranks == {"0": 6, "2": 4}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)

    # PARA through the layer's own hooks: a tiny budget removes the adapter of the smaller |alpha|
    alphas = {name: abs(float(model.get_submodule(name).alpha)) for name in ("0", "2")}
    weak = min(alphas, key=alphas.get)
    # layer 0's full update costs 36 parameters (dense 6×6), layer 2's 24 (4×6): a budget of 36 holds
    # the stronger one whole and never both, so the weaker one goes
    result = compress(model, budget=36)
    assert result.ranks[weak] == 0 and float(model.get_submodule(weak).alpha) == 0.0
    assert {layer.kind for layer in result.layers} == {"test-scaled-identity"}
