"""What tbptt, uoro, rtrl and snap1 share: one dense LSTM cell and the StateLearner contract."""

import pytest
import torch

import agentstate
from agentstate.registry import get_registry

NAMES = ["tbptt", "uoro", "rtrl", "snap1"]
STREAMS, INPUTS, UNITS = 3, 4, 5


def make(name, independent=False, seed=1, dtype=torch.float64, **kwargs):
    return agentstate.make_learner(
        name,
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=dtype,
        seed=seed,
        n_features=UNITS,
        **kwargs,
    )


def random_inputs(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(steps, STREAMS, INPUTS, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("independent", [False, True], ids=["shared", "independent"])
def test_same_seed_gives_the_same_network_in_every_dense_learner(independent):
    weights = [make(name, independent).params["weight"] for name in NAMES]
    leading = STREAMS if independent else 1
    assert weights[0].shape == (leading, 4, UNITS, INPUTS + UNITS + 1)
    assert all(weight.is_leaf for weight in weights)
    for weight in weights[1:]:
        assert torch.equal(weight, weights[0])


def test_copied_params_give_identical_state_sequences():
    source = make("rtrl", True, seed=5)
    learners = [make(name, True, seed=9) for name in NAMES]
    inputs = random_inputs(8)
    for learner in learners:
        learner.params["weight"].copy_(source.params["weight"])
    for x in inputs:
        h = source.step(x)
        for learner in learners:
            torch.testing.assert_close(learner.step(x), h, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "kwargs"), [(name, {}) for name in NAMES] + [("snap1", {"connection_density": 0.5})]
)
def test_functional_step_computes_the_same_state_as_step(name, kwargs):
    learner = make(name, True, **kwargs)
    # Dense weights: for a sparse snap1 the masked-out entries are non-zero too.
    learner.params["weight"].copy_(make("rtrl", True, seed=3).params["weight"])
    carry = learner.initial_carry()
    for x in random_inputs(6):
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        torch.testing.assert_close(learner.step(x), h_functional, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "kwargs"), [(name, {}) for name in NAMES] + [("snap1", {"connection_density": 0.5})]
)
def test_state_dict_round_trip_continues_identically(name, kwargs):
    learner = make(name, **kwargs)
    inputs = random_inputs(8)
    for x in inputs[:4]:
        learner.step(x)
    clone = make(name, seed=None, **kwargs)  # another network, mask and noise until loaded
    clone.load_state_dict(learner.state_dict())
    v = torch.ones(STREAMS, UNITS, dtype=torch.float64)
    for x in inputs[4:]:
        torch.testing.assert_close(clone.step(x), learner.step(x), rtol=0, atol=0)
        torch.testing.assert_close(
            clone.grad(v)["weight"], learner.grad(v)["weight"], rtol=0, atol=0
        )


@pytest.mark.parametrize("name", NAMES)
def test_reset_zeroes_only_the_masked_streams(name):
    learner = make(name)
    for x in random_inputs(3):
        learner.step(x)
    learner.reset(torch.tensor([False, True, False]))
    h, c = learner.carry
    assert torch.all(h[1] == 0) and torch.all(c[1] == 0)
    assert torch.all(h[0] != 0) and torch.all(h[2] != 0)
    v = torch.ones(STREAMS, UNITS, dtype=torch.float64)
    grads = learner.grad(v)["weight"]
    assert torch.all(grads[1] == 0)
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    # The reset stream continues like a fresh one (UORO's estimate is random, so only h).
    fresh = make(name)
    x = random_inputs(1, seed=4)[0]
    torch.testing.assert_close(learner.step(x)[1], fresh.step(x)[1], rtol=0, atol=0)
    if name != "uoro":
        torch.testing.assert_close(
            learner.grad(v)["weight"][1], fresh.grad(v)["weight"][1], rtol=0, atol=0
        )


@pytest.mark.parametrize("name", NAMES)
def test_float32_runs_and_stays_float32_with_paper_defaults(name):
    learner = agentstate.make_learner(name, 12, streams=2, seed=0)
    assert learner.n_features == 15
    h = learner.step(torch.randn(2, 12))
    assert h.dtype == torch.float32 and h.shape == (2, 15)
    grad = learner.grad(torch.ones(2, 15))["weight"]
    assert grad.dtype == torch.float32 and grad.shape == (2, 4, 15, 12 + 15 + 1)


def test_exactness_is_declared_consistently():
    registry = get_registry()
    for name in NAMES:
        spec = registry.spec(name)
        assert spec.exact == spec.learner_class.exact == (name == "rtrl")
    assert agentstate.make_learner("tbptt", 3).config.truncation == 4


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("rtrl", {"n_features": 0}),
        ("rtrl", {"init_scale": -1.0}),
        ("tbptt", {"truncation": 0}),
        ("tbptt", {"truncation": 2.5}),
        ("uoro", {"epsilon": 0.0}),
        ("snap1", {"connection_density": 1.5}),
        ("snap1", {"connection_density": -0.1}),
    ],
)
def test_invalid_hyper_parameters_are_refused(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        agentstate.make_learner(name, 3, **kwargs)
