"""Stable-Baselines3: check_env, every algorithm family, VecEnvs, and save/load beside a model."""

import functools
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize
from test_wrapper import N_FEATURES, EndRewardEnv, SpaceEnv, assert_same_observations, wrap

from agentstate.sb3 import AgentStateVecEnv, load_agent_state, save_agent_state
from agentstate.wrappers import NONFINITE_INFO_KEY, NonFiniteInputError

CARTPOLE = functools.partial(gym.make, "CartPole-v1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small networks run fastest, and steadiest on a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ACTIONS = np.random.default_rng(2).integers(0, 2, size=(300, 2))


def vec_env(n_envs=2, make=CARTPOLE, vec_env_class=DummyVecEnv, **options):
    if vec_env_class is SubprocVecEnv:
        venv = SubprocVecEnv([make] * n_envs, start_method="forkserver")
    else:
        venv = DummyVecEnv([make] * n_envs)
    venv.seed(0)
    plain = {
        "learner": "columnar",
        "center_cumulants": False,
        "reconstruct_past": 0,
        "observe_past": 0,
    }
    return AgentStateVecEnv(venv, **{"seed": 0, "n_features": N_FEATURES, **plain, **options})


def run(venv, steps, seed=0):
    """Observations and infos over ``steps`` steps of the fixed ``ACTIONS``."""
    venv.seed(seed)
    observations, infos = [venv.reset()], []
    for actions in ACTIONS[:steps]:
        observation, _, _, info = venv.step(actions[: venv.num_envs])
        observations.append(observation)
        infos.append(info)
    return np.stack(observations), infos


def test_sb3_check_env_passes_on_a_wrapped_env():
    check_env(wrap(gym.make("CartPole-v1")), warn=True)
    check_env(wrap(SpaceEnv(gym.spaces.Dict({"a": gym.spaces.Discrete(3)}))), warn=True)


@pytest.mark.parametrize(
    ("algorithm", "env_id", "hyperparameters"),
    [
        (PPO, "CartPole-v1", {"n_steps": 64, "batch_size": 64, "n_epochs": 2}),
        (A2C, "CartPole-v1", {"n_steps": 8}),
        (DQN, "CartPole-v1", {"learning_starts": 100, "buffer_size": 1000, "train_freq": 4}),
        (SAC, "Pendulum-v1", {"learning_starts": 100, "buffer_size": 1000, "batch_size": 32}),
    ],
)
def test_every_algorithm_family_trains_on_a_wrapped_env(algorithm, env_id, hyperparameters):
    env = wrap(gym.make(env_id), cumulants="reward+observation")
    policy_kwargs = {"net_arch": [32, 32]}
    model = algorithm("MlpPolicy", env, seed=0, policy_kwargs=policy_kwargs, **hyperparameters)
    before = {key: param.clone() for key, param in env.predictor.learner.params.items()}
    model.learn(total_timesteps=300)
    observation, _ = env.reset(seed=1)
    action, _ = model.predict(observation, deterministic=True)
    assert env.action_space.contains(action)
    after = env.predictor.learner.params
    assert after.keys() == before.keys()
    assert all(not torch.equal(after[key], before[key]) for key in before)  # learned online


def test_ppo_trains_on_the_vec_env_wrapper():
    venv = vec_env(3)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0)
    model.learn(total_timesteps=96)
    assert venv.predictor.learner.streams == venv.num_envs == 3
    observations = model._last_obs  # what the policy saw last: [o_t, h_t] per env
    states = venv.agent_states
    np.testing.assert_array_equal(observations[:, -N_FEATURES:], states)
    for first, second in [(0, 1), (0, 2), (1, 2)]:  # envs seeded apart see different things
        assert not np.array_equal(observations[first, :4], observations[second, :4])
        assert not np.allclose(states[first], states[second])


@pytest.mark.parametrize(
    "vec_env_class", [DummyVecEnv, pytest.param(SubprocVecEnv, marks=pytest.mark.expensive)]
)
def test_terminal_observation_is_augmented_and_matches_the_single_env_wrapper(vec_env_class):
    """Frozen learner: the VecEnv's auto-reset path must give the single-env observations."""
    venv = vec_env(2, vec_env_class=vec_env_class, learn=False)
    observations, infos = run(venv, 120)
    venv.close()
    finals = [
        (t, info["terminal_observation"])
        for t, step in enumerate(infos)
        for info in step[:1]
        if "terminal_observation" in info
    ]
    assert finals
    single = wrap(gym.make("CartPole-v1"), learn=False)
    observation, _ = single.reset(seed=0)
    expected, expected_finals = [observation], []
    for t, actions in enumerate(ACTIONS[:120]):
        observation, _, terminated, truncated, _ = single.step(int(actions[0]))
        if terminated or truncated:
            expected_finals.append((t, observation))
            observation, _ = single.reset()
        expected.append(observation)
    assert_same_observations(observations[:, 0], np.stack(expected))
    assert [t for t, _ in finals] == [t for t, _ in expected_finals]
    for (_, final), (_, expected_final) in zip(finals, expected_finals, strict=True):
        assert final in venv.observation_space
        assert_same_observations(final, expected_final)


