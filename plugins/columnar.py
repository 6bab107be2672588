"""Columnar network with exact RTRL (Javed, White, Sutton 2021; Javed et al., JMLR 2023).

``n`` independent columns, each an LSTM cell with a *scalar* hidden state. Column ``j`` has
one weight block ``W_j: [4 gates, d + 2]`` acting on ``z_j = [x, h_j,t-1, 1]`` (input, its own
previous state, bias). Gates are ordered ``i, f, g, o``::

    a = W_j z_j;  i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
    c_t = f c_t-1 + i g;   h_t = o tanh(c_t)

Because a column's state depends only on its own weights, the sensitivities
``S^h = dh_t/dW_j`` and ``S^c = dc_t/dW_j`` are ``[4, d + 2]`` per column, and RTRL is exact
at O(parameters) per step. Differentiating the cell (``u_k = W_j[k, d]`` is the recurrent
weight of gate ``k``)::

    dc/da = (g i(1-i), c_t-1 f(1-f), i (1-g^2), 0)          =: kappa   (per gate)
    S^c_t = f S^c_t-1 + (kappa . u) S^h_t-1 + kappa (x) z
    S^h_t = tanh(c_t) o(1-o) (u_o S^h_t-1 + e_o (x) z) + o (1 - tanh(c_t)^2) S^c_t

where ``(x)`` is the outer product and ``e_o`` selects the output gate's row
(``column_sensitivities``, shared with ``agentstate.plugins.ccn``). The TD engine's fused
kernel (``agentstate.fused``) runs the same equations; ``fused_layout`` hands it the tensors.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.fused import Kernel, struct_arguments
from agentstate.hookspecs import hookimpl
from agentstate.learner import Carry, StateLearner, zero_streams_
from agentstate.registry import LearnerSpec

GATE_I, GATE_F, GATE_G, GATE_O = range(4)
N_GATES = 4


@dataclass(frozen=True)
class ColumnarConfig:
    """Hyper-parameters of the columnar learner (defaults: JMLR 2023 trace patterning)."""

    n_features: int = 7
    """Number of columns, i.e. the size of the agent state."""
    init_scale: float = 0.01
    """Every weight starts uniform in [-init_scale, init_scale] (the authors' C++)."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_features, int) or self.n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {self.n_features!r}")
        if not self.init_scale >= 0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale!r}")


def column_preactivations(weight: Tensor, h_prev: Tensor, x: Tensor) -> Tensor:
    """Gate pre-activations of every column.

    Args:
        weight: ``[P, n, 4, d + 2]`` with ``P`` 1 (shared) or ``B``.
        h_prev: ``[B, n]`` previous column states.
        x: ``[B, d]`` input.

    Returns:
        ``[B, n, 4]``.
    """
    n_columns, input_size = weight.shape[1], x.shape[1]
    input_weight = weight[..., :input_size].reshape(weight.shape[0], n_columns * N_GATES, -1)
    from_input = (input_weight @ x.unsqueeze(-1)).view(x.shape[0], n_columns, N_GATES)
    recurrent_weight = weight[..., input_size]
    bias = weight[..., input_size + 1]
    return from_input + recurrent_weight * h_prev.unsqueeze(-1) + bias


