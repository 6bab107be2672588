"""One table from many runs: mean ± standard error over seeds, per grid point.

A *seed* is one independently trained network: each stream of a run with independent
parameters, or a whole run whose streams share one network (its ``msre`` and ``msre_zero``
columns). Runs whose configs differ only in ``seed`` are one grid point, and their seeds are
pooled.

Per seed, from its logged sliding-MSRE curve and that of predicting zero on the same stream:

* final ratio: the last logged MSRE divided by the last logged predict-zero MSRE of the same
  seed, a paired ratio that takes out how hard that seed's stream is (1 is no better than
  predicting zero);
* final MSRE: the last logged value;
* AUC MSRE: the mean of the logged values, i.e. the area under the learning curve divided by
  its length (log points are equally spaced; NaN points, before a first score, are left out).

Within each *family* of grid points that differ only in their step sizes (``step_size``,
``head_step_size``), the point with the lowest mean final ratio is the best step size:
``best`` in the table, a bold line and legend entry in the plot (families of one point have
no best). The authors choose step sizes by the final MSRE, the sliding mean over the last
100k steps (our ``msre_window``); the final ratio is that MSRE with each seed's difficulty
divided out, so seeds with loud returns do not decide the choice alone.

A run is *finished* once it has written its ``metrics.csv`` (a sweep then adds ``done.json``).
A run folder with a ``config.json`` but no ``metrics.csv`` yet is *unfinished*: it counts by the
step of its latest ``checkpoint.pt`` (0 before the first). A grid point none of whose runs has
finished is still listed, with NaN figures and its progress (``step N of M``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from agentstate.checkpoint import atomic_write_bytes, saved_step
from agentstate.experiment import CHECKPOINT_NAME
from agentstate.metric_log import msre_ratio
from agentstate.metrics import mean_and_standard_error
from agentstate.plotting import format_step_count

STEP_SIZE_SETTINGS = ("step_size", "head_step_size")
RESULTS_CSV = "results.csv"
RESULTS_PLOT = "learning_curves.png"


@dataclass
class PointResult:
    """The pooled seeds of one grid point and their summary."""

    settings: dict[str, Any]
    """Learner and the settings that tell the points apart (``learner_kwargs.n`` for kwargs)."""
    run_dirs: list[Path]
    """Finished runs, whose seeds are pooled here."""
    steps: np.ndarray
    """Logged steps, ``[N]`` (``N = 0`` while no run of the point has finished)."""
    curves: np.ndarray
    """Sliding MSRE of every seed, ``[N, seeds]``."""
    ratio_curves: np.ndarray
    """Sliding MSRE of every seed ÷ its own predict-zero sliding MSRE, ``[N, seeds]``."""
    final_ratio: float
    final_ratio_se: float
    final_msre: float
    final_msre_se: float
    auc_msre: float
    auc_msre_se: float
    steps_per_run: int
    """Steps each run of the point takes (``run.steps`` of its config)."""
    unfinished: dict[Path, int] = field(default_factory=dict)
    """Runs without ``metrics.csv`` yet -> step of their latest checkpoint (0 before one)."""
    best: bool = False
    """Lowest mean final ratio among the points that differ from it only in step sizes."""

    @property
    def label(self) -> str:
        """``key=value`` of the settings, comma separated."""
        return ",".join(f"{key}={value}" for key, value in self.settings.items())

    def short_label(self, keys: Sequence[str] | None = None) -> str:
        """The label for a legend: ``keys`` of the settings (default: those not None).

        None reads ``default``. Keyword tables' names are dropped: ``n_features=7``, not
        ``learner_kwargs.n_features=7``.
        """
        if keys is None:
            keys = [key for key, value in self.settings.items() if value is not None]
        shown = {key: self.settings[key] for key in keys}
        return ", ".join(
            f"{key.rsplit('.', 1)[-1]}={'default' if value is None else value}"
            for key, value in shown.items()
        )

    @property
    def seeds(self) -> int:
        """Seeds pooled in the figures (those of finished runs)."""
        return int(self.curves.shape[1])

    @property
    def progress(self) -> str:
        """``done``, or ``step N of M`` of the least advanced unfinished run.

        A point with finished runs besides says how many first: ``1 of 3 runs done, step N of
        M``.
        """
        if not self.unfinished:
            return "done"
        slowest = f"step {min(self.unfinished.values()):,} of {self.steps_per_run:,}"
        if not self.run_dirs:
            return slowest
        runs = len(self.run_dirs) + len(self.unfinished)
        return f"{len(self.run_dirs)} of {runs} runs done, {slowest}"


@dataclass
class _PointRuns:
    """The runs of one grid point, as they are found."""

    config: dict[str, Any]
    """The run config without ``seed``."""
    run_dirs: list[Path] = field(default_factory=list)
    """Its finished runs."""
    steps: np.ndarray | None = None
    """Logged steps of its finished runs, ``[N]``; None before the first."""
    msre: list[np.ndarray] = field(default_factory=list)
    """Per finished run, ``[N, its seeds]``."""
    msre_zero: list[np.ndarray] = field(default_factory=list)
    """Per finished run, ``[N, its seeds]``."""
    unfinished: dict[Path, int] = field(default_factory=dict)
    """Its runs without ``metrics.csv`` -> step of their latest checkpoint (0 before one)."""


def aggregate(root: str | os.PathLike[str]) -> list[PointResult]:
    """Every run under ``root`` (a folder with a run's ``config.json``), pooled per grid point.

    Finished runs (with ``metrics.csv``) give the figures; unfinished ones are listed by their
    checkpoint's step (module docstring). A ``config.json`` without a ``run`` table is not a
    run's and is passed over.

    Raises:
        FileNotFoundError: if ``root`` holds no run.
        ValueError: if two finished runs of one grid point logged different steps.
    """
    points: dict[str, _PointRuns] = {}
    for config_path in sorted(Path(root).rglob("config.json")):
        run_config = json.loads(config_path.read_text()).get("run")
        if not isinstance(run_config, dict):
            continue
        point_config = {key: value for key, value in run_config.items() if key != "seed"}
        point = points.setdefault(
            json.dumps(point_config, sort_keys=True), _PointRuns(point_config)
        )
        run_dir = config_path.parent
        metrics_path = run_dir / "metrics.csv"
        if not metrics_path.exists():
            point.unfinished[run_dir] = saved_step(run_dir / CHECKPOINT_NAME) or 0
            continue
        steps, msre, msre_zero = read_seed_curves(metrics_path, run_config["independent"])
        if point.steps is None:
            point.steps = steps
        elif not np.array_equal(steps, point.steps):
            raise ValueError(
                f"{run_dir} and {point.run_dirs[0]} are one grid point but logged different steps"
            )
        point.run_dirs.append(run_dir)
        point.msre.append(msre)
        point.msre_zero.append(msre_zero)
    if not points:
        raise FileNotFoundError(f"no run (a config.json with a run table) under {root}")
    settings = _distinguishing_settings([point.config for point in points.values()])
    results = [
        _summarise(point_settings, point)
        for point_settings, point in zip(settings, points.values(), strict=True)
    ]
    results.sort(key=lambda point: [_sort_key(value) for value in point.settings.values()])
    _mark_best_step_sizes(results)
    return results


def read_seed_curves(
    metrics_path: Path, independent: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logged steps ``[N]``, and per seed the sliding MSRE and predict-zero MSRE of a run.

    A ``metrics.csv`` from before the per-stream predict-zero columns (``msre_zero_<b>``)
    gives every stream the mean over streams, ``msre_zero``.

    Args:
        metrics_path: a run's ``metrics.csv``.
        independent: the run had one network per stream (each stream is a seed); else its
            streams share one network, whose ``msre`` and ``msre_zero`` columns are the run's
            one seed.

    Returns:
        ``(steps, msre, msre_zero)``: ``[N]``, ``[N, seeds]`` and ``[N, seeds]``.
    """
    with metrics_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = np.array([int(row["step"]) for row in rows])
    if independent:
        streams = [name[5:] for name in rows[0] if name.startswith("msre_") and name[5:].isdigit()]
        msre_columns = [f"msre_{b}" for b in streams]
        zero_columns = [
            f"msre_zero_{b}" if f"msre_zero_{b}" in rows[0] else "msre_zero" for b in streams
        ]
    else:
        msre_columns, zero_columns = ["msre"], ["msre_zero"]
    return steps, _read_columns(rows, msre_columns), _read_columns(rows, zero_columns)


def _read_columns(rows: list[dict[str, str]], names: list[str]) -> np.ndarray:
    """The named columns of CSV rows as floats, ``[rows, names]``."""
    return np.array([[float(row[name]) for name in names] for row in rows]).reshape(
        len(rows), len(names)
    )


def _summarise(settings: dict[str, Any], point: _PointRuns) -> PointResult:
    if point.steps is None:
        steps = np.zeros(0, dtype=np.int64)
        curves = ratio_curves = np.zeros((0, 0))
    else:
        steps = point.steps
        curves = np.concatenate(point.msre, axis=1)
        ratio_curves = msre_ratio(curves, np.concatenate(point.msre_zero, axis=1))
    auc = np.array(
        [np.nanmean(curve) if not np.isnan(curve).all() else np.nan for curve in curves.T]
    )
    final_ratio = _mean_and_standard_error(_final_values(ratio_curves))
    final_msre = _mean_and_standard_error(_final_values(curves))
    auc_msre = _mean_and_standard_error(auc)
    return PointResult(
        settings,
        point.run_dirs,
        steps,
        curves,
        ratio_curves,
        *final_ratio,
        *final_msre,
        *auc_msre,
        steps_per_run=int(point.config["steps"]),
        unfinished=point.unfinished,
    )


def _final_values(curves: np.ndarray) -> np.ndarray:
    """The last logged value of each seed, ``[seeds]`` (empty for no seeds)."""
    return curves[-1] if len(curves) else np.zeros(curves.shape[1])


def _mean_and_standard_error(per_seed: np.ndarray) -> tuple[float, float]:
    """Mean of per-seed values ``[seeds]`` and its standard error (NaN below two seeds)."""
    mean, standard_error = mean_and_standard_error(per_seed[None])
    return float(mean[0]), float(standard_error[0])


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """Run config with keyword-argument tables as dotted keys (``learner_kwargs.n``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def _distinguishing_settings(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each config, its learner and the settings not the same in every config."""
    flat = [_flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for config in flat for key in config))
    varying = [key for key in keys if len({json.dumps(c.get(key)) for c in flat}) > 1]
    shown = ["learner", *(key for key in varying if key != "learner")]
    return [{key: config.get(key) for key in shown} for config in flat]


