"""Numbers read off a published plot: the test-accuracy panel of study 1's figures.

Study 1 ("Why don't we simply use running statistics for batch normalization training?")
published its curves as PNGs only (``bs-{B}-dataset-{D}.png``, made by matplotlib: a loss panel
on the left, a test-accuracy panel on the right, one tab10 colour per norm, a point every 500
iterations). ``read_accuracy_panel`` recovers the plotted values so that a report can name our
differences in numbers:

- the right panel's frame is the pair of long dark columns and rows in the right half;
- the x scale comes from the bottom tick marks (major ticks every 5 points), the y scale from
  the frame and the panel's y limits, which the study's script fixes for MNIST (0.75, 1.0);
- the legend box (its light grey frame) is masked out, so its colour samples are not read as data;
- a series' value at point k is where its straight segments meet: inside a segment the centre of
  the coloured run in a pixel column is the line's value there (antialiased lines are
  symmetric about it, however steep), so each segment is measured three pixels inside either
  end (clear of a steep neighbour's width) and extended to its ends; a point between two
  segments that bend is where their lines cross
  (which needs no x calibration), otherwise the two estimates are averaged.

Lines drawn later cover earlier ones where they coincide (the study draws BN, BNRS, BRN, BRNC,
BNWoS in that order). A segment with none of its own pixels in sight lies under a later line, so
its value is within a line width of that line's: it is read from the later-drawn run nearest to
the series' own neighbouring values and marked ``covered``; a series never seen (below the
panel, or under later lines from its first point on) is None. A point is ``-inf`` below the panel
(the study clips MNIST at 0.75), None where nothing can be said. The resolution is a pixel,
0.25 / 385 px = 0.0007 for the published MNIST panels; a line width (2 px) where covered; up to
0.008 at a point next to a steep segment that leaves the panel (extended from one side, where the x scale's sub-pixel
error is multiplied by the slope).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# matplotlib's default colour cycle (tab10), in the study's legend order.
STUDY1_SERIES = {"bn": "#1f77b4", "bnrs": "#ff7f0e", "brn": "#2ca02c"}
# The lines drawn after them, which can cover them: BRNC and BNWoS.
STUDY1_LATER = ["#d62728", "#9467bd"]
# The y limits the study's script sets per dataset; None where matplotlib chose them.
STUDY1_YLIM = {"mnist": (0.75, 1.0)}
EVAL_EVERY = 500


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255


def _long_runs(mask: np.ndarray, axis: int) -> list[int]:
    """Indices along the other axis whose count of True is at least half the largest count."""
    counts = mask.sum(axis)
    return [i for i, c in enumerate(counts) if c >= 0.5 * counts.max() and c > 50]


def _right_panel_frame(dark: np.ndarray, path: str | Path) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixel of the frame of the right-hand panel of a figure, from its
    mask of dark pixels: the long dark columns and rows of the image's right half.

    The left spine is the first long dark column from which the frame's bottom spine runs
    unbroken to the right one: the left panel's right spine can lie in the right half too (study
    1's figure drawn by matplotlib 3.10), and taking it would put the right panel's y tick
    labels inside the panel.
    """
    half = dark.shape[1] // 2
    cols = [c + half for c in _long_runs(dark[:, half:], 0)]
    rows = _long_runs(dark[:, half:], 1)
    if len(cols) >= 2 and len(rows) >= 2:
        right, top, bottom = max(cols), min(rows), max(rows)
        lefts = [c for c in cols if c < right and dark[bottom, c : right + 1].all()]
        if lefts:
            return min(lefts), right, top, bottom
    raise ValueError(f"{path}: no plot frame found in the right half of the image")


