"""Energy- and budget-chosen ranks round up to multiples of 16 (rank_multiple; 1: off): only more
energy, capped at min(m, n) and max_rank, never past a budget; rank= is never rounded; the report
shows the rule's k beside the aligned one; apply's progress bar is silent in tests."""
import io

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import CersaLinear, decompose
from cersa_kernels._progress import Progress
from cersa_kernels.decompose import align_rank, align_ranks, cersa_parameter_count


def test_align_rank():
    assert align_rank(819, 16, 2048) == 832
    assert align_rank(832, 16, 2048) == 832
    assert align_rank(1, 16, 2048) == 16
    assert align_rank(2045, 16, 2047) == 2047  # capped at min(m, n)
    assert align_rank(819, 16, 2048, max_rank=820) == 820  # and at max_rank
    assert align_rank(819, 1, 2048) == 819
    assert align_rank(19, 16, 127) == 19  # a layer below ALIGN_MIN_DIM = 128 keeps its k
    assert align_rank(19, 16, 128) == 32


def test_decompose_aligns_energy_ranks_only():
    W = torch.randn(200, 150, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = decompose(W, 0.6, rank_multiple=1)
    aligned = decompose(W, 0.6)
    assert plain.rank == plain.energy_rank == aligned.energy_rank
    assert aligned.rank % 16 == 0 and plain.rank <= aligned.rank < plain.rank + 16
    assert aligned.energy_kept > plain.energy_kept
    torch.testing.assert_close(aligned.sigma[: plain.rank], plain.sigma)
    assert decompose(W, rank=45).rank == 45  # an explicit rank as it is
    assert decompose(W, 0.6, rank_multiple=8).rank % 8 == 0
    assert decompose(W, 1.0).rank == 150
    small = W[:100, :90]  # min(m, n) < 128: not aligned
    assert decompose(small, 0.6).rank == decompose(small, 0.6, rank_multiple=1).rank


def test_decompose_randomized_path_aligns_too():
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(300, 40, generator=g) @ torch.randn(40, 257, generator=g)) / 40
    svd = decompose(W, 0.9, svd="randomized")
    assert svd.method == "randomized" and svd.rank % 16 == 0 and svd.energy_rank <= svd.rank


def test_bad_rank_multiple():
    with pytest.raises(ValueError, match=r"decompose: rank_multiple must be in \[1, inf\], got 0"):
        decompose(torch.randn(4, 4), rank_multiple=0)


def test_align_ranks_respects_a_budget():
    shapes = {"a": (160, 160), "b": (160, 144)}
    ranks = {"a": 19, "b": 21}
    assert align_ranks(ranks, shapes, 16) == {"a": 32, "b": 32}  # no budget: up
    roomy = sum(cersa_parameter_count(*shapes[n], 32) for n in shapes)
    assert align_ranks(ranks, shapes, 16, budget=roomy) == {"a": 32, "b": 32}
    tight = sum(cersa_parameter_count(*shapes[n], k) for n, k in ranks.items())  # exactly the unaligned cost
    chosen = align_ranks(ranks, shapes, 16, budget=tight)
    assert sum(cersa_parameter_count(*shapes[n], k) for n, k in chosen.items()) <= tight
    assert chosen == ranks  # neither fits rounded up: each keeps its own k (rounding down would waste budget)
    mixed = {"a": 31, "b": 18}
    shapes2 = {"a": (160, 160), "b": (160, 160)}
    tight2 = sum(cersa_parameter_count(*shapes2[n], k) for n, k in mixed.items())
    chosen = align_ranks(mixed, shapes2, 16, budget=tight2)
    assert chosen == {"a": 32, "b": 16}  # b rounded down paid for a rounded up
    assert sum(cersa_parameter_count(*shapes2[n], k) for n, k in chosen.items()) <= tight2
    assert align_ranks({"a": 5}, {"a": (160, 160)}, 16, budget=cersa_parameter_count(160, 160, 5)) == {"a": 5}
    assert align_ranks(ranks, shapes, 1, budget=tight) == ranks


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(176, 160), nn.ReLU(), nn.Linear(160, 136))


