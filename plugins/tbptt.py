"""Truncated back-propagation through time on the dense LSTM (the JMLR 2023 baseline).

Each step stores what the backward pass will need, in a window of the last ``k`` steps::

    z_t = [x_t, h_t-1, 1],   kappa_t = dc_t/da,   dh_t/da,   f_t,   mu_t = dh_t/dc_t

``grad(v)`` then back-propagates the adjoints ``(g^h, g^c)`` of ``(h, c)`` from the current
step through the window, newest first, with the cell Jacobians of
``agentstate.plugins.dense_lstm``::

    g^h = v,  g^c = 0
    for s = t, t-1, ..., t-k+1 (stopping early at a stream's reset):
        grad += g^h . dh_s/dW + g^c . dc_s/dW          = (g^h dh_s/da + g^c kappa_s) (x) z_s
        g^h, g^c <- (d(h, c)_s / d(h, c)_s-1)^T (g^h, g^c)

The carry entering the window is a constant, so the answer is the exact gradient of
``v . h_t`` through the last ``k`` steps, and the exact full gradient whenever a stream has
seen at most ``k`` steps since its last reset. Cost O(k) per step.

As in the authors' C++, activations are stored and the weights are not: the recurrent weights
``U`` used on the way back are the current ones.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.fused import Kernel, struct_arguments
from agentstate.hookspecs import hookimpl
from agentstate.registry import LearnerSpec

from .dense_lstm import (
    CellDerivatives,
    DenseLSTMConfig,
    DenseLSTMLearner,
    apply_state_jacobian_transpose,
    cell_derivatives,
    cell_forward,
    parameter_vjp,
    recurrent_weight,
    state_jacobian,
)


@dataclass(frozen=True)
class TBPTTConfig(DenseLSTMConfig):
    """Hyper-parameters of T-BPTT (defaults: JMLR 2023, 15 hidden units, k = 4)."""

    truncation: int = 4
    """Window ``k``: how many of the latest steps the gradient flows through."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.truncation, int)
            or isinstance(self.truncation, bool)
            or self.truncation < 1
        ):
            raise ValueError(f"truncation must be a positive int, got {self.truncation!r}")


