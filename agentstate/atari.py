"""Atari policy evaluation: the stream source of ``agentstate predict-atari``.

B streams step together in one process. Stream ``b`` plays ``games[b % G]`` (the expert's
recorded play, or a live policy), so B = G runs each game once and B = kG runs k seeds of each;
``predict-atari`` gives each stream its own network (independent parameters, seeded apart).
Replays are deterministic: seeds of one game see the same frames and differ only in the
learner's start.

Each stream delivers the observation x_t, the cumulant c_t (the clipped reward that came with
the frame) and the discount γ_t: 0 on the first frame of an episode (the frame after a reset,
whose reward is 0), ``gamma`` otherwise, as in the authors' C++ (γ = 0 across a reset). The
runner (``agentstate.experiment``) scores three predictors against the discounted return
computed backward when an episode ends: the learner, predicting zero, and ``mean_reward``, the
running mean of the stream's cumulant divided by (1 - γ)
(:class:`~agentstate.streams.RunningMeanReward`).

A run is an ``agentstate.experiment.RunConfig`` with ``env = "atari-prediction"`` and these
``env_kwargs``: ``games`` (list of benchmark names, default ``["Pong"]``), ``policies_dir``
(folder of ``<Game>NoFrameskip-v4.txt``; default ``$AGENTSTATE_ATARI_POLICIES``),
``resolution`` (16), ``interpolation`` (``linear``), ``sb3_model`` (live mode: a
Stable-Baselines3 zip acting in ``ALE/<game>-v5`` instead of the expert) and ``sb3_algorithm``
(the SB3 class that saved it, ``PPO``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from agentstate.streams import EpisodicSource, RunningMeanReward

if TYPE_CHECKING:
    from agentstate.experiment import RunConfig

ATARI_GAMMA = 0.98
"""The benchmark's discount (the authors' C++), used when the run gives none."""
ATARI_SETTINGS = {
    "games": ["Pong"],
    "policies_dir": None,
    "resolution": 16,
    "interpolation": "linear",
    "sb3_model": None,
    "sb3_algorithm": "PPO",
}
"""The ``env_kwargs`` of an ``atari-prediction`` run and their defaults."""


def atari_settings(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``env_kwargs`` checked and completed with :data:`ATARI_SETTINGS`' defaults."""
    unknown = sorted(set(env_kwargs) - set(ATARI_SETTINGS))
    if unknown:
        raise ValueError(
            f"atari-prediction: unknown setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(ATARI_SETTINGS)}"
        )
    settings = {**ATARI_SETTINGS, **env_kwargs}
    games = settings["games"]
    if isinstance(games, str) or not games:
        raise ValueError(f"games must be a non-empty list of names, got {games!r}")
    return settings


def stream_games(games: list[str], streams: int) -> list[str]:
    """The game of each stream, ``[B]``: stream b plays ``games[b % G]``.

    Example:
        >>> stream_games(["Pong", "Breakout"], 4)
        ['Pong', 'Breakout', 'Pong', 'Breakout']
    """
    if not isinstance(streams, int) or streams < 1 or streams % len(games):
        raise ValueError(
            f"streams must be a positive multiple of the number of games ({len(games)}), got "
            f"{streams!r}"
        )
    return [games[b % len(games)] for b in range(streams)]


def load_sb3_policy(path: str, algorithm: str = "PPO") -> Any:
    """Load a Stable-Baselines3 model from its zip (on CPU) to act as a live policy.

    Args:
        path: the ``.zip`` written by ``model.save``.
        algorithm: the SB3 class that saved it, e.g. ``"PPO"``, ``"A2C"``, ``"DQN"``.

    Returns:
        The model; :class:`~agentstate.envs.atari_prediction.AtariPrediction` calls its
        ``predict(observation, deterministic=True)``.
    """
    try:
        import stable_baselines3
    except ImportError as error:
        raise ImportError(
            "an SB3 policy needs stable-baselines3: pip install 'agentstate[sb3]'"
        ) from error
    model_class = getattr(stable_baselines3, algorithm, None)
    if model_class is None:
        raise ValueError(f"stable_baselines3 has no algorithm {algorithm!r} (try PPO, A2C, DQN)")
    return model_class.load(path, device="cpu")


def make_streams(
    games: list[str],
    *,
    policies_dir: str | None = None,
    resolution: int = 16,
    interpolation: str = "linear",
    policy: Any = None,
    policy_env: Callable[[], gym.Env] | None = None,
) -> gym.vector.SyncVectorEnv:
    """One prediction env per stream (``games[b]``), stepped together with next-step autoreset.

    With next-step autoreset the step after an episode's last frame resets that env and
    returns the new episode's first frame with reward 0: exactly the recorded ``'R'`` frame.
    """
    # Imported here: the env needs ale-py, which the rest of agentstate does not.
    from agentstate.envs.atari_prediction import AtariPrediction

    env_fns = [
        partial(
            AtariPrediction,
            game,
            policies_dir=policies_dir,
            policy=policy,
            policy_env=policy_env,
            resolution=resolution,
            interpolation=interpolation,
        )
        for game in games
    ]
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def atari_source(
    config: RunConfig,
    *,
    policy: Any = None,
    policy_env: Callable[[], gym.Env] | None = None,
) -> EpisodicSource:
    """The streams of an ``atari-prediction`` run (module docstring).

    Args:
        config: the run; its ``env_kwargs`` are the Atari settings.
        policy: live mode: ``observation -> action`` or an SB3 model, for every stream.
        policy_env: live mode: builds the Gymnasium ALE env the policy acts in.
    """
    settings = atari_settings(config.env_kwargs)
    games = stream_games(list(settings["games"]), config.streams)
    if settings["sb3_model"] is not None:
        if policy is not None:
            raise ValueError("give either a policy or the sb3_model setting, not both")
        policy = load_sb3_policy(settings["sb3_model"], settings["sb3_algorithm"])
    envs = make_streams(
        games,
        policies_dir=settings["policies_dir"],
        resolution=settings["resolution"],
        interpolation=settings["interpolation"],
        policy=policy,
        policy_env=policy_env,
    )
    return prediction_source(
        envs,
        games,
        gamma=ATARI_GAMMA if config.gamma is None else config.gamma,
        description="expert replay" if policy is None else f"live policy {policy!r}",
        seed=config.seed,
    )


def prediction_source(
    envs: gym.vector.VectorEnv,
    labels: list[str],
    *,
    gamma: float,
    description: str,
    seed: int = 0,
) -> EpisodicSource:
    """Any next-step-autoreset vector env whose reward is the cumulant, scored the Atari way.

    The actions are ignored (0); the discount is 0 into the first frame of an episode, and the
    running mean reward is scored beside the learner and predicting zero.
    """
    streams = len(labels)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must lie in [0, 1) (1/(1-gamma) is used), got {gamma}")
    no_action = np.zeros(streams, dtype=np.int64)
    return EpisodicSource(
        envs,
        gamma=gamma,
        actions=lambda: no_action,
        zero_discount_at="start",
        references={"mean_reward": RunningMeanReward(streams, gamma)},
        labels=labels,
        description=description,
        seed=seed,
    )
