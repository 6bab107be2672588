"""Learning-curve plots saved as PNG files.

Figures are built with matplotlib's object-oriented API (``Figure``), never through
``pyplot``: saving to PNG renders with the Agg backend, no display is needed, and the
caller's pyplot backend and open figures are left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from numpy.typing import ArrayLike

from agentstate.metrics import mean_and_standard_error

__all__ = ["format_step_count", "plot_learning_curve"]

_STEP_UNITS = ((1e9, "B"), (1e6, "M"), (1e3, "k"))


def format_step_count(steps: float) -> str:
    """Write a step count the short way: 1e6 -> "1M", 2500 -> "2.5k", 1.5e9 -> "1.5B".

    Example:
        >>> [format_step_count(n) for n in (0, 500, 2500, 1e6, 1.25e7, 3e9)]
        ['0', '500', '2.5k', '1M', '12.5M', '3B']

    Args:
        steps: a step count (a tick position, so possibly a float).

    Returns:
        The count with at most 6 significant digits and a k / M / B suffix.

    """
    for scale, suffix in _STEP_UNITS:
        if abs(steps) >= scale:
            return f"{steps / scale:g}{suffix}"
    return f"{steps:g}"


def plot_learning_curve(
    steps: ArrayLike,
    curves: Mapping[str, ArrayLike],
    out_path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str = "MSRE",
    reference_lines: Mapping[str, float | ArrayLike] | None = None,
    logy: bool = False,
) -> Path:
    """Plot learning curves, mean over streams with a standard-error band, to a PNG file.

    Each curve is drawn as its mean over the B streams with a shaded band of ± one standard
    error of that mean (the legend title says so; NaN entries, streams with nothing to
    report yet, are left out, see :func:`agentstate.metrics.mean_and_standard_error`).
    Reference lines are dashed: a number is a horizontal line (e.g. the error of predicting
    zero), an array is a curve over the same steps.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> steps = np.arange(1, 11) * 1_000_000
        >>> seeds = np.random.default_rng(0).uniform(0.8, 1.2, size=(1, 5))
        >>> msre = 0.015 * seeds / np.sqrt(np.arange(1, 11))[:, None]  # [N=10, B=5]
        >>> path = plot_learning_curve(
        ...     steps, {"columnar": msre}, Path(tempfile.mkdtemp()) / "msre.png",
        ...     title="Trace conditioning", reference_lines={"predict zero": 0.019})
        >>> path.read_bytes()[1:4]  # the PNG signature
        b'PNG'

    Args:
        steps: x positions (environment steps), shape [N].
        curves: curve name -> values, shape [N, B] each (B streams or seeds, may differ
            between curves).
        out_path: where to write the PNG; missing parent folders are created.
        title: figure title.
        ylabel: y-axis label.
        reference_lines: name -> a number, or values of shape [N].
        logy: use a logarithmic y axis.

    Returns:
        The path written.

    Raises:
        ValueError: if ``steps`` is not [N] with N >= 1, ``curves`` is empty, a curve is not
            [N, B], or a reference line is neither a number nor [N].

    """
    step_array = np.asarray(steps, dtype=np.float64)
    if step_array.ndim != 1 or len(step_array) == 0:
        raise ValueError(
            f"steps must have shape [N] with N >= 1; got shape {list(step_array.shape)}"
        )
    n_points = len(step_array)
    if not curves:
        raise ValueError("curves must hold at least one named curve; got an empty mapping")

    curve_arrays = {}
    for name, values in curves.items():
        curve = np.asarray(values, dtype=np.float64)
        if curve.ndim != 2 or len(curve) != n_points or curve.shape[1] == 0:
            raise ValueError(
                f"curves[{name!r}] must have shape [N, B] = [{n_points}, B] with B >= 1 "
                f"(N from steps); got shape {list(curve.shape)}"
            )
        curve_arrays[name] = curve
    reference_arrays = {}
    for name, values in (reference_lines or {}).items():
        reference = np.asarray(values, dtype=np.float64)
        if reference.shape not in ((), (n_points,)):
            raise ValueError(
                f"reference_lines[{name!r}] must be a number or have shape [N] = [{n_points}] "
                f"(N from steps); got shape {list(reference.shape)}"
            )
        reference_arrays[name] = reference

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for name, curve in curve_arrays.items():
        mean, standard_error = mean_and_standard_error(curve)
        n_streams = curve.shape[1]
        (line,) = axes.plot(
            step_array, mean, label=f"{name} ({n_streams} stream{'s' * (n_streams > 1)})"
        )
        axes.fill_between(
            step_array,
            mean - standard_error,
            mean + standard_error,
            color=line.get_color(),
            alpha=0.25,
            linewidth=0,
        )
    for index, (name, reference) in enumerate(reference_arrays.items(), start=len(curve_arrays)):
        # Continue the colour cycle so a reference line never takes a curve's colour.
        color = f"C{index % 10}"
        if reference.ndim == 0:
            axes.axhline(float(reference), linestyle="--", color=color, label=name)
        else:
            axes.plot(step_array, reference, linestyle="--", color=color, label=name)

    axes.xaxis.set_major_formatter(FuncFormatter(lambda tick, _: format_step_count(tick)))
    if logy:
        axes.set_yscale("log")
    axes.set_xlabel("steps")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(title="mean ± standard error over streams")

    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, format="png")
    return path
