"""Checks every exact learner passes: ``grad`` equals the BPTT oracle, state is complete.

Each check steps a learner from :func:`make_float64_learner` (or any float64 learner) and
asserts; the learner's ``streams``, ``input_size`` and ``n_features`` give the shapes of the
random inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from oracle import bptt_gradient, relative_error
from torch import Tensor

import agentstate
from agentstate.learner import StateLearner

STREAMS, INPUTS = 3, 5
RESETS = {6: torch.tensor([True, False, False]), 15: torch.tensor([False, True, True])}
"""Step -> ``[STREAMS]`` mask of the streams reset before that step."""


def make_float64_learner(name: str, independent: bool, **kwargs: Any) -> StateLearner:
    """The registered learner ``name`` in float64 and seeded, ``STREAMS`` x ``INPUTS``."""
    return agentstate.make_learner(
        name,
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=1,
        **kwargs,
    )


def assert_grad_equals_bptt(
    learner: StateLearner,
    param_shapes: dict[str, tuple[int, ...]],
    *,
    with_resets: bool,
    steps: int = 25,
) -> None:
    """``grad(v)`` equals BPTT through the whole sequence, every 4 steps and at the end.

    Args:
        learner: a fresh float64 learner of ``STREAMS`` streams.
        param_shapes: parameter name -> shape of one stream's copy; ``grad`` must return
            exactly these keys, each ``[streams, *shape]``.
        with_resets: reset streams before the steps of ``RESETS``.
        steps: length of the sequence.
    """
    streams, n_features = learner.streams, learner.n_features
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(
        steps, streams, learner.input_size, generator=generator, dtype=torch.float64
    )
    resets = RESETS if with_resets else {}
    params = {key: param.clone() for key, param in learner.params.items()}
    for t in range(steps):
        if t in resets:
            learner.reset(resets[t])
        learner.step(inputs[t])
        if t % 4 == 3 or t == steps - 1:
            v = torch.randn(streams, n_features, generator=generator, dtype=torch.float64)
            truth = bptt_gradient(learner, params, inputs[: t + 1], v, resets)
            estimate = learner.grad(v)
            assert estimate.keys() == truth.keys() == param_shapes.keys()
            for key in truth:
                assert estimate[key].shape == (streams, *param_shapes[key])
                assert truth[key].abs().max() > 1e-3, key  # a non-trivial gradient
                assert relative_error(estimate[key], truth[key]) <= 1e-9, key


def assert_functional_step_computes_the_same_state_as_step(
    learner: StateLearner, steps: int = 10
) -> None:
    """The pure ``functional_step`` and the stateful ``step`` give identical features."""
    inputs = torch.randn(steps, learner.streams, learner.input_size, dtype=torch.float64)
    carry = learner.initial_carry()
    for x in inputs:
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        h = learner.step(x)
        torch.testing.assert_close(h, h_functional, rtol=0, atol=0)


def assert_state_dict_round_trip_continues_identically(
    learner: StateLearner, clone: StateLearner, steps: int = 8
) -> None:
    """A ``clone`` loaded mid-stream from ``learner.state_dict()`` continues bit for bit.

    Args:
        learner: a fresh float64 learner.
        clone: a fresh learner of the same settings; it loads ``learner``'s state after
            ``steps // 2`` steps, then both take the remaining steps.
        steps: length of the sequence.
    """
    inputs = torch.randn(steps, learner.streams, learner.input_size, dtype=torch.float64)
    for x in inputs[: steps // 2]:
        learner.step(x)
    clone.load_state_dict(learner.state_dict())
    v = torch.randn(learner.streams, learner.n_features, dtype=torch.float64)
    _assert_same_gradients(clone, learner, v)
    for x in inputs[steps // 2 :]:
        torch.testing.assert_close(clone.step(x), learner.step(x), rtol=0, atol=0)
    _assert_same_gradients(clone, learner, v)


def _assert_same_gradients(clone: StateLearner, learner: StateLearner, v: Tensor) -> None:
    expected = learner.grad(v)
    actual = clone.grad(v)
    assert actual.keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(actual[key], grad, rtol=0, atol=0)


def assert_parameters_shared_or_one_per_stream(
    shared: StateLearner, independent: StateLearner, shapes: dict[str, tuple[int, ...]], key: str
) -> None:
    """Shared parameters have one copy ``[1, ...]``, independent ones one per stream, drawn
    apart (``key``: a parameter whose streams must differ)."""
    streams = independent.streams
    for name, shape in shapes.items():
        assert shared.params[name].shape == (1, *shape)
        assert independent.params[name].shape == (streams, *shape)
        assert shared.params[name].is_leaf
    weights = independent.params[key]
    assert not torch.equal(weights[0], weights[1])


def assert_seed_reproduces_the_initialisation(first: StateLearner, second: StateLearner) -> None:
    """Two learners built with one seed start with equal parameters."""
    assert first.params.keys() == second.params.keys()
    for name, param in first.params.items():
        assert torch.equal(param, second.params[name])
