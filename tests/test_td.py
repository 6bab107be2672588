"""The TD(lambda) engine against hand-written oracles."""

import pytest
import torch
from oracle import bptt_gradient

import agentstate
from agentstate import fused
from agentstate.plugins.columnar import COLUMNS_KERNEL
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS, COLUMNS = 2, 4, 3
PLAIN = dict(normalize_inputs=False, normalize_features=False, optimizer="sgd")


def make_learner(seed=0, independent=False):
    return agentstate.make_learner(
        "columnar",
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=seed,
        n_features=COLUMNS,
        init_scale=0.5,
    )


def random_stream(steps, seed=3):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(steps, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    cumulants = torch.rand(steps, STREAMS, 1, generator=generator, dtype=torch.float64)
    return inputs, cumulants


@pytest.mark.parametrize("independent", [False, True])
def test_heads_follow_linear_td_lambda_with_episode_boundaries(independent):
    """Frozen learner: the heads must do textbook linear TD(lambda), written out per stream."""
    gamma, lam, alpha, steps = 0.8, 0.7, 0.05, 40
    config = TDConfig(
        gamma=gamma,
        lambda_=lam,
        step_size=0.0,
        head_step_size=alpha,
        include_observation=True,
        train_learner=False,
        **PLAIN,
    )
    engine = TDPredictor(make_learner(independent=independent), 1, config)
    twin = make_learner(independent=independent)  # produces the same agent states
    inputs, cumulants = random_stream(steps)
    starts = {17: torch.tensor([True, False]), 29: torch.tensor([False, True])}
    terminal = {16: torch.tensor([0.0, 1.0]), 28: torch.tensor([1.0, 0.0])}

    n_features = COLUMNS + INPUTS + 1
    weight = torch.zeros(STREAMS, n_features, dtype=torch.float64)
    trace = torch.zeros_like(weight)
    previous = torch.zeros(STREAMS, dtype=torch.float64)
    fresh = [True] * STREAMS
    for t in range(steps):
        discount = terminal.get(t, torch.ones(STREAMS)).to(torch.float64) * gamma
        start = starts.get(t, torch.zeros(STREAMS, dtype=torch.bool))
        twin.reset(start)
        h = twin.step(inputs[t])
        features = torch.cat([h, inputs[t], torch.ones(STREAMS, 1, dtype=torch.float64)], 1)
        predictions = (features * weight).sum(1)
        updates = torch.zeros_like(weight)
        for b in range(STREAMS):
            if start[b]:
                trace[b] = 0
                fresh[b] = True
            if not fresh[b]:
                delta = cumulants[t, b, 0] + discount[b] * predictions[b] - previous[b]
                updates[b] = alpha * delta * trace[b]
            trace[b] = discount[b] * lam * trace[b] + features[b]
            fresh[b] = False
        weight += updates if independent else updates.mean(0, keepdim=True)
        previous = predictions

        got = engine.step(inputs[t], cumulants[t], discount=discount, episode_start=start)
        torch.testing.assert_close(got[:, 0], predictions, rtol=1e-12, atol=1e-12)
    assert weight.abs().max() > 0.01


def test_learner_traces_accumulate_exact_gradients():
    """trace_t = sum_s (gamma lambda)^(t-s) d(w_s . h_s)/d theta, with the BPTT oracle."""
    gamma, lam, steps = 0.9, 0.8, 12
    config = TDConfig(gamma=gamma, lambda_=lam, step_size=0.0, head_step_size=0.1, **PLAIN)
    learner = make_learner()
    params = {k: p.clone() for k, p in learner.params.items()}
    engine = TDPredictor(learner, 1, config)
    inputs, cumulants = random_stream(steps)
    expected = torch.zeros(STREAMS, *params["weight"].shape[1:], dtype=torch.float64)
    for t in range(steps):
        engine.step(inputs[t], cumulants[t])
        head_on_state = engine.head_weight[0, 0, :COLUMNS].expand(STREAMS, -1)
        gradient = bptt_gradient(learner, params, inputs[: t + 1], head_on_state)["weight"]
        expected = gamma * lam * expected + gradient
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(engine.learner_traces["weight"][0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(learner.params["weight"], params["weight"])  # step size 0


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_a_discount_per_head_gives_each_head_its_own_horizon(backend):
    """Discount [B, K]: trace_k = sum_s (gamma_k lambda)^(t-s) d(w_k,s . h_s)/d theta.

    A head with discount 0 keeps only this step's gradient: its TD error c_t+1 - y_t times
    d y_t / d theta is the supervised loss on h_t, with the learner's exact gradient.
    """
    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    head_gammas, lam, steps = torch.tensor([0.9, 0.0], dtype=torch.float64), 0.8, 12
    config = TDConfig(lambda_=lam, step_size=0.0, head_step_size=0.1, backend=backend, **PLAIN)
    learner = make_learner()
    params = {k: p.clone() for k, p in learner.params.items()}
    engine = TDPredictor(learner, 2, config)
    inputs, cumulants = random_stream(steps)
    cumulants = torch.cat([cumulants, 1 - cumulants], dim=2)
    discount = head_gammas.expand(STREAMS, 2)
    expected = torch.zeros(2, STREAMS, *params["weight"].shape[1:], dtype=torch.float64)
    head_trace = torch.zeros(STREAMS, 2, COLUMNS + 1, dtype=torch.float64)
    for t in range(steps):
        engine.step(inputs[t], cumulants[t], discount=discount)
        for k in range(2):
            head_on_state = engine.head_weight[0, k, :COLUMNS].expand(STREAMS, -1)
            gradient = bptt_gradient(learner, params, inputs[: t + 1], head_on_state)["weight"]
            expected[k] = head_gammas[k] * lam * expected[k] + gradient
        features = torch.cat([engine.agent_state, torch.ones(STREAMS, 1, dtype=torch.float64)], 1)
        head_trace = head_gammas.view(1, 2, 1) * lam * head_trace + features.unsqueeze(1)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(engine.learner_traces["weight"], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(engine.head_trace, head_trace, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_equal_discounts_per_head_are_the_discount_per_stream(backend):
    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    inputs, cumulants = random_stream(30)
    cumulants = torch.cat([cumulants, cumulants**2], dim=2)
    engines = [TDPredictor(make_learner(), 2, TDConfig(backend=backend)) for _ in range(2)]
    for t in range(30):
        per_stream = torch.tensor([0.9, 0.0 if t == 13 else 0.9], dtype=torch.float64)
        per_head = per_stream.unsqueeze(1).expand(-1, 2)
        expected = engines[0].step(inputs[t], cumulants[t], discount=per_stream)
        got = engines[1].step(inputs[t], cumulants[t], discount=per_head)
        assert torch.equal(got, expected)
    for key, trace in engines[0].learner_traces.items():
        assert torch.equal(engines[1].learner_traces[key], trace)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_each_step_returns_a_new_tensor_that_later_steps_leave_alone(backend):
    """The runner keeps a log interval's predictions and scores them together."""
    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    inputs, cumulants = random_stream(20)
    engine = TDPredictor(make_learner(), 1, TDConfig(backend=backend))
    kept, copies = [], []
    for t in range(20):
        prediction = engine.step(inputs[t], cumulants[t])
        kept.append(prediction)
        copies.append(prediction.clone())
    assert len({tensor.data_ptr() for tensor in kept}) == len(kept)
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(kept, copies, strict=True))
    assert not torch.equal(kept[0], kept[-1])  # the predictions did change


def test_a_discount_of_the_wrong_shape_is_refused_with_both_shapes_named():
    engine = TDPredictor(make_learner(), 2, TDConfig())
    x = torch.zeros(STREAMS, INPUTS, dtype=torch.float64)
    c = torch.zeros(STREAMS, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"discount must have shape \[2, 2\], got \[2, 3\]"):
        engine.step(x, c, discount=torch.zeros(STREAMS, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[2\] \(per stream\) or \[2, 2\]"):
        engine.step(x, c, discount=torch.zeros(STREAMS, 2, 1, dtype=torch.float64))


def test_sgd_update_moves_learner_params_by_mean_td_error_times_trace():
    config = TDConfig(step_size=0.5, head_step_size=0.0, **PLAIN)
    engine = TDPredictor(make_learner(), 1, config)
    inputs, cumulants = random_stream(3)
    engine.step(inputs[0], cumulants[0])
    engine.head_weight.fill_(0.3)  # a nonzero head so the next TD error is informative
    engine.step(inputs[1], cumulants[1])
    before = engine.learner.params["weight"].clone()
    trace = engine.learner_traces["weight"][0].clone()
    prediction_before = engine.previous_prediction.clone()
    prediction = engine.step(inputs[2], cumulants[2])
    delta = cumulants[2] + 0.9 * prediction - prediction_before
    expected = before + 0.5 * (delta.view(STREAMS, 1, 1, 1) * trace).mean(0, keepdim=True)
    torch.testing.assert_close(engine.learner.params["weight"], expected, rtol=1e-12, atol=1e-14)


def test_rmsprop_td_matches_the_authors_normaliser():
    from agentstate.optim import TDRMSProp

    param = torch.zeros(3, dtype=torch.float64)
    optimizer = TDRMSProp([param], lr=0.1)
    second_moment = torch.ones(3, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for update in ([1.0, -2.0, 0.5], [0.3, 0.0, -4.0]):
        update = torch.tensor(update, dtype=torch.float64)
        param.grad = -update
        optimizer.step()
        second_moment = 0.9999 * second_moment + 1e-4 * update**2
        expected = expected + 0.1 * update / (second_moment.sqrt() + 1e-8)
    torch.testing.assert_close(param, expected)


@pytest.mark.parametrize(
    ("optimizer", "head_step_size"), [("sgd", 0.05), ("rmsprop_td", 0.05), ("adam", 0.003)]
)
def test_every_optimizer_learns_a_constant_cumulant(optimizer, head_step_size):
    engine = TDPredictor(
        make_learner(),
        1,
        TDConfig(gamma=0.5, step_size=0.001, head_step_size=head_step_size, optimizer=optimizer),
    )
    x = torch.zeros(STREAMS, INPUTS, dtype=torch.float64)
    c = torch.ones(STREAMS, 1, dtype=torch.float64)
    for _ in range(3000):
        prediction = engine.step(x, c)
    torch.testing.assert_close(prediction, torch.full_like(prediction, 2.0), atol=0.05, rtol=0)


def test_bad_input_is_refused_with_a_clear_message():
    engine = TDPredictor(make_learner(), 1, TDConfig())
    x = torch.zeros(STREAMS, INPUTS, dtype=torch.float64)
    with pytest.raises(ValueError, match="cumulant must have shape"):
        engine.step(x, torch.zeros(STREAMS, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        engine.step(x.float(), torch.zeros(STREAMS, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        engine.step(x, torch.full((STREAMS, 1), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="optimizer"):
        TDConfig(optimizer="lbfgs")


def test_state_dict_round_trip_continues_identically():
    inputs, cumulants = random_stream(20)
    first = TDPredictor(make_learner(), 1, TDConfig())
    for t in range(10):
        first.step(inputs[t], cumulants[t])
    second = TDPredictor(make_learner(seed=5), 1, TDConfig())
    second.load_state_dict(first.state_dict())
    for t in range(10, 20):
        torch.testing.assert_close(
            second.step(inputs[t], cumulants[t]),
            first.step(inputs[t], cumulants[t]),
            rtol=0,
            atol=0,
        )


def test_engine_follows_a_constructive_learner_across_stages():
    learner = agentstate.make_learner(
        "ccn",
        INPUTS,
        streams=STREAMS,
        n_features=4,
        columns_per_stage=2,
        steps_per_stage=5,
        seed=0,
        dtype=torch.float64,
    )
    engine = TDPredictor(learner, 1, TDConfig(step_size=0.05))
    inputs, cumulants = random_stream(12)
    first_stage_params = learner.params["weight"]
    for t in range(12):
        engine.step(inputs[t], cumulants[t])
    assert learner.params["weight"] is not first_stage_params
    assert engine.learner_traces["weight"].shape[1:] == (
        STREAMS,
        *learner.params["weight"].shape[1:],
    )
    assert engine.optimizer.param_groups[1]["params"][0] is learner.params["weight"]


def test_episode_starts_reset_in_place_under_the_fused_kernel(monkeypatch):
    """Resetting replaces no tensor the kernel is bound to, so it is not bound again."""

    if fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    binds = []
    bind = fused.FusedTDStep._bind

    def counting_bind(self, engine, layout):
        binds.append(layout)
        bind(self, engine, layout)

    monkeypatch.setattr(fused.FusedTDStep, "_bind", counting_bind)
    learner = agentstate.make_learner("columnar", 3, streams=4, n_features=2, seed=0)
    predictor = TDPredictor(learner, 1, TDConfig(backend="fused"))
    carry = learner.carry
    start = torch.tensor([False, True, False, False])
    for _ in range(5):
        predictor.step(torch.ones(4, 3), torch.ones(4, 1), episode_start=start)
    assert len(binds) == 1
    assert all(part is before for part, before in zip(learner.carry, carry, strict=True))
    assert torch.count_nonzero(learner.sensitivity_h[1]) > 0  # one step since its reset


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_agent_state_is_what_the_heads_read(backend):

    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    learner = agentstate.make_learner("elstm", 3, streams=2, n_features=4, seed=0)
    twin = agentstate.make_learner("elstm", 3, streams=2, n_features=4, seed=0)
    settings = TDConfig(backend=backend, normalize_inputs=False, train_learner=False)
    predictor = TDPredictor(learner, 1, settings)
    if backend == "eager":
        with pytest.raises(RuntimeError, match="no step has been taken"):
            predictor.agent_state  # noqa: B018
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 3, generator=generator)
        predictor.step(x, torch.zeros(2, 1))
        torch.testing.assert_close(predictor.agent_state, twin.step(x))


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_head_predictions_are_what_the_next_step_predicts(backend):
    """``head_predictions`` of the state a step would reach equals that step's prediction
    (normalisers, heads and all), and neither learns nor moves the statistics."""

    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    learner = agentstate.make_learner("columnar", INPUTS, streams=STREAMS, seed=1, n_features=3)
    predictor = TDPredictor(learner, 2, TDConfig(backend=backend, include_observation=True))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(STREAMS, INPUTS, generator=generator)
        predictor.step(x, torch.rand(STREAMS, 2, generator=generator))
    x = torch.randn(STREAMS, INPUTS, generator=generator)
    before = {
        key: value.clone()
        for key, value in predictor.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    normalized = predictor.input_normalizer.normalize(x)
    _, state = learner.functional_step(learner.params, learner.carry, normalized)
    expected = predictor.head_predictions(state, x)
    for key, value in before.items():
        assert torch.equal(predictor.state_dict()[key], value), key
    torch.testing.assert_close(predictor.step(x, torch.zeros(STREAMS, 2)), expected)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_reading_the_agent_state_never_changes_the_learner(backend):
    """Not even right after a stage's last step, where the next step starts a new stage."""
    if backend == "fused" and fused.load_kernel(COLUMNS_KERNEL) is None:
        pytest.skip("no C++ compiler: the fused kernel cannot be built")
    learner = agentstate.make_learner(
        "ccn", INPUTS, streams=STREAMS, n_features=4, columns_per_stage=2, steps_per_stage=5
    )
    predictor = TDPredictor(learner, 1, TDConfig(backend=backend))
    inputs, cumulants = random_stream(6)
    for t in range(5):
        predictor.step(inputs[t].float(), cumulants[t].float())
    weight, state = learner.params["weight"], learner.state_dict()
    for _ in range(3):
        predictor.agent_state  # noqa: B018
        learner.fused_layout()
    assert (learner.active_stage, learner.steps_in_stage) == (0, 5)
    assert learner.params["weight"] is weight
    torch.testing.assert_close(learner.state_dict()["params"], state["params"])
    predictor.step(inputs[5].float(), cumulants[5].float())
    assert (learner.active_stage, learner.steps_in_stage) == (1, 1)
