"""Aggregate the per-(method, seed) results, render the Markdown table and the verdict, draw the plot."""
from __future__ import annotations

import io
import statistics

# Every field a run reports, with its type (checked by the tests; documented in docs/compare.md).
FIELDS = {
    "method": str, "seed": int, "lr": float, "head_lr": float, "device": str, "dtype": str, "steps": int,
    "batch_size": int, "seq_len": int, "losses": list, "trainable_params": int, "adapter_bytes": int,
    "frozen_weight_bytes": int, "peak_train_bytes": int, "peak_rss_bytes": int, "rss_before_train_bytes": int,
    "peak_rss_reset": bool, "sec_per_step": float, "tokens_per_sec": float, "weight_bytes": int, "grad_bytes": int,
    "optimizer_bytes": int, "saved_activation_bytes": int, "backends": dict, "val": dict, "test": dict,
}
PARA_FIELDS = {"energy": float, "params_before": int, "params_after": int, "reduction": float, "adapter_bytes": int,
               "accuracy": float, "macro_f1": float}
MB = 1e6


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method (in run order), and one per PARA-compressed method: accuracy and F1 as
    (mean, std) over seeds, the other figures as the mean over seeds."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for name, rs in by_method.items():
        mean = lambda key: statistics.fmean(r[key] for r in rs)  # noqa: E731
        row = dict(
            method=name, seeds=[r["seed"] for r in rs], lr=rs[0]["lr"],
            accuracy=_mean_std([r["test"]["accuracy"] for r in rs]), macro_f1=_mean_std([r["test"]["macro_f1"] for r in rs]),
            val_accuracy=statistics.fmean(r["val"]["accuracy"] for r in rs),
            trainable_params=rs[0]["trainable_params"], adapter_bytes=rs[0]["adapter_bytes"],
            frozen_weight_bytes=rs[0]["frozen_weight_bytes"], peak_train_bytes=mean("peak_train_bytes"),
            weight_bytes=mean("weight_bytes"), grad_bytes=mean("grad_bytes"), optimizer_bytes=mean("optimizer_bytes"),
            saved_activation_bytes=mean("saved_activation_bytes"), peak_rss_bytes=mean("peak_rss_bytes"),
            sec_per_step=mean("sec_per_step"), tokens_per_sec=mean("tokens_per_sec"),
            backends=rs[0]["backends"], para_of=None,
        )
        rows.append(row)
        if all("para" in r for r in rs):
            rows.append(dict(
                method=f"{name} + PARA", para_of=name, seeds=row["seeds"],
                accuracy=_mean_std([r["para"]["accuracy"] for r in rs]), macro_f1=_mean_std([r["para"]["macro_f1"] for r in rs]),
                params_before=rs[0]["para"]["params_before"], params_after=rs[0]["para"]["params_after"],
                adapter_bytes=rs[0]["para"]["adapter_bytes"], para_energy=rs[0]["para"]["energy"],
            ))
    return rows


def _pm(pair: tuple[float, float], scale: float = 100.0) -> str:
    return f"{pair[0] * scale:.1f} ± {pair[1] * scale:.1f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| method | test acc % | macro-F1 % | trainable params | adapter file MB | frozen weights MB | "
            "peak train MB | weights / grads / optim / saved act MB | peak RSS MB | s/step | tok/s | lr | backends |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["para_of"]:
            lines.append(
                f"| {r['method']} (ε={r['para_energy']}) | {_pm(r['accuracy'])} | {_pm(r['macro_f1'])} | "
                f"{r['params_before']:,} → {r['params_after']:,} | {r['adapter_bytes'] / MB:.2f} | | | | | | | | |"
            )
            continue
        backends = ", ".join(f"{op}: {b}" for op, b in r["backends"].items()) or "aten only"
        lines.append(
            f"| {r['method']} | {_pm(r['accuracy'])} | {_pm(r['macro_f1'])} | {r['trainable_params']:,} | "
            f"{r['adapter_bytes'] / MB:.2f} | {r['frozen_weight_bytes'] / MB:.1f} | {r['peak_train_bytes'] / MB:.1f} | "
            f"{r['weight_bytes'] / MB:.1f} / {r['grad_bytes'] / MB:.1f} / {r['optimizer_bytes'] / MB:.1f} / "
            f"{r['saved_activation_bytes'] / MB:.1f} | {r['peak_rss_bytes'] / MB:.0f} | {r['sec_per_step']:.2f} | "
            f"{r['tokens_per_sec']:.0f} | {r['lr']:g} | {backends} |"
        )
    return "\n".join(lines)


def _against(row: dict, other: dict | None, label: str) -> str | None:
    if other is None or other is row:
        return None
    delta = (row["accuracy"][0] - other["accuracy"][0]) * 100
    ratio = row["peak_train_bytes"] / other["peak_train_bytes"]
    return f"{delta:+.1f} pt vs {label} at {ratio:.2f}× its peak training memory"


def verdict(rows: list[dict]) -> str:
    """One paragraph in plain words, every figure computed from `rows`."""
    trained = [r for r in rows if not r["para_of"]]
    if not trained:
        return "No method ran."
    by = {r["method"]: r for r in trained}
    full, lora = by.get("full-ft"), by.get("lora-r8")
    best = max(trained, key=lambda r: r["accuracy"][0])
    leanest = min(trained, key=lambda r: r["peak_train_bytes"])
    parts = [f"Best test accuracy: {best['method']} ({best['accuracy'][0] * 100:.1f}%); least peak training memory: "
             f"{leanest['method']} ({leanest['peak_train_bytes'] / MB:.0f} MB)."]
    for r in trained:
        if not r["method"].startswith("cersa"):
            continue
        comparisons = [c for c in (_against(r, full, "full FT"), _against(r, lora, "LoRA")) if c]
        # the dense model's weight bytes: everything full FT holds (it freezes nothing)
        weights = r["weight_bytes"] / full["weight_bytes"] if full else None
        tail = f" (all weights {weights:.2f}× the dense model's)" if weights else ""
        if comparisons:
            parts.append(f"{r['method']}: " + "; ".join(comparisons) + tail + ".")
    for r in rows:
        if r["para_of"]:
            parent = by[r["para_of"]]
            parts.append(
                f"PARA on {r['para_of']} keeps {r['params_after'] / max(r['params_before'], 1):.0%} of the adapter parameters "
                f"and changes test accuracy by {(r['accuracy'][0] - parent['accuracy'][0]) * 100:+.1f} pt without retraining."
            )
    seeds = len(trained[0]["seeds"])
    if seeds == 1:
        parts.append("One seed only: differences of a point or two are within noise.")
    return " ".join(parts)


def plot_png(rows: list[dict]) -> bytes:
    """Test accuracy against peak training memory, one labelled point per trained method, as PNG
    bytes (so that the command writes it with its other results, all or nothing)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("compare: the plot needs matplotlib (pip install 'cersa_kernels[plot]'), "
                           "or pass --no-plot") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["para_of"]:
            continue
        x, (y, err) = r["peak_train_bytes"] / MB, r["accuracy"]
        ax.errorbar(x, y * 100, yerr=err * 100, fmt="o", capsize=3)
        ax.annotate(r["method"], (x, y * 100), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("peak training memory (MB, live tensors)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 on BBC news: accuracy vs peak training memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
