"""The prediction experiment behind ``agentstate run``.

B streams of one environment step together in one process. With ``independent_params`` each
stream is its own run (B seeds at once); otherwise the streams share one learner. The learner
predicts the discounted sum of the environment's reward (the cumulant) with TD(lambda); the
mean squared return error (MSRE) is logged as a sliding mean per stream, next to the error
of predicting zero.

Environments that report ``info["return_target"]`` (the trace-conditioning family) are scored
against that exact target every step. Any other Gymnasium environment is scored at the end of
each episode against the discounted return computed backward over it.

Checkpoints (trace envs, whose state the env itself saves): every ``checkpoint_every`` steps the
complete run state (TD engine with learner, traces, optimiser and normalisers; env generators
and schedule; metric log; step) replaces ``checkpoint.pt`` atomically. Env steps are generated
in chunks that end on checkpoint boundaries, and what a trace env shows never depends on how
its steps are chunked, so a resumed run writes the same ``metrics.csv`` as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agentstate.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from agentstate.metrics import EpisodeReturnScorer, SlidingMean, mean_and_standard_error
from agentstate.plotting import plot_learning_curve
from agentstate.registry import get_registry, make_learner
from agentstate.td import TDConfig, TDPredictor

ENV_ALIASES = {
    "trace-conditioning": "agentstate/TraceConditioning-v0",
    "trace-patterning": "agentstate/TracePatterning-v0",
    "noisy-patterning": "agentstate/NoisyPatterning-v0",
}
ROLLOUT_CHUNK = 2048
CHECKPOINT_NAME = "checkpoint.pt"
"""The latest checkpoint of an unfinished run, in its output folder (removed when it ends)."""


@dataclass
class RunConfig:
    """Everything that defines one prediction run (written to ``config.json``)."""

    env: str
    """An alias (trace-conditioning, trace-patterning, noisy-patterning), a Gymnasium id, or
    ``module:id`` (``module`` is imported first: the package that registers the env)."""
    learner: str = "columnar"
    steps: int = 100_000
    """Environment steps per stream."""
    streams: int = 8
    independent: bool = False
    """One network per stream (B independent runs) instead of one shared network."""
    seed: int = 0
    step_size: float = 0.001
    """Step size of the learner (``rmsprop_td`` at 0.001: the authors' best on trace patterning)."""
    head_step_size: float | None = None
    """Step size of the prediction head; None: step_size / number of features built."""
    gamma: float | None = None
    """Discount; None takes the environment's own (``env.gamma``) or 0.99."""
    lambda_: float = 0.99
    optimizer: str = "rmsprop_td"
    normalize_inputs: bool = True
    """Normalise the observation online (the engine does, or the learner itself if it can)."""
    normalize_features: bool = True
    """Normalise the agent state online before the heads (and a CCN stage) read it."""
    normalization_rate: float = 0.99999
    """EMA decay of every running mean and variance, the engine's and the learner's (1: off)."""
    variance_floor: float = 0.01
    """Lower bound of every running variance (the authors' ``std_cap``)."""
    include_bias: bool = True
    """The heads have a bias feature."""
    msre_window: int = 100_000
    """Steps in the sliding mean of the squared return error (the authors' 100k)."""
    log_every: int = 1_000
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "streams", "msre_window", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")

    @property
    def env_id(self) -> str:
        """The Gymnasium id the alias stands for."""
        return ENV_ALIASES.get(self.env, self.env)


@dataclass
class RunResult:
    """Where a run wrote its files and its final figures."""

    out_dir: Path
    final_msre: np.ndarray
    """Sliding MSRE of each stream at the end, ``[B]``."""
    final_msre_zero: np.ndarray
    """Sliding MSRE of predicting zero, ``[B]``."""
    steps_per_second: float
    """Steps per stream per second of this process (from ``first_step`` on)."""
    first_step: int = 0
    """Step this process started from: 0, or the checkpoint's step when resumed."""

    @property
    def final_ratio(self) -> float:
        """Mean over streams of each stream's final MSRE ÷ its predict-zero MSRE."""
        return float(np.nanmean(msre_ratio(self.final_msre, self.final_msre_zero)))


def check_env_id(env_id: str, given: str) -> None:
    """Refuse an id Gymnasium cannot make; ``module:id`` imports ``module`` first.

    Args:
        env_id: the Gymnasium id (an alias already resolved).
        given: what the user wrote, for the message.

    Raises:
        ValueError: naming the id, the aliases and how to register an env.
    """
    module, separator, name = env_id.rpartition(":")
    if separator:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(
                f"environment {given!r}: cannot import {module!r} ({error}); install the "
                "package that registers the env"
            ) from None
    if name not in gym.registry:
        raise ValueError(
            f"unknown environment {given!r}; use one of {', '.join(ENV_ALIASES)}, a "
            "registered Gymnasium id, or module:id to import the module that registers it "
            "(e.g. popgym:popgym-RepeatPreviousEasy-v0)"
        )


def run_identity(config: RunConfig) -> dict[str, Any]:
    """What a checkpoint must have been written by to be resumed under ``config``."""
    return {"run": json.loads(json.dumps(dataclasses.asdict(config)))}


def msre_ratio(msre: np.ndarray, msre_zero: np.ndarray) -> np.ndarray:
    """Each stream's MSRE divided by its own predict-zero MSRE (NaN where that is 0 or NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(msre_zero > 0, msre / msre_zero, np.nan)


class _MetricLog:
    """Sliding MSRE per stream for the learner and predict-zero, sampled every log_every.

    Every-step scoring updates all streams at once; episodic scoring updates one stream by a
    whole episode, so it keeps one sliding mean per stream.
    """

    def __init__(self, streams: int, window: int, *, episodic: bool = False) -> None:
        self.episodic = episodic
        if episodic:
            self.learner_by_stream = [SlidingMean(window) for _ in range(streams)]
            self.zero_by_stream = [SlidingMean(window) for _ in range(streams)]
        else:
            self.learner = SlidingMean(window, streams)
            self.zero = SlidingMean(window, streams)
        self.rows: list[tuple[int, np.ndarray, np.ndarray]] = []

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """Current sliding MSRE of the learner and of predicting zero, ``[B]`` each."""
        if self.episodic:
            return (
                np.array([float(mean.value) for mean in self.learner_by_stream]),
                np.array([float(mean.value) for mean in self.zero_by_stream]),
            )
        return self.learner.value.copy(), self.zero.value.copy()

    def record(self, step: int) -> None:
        self.rows.append((step, *self.values()))

    def _sliding_means(self) -> list[SlidingMean]:
        if self.episodic:
            return [*self.learner_by_stream, *self.zero_by_stream]
        return [self.learner, self.zero]

    def state_dict(self) -> dict[str, Any]:
        """Sliding means and logged rows, for checkpoints."""
        streams = len(self.values()[0])
        return {
            "sliding_means": [mean.state_dict() for mean in self._sliding_means()],
            "steps": [row[0] for row in self.rows],
            "learner": np.array([row[1] for row in self.rows]).reshape(-1, streams),
            "zero": np.array([row[2] for row in self.rows]).reshape(-1, streams),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; everything is checked before anything is replaced."""
        means = self._sliding_means()
        for mean, saved in zip(means, state["sliding_means"], strict=True):
            SlidingMean(mean.window, mean.shape).load_state_dict(saved)  # raises if it differs
        learner_rows = np.asarray(state["learner"], dtype=np.float64).copy()
        zero_rows = np.asarray(state["zero"], dtype=np.float64).copy()
        rows = [
            (int(step), learner, zero)
            for step, learner, zero in zip(state["steps"], learner_rows, zero_rows, strict=True)
        ]
        for mean, saved in zip(means, state["sliding_means"], strict=True):
            mean.load_state_dict(saved)
        self.rows = rows

    def write_csv(self, path: Path) -> None:
        """Write the logged rows as ``metrics.csv`` (atomically)."""
        streams = len(self.rows[0][1]) if self.rows else 0
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(
            ["step", "msre", "msre_se", "msre_zero", "msre_ratio", "msre_ratio_se"]
            + [f"msre_{b}" for b in range(streams)]
            + [f"msre_zero_{b}" for b in range(streams)]
        )
        for step, learner, zero in self.rows:
            mean, standard_error = mean_and_standard_error(learner[None])
            ratio, ratio_error = mean_and_standard_error(msre_ratio(learner, zero)[None])
            writer.writerow(
                [
                    step,
                    f"{mean[0]:.8g}",
                    f"{standard_error[0]:.8g}",
                    f"{np.nanmean(zero) if np.isfinite(zero).any() else np.nan:.8g}",
                    f"{ratio[0]:.8g}",
                    f"{ratio_error[0]:.8g}",
                ]
                + [f"{value:.8g}" for value in learner]
                + [f"{value:.8g}" for value in zero]
            )
        atomic_write_bytes(path, text.getvalue().encode())


@dataclass
class _Checkpointer:
    """Writes the complete run state to ``path`` every ``every`` steps, and restores it."""

    path: Path
    every: int
    identity: dict[str, Any]
    env: Any
    engine: TDPredictor
    log: _MetricLog

    def save(self, step: int) -> None:
        state = {
            "engine": self.engine.state_dict(),
            "env": self.env.unwrapped.state_dict(),
            "metrics": self.log.state_dict(),
        }
        save_checkpoint(self.path, self.identity, step, state)

    def restore(self) -> int:
        """Load the checkpoint into the (freshly built) run; return its step.

        A failure raises before the run takes a single step, so a run never continues from
        a partly restored state.
        """
        step, state = load_checkpoint(self.path, self.identity)
        try:
            self.engine.load_state_dict(state["engine"])
            self.env.unwrapped.load_state_dict(state["env"])
            self.log.load_state_dict(state["metrics"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this run: {error}"
            ) from error
        return step


def run_experiment(
    config: RunConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_log: Callable[[int, float], None] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> RunResult:
    """Run one prediction experiment and write ``metrics.csv``, ``config.json``, a plot.

    Args:
        config: the run's settings.
        out_dir: folder for the outputs (created).
        progress: show a progress bar with steps/s and the current MSRE.
        on_log: called as ``on_log(step, mean_msre)`` at every log point.
        checkpoint_every: write ``out_dir/checkpoint.pt`` every this many steps (trace envs);
            None: no checkpoints.
        resume: continue from ``out_dir/checkpoint.pt`` if there is one (else start afresh).

    Returns:
        The final sliding MSRE of every stream, the throughput and the step started from.

    Raises:
        ValueError: on unknown names or bad values; if ``out_dir`` holds a checkpoint and
            ``resume`` is False; ``CheckpointError`` (a ValueError) if the checkpoint is
            corrupt or belongs to another run.
    """
    get_registry().spec(config.learner)  # an unknown learner fails before any work
    check_env_id(config.env_id, config.env)
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    out = Path(out_dir)
    checkpoint_path = out / CHECKPOINT_NAME
    if checkpoint_path.exists() and not resume:
        raise ValueError(
            f"{out} holds the checkpoint of an unfinished run ({checkpoint_path}); pass "
            "--resume to continue it, or delete the file to start over"
        )
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config.dtype)
    env_kwargs = dict(config.env_kwargs)
    if config.gamma is not None and config.env_id in ENV_ALIASES.values():
        env_kwargs.setdefault("gamma", config.gamma)
    env = gym.make_vec(config.env_id, num_envs=config.streams, **env_kwargs)
    gamma = config.gamma if config.gamma is not None else float(getattr(env, "gamma", 0.99))
    observation, info = env.reset(seed=config.seed)
    shape = env.single_observation_space.shape
    if shape is None:
        raise ValueError(
            f"{config.env_id}: its observation space {env.single_observation_space} has no "
            "shape; wrap the env so that it observes a flat Box (gymnasium's FlattenObservation)"
        )
    observation_size = int(np.prod(shape))

    learner = make_learner(
        config.learner,
        observation_size,
        streams=config.streams,
        independent_params=config.independent,
        dtype=dtype,
        seed=config.seed,
        **learner_kwargs(config),
    )
    engine = TDPredictor(
        learner,
        1,
        TDConfig(
            gamma=gamma,
            lambda_=config.lambda_,
            step_size=config.step_size,
            head_step_size=config.head_step_size,
            optimizer=config.optimizer,
            include_bias=config.include_bias,
            normalize_inputs=config.normalize_inputs,
            normalize_features=config.normalize_features,
            normalization_decay=config.normalization_rate,
            variance_floor=config.variance_floor,
        ),
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "run": dataclasses.asdict(config),
                "env_id": config.env_id,
                "gamma": gamma,
                "td": dataclasses.asdict(engine.config),
                "learner_config": dataclasses.asdict(learner.config),
                "n_features": learner.n_features,
                "observation_size": observation_size,
            },
            indent=2,
        )
    )

    has_targets = hasattr(env.unwrapped, "rollout") and "return_target" in info
    log = _MetricLog(config.streams, config.msre_window, episodic=not has_targets)
    checkpointer = None
    if checkpoint_every is not None or (resume and checkpoint_path.exists()):
        if not (has_targets and hasattr(env.unwrapped, "state_dict")):
            raise ValueError(
                f"checkpoints need an environment that saves its own state (state_dict / "
                f"load_state_dict, as the trace envs do); {config.env} does not"
            )
        checkpointer = _Checkpointer(
            checkpoint_path,
            checkpoint_every or config.steps,
            run_identity(config),
            env,
            engine,
            log,
        )
    first_step = 0
    if checkpointer is not None and resume and checkpoint_path.exists():
        first_step = checkpointer.restore()
    bar = tqdm(
        total=config.steps, initial=first_step, unit="step", disable=not progress, smoothing=0.05
    )
    started = time.perf_counter()
    if has_targets:
        _run_with_targets(
            env, engine, log, config, (observation, info), bar, on_log, first_step, checkpointer
        )
    else:
        _run_episodic(env, engine, log, config, observation, gamma, bar, on_log)
    elapsed = time.perf_counter() - started
    bar.close()
    env.close()

    log.write_csv(out / "metrics.csv")
    _plot_run(log, config, out)
    remove_checkpoint(checkpoint_path)
    final_learner, final_zero = log.values()
    return RunResult(
        out, final_learner, final_zero, (config.steps - first_step) / elapsed, first_step
    )


