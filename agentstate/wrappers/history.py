"""Each stream's recent encoded observations, kept by the wrapper's core.

Two settings read it: ``reconstruct_past = N`` takes the targets of its reconstruction heads
from it (``agentstate.wrappers.reconstruction``), and ``observe_past = M`` shows the policy
``[o_t-1, ..., o_t-M]`` beside ``o_t`` and the agent state. A stream's history starts empty
(zeros) with each episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PastObservations:
    """The encoded observations of each stream's last ``steps + 1`` steps.

    Example:
        >>> past = PastObservations(streams=1, steps=2, observation_size=1)
        >>> for t, fresh in enumerate([True, False, False, False]):
        ...     arriving = past.targets()  # what reaches the heads with o_t
        ...     past.push(np.array([[float(t)]]), np.array([fresh]))
        >>> arriving.tolist()  # with o_3: o_1 (1 before o_2) and o_0 (2 before)
        [[1.0, 0.0]]
        >>> past.latest(2).tolist()  # shown with the next observation: o_3, o_2
        [[3.0, 2.0]]

    Args:
        streams: B.
        steps: N, how far back the history reaches before the latest observation.
        observation_size: D, the length of the encoded observation.
    """

    def __init__(self, streams: int, steps: int, observation_size: int) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        self.steps = steps
        self.buffer = np.zeros((streams, steps + 1, observation_size))  # [:, j]: o_t-j

    def targets(
        self, streams: slice | Sequence[int] = slice(None), count: int | None = None
    ) -> np.ndarray:
        """``[R, count * D]``: ``[o_t-1, ..., o_t-count]`` of the chosen streams.

        o_t is the latest pushed; ``count`` defaults to ``steps``.
        """
        count = self.steps if count is None else count
        rows = self.buffer[streams, 1 : 1 + count]
        return rows.reshape(rows.shape[0], rows.shape[1] * rows.shape[2]).copy()

    def latest(self, count: int, streams: slice | Sequence[int] = slice(None)) -> np.ndarray:
        """``[R, count * D]``: ``[o_t, ..., o_t-count+1]``, the latest ``count`` pushed.

        For the observation about to arrive, these are the ``count`` steps before it.
        """
        if not 1 <= count <= self.steps + 1:
            raise ValueError(f"count must lie in [1, {self.steps + 1}], got {count!r}")
        rows = self.buffer[streams, :count]
        return rows.reshape(rows.shape[0], rows.shape[1] * rows.shape[2]).copy()

    def push(self, encoded: np.ndarray, fresh: np.ndarray) -> None:
        """Add this step's ``[B, D]`` observations; ``fresh`` streams start an empty history."""
        self.buffer[:, 1:] = self.buffer[:, :-1].copy()
        self.buffer[fresh] = 0.0
        self.buffer[:, 0] = encoded

    def clear(self) -> None:
        """Every stream starts an empty history."""
        self.buffer[:] = 0.0
