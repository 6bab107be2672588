"""AgentStateWrapper and AgentStateVectorWrapper, as the wrapper's spec (issue 4) states them."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import agentstate
from agentstate import AgentStateVectorWrapper, AgentStateWrapper
from agentstate import observation as observation_module
from agentstate.wrappers import (
    NONFINITE_INFO_KEY,
    LearnerDivergedError,
    NonFiniteInputError,
)

N_FEATURES = 6


class SpaceEnv(gym.Env):
    """Observations drawn from any space; episodes of ``length`` steps end by termination."""

    def __init__(self, observation_space=None, length=5, nan_at=None):
        self.observation_space = observation_space or spaces.Box(-1, 1, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.length, self.nan_at, self.t = length, nan_at, 0

    def _observation(self):
        observation = self.observation_space.sample()
        if self.nan_at is not None and self.t == self.nan_at:
            observation = np.array(observation, dtype=np.float32)
            observation[1] = np.nan
        return observation

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        return self._observation(), {}

    def step(self, action):
        self.t += 1
        return self._observation(), float(action), self.t >= self.length, False, {}


class EndRewardEnv(gym.Env):
    """Reward 1 only on the last of ``length`` steps; the observation is the step one-hot.

    ``reward_every_step``: reward 1 on every step; ``observe_step=False``: observation 0.
    """

    def __init__(self, length=3, reward_every_step=False, observe_step=True):
        self.observation_space = spaces.Discrete(length + 1)
        self.action_space = spaces.Discrete(1)
        self.length, self.reward_every_step, self.t = length, reward_every_step, 0
        self.observe_step = observe_step

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return 0, {}

    def step(self, action):
        self.t += 1
        last = self.t == self.length
        reward = 1.0 if (last or self.reward_every_step) else 0.0
        return self.t if self.observe_step else 0, reward, last, False, {}


DICT_SPACE = spaces.Dict(
    {
        "position": spaces.Box(-2, 2, (2,), np.float32),
        "door": spaces.Discrete(3),
        "keys": spaces.MultiDiscrete([2, 3]),
    }
)
SPACES = {
    "box": spaces.Box(-1, 1, (2, 2), np.float32),
    "discrete": spaces.Discrete(4, start=1),
    "multi_discrete": spaces.MultiDiscrete([3, 2]),
    "multi_binary": spaces.MultiBinary(3),
    "dict": DICT_SPACE,
    "tuple": spaces.Tuple((spaces.Discrete(2), spaces.Box(0, 1, (2,), np.float32))),
}


PLAIN = {
    "learner": "columnar",
    "center_cumulants": False,
    "reconstruct_past": 0,
    "observe_past": 0,
}
"""The wrapper's mechanics are tested on the simplest setting: a columnar learner whose
heads are the cumulants alone, uncentred, and an observation ``[o_t, h_t]``. The defaults
have tests of their own."""


def wrap(env, **options):
    options = {"seed": 0, "n_features": N_FEATURES, **PLAIN, **options}
    return AgentStateWrapper(env, **options)


ACTIONS = np.random.default_rng(1).integers(0, 2, size=500)


def rollout(env, steps, seed=0, *, same_step=False):
    """Observations a policy sees over ``steps`` actions of ``ACTIONS``, resetting at ends.

    By default an episode's end is followed by the reset observation in place of the next
    action's step, as a NEXT_STEP vector env does. With ``same_step`` the reset observation
    replaces the terminal one, which goes to ``finals``, as in SB3 and SAME_STEP envs.

    Returns:
        ``(observations [n, D], finals)``.
    """
    observation, _ = env.reset(seed=seed)
    observations, finals, skip = [observation], [], False
    for action in ACTIONS[:steps]:
        if skip:
            observation, _ = env.reset()
            observations.append(observation)
            skip = False
            continue
        observation, _, terminated, truncated, _ = env.step(int(action))
        if (terminated or truncated) and same_step:
            finals.append(observation)
            observation, _ = env.reset()
        observations.append(observation)
        skip = (terminated or truncated) and not same_step
    return np.stack(observations), finals


def assert_same_observations(first, second):
    assert first.shape == second.shape
    np.testing.assert_array_equal(first, second)


def assert_same_state(first, second):
    """Nested state dicts equal: tensors bit for bit, everything else by ``==``."""
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_state(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for item, other in zip(first, second, strict=True):
            assert_same_state(item, other)
    elif isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    else:
        assert first == second


def record_engine_steps(wrapper):
    """Record what each engine step sees: (observation, cumulant, discount, episode_start).

    ``discount`` and ``episode_start`` are ``[B]`` (None means ``gamma`` and no start);
    an episode start is a ``reset_streams`` call before the step, or its ``episode_start``.
    """
    engine, calls = wrapper.predictor, []
    step, reset_streams = engine.step, engine.reset_streams
    started = torch.zeros(engine.learner.streams, dtype=torch.bool)

    def recording_reset_streams(mask):
        started.logical_or_(mask)
        reset_streams(mask)

    def recording_step(observation, cumulant, *, discount=None, episode_start=None):
        if episode_start is not None:
            started.logical_or_(episode_start)
        if discount is None:
            discount = torch.full((engine.learner.streams,), engine.config.gamma)
        calls.append((observation.clone(), cumulant.clone(), discount.clone(), started.clone()))
        started.zero_()
        return step(observation, cumulant, discount=discount, episode_start=episode_start)

    engine.step, engine.reset_streams = recording_step, recording_reset_streams
    return calls


# ------------------------------------------------------------------ spaces and encoding
@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_observation_is_float32_and_lies_in_the_new_box(name):
    env = wrap(SpaceEnv(SPACES[name]), cumulants="reward+observation")
    size = spaces.flatdim(SPACES[name])
    assert env.observation_space.dtype == np.float32
    assert env.observation_space.shape == (size + N_FEATURES,)
    for observation in rollout(env, 12)[0]:
        assert observation.dtype == np.float32
        assert observation in env.observation_space


@pytest.mark.parametrize("name", sorted(SPACES))
def test_encoding_matches_gymnasium_flatten(name):
    space = SPACES[name]
    space.seed(0)
    encoder = observation_module.make_space_encoder(space, "observation")
    for _ in range(5):
        value = space.sample()
        expected = spaces.flatten(space, value).astype(np.float64)
        np.testing.assert_array_equal(encoder.encode_one(value)[0], expected)
    np.testing.assert_array_equal(encoder.low, spaces.flatten_space(space).low)
    np.testing.assert_array_equal(encoder.high, spaces.flatten_space(space).high)


def test_state_bounds_are_honest_and_observation_bounds_kept():
    env = wrap(gym.make("CartPole-v1"))
    inner = env.env.observation_space
    np.testing.assert_array_equal(env.observation_space.low[:4], inner.low)
    np.testing.assert_array_equal(env.observation_space.high[:4], inner.high)
    assert (env.observation_space.low[4:] == -1).all() and (
        env.observation_space.high[4:] == 1
    ).all()


@pytest.mark.parametrize(("activation", "bound"), [("tanh", 1.0), ("relu", np.inf)])
def test_a_learners_state_bound_can_depend_on_its_settings(activation, bound):
    env = wrap(gym.make("CartPole-v1"), learner="rtu", activation=activation)
    assert env.core.learner.state_bound == (None if bound == np.inf else bound)
    assert (env.observation_space.high[4:] == bound).all()
    assert (env.observation_space.low[4:] == -bound).all()
    for observation in rollout(env, 30)[0]:
        assert observation in env.observation_space


def test_state_alone_when_the_observation_is_not_included():
    env = wrap(gym.make("CartPole-v1"), include_observation=False)
    observation, _ = env.reset(seed=0)
    assert env.observation_space.shape == observation.shape == (N_FEATURES,)
    np.testing.assert_array_equal(observation, env.agent_states[0])


def test_image_observations_are_refused_with_advice_unless_an_encoder_is_given():
    image = spaces.Box(0, 255, (16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="image observations.*encoder=.*ResizeObservation"):
        wrap(SpaceEnv(image))
    env = wrap(SpaceEnv(image), encoder=lambda frame: frame.mean(axis=(0, 1)) / 255.0)
    assert env.observation_space.shape == (3 + N_FEATURES,)
    for observation in rollout(env, 6)[0]:
        assert observation in env.observation_space


def test_unsupported_spaces_and_options_fail_clearly():
    with pytest.raises(TypeError, match="not supported.*encoder"):
        wrap(SpaceEnv(spaces.Text(5)))
    with pytest.raises(ValueError, match="cumulants must be one of"):
        wrap(gym.make("CartPole-v1"), cumulants="value")
    with pytest.raises(ValueError, match="nonfinite must be"):
        wrap(gym.make("CartPole-v1"), nonfinite="ignore")
    with pytest.raises(KeyError, match="known learners: .*columnar"):
        wrap(gym.make("CartPole-v1"), learner="lstm9000")
    with pytest.raises(TypeError, match="unexpected keyword.*n_colums"):
        wrap(gym.make("CartPole-v1"), n_colums=3)


@pytest.mark.parametrize("learner", ["columnar", "elstm", "ccn"])
def test_gymnasium_check_env_passes_on_a_frozen_wrapper(learner):
    """Frozen, a seeded reset gives exactly the same observation; learning, it cannot.

    check_env resets twice with one seed and expects equal observations. A learning wrapper
    changes its learner at every step, so its observations differ (by design).
    """
    options = {"columns_per_stage": 3} if learner == "ccn" else {}
    for env in (SpaceEnv(DICT_SPACE), gym.make("CartPole-v1")):
        env = wrap(env, learner=learner, learn=False, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env, skip_render_check=True)
        assert "although similar" not in " ".join(str(warning.message) for warning in caught)


# ------------------------------------------------------------------ learner input, cumulants
def test_learner_input_is_observation_previous_action_and_previous_reward():
    env = wrap(SpaceEnv(spaces.Box(-1, 1, (3,), np.float32), length=2))
    calls = record_engine_steps(env)
    observation, _ = env.reset(seed=0)
    env.step(1)
    assert env.predictor.learner.input_size == 3 + 2 + 1
    first, second = calls[0][0][0], calls[1][0][0]
    np.testing.assert_array_equal(first[3:].numpy(), [0, 0, 0])  # no action, no reward yet
    np.testing.assert_array_equal(second[3:].numpy(), [0, 1, 1])  # one-hot(1), reward 1
    np.testing.assert_allclose(first[:3].numpy(), observation[:3])
    bare = wrap(SpaceEnv(), include_prev_action=False, include_prev_reward=False)
    assert bare.predictor.learner.input_size == 3


def test_cumulant_heads_reward_observation_both_or_callable():
    def reward_and_step(observation, reward, info):
        return [reward, info.get("step", 0)]

    names = {
        kind: wrap(SpaceEnv(DICT_SPACE), cumulants=kind).cumulant_names
        for kind in ("reward", "observation", "reward+observation", reward_and_step)
    }
    observation_names = observation_module.make_space_encoder(DICT_SPACE, "observation")
    assert names["reward"] == ["reward"]
    assert names["observation"] == observation_names.component_names
    assert len(names["observation"]) == spaces.flatdim(DICT_SPACE)
    assert names["reward+observation"] == ["reward", *names["observation"]]
    assert names[reward_and_step] == ["cumulant[0]", "cumulant[1]"]


def test_observation_cumulants_are_the_encoded_observation():
    env = wrap(SpaceEnv(spaces.Discrete(3)), cumulants="reward+observation")
    calls = record_engine_steps(env)
    env.reset(seed=0)
    observation, reward, *_ = env.step(1)
    np.testing.assert_array_equal(calls[1][1][0].numpy(), [reward, *observation[:3]])


def test_a_cumulant_callable_must_keep_its_size():
    sizes = iter([2, 2, 3])
    env = wrap(SpaceEnv(), cumulants=lambda observation, reward, info: np.zeros(next(sizes)))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="returned \\[3\\] values.*must keep that size"):
        env.step(0)


# ------------------------------------------------------------------ episodes
def test_termination_stops_bootstrapping_truncation_bootstraps_and_reset_restarts():
    terminating = wrap(EndRewardEnv(length=2), gamma=0.5)
    truncating = wrap(gym.wrappers.TimeLimit(EndRewardEnv(length=5), 2), gamma=0.5)
    for env, last_discount in ((terminating, 0.0), (truncating, 0.5)):
        calls = record_engine_steps(env)
        env.reset(seed=0)
        env.step(0)
        env.step(0)
        env.reset()
        discounts = [float(call[2][0]) for call in calls]
        starts = [bool(call[3][0]) for call in calls]
        assert discounts[1:3] == [0.5, last_discount]
        assert starts == [True, False, False, True]


def test_one_discount_per_head_equal_to_one_discount_changes_nothing():
    def make(gamma):
        env = wrap(gym.wrappers.TimeLimit(gym.make("CartPole-v1").unwrapped, 15), gamma=gamma)
        env.core.enable_statistics()
        return env

    heads = 1 + 4  # the reward and the four CartPole observations
    one, per_head = make(0.9), make((0.9,) * heads)
    assert_same_observations(rollout(one, 120)[0], rollout(per_head, 120)[0])
    totals, totals_per_head = one.core.statistics.totals(), per_head.core.statistics.totals()
    assert totals.scored_steps > 0
    np.testing.assert_array_equal(totals.td_squared_error, totals_per_head.td_squared_error)
    np.testing.assert_allclose(
        totals.return_squared_error, totals_per_head.return_squared_error, rtol=1e-12
    )


@pytest.mark.parametrize(("gamma", "at_first_step"), [((0.0,), 0.0), (0.9, 0.9)])
def test_a_head_with_discount_zero_predicts_the_next_cumulant_alone(gamma, at_first_step):
    """Reward 1 on the last of 3 steps: after step 1 the next reward is 0, the return 0.9."""
    env = wrap(
        EndRewardEnv(length=3), gamma=gamma, cumulants="reward", td_options={"head_step_size": 0.05}
    )
    env.reset(seed=0)
    predictions = {}
    for _ in range(900):
        *_, terminated, _, _ = env.step(0)
        predictions[int(env.core.episode_steps[0])] = float(env.predictions[0, 0])
        if terminated:
            env.reset()
    assert predictions[1] == pytest.approx(at_first_step, abs=0.1)
    assert predictions[2] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("gamma", [0.9, 0.0, (0.0,)])
def test_every_step_of_a_terminated_episode_is_scored_whatever_the_discount(gamma):
    env = wrap(EndRewardEnv(length=3), gamma=gamma, cumulants="reward")
    env.core.enable_statistics()
    env.reset(seed=0)
    for _ in range(5):  # episodes of 3 steps: predictions at o_0, o_1, o_2 have known returns
        for _ in range(3):
            env.step(0)
        env.reset()
    assert env.core.statistics.totals().scored_steps == 3 * 5


def test_a_discount_per_head_must_give_one_per_head():
    with pytest.raises(
        ValueError, match=r"gamma gives 2 discounts, but there are 5 heads \(reward"
    ):
        wrap(gym.make("CartPole-v1"), gamma=(0.9, 0.0))
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        wrap(gym.make("CartPole-v1"), gamma=(0.9, 0.0, 1.5, 0.0, 0.0))


class RandomSymbols(gym.Env):
    """One of ``n`` symbols drawn uniformly each step, reward 0, truncated after 50 steps."""

    action_space = spaces.Discrete(1)

    def __init__(self, n):
        self.observation_space = spaces.Discrete(n)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return int(self.np_random.integers(self.observation_space.n)), {}

    def step(self, action):
        self.t += 1
        symbol = int(self.np_random.integers(self.observation_space.n))
        return symbol, 0.0, False, self.t >= 50, {}


def test_reconstruction_heads_get_the_observations_before_the_current_one_with_discount_0():
    env = wrap(EndRewardEnv(length=3), cumulants="reward", gamma=0.5, reconstruct_past=2)
    assert env.cumulant_names == ["reward"] + [
        f"observation=={k} {back} back" for back in (1, 2) for k in range(4)
    ]
    assert env.cumulant_groups["reconstruction"] == slice(1, 9)
    calls = record_engine_steps(env)
    env.reset(seed=0)
    for _ in range(3):
        env.step(0)  # observations 1, 2, 3; the episode terminates at 3
    env.reset()
    env.step(0)
    one_hot = np.eye(4)
    zero = np.zeros(4)
    expected_back = [  # (1 back, 2 back) of the observation before each engine step's
        (zero, zero),  # reset: o_0 arrives (the cumulant of a reset step is zeroed)
        (zero, zero),  # o_1 arrives: the heads at o_0 had nothing before it
        (one_hot[0], zero),  # o_2: h_1 reconstructs o_0
        (one_hot[1], one_hot[0]),  # o_3 (terminal)
        (zero, zero),  # reset
        (zero, zero),  # o_1 of the new episode: the old one is forgotten
    ]
    for (_, cumulant, _, _), (one_back, two_back) in zip(calls, expected_back, strict=True):
        np.testing.assert_array_equal(cumulant[0, 1:].numpy(), np.concatenate([one_back, two_back]))
    discounts = [call[2][0].tolist() for call in calls]
    assert discounts[2] == [0.5] + [0.0] * 8
    assert discounts[3] == [0.0] * 9  # terminated


def test_an_elstm_state_learns_to_reconstruct_the_previous_coin_flip():
    env = wrap(
        RandomSymbols(2),
        learner="elstm",
        cumulants="reward",
        reconstruct_past=1,
        step_size=0.01,
        n_features=8,
    )
    observation, _ = env.reset(seed=0)
    errors = []
    for step in range(6000):
        previous = observation[:2]
        observation, _, _, truncated, _ = env.step(0)
        if step > 5000 and env.core.episode_steps[0] >= 1:
            errors.append(np.mean((env.predictions[0, 1:3] - previous) ** 2))
        if truncated:
            observation, _ = env.reset()
    assert np.mean(errors) < 0.02  # chance: 0.25


def test_the_reconstruction_history_is_saved_with_the_state():
    first, second = (
        wrap(RandomSymbols(2), learner="elstm", cumulants="reward", reconstruct_past=3, seed=seed)
        for seed in (0, 1)
    )
    for env in (first, second):
        env.reset(seed=4)
        for _ in range(10):
            env.step(0)
    second.load_state_dict(first.state_dict())
    for _ in range(10):
        assert_same_observations(first.step(0)[0], second.step(0)[0])


def test_reconstruct_past_must_be_a_count_of_steps():
    with pytest.raises(ValueError, match="reconstruct_past must be an int >= 0"):
        wrap(gym.make("CartPole-v1"), reconstruct_past=-1)


def test_observe_past_shows_the_observations_before_the_current_one():
    env = wrap(RandomSymbols(3), cumulants="reward", observe_past=2)
    one_hot = np.eye(3)
    assert env.observation_space.shape == (3 + 2 * 3 + N_FEATURES,)
    observation, _ = env.reset(seed=0)
    history, episodes = [], 1  # the encoded observations of this episode so far
    for _ in range(120):
        current = observation[:3]
        assert observation in env.observation_space
        before = history[::-1][:2] + [np.zeros(3)] * (2 - min(len(history), 2))
        np.testing.assert_array_equal(observation[3:9], np.concatenate(before))
        np.testing.assert_array_equal(observation[9:], env.core.state[0])
        assert current.tolist() in one_hot.tolist()
        history.append(current)
        observation, _, _, truncated, _ = env.step(0)
        if truncated:  # episodes of 50 steps: the next one starts with an empty past
            observation, _ = env.reset()
            history, episodes = [], episodes + 1
    assert episodes == 3


def test_observe_past_leaves_learning_as_it_was():
    shown, plain = wrap(RandomSymbols(2), observe_past=3), wrap(RandomSymbols(2))
    for env in (shown, plain):
        env.reset(seed=3)
    for _ in range(60):
        with_past, without = shown.step(0)[0], plain.step(0)[0]
        np.testing.assert_array_equal(with_past[:2], without[:2])
        np.testing.assert_array_equal(with_past[8:], without[2:])  # the same agent state


def test_a_state_saved_without_the_past_shown_is_refused_with_it():
    saved = wrap(RandomSymbols(2)).state_dict()
    with pytest.raises(ValueError, match="observe_past"):
        wrap(RandomSymbols(2), observe_past=2).load_state_dict(saved)


def test_observe_past_must_be_a_count_of_steps():
    with pytest.raises(ValueError, match="observe_past must be an int >= 0"):
        wrap(gym.make("CartPole-v1"), observe_past=1.5)


@pytest.mark.parametrize("center_cumulants", [False, True])
def test_centred_cumulants_keep_the_state_off_saturation(center_cumulants):
    """Unpredictable cards: the returns' mean (0.25 / (1 - gamma) each) is all there is to
    learn; uncentred, the learner supplies it by saturating every feature, for good."""
    env = wrap(RandomSymbols(4), center_cumulants=center_cumulants, n_features=7)
    env.reset(seed=0)
    states = []
    for _ in range(3000):
        observation, _, _, truncated, _ = env.step(0)
        states.append(observation[4:])
        if truncated:
            env.reset()
    saturation = np.abs(np.array(states[-500:])).mean()
    if center_cumulants:
        assert saturation < 0.5
    else:
        assert saturation > 0.99


def test_centred_cumulants_are_the_raw_ones_less_their_running_mean():
    env = wrap(RandomSymbols(4), cumulants="observation", center_cumulants=True, reconstruct_past=1)
    calls = record_engine_steps(env)
    first, _ = env.reset(seed=0)
    seen, means = [first[:4]], []  # seen[s] = o_s
    for _ in range(20):
        means.append(env.core._centre.mean.copy())
        observation, *_ = env.step(0)
        seen.append(observation[:4])
    before = [np.zeros(4)] + seen[:-2]  # the observation before o_s-1, for s = 1..20
    rows = np.concatenate([seen[1:], before], axis=1)  # what arrived with o_1 .. o_20
    for s in range(1, 21):
        np.testing.assert_allclose(
            calls[s][1][0].numpy(), rows[s - 1] - means[s - 1], rtol=1e-6, atol=1e-7
        )
    np.testing.assert_allclose(env.core._centre.mean, rows.mean(axis=0), rtol=1e-12)


def test_reset_restarts_the_agent_state():
    env = wrap(gym.make("CartPole-v1"), learn=False)
    first, _ = env.reset(seed=3)
    for _ in range(5):
        env.step(0)
    again, _ = env.reset(seed=3)
    assert_same_observations(first, again)


@pytest.mark.parametrize("cumulant_kind", ["reward", "reward+observation"])
def test_terminal_rewards_are_learned(cumulant_kind):
    env = wrap(
        EndRewardEnv(length=3),
        gamma=0.9,
        cumulants=cumulant_kind,
        td_options={"head_step_size": 0.05},
    )
    env.reset(seed=0)
    for _ in range(600):
        *_, terminated, _, _ = env.step(0)
        before_end = env.predictions[0, 0] if env.core.episode_steps[0] == 2 else None
        if terminated:
            env.reset()
        elif before_end is not None:
            last_prediction = before_end
    assert last_prediction == pytest.approx(1.0, abs=0.15)


def test_terminal_predictions_without_stepping_equal_the_engine_predictions():
    """Auto-reset bootstraps from y_T computed without a step; it must be the engine's y_T."""
    env = wrap(
        gym.make("CartPole-v1"),
        cumulants="reward+observation",
        td_options={"include_observation": True},
    )
    rollout(env, 40)
    core = env.core
    x = torch.randn(1, len(core.input_names))
    expected = env.predictor.head_predictions(core._forward(x)[1], x)
    actual = env.predictor.step(x, torch.zeros(1, core.cumulants.size))
    torch.testing.assert_close(expected, actual)


