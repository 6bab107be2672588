"""Oracles for ``grad`` through a learner's pure ``functional_step``: autograd BPTT, full RTRL."""

from __future__ import annotations

import math

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


class FullJacobianRTRL:
    """Exact RTRL the obvious way: full autograd Jacobians of ``functional_step`` every step.

    Per stream, with the carry flattened to one state vector ``s`` and the parameters to one
    vector ``theta``, the sensitivity ``S_t = ds_t/dtheta`` and the output's gradient are::

        S_t          = (ds_t / ds_t-1) S_t-1 + ds_t / dtheta
        dh_t/dtheta  = (dh_t / ds_t-1) S_t-1 + dh_t / dtheta

    where the Jacobians on the right are those of one step at fixed ``(s_t-1, theta)``, from
    ``torch.func.jacrev`` of the learner's pure cell; nothing of the learner's own credit
    assignment is used. Forward mode, so independent of the BPTT oracle; memory
    ``[B, state, parameters]``, so only for learners whose parameters and carry are small.

    Args:
        learner: provides ``initial_carry`` and ``functional_step`` (no state is touched).
        params: parameter values ``[1 or B, ...]`` used at every step.
    """

    def __init__(self, learner: StateLearner, params: dict[str, Tensor]) -> None:
        self.learner = learner
        streams = learner.streams
        self.params = {
            key: value.detach().expand(streams, *value.shape[1:]) for key, value in params.items()
        }
        self.carry = tuple(part.detach().clone() for part in learner.initial_carry())
        n_params = sum(value[0].numel() for value in self.params.values())
        n_state = sum(part[0].numel() for part in self.carry)
        like = self.carry[0]
        self.sensitivity = like.new_zeros(streams, n_state, n_params)
        self.output_sensitivity = like.new_zeros(streams, learner.n_features, n_params)

    def step(self, x: Tensor) -> Tensor:
        """Advance every stream by one step.

        Args:
            x: ``[B, input_size]``.

        Returns:
            ``h: [B, n_features]``.
        """
        carry_shapes = [part.shape[1:] for part in self.carry]
        param_shapes = [value.shape[1:] for value in self.params.values()]
        next_carries, outputs = [], []
        for stream in range(x.shape[0]):

            def stream_step(
                state: Tensor, theta: Tensor, stream: int = stream
            ) -> tuple[tuple[Tensor, Tensor], tuple[tuple[Tensor, ...], Tensor]]:
                carry = tuple(unflatten(state, carry_shapes))
                params = dict(zip(self.params, unflatten(theta, param_shapes), strict=True))
                next_carry, h = self.learner.functional_step(params, carry, x[stream : stream + 1])
                next_state = torch.cat([part.reshape(-1) for part in next_carry])
                return (next_state, h.reshape(-1)), (next_carry, h)

            state = torch.cat([part[stream].reshape(-1) for part in self.carry])
            theta = torch.cat([value[stream].reshape(-1) for value in self.params.values()])
            jacobians, (next_carry, h) = torch.func.jacrev(
                stream_step, argnums=(0, 1), has_aux=True
            )(state, theta)
            (ds_dstate, ds_dtheta), (dh_dstate, dh_dtheta) = jacobians
            previous = self.sensitivity[stream]
            self.output_sensitivity[stream] = dh_dstate @ previous + dh_dtheta
            self.sensitivity[stream] = ds_dstate @ previous + ds_dtheta
            next_carries.append(next_carry)
            outputs.append(h)
        self.carry = tuple(torch.cat(parts) for parts in zip(*next_carries, strict=True))
        return torch.cat(outputs)

    def reset(self, mask: Tensor) -> None:
        """Zero the carry and the sensitivities of the streams in ``mask: [B]`` (bool)."""
        self.carry = tuple(
            part.masked_fill(mask.view(-1, *([1] * (part.dim() - 1))), 0.0) for part in self.carry
        )
        self.sensitivity[mask] = 0.0
        self.output_sensitivity[mask] = 0.0

    def grad(self, v: Tensor) -> dict[str, Tensor]:
        """Per-stream gradient of ``v_b . h_b,t`` for ``v: [B, n_features]``; keys as ``params``."""
        flat = torch.einsum("bn,bnp->bp", v, self.output_sensitivity)
        sizes = [value[0].numel() for value in self.params.values()]
        return {
            key: part.reshape(value.shape)
            for (key, value), part in zip(
                self.params.items(), flat.split(sizes, dim=1), strict=True
            )
        }


def unflatten(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Cut one stream's vector into tensors ``[1, *shape]``, one per shape, in order."""
    parts = flat.split([math.prod(shape) for shape in shapes])
    return [part.view(1, *shape) for part, shape in zip(parts, shapes, strict=True)]