SHARED_NORMALIZATION = (
    "normalize_inputs",
    "normalize_features",
    "normalization_rate",
    "variance_floor",
)
"""Run settings a learner's config takes over where it has a field of the same name."""


def learner_kwargs(config: RunConfig) -> dict[str, Any]:
    """The learner's keyword arguments: ``learner_kwargs``, plus the run's normalisation.

    A learner whose config has fields named like the run's normalisation settings
    (``normalize_inputs``, ``normalize_features``, ``normalization_rate``, ``variance_floor``:
    CCN does) gets the run's values unless ``learner_kwargs`` sets them: one setting governs
    every normaliser of the run, as in the authors' code.
    """
    spec = get_registry().spec(config.learner)
    fields = {field.name for field in dataclasses.fields(spec.config_class)}
    shared = {name: getattr(config, name) for name in SHARED_NORMALIZATION if name in fields}
    return {**shared, **config.learner_kwargs}


def _plot_run(log: _MetricLog, config: RunConfig, out: Path) -> None:
    """Plot the run.

    ``learning_curve.png``: each stream's MSRE over its own predict-zero MSRE (the paper's
    way of comparing seeds); ``msre_curve.png``: the MSRE itself.
    """
    steps = np.array([row[0] for row in log.rows])
    learner = np.stack([row[1] for row in log.rows])
    zero = np.stack([row[2] for row in log.rows])
    title = f"{config.env} — {config.learner}, {config.streams} streams"
    window = f"sliding mean over {config.msre_window:,} steps"
    plot_learning_curve(
        steps,
        {config.learner: msre_ratio(learner, zero)},
        out / "learning_curve.png",
        title=title,
        ylabel=f"MSRE ÷ predict-zero MSRE, per stream (last {config.msre_window:,} steps)",
        reference_lines={"predict zero": 1.0},
    )
    plot_learning_curve(
        steps,
        {config.learner: learner},
        out / "msre_curve.png",
        title=title,
        ylabel=f"MSRE ({window})",
        reference_lines={"predict zero": zero.mean(1)},
    )