@pytest.mark.parametrize("learner", ["columnar", "ccn", "tbptt", "elstm", "uoro", "snap1"])
def test_the_agent_state_is_the_same_with_the_fused_and_the_eager_engine(learner):
    """The state is read from the fused kernel's tensors, or computed beside the eager step."""
    options = {"columns_per_stage": 2, "steps_per_stage": 20} if learner == "ccn" else {}
    fused = wrap(
        gym.make("CartPole-v1"), learner=learner, cumulants="reward+observation", **options
    )
    eager = wrap(
        gym.make("CartPole-v1"),
        learner=learner,
        cumulants="reward+observation",
        td_options={"backend": "eager"},
        **options,
    )
    assert eager.predictor.backend == "eager"
    if fused.predictor.backend != "fused":
        pytest.skip("the fused kernel is not available here (no C++ compiler)")
    np.testing.assert_allclose(rollout(fused, 60)[0], rollout(eager, 60)[0], atol=1e-5)


# ------------------------------------------------------------------ vector envs
def make_vector(n_envs, mode, env_fn=lambda: gym.make("CartPole-v1")):
    return gym.vector.SyncVectorEnv([env_fn] * n_envs, autoreset_mode=mode)


def vector_rollout(envs, steps, seed=0):
    observations, _ = envs.reset(seed=seed)
    collected, finals = [observations], []
    for action in ACTIONS[:steps]:
        observations, _, _, _, infos = envs.step(np.full(envs.num_envs, action))
        collected.append(observations)
        if "final_obs" in infos:
            finals.extend(infos["final_obs"][infos["_final_obs"]])
    return np.stack(collected), finals


