"""One table from many runs: mean ± standard error over seeds, per grid point.

A *seed* is one independently trained network: each stream of a run with independent
parameters, or a whole run whose streams share one network (its ``msre`` column). Runs whose
configs differ only in ``seed`` are one grid point, and their seeds are pooled.

Per seed, from its logged sliding-MSRE curve:

* final MSRE: the last logged value;
* AUC MSRE: the mean of the logged values, i.e. the area under the learning curve divided by
  its length (log points are equally spaced; NaN points, before a first score, are left out).

Within each *family* of grid points that differ only in their step sizes (``step_size``,
``head_step_size``), the point with the lowest mean AUC MSRE is the best step size: ``best``
in the table, a bold line and legend entry in the plot (families of one point have no best).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from agentstate.checkpoint import atomic_write_bytes
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
    steps: np.ndarray
    """Logged steps, ``[N]``."""
    curves: np.ndarray
    """Sliding MSRE of every seed, ``[N, seeds]``."""
    final_msre: float
    final_msre_se: float
    auc_msre: float
    auc_msre_se: float
    best: bool = False
    """Lowest mean AUC MSRE among the points that differ from it only in step sizes."""

    @property
    def label(self) -> str:
        """``key=value`` of the settings, comma separated."""
        return ",".join(f"{key}={value}" for key, value in self.settings.items())


def aggregate(root: str | os.PathLike[str]) -> list[PointResult]:
    """Every finished run under ``root`` (a ``metrics.csv`` next to a ``config.json``), pooled.

    Raises:
        FileNotFoundError: if ``root`` holds no finished run.
        ValueError: if two runs of one grid point logged different steps.
    """
    points: dict[str, tuple[dict[str, Any], list[Path], np.ndarray, list[np.ndarray]]] = {}
    for metrics_path in sorted(Path(root).rglob("metrics.csv")):
        config_path = metrics_path.with_name("config.json")
        if not config_path.exists():
            continue
        run_config = json.loads(config_path.read_text())["run"]
        steps, seed_curves = read_seed_curves(metrics_path, run_config["independent"])
        point_config = {key: value for key, value in run_config.items() if key != "seed"}
        key = json.dumps(point_config, sort_keys=True)
        if key not in points:
            points[key] = (point_config, [], steps, [])
        _, run_dirs, point_steps, curves = points[key]
        if not np.array_equal(steps, point_steps):
            raise ValueError(
                f"{metrics_path.parent} and {run_dirs[0]} are one grid point but logged "
                "different steps"
            )
        run_dirs.append(metrics_path.parent)
        curves.append(seed_curves)
    if not points:
        raise FileNotFoundError(f"no finished run (metrics.csv with config.json) under {root}")
    settings = _distinguishing_settings([config for config, *_ in points.values()])
    results = [
        _summarise(point_settings, run_dirs, steps, np.concatenate(curves, axis=1))
        for point_settings, (_, run_dirs, steps, curves) in zip(
            settings, points.values(), strict=True
        )
    ]
    results.sort(key=lambda point: [_sort_key(value) for value in point.settings.values()])
    _mark_best_step_sizes(results)
    return results


def read_seed_curves(metrics_path: Path, independent: bool) -> tuple[np.ndarray, np.ndarray]:
    """Logged steps ``[N]`` and one sliding-MSRE curve per seed ``[N, seeds]`` of a run.

    Args:
        metrics_path: a run's ``metrics.csv``.
        independent: the run had one network per stream (each stream is a seed); else its
            streams share one network, whose ``msre`` column is the run's one seed.
    """
    with metrics_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = np.array([int(row["step"]) for row in rows])
    columns = [name for name in rows[0] if name.startswith("msre_") and name[5:].isdigit()]
    columns = columns if independent else ["msre"]
    curves = np.array([[float(row[name]) for name in columns] for row in rows]).reshape(
        len(rows), len(columns)
    )
    return steps, curves


def _summarise(
    settings: dict[str, Any], run_dirs: list[Path], steps: np.ndarray, curves: np.ndarray
) -> PointResult:
    final = curves[-1]
    auc = np.array(
        [np.nanmean(curve) if not np.isnan(curve).all() else np.nan for curve in curves.T]
    )
    final_mean, final_se = mean_and_standard_error(final[None])
    auc_mean, auc_se = mean_and_standard_error(auc[None])
    return PointResult(
        settings,
        run_dirs,
        steps,
        curves,
        float(final_mean[0]),
        float(final_se[0]),
        float(auc_mean[0]),
        float(auc_se[0]),
    )


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
    families: dict[str, list[PointResult]] = {}
    for point in points:
        family = {k: v for k, v in point.settings.items() if k not in STEP_SIZE_SETTINGS}
        families.setdefault(json.dumps(family, sort_keys=True), []).append(point)
    for members in families.values():
        scored = [point for point in members if np.isfinite(point.auc_msre)]
        if len(members) > 1 and scored:
            min(scored, key=lambda point: point.auc_msre).best = True


def write_results_csv(points: Sequence[PointResult], path: Path, root: Path) -> None:
    """One row per grid point: settings, seeds, final and AUC MSRE ± se, best, run folders."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    setting_names = list(points[0].settings)
    writer.writerow(
        [
            *setting_names,
            "seeds",
            "final_msre",
            "final_msre_se",
            "auc_msre",
            "auc_msre_se",
            "best",
            "runs",
        ]
    )
    for point in points:
        writer.writerow(
            [
                *point.settings.values(),
                point.curves.shape[1],
                *(
                    f"{value:.8g}"
                    for value in (
                        point.final_msre,
                        point.final_msre_se,
                        point.auc_msre,
                        point.auc_msre_se,
                    )
                ),
                point.best,
                ";".join(str(run_dir.relative_to(root)) for run_dir in point.run_dirs),
            ]
        )
    atomic_write_bytes(path, text.getvalue().encode())


def format_table(points: Sequence[PointResult]) -> str:
    """The results as an aligned text table, best step sizes starred."""
    header = [*points[0].settings, "seeds", "final MSRE", "AUC MSRE", "best"]
    rows = [
        [
            *(str(value) for value in point.settings.values()),
            str(point.curves.shape[1]),
            f"{point.final_msre:.4g} ± {point.final_msre_se:.2g}",
            f"{point.auc_msre:.4g} ± {point.auc_msre_se:.2g}",
            "*" if point.best else "",
        ]
        for point in points
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def plot_results(points: Sequence[PointResult], path: Path, title: str) -> Path:
    """Learning curves of every grid point, mean ± standard error over seeds.

    Points of one family (same settings but step sizes) share a colour; the best step size
    of each family is drawn bold with a bold legend entry, the others thin.
    """
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.add_subplot()
    family_colours: dict[str, str] = {}
    best_labels = []
    for point in points:
        family = json.dumps(
            {k: v for k, v in point.settings.items() if k not in STEP_SIZE_SETTINGS},
            sort_keys=True,
        )
        colour = family_colours.setdefault(family, f"C{len(family_colours) % 10}")
        mean, standard_error = mean_and_standard_error(point.curves)
        label = f"{point.label} ({point.curves.shape[1]} seeds)"
        if point.best:
            label = f"★ {label}, best step size"
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
    axes.xaxis.set_major_formatter(FuncFormatter(lambda tick, _: format_step_count(tick)))
    axes.set_xlabel("steps")
    axes.set_ylabel("MSRE (sliding mean)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    legend = axes.legend(title="mean ± standard error over seeds", fontsize="small")
    for text in legend.get_texts():
        if text.get_text() in best_labels:
            text.set_fontweight("bold")
    figure.savefig(path, dpi=150, format="png")
    return path
