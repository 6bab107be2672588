"""Atari policy evaluation with the TD(lambda) engine: the loop of ``agentstate predict-atari``.

B streams step together in one process. Stream ``b`` plays ``games[b % G]`` (the expert's
recorded play, or a live policy), so B = G runs each game once and B = kG runs k seeds of each;
the learner has independent parameters per stream (one network each, seeded apart). Replays are
deterministic: seeds of one game see the same frames and differ only in the learner's start.

Each stream's data follows :mod:`agentstate.metrics`' convention. At step t it delivers the
observation x_t, the cumulant c_t (the clipped reward that came with the frame) and the
discount γ_t: 0 on the first frame of an episode (the frame after a reset, whose reward is 0),
``gamma`` otherwise, as in the authors' C++ (γ = 0 across a reset). Three predictors are
scored against the discounted return G_t = c_{t+1} + γ_{t+1} G_{t+1}, computed backward when
the episode ends (:class:`~agentstate.metrics.EpisodeReturnScorer`):

* ``learner``: the TD(lambda) prediction of the chosen state learner;
* ``zero``: predicts 0;
* ``mean_reward``: the running mean of the stream's cumulant so far, divided by (1 - γ)
  (:class:`RunningMeanReward`), the return of a constant reward at that rate.

The MSRE of each is a sliding mean over the last ``msre_window`` scored steps of a stream.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agentstate.metrics import (
    EpisodeReturnScorer,
    ScoredEpisode,
    SlidingMean,
    mean_and_standard_error,
)
from agentstate.plotting import plot_learning_curve
from agentstate.registry import get_registry, make_learner
from agentstate.td import TDConfig, TDPredictor

PREDICTOR_COLUMNS = {"learner": "msre", "zero": "msre_zero", "mean_reward": "msre_mean_reward"}
"""Predictor name -> its column in ``metrics.csv``."""
PREDICTOR_LABELS = {"zero": "predict zero", "mean_reward": "running mean reward / (1 - γ)"}
"""Reference predictor name -> its label in the plots."""


@dataclass
class AtariRunConfig:
    """Everything that defines one policy-evaluation run (written to ``config.json``)."""

    games: list[str] = field(default_factory=lambda: ["Pong"])
    """Benchmark game names; stream b plays games[b % len(games)]."""
    policies_dir: str | None = None
    """Folder of ``<Game>NoFrameskip-v4.txt``; None: ``$AGENTSTATE_ATARI_POLICIES``."""
    learner: str = "columnar"
    steps: int = 100_000
    """Frames per stream (one TD step each, the reset frames included)."""
    streams: int | None = None
    """Streams B, a multiple of len(games); None: one per game."""
    seed: int = 0
    """Seed of the learner's initialisation (and of a live policy's env)."""
    step_size: float = 1e-4
    head_step_size: float | None = None
    """Step size of the prediction head; None: step_size / number of head features."""
    gamma: float = 0.98
    lambda_: float = 0.99
    optimizer: str = "rmsprop_td"
    msre_window: int = 500_000
    """Scored steps in each stream's sliding MSRE (the paper's 500k)."""
    log_every: int = 10_000
    resolution: int = 16
    interpolation: str = "linear"
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    sb3_model: str | None = None
    """Live mode: a Stable-Baselines3 zip acting in ``ALE/<game>-v5`` instead of the expert."""
    sb3_algorithm: str = "PPO"
    """The SB3 class that saved ``sb3_model`` (PPO, A2C, DQN, ...)."""
    dtype: str = "float32"
    torch_threads: int = 1
    """Torch intra-op threads while the run lasts: the tensors are tiny, and extra threads
    only add synchronisation."""

    def __post_init__(self) -> None:
        if isinstance(self.games, str) or not self.games:
            raise ValueError(f"games must be a non-empty list of names, got {self.games!r}")
        for name in ("steps", "msre_window", "log_every", "resolution", "torch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.streams is not None and (
            not isinstance(self.streams, int) or self.streams < 1 or self.streams % len(self.games)
        ):
            raise ValueError(
                f"streams must be a positive multiple of the number of games "
                f"({len(self.games)}), got {self.streams!r}"
            )
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1) (1/(1-gamma) is used), got {self.gamma}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def stream_games(self) -> list[str]:
        """The game of each stream, ``[B]``."""
        streams = self.streams if self.streams is not None else len(self.games)
        return [self.games[b % len(self.games)] for b in range(streams)]


@dataclass
class AtariRunResult:
    """Where a run wrote its files, its final MSREs and its speed."""

    out_dir: Path
    stream_games: list[str]
    final_msre: dict[str, np.ndarray]
    """``metrics.csv`` column (``msre``, ``msre_zero``, ``msre_mean_reward``) -> ``[B]``."""
    steps_per_second: float
    """Loop steps per second (each advances all B streams)."""
    replay_frames_per_second: float
    """Frames per second of env time (emulation, preprocessing, vector env), all streams."""
    learner_us_per_step: float
    """Microseconds of ``TDPredictor.step`` per loop step (all B streams at once)."""


class RunningMeanReward:
    """Reference predictor: the mean of a stream's cumulants so far, times 1 / (1 - γ).

    Example:
        >>> predictor = RunningMeanReward(streams=2, gamma=0.5)
        >>> predictor.update(np.array([1.0, 0.0])).tolist()
        [2.0, 0.0]
        >>> predictor.update(np.array([0.0, 0.0])).tolist()
        [1.0, 0.0]

    Args:
        streams: number of streams B.
        gamma: discount in [0, 1).
    """

    def __init__(self, streams: int, gamma: float) -> None:
        self.scale = 1.0 / (1.0 - gamma)
        self.cumulant_sum = np.zeros(streams)
        self.count = 0

    def update(self, cumulant: np.ndarray) -> np.ndarray:
        """Fold in c_t ``[B]``; return the prediction for G_t ``[B]``."""
        self.cumulant_sum += cumulant
        self.count += 1
        return self.cumulant_sum / self.count * self.scale


class EpisodicMSRELog:
    """Sliding MSRE per stream and predictor, fed whole scored episodes, sampled at log points.

    Args:
        streams: number of streams B.
        window: scored steps in each sliding mean.
        predictor_names: names of the predictors, keys of :data:`PREDICTOR_COLUMNS`.
    """

    def __init__(self, streams: int, window: int, predictor_names: Sequence[str]) -> None:
        self.means = {
            name: [SlidingMean(window) for _ in range(streams)] for name in predictor_names
        }
        self.steps: list[int] = []
        self.rows: list[dict[str, np.ndarray]] = []

    def add(self, episode: ScoredEpisode) -> None:
        """Fold in the squared errors of one finished episode."""
        for name, errors in episode.squared_errors.items():
            self.means[name][episode.stream].update_many(errors)

    def values(self) -> dict[str, np.ndarray]:
        """Current sliding MSRE of every predictor, ``[B]`` each (NaN before a first episode)."""
        return {
            name: np.array([float(mean.value) for mean in per_stream])
            for name, per_stream in self.means.items()
        }

    def record(self, step: int) -> None:
        """Keep the current values as the row of ``step``."""
        self.steps.append(step)
        self.rows.append(self.values())

    def curve(self, name: str) -> np.ndarray:
        """The recorded MSRE of a predictor, ``[N, B]``."""
        return np.stack([row[name] for row in self.rows])

    def write_csv(self, path: Path) -> None:
        """``step``, the mean over streams of each predictor, then one column per stream."""
        names = list(self.means)
        streams = len(self.means[names[0]])
        header = ["step"] + [PREDICTOR_COLUMNS[name] for name in names]
        header += [f"{PREDICTOR_COLUMNS[name]}_{b}" for name in names for b in range(streams)]
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for step, row in zip(self.steps, self.rows, strict=True):
                means = [_stream_mean(row[name]) for name in names]
                per_stream = [value for name in names for value in row[name]]
                writer.writerow([step] + [f"{value:.8g}" for value in means + per_stream])


def _stream_mean(values: np.ndarray) -> float:
    """Mean over streams, ignoring streams with nothing scored yet (NaN if none has)."""
    return float(mean_and_standard_error(values[None])[0][0])


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
    config: AtariRunConfig,
    policy: Any = None,
    policy_env: Callable[[], gym.Env] | None = None,
) -> gym.vector.SyncVectorEnv:
    """The B prediction envs of a run, stepped together with next-step autoreset.

    With next-step autoreset the step after an episode's last frame resets that env and
    returns the new episode's first frame with reward 0: exactly the recorded ``'R'`` frame.
    """
    # Imported here: the env needs ale-py, which the rest of agentstate does not.
    from agentstate.envs.atari_prediction import AtariPrediction

    env_fns = [
        partial(
            AtariPrediction,
            game,
            policies_dir=config.policies_dir,
            policy=policy,
            policy_env=policy_env,
            resolution=config.resolution,
            interpolation=config.interpolation,
        )
        for game in config.stream_games()
    ]
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def run_atari_prediction(
    config: AtariRunConfig,
    out_dir: str | Path,
    *,
    policy: Any = None,
    policy_env: Callable[[], gym.Env] | None = None,
    progress: bool = True,
) -> AtariRunResult:
    """Evaluate the expert's (or ``policy``'s) play with a TD(lambda) state learner.

    Args:
        config: the run's settings.
        out_dir: folder for the outputs (created); see :func:`run_prediction_streams`.
        policy: live mode: ``observation -> action`` or an SB3 model, for every stream.
        policy_env: live mode: builds the Gymnasium ALE env the policy acts in.
        progress: show a progress bar with steps/s and the current MSREs.

    Returns:
        Final sliding MSREs and speeds.
    """
    get_registry().spec(config.learner)  # an unknown learner fails before any work
    if config.sb3_model is not None:
        if policy is not None:
            raise ValueError("give either a policy or config.sb3_model, not both")
        policy = load_sb3_policy(config.sb3_model, config.sb3_algorithm)
    return run_prediction_streams(
        make_streams(config, policy, policy_env),
        config,
        out_dir,
        stream_games=config.stream_games(),
        behaviour="expert replay" if policy is None else f"live policy {policy!r}",
        progress=progress,
    )


def run_prediction_streams(
    envs: gym.vector.VectorEnv,
    config: AtariRunConfig,
    out_dir: str | Path,
    *,
    stream_games: list[str],
    behaviour: str,
    progress: bool = True,
) -> AtariRunResult:
    """The loop on any next-step-autoreset vector env whose reward is the cumulant.

    Writes ``config.json`` first, then ``metrics.csv`` (``step``, the mean over streams of
    ``msre``, ``msre_zero``, ``msre_mean_reward``, then those per stream as ``msre_<b>``,
    ``msre_zero_<b>``, ``msre_mean_reward_<b>``), ``summary.json`` (final MSREs, speeds) and
    one ``learning_curve_<game>.png`` per game into ``out_dir``.

    Args:
        envs: B streams; observations ``[B, d]``, the action is ignored.
        config: the run's settings (its games and env settings are not used here).
        out_dir: folder for the outputs (created).
        stream_games: the game (or any label) of each stream, ``[B]``.
        behaviour: what plays, for ``config.json``.
        progress: show a progress bar with steps/s and the current MSREs.

    Returns:
        Final sliding MSREs and speeds.
    """
    streams = len(stream_games)
    dtype = getattr(torch, config.dtype)
    learner = make_learner(
        config.learner,
        gym.spaces.flatdim(envs.single_observation_space),
        streams=streams,
        independent_params=True,
        dtype=dtype,
        seed=config.seed,
        **config.learner_kwargs,
    )
    engine = TDPredictor(
        learner,
        1,
        TDConfig(
            gamma=config.gamma,
            lambda_=config.lambda_,
            step_size=config.step_size,
            head_step_size=config.head_step_size,
            optimizer=config.optimizer,
        ),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "run": dataclasses.asdict(config),
                "stream_games": stream_games,
                "behaviour": behaviour,
                "td": dataclasses.asdict(engine.config),
                "learner_config": dataclasses.asdict(learner.config),
                "n_features": learner.n_features,
                "observation_size": learner.input_size,
            },
            indent=2,
        )
    )

    log = EpisodicMSRELog(streams, config.msre_window, list(PREDICTOR_COLUMNS))
    timer = _Timer()
    bar = tqdm(total=config.steps, unit="step", disable=not progress, smoothing=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        _evaluate(envs, engine, log, config, bar, timer)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        envs.close()

    log.write_csv(out / "metrics.csv")
    for game in dict.fromkeys(stream_games):
        _plot_game(log, config, game, [g == game for g in stream_games], out)
    result = AtariRunResult(
        out_dir=out,
        stream_games=stream_games,
        final_msre={PREDICTOR_COLUMNS[name]: values for name, values in log.values().items()},
        steps_per_second=config.steps / timer.total,
        replay_frames_per_second=config.steps * streams / timer.env,
        learner_us_per_step=timer.learner / config.steps * 1e6,
    )
    (out / "summary.json").write_text(json.dumps(_summary(result), indent=2))
    return result


@dataclass
class _Timer:
    """Seconds spent in the envs, in the TD engine, and in all."""

    env: float = 0.0
    learner: float = 0.0
    total: float = 0.0


def _evaluate(
    envs: gym.vector.VectorEnv,
    engine: TDPredictor,
    log: EpisodicMSRELog,
    config: AtariRunConfig,
    bar: tqdm,
    timer: _Timer,
) -> None:
    """The loop: TD step, score, advance the envs; ``config.steps`` times."""
    dtype = engine.learner.dtype
    streams = engine.learner.streams
    scorer = EpisodeReturnScorer(streams, list(PREDICTOR_COLUMNS))
    mean_reward = RunningMeanReward(streams, config.gamma)
    zero = np.zeros(streams)
    no_action = np.zeros(streams, dtype=np.int64)
    started = time.perf_counter()
    observation, _ = envs.reset(seed=config.seed)
    timer.env += time.perf_counter() - started
    cumulant = np.zeros(streams)
    starts = np.ones(streams, dtype=bool)  # the first frame starts an episode
    ended = np.zeros(streams, dtype=bool)
    for step in range(1, config.steps + 1):
        discount = np.where(starts, 0.0, config.gamma)
        learner_started = time.perf_counter()
        prediction = engine.step(
            torch.as_tensor(observation, dtype=dtype),
            torch.as_tensor(cumulant[:, None], dtype=dtype),
            discount=torch.as_tensor(discount, dtype=dtype),
            episode_start=torch.as_tensor(starts),
        )
        timer.learner += time.perf_counter() - learner_started
        predictions = {
            "learner": prediction[:, 0].double().numpy(),
            "zero": zero,
            "mean_reward": mean_reward.update(cumulant),
        }
        for episode in scorer.update(predictions, cumulant, discount):
            log.add(episode)
        if step % config.log_every == 0 or step == config.steps:
            log.record(step)
            bar.set_postfix(
                {
                    PREDICTOR_COLUMNS[name]: f"{_stream_mean(values):.4g}"
                    for name, values in log.rows[-1].items()
                }
            )
        bar.update(1)
        if step == config.steps:
            break
        env_started = time.perf_counter()
        observation, reward, terminated, truncated, _ = envs.step(no_action)
        timer.env += time.perf_counter() - env_started
        # Next-step autoreset: the frame after an episode's last one is the next's first.
        starts, ended = ended, np.logical_or(terminated, truncated)
        cumulant = np.asarray(reward, dtype=np.float64)
    timer.total = time.perf_counter() - started


def _plot_game(
    log: EpisodicMSRELog, config: AtariRunConfig, game: str, of_game: list[bool], out: Path
) -> None:
    """``learning_curve_<game>.png``: the learner's MSRE over the game's streams."""
    columns = np.flatnonzero(of_game)
    plot_learning_curve(
        np.array(log.steps),
        {config.learner: log.curve("learner")[:, columns]},
        out / f"learning_curve_{game}.png",
        title=f"{game}: policy evaluation, γ = {config.gamma}",
        ylabel=f"MSRE (sliding mean over {config.msre_window:,} scored steps)",
        reference_lines={
            label: mean_and_standard_error(log.curve(name)[:, columns])[0]
            for name, label in PREDICTOR_LABELS.items()
        },
    )


def _summary(result: AtariRunResult) -> dict[str, Any]:
    return {
        "stream_games": result.stream_games,
        "final_msre": {name: values.tolist() for name, values in result.final_msre.items()},
        "steps_per_second": result.steps_per_second,
        "replay_frames_per_second": result.replay_frames_per_second,
        "learner_us_per_step": result.learner_us_per_step,
    }
