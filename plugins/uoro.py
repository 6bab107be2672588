"""Unbiased Online Recurrent Optimization on the dense LSTM (Tallec & Ollivier 2017).

UORO keeps a rank-one, unbiased estimate of the sensitivity of the state ``s = (h, c)``::

    ds_t/dW ~= s~_t (x) W~_t,    s~ = (h~, c~): [2n],    W~: shaped like the weight

Each step draws independent random signs ``nu = (nu^h, nu^c)`` (one draw per stream) and, with
the cell Jacobians of ``agentstate.plugins.dense_lstm``::

    s'    = (d(h, c)_t / d(h, c)_t-1) s~_t-1                    (one JVP)
    dW    = nu^h . dh_t/dW + nu^c . dc_t/dW                     (one VJP, at fixed s_t-1)
    rho_0 = sqrt(|W~_t-1| / (|s'| + eps)) + eps
    rho_1 = sqrt(|dW| / (|nu| + eps)) + eps
    s~_t  = rho_0 s' + rho_1 nu
    W~_t  = W~_t-1 / rho_0 + dW / rho_1

so that ``E[s~_t (x) W~_t] = (ds_t/ds_t-1) (s~ (x) W~)_t-1 + ds_t/dW``: the RTRL recursion, in
expectation, because ``E[nu nu^T] = I`` and the cross terms are odd in ``nu`` (``rho_1`` is
even in ``nu``, ``rho_0`` does not depend on it). ``rho_0, rho_1`` balance the norms of the two
factors: the paper's variance-minimising choice. The gradient estimate is::

    grad(v) = (v . h~_t) W~_t

O(parameters) per step. With shared parameters ``W~`` is still per stream: each stream's
estimate has its own noise.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.fused import Kernel, struct_arguments
from agentstate.hookspecs import hookimpl
from agentstate.registry import LearnerSpec

from .dense_lstm import (
    DenseLSTMConfig,
    DenseLSTMLearner,
    cell_derivatives,
    cell_forward,
    preactivation_vjp,
    recurrent_weight,
    state_jvp,
)


@dataclass(frozen=True)
class UOROConfig(DenseLSTMConfig):
    """Hyper-parameters of UORO (cell defaults: the JMLR 2023 T-BPTT baseline)."""

    epsilon: float = 1e-7
    """Stabiliser in rho_0 and rho_1: keeps both positive when a tangent is zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.epsilon < math.inf:
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon!r}")


