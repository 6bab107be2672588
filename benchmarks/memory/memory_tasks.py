"""The benchmark's tasks: POPGym (any level) and the cue-memory task, with flat observations.

Every method sees the same observation: one float32 vector, Box parts flattened, Discrete
and MultiDiscrete parts one-hot, Tuple parts concatenated (``FlatObservation``). DQN, which
needs Discrete actions, gets the joint ``Discrete(prod(nvec))`` of a MultiDiscrete action
space (``JointDiscreteAction``). ``LaggedObservations`` and ``ReconstructionCumulants`` let
the agent state be trained to reconstruct earlier inputs (``reconstruct_lags``).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CUE_ENV_PATH = Path(__file__).resolve().parents[2] / "examples" / "memory_task" / "memory_env.py"
CUE_TASK = "CueMemory"
CUE_DELAY = 10
"""Blank steps between cue and decision (the README's cue-memory table)."""


@functools.cache
def popgym_tasks() -> dict[str, type[gym.Env]]:
    """Every POPGym task importable here, by class name (``RepeatPreviousEasy``, ...)."""
    from popgym.envs import ALL

    return {cls.__name__: cls for cls in ALL}


def popgym_easy_tasks() -> list[str]:
    """POPGym's Easy level (``popgym.envs.ALL_EASY``; Labyrinth tasks only with mazelib)."""
    from popgym.envs import ALL_EASY

    return [cls.__name__ for cls in ALL_EASY]


def task_names() -> list[str]:
    """Every task the harness can build."""
    return [*popgym_tasks(), CUE_TASK]


def _cue_memory_env_class() -> Callable[..., gym.Env]:
    """``CueMemoryEnv`` from ``examples/memory_task/memory_env.py`` (one source of truth)."""
    name = "agentstate_benchmark_memory_env"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CUE_ENV_PATH)
        assert spec is not None and spec.loader is not None, CUE_ENV_PATH
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].CueMemoryEnv


def make_task(task: str) -> FlatObservation:
    """The task's env with flat float32 observations (``FlatObservation``).

    Raises:
        ValueError: on an unknown task name.
    """
    if task == CUE_TASK:
        env = _cue_memory_env_class()(delay=CUE_DELAY)
    elif task in popgym_tasks():
        env = popgym_tasks()[task]()
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(task_names())}")
    return FlatObservation(env)


@functools.cache
def task_spaces(task: str) -> tuple[spaces.Box, spaces.Space]:
    """``(flat observation space, action space)`` of a task."""
    env = make_task(task)
    assert isinstance(env.observation_space, spaces.Box)
    return env.observation_space, env.action_space


class FlatObservation(gym.ObservationWrapper):
    """Observations as one float32 vector: Box flattened, Discrete / MultiDiscrete one-hot.

    Tuple and Dict parts are concatenated (``gymnasium.spaces.flatten``), so a POPGym
    ``Tuple(Discrete(2), Discrete(4))`` becomes 6 numbers. Every method sees this vector,
    and the agent-state wrapper encodes it as the Box it is.

    Example:
        >>> env = FlatObservation(popgym_tasks()["RepeatPreviousEasy"]())
        >>> env.env.observation_space, env.observation_space.shape
        (Discrete(4), (4,))
        >>> observation, info = env.reset(seed=0)
        >>> observation.dtype, observation.sum()
        (dtype('float32'), np.float32(1.0))
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        flat = spaces.flatten_space(env.observation_space)
        assert isinstance(flat, spaces.Box), flat
        self.observation_space = spaces.Box(
            flat.low.astype(np.float32), flat.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation: Any) -> np.ndarray:
        flat = spaces.flatten(self.env.observation_space, observation)
        return np.asarray(flat, dtype=np.float32)


class JointDiscreteAction(gym.ActionWrapper):
    """A MultiDiscrete action space as one Discrete space over every combination.

    Action ``k`` is the mixed-radix digits of ``k`` (last dimension fastest), so DQN,
    which needs Discrete actions, can play POPGym's Battleship and MineSweeper.

    Example:
        >>> from gymnasium.envs.classic_control import CartPoleEnv
        >>> env = CartPoleEnv()
        >>> env.action_space = spaces.MultiDiscrete([3, 4])
        >>> wrapped = JointDiscreteAction(env)
        >>> wrapped.action_space, wrapped.action(7).tolist()
        (Discrete(12), [1, 3])
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        assert isinstance(env.action_space, spaces.MultiDiscrete), env.action_space
        self._nvec = env.action_space.nvec.ravel()
        self.action_space = spaces.Discrete(int(np.prod(self._nvec)))

    def action(self, action: Any) -> np.ndarray:
        digits = np.unravel_index(int(action), tuple(self._nvec))
        return np.asarray(digits, dtype=self.env.action_space.dtype).reshape(
            self.env.action_space.shape
        )


