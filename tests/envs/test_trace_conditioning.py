import importlib
import itertools
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import agentstate.envs
from agentstate.envs import (
    NoisyPatterning,
    NoisyPatterningVectorEnv,
    TraceConditioning,
    TraceConditioningVectorEnv,
    TracePatterning,
    TracePatterningVectorEnv,
    rafiee2022_timing,
)

FAMILIES = {
    "agentstate/TraceConditioning-v0": (TraceConditioning, TraceConditioningVectorEnv),
    "agentstate/TracePatterning-v0": (TracePatterning, TracePatterningVectorEnv),
    "agentstate/NoisyPatterning-v0": (NoisyPatterning, NoisyPatterningVectorEnv),
}
ENV_IDS = list(FAMILIES)
PRESETS = ["jmlr2023", "rafiee2022"]
US = 0


def record(env_id, n_streams, n_steps, seed, **kwargs):
    """Observations, cumulants and return targets of steps 0..n_steps (reset included)."""
    envs = gym.make_vec(env_id, num_envs=n_streams, **kwargs)
    first_observation, info = envs.reset(seed=seed)
    observations, cumulants, return_targets = envs.rollout(n_steps)
    observations = np.concatenate([first_observation[None], observations])
    return_targets = np.concatenate([info["return_target"][None], return_targets])
    return envs, observations, cumulants, return_targets


def rising_edges(on):
    """Steps where a [T] boolean signal switches on."""
    return np.flatnonzero(on & ~np.concatenate([[False], on[:-1]]))