def _sort_key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _mark_best_step_sizes(points: list[PointResult]) -> None:
    """Mark the lowest mean final ratio of each family, among its points with figures."""
    families: dict[str, list[PointResult]] = {}
    for point in points:
        families.setdefault(_family(point), []).append(point)
    for members in families.values():
        scored = [point for point in members if np.isfinite(point.final_ratio)]
        if len(members) > 1 and scored:
            min(scored, key=lambda point: point.final_ratio).best = True


def _family(point: PointResult) -> str:
    """The point's settings but its step sizes, as a key."""
    return json.dumps(
        {key: value for key, value in point.settings.items() if key not in STEP_SIZE_SETTINGS},
        sort_keys=True,
    )


RATIO_AXIS_TOP = 2.0
"""The plot's ratio axis stops here (twice predict-zero's error) when a curve goes higher."""


def _legend_labels(points: Sequence[PointResult], width: int = 110) -> dict[int, str]:
    """Each point's legend entry by ``id``: ``short_label (N seeds)``, wrapped at ``width``.

    Starred for a family's best step size. A setting None at every point of a learner does not
    apply to it (``truncation`` of a columnar learner) and is left out; None where another
    point of the learner sets it means the default and reads ``default``.
    """
    applicable: dict[Any, list[str]] = {}
    for point in points:
        keys = applicable.setdefault(point.settings.get("learner"), [])
        keys += [k for k, v in point.settings.items() if v is not None and k not in keys]
    labels = {}
    for point in points:
        keys = applicable[point.settings.get("learner")]
        shown = [key for key in point.settings if key in keys]
        label = f"{point.short_label(shown)} ({point.seeds} seeds)"
        if point.best:
            label = f"★ {label}, best step size"
        labels[id(point)] = textwrap.fill(label, width=width, subsequent_indent="    ")
    return labels


