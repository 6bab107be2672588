"""The prediction experiment behind ``agentstate run``.

B streams of one environment step together in one process. With ``independent_params`` each
stream is its own run (B seeds at once); otherwise the streams share one learner. The learner
predicts the discounted sum of the environment's reward (the cumulant) with TD(lambda); the
mean squared return error (MSRE) is logged as a sliding mean per stream, next to the error
of predicting zero.

Where the streams come from is a stream source (``agentstate.streams``): the trace-conditioning
family reports the exact return of every step and is scored every step; any other Gymnasium
environment (random actions) and the Atari expert replay (``atari-prediction``) are scored at
the end of each episode against the discounted return computed backward over it. One metric
log (``agentstate.metric_log``) serves them all.

Checkpoints (trace envs, whose state the env itself saves): every ``checkpoint_every`` steps the
complete run state (TD engine with learner, traces, optimiser and normalisers; env generators
and schedule; metric log; step) replaces ``checkpoint.pt`` atomically. Env steps are generated
in chunks that end on checkpoint boundaries, and what a trace env shows never depends on how
its steps are chunked, so a resumed run writes the same ``metrics.csv`` as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from agentstate.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from agentstate.metric_log import MetricLog, column, msre_ratio, stream_mean
from agentstate.metrics import EpisodeReturnScorer, mean_and_standard_error
from agentstate.plotting import plot_learning_curve
from agentstate.registry import get_registry, make_learner
from agentstate.streams import EpisodicSource, StreamSource, TraceSource
from agentstate.td import TDConfig, TDPredictor

ENV_ALIASES = {
    "trace-conditioning": "agentstate/TraceConditioning-v0",
    "trace-patterning": "agentstate/TracePatterning-v0",
    "noisy-patterning": "agentstate/NoisyPatterning-v0",
}
ATARI_PREDICTION = "atari-prediction"
"""The Atari Prediction Benchmark's expert replay (``agentstate.atari``), one game per stream."""
REFERENCE_LABELS = {"zero": "predict zero", "mean_reward": "running mean reward / (1 - γ)"}
"""Reference predictor name -> its label in the plots."""
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
    """A registered learner name (``agentstate learners``)."""
    steps: int = 100_000
    """Environment steps per stream."""
    streams: int = 8
    """Streams stepped together (for the Atari replay, a multiple of the number of games)."""
    independent: bool = False
    """One network per stream (B independent runs) instead of one shared network."""
    seed: int = 0
    """Seed of the learner's initialisation and of the env."""
    step_size: float = 0.001
    """Step size of the learner (``rmsprop_td`` at 0.001: the authors' best on trace patterning)."""
    head_step_size: float | None = None
    """Step size of the prediction head; None: step_size / number of features built."""
    gamma: float | None = None
    """Discount; None takes the environment's own (``env.gamma``) or 0.99."""
    lambda_: float = 0.99
    """Trace decay."""
    optimizer: str = "rmsprop_td"
    """``sgd``, ``rmsprop_td`` (the authors' normaliser) or ``adam``."""
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
    """Steps between two rows of ``metrics.csv``."""
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    """Learner keyword arguments, e.g. ``{"n_features": 7}``."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Environment constructor arguments, e.g. ``{"preset": "rafiee2022"}``."""
    dtype: str = "float32"
    """``float32`` or ``float64``."""

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
    final: dict[str, np.ndarray] = field(default_factory=dict)
    """``metrics.csv`` column (``msre``, ``msre_zero``, references) -> final MSRE ``[B]``."""
    stream_labels: list[str] = field(default_factory=list)
    """Each stream's label (its game, for the Atari replay)."""
    env_steps_per_second: float = float("nan")
    """Env steps of all streams per second of time spent in the source."""
    learner_us_per_step: float = float("nan")
    """Microseconds of ``TDPredictor.step`` per step of all streams."""

    def summary(self) -> dict[str, Any]:
        """``summary.json``: final MSREs and speeds."""
        return {
            "stream_labels": self.stream_labels,
            "final_msre": {name: values.tolist() for name, values in self.final.items()},
            "steps_per_second": self.steps_per_second,
            "env_steps_per_second": self.env_steps_per_second,
            "learner_us_per_step": self.learner_us_per_step,
        }

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


