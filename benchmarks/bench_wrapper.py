"""Overhead of the agent-state wrapper: PPO env steps per second with and without it, one run.

PPO (``MlpPolicy``, CPU, one torch thread) learns on ``--env`` in two settings, each plain and
wrapped: ``--n-envs`` envs in a ``DummyVecEnv`` wrapped by ``AgentStateVecEnv`` (one learner,
one stream per env), and one env wrapped by ``AgentStateWrapper``. Runs alternate so that a
busy machine slows all of them alike; the median of ``--repeats`` runs is reported, with the
ratio of wrapped to plain steps per second in the same setting.

Run: ``python benchmarks/bench_wrapper.py [--env CartPole-v1] [--steps 10000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import agentstate
from agentstate.sb3 import AgentStateVecEnv

WRAPPER_OPTIONS = {"n_features": 16, "cumulants": "reward+observation", "seed": 0}


def make_venv(wrapped: bool, env_id: str, n_envs: int) -> DummyVecEnv | AgentStateVecEnv:
    if n_envs == 1:
        if wrapped:
            return DummyVecEnv(
                [lambda: agentstate.AgentStateWrapper(gym.make(env_id), **WRAPPER_OPTIONS)]
            )
        return DummyVecEnv([lambda: gym.make(env_id)])
    venv = DummyVecEnv([lambda: gym.make(env_id)] * n_envs)
    return AgentStateVecEnv(venv, **WRAPPER_OPTIONS) if wrapped else venv


def steps_per_second(wrapped: bool, env_id: str, n_envs: int, steps: int) -> float:
    venv = make_venv(wrapped, env_id, n_envs)
    model = PPO("MlpPolicy", venv, n_steps=2048 // n_envs, batch_size=256, seed=0)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    elapsed = time.perf_counter() - start
    venv.close()
    return model.num_timesteps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = [(n_envs, wrapped) for n_envs in (args.n_envs, 1) for wrapped in (False, True)]
    runs: dict[str, list[float]] = {_label(*setting): [] for setting in settings}
    for _ in range(args.repeats):
        for n_envs, wrapped in settings:
            rate = steps_per_second(wrapped, args.env, n_envs, args.steps)
            runs[_label(n_envs, wrapped)].append(rate)
    median = {label: statistics.median(values) for label, values in runs.items()}
    ratio = {
        n_envs: median[_label(n_envs, True)] / median[_label(n_envs, False)]
        for n_envs in (args.n_envs, 1)
    }

    print(f"PPO on {args.env}, {args.steps} steps per run, median of {args.repeats} runs")
    print("| envs | plain PPO steps/s | with the wrapper steps/s | ratio |")
    print("|---|---|---|---|")
    for n_envs in (args.n_envs, 1):
        plain, wrapped = median[_label(n_envs, False)], median[_label(n_envs, True)]
        print(f"| {n_envs} | {plain:,.0f} | {wrapped:,.0f} | {ratio[n_envs]:.2f} |")
    if args.json:
        record = {
            "date": date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "args": vars(args),
            "steps_per_second": runs,
            "median": median,
            "ratio": {str(n_envs): value for n_envs, value in ratio.items()},
        }
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


def _label(n_envs: int, wrapped: bool) -> str:
    kind = ("AgentStateVecEnv" if n_envs > 1 else "AgentStateWrapper") if wrapped else "plain"
    return f"{kind}, {n_envs} env(s)"


if __name__ == "__main__":
    main()