def test_reconstruction_targets_of_a_terminal_step_come_from_its_episode():
    """SB3's auto-reset: the terminal transition's targets are its episode's earlier inputs."""
    venv = vec_env(2, cumulants="reward", reconstruct_past=2)
    engine, cumulants = venv.core.engine, []
    step = engine.step

    def recording_step(observation, cumulant, **options):
        cumulants.append(cumulant.numpy().copy())
        return step(observation, cumulant, **options)

    engine.step = recording_step
    first = venv.reset()
    seen = [[first[env, :4]] for env in range(2)]  # each env's encoded CartPole observations
    checked_ends = 0
    for actions in ACTIONS[:200]:
        observation, _, done, infos = venv.step(actions)
        for env in range(2):
            if len(seen[env]) >= 3:  # o_t-1 and o_t-2 arrive with o_t+1 (o_t = seen[-1])
                expected = np.concatenate([seen[env][-2], seen[env][-3]])
                np.testing.assert_allclose(cumulants[-1][env, 1:], expected, rtol=1e-6)
                checked_ends += bool(done[env])
            seen[env] = [observation[env, :4]] if done[env] else [*seen[env], observation[env, :4]]
    assert checked_ends >= 3


def test_the_past_shown_with_a_terminal_observation_is_its_episodes():
    """SB3's auto-reset: ``terminal_observation`` shows its own episode's earlier inputs,
    the reset observation an empty past."""
    venv = vec_env(2, cumulants="reward", observe_past=2)
    first = venv.reset()
    seen = [[first[env, :4]] for env in range(2)]  # each env's encoded CartPole observations
    checked_ends = 0
    for actions in ACTIONS[:200]:
        observation, _, done, infos = venv.step(actions)
        for env in range(2):
            shown = infos[env]["terminal_observation"] if done[env] else observation[env]
            before = seen[env][::-1][:2] + [np.zeros(4)] * (2 - min(len(seen[env]), 2))
            np.testing.assert_allclose(shown[4:12], np.concatenate(before), rtol=1e-6)
            if done[env]:
                np.testing.assert_array_equal(observation[env, 4:12], np.zeros(8))
                checked_ends += 1
                seen[env] = [observation[env, :4]]
            else:
                seen[env].append(observation[env, :4])
    assert checked_ends >= 3


@pytest.mark.parametrize("truncate", [False, True])
def test_auto_reset_learns_terminal_rewards_and_bootstraps_truncations(truncate):
    """Reward 1 every step, episodes of 3 steps, gamma 0.5.

    Terminated, the value before the last step is 1 (+0 after). Truncated, with the same
    observation at every step, the learner bootstraps from the terminal observation, so
    every value tends to 1 / (1 - 0.5) = 2.
    """

    def make():
        if truncate:
            endless = EndRewardEnv(length=10, reward_every_step=True, observe_step=False)
            return gym.wrappers.TimeLimit(endless, 3)
        return EndRewardEnv(length=3, reward_every_step=True)

    venv = vec_env(
        2,
        make=make,
        gamma=0.5,
        cumulants="reward",
        include_prev_reward=False,
        # Tabular TD: plain SGD on heads that see the one-hot step; the learner is fixed.
        td_options={
            "optimizer": "sgd",
            "head_step_size": 0.1,
            "include_observation": True,
            "train_learner": False,
        },
    )
    venv.reset()
    before_end = []
    for _ in range(900):
        _, _, dones, _ = venv.step(np.zeros(2, dtype=np.int64))
        if venv.core.episode_steps[0] == 2:
            before_end.append(venv.predictions[0, 0])
    assert np.mean(before_end[-20:]) == pytest.approx(2.0 if truncate else 1.0, abs=0.1)


