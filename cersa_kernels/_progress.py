"""Per-layer progress with an ETA for long conversions (`apply(model, "cersa")`): a one-line bar on
a terminal's stderr, silent otherwise (a pipe, a log file, pytest)."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """`p = Progress({name: cost}, "cersa")`, then `p.done(name)` after each item, `p.close()`.

    costs: relative work per item (for an SVD, m·n·min(m, n)); the ETA is the elapsed time scaled by
    the work left over the work done. enabled: True / False, or None (default): only when `stream`
    (stderr) is a terminal and no test runs (PYTEST_CURRENT_TEST unset)."""

    def __init__(self, costs: dict[str, float], label: str, enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None, width: int = 24):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty()) and "PYTEST_CURRENT_TEST" not in os.environ
        self.enabled = bool(enabled) and len(costs) > 0
        self.costs, self.label, self.width = costs, label, width
        self.total = float(sum(costs.values())) or 1.0
        self.work = 0.0
        self.count = 0
        self.start = time.perf_counter()

    def done(self, name: str) -> None:
        self.count += 1
        self.work += float(self.costs.get(name, 0.0))
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        share = min(self.work / self.total, 1.0)
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        filled = int(round(share * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {self.count}/{len(self.costs)} layers  {_clock(elapsed)} elapsed, "
            f"ETA {_clock(eta)}  {name[-40:]:40s}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
