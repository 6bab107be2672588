"""The Atari Prediction Benchmark's learner input, and where its expert action files live.

The learner sees, each frame (Javed, Shah, Sutton, White, JMLR 2023)::

    x_t = [ resize(grayscale screen, resolution x resolution) / 255,   (resolution² values)
            one-hot(last ALE action, 18),                               (0 on a reset frame)
            clip(reward, -1, 1) ]                                       (0 on a reset frame)

275 inputs at the paper's 16 x 16. The one-hot indexes the *full* 18-action ALE set
(``ale_py.Action``), so a slot means the same joystick move in every game.

Differences from the authors' C++ (``proto_prediction_environments.cpp``): it divides by 256
(not 255, so values stay below 1; the TD engine's online input normalisation absorbs the
difference) and indexes the one-hot by position in the game's *minimal* action set.
The resize is the same: OpenCV's default bilinear ``INTER_LINEAR``, which samples the screen
rather than averaging it, so a small object such as Pong's ball often vanishes from a single
frame, the partial observability the benchmark is built around. ``interpolation="area"``
averages instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from gymnasium import spaces

N_ALE_ACTIONS = 18
"""Size of the full ALE action set (``ale_py.Action``)."""
SCREEN_SHAPE = (210, 160)
"""Height and width of an ALE screen in pixels."""
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
"""Resize methods by name: ``linear`` as the authors' C++ (OpenCV's default), ``area`` averages."""
POLICIES_ENV_VAR = "AGENTSTATE_ATARI_POLICIES"
"""Environment variable naming the folder of expert action files when none is given."""
POLICIES_SOURCE = (
    "the policies/ folders of the authors' public repositories "
    "https://github.com/khurramjaved96/atari-prediction-benchmark and "
    "https://github.com/khurramjaved96/swiftd-atari-prediction-benchmark"
)
"""Where users obtain the 58 expert action files."""


def clip_reward(reward: float) -> float:
    """The benchmark's cumulant: the raw game reward clipped to [-1, 1].

    Example:
        >>> clip_reward(4.0), clip_reward(-0.5), clip_reward(-7.0)
        (1.0, -0.5, -1.0)
    """
    return float(min(1.0, max(-1.0, reward)))


def policy_file_name(game: str) -> str:
    """File name of a game's expert actions, e.g. ``PongNoFrameskip-v4.txt``."""
    return f"{game}NoFrameskip-v4.txt"


def resolve_policy_file(
    game: str,
    policy_file: str | os.PathLike[str] | None,
    policies_dir: str | os.PathLike[str] | None,
) -> Path:
    """The expert action file of ``game``, or a FileNotFoundError that says how to get it.

    Looks, in order, at ``policy_file``, ``policies_dir / <Game>NoFrameskip-v4.txt`` and the
    folder named by the environment variable ``AGENTSTATE_ATARI_POLICIES``.

    Args:
        game: the benchmark's game name, e.g. ``"Pong"`` or ``"SpaceInvaders"``.
        policy_file: an explicit file; wins over the folders.
        policies_dir: a folder holding ``<Game>NoFrameskip-v4.txt`` files.

    Returns:
        The path of an existing file.

    Raises:
        FileNotFoundError: naming the game, the path expected and where the files come from.
    """
    if policy_file is not None:
        path = Path(policy_file)
    else:
        folder = policies_dir if policies_dir is not None else os.environ.get(POLICIES_ENV_VAR)
        if folder is None:
            raise FileNotFoundError(
                f"no expert action file for Atari game {game!r}: pass policy_file or "
                f"policies_dir (CLI: --policies DIR), or set {POLICIES_ENV_VAR}, to a folder "
                f"holding {policy_file_name(game)}; the 58 files are public: {POLICIES_SOURCE}"
            )
        path = Path(folder) / policy_file_name(game)
    if not path.is_file():
        raise FileNotFoundError(
            f"expert action file for Atari game {game!r} not found: expected {path}; the 58 "
            f"files <Game>NoFrameskip-v4.txt are public: {POLICIES_SOURCE}"
        )
    return path


class PredictionObservation:
    """Builds the learner's input from a grayscale screen, the last action and the reward.

    Example:
        >>> import numpy as np
        >>> build = PredictionObservation(resolution=16)
        >>> screen = np.full((210, 160), 255, dtype=np.uint8)
        >>> x = build(screen, action=3, clipped_reward=1.0)   # action 3: ale_py.Action.RIGHT
        >>> x.shape, float(x[:256].min()), int(x[256:274].argmax()), float(x[274])
        ((275,), 1.0, 3, 1.0)
        >>> float(build(screen, action=None, clipped_reward=0.0)[256:].sum())   # a reset frame
        0.0

    Args:
        resolution: side of the square, down-scaled frame.
        interpolation: ``"linear"`` (the authors' OpenCV default) or ``"area"``.

    Attributes:
        size: number of inputs, ``resolution² + 18 + 1``.
        observation_space: float32 Box of that size; the reward slot lies in [-1, 1], every
            other slot in [0, 1].
    """

    def __init__(self, resolution: int = 16, interpolation: str = "linear") -> None:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.resolution = resolution
        self.interpolation = interpolation
        self._n_pixels = resolution * resolution
        self.size = self._n_pixels + N_ALE_ACTIONS + 1
        low = np.zeros(self.size, dtype=np.float32)
        low[-1] = -1.0
        self.observation_space = spaces.Box(
            low=low, high=np.ones(self.size, dtype=np.float32), dtype=np.float32
        )

    def __call__(self, screen: np.ndarray, action: int | None, clipped_reward: float) -> np.ndarray:
        """One observation.

        Args:
            screen: grayscale screen ``[210, 160]`` uint8.
            action: the full-set ALE action (0..17) that led to this frame; None on the
                first frame of an episode.
            clipped_reward: the reward that came with this frame, already in [-1, 1].

        Returns:
            ``[size]`` float32, a fresh array.
        """
        observation = np.zeros(self.size, dtype=np.float32)
        frame = cv2.resize(
            screen,
            (self.resolution, self.resolution),
            interpolation=INTERPOLATIONS[self.interpolation],
        )
        observation[: self._n_pixels] = frame.reshape(-1)
        observation[: self._n_pixels] /= 255.0
        if action is not None:
            observation[self._n_pixels + action] = 1.0
        observation[-1] = clipped_reward
        return observation
