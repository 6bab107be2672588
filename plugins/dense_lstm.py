"""The dense LSTM cell shared by ``tbptt``, ``uoro``, ``rtrl`` and ``snap1``.

``n`` LSTM units, every unit reading the input and *all* units' previous states. One weight
tensor ``W: [P, 4 gates, n units, d + n + 1]`` acts on the cell input ``z = [x, h_t-1, 1]``
(input, previous states, bias). Gates are ordered ``i, f, g, o`` as in ``columnar``::

    a_k,i = sum_m W[k, i, m] z_m                    (pre-activation of gate k of unit i)
    i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
    c_t = f c_t-1 + i g;   h_t = o tanh(c_t)

Every credit-assignment rule differentiates the same two pieces of this step. Writing
``U_k = W[k, :, d : d + n]`` for the recurrent block of gate ``k``::

    kappa_k = dc_t/da_k = (g i(1-i), c_t-1 f(1-f), i (1-g^2), 0)     (per gate, per unit)
    mu      = dh_t/dc_t = o (1 - tanh(c_t)^2)
    dh_t/da_k = tanh(c_t) o(1-o) [k = o] + mu kappa_k

*State Jacobian* ``d(h, c)_t / d(h, c)_t-1`` (the ``c_t-1`` columns are diagonal)::

    dc_t/dh_t-1 = sum_k kappa_k U_k          dc_t/dc_t-1 = diag(f)
    dh_t/dh_t-1 = sum_k (dh_t/da_k) U_k      dh_t/dc_t-1 = diag(mu f)

*Immediate Jacobian* ``d(h, c)_t / dW`` at fixed ``(h, c)_t-1``: unit ``i`` depends only on its
own weights ``W[:, i, :]``, through ``da_k,i / dW[k, i, m] = z_m``::

    dh_i/dW[k, i, m] = (dh_t/da_k)_i z_m      dc_i/dW[k, i, m] = (kappa_k)_i z_m

The rules combine these: RTRL multiplies sensitivities by the state Jacobian (a JVP), T-BPTT
multiplies adjoints by its transpose (a VJP), UORO does one of each per step, and SnAp-1 keeps
only the state Jacobian's diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.learner import Carry, StateLearner

GATE_I, GATE_F, GATE_G, GATE_O = range(4)
N_GATES = 4


@dataclass(frozen=True)
class DenseLSTMConfig:
    """Hyper-parameters of the dense LSTM cell (defaults: the JMLR 2023 T-BPTT baseline)."""

    n_features: int = 15
    """Number of LSTM units, i.e. the size of the agent state."""
    init_scale: float | None = None
    """Every weight starts uniform in [-init_scale, init_scale]; None: 1/sqrt(n_features)."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.n_features, int)
            or isinstance(self.n_features, bool)
            or self.n_features < 1
        ):
            raise ValueError(f"n_features must be a positive int, got {self.n_features!r}")
        if self.init_scale is not None and not 0 <= self.init_scale < math.inf:
            raise ValueError(f"init_scale must be None or finite and >= 0, got {self.init_scale!r}")

    @property
    def weight_scale(self) -> float:
        """The half-width of the uniform initialisation actually used."""
        if self.init_scale is None:
            return 1.0 / math.sqrt(self.n_features)
        return float(self.init_scale)


class CellActivations(NamedTuple):
    """The values of one dense LSTM step; every field ``[B, n]`` except ``cell_input``."""

    cell_input: Tensor
    """``z = [x, h_t-1, 1]``: ``[B, d + n + 1]``."""
    input_gate: Tensor
    forget_gate: Tensor
    candidate: Tensor
    output_gate: Tensor
    c_prev: Tensor
    c: Tensor
    tanh_c: Tensor
    h: Tensor


class CellDerivatives(NamedTuple):
    """Local derivatives of one step, enough to build both of its Jacobians."""

    dc_dpreactivation: Tensor
    """``kappa``: ``[B, 4, n]``."""
    dh_dpreactivation: Tensor
    """Total ``dh_t/da`` (including the path through ``c_t``): ``[B, 4, n]``."""
    dc_dc_prev: Tensor
    """The forget gate ``f``: ``[B, n]``."""
    dh_dc: Tensor
    """``mu = o (1 - tanh(c_t)^2)``: ``[B, n]``."""