def test_vector_wrapper_with_one_env_reproduces_the_single_env_wrapper_exactly():
    single, _ = rollout(wrap(gym.make("CartPole-v1")), 100)
    envs = AgentStateVectorWrapper(
        make_vector(1, AutoresetMode.NEXT_STEP), seed=0, n_features=6, **PLAIN
    )
    batched, _ = vector_rollout(envs, 100)
    assert_same_observations(batched[:, 0], single)


def test_same_step_autoreset_puts_the_augmented_terminal_observation_in_infos():
    single = wrap(gym.make("CartPole-v1"), learn=False)
    expected, expected_finals = rollout(single, 100, same_step=True)
    envs = AgentStateVectorWrapper(
        make_vector(1, AutoresetMode.SAME_STEP), seed=0, n_features=6, learn=False, **PLAIN
    )
    batched, finals = vector_rollout(envs, 100)
    assert len(finals) == len(expected_finals) > 0
    assert all(final in envs.single_observation_space for final in finals)
    assert_same_observations(np.stack(finals), np.stack(expected_finals))
    assert_same_observations(batched[:, 0], expected)


def test_vector_streams_share_one_learner_and_restart_separately():
    envs = AgentStateVectorWrapper(
        make_vector(3, AutoresetMode.NEXT_STEP),
        seed=0,
        n_features=6,
        cumulants="observation",
        **PLAIN,
    )
    learner = envs.predictor.learner
    assert learner.streams == 3 and learner.params["weight"].shape[0] == 1
    observations, _ = vector_rollout(envs, 40)
    assert observations.shape == (41, 3, 4 + 6)
    assert all(row in envs.observation_space for row in observations)


