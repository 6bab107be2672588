"""Autograd BPTT through a learner's pure ``functional_step``: the oracle for ``grad``."""

from __future__ import annotations

import torch
from torch import Tensor

from agentstate.learner import StateLearner


def bptt_gradient(
    learner: StateLearner,
    params: dict[str, Tensor],
    inputs: Tensor,
    v: Tensor,
    resets: dict[int, Tensor] | None = None,
    window: int | None = None,
) -> dict[str, Tensor]:
    """Per-stream gradient of ``v_b . h_b,T`` by backpropagation through the whole sequence.

    Args:
        learner: provides ``initial_carry`` and ``functional_step`` (no state is touched).
        params: parameter values ``[1 or B, ...]`` used at every step.
        inputs: ``[T, B, input_size]``.
        v: ``[B, n_features]``.
        resets: step index -> ``[B]`` bool mask of streams whose carry is zeroed before
            that step.
        window: if given, only the last ``window`` steps carry gradient (truncated BPTT):
            the carry entering step ``T - window`` is detached.

    Returns:
        Same keys as ``params``, each ``[B, ...]``.
    """
    streams = inputs.shape[1]
    per_stream = {
        key: value.detach().expand(streams, *value.shape[1:]).clone().requires_grad_(True)
        for key, value in params.items()
    }
    carry = learner.initial_carry()
    resets = resets or {}
    n_steps = inputs.shape[0]
    h = None
    for t in range(n_steps):
        if window is not None and t == n_steps - window:
            carry = tuple(part.detach() for part in carry)
        if t in resets:
            mask = resets[t]
            carry = tuple(
                part.masked_fill(mask.view(-1, *([1] * (part.dim() - 1))), 0.0) for part in carry
            )
        if window is not None and t < n_steps - window:
            with torch.no_grad():
                carry, h = learner.functional_step(
                    {k: p.detach() for k, p in per_stream.items()}, carry, inputs[t]
                )
        else:
            carry, h = learner.functional_step(per_stream, carry, inputs[t])
    assert h is not None
    gradients = torch.autograd.grad((v * h).sum(), list(per_stream.values()), allow_unused=True)
    return {
        key: torch.zeros_like(value) if gradient is None else gradient
        for (key, value), gradient in zip(per_stream.items(), gradients, strict=True)
    }


def relative_error(estimate: Tensor, truth: Tensor) -> float:
    """``max_b |estimate_b - truth_b| / |truth_b|`` over streams (Frobenius norms)."""
    streams = truth.shape[0]
    difference = (estimate - truth).reshape(streams, -1).norm(dim=1)
    scale = truth.reshape(streams, -1).norm(dim=1).clamp_min(1e-300)
    return float((difference / scale).max())
