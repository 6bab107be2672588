import copy
import warnings

import numpy as np
import pytest

from agentstate.checkpoint import load_checkpoint, save_checkpoint
from agentstate.metrics import (
    EpisodeReturnScorer,
    SlidingMean,
    discounted_returns_backward,
    mean_and_standard_error,
)


def forward_returns(cumulants: np.ndarray, discounts: np.ndarray) -> np.ndarray:
    """Oracle: G_t = sum_{k>t} c_k prod_{t<j<k} γ_j, summed forward for every t, time first."""
    n_steps = len(cumulants)
    cumulant_columns = cumulants.reshape(n_steps, -1).T.tolist()
    discount_columns = discounts.reshape(n_steps, -1).T.tolist()
    returns = np.zeros((len(cumulant_columns), n_steps))
    for column, (c, g) in enumerate(zip(cumulant_columns, discount_columns, strict=True)):
        for t in range(n_steps):
            total, weight = 0.0, 1.0
            for k in range(t + 1, n_steps):
                total += weight * c[k]
                weight *= g[k]
                if weight == 0.0:
                    break  # every later term is 0
            returns[column, t] = total
    return returns.T.reshape(cumulants.shape)


def random_stream(rng, shape, reset_probability):
    cumulants = rng.normal(size=shape) * (rng.random(shape) < 0.3)
    discounts = rng.uniform(0.8, 1.0, size=shape)
    discounts[rng.random(shape) < reset_probability] = 0.0
    return cumulants, discounts


# ---------------------------------------------------------------- discounted_returns_backward


@pytest.mark.parametrize("shape", [(60,), (60, 4), (1,), (1, 3)])
def test_returns_match_forward_double_loop(shape):
    cumulants, discounts = random_stream(np.random.default_rng(0), shape, 0.1)
    returns = discounted_returns_backward(cumulants, discounts)
    np.testing.assert_allclose(returns, forward_returns(cumulants, discounts), rtol=1e-12)
    assert returns.dtype == np.float64
    assert returns.shape == shape
    np.testing.assert_array_equal(returns[-1], 0.0)


def test_returns_by_hand_with_a_reset():
    returns = discounted_returns_backward([0, 0, 1, 2, 4], [1.0, 0.5, 0.5, 0.0, 0.5])
    np.testing.assert_array_equal(returns, [1.0, 2.0, 2.0, 4.0, 0.0])


def test_reset_cuts_later_cumulants_but_keeps_the_one_arriving_with_it():
    cumulants = np.array([0.0, 0.0, 3.0, 100.0])
    discounts = np.array([1.0, 1.0, 0.0, 1.0])
    returns = discounted_returns_backward(cumulants, discounts)
    assert returns[1] == 3.0  # c_2 arrives with the reset and ends step 1's episode
    assert returns[0] == 3.0
    assert returns[2] == 100.0


def test_returns_accept_integer_and_float32_input():
    returns = discounted_returns_backward(np.array([1, 2, 3]), np.ones(3, dtype=np.float32))
    assert returns.dtype == np.float64
    np.testing.assert_array_equal(returns, [5.0, 3.0, 0.0])


