"""PARA (cersa_kernels.para): one global threshold over LoRA, CERSA ΔS and shared PiCa M adapters;
each rebuilt ΔW is the dense rank-k_l truncation of the original ΔW; energy and budget modes; errors."""
import pytest
import torch
from torch import nn

from cersa_kernels import CersaLinear, LoraLinear
from cersa_kernels.nn.pica import apply_pica
from cersa_kernels.nn import LowRankUpdate as LoraFactors
from cersa_kernels.para import compress


def truncate(dw, k):
    U, S, Vh = torch.linalg.svd(dw.double())
    return (U[:, :k] * S[:k]) @ Vh[:k]


def random_lora(m, n, r, decay, scale, g):
    """Factors whose spectrum decays at a chosen rate, so the global threshold splits layers unevenly."""
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, r, dtype=torch.float64)
    return LoraFactors(A=torch.randn(r, n, generator=g, dtype=torch.float64), B=B, scale=scale)


def adapters():
    g = torch.Generator().manual_seed(0)
    return {
        "a": random_lora(20, 30, 8, 0.5, 2.0, g),
        "b": random_lora(40, 10, 8, 2.0, 0.5, g),
        "c": random_lora(16, 16, 4, 1.0, -1.0, g),  # a negative scale is kept exactly
    }


def spectra(ad):
    return {k: torch.linalg.svdvals(f.delta_weight()) for k, f in ad.items()}


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_mode_global_threshold_and_exact_truncation(energy):
    ad = adapters()
    res = compress(ad, energy=energy)
    sig = spectra(ad)
    pooled = torch.sort(torch.cat(list(sig.values())), descending=True).values
    total = float((pooled**2).sum())
    # one τ for every layer: kept σ ≥ τ > dropped σ
    for name, s in sig.items():
        k = res.ranks[name]
        assert k == int((s >= res.threshold * (1 - 1e-9)).sum()), name
    kept = sum(float((s[: res.ranks[n]] ** 2).sum()) for n, s in sig.items())
    assert kept / total >= energy - 1e-12
    n_kept = sum(res.ranks.values())
    assert float((pooled[: n_kept - 1] ** 2).sum()) / total < energy  # minimal: one σ fewer is not enough
    assert res.energy_kept == pytest.approx(kept / total, rel=1e-9)
    for name, f in ad.items():
        k = res.ranks[name]
        new = res.adapters[name]
        if k == 0:
            assert new is None
            continue
        assert new.A.shape == (k, f.A.shape[1]) and new.B.shape == (f.B.shape[0], k) and new.scale == f.scale
        torch.testing.assert_close(new.delta_weight(), truncate(f.delta_weight(), k), atol=1e-10, rtol=1e-10)
    if energy < 1.0:
        assert len(set(res.ranks.values())) > 1 and res.params_after < res.params_before


def test_budget_mode_fits_and_is_maximal():
    ad = adapters()
    budget = 700
    res = compress(ad, budget=budget)
    assert res.params_after <= budget
    cost = {n: f.B.shape[0] + f.A.shape[1] for n, f in ad.items()}
    assert res.params_after == sum(k * cost[n] for n, k in res.ranks.items())
    # the next σ below the threshold would not have fitted
    sig = spectra(ad)
    nxt = max((float(s[res.ranks[n]]), n) for n, s in sig.items() if res.ranks[n] < s.numel())
    assert res.params_after + cost[nxt[1]] > budget
    assert compress(ad, budget=0).params_after == 0 and all(v is None for v in compress(ad, budget=0).adapters.values())
    assert compress(ad, budget=10**9).ranks == {"a": 8, "b": 8, "c": 4}


