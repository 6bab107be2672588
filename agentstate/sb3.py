"""Stable-Baselines3 support: a VecEnv wrapper with one learner, and save/load helpers.

``AgentStateVecEnv`` gives every SB3 algorithm (PPO, A2C, DQN, SAC, ...) memory through an
agent state learned online. Its learner and TD state are not part of the SB3 model zip;
``save_agent_state`` / ``load_agent_state`` keep them in a file beside it, so a trained agent
can be reloaded and evaluated on identical observations.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from agentstate.checkpoint import atomic_write_bytes
from agentstate.wrappers import AgentStateWrapper
from agentstate.wrappers.controls import AgentStateControls
from agentstate.wrappers.core import NONFINITE_INFO_KEY, AgentStateCore, StepBatch
from agentstate.wrappers.settings import settings_from_options

SAVE_FORMAT = "agentstate.sb3/1"


class AgentStateVecEnv(AgentStateControls, VecEnvWrapper):
    """SB3 ``VecEnvWrapper``: ONE learner for all N envs, one stream per env.

    Each observation becomes ``[enc(o_t), h_t]`` as in ``agentstate.AgentStateWrapper``;
    the N envs are N streams of one ``TDPredictor`` (shared parameters, averaged updates,
    one batched call per step). SB3 VecEnvs reset an env in the step that ends its episode;
    ``infos[i]["terminal_observation"]`` then holds the *augmented* terminal observation,
    and the terminal transition is learned from (discount 0 when terminated, bootstrapped
    when ``infos[i]["TimeLimit.truncated"]``). Works over ``DummyVecEnv`` and
    ``SubprocVecEnv`` (the learner lives in this process).

    Example:
        >>> import gymnasium as gym
        >>> from stable_baselines3 import PPO
        >>> from stable_baselines3.common.vec_env import DummyVecEnv
        >>> from agentstate.sb3 import AgentStateVecEnv
        >>> venv = DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2)
        >>> venv = AgentStateVecEnv(venv, n_features=8, seed=0)
        >>> venv.observation_space.shape
        (12,)
        >>> model = PPO("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0)
        >>> model = model.learn(total_timesteps=64)

    Change logs:
        * v0.1.0 - Initially added.
    """

    def __init__(self, venv: VecEnv, learner: str = "columnar", **options: Any) -> None:
        """Wrap ``venv``; ``options`` are the keyword arguments of ``AgentStateWrapper``."""
        self.core = AgentStateCore(
            venv.observation_space,
            venv.action_space,
            venv.num_envs,
            settings_from_options(learner, options),
        )
        super().__init__(venv, observation_space=self.core.observation_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        """Reset every env and start a new episode on every stream."""
        observations = self.venv.reset()
        result = self.core.step(
            StepBatch.reset(observations, self.num_envs, self.venv.reset_infos)
        )
        for stream, names in result.nonfinite.items():
            self.reset_infos[stream][NONFINITE_INFO_KEY] = names
        return result.observations

    def step_async(self, actions: np.ndarray) -> None:
        """Send ``actions`` to the envs (kept as the next step's previous actions)."""
        self._actions = actions
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """Receive the step, learn from it, and return augmented observations."""
        observations, rewards, dones, infos = self.venv.step_wait()
        truncated = np.array(
            [
                bool(done and info.get("TimeLimit.truncated", False))
                for done, info in zip(dones, infos, strict=True)
            ]
        )
        final_observations: dict[int, Any] = {}
        for index in np.flatnonzero(dones):
            if "terminal_observation" not in infos[index]:
                raise KeyError(
                    f"env {index} ended its episode without infos[{index}]"
                    "['terminal_observation']; AgentStateVecEnv needs SB3's auto-reset "
                    "contract (DummyVecEnv, SubprocVecEnv)"
                )
            final_observations[int(index)] = infos[index]["terminal_observation"]
        result = self.core.step(
            StepBatch(
                observations=observations,
                rewards=rewards,
                terminated=np.asarray(dones, dtype=bool) & ~truncated,
                truncated=truncated,
                episode_start=np.zeros(self.num_envs, dtype=bool),
                actions=self._actions,
                infos=infos,
                final_observations=final_observations,
                final_infos={stream: infos[stream] for stream in final_observations},
            )
        )
        for stream, observation in result.final_observations.items():
            infos[stream]["terminal_observation"] = observation
        for stream, names in result.nonfinite.items():
            infos[stream][NONFINITE_INFO_KEY] = names
        return result.observations, rewards, dones, infos


def save_agent_state(env: Any, path: str | os.PathLike[str]) -> Path:
    """Write the agent state(s) of ``env`` to ``path``, atomically.

    Writes a temporary file in the same folder, flushes it to disk, then renames it over
    ``path``: a crash leaves the old file or the new one, never a torn one. Keep it beside
    the SB3 model (``model.save("ppo")`` and ``save_agent_state(venv, "ppo.agentstate.pt")``).

    Args:
        env: an ``AgentStateVecEnv``, ``AgentStateWrapper`` or ``AgentStateVectorWrapper``;
            or a wrapper stack holding one (``VecNormalize(AgentStateVecEnv(...))``,
            ``gymnasium`` wrappers); or an SB3 VecEnv whose envs are ``AgentStateWrapper``s
            (one state per env, ``SubprocVecEnv`` included).
        path: the file to write.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> import gymnasium as gym, tempfile, os
        >>> from agentstate import AgentStateWrapper
        >>> env = AgentStateWrapper(gym.make("CartPole-v1"), seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> path = save_agent_state(env, os.path.join(folder, "ppo.agentstate.pt"))
        >>> load_agent_state(AgentStateWrapper(gym.make("CartPole-v1"), seed=1), path)
    """
    states = _get_states(env)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": SAVE_FORMAT, "states": states}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_agent_state(env: Any, path: str | os.PathLike[str]) -> None:
    """Load what ``save_agent_state`` wrote into ``env`` (same kinds of ``env``).

    Raises:
        ValueError: the file is not an agent-state file, holds a different number of
            states than ``env`` has learners, or was saved for a different observation
            size, learner or settings (checked before anything is loaded; with several
            ``AgentStateWrapper`` sub-envs, those before the refused one are loaded).
    """
    saved = torch.load(Path(path), weights_only=True)
    if not isinstance(saved, Mapping) or saved.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not an agent-state file (expected format {SAVE_FORMAT!r})")
    _set_states(env, saved["states"])


def _find_controls(env: Any) -> AgentStateControls | None:
    """The agent-state wrapper in a stack of SB3 VecEnv or gymnasium wrappers, if any."""
    while env is not None:
        if isinstance(env, AgentStateControls):
            return env
        env = getattr(env, "venv", None) or getattr(env, "env", None)
    return None


def _sub_env_count(env: Any) -> int:
    """Number of SB3 sub-envs wrapped in ``AgentStateWrapper``; refuses a partial mix."""
    if not isinstance(env, VecEnv):
        return 0
    wrapped = env.env_is_wrapped(AgentStateWrapper)
    if any(wrapped) and not all(wrapped):
        raise ValueError("only some sub-envs are wrapped in AgentStateWrapper; wrap all or none")
    return len(wrapped) if all(wrapped) else 0


def _get_states(env: Any) -> list[dict[str, Any]]:
    controls = _find_controls(env)
    if controls is not None:
        return [controls.state_dict()]
    if _sub_env_count(env):
        return list(env.env_method("state_dict"))
    raise TypeError(_NOT_FOUND.format(type(env).__name__))


def _set_states(env: Any, states: list[Mapping[str, Any]]) -> None:
    controls = _find_controls(env)
    n_learners = 1 if controls is not None else _sub_env_count(env)
    if n_learners == 0:
        raise TypeError(_NOT_FOUND.format(type(env).__name__))
    if len(states) != n_learners:
        raise ValueError(
            f"the file holds {len(states)} agent state(s) but the env has {n_learners} "
            "learner(s); save and load with the same kind of env (one AgentStateVecEnv, or "
            "the same number of AgentStateWrapper sub-envs)"
        )
    if controls is not None:
        controls.load_state_dict(states[0])
        return
    for index, state in enumerate(states):
        env.env_method("load_state_dict", state, indices=[index])


_NOT_FOUND = (
    "{} holds no agent-state wrapper: pass an AgentStateVecEnv, AgentStateWrapper, "
    "AgentStateVectorWrapper, a wrapper stack around one, or an SB3 VecEnv of "
    "AgentStateWrapper envs"
)

__all__ = ["AgentStateVecEnv", "load_agent_state", "save_agent_state"]