@dataclass
class _Checkpointer:
    """Writes the complete run state to ``path`` every ``every`` steps, and restores it."""

    path: Path
    every: int
    identity: dict[str, Any]
    source: Any
    engine: TDPredictor
    log: MetricLog

    def save(self, step: int) -> None:
        state = {
            "engine": self.engine.state_dict(),
            "env": self.source.state_dict(),
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
            self.source.load_state_dict(state["env"])
            self.log.load_state_dict(state["metrics"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {self.path} does not fit this run: {error}"
            ) from error
        return step


def make_source(config: RunConfig) -> StreamSource:
    """The stream source ``config.env`` names (see ``agentstate.streams``).

    The trace envs (``ENV_ALIASES``): a :class:`~agentstate.streams.TraceSource`, with exact
    targets.
    ``atari-prediction``: the benchmark's expert replay, one game per stream
    (``agentstate.atari.atari_source``). Any other Gymnasium id: random actions, scored by
    episodes.
    """
    if config.env_id == ATARI_PREDICTION:
        from agentstate.atari import atari_source  # needs ale-py

        return atari_source(config)
    check_env_id(config.env_id, config.env)
    env_kwargs = dict(config.env_kwargs)
    if config.gamma is not None and config.env_id in ENV_ALIASES.values():
        env_kwargs.setdefault("gamma", config.gamma)
    env = gym.make_vec(config.env_id, num_envs=config.streams, **env_kwargs)
    if config.env_id in ENV_ALIASES.values():  # the trace family: exact targets, checkpoints
        return TraceSource(env, config.seed)
    actions_random = np.random.default_rng(config.seed)
    env.action_space.seed(int(actions_random.integers(2**31)))
    gamma = config.gamma if config.gamma is not None else float(getattr(env, "gamma", 0.99))
    try:
        return EpisodicSource(env, gamma=gamma, actions=env.action_space.sample, seed=config.seed)
    except ValueError as error:
        raise ValueError(f"{config.env_id}: {error}") from None


def run_experiment(
    config: RunConfig,
    out_dir: str | Path,
    *,
    source: StreamSource | None = None,
    progress: bool = True,
    on_log: Callable[[int, float], None] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    torch_threads: int | None = None,
) -> RunResult:
    """Run one prediction experiment and write ``metrics.csv``, ``config.json``, plots.

    Args:
        config: the run's settings.
        out_dir: folder for the outputs (created).
        source: the streams (default: :func:`make_source` of ``config``).
        progress: show a progress bar with steps/s and the current MSRE.
        on_log: called as ``on_log(step, mean_msre)`` at every log point.
        checkpoint_every: write ``out_dir/checkpoint.pt`` every this many steps (a source
            that saves its state: the trace envs); None: no checkpoints.
        resume: continue from ``out_dir/checkpoint.pt`` if there is one (else start afresh).
        torch_threads: torch's intra-op threads while the run lasts (None: as they are);
            results do not depend on it.

    Returns:
        The final sliding MSRE of every stream and predictor, speeds, the step started from.

    Raises:
        ValueError: on unknown names or bad values; if ``out_dir`` holds a checkpoint and
            ``resume`` is False; ``CheckpointError`` (a ValueError) if the checkpoint is
            corrupt or belongs to another run.
    """
    get_registry().spec(config.learner)  # an unknown learner fails before any work
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
    if source is None:
        source = make_source(config)
    out.mkdir(parents=True, exist_ok=True)
    learner = make_learner(
        config.learner,
        source.observation_size,
        streams=source.streams,
        independent_params=config.independent,
        dtype=getattr(torch, config.dtype),
        seed=config.seed,
        **learner_kwargs(config),
    )
    engine = TDPredictor(
        learner,
        1,
        TDConfig(
            gamma=source.gamma,
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
                "gamma": source.gamma,
                "stream_labels": source.labels,
                "behaviour": source.description,
                "td": dataclasses.asdict(engine.config),
                "learner_config": dataclasses.asdict(learner.config),
                "n_features": learner.n_features,
                "observation_size": source.observation_size,
            },
            indent=2,
        )
    )
    names = ("learner", "zero", *source.reference_names)
    episodic = not source.scored_every_step
    log = MetricLog(source.streams, config.msre_window, names, episodic=episodic)
    checkpointer = None
    if checkpoint_every is not None or (resume and checkpoint_path.exists()):
        if not hasattr(source, "state_dict"):
            raise ValueError(
                f"checkpoints need an environment that saves its own state (state_dict / "
                f"load_state_dict, as the trace envs do); {config.env} does not"
            )
        every = checkpoint_every or config.steps
        checkpointer = _Checkpointer(
            checkpoint_path, every, run_identity(config), source, engine, log
        )
    first_step = 0
    if checkpointer is not None and resume and checkpoint_path.exists():
        first_step = checkpointer.restore()
    bar = tqdm(
        total=config.steps, initial=first_step, unit="step", disable=not progress, smoothing=0.05
    )
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    timer = _Timer()
    try:
        _run(source, engine, log, config, bar, on_log, first_step, checkpointer, timer)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        source.close()

    log.write_csv(out / "metrics.csv")
    _plot_run(log, config, source, out)
    remove_checkpoint(checkpoint_path)
    final = {column(name): values for name, values in log.values().items()}
    steps_taken = config.steps - first_step
    result = RunResult(
        out,
        final["msre"],
        final["msre_zero"],
        steps_taken / timer.total,
        first_step,
        final=final,
        stream_labels=source.labels,
        env_steps_per_second=steps_taken * source.streams / max(timer.env, 1e-12),
        learner_us_per_step=timer.learner / max(steps_taken, 1) * 1e6,
    )
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
    return result


@dataclass
class _Timer:
    """Seconds spent in the source (envs), in the TD engine, and in all."""

    env: float = 0.0
    learner: float = 0.0
    total: float = 0.0


def _run(
    source: StreamSource,
    engine: TDPredictor,
    log: MetricLog,
    config: RunConfig,
    bar: tqdm,
    on_log: Callable[[int, float], None] | None,
    first_step: int,
    checkpointer: _Checkpointer | None,
    timer: _Timer,
) -> None:
    """The loop: chunks of steps from the source, a TD step and a score for each.

    Chunks end on checkpoint boundaries, where the checkpointer saves the state.
    """
    dtype = engine.learner.dtype
    streams = source.streams
    scorer = None if source.scored_every_step else EpisodeReturnScorer(streams, list(log.names))
    zero = np.zeros(streams)
    step = first_step
    started = time.perf_counter()
    while step < config.steps:
        chunk = min(ROLLOUT_CHUNK, config.steps - step)
        if checkpointer is not None:
            chunk = min(chunk, checkpointer.every - step % checkpointer.every)
        env_started = time.perf_counter()
        steps = source.steps(chunk)
        timer.env += time.perf_counter() - env_started
        observations = torch.as_tensor(steps.observation, dtype=dtype)
        cumulants = torch.as_tensor(steps.cumulant, dtype=dtype).unsqueeze(-1)
        discounts = None if steps.discount is None else torch.as_tensor(steps.discount, dtype=dtype)
        starts = None if steps.episode_start is None else torch.as_tensor(steps.episode_start)
        unscored: list[Tensor] = []  # predictions [B, K] of this chunk's unscored steps
        for t in range(chunk):
            learner_started = time.perf_counter()
            prediction = engine.step(
                observations[t],
                cumulants[t],
                discount=None if discounts is None else discounts[t],
                episode_start=None if starts is None else starts[t],
            )
            timer.learner += time.perf_counter() - learner_started
            step += 1
            if steps.target is not None:
                unscored.append(prediction)  # scored together at the next log point
            else:
                assert scorer is not None and steps.discount is not None
                predictions = {"learner": prediction[:, 0].double().numpy(), "zero": zero}
                predictions.update({name: values[t] for name, values in steps.references.items()})
                for episode in scorer.update(predictions, steps.cumulant[t], steps.discount[t]):
                    log.add(episode)
            if step % config.log_every == 0 or step == config.steps:
                _score_targets(log, unscored, steps.target, t + 1)
                _advance_log(log, step, bar, on_log)
        _score_targets(log, unscored, steps.target, chunk)
        bar.update(chunk)
        if checkpointer is not None and step % checkpointer.every == 0 and step < config.steps:
            checkpointer.save(step)
    timer.total = time.perf_counter() - started


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


def _plot_run(log: MetricLog, config: RunConfig, source: StreamSource, out: Path) -> None:
    """Plot the run.

    ``learning_curve.png``: each stream's MSRE over its own predict-zero MSRE (the paper's
    way of comparing seeds); ``msre_curve.png``: the MSRE itself, references dashed; with
    several stream labels (games), ``learning_curve_<label>.png`` per label.
    """
    steps = np.array(log.steps)
    learner, zero = log.curve("learner"), log.curve("zero")
    title = f"{config.env} — {config.learner}, {source.streams} streams"
    window = f"sliding mean over {config.msre_window:,} scored steps"
    plot_learning_curve(
        steps,
        {config.learner: msre_ratio(learner, zero)},
        out / "learning_curve.png",
        title=title,
        ylabel=f"MSRE ÷ predict-zero MSRE, per stream (last {config.msre_window:,} steps)",
        reference_lines={"predict zero": 1.0},
    )
    streams_of = {label: np.array(source.labels) == label for label in dict.fromkeys(source.labels)}
    groups = [(out / "msre_curve.png", title, np.ones(source.streams, dtype=bool))]
    if len(streams_of) > 1:
        groups += [
            (out / f"learning_curve_{label}.png", f"{label} — {config.learner}", mask)
            for label, mask in streams_of.items()
        ]
    for path, group_title, mask in groups:
        plot_learning_curve(
            steps,
            {config.learner: learner[:, mask]},
            path,
            title=group_title,
            ylabel=f"MSRE ({window})",
            reference_lines={
                REFERENCE_LABELS.get(name, name): stream_means(log.curve(name)[:, mask])
                for name in log.names[1:]
            },
        )


def stream_means(curve: np.ndarray) -> np.ndarray:
    """``[N, B] -> [N]``: the mean over streams at each point (streams with NaN left out)."""
    return mean_and_standard_error(curve)[0]


def _score_targets(
    log: MetricLog, unscored: list[Tensor], targets: np.ndarray | None, end: int
) -> None:
    """Score ``unscored`` against the chunk's exact targets, in one vectorised update.

    ``unscored`` holds the predictions ``[B, K]`` of the steps just before index ``end`` of
    the chunk (``targets``: ``[chunk, B]``); it is emptied. Bit for bit what scoring each step
    on its own gives.
    """
    if not unscored:
        return
    assert targets is not None
    predicted = torch.stack(unscored)[:, :, 0].double().numpy()  # [n, B]
    target = targets[end - len(unscored) : end]
    log.update_many({"learner": (predicted - target) ** 2, "zero": target**2})
    unscored.clear()


def _advance_log(
    log: MetricLog,
    step: int,
    bar: tqdm,
    on_log: Callable[[int, float], None] | None,
) -> None:
    """Record the log's row of ``step`` (a log point) and show it."""
    log.record(step)
    row = log.rows[-1]
    msre = stream_mean(row["learner"])
    bar.set_postfix(msre=f"{msre:.4g}", zero=f"{stream_mean(row['zero']):.4g}")
    if on_log is not None:
        on_log(step, msre)
