"""The memory-task example runs end to end, and its env is what the example says it is."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

EXAMPLE = Path(__file__).parents[1] / "examples" / "memory_task"
sys.path.insert(0, str(EXAMPLE))

import compare  # noqa: E402
from memory_env import CueMemoryEnv  # noqa: E402


def play(env, remember, episodes=50):
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        cue, done, total = int(np.argmax(observation[:2])), False, 0.0
        while not done:
            observation, reward, done, _, _ = env.step(cue if remember else 0)
            total += reward
        returns.append(total)
    return np.mean(returns)


def test_the_cue_memory_env_needs_memory():
    env = CueMemoryEnv(delay=3)
    check_env(env, skip_render_check=True)
    assert play(env, remember=True) == 1.0
    assert abs(play(env, remember=False)) < 0.5


@pytest.mark.expensive
def test_the_comparison_script_runs_and_writes_its_table(tmp_path):
    argv = ["--ppo-steps", "256", "--dqn-steps", "300", "--seeds", "1", "--eval-episodes", "4"]
    threads = torch.get_num_threads()  # the script pins one thread
    try:
        compare.main([*argv, "--delay", "2", "--out", str(tmp_path)], report=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(compare.methods(compare.Config()))
    assert (tmp_path / "results.json").exists()