def test_nonfinite_observation_in_a_vec_env_names_the_env_or_is_skipped():
    venv = vec_env(2, make=functools.partial(SpaceEnv, nan_at=2))
    venv.reset()
    venv.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(NonFiniteInputError, match="observation\\[1\\].*stream 0"):
        venv.step(np.zeros(2, dtype=np.int64))
    venv = vec_env(2, make=functools.partial(SpaceEnv, nan_at=2), nonfinite="skip")
    venv.reset()
    venv.step(np.zeros(2, dtype=np.int64))
    observations, _, _, infos = venv.step(np.zeros(2, dtype=np.int64))
    names = ["observation[1]", "cumulant observation[1]"]  # input and (default) head
    assert [info[NONFINITE_INFO_KEY] for info in infos] == [names] * 2
    assert all(row in venv.observation_space for row in observations)


# ------------------------------------------------------------------ save and load
HISTORIES = [
    {},
    {"reconstruct_past": 3},
    {"observe_past": 2},
    {"reconstruct_past": 1, "observe_past": 3},
]


@pytest.mark.parametrize("history", HISTORIES)
def test_save_load_round_trip_gives_identical_observations(tmp_path, history):
    trained = vec_env(2, cumulants="reward+observation", **history)
    run(trained, 100)
    path = save_agent_state(trained, tmp_path / "ppo.agentstate.pt")
    assert os.listdir(tmp_path) == ["ppo.agentstate.pt"]  # no temporary file left behind
    reloaded = vec_env(2, cumulants="reward+observation", seed=9, **history)
    load_agent_state(reloaded, path)
    assert_same_observations(run(trained, 100)[0], run(reloaded, 100)[0])


def test_saving_replaces_the_old_file_whole(tmp_path):
    path = tmp_path / "state.pt"
    first, second = vec_env(2), vec_env(2, seed=1)
    save_agent_state(first, path)
    save_agent_state(second, path)
    loaded = vec_env(2, seed=2)
    load_agent_state(loaded, path)
    torch.testing.assert_close(
        loaded.predictor.learner.params["weight"], second.predictor.learner.params["weight"]
    )


@pytest.mark.parametrize(
    ("make_other", "reason"),
    [
        (lambda: vec_env(2, make=functools.partial(gym.make, "Acrobot-v1")), "observation_size"),
        (lambda: vec_env(2, learner="elstm"), "'learner': 'elstm'"),
        (lambda: vec_env(2, n_features=N_FEATURES + 1), "n_features"),
    ],
)
def test_a_saved_state_for_another_env_or_learner_is_refused(tmp_path, make_other, reason):
    path = save_agent_state(vec_env(2), tmp_path / "state.pt")
    with pytest.raises(ValueError, match=reason):
        load_agent_state(make_other(), path)


def test_the_helpers_find_the_wrapper_in_stacks_and_sub_envs(tmp_path):
    normalized = VecNormalize(vec_env(2))
    save_agent_state(normalized, tmp_path / "stack.pt")
    load_agent_state(VecNormalize(vec_env(2, seed=4)), tmp_path / "stack.pt")

    def sub_envs(seed):
        return DummyVecEnv([lambda: wrap(gym.make("CartPole-v1"), seed=seed)] * 2)

    save_agent_state(sub_envs(0), tmp_path / "sub_envs.pt")
    load_agent_state(sub_envs(3), tmp_path / "sub_envs.pt")
    with pytest.raises(ValueError, match="holds 2 agent state\\(s\\) but the env has 1"):
        load_agent_state(vec_env(2), tmp_path / "sub_envs.pt")
    with pytest.raises(TypeError, match="holds no agent-state wrapper"):
        save_agent_state(DummyVecEnv([CARTPOLE]), tmp_path / "none.pt")


def test_a_trained_agent_reloads_and_acts_identically(tmp_path):
    venv = vec_env(1, make=functools.partial(gym.make, "CartPole-v1"))
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    model.learn(total_timesteps=128)
    model.save(tmp_path / "ppo")
    save_agent_state(venv, tmp_path / "ppo.agentstate.pt")

    def evaluate(model, venv):
        venv.freeze()
        venv.seed(5)
        observation, actions = venv.reset(), []
        for _ in range(50):
            action, _ = model.predict(observation, deterministic=True)
            observation, _, _, _ = venv.step(action)
            actions.append((int(action[0]), observation.copy()))
        return actions

    expected = evaluate(model, venv)
    save_agent_state(venv, tmp_path / "ppo.agentstate.pt")  # the frozen evaluation state
    fresh = vec_env(1, seed=123)
    load_agent_state(fresh, tmp_path / "ppo.agentstate.pt")
    reloaded = PPO.load(tmp_path / "ppo", env=fresh)
    actual = evaluate(reloaded, fresh)
    assert [a for a, _ in actual] == [a for a, _ in expected]
    assert_same_observations(np.stack([o for _, o in actual]), np.stack([o for _, o in expected]))