def write_results_csv(points: Sequence[PointResult], path: Path, root: Path) -> None:
    """One row per grid point: settings, seeds, figures ± se, best, progress, run folders.

    The figures are the final ratio, final MSRE and AUC MSRE; the run folders, relative to
    ``root`` and ``;``-separated, are the finished and the unfinished ones.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    setting_names = list(points[0].settings)
    writer.writerow(
        [
            *setting_names,
            "seeds",
            "final_ratio",
            "final_ratio_se",
            "final_msre",
            "final_msre_se",
            "auc_msre",
            "auc_msre_se",
            "best",
            "progress",
            "runs",
        ]
    )
    for point in points:
        run_dirs = sorted([*point.run_dirs, *point.unfinished])
        writer.writerow(
            [
                *point.settings.values(),
                point.seeds,
                *(
                    f"{value:.8g}"
                    for value in (
                        point.final_ratio,
                        point.final_ratio_se,
                        point.final_msre,
                        point.final_msre_se,
                        point.auc_msre,
                        point.auc_msre_se,
                    )
                ),
                point.best,
                point.progress,
                ";".join(str(run_dir.relative_to(root)) for run_dir in run_dirs),
            ]
        )
    atomic_write_bytes(path, text.getvalue().encode())


def format_table(points: Sequence[PointResult]) -> str:
    """The results as an aligned text table, best step sizes starred, with progress."""
    header = [
        *points[0].settings,
        "seeds",
        "final ratio",
        "final MSRE",
        "AUC MSRE",
        "best",
        "progress",
    ]
    rows = [
        [
            *(str(value) for value in point.settings.values()),
            str(point.seeds),
            f"{point.final_ratio:.4g} ± {point.final_ratio_se:.2g}",
            f"{point.final_msre:.4g} ± {point.final_msre_se:.2g}",
            f"{point.auc_msre:.4g} ± {point.auc_msre_se:.2g}",
            "*" if point.best else "",
            point.progress,
        ]
        for point in points
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def plot_results(points: Sequence[PointResult], path: Path, title: str) -> Path:
    """Write ``results_figure`` to ``path`` (PNG)."""
    results_figure(points, title).savefig(path, dpi=150, format="png")
    return path


def results_figure(points: Sequence[PointResult], title: str) -> Figure:
    """Each seed's MSRE ÷ its own predict-zero MSRE, mean ± standard error over seeds.

    One curve per grid point with finished runs, over a dashed line at 1 (predicting zero).
    Points of one family (same settings but step sizes) share a colour; the best step size
    of each family is drawn bold with a bold legend entry, the others thin. The legend sits
    under the axes; the axis stops at ``RATIO_AXIS_TOP`` when a curve goes higher.
    """
    drawn = [point for point in points if point.seeds > 0]
    labels = _legend_labels(drawn)
    legend_lines = 2 + sum(label.count("\n") + 1 for label in labels.values())
    # The legend sits under the axes, so that long labels never squeeze the plot.
    figure = Figure(figsize=(9, 5.0 + 0.19 * legend_lines), layout="constrained")
    axes = figure.add_subplot()
    family_colours: dict[str, str] = {}
    best_labels = []
    for point in points:
        colour = family_colours.setdefault(_family(point), f"C{len(family_colours) % 10}")
        if point.seeds == 0:
            continue
        mean, standard_error = mean_and_standard_error(point.ratio_curves)
        label = labels[id(point)]
        if point.best:
            best_labels.append(label)
        axes.plot(
            point.steps,
            mean,
            color=colour,
            linewidth=2.5 if point.best else 1.0,
            alpha=1.0 if point.best else 0.6,
            label=label,
        )
        axes.fill_between(
            point.steps,
            mean - standard_error,
            mean + standard_error,
            color=colour,
            alpha=0.25 if point.best else 0.1,
            linewidth=0,
        )
    axes.axhline(1.0, linestyle="--", color="black", linewidth=1.0, label="predict zero")
    highest = max((float(np.nanmax(mean_and_standard_error(p.ratio_curves)[0])) for p in drawn),
                  default=1.0)  # fmt: skip
    if highest > RATIO_AXIS_TOP:  # a diverging spell would flatten every other curve
        axes.set_ylim(0.0, RATIO_AXIS_TOP)
        axes.text(0.99, 0.98, f"axis cut at {RATIO_AXIS_TOP:g}: a curve reaches {highest:.3g}",
                  transform=axes.transAxes, ha="right", va="top", fontsize="small")  # fmt: skip
    axes.xaxis.set_major_formatter(FuncFormatter(lambda tick, _: format_step_count(tick)))
    axes.set_xlabel("steps")
    axes.set_ylabel("MSRE ÷ the same seed's predict-zero MSRE (sliding means)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    legend = figure.legend(
        loc="outside lower center", title="mean ± standard error over seeds", fontsize="small"
    )
    for text in legend.get_texts():
        if text.get_text() in best_labels:
            text.set_fontweight("bold")
    return figure
