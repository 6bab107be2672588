"""UORO's gradient estimate is unbiased: its mean over independent draws approaches BPTT."""

import torch
from oracle import bptt_gradient, relative_error

import agentstate

INPUTS, UNITS, STEPS = 2, 3, 6


def final_estimates(streams, noise_seed, inputs, v, weight):
    """Per-stream UORO estimates after ``inputs``; every stream sees the same network and data.

    With shared parameters and identical inputs, the streams differ only in their random signs,
    so they are ``streams`` independent draws of the estimator.
    """
    learner = agentstate.make_learner(
        "uoro", INPUTS, streams=streams, dtype=torch.float64, seed=noise_seed, n_features=UNITS
    )
    learner.params["weight"].copy_(weight)
    for x in inputs:
        learner.step(x.expand(streams, INPUTS))
    return learner.grad(v.expand(streams, UNITS))["weight"]


def test_mean_of_independent_estimates_converges_to_bptt_like_one_over_sqrt_n():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(STEPS, 1, INPUTS, generator=generator, dtype=torch.float64)
    v = torch.randn(1, UNITS, generator=generator, dtype=torch.float64)
    reference = agentstate.make_learner(
        "uoro", INPUTS, dtype=torch.float64, seed=0, n_features=UNITS, init_scale=0.8
    )
    weight = reference.params["weight"]
    truth = bptt_gradient(reference, {"weight": weight}, inputs, v)["weight"]
    assert truth.abs().max() > 1e-2

    few = final_estimates(256, 100, inputs, v, weight)
    many = final_estimates(4096, 200, inputs, v, weight)
    # Each estimate is far from the truth: the test below is about averaging out real noise.
    assert relative_error(few[:1], truth) > 0.5

    # Statistical bound. For N i.i.d. unbiased estimates g_b of g with per-estimate variance
    # sigma^2 = E|g_b - g|^2, the mean satisfies E|mean - g|^2 = sigma^2 / N. sigma^2 is
    # estimated from the 256 independent draws (the truth is known). By the CLT the squared
    # error is a weighted sum of chi^2_1 variables with total weight sigma^2 / N, so
    # P(|mean - g| > 4 sigma / sqrt(N)) <= P(chi^2_1 > 16) ~ 6e-5 (Markov alone gives 1/16).
    # A biased estimator would instead plateau at its bias as N grows.
    per_estimate_variance = float(((few - truth) ** 2).flatten(1).sum(1).mean())
    bound = 4 * (per_estimate_variance / 4096) ** 0.5 / float(truth.norm())
    error_few = relative_error(few.mean(0, keepdim=True), truth)
    error_many = relative_error(many.mean(0, keepdim=True), truth)
    assert error_many <= bound
    assert error_many < error_few / 2  # 1/sqrt(16) = 1/4 expected