class UOROLearner(DenseLSTMLearner):
    """Dense LSTM trained by UORO's unbiased rank-one RTRL estimate.

    ``params["weight"]: [1 or B, 4, n, input_size + n + 1]`` (see ``DenseLSTMLearner``).
    Credit-assignment memory: the state tangent ``state_tangent_h, state_tangent_c: [B, n]``
    and the parameter tangent ``parameter_tangent: [B, 4, n, input_size + n + 1]``. The signs
    ``nu`` come from the learner's seeded generator (saved by ``state_dict``).

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("uoro", 3, streams=2, n_features=4, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> tuple(learner.grad(torch.ones(2, 4))["weight"].shape)
        (2, 4, 4, 8)

    """

    name = "uoro"
    exact = False

    def __init__(self, input_size: int, config: UOROConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        self.state_tangent_h = self._zeros(self.streams, self.n_features)
        self.state_tangent_c = self._zeros(self.streams, self.n_features)
        self.parameter_tangent = self._zeros(self.streams, *self.weight_shape)
        self._sign_bits = torch.zeros((self.streams, 2 * self.n_features), dtype=torch.int64)

    def begin_step(self) -> None:
        """Draw this step's random bits into ``[B, 2n]`` int64 (CPU): ``nu = 2 bits - 1``."""
        torch.randint(0, 2, self._sign_bits.shape, generator=self.generator, out=self._sign_bits)

    def _random_signs(self) -> Tensor:
        """``nu``: independent +-1 for every stream and state component, ``[B, 2n]``."""
        return (2 * self._sign_bits - 1).to(dtype=self.dtype, device=self.device)

    def fused_layout(self) -> DenseTangent:
        """The tensors the fused TD step advances in place (``kernels/uoro.cpp``).

        The signs are those ``begin_step`` drew.
        """
        return DenseTangent(
            self.params["weight"],
            self.carry,
            self.state_tangent_h,
            self.state_tangent_c,
            self.parameter_tangent,
            self._sign_bits,
            self.config.epsilon,
        )

    def _advance(self, x: Tensor) -> Tensor:
        epsilon = self.config.epsilon
        weight = self.params["weight"]
        activations = cell_forward(weight, self.carry, x)
        derivatives = cell_derivatives(activations)

        pushed_h, pushed_c = state_jvp(
            derivatives,
            recurrent_weight(weight, self.input_size),
            self.state_tangent_h,
            self.state_tangent_c,
        )
        noise_h, noise_c = self._random_signs().chunk(2, dim=1)
        # dW = a (x) z with a = nu . d(h, c)_t/da: [B, 4, n]; never formed, |dW| = |a| |z|.
        noise_preactivation = preactivation_vjp(derivatives, noise_h, noise_c)
        cell_input = activations.cell_input
        noise_vjp_norm = noise_preactivation.flatten(1).norm(dim=1) * cell_input.norm(dim=1)

        pushed_norm = torch.cat([pushed_h, pushed_c], dim=1).norm(dim=1)
        parameter_tangent_norm = self.parameter_tangent.flatten(1).norm(dim=1)
        noise_norm = math.sqrt(2 * self.n_features)
        rho_0 = (parameter_tangent_norm / (pushed_norm + epsilon)).sqrt() + epsilon
        rho_1 = (noise_vjp_norm / (noise_norm + epsilon)).sqrt() + epsilon

        self.state_tangent_h = torch.addcmul(rho_0[:, None] * pushed_h, rho_1[:, None], noise_h)
        self.state_tangent_c = torch.addcmul(rho_0[:, None] * pushed_c, rho_1[:, None], noise_c)
        # W~_t = W~_t-1 / rho_0 + (a / rho_1) (x) z, in place.
        self.parameter_tangent.div_(rho_0[:, None, None, None])
        self.parameter_tangent.addcmul_(
            (noise_preactivation / rho_1[:, None, None]).unsqueeze(-1),
            cell_input[:, None, None, :],
        )
        self.carry = (activations.h, activations.c)
        return activations.h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        projection = (v * self.state_tangent_h).sum(1)
        return {"weight": projection[:, None, None, None] * self.parameter_tangent}

    def _reset_credit(self, mask: Tensor) -> None:
        self.state_tangent_h[mask] = 0.0
        self.state_tangent_c[mask] = 0.0
        self.parameter_tangent[mask] = 0.0

    def _credit_state(self) -> dict[str, Tensor]:
        return {
            "state_tangent_h": self.state_tangent_h,
            "state_tangent_c": self.state_tangent_c,
            "parameter_tangent": self.parameter_tangent,
        }


# ---------------------------------------------------------------------- the compiled step
class TangentArgs(ctypes.Structure):
    """``DenseTangent`` for ``kernels/uoro.cpp``."""

    _fields_ = [
        ("epsilon", ctypes.c_double),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "weight",
                "h",
                "c",
                "state_tangent_h",
                "state_tangent_c",
                "parameter_tangent",
                "sign_bits",
            )
        ),
    ]


_KERNELS = Path(__file__).parent / "kernels"
UORO_KERNEL = Kernel(
    entry="td_uoro",
    sources=(_KERNELS / "uoro.cpp",),
    args_type=TangentArgs,
    headers=(_KERNELS / "dense.h",),
)


class DenseTangent(NamedTuple):
    """Tensors of a UORO learner advanced in place by ``UORO_KERNEL``."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    state_tangent_h: Tensor
    """``[B, n]``."""
    state_tangent_c: Tensor
    """``[B, n]``."""
    parameter_tangent: Tensor
    """``[B, 4, n, d + n + 1]``."""
    sign_bits: Tensor
    """``[B, 2n]`` int64, 0 or 1: this step's random signs ``nu = 2 bits - 1``, drawn from
    the learner's generator by ``begin_step``."""
    epsilon: float

    kernel = UORO_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The trained weight."""
        return (self.weight,)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (self.weight, *self.carry, *self[2:6])

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``TangentArgs`` for these tensors."""
        h, c = self.carry
        return struct_arguments(TangentArgs, dtype, {**self._asdict(), "h": h, "c": c})

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``uoro``."""
    return [
        LearnerSpec(
            name="uoro",
            learner_class=UOROLearner,
            config_class=UOROConfig,
            exact=False,
            summary="dense LSTM, UORO unbiased rank-one RTRL estimate (O(parameters) per step)",
        )
    ]
