"""Stream sources: where the B streams of a prediction run come from, and how they are scored.

A source hands the runner (``agentstate.experiment``) chunks of steps of every stream: the
observation, the cumulant that came with it, the discount into it, where episodes start, and
either the exact return target of every step (scored every step) or nothing (the runner
scores whole episodes, their returns computed backward when they end). The behaviour never
depends on the learner, so a chunk can be generated ahead of the learner's steps.

* :class:`TraceSource`: the trace-conditioning family, with exact targets (checkpointable);
* :class:`EpisodicSource`: any next-step-autoreset Gymnasium vector env whose reward is the
  cumulant, acting by a given rule (random actions for ``agentstate run``; the Atari replay
  ignores actions), optionally with reference predictors scored beside the learner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np


@dataclass
class Steps:
    """``T`` consecutive steps of every stream."""

    observation: np.ndarray
    """``[T, B, d]``."""
    cumulant: np.ndarray
    """``[T, B]``: the cumulant that arrived with each observation."""
    discount: np.ndarray | None
    """``[T, B]``: discount of the transition into each observation; None: the run's gamma."""
    episode_start: np.ndarray | None
    """``[T, B]`` bool: the observation starts an episode; None: no boundaries."""
    target: np.ndarray | None
    """``[T, B]``: the exact return of each observation; None: scored at episode ends."""
    references: dict[str, np.ndarray] = field(default_factory=dict)
    """Reference predictor name -> its predictions ``[T, B]`` (besides predicting zero)."""


class StreamSource(Protocol):
    """What the runner needs of a source (the module docstring says how it is used)."""

    streams: int
    observation_size: int
    gamma: float
    labels: list[str]
    """Each stream's label (e.g. its game), ``[B]``: streams with one label share a plot."""
    reference_names: tuple[str, ...]
    """Names of the reference predictors in ``Steps.references``."""
    scored_every_step: bool
    """True when ``Steps.target`` is given (exact targets), False for episodic scoring."""
    description: str
    """What generates the behaviour, for ``config.json``."""

    def steps(self, count: int) -> Steps:
        """The next ``count`` steps of every stream."""
        ...

    def close(self) -> None:
        """Release the envs."""
        ...


