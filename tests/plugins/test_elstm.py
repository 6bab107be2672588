"""The eLSTM learner: exact element-wise RTRL checked against autograd BPTT (the oracle)."""

import exactness
import pytest
import torch
from exactness import INPUTS, STREAMS

import agentstate

CELLS = 4
PARAM_SHAPES = {
    "gate_input_weight": (2, CELLS, INPUTS),
    "gate_cell_weight": (2, CELLS),
    "gate_bias": (2, CELLS),
    "output_weight": (CELLS, INPUTS + CELLS),
    "output_bias": (CELLS,),
}


def make(independent: bool, **kwargs):
    return exactness.make_float64_learner(
        "elstm", independent, n_features=CELLS, init_std=0.8, **kwargs
    )


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_grad_equals_bptt_through_the_whole_sequence(independent, with_resets):
    exactness.assert_grad_equals_bptt(make(independent), PARAM_SHAPES, with_resets=with_resets)


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
    exactness.assert_functional_step_computes_the_same_state_as_step(make(independent=True))


def test_shared_params_have_one_copy_independent_params_one_per_stream():
    exactness.assert_parameters_shared_or_one_per_stream(
        make(False), make(True), PARAM_SHAPES, "gate_input_weight"
    )


def test_seed_makes_initialisation_reproducible():
    exactness.assert_seed_reproduces_the_initialisation(make(True), make(True))


def test_state_dict_round_trip_continues_identically():
    exactness.assert_state_dict_round_trip_continues_identically(make(False), make(False))


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