def test_vector_wrapper_refuses_disabled_autoreset():
    with pytest.raises(ValueError, match="NEXT_STEP.*SAME_STEP"):
        AgentStateVectorWrapper(make_vector(2, AutoresetMode.DISABLED))


# ------------------------------------------------------------------ bad numbers
def test_nonfinite_observation_raises_naming_step_and_component_and_learner_is_untouched():
    env = wrap(SpaceEnv(nan_at=2))
    env.reset(seed=0)
    env.step(0)
    before = env.state_dict()
    with pytest.raises(NonFiniteInputError, match="'observation\\[1\\]'.*step 2.*episode step 2"):
        env.step(1)
    assert_same_state(env.state_dict(), before)


def test_nonfinite_skip_reports_in_info_and_keeps_the_step_out_of_learning():
    # rmsprop_td: a zero update leaves the parameters exactly where they are (Adam's
    # momentum would still move them, though no gradient from the skipped step enters).
    env = wrap(SpaceEnv(nan_at=2), nonfinite="skip", td_options={"optimizer": "rmsprop_td"})
    env.reset(seed=0)
    env.step(1)
    weight = env.predictor.learner.params["weight"].clone()
    heads = env.predictor.head_weight.clone()
    observation, _, _, _, info = env.step(1)
    # The learner's input and (by default) the head predicting that component.
    assert info[NONFINITE_INFO_KEY] == ["observation[1]", "cumulant observation[1]"]
    assert observation in env.observation_space
    torch.testing.assert_close(env.predictor.learner.params["weight"], weight, rtol=0, atol=0)
    torch.testing.assert_close(env.predictor.head_weight, heads, rtol=0, atol=0)
    _, _, _, _, info = env.step(1)
    assert NONFINITE_INFO_KEY not in info


