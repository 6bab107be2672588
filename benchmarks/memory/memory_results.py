"""Aggregate a benchmark folder: results.csv, results.md and curves.png.

Per task and method variant: mean ± standard error over seeds of the final evaluation
return and of the training wall-clock (evaluation excluded), and a grid of per-task learning
curves (mean evaluation return ± s.e. against env steps).
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from memory_harness import (
    BUILTIN_METHODS,
    CONFIG_NAME,
    DONE_NAME,
    FAILED_NAME,
    METRICS_NAME,
    algorithm_class,
)
from memory_tasks import CUE_TASK, popgym_easy_tasks

from agentstate.metrics import mean_and_standard_error
from agentstate.plotting import format_step_count

RESULT_COLUMNS = (
    "task",
    "variant",
    "seeds",
    "eval_return_mean",
    "eval_return_se",
    "train_seconds_mean",
    "train_seconds_se",
    "env_steps",
    "steps_per_second_mean",
)


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (NaN for one seed)."""
    mean, standard_error = mean_and_standard_error(np.asarray(values, dtype=float)[None])
    return float(mean[0]), float(standard_error[0])


def _read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return (
        np.array([int(row["step"]) for row in rows]),
        np.array([float(row["eval_return"]) for row in rows]),
    )


def aggregate(out_dir: str | os.PathLike[str], to: str | os.PathLike[str] | None = None) -> dict:
    """Write ``results.csv``, ``results.md`` and ``curves.png`` for a run folder.

    Per task and method variant: mean +- standard error over seeds of the final evaluation
    return and of the training wall-clock (evaluation excluded). Runs that stopped with an
    error (a ``failed.json``: a diverged learner, say) and runs not finished yet are listed
    apart in ``results.md`` and left out of the figures.

    Args:
        out_dir: the sweep's output folder.
        to: where to write (default: ``out_dir``).

    Returns:
        ``{"rows": [...], "failed": {name: error}, "unfinished": [...], "paths": [...]}``.
    """
    out_root = Path(out_dir)
    target = Path(to) if to is not None else out_root
    target.mkdir(parents=True, exist_ok=True)
    finished: dict[tuple[str, str], list[dict[str, Any]]] = {}
    curves: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    unfinished: list[str] = []
    failed: dict[str, str] = {}
    for folder in sorted(path for path in out_root.iterdir() if (path / CONFIG_NAME).exists()):
        if not (folder / DONE_NAME).exists():
            if (folder / FAILED_NAME).exists():
                failed[folder.name] = json.loads((folder / FAILED_NAME).read_text())["error"]
            else:
                unfinished.append(folder.name)
            continue
        marker = json.loads((folder / DONE_NAME).read_text())
        key = (marker["task"], marker["variant"])
        finished.setdefault(key, []).append(marker)
        curves.setdefault(key, []).append(_read_curve(folder / METRICS_NAME))
    rows: list[dict[str, Any]] = []
    for (task, variant), markers in finished.items():
        returns = _mean_se([marker["eval_return"] for marker in markers])
        seconds = _mean_se([marker["train_seconds"] for marker in markers])
        rows.append(
            {
                "task": task,
                "variant": variant,
                "seeds": len(markers),
                "eval_return_mean": returns[0],
                "eval_return_se": returns[1],
                "train_seconds_mean": seconds[0],
                "train_seconds_se": seconds[1],
                "env_steps": int(np.mean([marker["env_steps"] for marker in markers])),
                "steps_per_second_mean": float(
                    np.mean([marker["steps_per_second"] for marker in markers])
                ),
            }
        )
    tasks = _ordered({row["task"] for row in rows})
    variants = _ordered({row["variant"] for row in rows})
    rows.sort(key=lambda row: (tasks.index(row["task"]), variants.index(row["variant"])))
    with (target / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (target / "results.md").write_text(_markdown(rows, tasks, variants, failed, unfinished))
    _plot(curves, tasks, variants, target / "curves.png")
    return {
        "rows": rows,
        "failed": failed,
        "unfinished": unfinished,
        "paths": [target / "results.csv", target / "results.md", target / "curves.png"],
    }


def merge_into(results_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Put aggregated ``rows`` into the committed tables of ``results_dir``.

    For a suite whose runs span sessions on fresh machines: the cells aggregated from a later
    sweep's runs replace the same (task, variant) cells of ``results_dir/results.csv`` and the
    other cells stay; ``results.md`` is rewritten from the merged rows. ``curves.png`` there
    is left alone (its runs are not here to plot); the later runs' curves are where
    ``aggregate`` wrote them.

    Returns:
        The path of the merged ``results.csv``.

    Raises:
        ValueError: if a later cell has fewer seeds than the committed one it would replace
            (seeds would be lost: copy the earlier run folders into the sweep's folder).
    """
    target = Path(results_dir) / "results.csv"
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: merge into a folder of results")
    with target.open(newline="") as handle:
        kept = {(row["task"], row["variant"]): _typed(row) for row in csv.DictReader(handle)}
    for row in rows:
        earlier = kept.get((row["task"], row["variant"]))
        if earlier is not None and row["seeds"] < earlier["seeds"]:
            raise ValueError(
                f"{row['task']} / {row['variant']}: {row['seeds']} seeds would replace the "
                f"{earlier['seeds']} of {target}; put the earlier runs' folders into the "
                "sweep's folder and aggregate them together"
            )
    kept.update({(row["task"], row["variant"]): dict(row) for row in rows})
    merged = list(kept.values())
    tasks = _ordered({row["task"] for row in merged})
    variants = _ordered({row["variant"] for row in merged})
    merged.sort(key=lambda row: (tasks.index(row["task"]), variants.index(row["variant"])))
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(merged)
    (target.parent / "results.md").write_text(_markdown(merged, tasks, variants, {}, []))
    return target


def _typed(row: Mapping[str, str]) -> dict[str, Any]:
    """A ``results.csv`` row with its numbers as numbers."""
    integers = {"seeds", "env_steps"}
    return {
        key: value if key in ("task", "variant") else (int if key in integers else float)(value)
        for key, value in row.items()
    }


def _ordered(names: set[str]) -> list[str]:
    """Built-in method and task order first (as in the suite), then the rest sorted."""
    order = [*BUILTIN_METHODS, *popgym_easy_tasks(), CUE_TASK]

    def key(name: str) -> tuple[int, str]:
        head = name.split(",")[0]
        return (order.index(head) if head in order else len(order), name)

    return sorted(names, key=key)


def _markdown(
    rows: list[dict[str, Any]],
    tasks: list[str],
    variants: list[str],
    failed: dict[str, str],
    unfinished: list[str],
) -> str:
    cells = {(row["task"], row["variant"]): row for row in rows}

    def table(title: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
        lines = [f"### {title}", "", "| task | " + " | ".join(variants) + " |"]
        lines.append("|---|" + "---:|" * len(variants))
        for task in tasks:
            values = [
                cell(cells[(task, variant)]) if (task, variant) in cells else "–"
                for variant in variants
            ]
            lines.append(f"| {task} | " + " | ".join(values) + " |")
        return [*lines, ""]

    def suite_mean() -> list[str]:
        # The criterion for defaults: each variant's mean return over the tasks that every
        # variant finished (the same tasks for all, so that the means compare).
        # Where some variants ran every task and others not, a second row: the mean over
        # every task, for the variants that have them all.
        shared = [task for task in tasks if all((task, v) in cells for v in variants)]
        if not shared:
            return []
        lines = [mean_row(shared, variants)]
        complete = [v for v in variants if all((task, v) in cells for task in tasks)]
        if len(shared) < len(tasks) and complete:
            lines.append(mean_row(tasks, complete))
        return [*lines, ""]

    def mean_row(over: list[str], having: list[str]) -> str:
        means = [
            f"**{np.mean([cells[(task, v)]['eval_return_mean'] for task in over]):.3f}**"
            if v in having
            else "–"
            for v in variants
        ]
        return f"| **mean over {len(over)} tasks** | " + " | ".join(means) + " |"

    def with_se(mean: float, se: float, digits: int) -> str:
        spread = "" if math.isnan(se) else f" ± {se:.{digits}f}"
        return f"{mean:.{digits}f}{spread}"

    seeds = sorted({row["seeds"] for row in rows})
    lines = [
        "Mean ± standard error over seeds "
        f"({', '.join(map(str, seeds))} per cell); – : not run (see README).",
        "",
        *table(
            "Final evaluation return (deterministic policy)",
            lambda row: with_se(row["eval_return_mean"], row["eval_return_se"], 2),
        )[:-1],
        *suite_mean(),
        *table(
            "Training wall-clock, seconds per run (evaluation excluded)",
            lambda row: with_se(row["train_seconds_mean"], row["train_seconds_se"], 0),
        ),
    ]
    if failed:
        lines += [
            "Runs that stopped with an error (left out):",
            "",
            *[f"- {name}: {error}" for name, error in failed.items()],
            "",
        ]
    if unfinished:
        lines += ["Unfinished runs (left out):", "", *[f"- {name}" for name in unfinished], ""]
    return "\n".join(lines)


def _plot(
    curves: Mapping[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]],
    tasks: list[str],
    variants: list[str],
    path: Path,
) -> None:
    """A grid of per-task learning curves: mean eval return ± s.e. over seeds."""
    columns = min(4, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / columns))
    figure = Figure(figsize=(4 * columns, 3 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    # 20 distinct colours, then the same with another dash: one look per method.
    palette = matplotlib.colormaps["tab20"].colors
    dashes = ("-", "--", ":", "-.")
    looks = {
        variant: (palette[index % 20], dashes[index // 20 % len(dashes)])
        for index, variant in enumerate(variants)
    }
    for axis, task in zip(axes, tasks, strict=False):
        lowest = -1.0
        for variant in variants:
            seeds = curves.get((task, variant))
            if not seeds:
                continue
            steps = functools.reduce(np.intersect1d, [step for step, _ in seeds])
            returns = np.stack([values[np.isin(step, steps)] for step, values in seeds])
            mean = returns.mean(axis=0)
            se = (
                returns.std(axis=0, ddof=1) / math.sqrt(len(seeds))
                if len(seeds) > 1
                else np.zeros_like(mean)
            )
            color, dash = looks[variant]
            axis.plot(steps, mean, color=color, linestyle=dash, label=variant)
            axis.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2)
            lowest = min(lowest, float(np.min(mean - se)))
        # POPGym's returns lie in [-1, 1] but for Battleship's (down to -1.2 here)
        axis.set_ylim(lowest - 0.05, 1.05)
        axis.set_title(task, fontsize=10)
        axis.set_xlabel("env steps")
        axis.set_ylabel("eval return")
        axis.xaxis.set_major_formatter(lambda value, _: format_step_count(value))
    for axis in axes[len(tasks) :]:
        axis.set_visible(False)
    legend: dict[str, Artist] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=columns)
    figure.savefig(path, dpi=110)


def estimate_seconds(folder: str | os.PathLike[str], steps: int) -> tuple[float, str]:
    """Extrapolate a short run's training time to ``steps`` env steps (an estimate).

    DQN's cost per step is constant after its first 100 steps: linear. An on-policy run
    alternates collecting a rollout of ``n_steps x n_envs`` steps and an update on it, so a
    run of ``steps`` costs ``steps // rollout`` measured cycles (rollout + update) plus a
    partial rollout collected at the rate of the first rollout (from a curve row taken
    before the first update; without one, at the whole cycle's rate, an upper bound). The
    measured run must hold whole cycles.

    Returns:
        ``(seconds, how)``, ``how`` saying which rule was used.

    Raises:
        ValueError: an on-policy run that stopped inside a rollout.
    """
    folder = Path(folder)
    marker = json.loads((folder / DONE_NAME).read_text())
    method, measured = marker["method"], marker["env_steps"]
    if method["algorithm"] == "DQN":
        return marker["train_seconds"] * steps / measured, "linear"
    defaults = inspect.signature(algorithm_class(method["algorithm"])).parameters
    n_steps = method["algorithm_kwargs"].get("n_steps", defaults["n_steps"].default)
    rollout = n_steps * method["n_envs"]
    if measured % rollout:
        raise ValueError(f"{folder.name}: {measured} steps is not whole rollouts of {rollout}")
    cycle = marker["train_seconds"] / (measured // rollout)
    with (folder / METRICS_NAME).open() as handle:
        before_update = [row for row in csv.DictReader(handle) if 0 < int(row["step"]) < rollout]
    if before_update:
        row = before_update[-1]
        per_step, how = float(row["train_seconds"]) / int(row["step"]), "cycles + collection"
    else:
        per_step, how = cycle / rollout, "cycles (partial rollout at the cycle's rate)"
    return (steps // rollout) * cycle + (steps % rollout) * per_step, how


def timing_table(out_dir: str | os.PathLike[str], steps: int) -> str:
    """A markdown table of each finished run's training time, extrapolated to ``steps``."""
    lines = [
        f"| task | method | measured steps | measured s | estimated s per {steps:,} steps | rule |",
        "|---|---|---:|---:|---:|---|",
    ]
    for folder in sorted(Path(out_dir).iterdir()):
        if not (folder / DONE_NAME).exists():
            continue
        marker = json.loads((folder / DONE_NAME).read_text())
        seconds, how = estimate_seconds(folder, steps)
        lines.append(
            f"| {marker['task']} | {marker['variant'].split(',')[0]} | {marker['env_steps']:,} "
            f"| {marker['train_seconds']:.1f} | {seconds:,.0f} | {how} |"
        )
    return "\n".join(lines) + "\n"
