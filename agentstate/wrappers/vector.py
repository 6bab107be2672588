"""``AgentStateVectorWrapper``: one online-learned agent state per sub-env of a vector env."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from agentstate.wrappers.controls import AgentStateControls
from agentstate.wrappers.core import NONFINITE_INFO_KEY, AgentStateCore, StepBatch, StepResult
from agentstate.wrappers.settings import AgentStateSettings, settings_from_options


class AgentStateVectorWrapper(AgentStateControls, gym.vector.VectorWrapper):
    """``AgentStateWrapper`` for a Gymnasium vector env: ONE learner, one stream per sub-env.

    The N sub-envs are N streams of one ``TDPredictor``: parameters are shared, each step
    is one batched call, and the TD updates of the streams are averaged. Episodes end and
    restart per stream. Both auto-reset modes are supported: ``NEXT_STEP`` (the default:
    the reset observation comes on the step after the end) and ``SAME_STEP`` (the terminal
    observation comes in ``infos["final_obs"]``, which then holds the augmented one).

    Example:
        >>> import gymnasium as gym
        >>> from agentstate import AgentStateVectorWrapper
        >>> envs = gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="sync")
        >>> envs = AgentStateVectorWrapper(envs, n_features=8, seed=0)
        >>> observations, infos = envs.reset(seed=0)
        >>> observations.shape, envs.single_observation_space.shape
        ((3, 24), (24,))
        >>> observations, rewards, terminations, truncations, infos = envs.step([0, 1, 0])
        >>> observations.dtype
        dtype('float32')

    Change logs:
        * v0.1.0 - Initially added.
    """

    def __init__(
        self, env: gym.vector.VectorEnv, learner: str = AgentStateSettings.learner, **options: Any
    ):
        """Wrap ``env``; ``options`` are the keyword arguments of ``AgentStateWrapper``."""
        super().__init__(env)
        self.autoreset_mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if self.autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(
                f"autoreset mode {self.autoreset_mode} is not supported: with partial resets "
                "the streams of one learner would fall out of step. Use "
                "AutoresetMode.NEXT_STEP (the default) or AutoresetMode.SAME_STEP"
            )
        self.core = AgentStateCore(
            env.single_observation_space,
            env.single_action_space,
            env.num_envs,
            settings_from_options(learner, options),
        )
        self.single_observation_space = self.core.observation_space
        self.observation_space = batch_space(self.core.observation_space, env.num_envs)
        self._ended = np.zeros(env.num_envs, dtype=bool)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every sub-env and start a new episode on every stream."""
        observations, infos = self.env.reset(seed=seed, options=options)
        self._ended[:] = False
        result = self.core.step(
            StepBatch.reset(observations, self.num_envs, self._stream_infos(infos))
        )
        return result.observations, self._report(infos, result)

    def step(
        self, actions: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every sub-env, learn from the transitions, return augmented observations."""
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        ended = np.logical_or(terminations, truncations)
        final_observations: dict[int, Any] = {}
        final_infos: dict[int, Mapping[str, Any]] = {}
        if self.autoreset_mode == AutoresetMode.SAME_STEP and ended.any():
            final_observations = {int(i): infos["final_obs"][i] for i in np.flatnonzero(ended)}
            if self.core.cumulants.needs_info:
                final_infos = {
                    i: _stream_info(infos["final_info"], i, self.num_envs)
                    for i in final_observations
                }
        result = self.core.step(
            StepBatch(
                observations=observations,
                rewards=rewards,
                terminated=terminations,
                truncated=truncations,
                episode_start=self._ended.copy(),
                actions=actions,
                infos=self._stream_infos(infos),
                final_observations=final_observations,
                final_infos=final_infos,
            )
        )
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._ended = ended
        if result.final_observations:
            augmented = np.empty(self.num_envs, dtype=object)
            for stream, observation in result.final_observations.items():
                augmented[stream] = observation
            infos["final_obs"] = augmented
        return result.observations, rewards, terminations, truncations, self._report(infos, result)

    def _stream_infos(self, infos: dict[str, Any]) -> list[dict[str, Any]] | None:
        """One info dict per stream, for a cumulant callable (vector infos are per key)."""
        if not self.core.cumulants.needs_info:
            return None
        return [_stream_info(infos, stream, self.num_envs) for stream in range(self.num_envs)]

    def _report(self, infos: dict[str, Any], result: StepResult) -> dict[str, Any]:
        for stream, names in result.nonfinite.items():
            infos = self._add_info(infos, {NONFINITE_INFO_KEY: names}, stream)
        return infos


def _stream_info(infos: Mapping[str, Any], stream: int, num_envs: int) -> dict[str, Any]:
    """Stream ``stream``'s entries of a vector info dict (keys masked by ``_key``)."""
    present = np.ones(num_envs, dtype=bool)
    return {
        key: values[stream]
        for key, values in infos.items()
        if not key.startswith("_") and infos.get(f"_{key}", present)[stream]
    }
