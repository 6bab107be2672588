"""``leaky_echo``: element-wise leaky integrator features with exact RTRL.

Per feature j (n features, input size d)::

    a_j,t = tanh(W_j . x_t + b_j)
    h_j,t = leak h_j,t-1 + (1 - leak) a_j,t

The recurrence is diagonal and ``leak`` is fixed, so the sensitivity of ``h_j`` to row j of
``[W | b]`` obeys ``S_t = leak S_t-1 + (1 - leak)(1 - a^2) [x_t, 1]``: exact and O(n d).

The learner also ships its compiled TD step, ``leaky_echo.cpp``, through the same contract the
built-in learners use (``agentstate.fused``): ``fused_layout()`` names the kernel and the
tensors it advances in place, and a ``TDPredictor`` (or the SB3 wrapper) then runs the whole
TD step of every stream in one call instead of the eager torch ops.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

import agentstate
from agentstate.fused import Kernel, struct_arguments


@dataclass(frozen=True)
class LeakyEchoConfig:
    """Keyword arguments of ``leaky_echo``."""

    n_features: int = 8
    """Number of features."""
    leak: float = 0.9
    """Fixed per-step decay of every feature."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.leak < 1.0:
            raise ValueError(f"leak must lie in [0, 1), got {self.leak!r}")


class LeakyEcho(agentstate.StateLearner):
    """Leaky tanh features; ``params["weight"]: [P, n, d + 1]`` (input weights, bias)."""

    name = "leaky_echo"
    exact = True

    def __init__(self, input_size: int, config: LeakyEchoConfig, **options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(input_size, config, **options)
        shape = (self.param_streams, config.n_features, input_size + 1)
        weight = torch.empty(shape, dtype=torch.float64).uniform_(
            -0.5, 0.5, generator=self.generator
        )
        self.params = {"weight": weight.to(self.dtype)}
        self.carry = self.initial_carry()
        self.sensitivity = torch.zeros(self.streams, *shape[1:], dtype=self.dtype)

    @property
    def n_features(self) -> int:
        return int(self.config.n_features)

    def initial_carry(self) -> tuple[Tensor, ...]:
        return (torch.zeros(self.streams, self.n_features, dtype=self.dtype),)

    def _activation(self, weight: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        inputs = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [B, d + 1]
        return torch.tanh((weight * inputs.unsqueeze(1)).sum(-1)), inputs

    def functional_step(
        self, params: Mapping[str, Tensor], carry: tuple[Tensor, ...], x: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        activation, _ = self._activation(params["weight"], x)
        h = self.config.leak * carry[0] + (1 - self.config.leak) * activation
        return (h,), h

    def _advance(self, x: Tensor) -> Tensor:
        activation, inputs = self._activation(self.params["weight"], x)
        leak = self.config.leak
        local = ((1 - leak) * (1 - activation**2)).unsqueeze(-1) * inputs.unsqueeze(1)
        self.sensitivity = leak * self.sensitivity + local
        h = leak * self.carry[0] + (1 - leak) * activation
        self.carry = (h,)
        return h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        return {"weight": v.unsqueeze(-1) * self.sensitivity}

    def _reset_credit(self, mask: Tensor) -> None:
        self.sensitivity[mask] = 0.0

    def _credit_state(self) -> dict[str, Tensor]:
        return {"sensitivity": self.sensitivity}

    def fused_layout(self) -> LeakyEchoLayout:
        """The tensors the compiled TD step (``leaky_echo.cpp``) advances in place."""
        return LeakyEchoLayout(
            self.params["weight"], self.carry, self.sensitivity, float(self.config.leak)
        )


class LeakyEchoArgs(ctypes.Structure):
    """The kernel's own arguments; ``agentstate.fused`` generates the C++ struct from this."""

    _fields_ = [
        ("leak", ctypes.c_double),
        ("weight", ctypes.c_void_p),
        ("h", ctypes.c_void_p),
        ("sensitivity", ctypes.c_void_p),
    ]


LEAKY_ECHO_KERNEL = Kernel(
    entry="td_leaky_echo",
    sources=(Path(__file__).with_name("leaky_echo.cpp"),),
    args_type=LeakyEchoArgs,
)


class LeakyEchoLayout(NamedTuple):
    """What the compiled step reads and writes: ``weight: [P, n, d + 1]``, ``carry: (h,)``
    with ``h: [B, n]``, ``sensitivity: [B, n, d + 1]``."""

    weight: Tensor
    carry: tuple[Tensor, ...]
    sensitivity: Tensor
    leak: float

    kernel = LEAKY_ECHO_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        return (self.weight,)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.weight, *self.carry, self.sensitivity)

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        (h,) = self.carry
        return struct_arguments(LeakyEchoArgs, dtype, {**self._asdict(), "h": h})

    def agent_state(self) -> Tensor:
        return self.carry[0]


@agentstate.hookimpl
def agentstate_learners() -> list[agentstate.LearnerSpec]:
    """Declare ``leaky_echo`` to agentstate."""
    return [
        agentstate.LearnerSpec(
            name="leaky_echo",
            learner_class=LeakyEcho,
            config_class=LeakyEchoConfig,
            exact=True,
            summary="example third-party plugin: leaky tanh features, exact RTRL",
        )
    ]
