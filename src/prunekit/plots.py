"""PNG plots that render offline (DVC's HTML plots load JavaScript from a CDN)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prunekit.fsutil import atomic_file


def line_plot(
    path: Path,
    x: Iterable[float],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
) -> None:
    """Write a line plot of each series against ``x`` as PNG (an empty frame when there is no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(x)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        if len(ys):
            ax.plot(xs[: len(ys)], ys, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if any(len(ys) for ys in series.values()):
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
