"""The load test's figure: throughput and latency percentiles against concurrency, per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loadtest.generator import LevelReport


def plot(reports: Sequence[LevelReport], path: Path, title: str) -> None:
    """Two panels (requests/s; p50/p95/p99 latency), one line per method, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or in CI
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels_all = sorted({report.concurrency for report in reports})
    for method in dict.fromkeys(report.method for report in reports):
        rows = [r for r in reports if r.method == method and r.latency_ms is not None]
        levels = [r.concurrency for r in rows]
        (line,) = throughput.plot(levels, [r.rps for r in rows], marker="o", label=method)
        for percentile, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            latency.plot(levels, [getattr(r.latency_ms, percentile) for r in rows], style, marker="o",
                         color=line.get_color(), label=f"{method} {percentile}")
    for axis, label in ((throughput, "requests/s"), (latency, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels_all, labels=[str(c) for c in levels_all])
        axis.set_xlabel("concurrency (closed-loop clients)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