def _advance_log(
    log: _MetricLog,
    step: int,
    config: RunConfig,
    bar: tqdm,
    on_log: Callable[[int, float], None] | None,
) -> None:
    if step % config.log_every == 0 or step == config.steps:
        log.record(step)
        learner, zero = log.rows[-1][1:]
        msre = float(mean_and_standard_error(learner[None])[0][0])
        bar.set_postfix(msre=f"{msre:.4g}", zero=f"{mean_and_standard_error(zero[None])[0][0]:.4g}")
        if on_log is not None:
            on_log(step, msre)


def _run_with_targets(
    env: Any,
    engine: TDPredictor,
    log: _MetricLog,
    config: RunConfig,
    reset_result: tuple[np.ndarray, dict[str, Any]],
    bar: tqdm,
    on_log: Callable[[int, float], None] | None,
    first_step: int,
    checkpointer: _Checkpointer | None,
) -> None:
    """Trace envs: exact return targets every step, many steps generated per call.

    Starts from the reset observation when ``first_step`` is 0, else from a restored state.
    Chunks end on checkpoint boundaries, where the checkpointer saves the state.
    """
    dtype = engine.learner.dtype
    streams = config.streams
    step = first_step
    if step == 0:
        observation, info = reset_result
        first_observation = torch.as_tensor(observation, dtype=dtype).reshape(streams, -1)
        prediction = engine.step(first_observation, torch.zeros(streams, 1, dtype=dtype))
        _score(log, prediction, np.asarray(info["return_target"], dtype=np.float64))
        step = 1
        bar.update(1)
    while step < config.steps:
        chunk = min(ROLLOUT_CHUNK, config.steps - step)
        if checkpointer is not None:
            chunk = min(chunk, checkpointer.every - step % checkpointer.every)
        observations, cumulants, targets = env.unwrapped.rollout(chunk)
        observations = torch.as_tensor(observations, dtype=dtype).reshape(chunk, streams, -1)
        cumulants = torch.as_tensor(cumulants, dtype=dtype).reshape(chunk, streams, 1)
        for t in range(chunk):
            prediction = engine.step(observations[t], cumulants[t])
            _score(log, prediction, targets[t])
            step += 1
            _advance_log(log, step, config, bar, on_log)
        bar.update(chunk)
        if checkpointer is not None and step % checkpointer.every == 0 and step < config.steps:
            checkpointer.save(step)


