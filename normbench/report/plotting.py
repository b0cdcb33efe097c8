"""The report's one way to draw and save a figure: matplotlib without a display, each axis's
legend (where it has labelled lines) and grid, a tight layout, a PNG, the figure closed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, axes: Any | Iterable[Any], path: Path, dpi: int = 110, legend_size: int = 8) -> str:
    """Legend (on each axis with labelled lines), grid and layout, then the PNG at ``path``; the
    figure is closed. Returns the file name."""
    for ax in axes if isinstance(axes, Iterable) else [axes]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name
