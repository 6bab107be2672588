"""``agentstate/AtariPrediction-v0``: policy evaluation on Atari, frame by frame.

Replay mode (the Atari Prediction Benchmark, background §5): a pre-trained Rainbow-DQN
expert's actions were recorded one byte per emulator frame, ``'a' + k`` = action ``k`` of the
game's minimal action set and ``'R'`` = reset the game. Replaying a file in ALE with
``random_seed = 1731038949``, ``repeat_action_probability = 0`` and ``frame_skip = 1``
reproduces the expert's play exactly (Pong 21-0 every episode; Breakout 362, 355, 378). This
module drives ``ale_py.ALEInterface`` directly, the way the authors' C++ does, so the seeding
and the reset sequence are exactly theirs: a fresh emulator loads the ROM, and each ``'R'``
calls ``reset_game()``.

Live mode: any callable ``observation -> action`` (or a Stable-Baselines3 model) acts in a
Gymnasium ALE env; the learner's input is built from that env's screen the same way, so a
user's own agent is evaluated by the same loop.

Either way the expert (or the policy) chooses the game action: the env's action space has a
single element and the action passed to ``step`` is ignored. The reward is the clipped game
reward (the cumulant); ``info`` carries ``raw_reward``, ``lives`` and ``game_over``, and in
replay mode ``file_position`` and ``replay_pass``.

Episodes. Replay: an episode ends on the frame before an ``'R'`` byte; ``terminated`` if the
game is over there, else ``truncated`` (the expert's 108,000-frame time limit; in the files
every game over is followed by one more recorded frame, then ``'R'``). ``reset()`` consumes the
``'R'``; called mid-episode it first emulates the rest of the recorded episode (the replay
stays exact). When the file runs out the episode is truncated, and the next ``reset()`` replays
the file again from its start in a freshly created emulator (``info["replay_pass"]`` counts
the passes; every pass is identical). ``reset(seed=...)`` restarts the file from its start
(pass 1), so seeded resets are deterministic.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .atari_preprocessing import (
    N_ALE_ACTIONS,
    SCREEN_SHAPE,
    PredictionObservation,
    clip_reward,
    resolve_policy_file,
)

try:
    import ale_py
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "agentstate/AtariPrediction-v0 needs ale-py and opencv: pip install 'agentstate[atari]'"
    ) from error

ALE_SEED = 1731038949
"""ALE ``random_seed`` the expert files were recorded with."""
RESET_BYTE = ord("R")
FIRST_ACTION_BYTE = ord("a")

Policy = Callable[[Any], Any]
"""``observation -> action``: an index into the action space of the env the policy acts in."""


def rom_id(game: str) -> str:
    """ale-py's ROM name of a benchmark game.

    Example:
        >>> rom_id("SpaceInvaders"), rom_id("Pong")
        ('space_invaders', 'pong')
    """
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


def read_action_file(path: str | os.PathLike[str]) -> bytes:
    """The recorded bytes of an expert action file, checked.

    Raises:
        ValueError: if the file does not start with ``'R'``, holds a byte that is neither
            ``'R'`` nor an action ``'a'..'r'``, or an episode without frames (``'RR'``, or
            ``'R'`` last).
    """
    actions = Path(path).read_bytes()
    if not actions or actions[0] != RESET_BYTE:
        raise ValueError(f"{path}: an expert action file starts with 'R' (reset the game)")
    codes = np.frombuffer(actions, dtype=np.uint8)
    valid = (codes == RESET_BYTE) | (
        (codes >= FIRST_ACTION_BYTE) & (codes < FIRST_ACTION_BYTE + N_ALE_ACTIONS)
    )
    if not valid.all():
        position = int(np.flatnonzero(~valid)[0])
        raise ValueError(
            f"{path}: byte {position} is {actions[position : position + 1]!r}; expected 'R' "
            "or an action 'a'..'r'"
        )
    if b"RR" in actions or actions.endswith(b"R"):
        raise ValueError(f"{path}: an 'R' must be followed by at least one action")
    return actions


@dataclass(frozen=True)
class Frame:
    """What one emulator frame produced.

    Attributes:
        action: the full-set ALE action (``ale_py.Action.<NAME>.value``, 0..17) played.
        raw_reward: the game's reward for the frame, unclipped.
        terminated: the episode ends here with the game over.
        truncated: the episode ends here without a game over (time limit, end of file).
        info: ``raw_reward``, ``lives``, ``game_over`` and the source's own keys.
    """

    action: int
    raw_reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class ExpertReplay:
    """Replays an expert action file through ``ale_py.ALEInterface``, one frame per byte.

    Args:
        game: benchmark game name, e.g. ``"Pong"``.
        actions: the file's bytes (see :func:`read_action_file`).
    """

    def __init__(self, game: str, actions: bytes) -> None:
        self.game = game
        self.actions = actions
        self.replay_pass = 0
        rom = ale_py.roms.get_rom_path(rom_id(game))
        if rom is None:
            raise ValueError(f"ale-py has no ROM {rom_id(game)!r} for Atari game {game!r}")
        self._rom = rom
        self._new_emulator()

    def _new_emulator(self) -> None:
        """A fresh emulator at the start of the file, configured as at recording time."""
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per emulator
        self.ale = ale_py.ALEInterface()
        self.ale.setInt("random_seed", ALE_SEED)
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.setInt("frame_skip", 1)
        self.ale.loadROM(self._rom)
        self._minimal_actions = list(self.ale.getMinimalActionSet())
        self.position = 0
        self.replay_pass += 1
        self._in_episode = False

    def start_episode(self, restart: bool = False) -> None:
        """Consume the next ``'R'``; emulate what remains of a running episode first.

        Args:
            restart: go back to the start of the file in a fresh emulator first (unless the
                replay is there already) and count passes from 1 again.
        """
        if restart and self.position > 0:
            self.replay_pass = 0
            self._new_emulator()
        while self.position < len(self.actions) and self.actions[self.position] != RESET_BYTE:
            self._act(self.actions[self.position])
        if self.position == len(self.actions):
            self._new_emulator()
        self.ale.reset_game()
        self.position += 1
        self._in_episode = True

    def _act(self, code: int) -> tuple[int, float]:
        action = self._minimal_actions[code - FIRST_ACTION_BYTE]
        self.position += 1
        return action.value, float(self.ale.act(action))

    def step(self) -> Frame:
        """Play the next recorded frame."""
        if not self._in_episode:
            raise RuntimeError("the recorded episode has ended; call reset() to start the next")
        action, raw_reward = self._act(self.actions[self.position])
        ends = self.position == len(self.actions) or self.actions[self.position] == RESET_BYTE
        info = self.info(raw_reward)
        self._in_episode = not ends
        return Frame(
            action,
            raw_reward,
            terminated=ends and info["game_over"],
            truncated=ends and not info["game_over"],
            info=info,
        )

    def info(self, raw_reward: float = 0.0) -> dict[str, Any]:
        """Info of the current frame."""
        return {
            "raw_reward": raw_reward,
            "lives": self.ale.lives(),
            "game_over": bool(self.ale.game_over()),
            "file_position": self.position,
            "replay_pass": self.replay_pass,
        }


def as_policy(policy: Any) -> Policy:
    """A callable ``observation -> action`` from a callable or an SB3 model (``.predict``)."""
    if hasattr(policy, "predict"):
        model = policy
        return lambda observation: model.predict(observation, deterministic=True)[0]
    if callable(policy):
        return policy
    raise TypeError(
        f"policy must be a callable observation -> action or have .predict (a "
        f"Stable-Baselines3 model), got {type(policy).__name__}"
    )


def default_policy_env(game: str) -> gym.Env:
    """``ALE/<game>-v5`` with the benchmark's emulator settings (frame by frame, no sticky)."""
    gym.register_envs(ale_py)
    return gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)