def test_a_diverged_learner_is_reported_and_never_reaches_the_policy():
    env = wrap(gym.make("CartPole-v1"))
    env.reset(seed=0)
    good = env.state_dict()
    env.predictor.learner.params["weight"][0, 0, 0, 0] = float("nan")
    for _ in range(2):  # and it stays reported
        with pytest.raises(LearnerDivergedError, match="diverged.*parameters: weight"):
            env.step(0)
    env.load_state_dict(good)
    observation, *_ = env.step(0)
    assert np.isfinite(observation).all()


# ------------------------------------------------------------------ learning switch, checkpoints
def test_freeze_stops_learning_and_unfreeze_resumes():
    env = wrap(gym.make("CartPole-v1"), step_size=0.05)
    env.reset(seed=0)
    for _ in range(5):
        env.step(0)
    frozen = env.state_dict()["engine"]
    env.freeze()
    observations = [env.step(1)[0] for _ in range(3)]
    assert not np.array_equal(observations[0][4:], observations[1][4:])  # the state moves
    after = env.state_dict()["engine"]
    for key in ("head_weight", "input_normalizer", "feature_normalizer"):
        torch.testing.assert_close(after[key], frozen[key], rtol=0, atol=0)
    torch.testing.assert_close(after["learner"]["params"], frozen["learner"]["params"])
    env.unfreeze()
    env.reset()
    for _ in range(5):
        env.step(0)
    assert not torch.equal(
        env.predictor.learner.params["weight"], frozen["learner"]["params"]["weight"]
    )


