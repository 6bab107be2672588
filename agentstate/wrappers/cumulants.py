"""Cumulants: the signals whose discounted futures the TD heads predict.

Several heads share one agent state. Predicting the reward alone asks the state only for
what the reward depends on; predicting every observation component (a horde of general
value functions) forces it to carry whatever the coming observations will reveal.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import iterate

from agentstate.observation import SpaceEncoder
from agentstate.wrappers.reconstruction import reconstruction_names
from agentstate.wrappers.settings import CumulantFunction


class Cumulants:
    """Computes ``[streams, n_cumulants]`` cumulants from a step's data.

    Attributes:
        names: one name per cumulant (``reward``, observation component names,
            ``cumulant[k]``).
        needs_info: whether the cumulants read each stream's ``info`` dict.
        groups: group name -> the columns of its cumulants: ``"reward"`` and
            ``"observation"`` (all encoded components together), or ``"cumulant"`` (every
            entry of a callable's array); and ``"reconstruction"`` (the encoded observations
            of the last ``reconstruct_past`` steps, appended by the wrapper's core).
        base_size: the cumulants this object computes, before the reconstruction targets.

    Example:
        >>> import numpy as np
        >>> from gymnasium import spaces
        >>> from agentstate.observation import make_space_encoder
        >>> space = spaces.Discrete(2)
        >>> cumulants = Cumulants("reward+observation", space, make_space_encoder(space, "o"))
        >>> cumulants.names
        ['reward', 'o==0', 'o==1']
        >>> cumulants.groups
        {'reward': slice(0, 1, None), 'observation': slice(1, 3, None)}
        >>> cumulants(np.array([1]), np.array([[0.0, 1.0]]), np.array([0.5]), None).tolist()
        [[0.5, 0.0, 1.0]]
    """

    def __init__(
        self,
        kind: str | CumulantFunction,
        observation_space: spaces.Space,
        observation_encoder: SpaceEncoder,
        reconstruct_past: int = 0,
    ) -> None:
        self.kind = kind
        self.observation_space = observation_space
        if callable(kind):
            sample = copy.deepcopy(observation_space).sample()
            size = self._call(sample, 0.0, {}).size
            if size == 0:
                raise ValueError("the cumulant callable returned an empty array")
            self.names = [f"cumulant[{k}]" for k in range(size)]
            self.groups: dict[str, slice] = {"cumulant": slice(0, size)}
        else:
            reward = ["reward"] if "reward" in kind else []
            observation = list(observation_encoder.component_names) if "observation" in kind else []
            self.names = reward + observation
            self.groups = {}
            if reward:
                self.groups["reward"] = slice(0, 1)
            if observation:
                self.groups["observation"] = slice(len(reward), len(self.names))
        self.base_size = len(self.names)
        if reconstruct_past:
            components = observation_encoder.component_names
            self.names += reconstruction_names(components, reconstruct_past)
            self.groups["reconstruction"] = slice(self.base_size, len(self.names))
        self.needs_info = callable(kind)

    @property
    def size(self) -> int:
        """Number of cumulants (TD heads)."""
        return len(self.names)

    def _call(self, observation: Any, reward: float, info: Mapping[str, Any]) -> np.ndarray:
        assert callable(self.kind)
        return np.asarray(self.kind(observation, reward, info), dtype=np.float64).ravel()

    def __call__(
        self,
        observations: Any,
        encoded_observations: np.ndarray,
        rewards: np.ndarray,
        infos: Sequence[Mapping[str, Any]] | None,
    ) -> np.ndarray:
        """The cumulants that arrive with ``observations`` (the first ``base_size``).

        Args:
            observations: the raw batch (used by a callable).
            encoded_observations: ``[streams, observation_size]``.
            rewards: ``[streams]`` rewards of the transitions into ``observations``.
            infos: one info dict per stream (only read by a callable).

        Returns:
            ``[streams, base_size]`` float64.
        """
        if callable(self.kind):
            infos = infos if infos is not None else [{}] * len(rewards)
            rows = [
                self._call(observation, float(reward), info)
                for observation, reward, info in zip(
                    iterate(self.observation_space, observations), rewards, infos, strict=True
                )
            ]
            sizes = {row.size for row in rows}
            if sizes != {self.base_size}:
                raise ValueError(
                    f"the cumulant callable returned {sorted(sizes)} values; it returned "
                    f"{self.base_size} on its first call and must keep that size"
                )
            return np.stack(rows)
        parts = []
        if "reward" in self.kind:
            parts.append(np.asarray(rewards, dtype=np.float64).reshape(-1, 1))
        if "observation" in self.kind:
            parts.append(encoded_observations)
        return np.concatenate(parts, axis=1)


class CumulantCentre:
    """The running mean of every cumulant, subtracted before the heads learn from it.

    A head's return ``sum_k gamma^k c_t+k`` carries the cumulant's mean times 1 / (1 - gamma).
    Where the rest is hard to predict (random cards), the learner can lower its TD error
    fastest by driving its features to a constant that supplies that mean, and a saturated
    state has no gradient left to recover. Centred cumulants leave that mean out: the heads
    then predict ``sum_k gamma^k (c_t+k - mean)``, and only what varies is asked of the state.

    The mean is the plain average of every row seen until ``horizon`` rows, then an
    exponential average over about ``horizon`` rows.

    Example:
        >>> centre = CumulantCentre(size=1, horizon=4)
        >>> for value in [1.0, 3.0]:
        ...     centred = centre(np.array([[value]]))
        ...     centre.update(np.array([[value]]))
        >>> float(centred[0, 0]), float(centre.mean[0])  # 3 - mean(1), then mean(1, 3)
        (2.0, 2.0)
    """

    def __init__(self, size: int, horizon: int = 10_000) -> None:
        self.mean = np.zeros(size)
        self.count = 0
        self.horizon = horizon

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``rows - mean``, ``[R, K]``."""
        return rows - self.mean

    def update(self, rows: np.ndarray) -> None:
        """Fold in ``[R, K]`` rows (finite cumulants that were learned from)."""
        if len(rows) == 0:
            return
        self.count += len(rows)
        weight = len(rows) / min(self.count, self.horizon)
        self.mean += min(weight, 1.0) * (rows.mean(axis=0) - self.mean)
