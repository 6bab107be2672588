"""SnAp-1 on the dense LSTM (Menick, Elsen, Evci, Osindero, Simonyan, Graves 2020).

SnAp-n keeps only the entries of the RTRL sensitivity ``ds_t/dW`` that are non-zero after n
steps. For n = 1 those are the immediate Jacobian's: unit ``i`` tracks the influence of its
*own* weights ``W[:, i, :]`` on its own state ``(h_i, c_i)``, so the sensitivities are shaped
like the weight::

    S^h_t[k, i, m] ~= dh_i,t / dW[k, i, m]      S^c_t[k, i, m] ~= dc_i,t / dW[k, i, m]

RTRL's update ``S_t = (ds_t/ds_t-1) S_t-1 + I_t``, restricted to that pattern, keeps the
diagonal of the state Jacobian (see ``agentstate.plugins.dense_lstm``)::

    S^h_t = (dh_t/dh_t-1)_ii S^h_t-1 + (mu f)_i S^c_t-1 + (dh_t/da_k)_i z_m M[i, m]
    S^c_t = (dc_t/dh_t-1)_ii S^h_t-1 +     f_i  S^c_t-1 + (kappa_k)_i    z_m M[i, m]

    grad(v)[k, i, m] = v_i S^h_t[k, i, m]

It drops every path through another unit, so it is an approximation for a dense network.
``connection_density`` thins the recurrent weights between different units with a fixed
random mask ``M`` drawn from the seed (self-connections and input weights always kept; one
mask for every stream). The network itself is the masked one: ``W * M`` in the forward pass,
including ``functional_step``. With density 0 no unit reads another, the network is columnar
and SnAp-1 is exact RTRL. O(parameters) per step.
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
from agentstate.learner import Carry
from agentstate.registry import LearnerSpec

from .dense_lstm import (
    DenseLSTMConfig,
    DenseLSTMLearner,
    cell_derivatives,
    cell_forward,
    recurrent_weight,
)


@dataclass(frozen=True)
class SnAp1Config(DenseLSTMConfig):
    """Hyper-parameters of SnAp-1 (cell defaults: the JMLR 2023 T-BPTT baseline)."""

    connection_density: float = 1.0
    """Fraction of recurrent connections between different units kept (1: dense, 0: columnar)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.connection_density, bool) or not 0 <= self.connection_density <= 1:
            raise ValueError(
                f"connection_density must be in [0, 1], got {self.connection_density!r}"
            )