class LivePolicy:
    """A policy acting in a Gymnasium ALE env (possibly wrapped, e.g. frame-stacked).

    The policy sees the env's own observations; the frame it produces is read from the
    emulator underneath (``env.unwrapped.ale``), after the env's frame skip if it has one.

    Args:
        policy: ``observation -> action`` (an index into ``env.action_space``) or an object
            with ``predict`` (a Stable-Baselines3 model; actions are deterministic).
        env: an env whose ``unwrapped`` is ``ale_py.env.AtariEnv``.
    """

    def __init__(self, policy: Any, env: gym.Env) -> None:
        if not hasattr(env.unwrapped, "ale") or not isinstance(env.action_space, spaces.Discrete):
            raise TypeError(
                "policy_env must build a Gymnasium ALE env (unwrapped: ale_py.env.AtariEnv) "
                f"with a Discrete action space, got {env!r}"
            )
        self.policy = as_policy(policy)
        self.env = env
        atari_env: Any = env.unwrapped
        self.ale = atari_env.ale
        self._full_actions = [
            getattr(ale_py.Action, name).value for name in atari_env.get_action_meanings()
        ]
        self._policy_observation: Any = None

    def start_episode(self, seed: int | None = None) -> None:
        """Reset the env (``seed`` passed on)."""
        self._policy_observation, _ = self.env.reset(seed=seed)

    def step(self) -> Frame:
        """Ask the policy for an action and play it."""
        choice = int(np.asarray(self.policy(self._policy_observation)).item())
        if not 0 <= choice < len(self._full_actions):
            raise ValueError(
                f"the policy chose action {choice}; the env has {len(self._full_actions)}"
            )
        self._policy_observation, reward, terminated, truncated, info = self.env.step(choice)
        raw_reward = float(reward)
        return Frame(
            self._full_actions[choice],
            raw_reward,
            bool(terminated),
            bool(truncated),
            self.info(raw_reward),
        )

    def info(self, raw_reward: float = 0.0) -> dict[str, Any]:
        """Info of the current frame."""
        return {
            "raw_reward": raw_reward,
            "lives": self.ale.lives(),
            "game_over": bool(self.ale.game_over()),
        }


