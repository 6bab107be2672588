"""Memory for SB3 on an outside suite (POPGym Easy + the cue-memory task), run as a sweep.

A spec (TOML) names tasks, methods and seeds; every (task, method variant, seed) is one run
in its own folder, run on a local process pool or on Ray through ``agentstate.sweep``'s
pools. A run trains one SB3 model for a budget of env steps, evaluates the deterministic
policy every ``eval_every`` steps and at the end, and writes::

    OUT/<name>/config.json     the run's settings and package versions
    OUT/<name>/metrics.csv     step, train_seconds, eval_return(_std), eval_episodes,
                               train_return (mean of the training episodes since the
                               previous row), train_episodes; the last row is the final
                               evaluation
    OUT/<name>/episodes.csv    every training episode: step at its end, return, length
    OUT/<name>/done.json       (atomically, last) the identity and final figures

Running the spec again skips runs with a matching ``done.json`` and starts the others
afresh: a killed run restarts from step 0 (one run takes minutes; a bit-exact resume would
need SB3's rollout or replay buffer and every env's state). A run claims its folder while it
runs (``agentstate.run_claim``), so two sweeps over one folder share out its runs instead of
running one twice.

Spec::

    [sweep]                  # all optional
    seeds = 3                # runs per grid point, seeds 0, 1, 2
    cpus_per_run = 1         # torch threads of a run, and its Ray CPU request
    max_retries = 3          # Ray: re-runs of a run whose worker or node died

    [run]                    # RunSettings fields (defaults below)
    steps = 100000

    [methods.ppo_agentstate_obs]   # more methods; ``base`` names one to start from (a
    base = "ppo_agentstate"        # method's agent_state is merged into its base's)
    agent_state = { cumulants = "reward+observation", n_features = 16 }

    [grid]                   # every combination; [[grid]] for a union of grids
    task = ["RepeatPreviousEasy", "CueMemory"]
    method = ["ppo", "ppo_agentstate_obs"]

    [grid.agent_state]       # optional: AgentStateVecEnv keyword arguments to combine
    step_size = [0.003, 0.01]
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.metadata
import itertools
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from memory_tasks import (
    JointDiscreteAction,
    LaggedObservations,
    ReconstructionCumulants,
    describe_space,
    make_task,
    task_names,
    task_spaces,
)
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from tqdm import tqdm

from agentstate import sweep
from agentstate.checkpoint import atomic_write_bytes, describe_differences
from agentstate.registry import make_learner
from agentstate.run_claim import RunClaimedElsewhere, claim_run
from agentstate.sb3 import AgentStateVecEnv
from agentstate.td import TDConfig
from agentstate.wrappers.settings import AgentStateSettings, settings_from_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SEED_STRIDE = 1000
"""Env ``i`` of seed ``s`` is seeded ``SEED_STRIDE * s + i`` in training and
``SEED_STRIDE * s + SEED_STRIDE // 2 + i`` in evaluation (the same episodes at every
evaluation of a run), so no two runs or phases share an env's random stream (SB3 alone
seeds env ``i`` with ``s + i``, which seed ``s + 1``'s env ``i - 1`` repeats)."""
RECONSTRUCT_KEY = "reconstruct_lags"
"""An ``agent_state`` key the harness reads itself (see ``ReconstructionCumulants``)."""
RECONSTRUCT_GAMMA_KEY = "reconstruct_gamma"
"""With ``reconstruct_lags``: the discount of the reconstruction heads alone (0: a supervised
loss on h_t), the other heads keeping ``gamma``; absent, every head has ``gamma``."""
DONE_NAME = sweep.DONE_NAME
FAILED_NAME = "failed.json"
"""Written by ``run_bench`` into the folder of a run that stopped with an error (the error);
removed when the run starts again."""
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
EPISODES_NAME = "episodes.csv"
METRICS_COLUMNS = (
    "step",
    "train_seconds",
    "eval_return",
    "eval_return_std",
    "eval_episodes",
    "train_return",
    "train_episodes",
)
_SWEEP_OPTIONS = {"seeds", "cpus_per_run", "max_retries"}
_POLL_SECONDS = 0.5


