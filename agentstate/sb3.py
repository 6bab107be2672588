"""Stable-Baselines3 support: a VecEnv wrapper with one learner, logging, save and load.

``AgentStateVecEnv`` gives every SB3 algorithm (PPO, A2C, DQN, SAC, ...) memory through an
agent state learned online. ``AgentStateLoggerCallback`` records the state learner's own
metrics in SB3's logger, beside the algorithm's. The learner and TD state are not part of
the SB3 model zip: ``save_model`` / ``load_model`` write and restore the model, the agent
state and ``VecNormalize`` statistics together (``save_agent_state`` / ``load_agent_state``
handle the agent state alone), so a trained agent is reloaded and evaluated on identical
observations with one call.
"""

from __future__ import annotations

import functools
import io
import operator
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecEnvWrapper,
    VecNormalize,
    unwrap_vec_normalize,
)
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from agentstate.checkpoint import atomic_write_bytes
from agentstate.wrappers import AgentStateWrapper
from agentstate.wrappers.controls import AgentStateControls
from agentstate.wrappers.core import NONFINITE_INFO_KEY, AgentStateCore, StepBatch
from agentstate.wrappers.settings import AgentStateSettings, settings_from_options
from agentstate.wrappers.statistics import StatisticsTotals, summarize

SAVE_FORMAT = "agentstate.sb3/1"


