"""Running statistics of the state learner, for logging beside the agent's own metrics.

Per cumulant group (``"reward"``, ``"observation"``, or ``"cumulant"`` for a callable):

* the mean squared TD error ``delta_t = c_t + gamma_t y_t - y_t-1`` of the heads, the error
  the learner descends (no TD error is formed across an episode start or on a skipped step);
* the MSRE, mean squared return error ``(y_t - G_t)^2`` against the exact discounted return
  ``G_t``, computed backward (as ``agentstate.metrics.EpisodeReturnScorer`` does) once an
  episode has *terminated*. A truncated episode's return beyond its end is unknown, so it
  is never scored. To bound the memory, a step is scored only if its episode terminates
  within ``MAX_PENDING_STEPS`` steps after it (up to twice that, depending on when the
  totals are read); the returns of the steps scored are exact either way.

Besides: the RMS of the agent state ``h_t`` over steps, streams and features, and the
learner's own throughput, stream-steps per second of time spent in the wrapper's step.

Everything is kept as running sums (``StatisticsTotals``); a logger subtracts the totals
at the start of its window from the current ones and reads ``summarize``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agentstate.metrics import discounted_returns_backward

MAX_PENDING_STEPS = 1000
"""Steps of a running episode kept for the MSRE (see the module docstring)."""


@dataclass
class StatisticsTotals:
    """Running sums since the statistics were enabled; ``later - earlier`` is a window.

    Attributes:
        stream_steps: steps summed over streams.
        seconds: wall-clock time spent in the wrapper's step.
        td_steps: stream-steps that formed a TD error.
        td_squared_error: ``[K]`` sum of ``delta^2`` per head over those stream-steps.
        scored_steps: stream-steps scored against their return (terminated episodes).
        return_squared_error: ``[K]`` sum of ``(y - G)^2`` per head over those.
        state_squared: sum of ``h^2`` over stream-steps and features.
        state_values: number of terms in ``state_squared``.
    """

    stream_steps: int
    seconds: float
    td_steps: int
    td_squared_error: np.ndarray
    scored_steps: int
    return_squared_error: np.ndarray
    state_squared: float
    state_values: int

    @classmethod
    def zeros(cls, n_cumulants: int) -> StatisticsTotals:
        """Totals before the first step."""
        return cls(0, 0.0, 0, np.zeros(n_cumulants), 0, np.zeros(n_cumulants), 0.0, 0)

    def _combine(self, other: StatisticsTotals, sign: int) -> StatisticsTotals:
        return StatisticsTotals(
            **{
                field.name: getattr(self, field.name) + sign * getattr(other, field.name)
                for field in dataclasses.fields(self)
            }
        )

    def __add__(self, other: StatisticsTotals) -> StatisticsTotals:
        return self._combine(other, 1)

    def __sub__(self, other: StatisticsTotals) -> StatisticsTotals:
        return self._combine(other, -1)


def summarize(totals: StatisticsTotals, groups: Mapping[str, slice]) -> dict[str, float]:
    """Metric name -> value over ``totals`` (a window); a metric with no data is left out.

    Names: ``mean_squared_td_error/<group>``, ``msre/<group>`` (mean over the group's heads
    and the stream-steps counted), ``state_rms`` and ``steps_per_second``.

    Example:
        >>> totals = StatisticsTotals.zeros(2)
        >>> totals.td_steps, totals.td_squared_error = 4, np.array([4.0, 8.0])
        >>> summarize(totals, {"reward": slice(0, 1), "observation": slice(1, 2)})
        {'mean_squared_td_error/reward': 1.0, 'mean_squared_td_error/observation': 2.0}
    """
    metrics: dict[str, float] = {}
    for name, columns in groups.items():
        heads = columns.stop - columns.start
        if totals.td_steps > 0:
            squared = totals.td_squared_error[columns].sum()
            metrics[f"mean_squared_td_error/{name}"] = float(squared / (totals.td_steps * heads))
    for name, columns in groups.items():
        heads = columns.stop - columns.start
        if totals.scored_steps > 0:
            squared = totals.return_squared_error[columns].sum()
            metrics[f"msre/{name}"] = float(squared / (totals.scored_steps * heads))
    if totals.state_values > 0:
        metrics["state_rms"] = math.sqrt(totals.state_squared / totals.state_values)
    if totals.seconds > 0:
        metrics["steps_per_second"] = totals.stream_steps / totals.seconds
    return metrics


class LearnerStatistics:
    """Accumulates the learner's statistics, one ``record`` call per wrapper step.

    A step costs a handful of array operations over all streams and heads. The MSRE's
    returns are computed backward (``agentstate.metrics.discounted_returns_backward``) over
    the buffered steps of all streams and heads at once, when the totals are read or the
    buffer reaches ``2 * MAX_PENDING_STEPS`` steps: no Python loop runs over streams, heads
    or episodes.

    Example:
        >>> statistics = LearnerStatistics(streams=1, n_cumulants=1)
        >>> for cumulant, prediction, discount in [(0.0, 0.5, 0.9), (1.0, 0.0, 0.0)]:
        ...     statistics.record(
        ...         cumulant=np.array([[cumulant]]), discount=np.array([discount]),
        ...         predictions=np.array([[prediction]]), state=np.zeros((1, 2)),
        ...         episode_start=np.array([False]), skipped=np.array([False]),
        ...         terminated=np.array([discount == 0.0]), seconds=0.001)
        >>> totals = statistics.totals()
        >>> totals.td_squared_error, totals.td_steps  # delta = 1 + 0 * 0 - 0.5
        (array([0.25]), 1)
        >>> totals.return_squared_error, totals.scored_steps  # (0.5 - G_0 = 1)^2
        (array([0.25]), 1)
    """

    def __init__(self, streams: int, n_cumulants: int) -> None:
        self.streams = streams
        self.n_cumulants = n_cumulants
        self._totals = StatisticsTotals.zeros(n_cumulants)
        self.restart()

    def restart(self, previous_predictions: np.ndarray | None = None) -> None:
        """Start anew from the current step: no running episode is scored.

        Args:
            previous_predictions: ``[B, K]`` predictions of the last step, from which the
                next step's TD error is formed; None: the next step forms none.
        """
        self._previous = np.zeros((self.streams, self.n_cumulants))
        self._has_previous = np.zeros(self.streams, dtype=bool)
        if previous_predictions is not None:
            self._previous = np.array(previous_predictions, dtype=np.float64)
            self._has_previous[:] = True
        # Steps not yet scored: (predictions [B, K], cumulant [B, K], discount [B, K] that is
        # 0 where an episode is closed, closes an episode [B], closed by termination [B]).
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._first_unscored = np.zeros(self.streams, dtype=np.int64)  # row of each stream

    def totals(self) -> StatisticsTotals:
        """A copy of the running sums, with every episode closed so far scored."""
        self._score_closed_episodes()
        return copy.deepcopy(self._totals)

    def record(
        self,
        *,
        cumulant: np.ndarray,
        discount: np.ndarray,
        predictions: np.ndarray,
        state: np.ndarray,
        episode_start: np.ndarray,
        skipped: np.ndarray,
        terminated: np.ndarray,
        seconds: float,
        continuation: np.ndarray | None = None,
    ) -> None:
        """Add one step of every stream.

        ``predictions`` and ``cumulant`` are kept until scored, not copied: pass arrays that
        nothing changes afterwards.

        Args:
            cumulant: ``[B, K]`` cumulant ``c_t`` the heads learned from at this step.
            discount: discount ``gamma_t`` of the transition into this step: ``[B]``, or
                ``[B, K]`` with a discount per head (then ``continuation`` is needed).
            predictions: ``[B, K]`` predictions ``y_t`` made at this step.
            state: ``[B, n_features]`` agent state ``h_t``.
            episode_start: ``[B]`` bool, the step starts an episode (no TD error).
            skipped: ``[B]`` bool, the step was kept out of learning (non-finite input).
            terminated: ``[B]`` bool, an episode terminated at this step: ``c_t`` is its
                last cumulant and ``discount`` is 0.
            seconds: wall-clock time of the step.
            continuation: ``[B]``, 0 where the transition into this step crosses an episode
                boundary (terminated, truncated or reset), else 1. Default: ``discount``,
                which must then be ``[B]``.
        """
        totals = self._totals
        totals.stream_steps += self.streams
        totals.seconds += seconds
        totals.state_squared += float(np.vdot(state, state))
        totals.state_values += state.size

        # An episode start or a skipped step forms no TD error, and it closes the scored
        # episode (discount 0) unscored; a termination closes it with exact returns.
        unlearned = episode_start | skipped
        counted = self._has_previous & ~unlearned
        if continuation is None:
            if discount.ndim != 1:
                raise ValueError(
                    "a discount per head ([B, K]) needs the streams' continuation ([B]): pass "
                    "continuation="
                )
            continuation = discount
        head_discount = discount[:, None] if discount.ndim == 1 else discount
        td_error = cumulant + head_discount * predictions - self._previous
        totals.td_squared_error += counted @ np.square(td_error)
        totals.td_steps += int(np.count_nonzero(counted))
        self._previous = predictions
        self._has_previous[:] = True
        closes = unlearned | (continuation == 0.0)
        close_discount = np.where(closes[:, None], 0.0, head_discount)
        close_discount = np.broadcast_to(close_discount, predictions.shape)
        self._rows.append((predictions, cumulant, close_discount, closes, terminated & ~unlearned))
        if len(self._rows) >= 2 * MAX_PENDING_STEPS:
            self._score_closed_episodes()

    def _score_closed_episodes(self) -> None:
        """Add the squared return errors of the episodes closed by a termination.

        The step that closes an episode (discount 0) carries its last cumulant and is the
        first step of the next episode; the rows from each stream's last close are kept.
        """
        if not self._rows:
            return
        columns = zip(*self._rows, strict=True)
        predictions, cumulants, discounts, closes, terminations = map(np.stack, columns)
        n_rows = len(discounts)
        returns = discounted_returns_backward(
            cumulants.reshape(n_rows, -1), discounts.reshape(n_rows, -1)
        ).reshape(predictions.shape)
        rows = np.arange(n_rows)[:, None]  # closes: [T, B]
        close_at_or_after = np.minimum.accumulate(np.where(closes, rows, n_rows)[::-1])[::-1]
        next_close = np.vstack([close_at_or_after[1:], np.full((1, self.streams), n_rows)])
        padded = np.vstack([terminations, np.zeros((1, self.streams), dtype=bool)])
        scored = np.take_along_axis(padded, next_close, axis=0)  # False while still open
        scored &= rows >= self._first_unscored
        errors = np.square(predictions - returns)
        self._totals.return_squared_error += np.einsum("tb,tbk->k", scored, errors)
        self._totals.scored_steps += int(scored.sum())

        last_close = np.where(closes.any(axis=0), n_rows - 1 - closes[::-1].argmax(axis=0), 0)
        # Rows of a running episode older than MAX_PENDING_STEPS are dropped unscored.
        first_open = np.maximum.reduce(
            [self._first_unscored, last_close, np.full(self.streams, n_rows - MAX_PENDING_STEPS)]
        )
        kept_from = int(first_open.min())
        del self._rows[:kept_from]
        self._first_unscored = first_open - kept_from