def _runs(column: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each contiguous stretch of True."""
    idx = np.nonzero(column)[0]
    if idx.size == 0:
        return []
    breaks = np.nonzero(np.diff(idx) > 1)[0]
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def read_accuracy_panel(
    path: str | Path,
    ylim: tuple[float, float],
    series: dict[str, str] | None = None,
    later: list[str] | None = None,
    points: int = 21,
) -> dict[str, list[tuple[float, bool] | None]]:
    """The values of each series in the right-hand panel of a study-1 figure.

    Args:
        path: the PNG.
        ylim: the panel's (bottom, top) y limits.
        series: name -> hex colour of each line, in drawing order; study 1's bn, bnrs, brn by default.
        later: colours of lines drawn after all of ``series`` (study 1's BRNC and BNWoS by default).
        points: how many points each line has (x = 0, 1, ..., points - 1).

    Returns:
        name -> (value, covered) at each point; value -inf below the panel; None where unknown.
    """
    import matplotlib.image as mpimg

    series = STUDY1_SERIES if series is None else series
    later = STUDY1_LATER if later is None else later
    rgb = mpimg.imread(str(path))[..., :3].astype(np.float32)
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    height, width, _ = rgb.shape
    dark = rgb.max(-1) < 0.25
    left, right, top, bottom = _right_panel_frame(dark, path)
    # Bottom tick marks: short dark runs just below the frame, inside it horizontally.
    ticks = [c for c in range(left + 1, right) if dark[bottom + 2 : bottom + 5, c].all()]
    ticks = [c for i, c in enumerate(ticks) if i == 0 or c - ticks[i - 1] > 1]
    if len(ticks) < 2:
        raise ValueError(f"{path}: no x tick marks found under the plot frame")
    step = (points - 1) / (len(ticks) - 1)  # data units between major ticks (5 for 21 points)
    px_per_unit = (ticks[-1] - ticks[0]) / ((len(ticks) - 1) * step)
    x_pixel = [ticks[0] + k * px_per_unit for k in range(points)]
    y_value = lambda row: ylim[1] - (row - top) / (bottom - top) * (ylim[1] - ylim[0])

    # Only the panel's inside counts, less the legend box (its frame is light grey).
    inside = np.zeros((height, width), dtype=bool)
    inside[top + 1 : bottom, left + 1 : right] = True
    grey = (np.abs(rgb - 0.84).max(-1) < 0.03) & inside
    g_cols = [c for c, n in enumerate(grey.sum(0)) if n >= 15]  # the box's sides
    g_rows = [r for r, n in enumerate(grey.sum(1)) if n >= 20]  # its top and bottom
    if len(g_cols) >= 2 and len(g_rows) >= 2:
        inside[min(g_rows) : max(g_rows) + 1, min(g_cols) : max(g_cols) + 1] = False
    masks = {c: (np.abs(rgb - _rgb(c)).max(-1) < 0.12) & inside for c in [*series.values(), *later]}
    order = list(series.values()) + later

    out: dict[str, list[tuple[float, bool] | None]] = {}
    for name, color in series.items():
        covering = [masks[c] for c in order[order.index(color) + 1 :]]

        def centre(col: int, own: np.ndarray = masks[color]) -> float | None:
            runs = _runs(own[:, col])
            return None if not runs else (runs[0][0] + runs[-1][1]) / 2

        union = np.logical_or.reduce(covering) if covering else None

        def covered_centre(col: int, near: float | None, union: np.ndarray | None = union) -> float | None:
            runs = _runs(union[:, col]) if union is not None else []
            # A series never seen may as well lie below the panel: nothing can be said of it.
            if not runs or near is None:
                return None
            first, last = min(runs, key=lambda r: abs((r[0] + r[1]) / 2 - near))
            return (first + last) / 2

        estimates: list[list[float]] = [[] for _ in range(points)]
        lines: dict[int, tuple[float, float, float]] = {}  # segment k -> (a, row at a, slope)
        covered = [False] * points
        last_row: float | None = None
        for k in range(points - 1):
            a, b = round(x_pixel[k]) + 3, round(x_pixel[k + 1]) - 3
            if b <= a:
                continue
            ra, rb = centre(a), centre(b)
            if ra is None and rb is None:
                ra, rb = covered_centre(a, last_row), covered_centre(b, last_row)
                if ra is None or rb is None:
                    continue
                covered[k] = covered[k + 1] = True
            elif ra is None or rb is None:
                continue
            slope = (rb - ra) / (b - a)
            lines[k] = (a, ra, slope)
            estimates[k].append(ra - slope * (a - x_pixel[k]))
            estimates[k + 1].append(rb + slope * (x_pixel[k + 1] - b))
            last_row = rb
        values: list[tuple[float, bool] | None] = []
        for k, rows_k in enumerate(estimates):
            if not rows_k:
                values.append(None)
                continue
            row = sum(rows_k) / len(rows_k)
            # Where both segments are seen and bend, the vertex is where their lines cross: this
            # needs no x calibration, which steep lines turn into large errors (11 px per px).
            if k - 1 in lines and k in lines:
                (a1, r1, s1), (a2, r2, s2) = lines[k - 1], lines[k]
                if abs(s1 - s2) > 0.5:
                    x = (r2 - r1 + s1 * a1 - s2 * a2) / (s1 - s2)
                    if abs(x - x_pixel[k]) < 3:
                        row = r1 + s1 * (x - a1)
            values.append((-math.inf if row > bottom + 1 else min(y_value(row), ylim[1]), covered[k]))
        out[name] = values
    return out


def study1_reference(directory: str | Path, dataset: str, batch_size: int) -> tuple[Path, dict] | None:
    """(the figure, its accuracies by norm and iteration) of one study-1 cell, or None when the
    folder has no such figure or its y scale is not known.

    Args:
        directory: the folder of the study's PNGs (e.g. ../shared/reference/study1).
        dataset: ``mnist`` or ``cifar100``.
        batch_size: 2, 16 or 128.
    """
    name = {"mnist": "MNIST", "cifar100": "CIFAR100"}.get(dataset)
    path = Path(directory) / f"bs-{batch_size}-dataset-{name}.png"
    if name is None or not path.is_file():
        return None
    ylim = STUDY1_YLIM.get(dataset)
    if ylim is None:
        return path, {}
    values = read_accuracy_panel(path, ylim)
    return path, {n: {k * EVAL_EVERY: v for k, v in enumerate(vs)} for n, vs in values.items()}
