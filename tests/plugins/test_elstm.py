"""The eLSTM learner: exact element-wise RTRL checked against autograd BPTT (the oracle)."""

import pytest
import torch
from oracle import bptt_gradient, relative_error

import agentstate

STREAMS, INPUTS, CELLS, STEPS = 3, 5, 4, 25
PARAM_SHAPES = {
    "gate_input_weight": (2, CELLS, INPUTS),
    "gate_cell_weight": (2, CELLS),
    "gate_bias": (2, CELLS),
    "output_weight": (CELLS, INPUTS + CELLS),
    "output_bias": (CELLS,),
}


def make(independent: bool, **kwargs):
    return agentstate.make_learner(
        "elstm",
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=1,
        n_features=CELLS,
        init_std=0.8,
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
            v = torch.randn(STREAMS, CELLS, generator=generator, dtype=torch.float64)
            truth = bptt_gradient(learner, params, inputs[: t + 1], v, resets)
            estimate = learner.grad(v)
            assert estimate.keys() == truth.keys() == PARAM_SHAPES.keys()
            for key in truth:
                assert estimate[key].shape == (STREAMS, *PARAM_SHAPES[key])
                assert truth[key].abs().max() > 1e-3  # a non-trivial gradient
                assert relative_error(estimate[key], truth[key]) <= 1e-9, key


def test_grad_right_after_a_reset_is_zero_for_the_reset_streams():
    learner = make(False)
    for x in torch.randn(2, STREAMS, INPUTS, dtype=torch.float64):
        learner.step(x)
    learner.reset(torch.tensor([False, True, False]))
    grads = learner.grad(torch.ones(STREAMS, CELLS, dtype=torch.float64))
    for key, grad in grads.items():
        assert torch.all(grad[1] == 0), key
        assert grad[0].abs().sum() > 0, key
    (c,) = learner.carry
    assert torch.all(c[1] == 0) and torch.all(c[0] != 0)


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
    for key, shape in PARAM_SHAPES.items():
        assert shared.params[key].shape == (1, *shape)
        assert independent.params[key].shape == (STREAMS, *shape)
        assert shared.params[key].is_leaf
    weights = independent.params["gate_input_weight"]
    assert not torch.equal(weights[0], weights[1])


def test_seed_makes_initialisation_reproducible():
    a, b = make(True), make(True)
    for key in PARAM_SHAPES:
        assert torch.equal(a.params[key], b.params[key])


def test_state_dict_round_trip_continues_identically():
    learner = make(False)
    inputs = torch.randn(8, STREAMS, INPUTS, dtype=torch.float64)
    for x in inputs[:4]:
        learner.step(x)
    clone = make(False)
    clone.load_state_dict(learner.state_dict())
    v = torch.randn(STREAMS, CELLS, dtype=torch.float64)
    for key, grad in learner.grad(v).items():
        torch.testing.assert_close(clone.grad(v)[key], grad, rtol=0, atol=0)
    for x in inputs[4:]:
        torch.testing.assert_close(clone.step(x), learner.step(x), rtol=0, atol=0)
    for key, grad in learner.grad(v).items():
        torch.testing.assert_close(clone.grad(v)[key], grad, rtol=0, atol=0)


def test_state_dict_of_another_shape_is_refused():
    saved = make(False).state_dict()
    other = agentstate.make_learner(
        "elstm", INPUTS, streams=STREAMS, dtype=torch.float64, n_features=CELLS + 1
    )
    with pytest.raises(ValueError, match="n_features"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_features": 2.5}, "n_features"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, named):
    with pytest.raises(ValueError, match=named):
        agentstate.make_learner("elstm", INPUTS, **kwargs)


def test_float32_runs_and_stays_float32():
    learner = agentstate.make_learner("elstm", INPUTS, streams=2, seed=0)
    h = learner.step(torch.randn(2, INPUTS))
    assert h.dtype == torch.float32 and h.shape == (2, 16)
    grads = learner.grad(torch.ones(2, 16))
    assert all(grad.dtype == torch.float32 for grad in grads.values())
