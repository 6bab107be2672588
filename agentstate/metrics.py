"""Evaluation metrics for prediction streams.

Returns computed backward, squared return errors scored at episode ends, exact sliding means,
and the mean ± standard error over streams that learning curves report.

Time convention, shared with the TD engine: at step t a stream delivers the cumulant c_t
(received on arriving at step t) and the discount γ_t (the continuation from step t-1 to
step t, 0 across a reset). The prediction made at step t estimates the return

    G_t = c_{t+1} + γ_{t+1} G_{t+1}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "EpisodeReturnScorer",
    "ScoredEpisode",
    "SlidingMean",
    "discounted_returns_backward",
    "mean_and_standard_error",
]


def _shape_text(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _float64_array(name: str, values: ArrayLike, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Return ``values`` as float64, or raise ValueError naming ``name`` and both shapes."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != expected_shape:
        raise ValueError(
            f"{name} must have shape {_shape_text(expected_shape)}; "
            f"got shape {_shape_text(array.shape)}"
        )
    return array


def _check_discounts(name: str, discounts: np.ndarray) -> None:
    if not np.all((discounts >= 0.0) & (discounts <= 1.0)):
        bad = discounts[~((discounts >= 0.0) & (discounts <= 1.0))]
        raise ValueError(f"{name} must lie in [0, 1]; got values such as {bad[0]!r}")


def discounted_returns_backward(cumulants: ArrayLike, discounts: ArrayLike) -> np.ndarray:
    r"""Discounted returns G_t = c_{t+1} + γ_{t+1} G_{t+1}, computed backward in time.

    Index t of both arrays is step t of the stream: ``cumulants[t]`` is c_t, received on
    arriving at step t, and ``discounts[t]`` is γ_t, the continuation from step t-1 to step t
    (0 where step t starts a new episode). The prediction made at step t is for G_t, so the
    cumulant that arrives *with* a reset step still counts (it ends the previous episode) and
    only what comes after it is cut. ``cumulants[0]`` and ``discounts[0]`` are never used.

    Nothing is known after the last step, so the last return is 0 (G_{T-1} = 0), and the
    returns of the steps before it are truncated at the end of the data unless a discount of
    0 (an episode end) lies between them and the end. Returns are exact wherever a 0 discount
    follows before the end, which is why :class:`EpisodeReturnScorer` scores episodes only
    once they have ended.

    Example:
        Steps 0-2 form one episode and step 3 starts the next (γ_3 = 0)::

            G_4 = 0                      (last step: no future known)
            G_3 = c_4 + γ_4 G_4 = 4
            G_2 = c_3 + γ_3 G_3 = 2      (γ_3 = 0: the next episode's 4 is cut)
            G_1 = c_2 + γ_2 G_2 = 1 + 0.5 * 2 = 2
            G_0 = c_1 + γ_1 G_1 = 0 + 0.5 * 2 = 1

        >>> import numpy as np
        >>> discounted_returns_backward(
        ...     cumulants=np.array([0.0, 0.0, 1.0, 2.0, 4.0]),
        ...     discounts=np.array([1.0, 0.5, 0.5, 0.0, 0.5]),
        ... )
        array([1., 2., 2., 4., 0.])

    Args:
        cumulants: c_t, shape [T] or [T, B] (time first; B independent streams).
        discounts: γ_t in [0, 1], the same shape as ``cumulants``.

    Returns:
        G_t as float64, the same shape as ``cumulants``.

    Raises:
        ValueError: if the shapes are not [T] or [T, B], differ, or a discount is outside
            [0, 1].

    """
    cumulant_array = np.asarray(cumulants, dtype=np.float64)
    if cumulant_array.ndim not in (1, 2):
        raise ValueError(
            "cumulants must have shape [T] or [T, B]; "
            f"got shape {_shape_text(cumulant_array.shape)}"
        )
    discount_array = _float64_array("discounts", discounts, cumulant_array.shape)
    _check_discounts("discounts", discount_array)

    returns = np.zeros_like(cumulant_array)
    for t in range(len(returns) - 2, -1, -1):
        returns[t] = cumulant_array[t + 1] + discount_array[t + 1] * returns[t + 1]
    return returns


@dataclass(frozen=True)
class ScoredEpisode:
    """The squared return errors of one finished episode of one stream.

    Attributes:
        stream: index of the stream the episode belongs to.
        first_step: global step index (counting :meth:`EpisodeReturnScorer.update` calls
            from 0) of the episode's first step.
        returns: G_t for each step of the episode, shape [n_steps].
        squared_errors: predictor name -> (prediction_t - G_t)², shape [n_steps] each.

    """

    stream: int
    first_step: int
    returns: np.ndarray
    squared_errors: dict[str, np.ndarray]

    @property
    def n_steps(self) -> int:
        """Number of steps in the episode."""
        return len(self.returns)


class EpisodeReturnScorer:
    """Scores predictions against the exact discounted return, one finished episode at a time.

    For each of B streams it buffers the predictions, cumulants and discounts of the current
    episode. An episode ends where a discount is 0: the same signal the TD engine uses, so the
    scorer and the learner always agree on where returns are cut, and the returns of every
    buffered step are then exact (see :func:`discounted_returns_backward`). At that step the
    returns of the finished episode are computed backward and each named predictor is scored
    by its squared error at every step of it.

    The step that arrives with γ_t = 0 completes the previous episode (its cumulant c_t is
    the last reward of that episode) and is the first step of the next one. Steps of an
    episode still running when the stream stops are never scored: their returns are unknown.
    Memory holds the steps of the episodes still running, so it is bounded by a small
    multiple of the longest episode (times B); a stream whose discount never reaches 0 is
    never scored.

    Example:
        One stream, two predictors, γ = 0.5, and a reset at step 3:

        >>> scorer = EpisodeReturnScorer(n_streams=1, predictor_names=["learner", "zero"])
        >>> stream = [  # (prediction, cumulant c_t, discount γ_t) at steps 0..3
        ...     (1.0, 0.0, 1.0), (2.0, 0.0, 0.5), (1.5, 1.0, 0.5), (0.0, 2.0, 0.0)]
        >>> for prediction, cumulant, discount in stream:
        ...     finished = scorer.update(
        ...         {"learner": [prediction], "zero": [0.0]}, [cumulant], [discount])
        >>> [episode.returns.tolist() for episode in finished]
        [[1.0, 2.0, 2.0]]
        >>> finished[0].squared_errors["learner"].tolist()
        [0.0, 0.0, 0.25]
        >>> finished[0].squared_errors["zero"].tolist()
        [1.0, 4.0, 4.0]

        Feed the errors to a sliding mean per stream to get the MSRE learning curve:
        ``msre[episode.stream].update_many(episode.squared_errors["learner"])``.

    Args:
        n_streams: number of streams B.
        predictor_names: names of the predictors scored together, e.g. the learner,
            predict-zero and a running mean of the cumulant.

    """

    _initial_capacity = 1024

    def __init__(self, n_streams: int, predictor_names: Sequence[str]) -> None:
        if n_streams < 1:
            raise ValueError(f"n_streams must be at least 1; got {n_streams}")
        if len(predictor_names) == 0 or len(set(predictor_names)) != len(predictor_names):
            raise ValueError(
                f"predictor_names must be non-empty and distinct; got {list(predictor_names)}"
            )
        self.n_streams = n_streams
        self.predictor_names = tuple(predictor_names)
        # Rows are global steps [row_offset, step); a time-major buffer keeps writes vectorised
        # over streams while each stream's episode starts at its own row.
        self._prediction_rows = np.empty(
            (self._initial_capacity, len(self.predictor_names), n_streams)
        )
        self._cumulant_rows = np.empty((self._initial_capacity, n_streams))
        self._discount_rows = np.empty((self._initial_capacity, n_streams))
        self._row_offset = 0
        self._step = 0
        self._episode_start_step = np.zeros(n_streams, dtype=np.int64)

    @property
    def step_count(self) -> int:
        """Number of steps seen, i.e. calls to :meth:`update`."""
        return self._step

    @property
    def pending_steps(self) -> np.ndarray:
        """Steps buffered in the running episode of each stream, shape [B]."""
        return self._step - self._episode_start_step

    def update(
        self,
        predictions: Mapping[str, ArrayLike],
        cumulants: ArrayLike,
        discounts: ArrayLike,
    ) -> list[ScoredEpisode]:
        """Add step t and score every episode that it ends.

        Args:
            predictions: predictor name -> its prediction made at step t, shape [B] each;
                the keys must be ``predictor_names``.
            cumulants: c_t, shape [B].
            discounts: γ_t in [0, 1], shape [B]; 0 ends the stream's running episode.

        Returns:
            The episodes finished at this step, in stream order (empty for most steps).

        Raises:
            ValueError: if a key is missing or extra, a shape is not [B], or a discount is
                outside [0, 1].

        """
        if set(predictions) != set(self.predictor_names):
            raise ValueError(
                f"predictions must have keys {sorted(self.predictor_names)}; "
                f"got {sorted(predictions)}"
            )
        expected = (self.n_streams,)
        prediction_row = np.stack(
            [
                _float64_array(f"predictions[{name!r}]", predictions[name], expected)
                for name in self.predictor_names
            ]
        )
        cumulant_row = _float64_array("cumulants", cumulants, expected)
        discount_row = _float64_array("discounts", discounts, expected)
        _check_discounts("discounts", discount_row)

        if self._step - self._row_offset == len(self._cumulant_rows):
            self._make_room()
        row = self._step - self._row_offset
        self._prediction_rows[row] = prediction_row
        self._cumulant_rows[row] = cumulant_row
        self._discount_rows[row] = discount_row

        episode_ends = discount_row == 0.0
        finished = [
            self._score_episode(int(stream))
            for stream in np.flatnonzero(episode_ends & (self.pending_steps > 0))
        ]
        self._episode_start_step[episode_ends] = self._step
        self._step += 1
        return finished

    def _score_episode(self, stream: int) -> ScoredEpisode:
        """Score stream's episode from its start up to (not including) the current step."""
        first_row = int(self._episode_start_step[stream]) - self._row_offset
        current_row = self._step - self._row_offset
        # The current step's cumulant and 0 discount close the episode: G of its last step is c_t.
        returns = discounted_returns_backward(
            self._cumulant_rows[first_row : current_row + 1, stream],
            self._discount_rows[first_row : current_row + 1, stream],
        )[:-1]
        episode_predictions = self._prediction_rows[first_row:current_row, :, stream]
        squared_errors = {
            name: (episode_predictions[:, index] - returns) ** 2
            for index, name in enumerate(self.predictor_names)
        }
        return ScoredEpisode(
            stream=stream,
            first_step=first_row + self._row_offset,
            returns=returns,
            squared_errors=squared_errors,
        )

    def _make_room(self) -> None:
        """Drop rows no running episode needs; double the capacity if still half full."""
        first_needed_row = int(self._episode_start_step.min()) - self._row_offset
        n_kept = self._step - self._row_offset - first_needed_row
        capacity = len(self._cumulant_rows)
        if n_kept >= capacity // 2:
            capacity *= 2
        buffers = []
        for rows in (self._prediction_rows, self._cumulant_rows, self._discount_rows):
            resized = np.empty((capacity, *rows.shape[1:]))
            resized[:n_kept] = rows[first_needed_row : first_needed_row + n_kept]
            buffers.append(resized)
        self._prediction_rows, self._cumulant_rows, self._discount_rows = buffers
        self._row_offset += first_needed_row


class SlidingMean:
    """Exact mean of the last ``window`` values, vectorised over a trailing shape.

    A ring buffer holds the last ``window`` values and a running sum gives the mean in O(1)
    per value. The running sum is recomputed from the buffer (pairwise summation) after every
    ``window`` values, so rounding error from adding and removing values cannot accumulate
    beyond one window, however long the stream (the cost stays O(1) per value, amortised).

    Example:
        >>> mean = SlidingMean(window=3)
        >>> for value in [1.0, 2.0, 3.0, 10.0]:
        ...     mean.update(value)
        >>> float(mean.value), mean.count
        (5.0, 3)
        >>> per_stream = SlidingMean(window=2, shape=(2,))
        >>> per_stream.update_many([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
        >>> per_stream.value.tolist()
        [3.0, 30.0]

        A checkpoint restores the mean exactly mid-stream:

        >>> restored = SlidingMean(window=3)
        >>> restored.load_state_dict(mean.state_dict())
        >>> for sliding_mean in (mean, restored):
        ...     sliding_mean.update(4.0)
        >>> float(restored.value) == float(mean.value) == 17 / 3
        True

    Args:
        window: number of most recent values averaged.
        shape: shape of one value, e.g. ``(B,)`` for one mean per stream; ``()`` for scalars.

    """

    def __init__(self, window: int, shape: int | tuple[int, ...] = ()) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1; got {window}")
        self.window = int(window)
        self.shape = tuple(int(size) for size in np.ravel(shape))
        self._ring = np.zeros((self.window, *self.shape))
        self._window_sum = np.zeros(self.shape)
        self._next_slot = 0
        self._n_seen = 0
        self._updates_since_recompute = 0

    @property
    def count(self) -> int:
        """Number of values the mean is over: min(values seen, window)."""
        return min(self._n_seen, self.window)

    @property
    def value(self) -> np.ndarray:
        """Mean of the last ``count`` values, shape ``shape``; NaN before any value."""
        if self._n_seen == 0:
            return np.full(self.shape, np.nan)
        return self._window_sum / self.count

    def update(self, values: ArrayLike) -> None:
        """Add one value.

        Args:
            values: shape ``shape``.

        Raises:
            ValueError: if the shape is not ``shape``.

        """
        value = _float64_array("values", values, self.shape)
        # Unfilled slots hold 0, so subtracting them while filling up is harmless.
        self._window_sum += value - self._ring[self._next_slot]
        self._ring[self._next_slot] = value
        self._next_slot = (self._next_slot + 1) % self.window
        self._n_seen += 1
        self._updates_since_recompute += 1
        if self._updates_since_recompute >= self.window:
            self._recompute_sum()

    def update_many(self, values: ArrayLike) -> None:
        """Add n values in order, vectorised; bit for bit the same as n calls to :meth:`update`.

        Args:
            values: shape [n, *shape], oldest first.

        Raises:
            ValueError: if the shape is not [n, *shape].

        """
        batch = np.asarray(values, dtype=np.float64)
        if batch.ndim != 1 + len(self.shape) or batch.shape[1:] != self.shape:
            raise ValueError(
                f"values must have shape {_shape_text(('n', *self.shape))}; "
                f"got shape {_shape_text(batch.shape)}"
            )
        start = 0
        while start < len(batch):
            # Up to the next recompute of the sum, as update() does it, so that the window sum
            # is bit-identical to n single updates: the slots of a piece are distinct and
            # cumsum adds the differences one after another.
            # (The counter stays below window; the modulo only keeps a piece non-empty if a
            # test disables the recompute.)
            until_recompute = self.window - self._updates_since_recompute % self.window
            piece = batch[start : start + until_recompute]
            slots = (self._next_slot + np.arange(len(piece))) % self.window
            differences = piece - self._ring[slots]
            running = np.concatenate([self._window_sum[None], differences]).cumsum(axis=0)
            self._window_sum = np.array(running[-1])
            self._ring[slots] = piece
            self._next_slot = (self._next_slot + len(piece)) % self.window
            self._n_seen += len(piece)
            self._updates_since_recompute += len(piece)
            if self._updates_since_recompute >= self.window:
                self._recompute_sum()
            start += len(piece)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue exactly, as copies.

        The keys are the attribute names: checkpoints written before this method existed
        saved the attributes themselves, so they load unchanged.

        Returns:
            ``window`` and ``shape`` (the settings, checked on load), ``_ring``
            ``[window, *shape]`` and ``_window_sum`` ``[*shape]`` (float64 arrays), and the
            counters ``_next_slot``, ``_n_seen`` and ``_updates_since_recompute`` (ints).
        """
        return {
            "window": self.window,
            "shape": self.shape,
            "_ring": self._ring.copy(),
            "_window_sum": self._window_sum.copy(),
            "_next_slot": self._next_slot,
            "_n_seen": self._n_seen,
            "_updates_since_recompute": self._updates_since_recompute,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``; everything is checked before anything is replaced.

        Args:
            state: a :meth:`state_dict` of a sliding mean with this ``window`` and ``shape``;
                arrays may come back as tensors or other array-likes (as from a checkpoint).

        Raises:
            ValueError: if keys are missing or extra, the window or shape differ, an array
                has the wrong shape, or a counter is out of range; the message says which.
        """
        expected_keys = self.state_dict().keys()
        if state.keys() != expected_keys:
            raise ValueError(
                f"sliding mean state must have keys {sorted(expected_keys)}; got "
                f"{sorted(state)}: pass what SlidingMean.state_dict() returned"
            )
        saved_window = int(state["window"])
        saved_shape = tuple(int(size) for size in state["shape"])
        if (saved_window, saved_shape) != (self.window, self.shape):
            raise ValueError(
                f"sliding mean state has window {saved_window} and shape "
                f"{_shape_text(saved_shape)}, this mean window {self.window} and shape "
                f"{_shape_text(self.shape)}: load it into SlidingMean(window={saved_window}, "
                f"shape={saved_shape})"
            )
        ring = _float64_array("sliding mean state _ring", state["_ring"], self._ring.shape)
        window_sum = _float64_array(
            "sliding mean state _window_sum", state["_window_sum"], self.shape
        )
        next_slot, n_seen = int(state["_next_slot"]), int(state["_n_seen"])
        updates_since_recompute = int(state["_updates_since_recompute"])
        # Every value fills the next slot, and the sum is recomputed once a window is reached.
        if n_seen < 0 or next_slot != n_seen % self.window:
            raise ValueError(
                f"sliding mean state has _n_seen {n_seen} and _next_slot {next_slot}, which "
                f"must be _n_seen % {self.window}: the state is damaged"
            )
        if not 0 <= updates_since_recompute < self.window:
            raise ValueError(
                f"sliding mean state _updates_since_recompute must lie in [0, {self.window}); "
                f"got {updates_since_recompute}: the state is damaged"
            )
        self._ring = ring.copy()
        self._window_sum = window_sum.copy()
        self._next_slot = next_slot
        self._n_seen = n_seen
        self._updates_since_recompute = updates_since_recompute

    def _recompute_sum(self) -> None:
        self._window_sum = self._ring.sum(axis=0)
        self._updates_since_recompute = 0


def mean_and_standard_error(values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean over streams and its standard error, ignoring NaN entries.

    NaN marks a stream with nothing to report yet (e.g. a sliding mean before its first
    value). The standard error is the sample standard deviation (ddof = 1) over the other
    entries of a row divided by the square root of their number; it is NaN for rows with
    fewer than two such entries, and the mean is NaN for rows with none. An infinite entry
    (a diverged stream) makes the row's mean infinite and its standard error NaN.

    Example:
        >>> mean, standard_error = mean_and_standard_error([[1.0, 3.0], [2.0, np.nan]])
        >>> mean.tolist(), standard_error.tolist()
        ([2.0, 2.0], [1.0, nan])

    Args:
        values: shape [N, B]: N points (e.g. logged steps) of B streams or seeds.

    Returns:
        (mean, standard_error), shape [N] each.

    Raises:
        ValueError: if ``values`` is not two-dimensional.

    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"values must have shape [N, B]; got shape {_shape_text(array.shape)}")
    reported = ~np.isnan(array)
    n_reported = reported.sum(axis=1)
    filled = np.where(reported, array, 0.0)
    mean = np.divide(
        filled.sum(axis=1), n_reported, out=np.full(len(array), np.nan), where=n_reported > 0
    )
    has_spread = n_reported > 1
    # inf - inf in a diverged row is NaN by design; numpy would warn about it.
    with np.errstate(invalid="ignore"):
        squared_deviations = np.where(reported, (filled - mean[:, None]) ** 2, 0.0).sum(axis=1)
        variance = np.divide(
            squared_deviations, n_reported - 1, out=np.full(len(array), np.nan), where=has_spread
        )
    standard_error = np.divide(
        np.sqrt(variance), np.sqrt(n_reported), out=np.full(len(array), np.nan), where=has_spread
    )
    return mean, standard_error