def test_apply_reports_the_rule_and_the_aligned_rank():
    model = net()
    report = ck.apply(model, "cersa", energy=0.8)
    for row in report.rows:
        layer = model.get_submodule(row["name"])
        assert row["rank"] == layer.rank and row["rank"] % 16 == 0
        assert row["energy_rank"] == layer.energy_rank <= row["rank"] < row["energy_rank"] + 16
        assert f"{row['rank']:>5d} {row['energy_rank']:>6d}" in str(report)
    unaligned = ck.apply(net(), "cersa", energy=0.8, rank_multiple=1)
    assert [r["rank"] for r in unaligned.rows] == [r["energy_rank"] for r in report.rows]
    fixed = ck.apply(net(), "cersa", rank=21)
    assert [(r["rank"], r["energy_rank"]) for r in fixed.rows] == [(21, 21), (21, 21)]


@pytest.mark.parametrize("scope", ["global", "budget", "budget_bytes"])
def test_apply_global_and_budget_paths(scope):
    base = net()
    shapes = {"0": (160, 176), "2": (136, 160)}
    if scope == "global":
        options = dict(energy_scope="global", energy=0.8)
    elif scope == "budget":
        options = dict(budget=sum(cersa_parameter_count(m, n, 23) for m, n in shapes.values()))
    else:
        options = dict(budget_bytes=4 * sum(cersa_parameter_count(m, n, 23) for m, n in shapes.values()))
    plain = ck.apply(net(), "cersa", rank_multiple=1, **options)
    report = ck.apply(base, "cersa", **options)
    for row, unaligned in zip(report.rows, plain.rows):
        assert row["energy_rank"] == unaligned["rank"]
    if scope == "global":
        assert all(r["rank"] % 16 == 0 and r["rank"] >= r["energy_rank"] for r in report.rows)
    else:  # the budget holds after alignment
        used = sum(cersa_parameter_count(*r["shape"], r["rank"]) for r in report.rows)
        limit = options.get("budget", options.get("budget_bytes", 0) // 4)
        assert used <= limit
        assert all(r["rank"] % 16 == 0 or r["rank"] == r["energy_rank"] for r in report.rows)


def test_explicit_rank_with_global_is_refused_as_before():
    with pytest.raises(ValueError, match="rank= fixes every layer's rank"):
        ck.apply(net(), "cersa", rank=8, energy_scope="global")


def test_progress_silent_in_tests_and_shown_when_asked(capsys):
    ck.apply(net(), "cersa", energy=0.8)  # progress=None: stderr is no terminal under pytest
    assert capsys.readouterr().err == ""
    ck.apply(net(), "cersa", energy=0.8, progress=True)
    err = capsys.readouterr().err
    assert "2/2 layers" in err and "ETA" in err and err.endswith("\n")
    ck.apply(net(), "cersa", energy=0.8, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_eta_weighs_the_work():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = Progress({"small": 1.0, "big": 3.0}, "x", stream=stream)
    assert bar.enabled is False  # a terminal, but a test is running (PYTEST_CURRENT_TEST)
    bar = Progress({"small": 1.0, "big": 3.0}, "x", enabled=True, stream=stream)
    bar.done("small")
    assert "[######------------------] 1/2 layers" in stream.getvalue()
    bar.done("big")
    bar.close()
    assert "2/2 layers" in stream.getvalue() and "ETA 00:00" in stream.getvalue()


def test_from_linear_rank_multiple():
    torch.manual_seed(0)
    lin = nn.Linear(160, 144)
    assert CersaLinear.from_linear(lin, energy=0.9).rank % 16 == 0
    layer = CersaLinear.from_linear(lin, energy=0.9, rank_multiple=1)
    assert layer.rank == layer.energy_rank