def _score(log: _MetricLog, prediction: torch.Tensor, target: np.ndarray) -> None:
    predicted = prediction[:, 0].double().numpy()
    log.learner.update((predicted - target) ** 2)
    log.zero.update(target**2)


def _run_episodic(
    env: Any,
    engine: TDPredictor,
    log: _MetricLog,
    config: RunConfig,
    observation: np.ndarray,
    gamma: float,
    bar: tqdm,
    on_log: Callable[[int, float], None] | None,
) -> None:
    """Any Gymnasium env: reward is the cumulant, errors scored at each episode end."""
    dtype = engine.learner.dtype
    streams = config.streams
    scorer = EpisodeReturnScorer(streams, ["learner", "zero"])
    cumulant = np.zeros(streams)
    discount = np.zeros(streams)  # the first observation starts an episode
    episode_start = np.ones(streams, dtype=bool)
    ended = np.zeros(streams, dtype=bool)
    actions_random = np.random.default_rng(config.seed)
    env.action_space.seed(int(actions_random.integers(2**31)))
    for step in range(1, config.steps + 1):
        prediction = engine.step(
            torch.as_tensor(observation, dtype=dtype).reshape(streams, -1),
            torch.as_tensor(cumulant, dtype=dtype).reshape(streams, 1),
            discount=torch.as_tensor(discount, dtype=dtype),
            episode_start=torch.as_tensor(episode_start),
        )
        for episode in scorer.update(
            {"learner": prediction[:, 0].double().numpy(), "zero": np.zeros(streams)},
            cumulant,
            discount,
        ):
            log.learner_by_stream[episode.stream].update_many(episode.squared_errors["learner"])
            log.zero_by_stream[episode.stream].update_many(episode.squared_errors["zero"])
        # Gymnasium vector envs autoreset on the step *after* an episode ends: the terminal
        # observation arrives with the last reward (discount 0), the next one starts anew.
        observation, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        episode_start = ended
        ended = np.logical_or(terminated, truncated)
        cumulant = np.asarray(reward, dtype=np.float64)
        discount = np.where(ended | episode_start, 0.0, gamma)
        _advance_log(log, step, config, bar, on_log)
        bar.update(1)