class AtariPrediction(gym.Env[np.ndarray, np.int64]):
    """Frames of an expert (or any policy) playing Atari, as the prediction benchmark's input.

    Observation: ``[resolution² + 19]`` float32 (275 at 16 x 16): the down-scaled grayscale
    screen in [0, 1], a one-hot of the last ALE action over the full 18-action set and the
    clipped reward (see :mod:`agentstate.envs.atari_preprocessing`). Reward: the game reward
    clipped to [-1, 1]. Action: ``Discrete(1)``; the expert or ``policy`` plays.

    Example:
        A hand-written action file: reset, then 100 frames of Pong's minimal action 2 (RIGHT).

        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "PongNoFrameskip-v4.txt"
        >>> _ = path.write_bytes(b"R" + b"c" * 100)
        >>> env = AtariPrediction("Pong", policy_file=path)
        >>> observation, info = env.reset()
        >>> observation.shape, info["replay_pass"]
        ((275,), 1)
        >>> observation, reward, terminated, truncated, info = env.step(0)
        >>> int(observation[256:274].argmax()) == ale_py.Action.RIGHT.value
        True

        With the benchmark's files: ``gym.make("agentstate/AtariPrediction-v0", game="Pong",
        policies_dir="path/to/policies")``.

    Args:
        game: benchmark game name (``"Pong"``, ``"SpaceInvaders"``, ...).
        policy_file: the expert action file; default ``<policies_dir>/<game>NoFrameskip-v4.txt``.
        policies_dir: folder of expert action files; default ``$AGENTSTATE_ATARI_POLICIES``.
        policy: live mode: ``observation -> action`` or an SB3 model, acting in ``policy_env``
            instead of the recorded expert.
        policy_env: live mode: builds the env the policy acts in; default
            ``ALE/<game>-v5`` with ``frameskip=1, repeat_action_probability=0``.
        resolution: side of the down-scaled frame.
        interpolation: ``"linear"`` (the authors' resize) or ``"area"``.

    Change logs:
        v0: replay of the benchmark's 58 expert files; live-policy mode.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        game: str = "Pong",
        *,
        policy_file: str | os.PathLike[str] | None = None,
        policies_dir: str | os.PathLike[str] | None = None,
        policy: Any = None,
        policy_env: Callable[[], gym.Env] | None = None,
        resolution: int = 16,
        interpolation: str = "linear",
    ) -> None:
        self.game = game
        self.build_observation = PredictionObservation(resolution, interpolation)
        self.observation_space = self.build_observation.observation_space
        self.action_space = spaces.Discrete(1)
        self.source: ExpertReplay | LivePolicy
        if policy is None:
            if policy_env is not None:
                raise ValueError("policy_env is for live mode; pass a policy with it")
            path = resolve_policy_file(game, policy_file, policies_dir)
            self.source = ExpertReplay(game, read_action_file(path))
        else:
            env = policy_env() if policy_env is not None else default_policy_env(game)
            self.source = LivePolicy(policy, env)
        self._screen = np.empty(SCREEN_SHAPE, dtype=np.uint8)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start the next episode; with ``seed``, replay from the file's start (see module)."""
        super().reset(seed=seed)
        if isinstance(self.source, ExpertReplay):
            self.source.start_episode(restart=seed is not None)
        else:
            self.source.start_episode(seed)
        return self._observe(None, 0.0), self.source.info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Advance one frame (``action`` is ignored: the expert or the policy plays)."""
        frame = self.source.step()
        reward = clip_reward(frame.raw_reward)
        observation = self._observe(frame.action, reward)
        return observation, reward, frame.terminated, frame.truncated, frame.info

    def _observe(self, action: int | None, reward: float) -> np.ndarray:
        self.source.ale.getScreenGrayscale(self._screen)
        return self.build_observation(self._screen, action, reward)

    def close(self) -> None:
        """Close the live policy's env, if any."""
        if isinstance(self.source, LivePolicy):
            self.source.env.close()
