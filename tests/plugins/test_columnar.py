"""The columnar learner: exact RTRL checked against autograd BPTT (the oracle)."""

import pytest
import torch
from oracle import bptt_gradient, relative_error

import agentstate

STREAMS, INPUTS, COLUMNS, STEPS = 3, 5, 4, 25


def make(independent: bool, **kwargs):
    return agentstate.make_learner(
        "columnar",
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=1,
        n_features=COLUMNS,
        init_scale=0.8,
        **kwargs,
    )


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_grad_equals_bptt_through_the_whole_sequence(independent, with_resets):
    learner = make(independent)
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(STEPS, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    resets = (
        {6: torch.tensor([True, False, False]), 15: torch.tensor([False, True, True])}
        if with_resets
        else {}
    )
    params = {k: p.clone() for k, p in learner.params.items()}
    for t in range(STEPS):
        if t in resets:
            learner.reset(resets[t])
        learner.step(inputs[t])
        if t % 4 == 3 or t == STEPS - 1:
            v = torch.randn(STREAMS, COLUMNS, generator=generator, dtype=torch.float64)
            truth = bptt_gradient(learner, params, inputs[: t + 1], v, resets)
            estimate = learner.grad(v)
            assert estimate.keys() == truth.keys()
            for key in truth:
                assert estimate[key].shape == (STREAMS, *params[key].shape[1:])
                assert truth[key].abs().max() > 1e-3  # a non-trivial gradient
                assert relative_error(estimate[key], truth[key]) <= 1e-9


def test_functional_step_computes_the_same_state_as_step():
    learner = make(independent=True)
    inputs = torch.randn(10, STREAMS, INPUTS, dtype=torch.float64)
    carry = learner.initial_carry()
    for x in inputs:
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        h = learner.step(x)
        torch.testing.assert_close(h, h_functional, rtol=0, atol=0)


def test_shared_params_have_one_copy_independent_params_one_per_stream():
    shared, independent = make(False), make(True)
    assert shared.params["weight"].shape == (1, COLUMNS, 4, INPUTS + 2)
    assert independent.params["weight"].shape == (STREAMS, COLUMNS, 4, INPUTS + 2)
    weights = independent.params["weight"]
    assert not torch.equal(weights[0], weights[1])
    assert all(p.is_leaf for p in shared.params.values())


def test_reset_zeroes_only_the_masked_streams():
    learner = make(False)
    learner.step(torch.ones(STREAMS, INPUTS, dtype=torch.float64))
    learner.reset(torch.tensor([False, True, False]))
    h, c = learner.carry
    assert torch.all(h[1] == 0) and torch.all(c[1] == 0)
    assert torch.all(h[0] != 0) and torch.all(h[2] != 0)
    grads = learner.grad(torch.ones(STREAMS, COLUMNS, dtype=torch.float64))["weight"]
    assert torch.all(grads[1] == 0) and grads[0].abs().sum() > 0


def test_seed_makes_initialisation_reproducible():
    a, b = make(True), make(True)
    assert torch.equal(a.params["weight"], b.params["weight"])


def test_state_dict_round_trip_continues_identically():
    learner = make(False)
    inputs = torch.randn(8, STREAMS, INPUTS, dtype=torch.float64)
    for x in inputs[:4]:
        learner.step(x)
    saved = learner.state_dict()
    clone = make(False)
    clone.load_state_dict(saved)
    for x in inputs[4:]:
        torch.testing.assert_close(clone.step(x), learner.step(x), rtol=0, atol=0)
    v = torch.ones(STREAMS, COLUMNS, dtype=torch.float64)
    torch.testing.assert_close(clone.grad(v)["weight"], learner.grad(v)["weight"], rtol=0, atol=0)


def test_state_dict_of_another_shape_is_refused():
    saved = make(False).state_dict()
    other = agentstate.make_learner("columnar", INPUTS, streams=STREAMS, n_features=COLUMNS + 1)
    with pytest.raises(ValueError, match="n_features"):
        other.load_state_dict(saved)


def test_float32_runs_and_stays_float32():
    learner = agentstate.make_learner("columnar", INPUTS, streams=2, seed=0)
    h = learner.step(torch.randn(2, INPUTS))
    assert h.dtype == torch.float32
    assert learner.grad(torch.ones(2, 7))["weight"].dtype == torch.float32
