"""PNG plots that render offline (DVC's HTML plots load JavaScript from a CDN)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prunekit.pipeline.outputs import atomic_file


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


def scatter_plot(
    path: Path,
    left: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    right: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
) -> None:
    """Two side-by-side scatter panels, each one (x label -> (xs, ys)) series, y = loss, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, panel in zip(axes, (left, right), strict=True):
        for xlabel, (xs, ys) in panel.items():
            ax.scatter(list(xs), list(ys), s=12)
            ax.set(xlabel=xlabel, ylabel="loss")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
