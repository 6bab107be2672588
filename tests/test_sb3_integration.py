"""SB3 integration: the learner's metrics in SB3's logger, VecNormalize, save_model/load_model."""

import csv
import doctest
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
from test_wrapper import N_FEATURES, assert_same_observations, record_engine_steps, wrap

from agentstate.metrics import EpisodeReturnScorer
from agentstate.sb3 import (
    AgentStateLoggerCallback,
    AgentStateVecEnv,
    ModelFiles,
    load_model,
    save_model,
)
from agentstate.wrappers import statistics

CARTPOLE = functools.partial(gym.make, "CartPole-v1")
PPO_OPTIONS = {"n_steps": 64, "batch_size": 64, "n_epochs": 1, "seed": 0}
EXAMPLE = Path(__file__).parents[1] / "examples" / "sb3_logging" / "train_cartpole.py"


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PLAIN = {"learner": "columnar", "center_cumulants": False, "reconstruct_past": 0, "observe_past": 0}
"""The simplest setting (see tests/test_wrapper.py): observations ``[o_t, h_t]``."""


def agent_state_env(n_envs=2, seed=0, venv=None, **options):
    if venv is None:
        venv = DummyVecEnv([CARTPOLE] * n_envs)
        venv.seed(0)
    return AgentStateVecEnv(venv, **{"seed": seed, "n_features": N_FEATURES, **PLAIN, **options})


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# ------------------------------------------------------------------ logging
def test_logger_callback_writes_the_learners_metrics_through_sb3s_logger(tmp_path):
    venv = agent_state_env(cumulants="reward+observation")
    model = PPO("MlpPolicy", venv, **PPO_OPTIONS)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(2 * 64 * venv.num_envs, callback=AgentStateLoggerCallback())

    rows = read_csv(tmp_path / "progress.csv")
    assert len(rows) == 2  # one dump per PPO iteration
    for row in rows:
        for group in ("reward", "observation"):
            for metric in ("mean_squared_td_error", "msre"):
                assert math.isfinite(float(row[f"agent_state/{metric}/{group}"]))
        assert 0 < float(row["agent_state/state_rms"]) <= 1  # columnar: h in [-1, 1]
        assert float(row["agent_state/steps_per_second"]) > 0
        assert float(row["time/total_timesteps"]) > 0  # beside PPO's own


def test_logged_state_rms_and_msre_match_an_independent_computation(tmp_path):
    """One PPO rollout: the agent-state columns of the observations, and the scorer."""
    gamma = 0.9
    venv = agent_state_env(gamma=gamma)
    seen, scorer, squared_errors = [], EpisodeReturnScorer(venv.num_envs, ["learner"]), []
    step_wait = venv.step_wait

    def recording_step_wait():
        observations, rewards, dones, infos = step_wait()
        seen.append(observations[:, -N_FEATURES:].astype(np.float64))
        discounts = np.where(dones, 0.0, gamma)
        finished = scorer.update({"learner": venv.predictions[:, 0]}, rewards, discounts)
        squared_errors.extend(episode.squared_errors["learner"] for episode in finished)
        return observations, rewards, dones, infos

    venv.step_wait = recording_step_wait
    model = PPO("MlpPolicy", venv, **PPO_OPTIONS)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(64 * venv.num_envs, callback=AgentStateLoggerCallback())

    (row,) = read_csv(tmp_path / "progress.csv")
    assert len(seen) == 64
    expected_rms = np.sqrt(np.mean(np.square(np.stack(seen))))
    assert float(row["agent_state/state_rms"]) == pytest.approx(expected_rms, rel=1e-6)
    assert squared_errors  # CartPole episodes end by termination within 64 steps
    expected_msre = np.concatenate(squared_errors).mean()
    assert float(row["agent_state/msre/reward"]) == pytest.approx(expected_msre, rel=1e-9)


def test_td_error_statistics_are_the_engines_td_errors():
    """delta = c_t + gamma_t y_t - y_t-1 from what the engine was given, auto-resets included."""
    venv = agent_state_env(cumulants="reward+observation")
    venv.reset()
    venv.enable_statistics()
    calls, predictions, episodes_ended = record_engine_steps(venv), [venv.predictions], False
    for actions in np.random.default_rng(0).integers(0, 2, size=(150, 2)):
        _, _, dones, _ = venv.step(actions)
        predictions.append(venv.predictions)
        episodes_ended |= dones.any()
    squared, counted = 0.0, 0
    for (_, cumulant, discount, started), previous, current in zip(
        calls, predictions[:-1], predictions[1:], strict=True
    ):
        delta = cumulant.numpy() + discount.numpy()[:, None] * current - previous
        squared += np.square(delta[~started.numpy()]).sum(axis=0)
        counted += int((~started).sum())
    totals = venv.statistics_totals()
    assert totals.td_steps == counted == 2 * 150
    # The engine holds gamma in the learner's dtype (float32), the statistics exactly.
    np.testing.assert_allclose(totals.td_squared_error, squared, rtol=1e-6)
    assert episodes_ended  # the auto-reset steps are among those checked


