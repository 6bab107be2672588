"""Numpy simulator of B independent trace-patterning streams, shared by every env.

The simulator is event based. Each stream draws its future as *runs* (a channel switched on
from step ``start`` to ``end``, exclusive): per trial the CS runs of its pattern and, if
any, the US run; per distractor its on-runs. Runs are drawn in batches from the stream's own
generators whenever a fixed-size chunk of steps is rendered (with array operations over all
streams), so what a stream shows depends only on its seed, never on how the steps are
consumed: ``step`` and ``rollout`` read the same rendered rows.

Return targets come from the future US runs, which the trial schedule knows ahead of time:
G_t = Σ_{k≥1} γ^{k−1} c_{t+k} with c the US bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .trace_presets import TracePatterningConfig

__all__ = ["RETURN_TOLERANCE", "US_CHANNEL", "TrialStreams", "lookahead_horizon"]

US_CHANNEL = 0
RETURN_TOLERANCE = 1e-14
"""Largest error of a return target from truncating the lookahead."""

_CHUNK_STEPS = 256  # steps per rendered chunk; fixed, so no result depends on how steps are read
_TRIAL_BATCH = 32  # trials drawn per call to a stream's trial generator
_DISTRACTOR_BATCH = 128  # runs drawn per call for one distractor
_NEVER = np.iinfo(np.int64).max // 4  # a step no stream reaches; pads and silent distractors

# Columns of the run table, one row per run: [stream, channel, start, end).
_STREAM, _CHANNEL, _START, _END = range(4)

# Arrays (with their dtypes) that, with the generators and the two counters, are the whole
# simulator state after a reset; ``state_dict`` saves exactly these.
_STATE_ARRAYS = {
    "valid_patterns": bool,
    "_valid_codes": np.int64,
    "_next_trial_onset": np.int64,
    "_distractor_free": np.int64,
    "_runs": np.int64,
    "_chunk_observations": bool,
    "_chunk_returns": np.float64,
}


def lookahead_horizon(gamma: float, tolerance: float = RETURN_TOLERANCE) -> int:
    """Count the lookahead steps that make the truncated return exact to ``tolerance``.

    Cumulants are 0 or 1, so dropping every cumulant more than H steps ahead changes
    G_t = Σ_{k≥1} γ^{k−1} c_{t+k} by at most Σ_{k>H} γ^{k−1} = γ^H / (1 − γ). The smallest H
    with γ^H / (1 − γ) <= tolerance is ⌈log(tolerance·(1 − γ)) / log γ⌉ (γ = 0.9: 328 steps).

    Args:
        gamma: discount in [0, 1).
        tolerance: largest allowed truncation error.

    Returns:
        The horizon H in steps (at least 1).

    """
    if gamma == 0.0:
        return 1
    return max(1, math.ceil(math.log(tolerance * (1.0 - gamma)) / math.log(gamma)))


def _expand_runs(first: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run index and step of every step of runs starting at ``first``, ``lengths`` long."""
    run_index = np.repeat(np.arange(first.size), lengths)
    offsets = np.arange(run_index.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return run_index, first[run_index] + offsets


class TrialStreams:
    """B independent streams of trials, CS patterns, US and distractors.

    Observation layout: ``[US, CS_1 .. CS_n_cs, distractor_1 .. distractor_n]``. Stream b is
    seeded from ``numpy.random.SeedSequence(seed, spawn_key=(b,))``, so stream 0 of any
    number of streams equals the single-stream simulator with the same seed.

    Args:
        config: the general trace-patterning config (every family converts to it).
        n_streams: number of independent streams B.

    Example:
        >>> from agentstate.envs.trace_presets import TraceConditioningConfig
        >>> streams = TrialStreams(TraceConditioningConfig().as_trace_patterning(), n_streams=2)
        >>> observation, return_target = streams.reset(seed=0)
        >>> observation.shape, return_target.shape
        ((2, 7), (2,))
        >>> observations, cumulants, return_targets = streams.advance(100)
        >>> observations.shape, cumulants.shape, return_targets.dtype
        ((100, 2, 7), (100, 2), dtype('float64'))

    """

    def __init__(self, config: TracePatterningConfig, n_streams: int) -> None:
        self.config = config
        self.n_streams = n_streams
        self.n_channels = 1 + config.n_cs + config.n_distractors
        self.horizon = lookahead_horizon(config.gamma)
        self._first_distractor = 1 + config.n_cs
        self._pool_patterns = self._patterns_with_n_on(config.n_cs, config.n_cs_on)
        self._pattern_codes_weights = 1 << np.arange(config.n_cs, dtype=np.int64)
        # A trial shows a uniformly drawn valid pattern with probability `forced`, else a
        # uniform pool pattern: valid_trial_probability = forced + (1 − forced)·pool_share.
        pool_share = config.n_valid_patterns / config.pool_size
        self._forced_valid_probability = (
            0.0
            if pool_share == 1.0
            else (config.valid_trial_probability - pool_share) / (1.0 - pool_share)
        )
        self._distractor_probabilities = np.asarray(config.distractor_probabilities)
        self._trial_rngs: list[np.random.Generator] = []
        self._distractor_rngs: list[np.random.Generator] = []
        self.valid_patterns = np.zeros((n_streams, config.n_valid_patterns, config.n_cs), bool)
        # Rendered steps [chunk, B, d] and their return targets [chunk, B]; read at _cursor.
        self._chunk_observations = np.zeros((0, n_streams, self.n_channels), dtype=bool)
        self._chunk_returns = np.zeros((0, n_streams))
        self._cursor = 0

    @staticmethod
    def _patterns_with_n_on(n_cs: int, n_on: int) -> np.ndarray:
        """All patterns with exactly ``n_on`` of ``n_cs`` CS on: [patterns, n_cs] bool."""
        combinations = list(itertools.combinations(range(n_cs), n_on))
        patterns = np.zeros((len(combinations), n_cs), dtype=bool)
        patterns[np.repeat(np.arange(len(combinations)), n_on), np.ravel(combinations)] = True
        return patterns

    def reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Start every stream at step 0 with a trial onset.

        A seed (or the first reset) reseeds every stream and draws its valid patterns; a reset
        without a seed continues the streams' generators and keeps their valid patterns.

        Args:
            seed: root seed, or None.

        Returns:
            ``(observation [B, d] float32, return_target [B] float64)`` of step 0.

        """
        if seed is not None or not self._trial_rngs:
            self._seed(np.random.SeedSequence(seed))
        self._next_trial_onset = np.zeros(self.n_streams, dtype=np.int64)
        # Earliest step each distractor may switch on next; silent ones never do.
        free = np.where(self._distractor_probabilities > 0.0, 0, _NEVER)
        if self.config.distractor_onset == "cs_onset":
            free[:] = _NEVER
        self._distractor_free = np.tile(free.astype(np.int64), (self.n_streams, 1))
        self._runs = np.empty((0, 4), dtype=np.int64)
        self._chunk_start = 0
        self._render_next_chunk()
        self._cursor = 1
        return self._chunk_observations[0].astype(np.float32), self._chunk_returns[0].copy()

    def _seed(self, root: np.random.SeedSequence) -> None:
        self._trial_rngs, self._distractor_rngs = [], []
        for stream in range(self.n_streams):
            stream_seed = np.random.SeedSequence(root.entropy, spawn_key=(stream,))
            pattern_seed, trial_seed, distractor_seed = stream_seed.spawn(3)
            chosen = np.random.default_rng(pattern_seed).choice(
                len(self._pool_patterns), size=self.config.n_valid_patterns, replace=False
            )
            self.valid_patterns[stream] = self._pool_patterns[np.sort(chosen)]
            self._trial_rngs.append(np.random.default_rng(trial_seed))
            self._distractor_rngs.append(np.random.default_rng(distractor_seed))
        self._valid_codes = self.valid_patterns.astype(np.int64) @ self._pattern_codes_weights

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the streams exactly, for checkpoints.

        Returns:
            The config (as a dict), the number of streams, every generator's
            ``bit_generator.state`` and copies of the schedule and rendered-chunk arrays.

        Raises:
            RuntimeError: before the first ``reset``.

        """
        if not self._trial_rngs:
            raise RuntimeError("reset() must be called before state_dict()")
        return {
            "config": dataclasses.asdict(self.config),
            "n_streams": self.n_streams,
            "trial_rngs": [rng.bit_generator.state for rng in self._trial_rngs],
            "distractor_rngs": [rng.bit_generator.state for rng in self._distractor_rngs],
            "chunk_start": int(self._chunk_start),
            "cursor": int(self._cursor),
            "arrays": {name: getattr(self, name).copy() for name in _STATE_ARRAYS},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict``; another config or stream count is refused whole.

        Args:
            state: a ``state_dict()``; its arrays may be any array-likes (e.g. CPU tensors).

        Raises:
            ValueError: if ``state`` was saved by a simulator with another config or number
                of streams, or misses an array.

        """
        for key, expected in (
            ("config", dataclasses.asdict(self.config)),
            ("n_streams", self.n_streams),
        ):
            if state.get(key) != expected:
                raise ValueError(
                    f"cannot load simulator state: {key} is {state.get(key)!r} in the saved "
                    f"state but {expected!r} here"
                )
        missing = set(_STATE_ARRAYS) - set(state["arrays"])
        if missing:
            raise ValueError(f"cannot load simulator state: arrays {sorted(missing)} missing")
        arrays = {
            name: np.asarray(state["arrays"][name], dtype=dtype).copy()
            for name, dtype in _STATE_ARRAYS.items()
        }
        trial_rngs = [self._generator(saved) for saved in state["trial_rngs"]]
        distractor_rngs = [self._generator(saved) for saved in state["distractor_rngs"]]
        for name, array in arrays.items():
            setattr(self, name, array)
        self._trial_rngs, self._distractor_rngs = trial_rngs, distractor_rngs
        self._chunk_start = int(state["chunk_start"])
        self._cursor = int(state["cursor"])

    @staticmethod
    def _generator(bit_generator_state: Mapping[str, Any]) -> np.random.Generator:
        """A generator (PCG64, as ``_seed`` makes) continuing from a saved state."""
        generator = np.random.default_rng()
        generator.bit_generator.state = dict(bit_generator_state)
        return generator

    def advance(self, n_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance every stream ``n_steps`` steps.

        Args:
            n_steps: number of steps (>= 0).

        Returns:
            ``observations [n_steps, B, d] float32``, ``cumulants [n_steps, B] float32`` (the
            US bit of each new observation) and ``return_targets [n_steps, B] float64``.

        """
        if not self._trial_rngs:
            raise RuntimeError("reset() must be called before stepping")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 0:
            raise ValueError(f"n_steps must be an integer >= 0, got {n_steps!r}")
        observations = np.empty((n_steps, self.n_streams, self.n_channels), dtype=np.float32)
        return_targets = np.empty((n_steps, self.n_streams), dtype=np.float64)
        filled = 0
        while filled < n_steps:
            if self._cursor == _CHUNK_STEPS:
                self._render_next_chunk()
                self._cursor = 0
            taken = min(n_steps - filled, _CHUNK_STEPS - self._cursor)
            rows = slice(self._cursor, self._cursor + taken)
            observations[filled : filled + taken] = self._chunk_observations[rows]
            return_targets[filled : filled + taken] = self._chunk_returns[rows]
            filled += taken
            self._cursor += taken
        return observations, observations[:, :, US_CHANNEL].copy(), return_targets

    def _render_next_chunk(self) -> None:
        """Render steps [t0, t0 + chunk) of every stream from the runs, with return targets."""
        t0 = self._chunk_start
        t1 = t0 + _CHUNK_STEPS
        # Every US step up to t1 − 1 + horizon must be known for the return targets.
        self._schedule(trials_until=t1 + self.horizon, distractors_until=t1)
        runs = self._runs
        live = runs[(runs[:, _START] < t1) & (runs[:, _END] > t0)]
        first = np.maximum(live[:, _START], t0)
        run_index, steps = _expand_runs(first, np.minimum(live[:, _END], t1) - first)
        observations = np.zeros((_CHUNK_STEPS, self.n_streams, self.n_channels), dtype=bool)
        observations[steps - t0, live[run_index, _STREAM], live[run_index, _CHANNEL]] = True
        self._chunk_observations = observations
        self._chunk_returns = self._discounted_us(t0, t1)
        self._runs = runs[runs[:, _END] > t1]
        self._chunk_start = t1

    def _discounted_us(self, t0: int, t1: int) -> np.ndarray:
        """Return targets G_s for s in [t0, t1): [chunk, B] float64.

        With u_1 < u_2 < ... the US steps after s, G_s = Σ_i γ^{u_i − s − 1}
        = γ^{u_1 − s − 1} V_1, where V_j = Σ_{i≥j} γ^{u_i − u_j} = 1 + γ^{u_{j+1} − u_j} V_{j+1}
        is the discounted US count from event j on, computed backward over the events.
        Events up to t1 + horizon are used, so each G_s misses only US steps more than
        ``horizon`` ahead: an error of at most RETURN_TOLERANCE (see lookahead_horizon).
        """
        gamma = self.config.gamma
        runs = self._runs
        us_runs = runs[(runs[:, _CHANNEL] == US_CHANNEL) & (runs[:, _END] > t0)]
        first = np.maximum(us_runs[:, _START], t0)
        run_index, us_steps = _expand_runs(first, us_runs[:, _END] - first)
        us_streams = us_runs[run_index, _STREAM]
        kept = us_steps <= t1 + self.horizon
        us_steps, us_streams = us_steps[kept], us_streams[kept]
        order = np.lexsort((us_steps, us_streams))
        us_steps, us_streams = us_steps[order], us_streams[order]
        # Events of each stream in one padded row: [B, width], padding at _NEVER.
        counts = np.bincount(us_streams, minlength=self.n_streams)
        rank = np.arange(us_steps.size) - np.repeat(np.cumsum(counts) - counts, counts)
        width = counts.max(initial=0) + 1
        event_step = np.full((self.n_streams, width), _NEVER, dtype=np.int64)
        event_step[us_streams, rank] = us_steps
        is_event = event_step != _NEVER
        event_value = np.zeros((self.n_streams, width))
        for j in range(width - 2, -1, -1):
            gap = (event_step[:, j + 1] - event_step[:, j]).astype(np.float64)
            event_value[:, j] = is_event[:, j] * (1.0 + gamma**gap * event_value[:, j + 1])
        # Index of the first event after step s = number of US steps in [t0, s]: [B, chunk].
        us_on = np.ascontiguousarray(self._chunk_observations[:, :, US_CHANNEL].T)
        next_event = np.cumsum(us_on, axis=1, dtype=np.int32)  # contiguous axis: fast
        next_step = np.take_along_axis(event_step, next_event, axis=1)
        next_value = np.take_along_axis(event_value, next_event, axis=1)
        steps = np.arange(t0, t1, dtype=np.int64)
        return (gamma ** (next_step - steps - 1).astype(np.float64) * next_value).T

    def _schedule(self, trials_until: int, distractors_until: int) -> None:
        """Draw runs until the trials starting by ``trials_until`` are known.

        Likewise every distractor run starting before ``distractors_until``.
        """
        new_runs = [self._runs]
        for stream in np.flatnonzero(self._next_trial_onset <= trials_until).tolist():
            while self._next_trial_onset[stream] <= trials_until:
                new_runs.append(self._draw_trials(stream))
        for stream, distractor in np.argwhere(self._distractor_free < distractors_until).tolist():
            while self._distractor_free[stream, distractor] < distractors_until:
                new_runs.append(self._draw_distractor_runs(stream, distractor))
        self._runs = np.concatenate(new_runs)

    def _draw_trials(self, stream: int) -> np.ndarray:
        """Draw the next batch of trials of ``stream`` as runs: CS, US, CS-onset distractors."""
        config, rng = self.config, self._trial_rngs[stream]
        isi = rng.integers(config.isi_min, config.isi_max, size=_TRIAL_BATCH, endpoint=True)
        iti = rng.integers(config.iti_min, config.iti_max, size=_TRIAL_BATCH, endpoint=True)
        forced_valid = rng.random(_TRIAL_BATCH) < self._forced_valid_probability
        valid_index = rng.integers(config.n_valid_patterns, size=_TRIAL_BATCH)
        if config.pattern_pool == "any":
            pool_pick = rng.random((_TRIAL_BATCH, config.n_cs)) < 0.5
        else:
            pool_index = rng.integers(len(self._pool_patterns), size=_TRIAL_BATCH)
            pool_pick = self._pool_patterns[pool_index]
        valid_pick = self.valid_patterns[stream, valid_index]
        patterns = np.where(forced_valid[:, None], valid_pick, pool_pick)
        codes = patterns.astype(np.int64) @ self._pattern_codes_weights
        is_valid = np.isin(codes, self._valid_codes[stream])
        us_delivered = is_valid != (rng.random(_TRIAL_BATCH) < config.us_flip_probability)

        trial_lengths = isi + iti
        onsets = self._next_trial_onset[stream] + np.cumsum(trial_lengths) - trial_lengths
        self._next_trial_onset[stream] = onsets[-1] + trial_lengths[-1]

        trial, cs = np.nonzero(patterns)
        cs_runs = self._runs_of(stream, 1 + cs, onsets[trial], config.cs_duration)
        us_onsets = (onsets + isi)[us_delivered]
        us_runs = self._runs_of(stream, US_CHANNEL, us_onsets, config.us_duration)
        if config.distractor_onset != "cs_onset":
            return np.concatenate([cs_runs, us_runs])
        switched_on = self._distractor_rngs[stream].random((_TRIAL_BATCH, config.n_distractors))
        trial, distractor = np.nonzero(switched_on < self._distractor_probabilities)
        distractor_runs = self._runs_of(
            stream, self._first_distractor + distractor, onsets[trial], config.distractor_duration
        )
        return np.concatenate([cs_runs, us_runs, distractor_runs])

    def _draw_distractor_runs(self, stream: int, distractor: int) -> np.ndarray:
        """Draw the next runs of an "any_step" distractor of ``stream``.

        While free, a distractor switches on with probability p at each step, so the wait
        for its next run is geometric: start = free + (G − 1), G ~ Geometric(p) >= 1; after a
        run it is busy for ``distractor_duration + distractor_min_off_steps`` steps.
        """
        config = self.config
        waits = self._distractor_rngs[stream].geometric(
            self._distractor_probabilities[distractor], size=_DISTRACTOR_BATCH
        )
        busy = config.distractor_duration + config.distractor_min_off_steps
        starts = (
            self._distractor_free[stream, distractor]
            + np.cumsum(waits - 1)
            + busy * np.arange(_DISTRACTOR_BATCH)
        )
        self._distractor_free[stream, distractor] = starts[-1] + busy
        channel = self._first_distractor + distractor
        return self._runs_of(stream, channel, starts, config.distractor_duration)

    @staticmethod
    def _runs_of(
        stream: int, channels: np.ndarray | int, starts: np.ndarray, duration: int
    ) -> np.ndarray:
        """Run-table rows [stream, channel, start, start + duration): [runs, 4] int64."""
        rows = np.empty((starts.size, 4), dtype=np.int64)
        rows[:, _STREAM] = stream
        rows[:, _CHANNEL] = channels
        rows[:, _START] = starts
        rows[:, _END] = starts + duration
        return rows
