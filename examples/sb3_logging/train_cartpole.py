"""PPO on CartPole-v1 with an agent state: the state learner's metrics beside PPO's.

The learner's metrics (``agent_state/...``: mean squared TD error and MSRE per cumulant
group, RMS of the agent state, learner steps/s) go through SB3's logger to stdout, a CSV
file and, when ``tensorboard`` is installed, TensorBoard. The trained agent is saved with
``save_model`` (model, agent state and ``VecNormalize`` statistics) and evaluated after
``load_model`` restores all three into a freshly built env.

Run (about a minute; ``--timesteps 512`` for a smoke test)::

    python examples/sb3_logging/train_cartpole.py --out runs/sb3_logging
    tensorboard --logdir runs/sb3_logging        # if installed
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

from agentstate.sb3 import AgentStateLoggerCallback, AgentStateVecEnv, load_model, save_model


def make_env(n_envs: int, seed: int) -> VecEnv:
    """CartPole envs, one agent-state learner for all, VecNormalize outside (recommended)."""
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")] * n_envs)
    venv.seed(seed)
    venv = AgentStateVecEnv(venv, cumulants="reward+observation", n_features=16, seed=seed)
    # Outside: the learner predicts the env's own rewards; the policy sees [obs, h] normalised.
    return VecNormalize(venv)


def evaluate(model: PPO, env: VecEnv, episodes: int, seed: int) -> float:
    """Mean return of the deterministic policy over ``episodes`` episodes."""
    env.seed(seed)
    observation, returns, running = env.reset(), [], np.zeros(env.num_envs)
    while len(returns) < episodes:
        action, _ = model.predict(observation, deterministic=True)
        observation, rewards, dones, _ = env.step(action)
        running += rewards
        returns.extend(running[dones])
        running[dones] = 0.0
    return float(np.mean(returns[:episodes]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    parser.add_argument("--out", type=Path, default=Path("runs/sb3_logging"))
    args = parser.parse_args()

    formats = ["stdout", "csv"]
    if importlib.util.find_spec("tensorboard") is not None:
        formats.append("tensorboard")
    model = PPO("MlpPolicy", make_env(args.envs, args.seed), n_steps=128, seed=args.seed)
    model.set_logger(configure(str(args.out), formats))
    model.learn(args.timesteps, callback=AgentStateLoggerCallback())
    files = save_model(model, args.out / "ppo")
    print(f"saved {files.model}, {files.agent_state}, {files.vec_normalize}")

    evaluation_env = make_env(1, args.seed + 1)
    reloaded = load_model(PPO, files.model, evaluation_env, evaluation=True)
    mean_return = evaluate(reloaded, evaluation_env, args.episodes, args.seed + 1)
    print(f"mean return over {args.episodes} episodes, reloaded: {mean_return:.1f}")
    print(f"metrics: {args.out / 'progress.csv'}")


if __name__ == "__main__":
    main()