def test_returns_reject_bad_shapes_and_discounts():
    with pytest.raises(
        ValueError, match=r"cumulants must have shape \[T\] or \[T, B\]; got shape \[2, 3, 4\]"
    ):
        discounted_returns_backward(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"discounts must have shape \[5\]; got shape \[4\]"):
        discounted_returns_backward(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match=r"discounts must have shape \[5, 2\]; got shape \[5\]"):
        discounted_returns_backward(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(ValueError, match=r"discounts must lie in \[0, 1\]"):
        discounted_returns_backward(np.zeros(3), [1.0, 1.5, 1.0])
    with pytest.raises(ValueError, match=r"discounts must lie in \[0, 1\]"):
        discounted_returns_backward(np.zeros(3), [1.0, np.nan, 1.0])


# ---------------------------------------------------------------- EpisodeReturnScorer


def run_scorer(scorer, predictions, cumulants, discounts):
    episodes = []
    for t in range(len(cumulants)):
        step_predictions = {name: values[t] for name, values in predictions.items()}
        episodes += scorer.update(step_predictions, cumulants[t], discounts[t])
    return episodes


@pytest.mark.parametrize(
    ("n_steps", "n_streams", "reset_probability"),
    [(3000, 4, 0.05), (3000, 2, 0.0005), (50, 1, 0.5)],
)
def test_scorer_matches_returns_over_the_whole_stream(n_steps, n_streams, reset_probability):
    rng = np.random.default_rng(1)
    cumulants, discounts = random_stream(rng, (n_steps, n_streams), reset_probability)
    predictions = {
        "learner": rng.normal(size=(n_steps, n_streams)),
        "zero": np.zeros((n_steps, n_streams)),
    }
    scorer = EpisodeReturnScorer(n_streams, ["learner", "zero"])
    episodes = run_scorer(scorer, predictions, cumulants, discounts)

    exact_returns = forward_returns(cumulants, discounts)
    scored_steps = [[] for _ in range(n_streams)]
    for episode in episodes:
        steps = np.arange(episode.first_step, episode.first_step + episode.n_steps)
        stream = episode.stream
        np.testing.assert_allclose(episode.returns, exact_returns[steps, stream], rtol=1e-12)
        for name, values in predictions.items():
            np.testing.assert_allclose(
                episode.squared_errors[name],
                (values[steps, stream] - exact_returns[steps, stream]) ** 2,
                rtol=1e-12,
            )
        # The episode ends where the next step's discount is 0, and nowhere before.
        assert discounts[steps[-1] + 1, stream] == 0.0
        assert np.all(discounts[steps[1:], stream] != 0.0)
        scored_steps[stream] += steps.tolist()

    for stream in range(n_streams):
        # Every step before the stream's last reset is scored once; later steps are pending.
        reset_steps = np.flatnonzero(discounts[1:, stream] == 0.0) + 1
        last_reset = reset_steps[-1] if len(reset_steps) else 0
        assert scored_steps[stream] == list(range(last_reset))
        assert scorer.pending_steps[stream] == n_steps - last_reset
    assert scorer.step_count == n_steps


def test_scorer_example_by_hand():
    scorer = EpisodeReturnScorer(2, ["learner"])
    # Stream 0 resets at step 2; stream 1 never resets.
    assert scorer.update({"learner": [1.0, 0.0]}, [9.0, 9.0], [0.0, 0.0]) == []
    assert scorer.update({"learner": [0.5, 0.0]}, [1.0, 1.0], [0.5, 1.0]) == []
    (episode,) = scorer.update({"learner": [0.0, 0.0]}, [2.0, 1.0], [0.0, 1.0])
    assert (episode.stream, episode.first_step, episode.n_steps) == (0, 0, 2)
    np.testing.assert_array_equal(episode.returns, [1.0 + 0.5 * 2.0, 2.0])
    np.testing.assert_array_equal(episode.squared_errors["learner"], [1.0, 2.25])
    np.testing.assert_array_equal(scorer.pending_steps, [1, 3])


def test_scorer_memory_stays_bounded_by_episode_length():
    n_streams = 3
    scorer = EpisodeReturnScorer(n_streams, ["learner"])
    initial_capacity = len(scorer._cumulant_rows)
    zeros = np.zeros(n_streams)
    for t in range(20 * initial_capacity):
        # Episodes of 10, 37 and 100 steps: far shorter than the stream.
        discounts = np.where(t % np.array([10, 37, 100]) == 0, 0.0, 0.9)
        scorer.update({"learner": zeros}, zeros, discounts)
    assert len(scorer._cumulant_rows) == initial_capacity

    long_episode = 3 * initial_capacity
    for t in range(long_episode):
        discounts = np.array([0.0 if t % 10 == 0 else 0.9, 0.9, 0.9])
        scorer.update({"learner": zeros}, zeros, discounts)
    assert len(scorer._cumulant_rows) <= 4 * scorer.pending_steps.max()


def test_scorer_rejects_bad_input():
    with pytest.raises(ValueError, match="n_streams must be at least 1; got 0"):
        EpisodeReturnScorer(0, ["learner"])
    with pytest.raises(ValueError, match="predictor_names must be non-empty and distinct"):
        EpisodeReturnScorer(2, ["learner", "learner"])
    scorer = EpisodeReturnScorer(2, ["learner", "zero"])
    with pytest.raises(
        ValueError, match=r"predictions must have keys \['learner', 'zero'\]; got \['learner'\]"
    ):
        scorer.update({"learner": [0.0, 0.0]}, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(
        ValueError, match=r"predictions\['zero'\] must have shape \[2\]; got shape \[3\]"
    ):
        scorer.update({"learner": [0.0, 0.0], "zero": [0.0, 0.0, 0.0]}, [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"cumulants must have shape \[2\]; got shape \[2, 1\]"):
        scorer.update({"learner": [0.0, 0.0], "zero": [0.0, 0.0]}, [[0.0], [0.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"discounts must lie in \[0, 1\]"):
        scorer.update({"learner": [0.0, 0.0], "zero": [0.0, 0.0]}, [0.0, 0.0], [1.0, -0.1])
    assert scorer.step_count == 0


# ---------------------------------------------------------------- SlidingMean


def sliding_mean_oracle(history: np.ndarray, window: int) -> np.ndarray:
    """Mean of history[max(0, t + 1 - window) : t + 1] for every t, by explicit slicing."""
    return np.stack(
        [history[max(0, t + 1 - window) : t + 1].mean(axis=0) for t in range(len(history))]
    )


def sliding_mean_cumsum_oracle(history: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.concatenate([np.zeros((1, *history.shape[1:])), history]), axis=0)
    ends = np.arange(1, len(history) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts).reshape(-1, *[1] * (history.ndim - 1))


@pytest.mark.parametrize(("window", "shape"), [(1, ()), (7, ()), (7, (3,)), (5, (2, 2))])
def test_sliding_mean_single_updates_match_oracles(window, shape):
    history = np.random.default_rng(2).normal(size=(40, *shape))
    expected = sliding_mean_oracle(history, window)
    np.testing.assert_allclose(expected, sliding_mean_cumsum_oracle(history, window), atol=1e-12)
    sliding_mean = SlidingMean(window, shape)
    for t, value in enumerate(history):
        sliding_mean.update(value)
        np.testing.assert_allclose(sliding_mean.value, expected[t], rtol=1e-12, atol=1e-12)
        assert sliding_mean.value.shape == shape
        assert sliding_mean.count == min(t + 1, window)


def test_sliding_mean_update_many_equals_single_updates():
    window, shape = 10, (3,)
    rng = np.random.default_rng(3)
    batched, single = SlidingMean(window, shape), SlidingMean(window, shape)
    history = []
    for n_values in [3, 0, 1, 9, 10, 0, 25, 4, 10, 11, 2, 7, 30]:
        values = rng.lognormal(sigma=3.0, size=(n_values, *shape))  # sums that round
        batched.update_many(values)
        for value in values:
            single.update(value)
        history += list(values)
        np.testing.assert_array_equal(batched._ring, single._ring)
        np.testing.assert_array_equal(batched.value, single.value)  # bit for bit
        np.testing.assert_allclose(
            batched.value, sliding_mean_oracle(np.array(history), window)[-1], rtol=1e-12
        )
        assert batched.count == single.count == min(len(history), window)


def test_sliding_mean_is_nan_before_any_value():
    sliding_mean = SlidingMean(4, shape=2)
    assert sliding_mean.count == 0
    assert sliding_mean.value.shape == (2,)
    assert np.all(np.isnan(sliding_mean.value))


def cancellation_chunks(seed, n_values, chunk_size):
    """Values ~1 in chunks, with bursts of 1e12 that a plain running sum cannot forget.

    The last 100k values hold no burst, so the final window is all small values.
    """
    rng = np.random.default_rng(seed)
    n_chunks = n_values // chunk_size
    burst_chunks = set(rng.integers(0, n_chunks - 100_000 // chunk_size, size=20).tolist())
    for chunk_index in range(n_chunks):
        chunk = rng.uniform(0.0, 2.0, size=chunk_size)
        if chunk_index in burst_chunks:
            chunk[:50] = rng.uniform(1e11, 1e12, size=50)
        yield chunk


def feed(sliding_mean, chunks, single_updates):
    """Feed all chunks; return the last chunk (the final window lies inside it)."""
    for chunk in chunks:
        if single_updates:
            for value in chunk:
                sliding_mean.update(value)
        else:
            sliding_mean.update_many(chunk)
    return chunk


@pytest.mark.parametrize(
    ("n_values", "window", "chunk_size", "single_updates"),
    [
        (200_000, 1000, 1000, True),
        # 1e8 updates, each batch within one window
        pytest.param(100_000_000, 5000, 5000, False, marks=pytest.mark.expensive),
    ],
)
def test_sliding_mean_does_not_drift(monkeypatch, n_values, window, chunk_size, single_updates):
    sliding_mean = SlidingMean(window)
    last_chunk = feed(sliding_mean, cancellation_chunks(4, n_values, chunk_size), single_updates)
    exact = np.mean(last_chunk[-window:])
    assert sliding_mean.value == pytest.approx(exact, rel=1e-12)

    # The data is hard enough: without the periodic recompute the same mean drifts.
    without_recompute = SlidingMean(window)
    monkeypatch.setattr(without_recompute, "_recompute_sum", lambda: None)
    feed(without_recompute, cancellation_chunks(4, n_values, chunk_size), single_updates)
    assert without_recompute.value != pytest.approx(exact, rel=1e-12)


def test_sliding_mean_rejects_bad_input():
    with pytest.raises(ValueError, match="window must be at least 1; got 0"):
        SlidingMean(0)
    sliding_mean = SlidingMean(3, shape=(2,))
    with pytest.raises(ValueError, match=r"values must have shape \[2\]; got shape \[3\]"):
        sliding_mean.update([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"values must have shape \[n, 2\]; got shape \[2\]"):
        sliding_mean.update_many([1.0, 2.0])
    with pytest.raises(ValueError, match=r"values must have shape \[n, 2\]; got shape \[4, 3\]"):
        sliding_mean.update_many(np.zeros((4, 3)))
    assert sliding_mean.count == 0


@pytest.mark.parametrize(("window", "shape"), [(5, ()), (5, (3,))])
@pytest.mark.parametrize("through_checkpoint", [False, True])
def test_sliding_mean_state_dict_round_trip_continues_identically(
    tmp_path, window, shape, through_checkpoint
):
    history = np.random.default_rng(5).normal(size=(30, *shape))
    original = SlidingMean(window, shape)
    for value in history[:13]:  # mid-window: 3 updates since the sum was last recomputed
        original.update(value)
    assert original.state_dict()["_updates_since_recompute"] == 3
    state = original.state_dict()
    if through_checkpoint:  # arrays come back as tensors
        save_checkpoint(tmp_path / "checkpoint.pt", {"run": "a"}, 13, state)
        state = load_checkpoint(tmp_path / "checkpoint.pt", {"run": "a"})[1]
    restored = SlidingMean(window, shape)
    restored.load_state_dict(state)
    assert restored.count == original.count
    np.testing.assert_array_equal(restored.value, original.value)
    for value in history[13:]:
        original.update(value)
        restored.update(value)
        np.testing.assert_array_equal(restored.value, original.value)
        assert restored.count == original.count


def test_sliding_mean_state_dict_is_a_copy_and_loads_the_attributes_older_checkpoints_hold():
    original = SlidingMean(4, (2,))
    original.update_many(np.arange(12.0).reshape(6, 2))
    legacy_state = copy.deepcopy(vars(original))  # what checkpoints saved before state_dict
    state = original.state_dict()
    original.update([100.0, 100.0])
    np.testing.assert_array_equal(state["_ring"], legacy_state["_ring"])
    restored = SlidingMean(4, (2,))
    restored.load_state_dict(legacy_state)
    restored.update([100.0, 100.0])
    np.testing.assert_array_equal(restored.value, original.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: state.pop("_n_seen"), r"must have keys .*got .*state_dict\(\) returned"),
        (lambda state: state.update(window=6), r"window 6 .* this mean window 5 .*window=6"),
        (lambda state: state.update(shape=(2,)), r"shape \[2\], this mean .*shape \[\]"),
        (lambda state: state.update(_ring=np.zeros(4)), r"_ring must have shape \[5\]"),
        (lambda state: state.update(_next_slot=1), "_n_seen 3 and _next_slot 1"),
        (lambda state: state.update(_updates_since_recompute=5), r"must lie in \[0, 5\)"),
    ],
)
def test_sliding_mean_load_state_dict_refuses_a_mismatch_and_changes_nothing(change, message):
    saved = SlidingMean(5)
    saved.update_many([1.0, 2.0, 3.0])
    state = saved.state_dict()
    change(state)
    sliding_mean = SlidingMean(5)
    sliding_mean.update(7.0)
    with pytest.raises(ValueError, match=message):
        sliding_mean.load_state_dict(state)
    assert sliding_mean.value == 7.0 and sliding_mean.count == 1


# ---------------------------------------------------------------- mean_and_standard_error


def test_mean_and_standard_error_match_numpy():
    values = np.random.default_rng(5).normal(size=(6, 5))
    values[1, 2] = np.nan
    values[2, :4] = np.nan  # one stream left: no spread
    values[3, :] = np.nan  # nothing reported yet
    mean, standard_error = mean_and_standard_error(values)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected_mean = np.nanmean(values, axis=1)
        n_reported = np.sum(~np.isnan(values), axis=1)
        expected_se = np.nanstd(values, axis=1, ddof=1) / np.sqrt(n_reported)
    expected_se[n_reported < 2] = np.nan
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(standard_error, expected_se, rtol=1e-12)
    assert np.isnan(mean[3]) and np.isnan(standard_error[2])


def test_mean_and_standard_error_keep_divergence_visible():
    mean, standard_error = mean_and_standard_error([[1.0, np.inf, 2.0]])
    assert mean[0] == np.inf
    assert np.isnan(standard_error[0])


def test_mean_and_standard_error_reject_bad_shape():
    with pytest.raises(ValueError, match=r"values must have shape \[N, B\]; got shape \[4\]"):
        mean_and_standard_error(np.zeros(4))