class TraceSource:
    """A natively vectorised trace env (``rollout`` with exact return targets).

    Checkpointable: ``state_dict`` / ``load_state_dict`` save the env's generators and
    schedule; what it shows never depends on how its steps are chunked.
    """

    reference_names: tuple[str, ...] = ()
    scored_every_step = True
    description = "the environment's own schedule"

    def __init__(self, env: Any, seed: int) -> None:
        self.env = env
        self.streams = int(env.num_envs)
        self.gamma = float(env.unwrapped.gamma)
        self.observation_size = int(np.prod(env.single_observation_space.shape or ()))
        self.labels = [""] * self.streams
        observation, info = env.reset(seed=seed)
        self._first: tuple[np.ndarray, np.ndarray] | None = (
            np.asarray(observation).reshape(self.streams, -1),
            np.asarray(info["return_target"], dtype=np.float64),
        )

    def steps(self, count: int) -> Steps:
        """The next ``count`` steps (the reset observation first, with cumulant 0)."""
        parts = []
        if self._first is not None and count > 0:
            observation, target = self._first
            parts.append((observation[None], np.zeros((1, self.streams)), target[None]))
            self._first = None
            count -= 1
        if count > 0:
            observations, cumulants, targets = self.env.unwrapped.rollout(count)
            parts.append(
                (np.asarray(observations).reshape(count, self.streams, -1), cumulants, targets)
            )
        observation, cumulant, target = (
            np.concatenate([part[i] for part in parts]) for i in range(3)
        )
        return Steps(observation, cumulant, None, None, np.asarray(target, dtype=np.float64))

    def state_dict(self) -> dict[str, Any]:
        """The env's state, for checkpoints."""
        return dict(self.env.unwrapped.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()`` (the reset observation was consumed before)."""
        self.env.unwrapped.load_state_dict(state)
        self._first = None

    def close(self) -> None:
        """Close the env."""
        self.env.close()


class EpisodicSource:
    """A next-step-autoreset vector env whose reward is the cumulant, scored by episodes.

    Args:
        envs: B streams, next-step autoreset (the step after an episode's last observation
            returns the next episode's first, with reward 0).
        gamma: the discount.
        actions: () -> actions ``[B]`` for each env step.
        zero_discount_at: ``"end"``: the discount is 0 into an episode's last observation
            (``agentstate run``'s convention); ``"start"``: 0 into its first, the frame after
            a reset (the authors' Atari convention).
        references: name -> a predictor of the return, updated with each step's cumulants
            ``[B]`` and returning its predictions ``[B]`` (e.g. :class:`RunningMeanReward`).
        labels: each stream's label.
        description: what plays.
        seed: reset seed.
    """

    scored_every_step = False

    def __init__(
        self,
        envs: gym.vector.VectorEnv,
        *,
        gamma: float,
        actions: Callable[[], np.ndarray],
        zero_discount_at: str = "end",
        references: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
        labels: list[str] | None = None,
        description: str = "random actions",
        seed: int = 0,
    ) -> None:
        if zero_discount_at not in ("end", "start"):
            raise ValueError(f"zero_discount_at must be 'end' or 'start', got {zero_discount_at!r}")
        shape = envs.single_observation_space.shape
        if shape is None:
            raise ValueError(
                f"its observation space {envs.single_observation_space} has no shape; wrap "
                "the env so that it observes a flat Box (gymnasium's FlattenObservation)"
            )
        self.envs = envs
        self.streams = int(envs.num_envs)
        self.gamma = gamma
        self.observation_size = int(np.prod(shape))
        self.actions = actions
        self.zero_discount_at = zero_discount_at
        self.references = dict(references or {})
        self.reference_names = tuple(self.references)
        self.labels = list(labels) if labels is not None else [""] * self.streams
        self.description = description
        observation, _ = envs.reset(seed=seed)
        self._observation = np.asarray(observation).reshape(self.streams, -1)
        self._cumulant = np.zeros(self.streams)
        self._start = np.ones(self.streams, dtype=bool)  # the first observation starts one
        self._ended = np.zeros(self.streams, dtype=bool)

    def _discount(self) -> np.ndarray:
        zero = self._start if self.zero_discount_at == "start" else self._ended | self._start
        return np.where(zero, 0.0, self.gamma)

    def steps(self, count: int) -> Steps:
        """The next ``count`` steps; the envs run one step ahead of what was returned."""
        observations, cumulants, discounts, starts = [], [], [], []
        references: dict[str, list[np.ndarray]] = {name: [] for name in self.references}
        for _ in range(count):
            observations.append(self._observation)
            cumulants.append(self._cumulant)
            discounts.append(self._discount())
            starts.append(self._start)
            for name, predictor in self.references.items():
                references[name].append(predictor(self._cumulant))
            observation, reward, terminated, truncated, _ = self.envs.step(self.actions())
            self._observation = np.asarray(observation).reshape(self.streams, -1)
            self._cumulant = np.asarray(reward, dtype=np.float64)
            # Next-step autoreset: the observation after an episode's last one is the next's
            # first.
            self._start, self._ended = self._ended, np.logical_or(terminated, truncated)
        return Steps(
            np.stack(observations),
            np.stack(cumulants),
            np.stack(discounts),
            np.stack(starts),
            None,
            {name: np.stack(values) for name, values in references.items()},
        )

    def close(self) -> None:
        """Close the envs."""
        self.envs.close()


class RunningMeanReward:
    """Reference predictor: the mean of a stream's cumulants so far, times 1 / (1 - γ).

    Example:
        >>> predictor = RunningMeanReward(streams=2, gamma=0.5)
        >>> predictor(np.array([1.0, 0.0])).tolist()
        [2.0, 0.0]
        >>> predictor(np.array([0.0, 0.0])).tolist()
        [1.0, 0.0]

    Args:
        streams: number of streams B.
        gamma: discount in [0, 1).
    """

    def __init__(self, streams: int, gamma: float) -> None:
        self.scale = 1.0 / (1.0 - gamma)
        self.cumulant_sum = np.zeros(streams)
        self.count = 0

    def __call__(self, cumulant: np.ndarray) -> np.ndarray:
        """Fold in c_t ``[B]``; return the prediction for G_t ``[B]``."""
        self.cumulant_sum += cumulant
        self.count += 1
        return self.cumulant_sum / self.count * self.scale