def test_msre_scores_terminated_episodes_only_and_bounds_its_buffer(monkeypatch):
    monkeypatch.setattr(statistics, "MAX_PENDING_STEPS", 4)
    recorder = statistics.LearnerStatistics(streams=2, n_cumulants=1)

    def record(discount, terminated, episode_start=(False, False)):
        recorder.record(
            cumulant=np.ones((2, 1)),
            discount=np.array(discount),
            predictions=np.zeros((2, 1)),
            state=np.zeros((2, 1)),
            episode_start=np.array(episode_start),
            skipped=np.zeros(2, dtype=bool),
            terminated=np.array(terminated),
            seconds=0.0,
        )

    record([0.5, 0.5], [False, False], episode_start=(True, True))
    record([0.5, 0.5], [False, False])
    record([0.0, 0.0], [True, False])  # stream 0 terminates, stream 1 is truncated
    totals = recorder.totals()
    assert totals.scored_steps == 2  # stream 0's two steps; the truncated episode is unknown
    # G = (1 + 0.5 * 1, 1): squared errors of predicting 0.
    np.testing.assert_allclose(totals.return_squared_error, [1.5**2 + 1.0])
    for _ in range(20):  # rows older than MAX_PENDING_STEPS in a running episode go
        record([0.5, 0.5], [False, False])
    assert recorder.totals().scored_steps == 2
    assert len(recorder._rows) == statistics.MAX_PENDING_STEPS
    record([0.0, 0.5], [True, False])  # the long episode is scored over its last steps
    assert recorder.totals().scored_steps == 2 + statistics.MAX_PENDING_STEPS


def test_logger_callback_reads_agent_state_sub_envs(tmp_path):
    model = PPO("MlpPolicy", wrap(CARTPOLE()), **PPO_OPTIONS)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(64, callback=AgentStateLoggerCallback())
    (row,) = read_csv(tmp_path / "progress.csv")
    assert math.isfinite(float(row["agent_state/mean_squared_td_error/reward"]))


@pytest.mark.expensive
def test_the_logging_example_runs(tmp_path):
    subprocess.run(
        [sys.executable, str(EXAMPLE), "--timesteps", "256", "--envs", "2", "--episodes", "1"]
        + ["--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    (row,) = read_csv(tmp_path / "progress.csv")
    assert math.isfinite(float(row["agent_state/mean_squared_td_error/observation"]))
    assert (tmp_path / "ppo.vecnormalize.pkl").exists()


# ------------------------------------------------------------------ VecNormalize and saving
def stack(order, n_envs=2, seed=0):
    """An agent-state VecEnv with VecNormalize outside, inside or absent."""
    if order == "inside":
        venv = DummyVecEnv([CARTPOLE] * n_envs)
        venv.seed(0)
        return agent_state_env(seed=seed, venv=VecNormalize(venv))
    venv = agent_state_env(n_envs, seed=seed)
    return VecNormalize(venv) if order == "outside" else venv


def evaluate(model, env, steps=60):
    """Actions and observations of the deterministic policy from a seeded reset."""
    env.seed(5)
    observation, actions, observations = env.reset(), [], []
    for _ in range(steps):
        action, _ = model.predict(observation, deterministic=True)
        observation, _, _, _ = env.step(action)
        actions.append(action.copy())
        observations.append(observation.copy())
    return np.stack(actions), np.stack(observations)


@pytest.mark.parametrize("order", ["outside", "inside", None])
def test_save_model_and_load_model_restore_identical_observations_and_actions(tmp_path, order):
    env = stack(order)
    model = PPO("MlpPolicy", env, **PPO_OPTIONS).learn(3 * 64 * env.num_envs)
    files = save_model(model, tmp_path / "ppo")
    assert files == ModelFiles.at(tmp_path / "ppo.zip")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ppo.zip", "ppo.agentstate.pt"] + (["ppo.vecnormalize.pkl"] if order else [])
    )
    # What load_model(evaluation=True) does, applied to the trained env itself.
    env.freeze()
    normalizer = env if order == "outside" else getattr(env, "venv", None)
    if order:
        normalizer.training = normalizer.norm_reward = False
    expected = evaluate(model, env)

    fresh = stack(order, seed=123)  # another learner, fresh VecNormalize statistics
    reloaded = load_model(PPO, tmp_path / "ppo", fresh, evaluation=True)
    assert not fresh.learning
    actions, observations = evaluate(reloaded, fresh)
    np.testing.assert_array_equal(actions, expected[0])
    assert_same_observations(observations, expected[1])
    assert len(np.unique(actions)) == 2  # the check would be weak on a constant policy


@pytest.mark.parametrize("order", ["outside", "inside"])
def test_vec_normalize_on_either_side_keeps_shapes_bounds_and_terminal_observations(order):
    env = stack(order)
    PPO("MlpPolicy", env, **PPO_OPTIONS).learn(64 * env.num_envs)
    size = env.observation_space.shape[0]
    assert size == 4 + N_FEATURES
    ended = []
    for actions in np.random.default_rng(1).integers(0, 2, size=(100, 2)):
        observations, _, dones, infos = env.step(actions)
        assert observations.dtype == np.float32
        ended += [infos[i]["terminal_observation"] for i in np.flatnonzero(dones)]
        if order == "inside":
            assert all(row in env.observation_space for row in observations)
    assert ended and all(final.shape == (size,) for final in ended)
    if order == "outside":  # the policy sees the agent state normalised too
        assert env.obs_rms.mean.shape == (size,)
    else:  # the learner sees observations clipped to VecNormalize's range
        assert env.observation_space.high[:4].tolist() == [10.0] * 4


def test_load_model_refuses_an_env_that_differs_in_vec_normalize(tmp_path):
    model = PPO("MlpPolicy", stack("outside"), **PPO_OPTIONS)
    save_model(model, tmp_path / "ppo")
    with pytest.raises(ValueError, match="saved with VecNormalize"):
        load_model(PPO, tmp_path / "ppo", stack(None))
    model = PPO("MlpPolicy", stack(None), **PPO_OPTIONS)
    save_model(model, tmp_path / "ppo")  # the earlier statistics file is removed
    assert not (tmp_path / "ppo.vecnormalize.pkl").exists()
    with pytest.raises(ValueError, match="saved without VecNormalize"):
        load_model(PPO, tmp_path / "ppo", stack("inside"))


def test_docstring_examples_run():
    assert doctest.testmod(statistics).failed == 0
