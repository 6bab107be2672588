"""Exact learners' ``grad`` against a second oracle: RTRL with full autograd Jacobians.

The BPTT oracle differentiates the unrolled sequence backwards; this one carries the whole
``d state / d parameters`` forward, so a learner's hand-derived sensitivity recursion is
checked against both directions of the chain rule, at every step of a sequence with resets.
"""

import exactness
import pytest
import torch
from exactness import RESETS
from oracle import FullJacobianRTRL

SMALL_EXACT_LEARNERS = {
    "columnar": {"n_features": 4, "init_scale": 0.8},
    "elstm": {"n_features": 4, "init_std": 0.8},
    "rtrl": {"n_features": 3, "init_scale": 0.8},
    "rtu": {"n_features": 4},
}
"""Exact learner -> options: a few units, weights large enough to leave the linear regime."""
STEPS = 20


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("name", sorted(SMALL_EXACT_LEARNERS))
def test_grad_equals_full_jacobian_rtrl_at_every_step(name, independent):
    learner = exactness.make_float64_learner(name, independent, **SMALL_EXACT_LEARNERS[name])
    oracle = FullJacobianRTRL(
        learner, {key: value.clone() for key, value in learner.params.items()}
    )
    generator = torch.Generator().manual_seed(3)
    shape = (STEPS, learner.streams, learner.input_size)
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64)
    for t, x in enumerate(inputs):
        if t in RESETS:
            learner.reset(RESETS[t])
            oracle.reset(RESETS[t])
        torch.testing.assert_close(learner.step(x), oracle.step(x), rtol=1e-12, atol=1e-12)
        v = torch.randn(
            learner.streams, learner.n_features, generator=generator, dtype=torch.float64
        )
        truth, estimate = oracle.grad(v), learner.grad(v)
        assert estimate.keys() == truth.keys()
        for key in truth:
            torch.testing.assert_close(estimate[key], truth[key], rtol=1e-9, atol=1e-12)
    assert max(truth[key].abs().max() for key in truth) > 1e-3  # a non-trivial gradient