class Net(nn.Module):
    """Two LoRA layers, a CERSA layer, and a PiCa role shared by two layers."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lora1 = LoraLinear.from_linear(nn.Linear(24, 32), rank=6, alpha=12)
        self.lora2 = LoraLinear.from_linear(nn.Linear(32, 24), rank=4, alpha=4)
        self.cersa = CersaLinear.from_linear(nn.Linear(24, 24), rank=10)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(proj=nn.Linear(24, 20))) for _ in range(2))
        self.shared = apply_pica(self.blocks, rank=5)["proj"]
        with torch.no_grad():
            self.lora1.lora_B.copy_(torch.randn(32, 6, generator=g) * torch.logspace(0, -1, 6))
            self.lora2.lora_B.copy_(torch.randn(24, 4, generator=g) * 1e-3)  # tiny: PARA removes it
            self.cersa.S.add_(2.0 * torch.randn(10, 10, generator=g) * torch.logspace(0, -1, 10))
            self.shared.copy_(torch.randn(20, 5, generator=g) * torch.logspace(0, -2, 5))

    def deltas(self):
        out = {}
        for name, mod in self.named_modules():
            if isinstance(mod, LoraLinear):
                out[name] = mod.delta_weight()
            elif isinstance(mod, CersaLinear):
                out[name] = mod.U @ mod.delta_core() @ mod.V.T
            elif hasattr(mod, "delta_weight"):
                out[name] = mod.delta_weight()
        return {k: v.detach().double() for k, v in out.items()}

    def forward(self, x):
        y = self.lora2(self.lora1(x)) + self.cersa(x)
        return sum(b["proj"](y) for b in self.blocks)


def test_model_mode_rebuilds_every_adapter_kind():
    net = Net()
    before = net.deltas()
    x = torch.randn(5, 24)
    res = compress(net, energy=0.9)
    kinds = {layer.name: layer.kind for layer in res.layers}
    assert kinds == {"lora1": "lora", "lora2": "lora", "cersa": "cersa", "blocks.0.proj.M": "pica"}
    ranks = res.ranks
    assert ranks["lora2"] == 0 and isinstance(net.lora2, nn.Linear)  # k = 0 removes the adapter
    assert isinstance(net.lora1, LoraLinear) and net.lora1.rank == ranks["lora1"] > 0
    assert net.lora1.scaling == 2.0  # the layer's scale s is kept exactly: alpha' = s·k
    assert net.blocks[0]["proj"].M is net.blocks[1]["proj"].M  # still one shared M
    after = net.deltas()
    rank_of = dict(lora1=ranks["lora1"], cersa=ranks["cersa"])
    rank_of.update({f"blocks.{i}.proj": ranks["blocks.0.proj.M"] for i in range(2)})
    for name, k in rank_of.items():
        torch.testing.assert_close(after[name], truncate(before[name], k), atol=1e-5, rtol=1e-5, msg=name)
    assert 0 < ranks["cersa"] < 10 and 0 < ranks["blocks.0.proj.M"] < 5
    # the rebuilt model computes with the truncated updates
    torch.testing.assert_close(net.lora2(torch.zeros(1, 32)), net.lora2.bias[None].expand(1, 24))
    net(x).sum().backward()  # still trains
    assert net.lora1.lora_A.grad is not None and net.shared.grad is not None and net.cersa.S.grad is not None
    assert res.params_after < res.params_before
    # parameters counted as min(k·(rows+cols), rows·cols) of each core
    by_name = {layer.name: layer for layer in res.layers}
    assert by_name["cersa"].params_before == 100 and by_name["blocks.0.proj.M"].params_before == 100
    assert by_name["lora1"].params_after == ranks["lora1"] * (32 + 24)


def test_untrained_adapters_are_all_removed():
    net = nn.Sequential(LoraLinear.from_linear(nn.Linear(8, 8), 2))
    res = compress(net)
    assert res.ranks == {"0": 0} and isinstance(net[0], nn.Linear) and res.energy_kept == 1.0


class TestErrors:
    def test_both_modes(self):
        with pytest.raises(ValueError, match="give energy or budget, not both"):
            compress(adapters(), energy=0.9, budget=10)

    def test_bad_values(self):
        with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 1.5"):
            compress(adapters(), energy=1.5)
        with pytest.raises(ValueError, match="budget must be a non-negative number of parameters, got -1"):
            compress(adapters(), budget=-1)

    def test_nothing_to_compress(self):
        with pytest.raises(ValueError, match="found no adapter"):
            compress(nn.Sequential(nn.Linear(3, 3)))

    def test_non_finite_names_the_adapter(self):
        ad = adapters()
        ad["b"] = LoraFactors(A=ad["b"].A, B=ad["b"].B * float("nan"), scale=1.0)
        with pytest.raises(ValueError, match=r"para \(b\): weight has \d+ non-finite value"):
            compress(ad)

    def test_bad_factor_shapes(self):
        with pytest.raises(ValueError, match=r"para \(x\): expected B \(m, r\) and A \(r, n\), got B \(4, 2\), A \(3, 5\)"):
            compress({"x": LoraFactors(A=torch.randn(3, 5), B=torch.randn(4, 2), scale=1.0)})