class StateJacobian(NamedTuple):
    """``d(h, c)_t / d(h, c)_t-1``; the blocks acting on ``c_t-1`` are diagonal, kept as vectors."""

    dh_dh_prev: Tensor
    """``[B, n, n]`` (row: unit at ``t``, column: unit at ``t - 1``)."""
    dh_dc_prev: Tensor
    """Diagonal ``mu f``: ``[B, n]``."""
    dc_dh_prev: Tensor
    """``[B, n, n]``."""
    dc_dc_prev: Tensor
    """Diagonal ``f``: ``[B, n]``."""


def batched_matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` per stream, with the matrix shared or per stream.

    Args:
        matrix: ``[P, R, K]`` with ``P`` 1 (shared) or ``B``; any strides a view may have.
        vector: ``[B, K]``.

    Returns:
        ``[B, R]``. A shared matrix is one matrix product for all streams: broadcasting it
        over the streams instead would copy it ``B`` times.

    """
    if matrix.shape[0] == 1:
        return vector @ matrix[0].transpose(0, 1)
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def cell_forward(weight: Tensor, carry: Carry, x: Tensor) -> CellActivations:
    """One dense LSTM step.

    Args:
        weight: ``[P, 4, n, d + n + 1]`` with ``P`` 1 (shared) or ``B``.
        carry: ``(h_prev, c_prev)``, each ``[B, n]``.
        x: ``[B, d]``.

    Returns:
        The step's activations; ``(h, c)`` is the next carry.

    """
    h_prev, c_prev = carry
    streams, n_units = h_prev.shape
    cell_input = torch.cat([x, h_prev, torch.ones_like(h_prev[:, :1])], dim=1)
    flat_weight = weight.reshape(weight.shape[0], N_GATES * n_units, -1)
    preactivation = batched_matvec(flat_weight, cell_input).view(streams, N_GATES, n_units)
    # One sigmoid over all four gates (the candidate's slot unused): fewer kernel launches.
    sigmoid_gates = torch.sigmoid(preactivation)
    input_gate = sigmoid_gates[:, GATE_I]
    forget_gate = sigmoid_gates[:, GATE_F]
    output_gate = sigmoid_gates[:, GATE_O]
    candidate = torch.tanh(preactivation[:, GATE_G])
    c = torch.addcmul(forget_gate * c_prev, input_gate, candidate)
    tanh_c = torch.tanh(c)
    h = output_gate * tanh_c
    return CellActivations(
        cell_input, input_gate, forget_gate, candidate, output_gate, c_prev, c, tanh_c, h
    )


def cell_derivatives(activations: CellActivations) -> CellDerivatives:
    """Compute the local derivatives ``kappa``, ``dh/da``, ``f`` and ``mu`` of one step."""
    input_gate, forget_gate = activations.input_gate, activations.forget_gate
    candidate, output_gate = activations.candidate, activations.output_gate
    tanh_c = activations.tanh_c
    dc_dpreactivation = torch.stack(
        [
            candidate * input_gate * (1 - input_gate),
            activations.c_prev * forget_gate * (1 - forget_gate),
            input_gate * (1 - candidate * candidate),
            torch.zeros_like(candidate),
        ],
        dim=1,
    )
    dh_dc = output_gate * (1 - tanh_c * tanh_c)
    dh_dpreactivation = dh_dc.unsqueeze(1) * dc_dpreactivation
    torch.mul(tanh_c * output_gate, 1 - output_gate, out=dh_dpreactivation[:, GATE_O])
    return CellDerivatives(dc_dpreactivation, dh_dpreactivation, forget_gate, dh_dc)


def recurrent_weight(weight: Tensor, input_size: int) -> Tensor:
    """Select the block ``U`` of ``weight`` acting on ``h_t-1``: ``[P, 4, n, n]`` (a view)."""
    n_units = weight.shape[2]
    return weight[..., input_size : input_size + n_units]


def state_jacobian(derivatives: CellDerivatives, recurrent: Tensor) -> StateJacobian:
    """``d(h, c)_t / d(h, c)_t-1``.

    Args:
        derivatives: the step's local derivatives.
        recurrent: ``U: [P, 4, n, n]`` (``recurrent_weight``).

    Returns:
        The four blocks of the state Jacobian.

    """
    dc_dh_prev = (derivatives.dc_dpreactivation.unsqueeze(-1) * recurrent).sum(1)
    dh_dh_prev = (derivatives.dh_dpreactivation.unsqueeze(-1) * recurrent).sum(1)
    return StateJacobian(
        dh_dh_prev,
        derivatives.dh_dc * derivatives.dc_dc_prev,
        dc_dh_prev,
        derivatives.dc_dc_prev,
    )


def apply_state_jacobian(
    jacobian: StateJacobian, tangent_h: Tensor, tangent_c: Tensor
) -> tuple[Tensor, Tensor]:
    """Push tangents of ``(h, c)_t-1`` forward to ``(h, c)_t`` (a JVP).

    Args:
        jacobian: the step's state Jacobian.
        tangent_h: ``[B, n, ...]``, any trailing shape (a sensitivity or a single vector).
        tangent_c: same shape as ``tangent_h``.

    Returns:
        ``(tangent_h, tangent_c)`` at ``t``, shaped like the inputs.

    """
    streams, n_units = tangent_h.shape[:2]
    flat_h = tangent_h.reshape(streams, n_units, -1)
    flat_c = tangent_c.reshape(streams, n_units, -1)
    next_h = jacobian.dh_dh_prev @ flat_h + jacobian.dh_dc_prev.unsqueeze(-1) * flat_c
    next_c = jacobian.dc_dh_prev @ flat_h + jacobian.dc_dc_prev.unsqueeze(-1) * flat_c
    return next_h.view(tangent_h.shape), next_c.view(tangent_c.shape)


def state_jvp(
    derivatives: CellDerivatives, recurrent: Tensor, tangent_h: Tensor, tangent_c: Tensor
) -> tuple[Tensor, Tensor]:
    """Push one tangent of ``(h, c)_t-1`` forward to ``(h, c)_t`` without forming the Jacobian.

    ``(dc_t/dh_t-1) t = sum_k kappa_k (U_k t)`` (and likewise for ``h``): one product with
    ``U`` per step, never the ``[B, n, n]`` blocks of ``state_jacobian``.

    Args:
        derivatives: the step's local derivatives.
        recurrent: ``U: [P, 4, n, n]`` (``recurrent_weight``).
        tangent_h: ``[B, n]``.
        tangent_c: ``[B, n]``.

    Returns:
        ``(tangent_h, tangent_c)`` at ``t``, each ``[B, n]``.

    """
    streams, n_units = tangent_h.shape
    flat_recurrent = recurrent.reshape(recurrent.shape[0], N_GATES * n_units, n_units)
    recurrent_tangent = batched_matvec(flat_recurrent, tangent_h).view(streams, N_GATES, n_units)
    dh_dc_prev = derivatives.dh_dc * derivatives.dc_dc_prev
    next_h = torch.addcmul(
        (derivatives.dh_dpreactivation * recurrent_tangent).sum(1), dh_dc_prev, tangent_c
    )
    next_c = torch.addcmul(
        (derivatives.dc_dpreactivation * recurrent_tangent).sum(1),
        derivatives.dc_dc_prev,
        tangent_c,
    )
    return next_h, next_c


def apply_state_jacobian_transpose(
    jacobian: StateJacobian, adjoint_h: Tensor, adjoint_c: Tensor
) -> tuple[Tensor, Tensor]:
    """Pull adjoints of ``(h, c)_t`` back to ``(h, c)_t-1`` (a VJP).

    Args:
        jacobian: the step's state Jacobian.
        adjoint_h: ``[B, n]``.
        adjoint_c: ``[B, n]``.

    Returns:
        ``(adjoint_h_prev, adjoint_c_prev)``, each ``[B, n]``.

    """
    adjoint_h_prev = (adjoint_h.unsqueeze(1) @ jacobian.dh_dh_prev).squeeze(1) + (
        adjoint_c.unsqueeze(1) @ jacobian.dc_dh_prev
    ).squeeze(1)
    adjoint_c_prev = jacobian.dh_dc_prev * adjoint_h + jacobian.dc_dc_prev * adjoint_c
    return adjoint_h_prev, adjoint_c_prev


def immediate_jacobian(derivatives: CellDerivatives, cell_input: Tensor) -> tuple[Tensor, Tensor]:
    """Compute the non-zeros of ``d(h, c)_t / dW``: each unit's own weights' entries.

    Args:
        derivatives: the step's local derivatives.
        cell_input: ``z: [B, d + n + 1]``.

    Returns:
        ``(dh_dweight, dc_dweight)``, each ``[B, 4, n, d + n + 1]``: entry ``[b, k, i, m]`` is
        ``dh_i/dW[k, i, m]`` (resp. ``dc_i``); every ``dh_i/dW[k, j, m]`` with ``j != i`` is 0.

    """
    z = cell_input[:, None, None, :]
    return derivatives.dh_dpreactivation.unsqueeze(-1) * z, (
        derivatives.dc_dpreactivation.unsqueeze(-1) * z
    )


def preactivation_vjp(derivatives: CellDerivatives, adjoint_h: Tensor, adjoint_c: Tensor) -> Tensor:
    """``adjoint_h . dh_t/da + adjoint_c . dc_t/da``, per gate and unit.

    Args:
        derivatives: the step's local derivatives.
        adjoint_h: ``[B, n]``.
        adjoint_c: ``[B, n]``.

    Returns:
        ``[B, 4, n]``; times ``z_m`` it is the parameter VJP (``parameter_vjp``).

    """
    return torch.addcmul(
        adjoint_h.unsqueeze(1) * derivatives.dh_dpreactivation,
        adjoint_c.unsqueeze(1),
        derivatives.dc_dpreactivation,
    )


def parameter_vjp(
    derivatives: CellDerivatives, cell_input: Tensor, adjoint_h: Tensor, adjoint_c: Tensor
) -> Tensor:
    """``adjoint_h . dh_t/dW + adjoint_c . dc_t/dW`` at fixed ``(h, c)_t-1``.

    Args:
        derivatives: the step's local derivatives.
        cell_input: ``z: [B, d + n + 1]``.
        adjoint_h: ``[B, n]``.
        adjoint_c: ``[B, n]``.

    Returns:
        ``[B, 4, n, d + n + 1]``, shaped like the weight.

    """
    adjoint_preactivation = preactivation_vjp(derivatives, adjoint_h, adjoint_c)
    return adjoint_preactivation.unsqueeze(-1) * cell_input[:, None, None, :]


class DenseLSTMLearner(StateLearner):
    """Base of the dense-LSTM learners: parameters, carry and the pure cell step.

    ``params["weight"]: [1 or B, 4, n, input_size + n + 1]`` (gates ``i, f, g, o``; last axis:
    input weights, recurrent weights, bias), drawn uniform in ``[-init_scale, init_scale]``
    from the seed, so every dense-LSTM learner built with the same seed and sizes starts from
    the same network. Subclasses add the credit-assignment rule.
    """

    state_bound = 1.0  # h = o tanh(c): every entry in [-1, 1]

    def __init__(self, input_size: int, config: DenseLSTMConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        n_units = config.n_features
        shape = (self.param_streams, N_GATES, n_units, input_size + n_units + 1)
        scale = config.weight_scale
        initial = torch.empty(shape, dtype=torch.float64).uniform_(
            -scale, scale, generator=self.generator
        )
        self.params = {"weight": initial.to(dtype=self.dtype, device=self.device)}
        self.carry = self.initial_carry()

    @property
    def n_features(self) -> int:
        """Number of LSTM units."""
        return int(self.config.n_features)

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        """Per-stream shape of the weight: ``(4, n, input_size + n + 1)``."""
        return (N_GATES, self.n_features, self.input_size + self.n_features + 1)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def initial_carry(self) -> Carry:
        """``(h, c)``, each ``[B, n]`` zeros."""
        shape = (self.streams, self.n_features)
        return (self._zeros(*shape), self._zeros(*shape))

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure cell step; see ``agentstate.plugins.dense_lstm`` for the equations."""
        activations = cell_forward(params["weight"], carry, x)
        return (activations.h, activations.c), activations.h
