"""Full real-time recurrent learning on the dense LSTM (Williams & Zipser 1989).

The sensitivities of the whole state with respect to every weight are carried forward::

    S^h_t = dh_t/dW: [n, 4, n, d + n + 1]      S^c_t = dc_t/dW: same shape

and updated each step with the cell Jacobians of ``agentstate.plugins.dense_lstm``::

    S^h_t = dh_t/dh_t-1 S^h_t-1 + diag(mu f) S^c_t-1 + I^h_t
    S^c_t = dc_t/dh_t-1 S^h_t-1 + diag(f)    S^c_t-1 + I^c_t

where the immediate Jacobian ``I_t`` is non-zero only where a unit meets its own weights:
``I^h_t[i, k, i, m] = (dh_t/da_k)_i z_m``. The answer is exact::

    grad(v) = sum_i v_i S^h_t[i]

The product of an ``n x n`` Jacobian with ``S`` costs O(n^4) per step and ``S`` holds O(n^3)
numbers: a reference for small networks, not a learner for large ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from agentstate.hookspecs import hookimpl
from agentstate.registry import LearnerSpec

from .dense_lstm import (
    DenseLSTMConfig,
    DenseLSTMLearner,
    apply_state_jacobian,
    cell_derivatives,
    cell_forward,
    immediate_jacobian,
    recurrent_weight,
    state_jacobian,
)


@dataclass(frozen=True)
class RTRLConfig(DenseLSTMConfig):
    """Hyper-parameters of full RTRL: only the cell's (``n_features``, ``init_scale``)."""


class RTRLLearner(DenseLSTMLearner):
    """Dense LSTM trained by exact, full RTRL.

    ``params["weight"]: [1 or B, 4, n, input_size + n + 1]`` (see ``DenseLSTMLearner``).
    Credit-assignment memory: ``sensitivity_h`` and ``sensitivity_c``, both
    ``[B, n, 4, n, input_size + n + 1]`` (state unit first, then the weight's shape).

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("rtrl", 3, streams=2, n_features=4, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> tuple(learner.grad(torch.ones(2, 4))["weight"].shape)
        (2, 4, 4, 8)

    """

    name = "rtrl"
    exact = True

    def __init__(self, input_size: int, config: RTRLConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        sensitivity_shape = (self.streams, self.n_features, *self.weight_shape)
        self.sensitivity_h = self._zeros(*sensitivity_shape)
        self.sensitivity_c = self._zeros(*sensitivity_shape)

    def _advance(self, x: Tensor) -> Tensor:
        weight = self.params["weight"]
        activations = cell_forward(weight, self.carry, x)
        derivatives = cell_derivatives(activations)
        jacobian = state_jacobian(derivatives, recurrent_weight(weight, self.input_size))

        sensitivity_h, sensitivity_c = apply_state_jacobian(
            jacobian, self.sensitivity_h, self.sensitivity_c
        )
        dh_dweight, dc_dweight = immediate_jacobian(derivatives, activations.cell_input)
        # I_t[b, i, k, i, m]: the diagonal over the two unit axes, viewed as [B, 4, m, i].
        sensitivity_h.diagonal(dim1=1, dim2=3).add_(dh_dweight.transpose(2, 3))
        sensitivity_c.diagonal(dim1=1, dim2=3).add_(dc_dweight.transpose(2, 3))

        self.sensitivity_h, self.sensitivity_c = sensitivity_h, sensitivity_c
        self.carry = (activations.h, activations.c)
        return activations.h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        return {"weight": (v[:, :, None, None, None] * self.sensitivity_h).sum(1)}

    def _reset_credit(self, mask: Tensor) -> None:
        self.sensitivity_h[mask] = 0.0
        self.sensitivity_c[mask] = 0.0

    def _credit_state(self) -> dict[str, Tensor]:
        return {"sensitivity_h": self.sensitivity_h, "sensitivity_c": self.sensitivity_c}


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``rtrl``."""
    return [
        LearnerSpec(
            name="rtrl",
            learner_class=RTRLLearner,
            config_class=RTRLConfig,
            exact=True,
            summary="dense LSTM, exact full RTRL: O(n^3) memory, O(n^4) time per step",
        )
    ]
