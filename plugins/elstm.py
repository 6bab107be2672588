"""eLSTM with exact element-wise RTRL (Irie, Gopalakrishnan, Schmidhuber, ICLR 2024).

``N`` cells whose recurrence is element-wise (``(.)`` is the element-wise product)::

    z_t = tanh(W_z x_t + w_z (.) c_t-1 + b_z)
    f_t = sigmoid(W_f x_t + w_f (.) c_t-1 + b_f)
    c_t = f_t (.) c_t-1 + (1 - f_t) (.) z_t
    o_t = sigmoid(W_o [x_t; c_t] + b_o);   h_t = o_t (.) c_t

The recurrent Jacobian ``dc_t/dc_t-1`` is diagonal::

    kappa_z = dc_t/da_z = (1 - f_t)(1 - z_t^2),   kappa_f = dc_t/da_f = (c_t-1 - z_t) f_t (1 - f_t)
    D_t = dc_t/dc_t-1 = f_t + kappa_z w_z + kappa_f w_f

and cell ``n`` depends only on row ``n`` of ``W_z, W_f`` and on entry ``n`` of ``w_z, w_f, b_z,
b_f``, so the sensitivities of ``c`` are element-wise, for each gate ``g`` in ``{z, f}``::

    S^W_g,t = D_t S^W_g,t-1 + kappa_g x_t^T         ([N, D], row-wise scaling)
    S^w_g,t = D_t S^w_g,t-1 + kappa_g c_t-1         ([N])
    S^b_g,t = D_t S^b_g,t-1 + kappa_g               ([N])

``W_o`` and ``b_o`` act on ``h_t`` only at the current step; ``W_o`` also mixes the cells, so
``grad(v)`` first pulls ``v`` back to the cells through the (dense) ``dh_t/dc_t``::

    e = v (.) o_t (1 - o_t) (.) c_t                         (= v . dh_t/da_o)
    g = W_o[:, D:]^T e + v (.) o_t                          (= v . dh_t/dc_t)
    grad W_g = g (.) S^W_g,   grad w_g = g (.) S^w_g,   grad b_g = g (.) S^b_g
    grad W_o = e [x_t; c_t]^T,   grad b_o = e

Exact RTRL at ``O(N D)`` memory and time per step. Initialisation: every weight and bias is
drawn from ``N(0, init_std^2)``, ``init_std = 0.1`` as in the authors' RTRL layer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.fused import Kernel, struct_arguments
from agentstate.hookspecs import hookimpl
from agentstate.learner import Carry, StateLearner
from agentstate.registry import LearnerSpec

GATE_Z, GATE_F = range(2)
N_CELL_GATES = 2


@dataclass(frozen=True)
class ELSTMConfig:
    """Hyper-parameters of the eLSTM learner."""

    n_features: int = 16
    """Number of cells ``N``, i.e. the size of the agent state."""
    init_std: float = 0.1
    """Standard deviation of the normal initialisation of every parameter (authors' code)."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.n_features, int)
            or isinstance(self.n_features, bool)
            or self.n_features < 1
        ):
            raise ValueError(f"n_features must be a positive int, got {self.n_features!r}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")