def gate_activations(preactivation: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(i, f, g, o)``, each ``[B, n]``, from pre-activations ``[B, n, 4]``."""
    input_gate = torch.sigmoid(preactivation[..., GATE_I])
    forget_gate = torch.sigmoid(preactivation[..., GATE_F])
    candidate = torch.tanh(preactivation[..., GATE_G])
    output_gate = torch.sigmoid(preactivation[..., GATE_O])
    return input_gate, forget_gate, candidate, output_gate


def column_sensitivities(
    recurrent_weight: Tensor,
    column_input: Tensor,
    gates: tuple[Tensor, Tensor, Tensor, Tensor],
    c_prev: Tensor,
    c: Tensor,
    sensitivity_h: Tensor,
    sensitivity_c: Tensor,
) -> None:
    """One exact RTRL step of independent scalar-state LSTM columns, in place.

    Args:
        recurrent_weight: ``[P, n, 4]`` self-recurrent weight ``u`` of each gate.
        column_input: ``[B, n, m]`` what each column's weights multiply, ``z``.
        gates: ``(i, f, g, o)``, each ``[B, n]``, of this step.
        c_prev: ``[B, n]`` cell state before the step.
        c: ``[B, n]`` cell state after the step.
        sensitivity_h: ``[B, n, 4, m]`` ``dh_t-1/dW`` of each column's own weights; becomes
            ``dh_t/dW``.
        sensitivity_c: ``[B, n, 4, m]`` ``dc_t-1/dW``; becomes ``dc_t/dW``.
    """
    input_gate, forget_gate, candidate, output_gate = gates
    dc_dpreactivation = torch.stack(
        [
            candidate * input_gate * (1 - input_gate),
            c_prev * forget_gate * (1 - forget_gate),
            input_gate * (1 - candidate * candidate),
            torch.zeros_like(c),
        ],
        dim=-1,
    )
    dc_dh_prev = (dc_dpreactivation * recurrent_weight).sum(-1)
    # S^c_t = f S^c_t-1 + (kappa . u) S^h_t-1 + kappa (x) z
    sensitivity_c.mul_(forget_gate[..., None, None])
    sensitivity_c.add_(dc_dh_prev[..., None, None] * sensitivity_h)
    sensitivity_c.add_(dc_dpreactivation.unsqueeze(-1) * column_input.unsqueeze(-2))
    # S^h_t = tanh(c_t) o(1-o) (u_o S^h_t-1 + e_o (x) z) + o (1 - tanh(c_t)^2) S^c_t
    tanh_c = torch.tanh(c)
    dh_doutput_preactivation = tanh_c * output_gate * (1 - output_gate)
    dh_dc = output_gate * (1 - tanh_c * tanh_c)
    dh_dh_prev_through_output_gate = dh_doutput_preactivation * recurrent_weight[..., GATE_O]
    sensitivity_h.mul_(dh_dh_prev_through_output_gate[..., None, None])
    sensitivity_h.add_(dh_dc[..., None, None] * sensitivity_c)
    sensitivity_h[:, :, GATE_O, :] += dh_doutput_preactivation.unsqueeze(-1) * column_input


class ColumnarLearner(StateLearner):
    """``n`` scalar-state LSTM columns trained by exact RTRL.

    ``params["weight"]: [1 or B, n_columns, 4, input_size + 2]`` (last axis: input weights,
    recurrent weight, bias; gates ``i, f, g, o``). Credit-assignment memory: the sensitivities
    ``sensitivity_h`` and ``sensitivity_c``, both ``[B, n_columns, 4, input_size + 2]``.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("columnar", 3, streams=2, n_features=5, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> grads = learner.grad(torch.ones(2, 5))
        >>> tuple(grads["weight"].shape)
        (2, 5, 4, 5)
    """

    name = "columnar"
    exact = True
    state_bound = 1.0  # h = o tanh(c): every entry in [-1, 1]

    def __init__(self, input_size: int, config: ColumnarConfig, **options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(input_size, config, **options)
        shape = (self.param_streams, config.n_features, N_GATES, input_size + 2)
        initial = torch.empty(shape, dtype=torch.float64).uniform_(
            -config.init_scale, config.init_scale, generator=self.generator
        )
        self.params = {"weight": initial.to(dtype=self.dtype, device=self.device)}
        self.carry = self.initial_carry()
        sensitivity_shape = (self.streams, *shape[1:])
        self.sensitivity_h = self._zeros(sensitivity_shape)
        self.sensitivity_c = self._zeros(sensitivity_shape)

    @property
    def n_features(self) -> int:
        """Number of columns."""
        return int(self.config.n_features)

    def _zeros(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def initial_carry(self) -> Carry:
        """``(h, c)``, each ``[B, n_columns]`` zeros."""
        shape = (self.streams, self.n_features)
        return (self._zeros(shape), self._zeros(shape))

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure cell step; see the module docstring for the equations."""
        h_prev, c_prev = carry
        gates = gate_activations(column_preactivations(params["weight"], h_prev, x))
        input_gate, forget_gate, candidate, output_gate = gates
        c = forget_gate * c_prev + input_gate * candidate
        h = output_gate * torch.tanh(c)
        return (h, c), h

    def _advance(self, x: Tensor) -> Tensor:
        weight = self.params["weight"]
        h_prev, c_prev = self.carry
        gates = gate_activations(column_preactivations(weight, h_prev, x))
        input_gate, forget_gate, candidate, output_gate = gates
        c = forget_gate * c_prev + input_gate * candidate
        h = output_gate * torch.tanh(c)

        # z = [x, h_prev, 1] for every column: what each column's weights multiply.
        column_input = torch.cat(
            [
                x.unsqueeze(1).expand(-1, self.n_features, -1),
                h_prev.unsqueeze(-1),
                torch.ones_like(h_prev).unsqueeze(-1),
            ],
            dim=-1,
        )
        column_sensitivities(
            weight[..., self.input_size],
            column_input,
            gates,
            c_prev,
            c,
            self.sensitivity_h,
            self.sensitivity_c,
        )
        self.carry = (h, c)
        return h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        return {"weight": v[..., None, None] * self.sensitivity_h}

    def _reset_credit(self, mask: Tensor) -> None:
        zero_streams_((self.sensitivity_h, self.sensitivity_c), mask)

    def _credit_state(self) -> dict[str, Tensor]:
        return {"sensitivity_h": self.sensitivity_h, "sensitivity_c": self.sensitivity_c}

    def fused_layout(self) -> ColumnStages:
        """The tensors the fused TD step advances in place: one stage whose columns all learn."""
        return ColumnStages(
            weights=(self.params["weight"],),
            input_mean=(),
            input_variance=(),
            feature_mean=(),
            feature_variance=(),
            carry=self.carry,
            sensitivity_h=self.sensitivity_h,
            sensitivity_c=self.sensitivity_c,
            columns_per_stage=self.n_features,
            normalize_features=False,
            normalization_rate=1.0,
            variance_floor=1.0,
        )


# ---------------------------------------------------------------------- the compiled step
class ColumnArgs(ctypes.Structure):
    """``ColumnStages`` for ``kernels/columns.cpp``; ``stage_*`` point at per-stage arrays."""

    _fields_ = [
        ("columns_per_stage", ctypes.c_int64),
        ("active_stage", ctypes.c_int64),
        ("normalize_inputs", ctypes.c_int64),
        ("normalize_features", ctypes.c_int64),
        ("normalization_rate", ctypes.c_double),
        ("variance_floor", ctypes.c_double),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "h",
                "c",
                "sensitivity_h",
                "sensitivity_c",
                "stage_weights",
                "stage_input_means",
                "stage_input_variances",
                "stage_means",
                "stage_variances",
            )
        ),
    ]


