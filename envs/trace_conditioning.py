"""Gymnasium envs of the animal-learning prediction benchmarks (Rafiee et al.; Javed et al.).

Three continuing prediction tasks: :class:`TraceConditioning`, :class:`TracePatterning` and
:class:`NoisyPatterning`, each with a natively vectorised twin (``...VectorEnv``) that steps
B independent streams with numpy array operations. The single env is the one-stream case of
the same simulator (:class:`~agentstate.envs.trace_simulator.TrialStreams`), so the two
cannot diverge.

Interface (all six classes):
    * ``action_space = Discrete(1)``: the action is ignored (prediction task).
    * Observation: float32 Box in {0, 1}^d, layout ``[US, CS_1 .. CS_n_cs, distractors]``.
    * ``reward`` = cumulant c_t = the US bit of the new observation.
    * ``info["return_target"]`` = G_t = Σ_{k≥1} γ^{k−1} c_{t+k}, the exact discounted future
      cumulant (infinite horizon, truncation below 1e-14), from ``reset`` and ``step``.
    * Never terminates or truncates. ``gamma`` holds the preset's discount.
    * Vector envs save and restore their exact state with ``state_dict`` / ``load_state_dict``.

Every number is a constructor argument; see :mod:`agentstate.envs.trace_presets` for the
fields, the ``"jmlr2023"`` (default) and ``"rafiee2022"`` presets and what each means.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .trace_presets import (
    NoisyPatterningConfig,
    TraceConditioningConfig,
    TracePatterningConfig,
)
from .trace_simulator import TrialStreams

__all__ = [
    "NoisyPatterning",
    "NoisyPatterningVectorEnv",
    "TraceConditioning",
    "TraceConditioningVectorEnv",
    "TracePatterning",
    "TracePatterningVectorEnv",
]

FamilyConfig = TraceConditioningConfig | TracePatterningConfig | NoisyPatterningConfig


def _check_render_mode(render_mode: str | None) -> None:
    if render_mode is not None:
        raise ValueError(f"render_mode must be None (no rendering), got {render_mode!r}")


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer)):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")


def _observation_space(n_channels: int) -> spaces.Box:
    return spaces.Box(low=0.0, high=1.0, shape=(n_channels,), dtype=np.float32)


class _TraceEnv(gym.Env[np.ndarray, np.int64]):
    """One stream of a trace benchmark; subclasses name the family's config type.

    Args:
        preset: ``"jmlr2023"`` (default) or ``"rafiee2022"``.
        render_mode: must be None.
        **overrides: fields of the family's config replacing the preset's values.

    """

    metadata = {"render_modes": []}
    config_type: ClassVar[type[FamilyConfig]]

    def __init__(
        self, preset: str = "jmlr2023", render_mode: str | None = None, **overrides: Any
    ) -> None:
        _check_render_mode(render_mode)
        self.config = self.config_type.from_preset(preset, **overrides)
        self.gamma = float(self.config.gamma)
        self._streams = TrialStreams(self.config.as_trace_patterning(), n_streams=1)
        self.observation_space = _observation_space(self._streams.n_channels)
        self.action_space = spaces.Discrete(1)

    @property
    def valid_patterns(self) -> np.ndarray:
        """CS patterns followed by the US (before flips): [n_valid_patterns, n_cs] bool."""
        return self._streams.valid_patterns[0].copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start the stream at a trial onset; ``seed`` makes everything reproducible.

        Args:
            seed: seed of every random choice (valid patterns, timings, distractors), or None
                to continue the current generators.
            options: unused.

        Returns:
            ``(observation [d], {"return_target": G_0})``.

        """
        _check_seed(seed)
        super().reset(seed=seed)  # Gymnasium's np_random bookkeeping; the streams seed themselves
        observation, return_target = self._streams.reset(seed)
        return observation[0], {"return_target": float(return_target[0])}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Advance one step; ``action`` is ignored.

        Returns:
            ``(observation [d], cumulant, False, False, {"return_target": G_t})``.

        """
        observations, cumulants, return_targets = self._streams.advance(1)
        info = {"return_target": float(return_targets[0, 0])}
        return observations[0, 0], float(cumulants[0, 0]), False, False, info


class _TraceVectorEnv(VectorEnv):
    """B independent streams of a trace benchmark; subclasses name the config type.

    Args:
        num_envs: number of streams B (>= 1).
        preset: ``"jmlr2023"`` (default) or ``"rafiee2022"``.
        render_mode: must be None.
        **overrides: fields of the family's config replacing the preset's values.

    """

    metadata = {
        "render_modes": [],
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }
    config_type: ClassVar[type[FamilyConfig]]

    def __init__(
        self,
        num_envs: int = 1,
        preset: str = "jmlr2023",
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        _check_render_mode(render_mode)
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        self.config = self.config_type.from_preset(preset, **overrides)
        self.gamma = float(self.config.gamma)
        self.num_envs = num_envs
        self._streams = TrialStreams(self.config.as_trace_patterning(), n_streams=num_envs)
        self.single_observation_space = _observation_space(self._streams.n_channels)
        self.single_action_space = spaces.Discrete(1)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    @property
    def valid_patterns(self) -> np.ndarray:
        """Each stream's CS patterns followed by the US: [B, n_valid_patterns, n_cs] bool."""
        return self._streams.valid_patterns.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start every stream at a trial onset; stream b is seeded from ``(seed, b)``.

        Args:
            seed: root seed, or None to continue the current generators.
            options: unused.

        Returns:
            ``(observations [B, d], {"return_target": [B], "_return_target": [B] bool})``.

        """
        _check_seed(seed)
        super().reset(seed=seed)  # Gymnasium's np_random bookkeeping; the streams seed themselves
        observations, return_targets = self._streams.reset(seed)
        return observations, self._info(return_targets)

    def step(
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Advance every stream one step; ``actions`` are ignored.

        Returns:
            ``(observations [B, d], cumulants [B], terminations [B], truncations [B], infos)``
            with ``infos["return_target"]`` of shape [B].

        """
        observations, cumulants, return_targets = self._streams.advance(1)
        never = np.zeros(self.num_envs, dtype=bool)
        return observations[0], cumulants[0], never, never.copy(), self._info(return_targets[0])

    def rollout(self, n_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance ``n_steps`` steps at once: exactly what as many ``step`` calls return.

        Args:
            n_steps: number of steps (>= 0).

        Returns:
            ``observations [n_steps, B, d] float32``, ``cumulants [n_steps, B] float32`` and
            ``return_targets [n_steps, B] float64``.

        """
        return self._streams.advance(n_steps)

    def state_dict(self) -> dict[str, Any]:
        """The streams' complete state (generators, schedule, rendered steps), for checkpoints.

        ``load_state_dict`` on an env built with the same arguments continues every stream
        exactly where this one is; see :meth:`TrialStreams.state_dict`.
        """
        return self._streams.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; a state of another config or size is refused."""
        self._streams.load_state_dict(state)

    def _info(self, return_targets: np.ndarray) -> dict[str, Any]:
        return {"return_target": return_targets, "_return_target": np.ones(self.num_envs, bool)}


class TraceConditioning(_TraceEnv):
    """Trace conditioning: a CS, a trace gap, then the US; distractors are noise.

    Observation ``[US, CS, distractor_1 .. distractor_n]`` (jmlr2023: 7 bits, 5 distractors;
    rafiee2022: 12 bits, 10 distractors). Fields: :class:`TraceConditioningConfig`.

    Example:
        >>> from agentstate.envs import TraceConditioning
        >>> env = TraceConditioning()
        >>> observation, info = env.reset(seed=0)
        >>> observation[:2].tolist(), env.gamma  # step 0 is a trial onset: CS on
        ([0.0, 1.0], 0.9)
        >>> observation, cumulant, terminated, truncated, info = env.step(0)
        >>> observation.shape, terminated, truncated, sorted(info)
        ((7,), False, False, ['return_target'])

    """

    config_type = TraceConditioningConfig


class TracePatterning(_TraceEnv):
    """Trace patterning: only valid CS patterns are followed, after a trace gap, by the US.

    Observation ``[US, CS_1 .. CS_n_cs, distractor_1 .. distractor_n]`` (jmlr2023: 12 bits,
    3 of 6 CS on at each trial onset; rafiee2022: 17 bits). ``valid_patterns`` holds the
    seed's valid patterns. Fields: :class:`TracePatterningConfig`.

    Example:
        >>> from agentstate.envs import TracePatterning
        >>> env = TracePatterning()
        >>> observation, info = env.reset(seed=0)
        >>> observation.shape, int(observation[1:7].sum()), env.valid_patterns.shape
        ((12,), 3, (10, 6))

    """

    config_type = TracePatterningConfig


class NoisyPatterning(_TraceEnv):
    """Noisy patterning: patterning with the US right after the CS (ISI = CS duration).

    Observation as :class:`TracePatterning`. Fields: :class:`NoisyPatterningConfig`.

    Example:
        >>> from agentstate.envs import NoisyPatterning
        >>> env = NoisyPatterning(preset="rafiee2022")
        >>> observation, info = env.reset(seed=0)
        >>> observation.shape, env.gamma
        ((17,), 0.75)

    """

    config_type = NoisyPatterningConfig


class TraceConditioningVectorEnv(_TraceVectorEnv):
    """B independent :class:`TraceConditioning` streams, stepped with array operations.

    Example:
        >>> import gymnasium as gym
        >>> import agentstate.envs
        >>> envs = gym.make_vec("agentstate/TraceConditioning-v0", num_envs=4)
        >>> observations, infos = envs.reset(seed=0)
        >>> observations.shape, infos["return_target"].shape, envs.gamma
        ((4, 7), (4,), 0.9)
        >>> observations, cumulants, return_targets = envs.rollout(1000)
        >>> observations.shape, cumulants.shape, return_targets.shape
        ((1000, 4, 7), (1000, 4), (1000, 4))

    """

    config_type = TraceConditioningConfig


class TracePatterningVectorEnv(_TraceVectorEnv):
    """B independent :class:`TracePatterning` streams, each with its own valid patterns.

    Example:
        >>> from agentstate.envs import TracePatterningVectorEnv
        >>> envs = TracePatterningVectorEnv(num_envs=3, preset="rafiee2022")
        >>> observations, infos = envs.reset(seed=0)
        >>> observations.shape, envs.valid_patterns.shape
        ((3, 17), (3, 10, 6))

    """

    config_type = TracePatterningConfig


class NoisyPatterningVectorEnv(_TraceVectorEnv):
    """B independent :class:`NoisyPatterning` streams, stepped with array operations.

    Example:
        >>> from agentstate.envs import NoisyPatterningVectorEnv
        >>> envs = NoisyPatterningVectorEnv(num_envs=2)
        >>> observations, infos = envs.reset(seed=1)
        >>> observations, cumulants, terminations, truncations, infos = envs.step([0, 0])
        >>> cumulants.shape, terminations.tolist(), infos["_return_target"].tolist()
        ((2,), [False, False], [True, True])

    """

    config_type = NoisyPatterningConfig