class ELSTMLearner(StateLearner):
    """Element-wise LSTM trained by exact RTRL.

    Parameters (leading ``1`` shared or ``B`` independent; gate axis ordered ``z, f``):

    * ``gate_input_weight: [P, 2, N, D]`` -- ``W_z, W_f``;
    * ``gate_cell_weight: [P, 2, N]`` -- ``w_z, w_f``;
    * ``gate_bias: [P, 2, N]`` -- ``b_z, b_f``;
    * ``output_weight: [P, N, D + N]`` -- ``W_o`` acting on ``[x_t; c_t]``;
    * ``output_bias: [P, N]`` -- ``b_o``.

    Carry: ``(c,)`` with ``c: [B, N]``. Credit-assignment memory: the cell sensitivities
    ``sensitivity_input_weight: [B, 2, N, D]``, ``sensitivity_cell_weight`` and
    ``sensitivity_bias: [B, 2, N]``, plus this step's ``output_gate: [B, N]`` and
    ``last_input: [B, D]``. The three sensitivities are views of one buffer ``sensitivity:
    [B, 2, N, D + 2]`` (row ``n`` of gate ``g``: the sensitivity to ``[W_g[n], w_g[n], b_g[n]]``),
    so one scaling by ``D_t`` and one product with ``v`` serve all three.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("elstm", 3, streams=2, n_features=4, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> grads = learner.grad(torch.ones(2, 4))
        >>> tuple(grads["gate_input_weight"].shape), tuple(grads["output_weight"].shape)
        ((2, 2, 4, 3), (2, 4, 7))

    """

    name = "elstm"
    exact = True
    state_bound = 1.0  # h = sigmoid(.) c with |c| <= 1

    def __init__(self, input_size: int, config: ELSTMConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        n_cells, streams = config.n_features, self.param_streams
        shapes = {
            "gate_input_weight": (streams, N_CELL_GATES, n_cells, input_size),
            "gate_cell_weight": (streams, N_CELL_GATES, n_cells),
            "gate_bias": (streams, N_CELL_GATES, n_cells),
            "output_weight": (streams, n_cells, input_size + n_cells),
            "output_bias": (streams, n_cells),
        }
        self.params = {key: self._initial(shape) for key, shape in shapes.items()}
        self.carry = self.initial_carry()
        # [B, 2, N, D + 2]: columns D and D + 1 are w_g's and b_g's (see the class docstring).
        sensitivity = self._zeros((self.streams, N_CELL_GATES, n_cells, input_size + 2))
        self.sensitivity = sensitivity
        self.sensitivity_input_weight = sensitivity[..., :input_size]
        self.sensitivity_cell_weight = sensitivity[..., input_size]
        self.sensitivity_bias = sensitivity[..., input_size + 1]
        self.output_gate = self._zeros((self.streams, n_cells))
        self.last_input = self._zeros((self.streams, input_size))
        self._dc_dpreactivation = self._zeros((self.streams, N_CELL_GATES, n_cells))

    def _initial(self, shape: tuple[int, ...]) -> Tensor:
        initial = torch.empty(shape, dtype=torch.float64).normal_(
            0.0, self.config.init_std, generator=self.generator
        )
        return initial.to(dtype=self.dtype, device=self.device)

    def _zeros(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def n_features(self) -> int:
        """Number of cells ``N``."""
        return int(self.config.n_features)

    # ------------------------------------------------------------------ the cell
    def initial_carry(self) -> Carry:
        """``(c,)`` with ``c: [B, n_features]`` zeros."""
        return (self._zeros((self.streams, self.n_features)),)

    def _cell(
        self, params: Mapping[str, Tensor], c_prev: Tensor, x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One step of the equations.

        Returns:
            ``(z, f, c, o, h)``, each ``[B, N]``.

        """
        streams = x.shape[0]
        input_weight = params["gate_input_weight"]
        from_input = batched_affine(
            input_weight.flatten(1, 2), params["gate_bias"].flatten(1), x
        ).view(streams, N_CELL_GATES, self.n_features)
        preactivation = torch.addcmul(from_input, params["gate_cell_weight"], c_prev.unsqueeze(1))
        candidate = torch.tanh(preactivation[:, GATE_Z])
        forget_gate = torch.sigmoid(preactivation[:, GATE_F])
        c = torch.lerp(candidate, c_prev, forget_gate)  # f c_t-1 + (1 - f) z
        output_input = torch.cat([x, c], dim=1)
        output_gate = torch.sigmoid(
            batched_affine(params["output_weight"], params["output_bias"], output_input)
        )
        return candidate, forget_gate, c, output_gate, output_gate * c

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure cell step; see the module docstring for the equations."""
        (c_prev,) = carry
        _, _, c, _, h = self._cell(params, c_prev, x)
        return (c,), h

    # ------------------------------------------------------------------ the rule
    def _advance(self, x: Tensor) -> Tensor:
        (c_prev,) = self.carry
        candidate, forget_gate, c, output_gate, h = self._cell(self.params, c_prev, x)

        kappa = self._dc_dpreactivation
        one_minus_forget = 1 - forget_gate
        torch.mul(one_minus_forget, 1 - candidate * candidate, out=kappa[:, GATE_Z])
        torch.mul((c_prev - candidate) * forget_gate, one_minus_forget, out=kappa[:, GATE_F])
        cell_weight = self.params["gate_cell_weight"]
        dc_dc_prev = torch.addcmul(
            torch.addcmul(forget_gate, kappa[:, GATE_Z], cell_weight[:, GATE_Z]),
            kappa[:, GATE_F],
            cell_weight[:, GATE_F],
        )
        # S_t = D_t S_t-1 + kappa_g [x_t; c_t-1; 1]^T: one scaling of all three, then each term.
        self.sensitivity.mul_(dc_dc_prev[:, None, :, None])
        self.sensitivity_input_weight.addcmul_(kappa.unsqueeze(-1), x[:, None, None, :])
        self.sensitivity_cell_weight.addcmul_(kappa, c_prev.unsqueeze(1))
        self.sensitivity_bias.add_(kappa)

        self.output_gate = output_gate
        self.last_input.copy_(x)
        self.carry = (c,)
        return h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        (c,) = self.carry
        output_gate = self.output_gate
        v_output_preactivation = v * output_gate * (1 - output_gate) * c
        cell_weight_of_output = self.params["output_weight"][..., self.input_size :]
        v_cell = batched_affine(
            cell_weight_of_output.transpose(1, 2), v * output_gate, v_output_preactivation
        )
        gradient = v_cell[:, None, :, None] * self.sensitivity
        return {
            "gate_input_weight": gradient[..., : self.input_size],
            "gate_cell_weight": gradient[..., self.input_size],
            "gate_bias": gradient[..., self.input_size + 1],
            "output_weight": v_output_preactivation.unsqueeze(-1)
            * torch.cat([self.last_input, c], dim=1).unsqueeze(1),
            "output_bias": v_output_preactivation,
        }

    def fused_layout(self) -> ElementwiseCells:
        """The tensors the fused TD step advances in place (``kernels/elstm.cpp``)."""
        params = self.params
        return ElementwiseCells(
            params["gate_input_weight"],
            params["gate_cell_weight"],
            params["gate_bias"],
            params["output_weight"],
            params["output_bias"],
            self.carry,
            self.sensitivity,
            self.output_gate,
            self.last_input,
        )

    def _reset_credit(self, mask: Tensor) -> None:
        for memory in self._credit_state().values():
            memory[mask] = 0.0

    def _credit_state(self) -> dict[str, Tensor]:
        return {
            "sensitivity_input_weight": self.sensitivity_input_weight,
            "sensitivity_cell_weight": self.sensitivity_cell_weight,
            "sensitivity_bias": self.sensitivity_bias,
            "output_gate": self.output_gate,
            "last_input": self.last_input,
        }


# ---------------------------------------------------------------------- the compiled step
class ElementwiseArgs(ctypes.Structure):
    """``ElementwiseCells`` for ``kernels/elstm.cpp``.

    ``parameters`` points at an array of five pointers, in ``ElementwiseCells.parameters()``
    order.
    """

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("c", "sensitivity", "output_gate", "last_input", "parameters")
    ]


_KERNELS = Path(__file__).parent / "kernels"
ELSTM_KERNEL = Kernel(
    entry="td_elstm",
    sources=(_KERNELS / "elstm.cpp",),
    args_type=ElementwiseArgs,
    headers=(_KERNELS / "dense.h",),
)


class ElementwiseCells(NamedTuple):
    """Tensors of an eLSTM learner advanced in place by ``ELSTM_KERNEL``.

    ``P`` is 1 (shared) or ``B``; ``N`` cells, ``D`` inputs. Its five parameters are named
    here in the kernel's order; each has its own trace and optimiser state.
    """

    gate_input_weight: Tensor
    """``[P, 2, N, D]``: ``W_z, W_f``."""
    gate_cell_weight: Tensor
    """``[P, 2, N]``: ``w_z, w_f``."""
    gate_bias: Tensor
    """``[P, 2, N]``."""
    output_weight: Tensor
    """``[P, N, D + N]``: ``W_o`` on ``[x_t; c_t]``."""
    output_bias: Tensor
    """``[P, N]``."""
    carry: tuple[Tensor, ...]
    """``(c,)``, ``[B, N]``."""
    sensitivity: Tensor
    """``[B, 2, N, D + 2]``: row ``n`` of gate ``g`` is ``dc_n / d[W_g[n], w_g[n], b_g[n]]``."""
    output_gate: Tensor
    """``[B, N]``, written with this step's ``o_t``."""
    last_input: Tensor
    """``[B, D]``, written with this step's (normalised) input."""

    kernel = ELSTM_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The learner's parameters in the kernel's order."""
        return tuple(self[:5])

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (*self[:5], *self.carry, self.sensitivity, self.output_gate, self.last_input)

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``ElementwiseArgs`` for these tensors."""
        (c,) = self.carry
        return struct_arguments(
            ElementwiseArgs,
            dtype,
            {**self._asdict(), "c": c, "parameters": self.parameters()},
        )

    def agent_state(self) -> Tensor:
        """``h = o (.) c: [B, N]`` after the last fused step (a new tensor)."""
        return self.output_gate * self.carry[0]


def batched_affine(matrix: Tensor, offset: Tensor, vector: Tensor) -> Tensor:
    """``offset + matrix @ vector`` per stream, in one kernel.

    Args:
        matrix: ``[P, R, K]`` with ``P`` 1 (shared) or ``B``.
        offset: ``[P, R]`` or ``[B, R]``.
        vector: ``[B, K]``.

    Returns:
        ``[B, R]``. A shared matrix is one matrix product for all streams.

    """
    if matrix.shape[0] == 1:
        return torch.addmm(offset, vector, matrix[0].transpose(0, 1))
    return torch.baddbmm(offset.unsqueeze(-1), matrix, vector.unsqueeze(-1)).squeeze(-1)


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``elstm``."""
    return [
        LearnerSpec(
            name="elstm",
            learner_class=ELSTMLearner,
            config_class=ELSTMConfig,
            exact=True,
            summary="element-wise LSTM (Irie et al. 2024), exact RTRL in O(N x inputs)",
        )
    ]