class TBPTTLearner(DenseLSTMLearner):
    """Dense LSTM trained by truncated BPTT over the last ``truncation`` steps.

    ``params["weight"]: [1 or B, 4, n, input_size + n + 1]`` (see ``DenseLSTMLearner``).
    Credit-assignment memory: a window of the last ``k`` steps, newest at index 0:
    ``window_cell_input: [k, B, input_size + n + 1]``, ``window_dc_dpreactivation`` and
    ``window_dh_dpreactivation: [k, B, 4, n]``, ``window_dc_dc_prev`` and
    ``window_dh_dc: [k, B, n]``; and ``steps_in_window: [B]``, how many of those slots hold
    steps since the stream's last reset.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("tbptt", 3, streams=2, n_features=4, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> tuple(learner.grad(torch.ones(2, 4))["weight"].shape)
        (2, 4, 4, 8)

    """

    name = "tbptt"
    exact = False

    def __init__(self, input_size: int, config: TBPTTConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        k, streams, n_units = config.truncation, self.streams, self.n_features
        self.window_cell_input = self._zeros(k, streams, self.weight_shape[-1])
        self.window_dc_dpreactivation = self._zeros(k, streams, *self.weight_shape[:2])
        self.window_dh_dpreactivation = self._zeros(k, streams, *self.weight_shape[:2])
        self.window_dc_dc_prev = self._zeros(k, streams, n_units)
        self.window_dh_dc = self._zeros(k, streams, n_units)
        self.steps_in_window = torch.zeros(streams, dtype=torch.long, device=self.device)

    @property
    def truncation(self) -> int:
        """The window ``k``."""
        return int(self.config.truncation)

    def _advance(self, x: Tensor) -> Tensor:
        activations = cell_forward(self.params["weight"], self.carry, x)
        derivatives = cell_derivatives(activations)
        window_and_step = (
            (self.window_cell_input, activations.cell_input),
            (self.window_dc_dpreactivation, derivatives.dc_dpreactivation),
            (self.window_dh_dpreactivation, derivatives.dh_dpreactivation),
            (self.window_dc_dc_prev, derivatives.dc_dc_prev),
            (self.window_dh_dc, derivatives.dh_dc),
        )
        for window, newest in window_and_step:
            window[1:] = window[:-1].clone()  # age every slot by one step; the oldest drops out
            window[0] = newest
        self.steps_in_window.add_(1).clamp_(max=self.truncation)
        self.carry = (activations.h, activations.c)
        return activations.h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        recurrent = recurrent_weight(self.params["weight"], self.input_size)
        gradient = self._zeros(self.streams, *self.weight_shape)
        adjoint_h, adjoint_c = v, torch.zeros_like(v)
        for age in range(self.truncation):
            # A stream whose window ends here (reset, or fewer steps so far) stops receiving.
            in_window = (age < self.steps_in_window).to(self.dtype).unsqueeze(1)
            adjoint_h, adjoint_c = adjoint_h * in_window, adjoint_c * in_window
            derivatives = CellDerivatives(
                self.window_dc_dpreactivation[age],
                self.window_dh_dpreactivation[age],
                self.window_dc_dc_prev[age],
                self.window_dh_dc[age],
            )
            gradient += parameter_vjp(
                derivatives, self.window_cell_input[age], adjoint_h, adjoint_c
            )
            adjoint_h, adjoint_c = apply_state_jacobian_transpose(
                state_jacobian(derivatives, recurrent), adjoint_h, adjoint_c
            )
        return {"weight": gradient}

    def _reset_credit(self, mask: Tensor) -> None:
        self.steps_in_window[mask] = 0

    def fused_layout(self) -> DenseWindow:
        """The tensors the fused TD step advances in place (``kernels/window.cpp``)."""
        return DenseWindow(
            self.params["weight"],
            self.carry,
            self.window_cell_input,
            self.window_dc_dpreactivation,
            self.window_dh_dpreactivation,
            self.window_dc_dc_prev,
            self.window_dh_dc,
            self.steps_in_window,
            self.truncation,
        )

    def _credit_state(self) -> dict[str, Tensor]:
        return {
            "window_cell_input": self.window_cell_input,
            "window_dc_dpreactivation": self.window_dc_dpreactivation,
            "window_dh_dpreactivation": self.window_dh_dpreactivation,
            "window_dc_dc_prev": self.window_dc_dc_prev,
            "window_dh_dc": self.window_dh_dc,
            "steps_in_window": self.steps_in_window,
        }


# ---------------------------------------------------------------------- the compiled step
class WindowArgs(ctypes.Structure):
    """``DenseWindow`` for ``kernels/window.cpp``."""

    _fields_ = [
        ("truncation", ctypes.c_int64),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "weight",
                "h",
                "c",
                "window_cell_input",
                "window_dc_dpreactivation",
                "window_dh_dpreactivation",
                "window_dc_dc_prev",
                "window_dh_dc",
                "steps_in_window",
            )
        ),
    ]


_KERNELS = Path(__file__).parent / "kernels"
WINDOW_KERNEL = Kernel(
    entry="td_window",
    sources=(_KERNELS / "window.cpp",),
    args_type=WindowArgs,
    headers=(_KERNELS / "dense.h",),
)


class DenseWindow(NamedTuple):
    """Tensors of a T-BPTT learner advanced in place by ``WINDOW_KERNEL``."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    window_cell_input: Tensor
    window_dc_dpreactivation: Tensor
    window_dh_dpreactivation: Tensor
    window_dc_dc_prev: Tensor
    window_dh_dc: Tensor
    steps_in_window: Tensor
    """``[B]`` int64."""
    truncation: int

    kernel = WINDOW_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The trained weight."""
        return (self.weight,)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (self.weight, *self.carry, *self[2:8])

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``WindowArgs`` for these tensors."""
        h, c = self.carry
        return struct_arguments(WindowArgs, dtype, {**self._asdict(), "h": h, "c": c})

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``tbptt``."""
    return [
        LearnerSpec(
            name="tbptt",
            learner_class=TBPTTLearner,
            config_class=TBPTTConfig,
            exact=False,
            summary="dense LSTM, truncated BPTT through the last k steps (O(k) per step)",
        )
    ]
