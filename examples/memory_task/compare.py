"""Memory for any SB3 algorithm: PPO and DQN with an online-learned agent state on a cue task.

Compares, at the same step budget and over several seeds, on ``CueMemoryEnv`` (remember a
cue across ``delay`` blank steps, then pick the matching action):

* PPO (memoryless), PPO + ``FrameStackObservation`` (the last 4 observations),
  sb3-contrib ``RecurrentPPO`` (an LSTM trained by BPTT), PPO + ``AgentStateVecEnv``
  (predicting reward and observations; and, as an ablation, the reward alone);
* DQN (memoryless) and DQN + ``AgentStateVecEnv`` (RecurrentPPO has no DQN counterpart).

Each trained policy is evaluated greedily on 200 fresh episodes (the agent state frozen);
the table reports mean return +- standard error over seeds (chance 0, perfect 1) and the
training wall-clock time. Written to ``results.md`` and ``results.json`` in this folder.

Run: ``python examples/memory_task/compare.py`` (defaults reproduce the README table).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from memory_env import CueMemoryEnv
from sb3_contrib import RecurrentPPO
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from agentstate.sb3 import AgentStateVecEnv

HERE = Path(__file__).parent


@dataclass
class Config:
    """Everything one comparison depends on (written to ``results.json``)."""

    delay: int = 10
    """Blank steps between the cue and the decision."""
    ppo_steps: int = 50_000
    """Environment steps of every PPO-family run."""
    dqn_steps: int = 20_000
    """Environment steps of every DQN run."""
    seeds: int = 3
    eval_episodes: int = 200
    frame_stack: int = 4
    """Observations stacked for the frame-stacking baseline (less than the delay)."""
    ppo_envs: int = 8
    dqn_envs: int = 4
    learner: str = "columnar"
    """The state learner this comparison was measured with (not the wrapper's default)."""
    n_features: int = 16
    """Columns of the columnar learner (the agent state's size)."""
    cumulants: str = "reward+observation"
    """What the agent state learns to predict: reward and every observation component."""
    step_size: float = 0.01
    """Adam step size of the learner."""
    center_cumulants: bool = False
    reconstruct_past: int = 0
    observe_past: int = 0
    """Uncentred heads, no reconstruction heads, no past shown: the setting measured here
    (the wrapper's defaults now centre the cumulants and show the policy the
    three observations before the current one)."""


@dataclass
class Method:
    """One row of the table: how to build the env and the algorithm."""

    name: str
    algorithm: type[BaseAlgorithm]
    policy: str
    n_envs: int
    steps: int
    agent_state: bool | str = False
    """Wrap in ``AgentStateVecEnv``; a string overrides ``Config.cumulants``."""
    frame_stack: int = 0


def methods(config: Config) -> list[Method]:
    ppo = (PPO, "MlpPolicy", config.ppo_envs, config.ppo_steps)
    dqn = (DQN, "MlpPolicy", config.dqn_envs, config.dqn_steps)
    recurrent = (RecurrentPPO, "MlpLstmPolicy", config.ppo_envs, config.ppo_steps)
    stack = config.frame_stack
    return [
        Method("PPO", *ppo),
        Method(f"PPO + FrameStackObservation({stack})", *ppo, frame_stack=stack),
        Method("RecurrentPPO (sb3-contrib, LSTM 256)", *recurrent),
        Method("PPO + AgentStateVecEnv", *ppo, agent_state=True),
        Method("PPO + AgentStateVecEnv, cumulants='reward'", *ppo, agent_state="reward"),
        Method("DQN", *dqn),
        Method("DQN + AgentStateVecEnv", *dqn, agent_state=True),
    ]


def hyperparameters(method: Method) -> dict:
    """Shared settings of each family (PPO-family runs differ only in memory)."""
    if method.algorithm is DQN:
        return dict(
            learning_starts=1000,
            buffer_size=50_000,
            train_freq=1,
            target_update_interval=250,
            exploration_fraction=0.3,
            learning_rate=1e-3,
            batch_size=64,
        )
    return dict(n_steps=128, batch_size=256, n_epochs=4, learning_rate=1e-3, ent_coef=0.01)


def make_venv(method: Method, config: Config, seed: int) -> VecEnv:
    def make() -> gym.Env:
        env: gym.Env = Monitor(CueMemoryEnv(config.delay))
        if method.frame_stack:
            env = gym.wrappers.FrameStackObservation(env, method.frame_stack)
        return env

    venv: VecEnv = DummyVecEnv([make] * method.n_envs)
    venv.seed(seed)
    if method.agent_state:
        venv = AgentStateVecEnv(
            venv,
            cumulants=method.agent_state
            if isinstance(method.agent_state, str)
            else config.cumulants,
            learner=config.learner,
            n_features=config.n_features,
            step_size=config.step_size,
            center_cumulants=config.center_cumulants,
            reconstruct_past=config.reconstruct_past,
            observe_past=config.observe_past,
            seed=seed,
        )
    return venv


def run(method: Method, config: Config, seed: int) -> dict[str, float]:
    venv = make_venv(method, config, seed)
    model = method.algorithm(method.policy, venv, seed=seed, **hyperparameters(method))
    start = time.perf_counter()
    model.learn(total_timesteps=method.steps)
    seconds = time.perf_counter() - start
    if isinstance(venv, AgentStateVecEnv):
        venv.freeze()
    venv.seed(10_000 + seed)
    mean_return, _ = evaluate_policy(
        model, venv, n_eval_episodes=config.eval_episodes, deterministic=True
    )
    training = [episode["r"] for episode in model.ep_info_buffer]
    return {
        "eval_return": float(mean_return),
        "train_return_last_100": float(np.mean(training)),
        "seconds": seconds,
        "steps_per_second": method.steps / seconds,
    }


def mean_and_error(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    error = array.std(ddof=1) / np.sqrt(len(array)) if len(array) > 1 else float("nan")
    return float(array.mean()), float(error)


def table(config: Config, results: dict[str, list[dict[str, float]]], rows: list[Method]) -> str:
    lines = [
        f"Cue memory task, delay {config.delay} (chance 0, perfect 1); {config.seeds} seeds; "
        f"greedy evaluation on {config.eval_episodes} episodes; mean ± s.e. over seeds.",
        "",
        "| method | env steps | eval return | train return (last 100 ep.) | wall-clock s / run |",
        "|---|---|---|---|---|",
    ]
    for method in rows:
        runs = results[method.name]
        evaluation = mean_and_error([r["eval_return"] for r in runs])
        training = mean_and_error([r["train_return_last_100"] for r in runs])
        seconds = mean_and_error([r["seconds"] for r in runs])
        lines.append(
            f"| {method.name} | {method.steps:,} | {evaluation[0]:.2f} ± {evaluation[1]:.2f} | "
            f"{training[0]:.2f} ± {training[1]:.2f} | {seconds[0]:.0f} ± {seconds[1]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, value in asdict(Config()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.md/json")
    args = parser.parse_args(argv)
    config = Config(**{field: getattr(args, field) for field in asdict(Config())})
    torch.set_num_threads(1)  # small networks: one thread is fastest and steadiest

    rows = methods(config)
    results: dict[str, list[dict[str, float]]] = {method.name: [] for method in rows}
    for seed in range(config.seeds):
        for method in rows:
            outcome = run(method, config, seed)
            results[method.name].append(outcome)
            report(
                f"seed {seed} {method.name}: eval {outcome['eval_return']:+.2f}, "
                f"{outcome['seconds']:.0f} s"
            )
    markdown = table(config, results, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(
        json.dumps({"config": asdict(config), "results": results}, indent=2)
    )
    report(markdown)


if __name__ == "__main__":
    main()