def run_lengths(on):
    """Lengths of the runs of a [T] boolean signal, the last (maybe cut) one excluded."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    return (edges[1::2] - edges[::2])[:-1]


def trials(observations, n_cs):
    """Per trial of one stream ([T, d] observations): onset, CS pattern and US onset or -1."""
    cs_on = observations[:, 1 : 1 + n_cs] > 0
    onsets = rising_edges(cs_on.any(axis=1))
    us_onsets = rising_edges(observations[:, US] > 0)
    trial_of_us = np.searchsorted(onsets, us_onsets, side="right") - 1
    assert np.all(np.bincount(trial_of_us[trial_of_us >= 0]) <= 1), "two US in one trial"
    us_onset = np.full(onsets.size, -1)
    us_onset[trial_of_us[trial_of_us >= 0]] = us_onsets[trial_of_us >= 0]
    # The last trial may still be waiting for its US: drop it.
    return onsets[:-1], cs_on[onsets[:-1]], us_onset[:-1], onsets[1:]


def backward_returns(cumulants, gamma):
    """G_t = c_{t+1} + γ G_{t+1} over a recording, with G = 0 at its end ([T, B] cumulants)."""
    returns = np.zeros((cumulants.shape[0] + 1, cumulants.shape[1]))
    for t in range(cumulants.shape[0] - 1, -1, -1):
        returns[t] = cumulants[t] + gamma * returns[t + 1]
    return returns


def assert_streams_equal(first, second):
    names = ("observations", "cumulants", "return targets")
    for name, a, b in zip(names, first, second, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


# ---------------------------------------------------------------- registration and API


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_passes_without_warnings(env_id, preset):
    env = gym.make(env_id, preset=preset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    assert isinstance(env.unwrapped, FAMILIES[env_id][0])
    assert env.unwrapped.gamma == env.unwrapped.config.gamma


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_vec_returns_the_native_vector_env(env_id):
    envs = gym.make_vec(env_id, num_envs=3)
    assert type(envs) is FAMILIES[env_id][1]
    assert envs.num_envs == 3
    assert envs.gamma == 0.9
    assert envs.observation_space.shape == (3, envs.single_observation_space.shape[0])
    assert envs.single_observation_space.dtype == np.float32
    observations, infos = envs.reset(seed=0)
    observations, cumulants, terminations, truncations, infos = envs.step(np.zeros(3, int))
    assert (
        observations.dtype == np.float32
        and observations.shape == (3,) + envs.single_observation_space.shape
    )
    assert not terminations.any() and not truncations.any()
    assert infos["return_target"].shape == (3,) and infos["_return_target"].all()
    np.testing.assert_array_equal(cumulants, observations[:, US])


def test_importing_twice_registers_once_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(agentstate.envs)
    for env_id in ENV_IDS:
        assert gym.spec(env_id).vector_entry_point.endswith("VectorEnv")


def test_envs_never_terminate_or_truncate():
    env = gym.make("agentstate/TracePatterning-v0")
    env.reset(seed=0)
    for _ in range(600):
        _, cumulant, terminated, truncated, info = env.step(0)
        assert not terminated and not truncated
        assert cumulant in (0.0, 1.0) and isinstance(info["return_target"], float)


# ------------------------------------------------------------------ preset statistics


def test_jmlr_trace_patterning_statistics():
    envs, observations, _, _ = record("agentstate/TracePatterning-v0", 8, 25000, seed=1)
    isis, itis, valid_sets, followed_trials = [], [], [], []
    for stream in range(envs.num_envs):
        onsets, patterns, us_onset, next_onsets = trials(observations[:, stream], n_cs=6)
        assert np.all(patterns.sum(axis=1) == 3), "exactly 3 of 6 CS on at trial onset"
        assert np.all(observations[onsets + 1, stream, 1:7] == 0), "CS lasts one step"
        followed = us_onset >= 0
        codes = patterns @ (1 << np.arange(6))
        valid, invalid = set(codes[followed]), set(codes[~followed])
        expected = set(envs.valid_patterns[stream] @ (1 << np.arange(6)))
        assert valid == expected and len(valid) == 10, "US follows exactly the valid patterns"
        assert not valid & invalid, "a valid pattern went without US (or vice versa)"
        assert len(valid | invalid) == 20
        isis.append(us_onset[followed] - onsets[followed])
        itis.append(next_onsets[followed] - us_onset[followed])
        valid_sets.append(frozenset(valid))
        followed_trials.append(followed)
    isis, itis = np.concatenate(isis), np.concatenate(itis)
    assert set(isis) == set(range(24, 37))
    assert set(itis) == set(range(80, 121))
    assert len(set(valid_sets)) > 1, "streams draw their own valid patterns"
    followed_trials = np.concatenate(followed_trials)  # 10 of 20 patterns: half the trials
    assert abs(followed_trials.mean() - 0.5) < 5 * np.sqrt(0.25 / followed_trials.size)
    assert np.all(observations[:, :, US].sum(axis=0) > 0)
    # Distractor k (k = 1..5) is on at each step independently with probability 1/(10k).
    distractors = observations[:, :, 7:12].reshape(-1, 5)
    n_samples = distractors.shape[0]
    for k in range(1, 6):
        probability = 1 / (10 * k)
        standard_error = np.sqrt(probability * (1 - probability) / n_samples)
        assert abs(distractors[:, k - 1].mean() - probability) < 5 * standard_error
    lag_correlation = np.corrcoef(distractors[1:, 0], distractors[:-1, 0])[0, 1]
    assert abs(lag_correlation) < 0.02


def test_jmlr_trace_conditioning_statistics():
    envs, observations, _, _ = record("agentstate/TraceConditioning-v0", 30, 4000, seed=2)
    assert observations.shape[-1] == 7
    isis, itis = [], []
    for stream in range(envs.num_envs):
        onsets, _, us_onset, next_onsets = trials(observations[:, stream], n_cs=1)
        assert np.all(us_onset >= 0), "the US follows every CS"
        isis.append(us_onset - onsets)
        itis.append(next_onsets - us_onset)
    assert set(np.concatenate(isis)) == set(range(24, 37))
    assert set(np.concatenate(itis)) == set(range(80, 121))
    rates = observations[:, :, 2:].reshape(-1, 5).mean(axis=0)
    np.testing.assert_allclose(rates, [1 / (10 * k) for k in range(1, 6)], rtol=0.1)


def test_rafiee_trace_conditioning_durations_and_timing():
    envs, observations, _, _ = record(
        "agentstate/TraceConditioning-v0", 20, 4000, seed=3, preset="rafiee2022"
    )
    assert envs.gamma == pytest.approx(0.9) and observations.shape[-1] == 12
    isis, itis = [], []
    for stream in range(envs.num_envs):
        on = observations[:, stream] > 0
        assert set(run_lengths(on[:, 1])) == {4} and set(run_lengths(on[:, US])) == {2}
        for distractor in range(2, 12):
            assert set(run_lengths(on[:, distractor])) == {4}
        onsets, _, us_onset, next_onsets = trials(observations[:, stream], n_cs=1)
        isis.append(us_onset - onsets)
        itis.append(next_onsets - us_onset)
    assert set(np.concatenate(isis)) == set(range(7, 14))  # ISI 10 ± ⌊10/3⌋
    assert set(np.concatenate(itis)) == set(range(80, 121))


@pytest.mark.parametrize("preset, cs_duration", [("jmlr2023", 1), ("rafiee2022", 4)])
def test_noisy_patterning_has_no_trace_gap(preset, cs_duration):
    # The "any" pattern pool can show an empty pattern, a trial invisible in the observations.
    envs, observations, _, _ = record(
        "agentstate/NoisyPatterning-v0", 20, 4000, seed=4, preset=preset, pattern_pool="n_cs_on"
    )
    flips, n_trials = 0, 0
    for stream in range(envs.num_envs):
        onsets, patterns, us_onset, _ = trials(observations[:, stream], n_cs=6)
        followed = us_onset >= 0
        assert np.all(us_onset[followed] - onsets[followed] == cs_duration)
        is_valid = np.isin(
            patterns @ (1 << np.arange(6)), envs.valid_patterns[stream] @ (1 << np.arange(6))
        )
        flips += np.sum(is_valid != followed)
        n_trials += onsets.size
    flip_probability = envs.config.us_flip_probability
    standard_error = np.sqrt(0.1 * 0.9 / n_trials)
    assert abs(flips / n_trials - flip_probability) < 5 * standard_error


def test_rafiee_patterning_distractors_switch_on_with_the_cs():
    # The "any" pattern pool can show an empty pattern, a trial invisible in the observations.
    envs, observations, _, _ = record(
        "agentstate/TracePatterning-v0",
        20,
        3000,
        seed=5,
        preset="rafiee2022",
        pattern_pool="n_cs_on",
    )
    distractors = observations[:, :, 7:] > 0
    cs_any = observations[:, :, 1:7].any(axis=2)
    n_trials, n_distractor_onsets = 0, 0
    for stream in range(envs.num_envs):
        cs_onsets = rising_edges(cs_any[:, stream])
        n_trials += cs_onsets.size
        for distractor in range(10):
            distractor_onsets = rising_edges(distractors[:, stream, distractor])
            assert set(distractor_onsets) <= set(cs_onsets)
            n_distractor_onsets += distractor_onsets.size
    standard_error = np.sqrt(0.25 / (10 * n_trials))
    assert abs(n_distractor_onsets / (10 * n_trials) - 0.5) < 5 * standard_error


# --------------------------------------------------------------------- return targets


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_return_target_equals_the_backward_return(env_id, preset):
    envs, _, cumulants, return_targets = record(env_id, 4, 6000, seed=6, preset=preset)
    backward = backward_returns(cumulants, envs.gamma)
    assert cumulants.sum() > 0
    # Away from the recording's end the cut of the backward sum is below γ^1000 / (1 − γ).
    np.testing.assert_allclose(return_targets[:-1000], backward[:-1000], rtol=0, atol=1e-12)


def test_return_target_with_a_long_discount():
    envs, _, cumulants, return_targets = record(
        "agentstate/TraceConditioning-v0",
        2,
        8000,
        seed=7,
        preset="rafiee2022",
        **rafiee2022_timing(30),
    )
    assert envs.gamma == pytest.approx(1 - 1 / 30)
    backward = backward_returns(cumulants, envs.gamma)
    np.testing.assert_allclose(return_targets[:-2000], backward[:-2000], rtol=0, atol=1e-12)


# ------------------------------------------------------------- consistency and seeding


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_rollout_equals_repeated_step(env_id, preset):
    stepped = gym.make_vec(env_id, num_envs=3, preset=preset)
    stepped.reset(seed=8)
    transitions = [stepped.step(np.zeros(3, int)) for _ in range(700)]
    by_step = (
        np.stack([observation for observation, *_ in transitions]),
        np.stack([cumulant for _, cumulant, *_ in transitions]),
        np.stack([info["return_target"] for *_, info in transitions]),
    )
    rolled = gym.make_vec(env_id, num_envs=3, preset=preset)
    rolled.reset(seed=8)
    first, second = rolled.rollout(300), rolled.rollout(400)
    rolled_out = [np.concatenate(pair) for pair in zip(first, second, strict=True)]
    assert_streams_equal(by_step, rolled_out)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_single_env_equals_the_first_vector_stream(env_id):
    single = gym.make(env_id)
    observation, info = single.reset(seed=9)
    transitions = [single.step(0) for _ in range(600)]
    by_step = (
        np.stack([observation, *[step[0] for step in transitions]]),
        np.array([step[1] for step in transitions], dtype=np.float32),
        np.array([info["return_target"], *[step[4]["return_target"] for step in transitions]]),
    )
    for n_streams in (1, 3):
        envs, observations, cumulants, return_targets = record(env_id, n_streams, 600, seed=9)
        assert_streams_equal(by_step, (observations[:, 0], cumulants[:, 0], return_targets[:, 0]))
        np.testing.assert_array_equal(envs.valid_patterns[0], single.unwrapped.valid_patterns)


def test_seeding_is_reproducible_and_seeds_differ():
    _, same_a, _, _ = record("agentstate/TracePatterning-v0", 4, 1000, seed=10)
    envs_b, same_b, _, _ = record("agentstate/TracePatterning-v0", 4, 1000, seed=10)
    _, other, _, _ = record("agentstate/TracePatterning-v0", 4, 1000, seed=11)
    np.testing.assert_array_equal(same_a, same_b)
    assert not np.array_equal(same_a, other)
    for first, second in itertools.combinations(range(4), 2):
        assert not np.array_equal(same_a[:, first], same_a[:, second])
    again, _ = envs_b.reset(seed=10)
    np.testing.assert_array_equal(again, same_a[0])
    np.testing.assert_array_equal(envs_b.rollout(1000)[0], same_a[1:])


def test_unseeded_reset_continues_the_generators_and_keeps_valid_patterns():
    env = TracePatterning()
    env.reset(seed=12)
    patterns = env.valid_patterns
    first = [env.step(0)[0] for _ in range(400)]
    env.reset()
    second = [env.step(0)[0] for _ in range(400)]
    np.testing.assert_array_equal(env.valid_patterns, patterns)
    assert not np.array_equal(first, second)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "env_class, kwargs, argument",
    [
        (TraceConditioning, {"isi_min": 40}, "isi_min"),
        (TraceConditioning, {"iti_min": 0}, "iti_min"),
        (TraceConditioning, {"gamma": 1.0}, "gamma"),
        (TraceConditioning, {"distractor_probabilities": (0.1, 1.5)}, "distractor_probabilities"),
        (TraceConditioning, {"n_cs": 6}, "n_cs"),
        (TraceConditioning, {"preset": "pavlov1927"}, "preset"),
        (TracePatterning, {"n_cs_on": 7}, "n_cs_on"),
        (TracePatterning, {"n_valid_patterns": 21}, "n_valid_patterns"),
        (TracePatterning, {"valid_trial_probability": 0.2}, "valid_trial_probability"),
        (TracePatterning, {"pattern_pool": "some"}, "pattern_pool"),
        (TracePatterning, {"us_flip_probability": -0.1}, "us_flip_probability"),
        (NoisyPatterning, {"cs_duration": 0}, "cs_duration"),
        (NoisyPatterning, {"isi_min": 3}, "isi_min"),
        (NoisyPatterning, {"distractor_onset": "sometimes"}, "distractor_onset"),
        (TracePatterningVectorEnv, {"num_envs": 0}, "num_envs"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(env_class, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        env_class(**kwargs)


def test_bad_arguments_raise_through_gymnasium_make():
    with pytest.raises(ValueError, match="isi_max"):
        gym.make("agentstate/TraceConditioning-v0", isi_min=30, isi_max=20)
    with pytest.raises(ValueError, match="n_cs_on"):
        gym.make_vec("agentstate/TracePatterning-v0", num_envs=2, n_cs=4, n_cs_on=5)