# ---------------------------------------------------------------------- methods
ALGORITHMS = ("PPO", "RecurrentPPO", "DQN", "RTRLActorCritic")
JOINT_ACTION_ALGORITHMS = ("DQN", "RTRLActorCritic")
"""Algorithms that act in one Discrete space: MultiDiscrete actions are joined for them
(``JointDiscreteAction``: Battleship's 8 x 8 becomes 64 actions, MineSweeper's 4 x 4 16)."""


@dataclass(frozen=True)
class Method:
    """How a run builds its envs and its SB3 algorithm."""

    algorithm: str
    """``PPO``, ``RecurrentPPO`` (sb3-contrib), ``DQN`` or ``RTRLActorCritic``
    (``agentstate.rl``: its ``algorithm_kwargs`` name the learner, its options and the
    ``config``)."""
    policy: str = "MlpPolicy"
    n_envs: int = 8
    """Parallel training envs (``DummyVecEnv``)."""
    frame_stack: int = 0
    """Stack the last k observations (gymnasium ``FrameStackObservation``, flattened)."""
    agent_state: dict[str, Any] | None = None
    """``AgentStateVecEnv`` keyword arguments ({} = its defaults); None: no agent state.
    ``reconstruct_lags`` (a list of ints) and ``reconstruct_gamma`` (a float) are read by
    the harness: see ``ReconstructionCumulants``."""
    algorithm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the algorithm beyond SB3's defaults (none in the suite)."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        for name in ("n_envs", "frame_stack"):
            value = getattr(self, name)
            smallest = 1 if name == "n_envs" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
        if self.agent_state is not None:
            try:
                _check_agent_state(self.agent_state)
            except (KeyError, TypeError, ValueError) as error:
                message = error.args[0] if error.args else error
                raise ValueError(f"agent_state {self.agent_state}: {message}") from error

    def applies_to(self, action_space: spaces.Space) -> bool:
        """DQN needs Discrete actions (MultiDiscrete ones are joined); others take any."""
        return self.algorithm != "DQN" or isinstance(
            action_space, spaces.Discrete | spaces.MultiDiscrete
        )


