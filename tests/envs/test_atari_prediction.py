"""agentstate/AtariPrediction-v0: replay fidelity, observation layout, episodes, live policies."""

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

ale_py = pytest.importorskip("ale_py")
pytest.importorskip("cv2")

from atari_data import POLICIES_ENV_VAR as TESTS_POLICIES_ENV_VAR  # noqa: E402
from atari_data import expert_policies  # noqa: E402

from agentstate.envs.atari_prediction import AtariPrediction, read_action_file  # noqa: E402
from agentstate.envs.atari_preprocessing import POLICIES_ENV_VAR  # noqa: E402

PONG_RIGHT = b"c"  # index 2 of Pong's minimal action set: ale_py.Action.RIGHT
ONE_HOT = slice(256, 274)


def test_the_tests_and_the_env_read_the_same_variable():
    assert TESTS_POLICIES_ENV_VAR == POLICIES_ENV_VAR


def action_file(tmp_path, content: bytes, game: str = "Pong") -> Path:
    path = tmp_path / f"{game}NoFrameskip-v4.txt"
    path.write_bytes(content)
    return path


def play_episodes(env, n_episodes):
    """Raw rewards of each of the next n_episodes, and how each ended (terminated, truncated)."""
    episodes = []
    for _ in range(n_episodes):
        env.reset()
        rewards, ended = [], (False, False)
        while not any(ended):
            _, _, terminated, truncated, info = env.step(0)
            rewards.append(info["raw_reward"])
            ended = (terminated, truncated)
        episodes.append((np.array(rewards), ended))
    return episodes


@pytest.mark.expensive
def test_pong_expert_wins_its_first_two_episodes_21_0():
    env = AtariPrediction("Pong", policies_dir=expert_policies())
    for rewards, ended in play_episodes(env, 2):
        assert (int((rewards > 0).sum()), int((rewards < 0).sum())) == (21, 0)
        assert ended == (True, False), "a Pong episode ends with the game over"


@pytest.mark.expensive
def test_breakout_expert_scores_over_300_in_its_first_episode():
    env = AtariPrediction("Breakout", policies_dir=expert_policies())
    [(rewards, ended)] = play_episodes(env, 1)
    assert rewards.sum() > 300  # 362 with ale-py 0.12.1
    assert ended == (True, False)


def test_observation_is_frame_one_hot_of_the_full_action_and_clipped_reward(tmp_path):
    env = AtariPrediction("Pong", policy_file=action_file(tmp_path, b"R" + PONG_RIGHT * 50))
    assert env.observation_space.shape == (275,) and env.action_space == gym.spaces.Discrete(1)
    first, info = env.reset()
    assert first in env.observation_space
    assert not first[256:].any(), "a reset frame has no last action and no reward"
    assert 0.0 <= first[:256].min() and first[:256].max() <= 1.0 and first[:256].any()
    observation, reward, *_ = env.step(0)
    assert np.flatnonzero(observation[ONE_HOT]).tolist() == [ale_py.Action.RIGHT.value]
    assert observation[274] == reward == 0.0


@pytest.mark.parametrize(("resolution", "interpolation"), [(8, "linear"), (32, "area")])
def test_resolution_and_interpolation_are_parameters(tmp_path, resolution, interpolation):
    path = action_file(tmp_path, b"R" + PONG_RIGHT * 5)
    env = AtariPrediction(
        "Pong", policy_file=path, resolution=resolution, interpolation=interpolation
    )
    observation, _ = env.reset()
    assert observation.shape == (resolution**2 + 19,)
    assert observation in env.observation_space


def test_episodes_follow_the_resets_and_the_file_replays_from_its_start(tmp_path):
    env = AtariPrediction("Pong", policy_file=action_file(tmp_path, b"R" + b"a" * 5 + b"R" + b"bc"))
    first, info = env.reset()
    assert (info["file_position"], info["replay_pass"]) == (1, 1)
    ends = [env.step(0)[2:4] for _ in range(5)]
    assert ends == [(False, False)] * 4 + [(False, True)], "'R' without a game over: truncated"
    env.reset()
    assert [env.step(0)[2:4] for _ in range(2)] == [(False, False), (False, True)]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    again, info = env.reset()
    assert info["replay_pass"] == 2
    np.testing.assert_array_equal(again, first)