@pytest.mark.parametrize("options", [{}, {"center_cumulants": True, "reconstruct_past": 2}])
def test_state_dict_round_trip_gives_identical_observations(options):
    trained = wrap(gym.make("CartPole-v1"), cumulants="reward+observation", **options)
    rollout(trained, 80)
    reloaded = wrap(gym.make("CartPole-v1"), cumulants="reward+observation", seed=7, **options)
    reloaded.load_state_dict(trained.state_dict())
    assert_same_observations(rollout(trained, 50, seed=5)[0], rollout(reloaded, 50, seed=5)[0])


@pytest.mark.parametrize(
    ("make_other", "reason"),
    [
        (lambda: wrap(gym.make("Acrobot-v1")), "observation_size: saved 4, here 6"),
        (lambda: wrap(gym.make("CartPole-v1"), learner="elstm"), "'learner': 'elstm'"),
        (lambda: wrap(gym.make("CartPole-v1"), n_features=9), "n_features: saved 6, here 9"),
        (lambda: wrap(gym.make("CartPole-v1"), cumulants="observation"), "cumulants"),
        (lambda: wrap(gym.make("CartPole-v1"), gamma=0.5), "td_config"),
    ],
)
def test_a_state_saved_for_another_env_or_learner_is_refused(make_other, reason):
    saved = wrap(gym.make("CartPole-v1")).state_dict()
    other = make_other()
    before = other.state_dict()
    with pytest.raises(ValueError, match="cannot load agent state") as error:
        other.load_state_dict(saved)
    assert reason in str(error.value)
    assert_same_state(other.state_dict(), before)