def resolved_agent_state(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting ``AgentStateVecEnv(venv, **options)`` trains with, as plain data.

    The wrapper's own settings, the engine's ``TDConfig`` and the learner's config, each
    with its defaults filled in (and the harness's ``reconstruct_lags``).
    """
    options = dict(options)
    lags = options.pop(RECONSTRUCT_KEY, [])
    reconstruct_gamma = options.pop(RECONSTRUCT_GAMMA_KEY, None)
    settings = settings_from_options(options.pop("learner", AgentStateSettings.learner), options)
    learner = make_learner(settings.learner, 1, **settings.learner_kwargs)
    wrapper_fields = ("cumulants", "include_observation", "include_prev_action")
    wrapper_fields += ("include_prev_reward", "nonfinite")
    resolved = {
        "learner": settings.learner,
        **{name: getattr(settings, name) for name in wrapper_fields},
        "td_config": dataclasses.asdict(TDConfig(**settings.td_config_options())),
        "learner_config": dataclasses.asdict(learner.config),
        RECONSTRUCT_KEY: list(lags),
    }
    # Settings added later are recorded only where set, so earlier runs keep their identity.
    if reconstruct_gamma is not None:
        resolved[RECONSTRUCT_GAMMA_KEY] = float(reconstruct_gamma)
    if settings.reconstruct_past:
        resolved["reconstruct_past"] = settings.reconstruct_past
    if settings.center_cumulants:
        resolved["center_cumulants"] = True
    if settings.observe_past:
        resolved["observe_past"] = settings.observe_past
    if not isinstance(settings.gamma, float | int):
        resolved["gamma_per_head"] = list(settings.gamma)
    return resolved


def _check_agent_state(options: Mapping[str, Any]) -> None:
    """Fail early on options ``AgentStateVecEnv`` would refuse: settings, TD and learner."""
    options = dict(options)
    lags = options.pop(RECONSTRUCT_KEY, [])
    if not isinstance(lags, list) or not all(
        isinstance(lag, int) and not isinstance(lag, bool) and lag >= 1 for lag in lags
    ):
        raise ValueError(f"{RECONSTRUCT_KEY} must be a list of integers >= 1, got {lags!r}")
    reconstruct_gamma = options.pop(RECONSTRUCT_GAMMA_KEY, None)
    if reconstruct_gamma is not None and (
        not lags
        or not isinstance(reconstruct_gamma, int | float)
        or not 0.0 <= reconstruct_gamma <= 1.0
    ):
        raise ValueError(
            f"{RECONSTRUCT_GAMMA_KEY} must be a number in [0, 1] and comes with "
            f"{RECONSTRUCT_KEY}; got {reconstruct_gamma!r} with lags {lags!r}"
        )
    resolved_agent_state(options)  # builds the settings, the TDConfig and the learner


BUILTIN_METHODS: dict[str, Method] = {
    "ppo": Method("PPO"),
    "ppo_framestack4": Method("PPO", frame_stack=4),
    "recurrent_ppo": Method("RecurrentPPO", policy="MlpLstmPolicy"),
    "ppo_agentstate": Method("PPO", agent_state={}),
    "dqn": Method("DQN", n_envs=1),
    "dqn_agentstate": Method("DQN", n_envs=1, agent_state={}),
    **{
        f"ac_{learner}": Method(
            "RTRLActorCritic",
            policy="RTRLPolicy",
            algorithm_kwargs={"learner": learner, "learner_kwargs": {"n_features": 32}},
        )
        for learner in ("columnar", "elstm", "rtu")
    },
}
"""The suite's methods: SB3 defaults, 8 envs for the PPO family, 1 for DQN; the streaming
actor-critic with its defaults over three cores of 32 features (RTU: 16 complex units),
8 envs as its streams."""


def algorithm_class(name: str) -> type[BaseAlgorithm]:
    """The SB3 class of an algorithm name."""
    if name == "RecurrentPPO":
        from sb3_contrib import RecurrentPPO  # the examples extra; only this method needs it

        return RecurrentPPO
    if name == "RTRLActorCritic":
        from agentstate.rl import RTRLActorCritic

        return RTRLActorCritic
    classes: dict[str, type[BaseAlgorithm]] = {"PPO": PPO, "DQN": DQN}
    return classes[name]


# ---------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSettings:
    """The ``[run]`` table: budget and evaluation protocol, the same for every method."""

    steps: int = 100_000
    """Env steps of training (summed over parallel envs). On-policy methods stop in the
    middle of the rollout that would pass the budget (its steps are not trained on); DQN
    ends its last ``train_freq`` block."""
    eval_every: int = 10_000
    """Env steps between evaluations of the learning curve (0: final evaluation only)."""
    curve_episodes: int = 20
    """Episodes of each learning-curve evaluation."""
    eval_episodes: int = 100
    """Episodes of the final evaluation."""
    eval_envs: int = 8
    """Parallel evaluation envs."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            smallest = 0 if item.name == "eval_every" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ValueError(f"[run] {item.name} must be an integer >= {smallest}")


@dataclass(frozen=True)
class BenchRun:
    """One run: a task, a method variant and a seed, in the folder ``OUT/<name>``."""

    name: str
    task: str
    variant: str
    """The method's name and any ``agent_state`` grid values: the column in the results."""
    method: Method
    seed: int
    settings: RunSettings
    cpus: int = 1
    """Torch threads of the run (``cpus`` is what ``agentstate.sweep``'s pools read)."""

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (compared with a finished folder's marker).

        A run with an agent state also carries ``agent_state_settings``, its wrapper settings
        resolved against the defaults of the installed ``agentstate``: a run finished under
        other defaults is another run, even where its ``agent_state`` options read the same.
        """
        identity = {
            "task": self.task,
            "variant": self.variant,
            "method": dataclasses.asdict(self.method),
            "seed": self.seed,
            "settings": dataclasses.asdict(self.settings),
        }
        if self.method.agent_state is not None:
            identity["agent_state_settings"] = resolved_agent_state(self.method.agent_state)
        return json.loads(json.dumps(identity))


def make_venv(run: BenchRun, n_envs: int, env_seed: int) -> VecEnv:
    """The run's vector env: task, memory wrappers, ``Monitor`` (raw returns), agent state.

    Env ``i`` is seeded ``env_seed + i``; the agent-state learner's parameters ``run.seed``.
    """
    method = run.method
    options = dict(method.agent_state or {})
    lags = tuple(options.pop(RECONSTRUCT_KEY, []))
    reconstruct_gamma = options.pop(RECONSTRUCT_GAMMA_KEY, None)

    def make() -> gym.Env:
        env: gym.Env = make_task(run.task)
        joins = method.algorithm in JOINT_ACTION_ALGORITHMS
        if joins and isinstance(env.action_space, spaces.MultiDiscrete):
            env = JointDiscreteAction(env)
        env = Monitor(env)
        if lags:
            env = LaggedObservations(env, lags)
        if method.frame_stack:
            env = gym.wrappers.FlattenObservation(
                gym.wrappers.FrameStackObservation(env, method.frame_stack)
            )
        return env

    venv = DummyVecEnv([make] * n_envs)
    venv.seed(env_seed)
    if method.agent_state is None:
        return venv
    if lags:
        observation_size = task_spaces(run.task)[0].shape[0]
        reconstruction = ReconstructionCumulants(
            options.get("cumulants", "reward"), observation_size, lags
        )
        options["cumulants"] = reconstruction
        if reconstruct_gamma is not None:
            options["gamma"] = reconstruction.discounts(
                options.get("gamma", AgentStateSettings.gamma), reconstruct_gamma
            )
    return AgentStateVecEnv(venv, **{"seed": run.seed, **options})


class _Evaluator:
    """Evaluates the deterministic policy on its own envs, the agent state frozen.

    Recurrent policies keep their state across each episode (``evaluate_policy`` passes
    it); the agent state does too, inside its env, with the training learner's parameters,
    heads and normalisers copied in before every evaluation and learning switched off.
    """

    def __init__(self, run: BenchRun, training_venv: VecEnv) -> None:
        self.run = run
        self.training_venv = training_venv
        self.env_seed = SEED_STRIDE * run.seed + SEED_STRIDE // 2
        self.venv = make_venv(run, run.settings.eval_envs, self.env_seed)
        self.seconds = 0.0

    def __call__(self, model: Any, episodes: int) -> tuple[float, float, int]:
        """``(mean return, standard deviation, episodes)``; time added to ``seconds``."""
        started = time.perf_counter()
        if isinstance(self.venv, AgentStateVecEnv):
            assert isinstance(self.training_venv, AgentStateVecEnv)
            self.venv.load_state_dict(self.training_venv.state_dict())
            self.venv.freeze()
        self.venv.seed(self.env_seed)
        episode_returns, _ = evaluate_policy(
            model,
            self.venv,
            n_eval_episodes=episodes,
            deterministic=True,
            return_episode_rewards=True,
        )
        returns = np.asarray(episode_returns, dtype=float)
        self.seconds += time.perf_counter() - started
        return float(returns.mean()), float(returns.std()), returns.size


class RunRecord:
    """A run folder's ``metrics.csv`` and ``episodes.csv``, and its training clock.

    Training time is wall-clock time since ``start`` less the evaluator's time.
    """

    def __init__(self, out: Path, evaluate: _Evaluator) -> None:
        self.evaluate = evaluate
        self._metrics_file = (out / METRICS_NAME).open("w", newline="")
        self._episodes_file = (out / EPISODES_NAME).open("w", newline="")
        self._metrics = csv.DictWriter(self._metrics_file, METRICS_COLUMNS)
        self._metrics.writeheader()
        self._episodes = csv.writer(self._episodes_file)
        self._episodes.writerow(["step", "return", "length"])
        self.recent_returns: list[float] = []
        """Returns of the training episodes since the last row."""
        self.started = time.perf_counter()

    def train_seconds(self) -> float:
        return time.perf_counter() - self.started - self.evaluate.seconds

    def episode(self, step: int, episode_return: float, length: int) -> None:
        self.recent_returns.append(episode_return)
        self._episodes.writerow([step, episode_return, length])

    def evaluation(
        self, step: int, evaluation: tuple[float, float, int], train_seconds: float | None = None
    ) -> None:
        """Write one row of ``metrics.csv`` (and flush both files).

        ``train_seconds`` defaults to the clock now (taken after the evaluation, whose time
        the clock leaves out).
        """
        mean, std, episodes = evaluation
        if train_seconds is None:
            train_seconds = self.train_seconds()
        recent = self.recent_returns
        self._metrics.writerow(
            {
                "step": step,
                "train_seconds": round(train_seconds, 3),
                "eval_return": mean,
                "eval_return_std": std,
                "eval_episodes": episodes,
                "train_return": float(np.mean(recent)) if recent else math.nan,
                "train_episodes": len(recent),
            }
        )
        self.recent_returns = []
        self._metrics_file.flush()
        self._episodes_file.flush()

    def close(self) -> None:
        self._metrics_file.close()
        self._episodes_file.close()


class BudgetAndCurve(BaseCallback):
    """Keeps the env-step budget, evaluates on schedule, records training episodes.

    On-policy algorithms: the rollout that reaches the budget on its last step is trained
    on (SB3 then stops at ``total_timesteps``); one that would pass it is cut off untrained,
    so every method takes the same env steps. Off-policy: SB3 stops at ``total_timesteps``.
    """

    def __init__(
        self, settings: RunSettings, record: RunRecord, report: Callable[[int], None]
    ) -> None:
        super().__init__()
        self.settings = settings
        self.record = record
        self.report = report
        self.next_eval = 0

    def _evaluate_point(self) -> None:
        evaluation = self.record.evaluate(self.model, self.settings.curve_episodes)
        self.record.evaluation(self.num_timesteps, evaluation)
        self.report(self.num_timesteps)
        while self.next_eval <= self.num_timesteps:
            self.next_eval += self.settings.eval_every

    def _on_training_start(self) -> None:
        if self.settings.eval_every:
            self._evaluate_point()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                episode = info["episode"]
                self.record.episode(self.num_timesteps, float(episode["r"]), int(episode["l"]))
        if self.num_timesteps >= self.settings.steps:
            if not isinstance(self.model, OnPolicyAlgorithm):
                return True
            return self.locals["n_steps"] + 1 == self.locals["n_rollout_steps"]
        if self.settings.eval_every and self.num_timesteps >= self.next_eval:
            self._evaluate_point()
        return True


def versions() -> dict[str, str]:
    """Versions of what a run's figures depend on."""
    packages = ("agentstate", "stable-baselines3", "sb3-contrib", "popgym", "gymnasium")
    found = {"python": platform.python_version()}
    for package in (*packages, "torch", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def execute_bench_run(
    run: BenchRun, out_root: str, progress: Any, sweep_id: str | None = None
) -> dict[str, Any]:
    """Train, evaluate and record one run in this process, then mark it done.

    The task both backends execute (``agentstate.sweep``'s pools call it with a progress
    queue, on which it puts ``(name, step)`` at every evaluation). It claims the run's folder
    for its whole length (``sweep_id``: the sweep's id; None, a call of its own). A folder left
    by a killed run is overwritten from step 0.

    Returns:
        The ``done.json`` content.

    Raises:
        RunClaimedElsewhere: if another live sweep runs this run, or finished it after this
            sweep listed it as unfinished.
    """
    torch.set_num_threads(run.cpus)
    out = Path(out_root) / run.name
    with claim_run(out, sweep_id or uuid.uuid4().hex):
        if is_finished(run, Path(out_root)):
            raise RunClaimedElsewhere(f"{out} was finished by another sweep meanwhile")
        (out / FAILED_NAME).unlink(missing_ok=True)  # a rerun of a run that failed before
        progress.put((run.name, 0))
        config = {**run.identity(), "name": run.name, "versions": versions(), "cpus": run.cpus}
        atomic_write_bytes(out / CONFIG_NAME, json.dumps(config, indent=2).encode())

        started = time.perf_counter()
        venv = make_venv(run, run.method.n_envs, SEED_STRIDE * run.seed)
        evaluate = _Evaluator(run, venv)
        algorithm = algorithm_class(run.method.algorithm)
        options = {"device": "cpu", "verbose": 0, **run.method.algorithm_kwargs}
        if run.method.algorithm == "RTRLActorCritic":  # its env comes first, its policy is fixed
            model = algorithm(venv, seed=run.seed, torch_threads=run.cpus, **options)
        else:
            model = algorithm(run.method.policy, venv, seed=run.seed, **options)
        venv.seed(SEED_STRIDE * run.seed)  # after SB3's own env.seed(seed), before learn's reset
        setup_seconds = time.perf_counter() - started

        record = RunRecord(out, evaluate)
        try:
            callback = BudgetAndCurve(
                run.settings, record, lambda step: progress.put((run.name, step))
            )
            model.learn(total_timesteps=run.settings.steps, callback=callback)
            train_seconds = record.train_seconds()
            final = evaluate(model, run.settings.eval_episodes)
            record.evaluation(model.num_timesteps, final, train_seconds)
        finally:
            record.close()
        progress.put((run.name, run.settings.steps))

        marker = {
            **run.identity(),
            "eval_return": final[0],
            "eval_return_std": final[1],
            "eval_episodes": final[2],
            "env_steps": int(model.num_timesteps),
            "train_seconds": train_seconds,
            "eval_seconds": evaluate.seconds,
            "setup_seconds": setup_seconds,
            "steps_per_second": model.num_timesteps / train_seconds,
        }
        atomic_write_bytes(out / DONE_NAME, json.dumps(marker, indent=2).encode())
        return marker


# ---------------------------------------------------------------------- specs
@dataclass(frozen=True)
class BenchSpec:
    """A parsed spec."""

    settings: dict[str, Any]
    """``[run]`` fields."""
    methods: dict[str, Method]
    """Built-in methods and the spec's ``[methods.*]``."""
    grids: list[dict[str, Any]]
    seeds: int = 1
    cpus_per_run: int = 1
    max_retries: int = 3


def load_spec(path: str | os.PathLike[str]) -> BenchSpec:
    """Read a spec (format in the module docstring).

    Raises:
        ValueError: on unknown tables, options, methods or fields, or grids that are not
            lists.
    """
    with Path(path).open("rb") as handle:
        document = tomllib.load(handle)
    unknown = set(document) - {"sweep", "run", "methods", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; use sweep, run, methods, grid")
    options = document.get("sweep", {})
    if set(options) - _SWEEP_OPTIONS:
        raise ValueError(
            f"{path}: unknown [sweep] options {sorted(set(options) - _SWEEP_OPTIONS)}; "
            f"known: {', '.join(sorted(_SWEEP_OPTIONS))}"
        )
    for name, value in options.items():
        smallest = 0 if name == "max_retries" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"{path}: [sweep] {name} must be an integer >= {smallest}")
    settings = document.get("run", {})
    _run_settings(settings)
    methods = dict(BUILTIN_METHODS)
    for name, table in document.get("methods", {}).items():
        methods[name] = _method_from_table(name, table, methods)
    grids = document.get("grid", {})
    grids = grids if isinstance(grids, list) else [grids]
    for grid in grids:
        for key, values in _grid_axes(grid):
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid entry {'.'.join(key)} must be a non-empty list")
        if "task" not in grid or "method" not in grid:
            raise ValueError(f"{path}: every grid needs a task list and a method list")
    return BenchSpec(settings, methods, grids, **options)


def _method_from_table(name: str, table: Mapping[str, Any], known: Mapping[str, Method]) -> Method:
    table = dict(table)
    base_name = table.pop("base", None)
    fields = {item.name for item in dataclasses.fields(Method)}
    if set(table) - fields:
        raise ValueError(
            f"[methods.{name}]: unknown fields {sorted(set(table) - fields)}; known: base, "
            + ", ".join(sorted(fields))
        )
    if base_name is None:
        return Method(**table)
    if base_name not in known:
        raise ValueError(f"[methods.{name}]: unknown base {base_name!r}; known: {sorted(known)}")
    base = copy.deepcopy(known[base_name])
    if base.agent_state is not None and "agent_state" in table:
        table["agent_state"] = _merged(base.agent_state, table["agent_state"])
    return dataclasses.replace(base, **table)


def _merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested tables (``td_options``) merged key by key."""
    merged = dict(copy.deepcopy(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _run_settings(fields: Mapping[str, Any]) -> RunSettings:
    known = {item.name for item in dataclasses.fields(RunSettings)}
    if set(fields) - known:
        raise ValueError(
            f"unknown [run] options {sorted(set(fields) - known)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return RunSettings(**fields)


def _grid_axes(grid: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, values)`` per axis: ``("task",)``, ``("agent_state", "step_size")``."""
    axes: list[tuple[tuple[str, ...], Any]] = []
    for key, values in grid.items():
        if key == "agent_state":
            axes += [((key, name), axis) for name, axis in values.items()]
        else:
            axes.append(((key,), values))
    return axes


def _format_value(value: Any) -> str:
    """A grid value as it appears in a folder name (no path separators or spaces)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("/", "-").replace(" ", "")


@dataclass
class Expansion:
    """The runs of a spec, and the grid points no method can run."""

    runs: list[BenchRun]
    not_applicable: list[str]
    """``task, variant: why`` for each skipped combination (DQN on Box actions)."""


def expand_spec(spec: BenchSpec) -> Expansion:
    """Every run of a spec, in grid order, with unique folder names.

    Raises:
        ValueError: on an unknown task, method or run option, agent-state axes on a method
            without an agent state, or two different runs sharing a folder name.
    """
    runs: dict[str, BenchRun] = {}
    not_applicable: list[str] = []
    for grid in spec.grids:
        axes = _grid_axes(grid)
        for point in itertools.product(*(values for _, values in axes)):
            chosen = dict(zip((path for path, _ in axes), point, strict=True))
            task, method_name = chosen.pop(("task",)), chosen.pop(("method",))
            if method_name not in spec.methods:
                raise ValueError(
                    f"unknown method {method_name!r}; known: {', '.join(sorted(spec.methods))}"
                )
            if task not in task_names():
                raise ValueError(f"unknown task {task!r}; known: {', '.join(task_names())}")
            method = copy.deepcopy(spec.methods[method_name])
            settings = dict(spec.settings)
            labels = []
            for path, value in chosen.items():
                if path[0] == "agent_state":
                    if method.agent_state is None:
                        raise ValueError(
                            f"grid.agent_state.{path[1]} given, but method {method_name!r} "
                            "has no agent state"
                        )
                    method = dataclasses.replace(
                        method, agent_state={**method.agent_state, path[1]: value}
                    )
                else:
                    settings[path[0]] = value
                labels.append(f"{path[-1]}={_format_value(value)}")
            variant = ",".join([method_name, *labels])
            if not method.applies_to(task_spaces(task)[1]):
                not_applicable.append(
                    f"{task}, {variant}: {method.algorithm} needs Discrete actions, the task "
                    f"has {describe_space(task_spaces(task)[1])}"
                )
                continue
            run_settings = _run_settings(settings)
            for seed in range(spec.seeds):
                name = f"task={task},method={variant},seed={seed}"
                run = BenchRun(name, task, variant, method, seed, run_settings, spec.cpus_per_run)
                previous = runs.setdefault(name, run)
                if previous.identity() != run.identity():
                    raise ValueError(
                        f"two grid points share the folder name {name!r} but differ: "
                        + "; ".join(describe_differences(previous.identity(), run.identity()))
                    )
    return Expansion(list(runs.values()), not_applicable)


def is_finished(run: BenchRun, out_root: Path) -> bool:
    """Whether ``out_root/<run.name>`` holds this run, finished.

    Raises:
        ValueError: if the folder holds a finished run of another config.
    """
    marker_path = out_root / run.name / DONE_NAME
    if not marker_path.exists():
        return False
    saved = _as_run(json.loads(marker_path.read_text()))
    mine = _as_run(run.identity())
    differences = describe_differences({key: saved.get(key) for key in mine}, mine)
    if differences:
        raise ValueError(
            f"{marker_path.parent} holds a finished run of another config "
            f"({'; '.join(differences)}); use another --out or delete that folder"
        )
    return True


def _as_run(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` as what the run does: with its wrapper settings resolved, how its
    ``agent_state`` options spell them (a default written out or left implicit) is dropped."""
    if "agent_state_settings" not in identity or not isinstance(identity.get("method"), dict):
        return identity
    method = {key: value for key, value in identity["method"].items() if key != "agent_state"}
    return {**identity, "method": method}


# ---------------------------------------------------------------------- sweeps
class _LocalPool(sweep._LocalPool):
    """``agentstate.sweep``'s process pool (spawn), running ``execute_bench_run``."""

    def submit(self, run: BenchRun, out_root: str, sweep_id: str) -> Any:  # type: ignore[override]
        return self._executor.submit(execute_bench_run, run, out_root, self._progress, sweep_id)


class _RayCluster(sweep._RayCluster):
    """``agentstate.sweep``'s Ray backend (CPU requests, retries), running ``execute_bench_run``.

    Ray's workers import this module from the driver script's folder (Ray adds it to their
    path), so on a multi-node cluster the checkout must lie at the same path on every node.
    """

    def __init__(self, local_cpus: int, address: str | None, max_retries: int) -> None:
        super().__init__(local_cpus, address, max_retries)
        self._task = self._ray.remote(execute_bench_run)


@dataclass
class BenchReport:
    """What one ``run_bench`` call did."""

    finished: list[dict[str, Any]]
    """The ``done.json`` of each run finished in this call."""
    skipped: list[str]
    """Runs finished before this call."""
    failed: dict[str, str]
    """Run name -> error."""
    not_applicable: list[str]
    elsewhere: dict[str, str] = dataclasses.field(default_factory=dict)
    """Run name -> the live process of another sweep that runs it (or finished it)."""


def run_bench(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> BenchReport:
    """Run every unfinished run of a spec, in parallel, and report what happened.

    Args:
        spec_path: the TOML spec.
        out_dir: the output folder; one sub-folder per run.
        backend: ``local`` (a process pool here) or ``ray``.
        address: Ray cluster address; None starts a local Ray cluster.
        workers: runs at once (default: CPUs / cpus_per_run).
        progress: show a progress bar.
        log: where the one line per finished run goes.

    Raises:
        ValueError: on a bad spec or a folder holding a finished run of another config;
            nothing has run then.
    """
    if backend not in sweep.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(sweep.BACKENDS)}")
    spec = load_spec(spec_path)
    expansion = expand_spec(spec)
    out_root = Path(out_dir).resolve()
    skipped = [run.name for run in expansion.runs if is_finished(run, out_root)]
    pending = [run for run in expansion.runs if run.name not in skipped]
    report = BenchReport([], skipped, {}, expansion.not_applicable)
    for line in expansion.not_applicable:
        log(f"not run: {line}")
    if skipped:
        log(f"{len(skipped)} of {len(expansion.runs)} runs already finished; skipping them")
    if not pending:
        return report
    out_root.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, (os.cpu_count() or 1) // spec.cpus_per_run)
    pool: _LocalPool | _RayCluster = (
        _LocalPool(workers)
        if backend == "local"
        else _RayCluster(workers * spec.cpus_per_run, address, spec.max_retries)
    )
    try:
        sweep_id = uuid.uuid4().hex
        handles = {pool.submit(run, str(out_root), sweep_id): run for run in pending}
        bar = tqdm(
            total=len(expansion.runs), initial=len(skipped), unit="run", disable=not progress
        )
        steps_reached: dict[str, int] = {}
        while handles:
            for name, step in pool.drain_progress():
                steps_reached[name] = step
            bar.set_postfix_str(f"{sum(steps_reached.values()):,} env steps")
            for handle, outcome in pool.wait(list(handles), _POLL_SECONDS):
                run = handles.pop(handle)
                bar.update(1)
                if isinstance(outcome, RunClaimedElsewhere):
                    report.elsewhere[run.name] = str(outcome)
                    log(f"{run.name}: left to another sweep: {outcome}")
                elif isinstance(outcome, BaseException):
                    report.failed[run.name] = f"{type(outcome).__name__}: {outcome}"
                    log(f"{run.name}: FAILED: {report.failed[run.name]}")
                    folder = out_root / run.name
                    folder.mkdir(exist_ok=True)
                    error = {"name": run.name, "error": report.failed[run.name]}
                    atomic_write_bytes(folder / FAILED_NAME, json.dumps(error, indent=2).encode())
                else:
                    report.finished.append(outcome)
                    log(
                        f"{run.name}: eval return {outcome['eval_return']:+.3f} over "
                        f"{outcome['eval_episodes']} episodes, {outcome['env_steps']:,} steps "
                        f"in {outcome['train_seconds']:.1f} s"
                    )
        bar.close()
    finally:
        pool.close()
    return report
