"""Dense-LSTM rules against autograd BPTT (the oracle): rtrl, tbptt and snap1."""

import pytest
import torch
from oracle import bptt_gradient, relative_error

import agentstate

STREAMS, INPUTS, UNITS, STEPS = 3, 4, 5, 12
RESETS = {5: torch.tensor([True, False, False]), 9: torch.tensor([False, True, True])}


def make(name, independent, **kwargs):
    return agentstate.make_learner(
        name,
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=1,
        n_features=UNITS,
        **kwargs,
    )


def run_against_oracle(learner, window=None):
    """Step through a sequence with per-stream resets; yield (estimate, truth) at every step."""
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(STEPS, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    params = {key: value.clone() for key, value in learner.params.items()}
    for t in range(STEPS):
        if t in RESETS:
            learner.reset(RESETS[t])
        learner.step(inputs[t])
        v = torch.randn(STREAMS, UNITS, generator=generator, dtype=torch.float64)
        truth = bptt_gradient(learner, params, inputs[: t + 1], v, RESETS, window)["weight"]
        estimate = learner.grad(v)["weight"]
        assert estimate.shape == truth.shape == (STREAMS, *params["weight"].shape[1:])
        yield estimate, truth


@pytest.mark.parametrize("independent", [False, True], ids=["shared", "independent"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("rtrl", {}),
        ("tbptt", {"truncation": STEPS}),
        ("snap1", {"connection_density": 0.0}),
    ],
    ids=["rtrl", "tbptt-window-covers-sequence", "snap1-no-connections"],
)
def test_exact_rules_equal_full_bptt_with_resets(name, kwargs, independent):
    for estimate, truth in run_against_oracle(make(name, independent, **kwargs)):
        assert truth.abs().max() > 1e-3  # a non-trivial gradient
        assert relative_error(estimate, truth) <= 1e-9


@pytest.mark.parametrize("independent", [False, True], ids=["shared", "independent"])
def test_tbptt_equals_bptt_truncated_to_its_window(independent):
    window = 3
    learner = make("tbptt", independent, truncation=window)
    for estimate, truth in run_against_oracle(learner, window=window):
        assert relative_error(estimate, truth) <= 1e-9
    # ... and the truncation is real: the full gradient differs at the last step.
    v = torch.ones(STREAMS, UNITS, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(STEPS, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    learner = make("tbptt", independent, truncation=window)
    for x in inputs:
        learner.step(x)
    full = bptt_gradient(learner, learner.params, inputs, v)["weight"]
    assert relative_error(learner.grad(v)["weight"], full) > 1e-4


@pytest.mark.parametrize("independent", [False, True], ids=["shared", "independent"])
def test_snap1_on_a_dense_network_is_an_approximation(independent):
    cosines = [
        float(torch.nn.functional.cosine_similarity(estimate.flatten(1), truth.flatten(1)).min())
        for estimate, truth in run_against_oracle(make("snap1", independent))
    ]
    assert min(cosines) < 0.9999


def test_snap1_sparse_mask_is_part_of_the_network():
    learner = make("snap1", False, connection_density=0.5)
    recurrent_mask = learner.weight_mask[0, 0, :, INPUTS : INPUTS + UNITS]
    assert torch.all(recurrent_mask.diagonal() == 1)
    assert 0 < int((recurrent_mask == 0).sum()) < UNITS * (UNITS - 1)
    masked_out = (learner.weight_mask == 0).expand_as(learner.params["weight"])
    assert torch.all(learner.params["weight"][masked_out] == 0)
    # Dense weights copied in (masked entries non-zero) still run the masked network.
    learner.params["weight"].copy_(make("rtrl", False).params["weight"])
    for estimate, truth in run_against_oracle(learner):
        # The oracle differentiates functional_step, which applies the mask too.
        assert torch.all(truth.expand_as(estimate)[masked_out.expand_as(estimate)] == 0)
        assert torch.all(estimate[masked_out.expand_as(estimate)] == 0)
