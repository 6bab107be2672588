"""The columnar learner: exact RTRL checked against autograd BPTT (the oracle)."""

import exactness
import pytest
import torch
from exactness import INPUTS, STREAMS

import agentstate

COLUMNS = 4
PARAM_SHAPES = {"weight": (COLUMNS, 4, INPUTS + 2)}


def make(independent: bool, **kwargs):
    return exactness.make_float64_learner(
        "columnar", independent, n_features=COLUMNS, init_scale=0.8, **kwargs
    )


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_grad_equals_bptt_through_the_whole_sequence(independent, with_resets):
    exactness.assert_grad_equals_bptt(make(independent), PARAM_SHAPES, with_resets=with_resets)


def test_functional_step_computes_the_same_state_as_step():
    exactness.assert_functional_step_computes_the_same_state_as_step(make(independent=True))


def test_shared_params_have_one_copy_independent_params_one_per_stream():
    shared, independent = make(False), make(True)
    assert shared.params["weight"].shape == (1, *PARAM_SHAPES["weight"])
    assert independent.params["weight"].shape == (STREAMS, *PARAM_SHAPES["weight"])
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
    exactness.assert_state_dict_round_trip_continues_identically(make(False), make(False))


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