COLUMNS_KERNEL = Kernel(
    entry="td_columns",
    sources=(Path(__file__).parent / "kernels" / "columns.cpp",),
    args_type=ColumnArgs,
)
"""The fused TD step of columnar and CCN learners."""


class ColumnStages(NamedTuple):
    """Tensors of a columnar or CCN learner that the fused step advances in place.

    A columnar network is one stage whose columns all learn. ``P`` is 1 (shared) or ``B``;
    ``L`` columns per stage; ``k`` the active (last built) stage; ``T`` columns in all.
    """

    weights: Sequence[Tensor]
    """Built stages ``s = 0..k``: ``[P, L, 4, d + sL + 2]``; the last is trained."""
    input_mean: Sequence[Tensor]
    """``input_mean[s]``: ``[P, d]`` statistics with which stage ``s`` normalises the raw
    input, one per built stage; empty when the learner reads the engine's normalised input."""
    input_variance: Sequence[Tensor]
    """Like ``input_mean``."""
    feature_mean: Sequence[Tensor]
    """``feature_mean[s]``: ``[P, sL]`` statistics of the earlier columns' states that stage
    ``s`` reads; needed for the stages ``s >= 1`` (a columnar network passes none)."""
    feature_variance: Sequence[Tensor]
    """Like ``feature_mean``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, T]``."""
    sensitivity_h: Tensor
    """``[B, L, 4, d + kL + 2]``."""
    sensitivity_c: Tensor
    """Like ``sensitivity_h``."""
    columns_per_stage: int
    normalize_features: bool
    normalization_rate: float
    variance_floor: float

    kernel = COLUMNS_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The trained weights: the active stage's."""
        return (self.weights[-1],)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (
            *self.weights,
            *self.input_mean,
            *self.input_variance,
            *self.feature_mean,
            *self.feature_variance,
            *self.carry,
            self.sensitivity_h,
            self.sensitivity_c,
        )

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``ColumnArgs`` for these tensors."""
        h, c = self.carry
        return struct_arguments(
            ColumnArgs,
            dtype,
            {
                "columns_per_stage": self.columns_per_stage,
                "active_stage": len(self.weights) - 1,
                "normalize_inputs": bool(self.input_mean),
                "normalize_features": self.normalize_features,
                "normalization_rate": self.normalization_rate,
                "variance_floor": self.variance_floor,
                "h": h,
                "c": c,
                "sensitivity_h": self.sensitivity_h,
                "sensitivity_c": self.sensitivity_c,
                "stage_weights": self.weights,
                "stage_input_means": self.input_mean,
                "stage_input_variances": self.input_variance,
                "stage_means": self.feature_mean,
                "stage_variances": self.feature_variance,
            },
        )

    def agent_state(self) -> Tensor:
        """``h: [B, T]`` of every built column after the last fused step."""
        return self.carry[0]


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``columnar``."""
    return [
        LearnerSpec(
            name="columnar",
            learner_class=ColumnarLearner,
            config_class=ColumnarConfig,
            exact=True,
            summary="independent scalar-state LSTM columns, exact RTRL in O(parameters)",
        )
    ]
