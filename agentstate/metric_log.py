"""The metric log of a prediction run: sliding MSRE per stream and predictor, and its CSV.

Predictors are scored by name: ``learner`` (the TD prediction), ``zero`` (predicting 0) and a
source's reference predictors (e.g. ``mean_reward``). Every-step scoring (exact targets)
updates all streams at once; episodic scoring folds in one stream's finished episode at a
time, so it keeps one sliding mean per stream and predictor.

``metrics.csv`` columns: ``step``; the learner's mean MSRE over streams ``msre`` and its
standard error ``msre_se``; ``msre_zero``; ``msre_ratio`` and ``msre_ratio_se`` (each stream's
MSRE over its own predict-zero MSRE, mean and standard error over streams); ``msre_<ref>``
per reference; then per stream ``msre_<b>``, ``msre_zero_<b>`` and ``msre_<ref>_<b>``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agentstate.checkpoint import atomic_write_bytes
from agentstate.metrics import ScoredEpisode, SlidingMean, mean_and_standard_error


def msre_ratio(msre: np.ndarray, msre_zero: np.ndarray) -> np.ndarray:
    """Each stream's MSRE divided by its own predict-zero MSRE (NaN where that is 0 or NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(msre_zero > 0, msre / msre_zero, np.nan)


def column(name: str) -> str:
    """The CSV column of predictor ``name``: ``msre`` for the learner, ``msre_<name>`` else."""
    return "msre" if name == "learner" else f"msre_{name}"


def stream_mean(values: np.ndarray) -> float:
    """Mean over streams, ignoring streams with nothing scored yet (NaN if none has)."""
    return float(mean_and_standard_error(values[None])[0][0])


class MetricLog:
    """Sliding MSRE of each predictor and stream, sampled at log points.

    Args:
        streams: number of streams B.
        window: steps (scored steps, for episodic scoring) in each sliding mean.
        names: the predictors, ``learner`` and ``zero`` first.
        episodic: scored by whole episodes (one sliding mean per stream) rather than every
            step.
    """

    def __init__(
        self, streams: int, window: int, names: Sequence[str], *, episodic: bool = False
    ) -> None:
        if tuple(names[:2]) != ("learner", "zero"):
            raise ValueError(f"predictor names must start with learner, zero; got {names}")
        self.streams = streams
        self.names = tuple(names)
        self.episodic = episodic
        if episodic:
            self.by_stream = {name: [SlidingMean(window) for _ in range(streams)] for name in names}
        else:
            self.all_streams = {name: SlidingMean(window, streams) for name in names}
        self.steps: list[int] = []
        self.rows: list[dict[str, np.ndarray]] = []

    def update_many(self, squared_errors: dict[str, np.ndarray]) -> None:
        """Every-step scoring: fold in n steps' squared errors ``[n, B]``, oldest first.

        The same, bit for bit, as folding them in one step at a time.
        """
        for name, errors in squared_errors.items():
            self.all_streams[name].update_many(errors)

    def add(self, episode: ScoredEpisode) -> None:
        """Episodic scoring: fold in the squared errors of one finished episode."""
        for name, errors in episode.squared_errors.items():
            self.by_stream[name][episode.stream].update_many(errors)

    def values(self) -> dict[str, np.ndarray]:
        """Current sliding MSRE of every predictor, ``[B]`` each (NaN before a first score)."""
        if self.episodic:
            return {
                name: np.array([float(mean.value) for mean in means])
                for name, means in self.by_stream.items()
            }
        return {name: mean.value.copy() for name, mean in self.all_streams.items()}

    def record(self, step: int) -> None:
        """Keep the current values as the row of ``step``."""
        self.steps.append(step)
        self.rows.append(self.values())

    def curve(self, name: str) -> np.ndarray:
        """The recorded MSRE of a predictor, ``[N, B]``."""
        return np.stack([row[name] for row in self.rows]).reshape(-1, self.streams)

    def _sliding_means(self) -> list[SlidingMean]:
        if self.episodic:
            return [mean for name in self.names for mean in self.by_stream[name]]
        return [self.all_streams[name] for name in self.names]

    def state_dict(self) -> dict[str, Any]:
        """Sliding means and logged rows, for checkpoints."""
        return {
            "sliding_means": [mean.state_dict() for mean in self._sliding_means()],
            "steps": list(self.steps),
            **{name: self.curve(name) for name in self.names},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; everything is checked before anything is replaced."""
        means = self._sliding_means()
        for mean, saved in zip(means, state["sliding_means"], strict=True):
            SlidingMean(mean.window, mean.shape).load_state_dict(saved)  # raises if it differs
        curves = {
            name: np.asarray(state[name], dtype=np.float64).reshape(-1, self.streams)
            for name in self.names
        }
        steps = [int(step) for step in state["steps"]]
        if any(len(curve) != len(steps) for curve in curves.values()):
            raise ValueError("the saved metric log's rows and steps differ in number")
        for mean, saved in zip(means, state["sliding_means"], strict=True):
            mean.load_state_dict(saved)
        self.steps = steps
        self.rows = [
            {name: curves[name][i].copy() for name in self.names} for i in range(len(steps))
        ]

    def write_csv(self, path: Path) -> None:
        """Write the logged rows as ``metrics.csv`` (atomically; columns in the docstring)."""
        references = self.names[2:]
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(
            ["step", "msre", "msre_se", "msre_zero", "msre_ratio", "msre_ratio_se"]
            + [column(name) for name in references]
            + [f"{column(name)}_{b}" for name in self.names for b in range(self.streams)]
        )
        for step, row in zip(self.steps, self.rows, strict=True):
            learner, zero = row["learner"], row["zero"]
            mean, standard_error = mean_and_standard_error(learner[None])
            ratio, ratio_error = mean_and_standard_error(msre_ratio(learner, zero)[None])
            means = [mean[0], standard_error[0], stream_mean(zero), ratio[0], ratio_error[0]]
            means += [stream_mean(row[name]) for name in references]
            per_stream = [value for name in self.names for value in row[name]]
            writer.writerow([step] + [f"{value:.8g}" for value in means + per_stream])
        atomic_write_bytes(path, text.getvalue().encode())