class AgentStateVecEnv(AgentStateControls, VecEnvWrapper):
    """SB3 ``VecEnvWrapper``: ONE learner for all N envs, one stream per env.

    Each observation becomes ``[enc(o_t), enc(o_t-1), ..., enc(o_t-M), h_t]`` (M =
    ``observe_past``, 3 by default) as in ``agentstate.AgentStateWrapper``;
    the N envs are N streams of one ``TDPredictor`` (shared parameters, averaged updates,
    one batched call per step). SB3 VecEnvs reset an env in the step that ends its episode;
    ``infos[i]["terminal_observation"]`` then holds the *augmented* terminal observation,
    and the terminal transition is learned from (discount 0 when terminated, bootstrapped
    when ``infos[i]["TimeLimit.truncated"]``). Works over ``DummyVecEnv`` and
    ``SubprocVecEnv`` (the learner lives in this process).

    ``VecNormalize`` works on either side. Recommended: outside,
    ``VecNormalize(AgentStateVecEnv(venv))``. The learner then predicts the env's own
    rewards (a normalised reward is rescaled as its statistics move, so the cumulant the
    heads predict would drift) and normalises its inputs itself, while the policy sees the
    agent state scaled to unit variance like the observation. Inside,
    ``AgentStateVecEnv(VecNormalize(venv))``, serves on-policy algorithms (PPO, A2C) only:
    SB3's off-policy algorithms fill their replay buffer with ``VecNormalize``'s
    un-normalised observations, which then lack the agent state. Inside, the normalised
    observations' bounds are taken as ``[-clip_obs, clip_obs]``.

    Example:
        >>> import gymnasium as gym
        >>> from stable_baselines3 import PPO
        >>> from stable_baselines3.common.vec_env import DummyVecEnv
        >>> from agentstate.sb3 import AgentStateVecEnv
        >>> venv = DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2)
        >>> venv = AgentStateVecEnv(venv, n_features=8, seed=0)
        >>> venv.observation_space.shape
        (24,)
        >>> model = PPO("MlpPolicy", venv, n_steps=32, batch_size=32, n_epochs=1, seed=0)
        >>> model = model.learn(total_timesteps=64)

    Change logs:
        * v0.1.0 - Initially added.
    """

    def __init__(
        self, venv: VecEnv, learner: str = AgentStateSettings.learner, **options: Any
    ) -> None:
        """Wrap ``venv``; ``options`` are the keyword arguments of ``AgentStateWrapper``."""
        self.core = AgentStateCore(
            _observation_space(venv),
            venv.action_space,
            venv.num_envs,
            settings_from_options(learner, options),
        )
        super().__init__(venv, observation_space=self.core.observation_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        """Reset every env and start a new episode on every stream."""
        observations = self.venv.reset()
        result = self.core.step(StepBatch.reset(observations, self.num_envs, self.venv.reset_infos))
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


def _observation_space(venv: VecEnv) -> spaces.Space:
    """The space ``venv``'s observations lie in.

    ``VecNormalize`` clips what it normalises to ``[-clip_obs, clip_obs]`` but keeps the
    env's bounds in its ``observation_space`` (SB3 keeps them for saved policies); those
    bounds would make the augmented observation space lie.
    """
    space = venv.observation_space
    normalizer = unwrap_vec_normalize(venv)
    if normalizer is None or not normalizer.norm_obs or normalizer.observation_space != space:
        return space
    clipped = functools.partial(spaces.Box, -normalizer.clip_obs, normalizer.clip_obs)
    if isinstance(space, spaces.Dict):
        keys = normalizer.norm_obs_keys or []
        return spaces.Dict(
            {
                key: clipped(shape=part.shape, dtype=np.float32) if key in keys else part
                for key, part in space.spaces.items()
            }
        )
    return clipped(shape=space.shape, dtype=np.float32)


# ---------------------------------------------------------------------- logging
class AgentStateLoggerCallback(BaseCallback):
    """Records the state learner's metrics in SB3's logger (TensorBoard, CSV, stdout).

    At each rollout end it records, under ``agent_state/``, for each cumulant group
    (``reward``, ``observation``, ``reconstruction`` with ``reconstruct_past``, or
    ``cumulant`` for a callable):
    ``mean_squared_td_error/<group>`` and ``msre/<group>`` (mean squared error of the
    predictions against the discounted return computed backward over the episodes that
    terminated; left out while none has); and ``state_rms`` (RMS of the agent state over
    streams and features) and ``steps_per_second`` (stream-steps per second of time spent
    in the learner's step). Each value covers the steps since the logger's previous dump
    (see ``agentstate.wrappers.statistics``). Statistics are switched on when training
    starts; they add about 10% to the learner's step time.

    Works with an ``AgentStateVecEnv`` anywhere in the VecEnv stack, or ``AgentStateWrapper``
    sub-envs (their sums are added).

    Example:
        >>> import gymnasium as gym, os, tempfile
        >>> from stable_baselines3 import PPO
        >>> from stable_baselines3.common.logger import configure
        >>> from stable_baselines3.common.vec_env import DummyVecEnv
        >>> venv = AgentStateVecEnv(DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2), seed=0)
        >>> model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> model.set_logger(configure(folder, ["csv"]))  # add "tensorboard" if installed
        >>> model = model.learn(64, callback=AgentStateLoggerCallback())
        >>> header = open(os.path.join(folder, "progress.csv")).readline().strip().split(",")
        >>> for key in sorted(header):
        ...     if key.startswith("agent_state/"):
        ...         print(key)
        agent_state/mean_squared_td_error/observation
        agent_state/mean_squared_td_error/reward
        agent_state/msre/observation
        agent_state/msre/reward
        agent_state/state_rms
        agent_state/steps_per_second

    Change logs:
        * v0.1.0 - Initially added.
    """

    def __init__(self, prefix: str = "agent_state", verbose: int = 0) -> None:
        """Record under ``prefix/``."""
        super().__init__(verbose)
        self.prefix = prefix
        self._recorded: list[str] = []

    def _init_callback(self) -> None:
        self._totals, self.groups = _statistics_source(self.training_env)
        self._window_start = self._last_record = self._totals()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        totals = self._totals()
        if not any(key in self.logger.name_to_value for key in self._recorded):
            # The logger has written our previous values: a new window begins there.
            self._window_start = self._last_record
        metrics = summarize(totals - self._window_start, self.groups)
        self._recorded = [f"{self.prefix}/{name}" for name in metrics]
        for key, value in zip(self._recorded, metrics.values(), strict=True):
            self.logger.record(key, value)
        self._last_record = totals


def _statistics_source(
    env: Any,
) -> tuple[Callable[[], StatisticsTotals], dict[str, slice]]:
    """Switch the statistics of ``env``'s learner(s) on; return their reader and groups."""
    controls = _find_controls(env)
    if controls is not None:
        controls.enable_statistics()
        return controls.statistics_totals, controls.cumulant_groups
    if _sub_env_count(env):
        env.env_method("enable_statistics")

        def added_totals() -> StatisticsTotals:
            return functools.reduce(operator.add, env.env_method("statistics_totals"))

        return added_totals, env.get_attr("cumulant_groups", indices=[0])[0]
    raise TypeError(_NOT_FOUND.format(type(env).__name__))


# ---------------------------------------------------------------------- save and load
Algorithm = TypeVar("Algorithm", bound=BaseAlgorithm)

_VEC_NORMALIZE_STATE = (
    "obs_rms",
    "ret_rms",
    "clip_obs",
    "clip_reward",
    "gamma",
    "epsilon",
    "norm_obs",
    "norm_reward",
    "norm_obs_keys",
    "training",
)
"""What ``load_model`` copies from a saved ``VecNormalize`` into the env's own."""


@dataclass(frozen=True)
class ModelFiles:
    """The files of one saved agent, named after one path.

    ``ModelFiles.at("runs/ppo")`` names ``runs/ppo.zip`` (the SB3 model),
    ``runs/ppo.agentstate.pt`` (``save_agent_state``) and ``runs/ppo.vecnormalize.pkl``
    (``VecNormalize`` statistics in SB3's own format, ``VecNormalize.load`` reads it;
    written only if the env has a ``VecNormalize``).

    Example:
        >>> ModelFiles.at("runs/ppo.zip").agent_state.as_posix()
        'runs/ppo.agentstate.pt'
    """

    model: Path
    agent_state: Path
    vec_normalize: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> ModelFiles:
        """The files for ``path``, with or without ``.zip``."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix == ".zip" else path
        return cls(
            model=stem.with_name(f"{stem.name}.zip"),
            agent_state=stem.with_name(f"{stem.name}.agentstate.pt"),
            vec_normalize=stem.with_name(f"{stem.name}.vecnormalize.pkl"),
        )


def save_model(model: BaseAlgorithm, path: str | os.PathLike[str]) -> ModelFiles:
    """Save ``model``, its env's agent state(s) and ``VecNormalize`` statistics together.

    Args:
        model: a trained SB3 model whose env holds an agent-state wrapper (any stack that
            ``save_agent_state`` accepts), with or without ``VecNormalize`` on either side.
        path: where to save, with or without ``.zip``: see ``ModelFiles``.

    Returns:
        The files written.

    Raises:
        ValueError: the model has no env.

    Example:
        >>> import gymnasium as gym, tempfile, os
        >>> from stable_baselines3 import PPO
        >>> from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
        >>> def make_env():
        ...     venv = DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2)
        ...     return VecNormalize(AgentStateVecEnv(venv, n_features=8, seed=0))
        >>> model = PPO("MlpPolicy", make_env(), n_steps=32, batch_size=64, seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "ppo")
        >>> files = save_model(model.learn(64), path)
        >>> evaluated = load_model(PPO, path, make_env(), evaluation=True)
    """
    env = model.get_env()
    if env is None:
        raise ValueError("the model has no env: save_model saves the env's agent state too")
    files = ModelFiles.at(path)
    save_agent_state(env, files.agent_state)
    normalizer = unwrap_vec_normalize(env)
    if normalizer is not None:
        atomic_write_bytes(files.vec_normalize, pickle.dumps(normalizer))
    elif files.vec_normalize.exists():
        files.vec_normalize.unlink()  # an earlier save's statistics must not be loaded
    model.save(files.model)
    return files


def load_model(
    algorithm: type[Algorithm],
    path: str | os.PathLike[str],
    env: VecEnv,
    *,
    evaluation: bool = False,
    **load_options: Any,
) -> Algorithm:
    """Restore what ``save_model`` wrote into a freshly built ``env``; return the model.

    Args:
        algorithm: the SB3 class (``PPO``, ``DQN``, ...).
        path: the path given to ``save_model``.
        env: the same stack as in training (wrappers, settings, number of envs may differ
            only as ``load_agent_state`` allows), built anew: its agent state and
            ``VecNormalize`` statistics are replaced by the saved ones.
        evaluation: freeze the agent-state learner(s) and the ``VecNormalize`` statistics
            and report raw rewards (``training = norm_reward = False``), as an evaluation
            script wants. False restores everything as saved, to continue training.
        **load_options: passed to ``algorithm.load`` (``device``, ``custom_objects``, ...).

    Raises:
        ValueError: the saved files and ``env`` disagree: one has ``VecNormalize`` and the
            other not, different observation shapes, or an agent state for another env or
            learner (see ``load_agent_state``).
    """
    files = ModelFiles.at(path)
    normalizer = unwrap_vec_normalize(env)
    saved_normalizer = files.vec_normalize.exists()
    if saved_normalizer != (normalizer is not None):
        raise ValueError(
            f"the model was saved {'with' if saved_normalizer else 'without'} VecNormalize "
            f"({files.vec_normalize}) but the env has {'none' if normalizer is None else 'one'}"
            "; build the env as in training"
        )
    if normalizer is not None:
        _load_vec_normalize(normalizer, files.vec_normalize)
    load_agent_state(env, files.agent_state)
    model = algorithm.load(files.model, env=env, **load_options)
    if evaluation:
        _freeze(env)
        if normalizer is not None:
            normalizer.training = False
            normalizer.norm_reward = False
    return model


def _load_vec_normalize(normalizer: VecNormalize, path: Path) -> None:
    with open(path, "rb") as file:
        saved = pickle.load(file)
    if not isinstance(saved, VecNormalize):
        raise ValueError(f"{path} does not hold VecNormalize statistics")
    saved_shape = getattr(saved.observation_space, "shape", None)
    if saved_shape != normalizer.observation_space.shape:
        raise ValueError(
            f"{path} normalises observations of shape {saved_shape}, the env's are "
            f"{normalizer.observation_space.shape}; build the env as in training"
        )
    for name in _VEC_NORMALIZE_STATE:
        setattr(normalizer, name, getattr(saved, name))


def _freeze(env: Any) -> None:
    controls = _find_controls(env)
    if controls is not None:
        controls.freeze()
    elif _sub_env_count(env):
        env.env_method("freeze")


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

__all__ = [
    "AgentStateLoggerCallback",
    "AgentStateVecEnv",
    "ModelFiles",
    "load_agent_state",
    "load_model",
    "save_agent_state",
    "save_model",
]