class LaggedObservations(gym.Wrapper):
    """Puts the observations of ``lags`` steps ago into ``info["lagged_observations"]``.

    On a step into ``o_t`` the entry is ``[o_{t-k} for k in lags]`` concatenated, zeros for
    times before the episode began. ``ReconstructionCumulants`` reads it.
    """

    def __init__(self, env: gym.Env, lags: Sequence[int]) -> None:
        super().__init__(env)
        self.lags = tuple(lags)
        self._history: list[np.ndarray] = []

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        self._history = [observation]
        return observation, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._history = [*self._history[-max(self.lags) :], observation]
        info["lagged_observations"] = np.concatenate(
            [
                self._history[-1 - lag] if lag < len(self._history) else np.zeros_like(observation)
                for lag in self.lags
            ]
        )
        return observation, reward, terminated, truncated, info


@dataclass(frozen=True)
class ReconstructionCumulants:
    """Cumulants that make the agent state reconstruct earlier inputs.

    With ``cumulants`` from the wrapper's names (its reward and/or observation heads) and
    lags ``k``: the cumulant that arrives with ``o_{t+1}`` also holds ``o_{t+1-k}``, so the
    head at time t predicts ``sum_j gamma^j o_{t+1-k+j}``, whose first ``k - 1`` terms are
    inputs the state must still hold. Needs ``LaggedObservations`` under the vector env.
    """

    base: str
    """``reward``, ``observation`` or ``reward+observation``: the other heads."""
    observation_size: int
    lags: tuple[int, ...]

    def __call__(self, observation: Any, reward: float, info: Mapping[str, Any]) -> np.ndarray:
        parts = [np.array([reward])] if "reward" in self.base else []
        if "observation" in self.base:
            parts.append(np.asarray(observation, dtype=np.float64).ravel())
        lagged = info.get("lagged_observations")
        if lagged is None:  # the wrapper's probe of the output size, and reset steps
            lagged = np.zeros(self.observation_size * len(self.lags))
        parts.append(np.asarray(lagged, dtype=np.float64))
        return np.concatenate(parts)

    def discounts(self, gamma: float, reconstruct_gamma: float) -> tuple[float, ...]:
        """One discount per head: ``gamma`` for the base heads, ``reconstruct_gamma`` for the
        reconstruction heads (0: each is a supervised loss on h_t).
        """
        base = ("reward" in self.base) + ("observation" in self.base) * self.observation_size
        lagged = self.observation_size * len(self.lags)
        return (float(gamma),) * base + (float(reconstruct_gamma),) * lagged


def describe_tasks(tasks: Sequence[str]) -> str:
    """A markdown table: each task's spaces, and how DQN's Discrete actions are met."""
    lines = ["| task | observation -> flat size | action | DQN |", "|---|---|---|---|"]
    for task in tasks:
        observation_space, action_space = task_spaces(task)
        if isinstance(action_space, spaces.Discrete):
            dqn = "yes"
        elif isinstance(action_space, spaces.MultiDiscrete):
            dqn = f"joint Discrete({int(np.prod(action_space.nvec))})"
        else:
            dqn = "not run (Box actions)"
        original = describe_space(make_task(task).env.observation_space)
        lines.append(
            f"| {task} | {original} -> {observation_space.shape[0]} | "
            f"{describe_space(action_space)} | {dqn} |"
        )
    return "\n".join(lines) + "\n"


def describe_space(space: spaces.Space) -> str:
    """A short name of a space: ``Box(2,) in [-4.8, 4.8]``, ``MultiDiscrete(52 x 3)``.

    Example:
        >>> describe_space(spaces.Tuple([spaces.Discrete(2), spaces.MultiDiscrete([3] * 9)]))
        'Tuple(Discrete(2), MultiDiscrete(9 x 3))'
    """
    if isinstance(space, spaces.Box):
        return f"Box{space.shape} in [{space.low.min():g}, {space.high.max():g}]"
    if isinstance(space, spaces.MultiDiscrete):
        sizes = space.nvec.ravel().tolist()
        if len(sizes) > 4 and len(set(sizes)) == 1:
            return f"MultiDiscrete({len(sizes)} x {sizes[0]})"
        return f"MultiDiscrete({sizes})"
    if isinstance(space, spaces.Tuple):
        return f"Tuple({', '.join(map(describe_space, space.spaces))})"
    return str(space)
