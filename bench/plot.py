"""A grouped bar chart of speedups over the target alone, one group of bars per request group."""

from __future__ import annotations

from pathlib import Path


def plot_speedups(results: dict[str, dict[str, dict]], path: Path) -> None:
    """results: group -> method -> summary (with `speedup`, or `failed`). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and no window wanted anywhere
    import matplotlib.pyplot as plt

    groups = list(results)
    methods = list(dict.fromkeys(m for cells in results.values() for m in cells))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) + 2), 4))
    for g, group in enumerate(groups):
        speedups = [results[group].get(m, {}).get("speedup") or 0.0 for m in methods]
        ax.bar([i + g * width for i in range(len(methods))], speedups, width, label=group)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(methods))], methods, rotation=35, ha="right")
    ax.set_ylabel("speedup over the target alone (x)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