def test_reset_mid_episode_emulates_the_rest_and_stays_exact(tmp_path):
    content = b"R" + PONG_RIGHT * 40 + b"R" + b"d" * 30
    skipping = AtariPrediction("Pong", policy_file=action_file(tmp_path, content))
    through = AtariPrediction("Pong", policy_file=action_file(tmp_path, content))
    skipping.reset()
    skipping.step(0)
    through.reset()
    for _ in range(40):
        through.step(0)
    observation, info = skipping.reset()
    np.testing.assert_array_equal(observation, through.reset()[0])
    assert info["file_position"] == 42
    np.testing.assert_array_equal(skipping.step(0)[0], through.step(0)[0])


def test_reset_with_a_seed_restarts_the_file(tmp_path):
    env = AtariPrediction("Pong", policy_file=action_file(tmp_path, b"R" + b"b" * 30 + b"R" + b"a"))
    env.reset(seed=0)
    assert env.reset()[1]["file_position"] == 32
    _, info = env.reset(seed=1)
    assert (info["file_position"], info["replay_pass"]) == (1, 1)


@pytest.mark.expensive
def test_registered_id_passes_the_gymnasium_checker(tmp_path):
    path = action_file(tmp_path, b"R" + PONG_RIGHT * 300)
    env = gym.make("agentstate/AtariPrediction-v0", game="Pong", policy_file=path)
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.expensive
def test_importing_agentstate_registers_the_id_without_importing_ale_py():
    code = (
        "import sys, gymnasium, agentstate; "
        "assert 'agentstate/AtariPrediction-v0' in gymnasium.registry; "
        "assert 'ale_py' not in sys.modules and 'cv2' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_file_names_the_game_the_path_and_the_source(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as missing:
        AtariPrediction("Seaquest", policies_dir=tmp_path)
    message = str(missing.value)
    assert "'Seaquest'" in message
    assert str(tmp_path / "SeaquestNoFrameskip-v4.txt") in message
    assert "khurramjaved96/atari-prediction-benchmark" in message
    monkeypatch.delenv(POLICIES_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=POLICIES_ENV_VAR):
        AtariPrediction("Seaquest")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ab", "starts with 'R'"),
        (b"Ra!b", "byte 2 is b'!'"),
        (b"RaRRb", "followed by at least one action"),
        (b"RabR", "followed by at least one action"),
    ],
)
def test_a_malformed_action_file_is_refused(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_action_file(action_file(tmp_path, content))


def test_a_live_callable_policy_plays_and_its_action_is_observed():
    seen = []

    def fire(observation):
        seen.append(observation.shape)
        return 1  # Pong's minimal action 1: FIRE

    env = AtariPrediction("Pong", policy=fire)
    env.reset(seed=0)
    for _ in range(20):
        observation, reward, terminated, truncated, info = env.step(0)
    assert seen == [(210, 160, 3)] * 20, "the policy sees the ALE env's own observation"
    assert np.flatnonzero(observation[ONE_HOT]).tolist() == [ale_py.Action.FIRE.value]
    assert set(info) >= {"raw_reward", "lives", "game_over"}


def test_a_live_policy_acts_in_the_env_it_was_given():
    def make_env():
        gym.register_envs(ale_py)
        return gym.make("ALE/Breakout-v5", obs_type="ram", frameskip=4, repeat_action_probability=0)

    env = AtariPrediction("Breakout", policy=lambda ram: int(ram[0]) % 4, policy_env=make_env)
    observation, _ = env.reset(seed=0)
    observation, *_ = env.step(0)
    assert observation.shape == (275,) and observation[ONE_HOT].sum() == 1.0
    bad = AtariPrediction("Breakout", policy=lambda ram: 9, policy_env=make_env)
    bad.reset(seed=0)
    with pytest.raises(ValueError, match="chose action 9"):
        bad.step(0)