def test_with_the_defaults_a_state_trained_on_many_envs_loads_into_one():
    envs = AgentStateVectorWrapper(make_vector(3, AutoresetMode.NEXT_STEP), seed=0)
    vector_rollout(envs, 30)
    single = AgentStateWrapper(gym.make("CartPole-v1"), seed=4)
    single.load_state_dict(envs.state_dict())
    np.testing.assert_array_equal(single.core._centre.mean, envs.core._centre.mean)
    assert not single.core._past.buffer.any()  # every stream starts a new episode
    observation, _ = single.reset(seed=0)
    assert observation in single.observation_space


def test_a_state_trained_on_many_envs_loads_into_one():
    envs = AgentStateVectorWrapper(
        make_vector(3, AutoresetMode.NEXT_STEP), seed=0, n_features=6, **PLAIN
    )
    vector_rollout(envs, 30)
    single = wrap(gym.make("CartPole-v1"), seed=4)
    single.load_state_dict(envs.state_dict())
    torch.testing.assert_close(
        single.predictor.learner.params["weight"], envs.predictor.learner.params["weight"]
    )
    torch.testing.assert_close(single.predictor.head_weight, envs.predictor.head_weight)


def test_same_seeds_give_identical_observations_and_other_seeds_do_not():
    first, _ = rollout(wrap(gym.make("CartPole-v1"), seed=11), 60)
    second, _ = rollout(wrap(gym.make("CartPole-v1"), seed=11), 60)
    other, _ = rollout(wrap(gym.make("CartPole-v1"), seed=12), 60)
    assert_same_observations(first, second)
    assert not np.array_equal(first, other)


def test_agentstate_exports_the_wrappers():
    assert agentstate.AgentStateWrapper is AgentStateWrapper
    assert agentstate.AgentStateVectorWrapper is AgentStateVectorWrapper