class SnAp1Learner(DenseLSTMLearner):
    """Dense (or sparsely connected) LSTM trained by SnAp-1.

    ``params["weight"]: [1 or B, 4, n, input_size + n + 1]`` (see ``DenseLSTMLearner``); the
    masked-out recurrent entries start at 0 and receive zero gradient. Credit-assignment
    memory: ``sensitivity_h`` and ``sensitivity_c``, both ``[B, 4, n, input_size + n + 1]``,
    and ``weight_mask: [1, 1, n, input_size + n + 1]`` (the fixed connection mask ``M``).
    Each step updates them in place, in a work space allocated once (one more sensitivity
    and ``z_m M[i, m]: [B, 1, n, input_size + n + 1]``), so no step allocates at their size.

    ``exact`` is False: SnAp-1 is exact only at ``connection_density=0``.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("snap1", 3, streams=2, n_features=4, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> tuple(learner.grad(torch.ones(2, 4))["weight"].shape)
        (2, 4, 4, 8)

    """

    name = "snap1"
    exact = False

    def __init__(self, input_size: int, config: SnAp1Config, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        n_units = self.n_features
        # Drawn after the weights, so the weights equal the other dense learners' for a seed.
        draws = torch.rand((n_units, n_units), dtype=torch.float64, generator=self.generator)
        connected = (draws < config.connection_density) | torch.eye(n_units, dtype=torch.bool)
        self.weight_mask = torch.ones(
            (1, 1, *self.weight_shape[1:]), dtype=self.dtype, device=self.device
        )
        recurrent_weight(self.weight_mask, input_size).copy_(connected.expand(1, 1, -1, -1))
        self.params["weight"].mul_(self.weight_mask)
        self.sensitivity_h = self._zeros(self.streams, *self.weight_shape)
        self.sensitivity_c = self._zeros(self.streams, *self.weight_shape)
        # Work space of the in-place update: the next S^c, then swapped with the last one.
        self._next_sensitivity_c = self._zeros(self.streams, *self.weight_shape)
        self._masked_input = self._zeros(self.streams, 1, *self.weight_shape[1:])

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure cell step of the masked network ``W * M``."""
        return super().functional_step({"weight": params["weight"] * self.weight_mask}, carry, x)

    def _advance(self, x: Tensor) -> Tensor:
        weight = self.params["weight"] * self.weight_mask
        activations = cell_forward(weight, self.carry, x)
        derivatives = cell_derivatives(activations)
        # The diagonal of the state Jacobian: (dh_t/dh_t-1)_ii = sum_k (dh_t/da_k)_i U_k[i, i].
        own_recurrent = recurrent_weight(weight, self.input_size).diagonal(dim1=2, dim2=3)
        dh_dh_prev_own = (derivatives.dh_dpreactivation * own_recurrent).sum(1)
        dc_dh_prev_own = (derivatives.dc_dpreactivation * own_recurrent).sum(1)
        dh_dc_prev_own = derivatives.dh_dc * derivatives.dc_dc_prev

        # z_m M[i, m]: [B, 1, n, d + n + 1]. The immediate term (dh_t/da_k)_i z_m M[i, m] is
        # never formed: addcmul_ broadcasts its [B, 4, n, 1] and [B, 1, n, d + n + 1] factors.
        masked_input = torch.mul(
            activations.cell_input[:, None, None, :], self.weight_mask, out=self._masked_input
        )
        sensitivity_h, sensitivity_c = self.sensitivity_h, self.sensitivity_c
        next_sensitivity_c = torch.mul(
            sensitivity_h, _per_unit(dc_dh_prev_own), out=self._next_sensitivity_c
        )
        next_sensitivity_c.addcmul_(sensitivity_c, _per_unit(derivatives.dc_dc_prev))
        next_sensitivity_c.addcmul_(derivatives.dc_dpreactivation.unsqueeze(-1), masked_input)
        sensitivity_h.mul_(_per_unit(dh_dh_prev_own))
        sensitivity_h.addcmul_(sensitivity_c, _per_unit(dh_dc_prev_own))
        sensitivity_h.addcmul_(derivatives.dh_dpreactivation.unsqueeze(-1), masked_input)

        self.sensitivity_c, self._next_sensitivity_c = next_sensitivity_c, sensitivity_c
        self.carry = (activations.h, activations.c)
        return activations.h

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        return {"weight": _per_unit(v) * self.sensitivity_h}

    def fused_layout(self) -> OwnUnitSensitivities:
        """The tensors the fused TD step advances in place (``kernels/snap1.cpp``)."""
        return OwnUnitSensitivities(
            self.params["weight"],
            self.carry,
            self.sensitivity_h,
            self.sensitivity_c,
            self.weight_mask,
        )

    def _reset_credit(self, mask: Tensor) -> None:
        self.sensitivity_h[mask] = 0.0
        self.sensitivity_c[mask] = 0.0

    def _credit_state(self) -> dict[str, Tensor]:
        # The mask travels with the state: a learner built without a seed restores its network.
        return {
            "sensitivity_h": self.sensitivity_h,
            "sensitivity_c": self.sensitivity_c,
            "weight_mask": self.weight_mask,
        }


def _per_unit(values: Tensor) -> Tensor:
    """View ``[B, n]`` per-unit values as ``[B, 1, n, 1]``, to scale a sensitivity row-wise."""
    return values[:, None, :, None]


# ---------------------------------------------------------------------- the compiled step
class SnapArgs(ctypes.Structure):
    """``OwnUnitSensitivities`` for ``kernels/snap1.cpp``."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("weight", "h", "c", "sensitivity_h", "sensitivity_c", "weight_mask")
    ]


_KERNELS = Path(__file__).parent / "kernels"
SNAP1_KERNEL = Kernel(
    entry="td_snap1",
    sources=(_KERNELS / "snap1.cpp",),
    args_type=SnapArgs,
    headers=(_KERNELS / "dense.h",),
)


class OwnUnitSensitivities(NamedTuple):
    """Tensors of a SnAp-1 learner advanced in place by ``SNAP1_KERNEL``."""

    weight: Tensor
    """``[P, 4, n, d + n + 1]``; the network uses ``weight * weight_mask``."""
    carry: tuple[Tensor, ...]
    """``(h, c)``, each ``[B, n]``."""
    sensitivity_h: Tensor
    """``[B, 4, n, d + n + 1]``."""
    sensitivity_c: Tensor
    """Like ``sensitivity_h``."""
    weight_mask: Tensor
    """``[1, 1, n, d + n + 1]``, 0 or 1 (read only)."""

    kernel = SNAP1_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The trained weight."""
        return (self.weight,)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (self.weight, *self.carry, self.sensitivity_h, self.sensitivity_c, self.weight_mask)

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``SnapArgs`` for these tensors."""
        h, c = self.carry
        return struct_arguments(SnapArgs, dtype, {**self._asdict(), "h": h, "c": c})

    def agent_state(self) -> Tensor:
        """``h: [B, n]`` after the last fused step."""
        return self.carry[0]


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``snap1``."""
    return [
        LearnerSpec(
            name="snap1",
            learner_class=SnAp1Learner,
            config_class=SnAp1Config,
            exact=False,
            summary="dense LSTM, SnAp-1 (own-unit sensitivities); exact at connection_density=0",
        )
    ]
