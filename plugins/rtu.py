"""Recurrent trace units with exact RTRL (Elelimy, White, Bowling, White, NeurIPS 2024).

"Real-time recurrent learning using trace units in reinforcement learning", arXiv 2409.01449:
the *linear* RTU, a complex-valued diagonal linear recurrence followed by a nonlinearity.
``N`` units; unit ``k`` holds a complex state ``c_k`` and a complex eigenvalue
``lambda_k = r_k e^(i theta_k)`` (``(.)`` is the element-wise product)::

    c_t = lambda (.) c_t-1 + gamma (.) (W_1 x_t + i W_2 x_t)          c_t in C^N
    h_t = [f(Re c_t); f(Im c_t)]                                        h_t in R^2N

with the paper's exp-exp parameterisation (the LRU's, Orvieto et al. 2023) and the LRU's
input normalisation ``gamma``::

    r = exp(-exp(nu_log)),   theta = exp(theta_log),   gamma = sqrt(1 - r^2)

so ``0 < r < 1`` -- every eigenvalue inside the unit circle -- for every real ``nu_log``
(in floating point ``r`` rounds to 1 once ``exp(nu_log)`` is below half the machine epsilon:
``nu_log < -16.6`` in float32, ``< -36.7`` in float64). The paper computes the recurrence in
real arithmetic, a 2x2 rotation-scaling per unit (``a = Re c``, ``b = Im c``,
``g = r cos theta``, ``phi = r sin theta``)::

    a_t = g a_t-1 - phi b_t-1 + gamma W_1 x_t
    b_t = phi a_t-1 + g b_t-1 + gamma W_2 x_t

RTRL. Unit ``k`` depends only on ``nu_log[k]``, ``theta_log[k]`` and rows ``k`` of ``W_1,
W_2``, and its recurrent Jacobian is the rotation-scaling ``[[g, -phi], [phi, g]]``, i.e. a
multiplication by ``lambda``. Writing the sensitivity of ``c`` to a real parameter ``p`` as
the complex number ``S^p = da/dp + i db/dp``, with ``u_t = W_1 x_t + i W_2 x_t``,
``nu = exp(nu_log)`` and ``dlambda/dnu_log = -nu lambda``, ``dgamma/dnu_log = nu r^2 / gamma``,
``dlambda/dtheta_log = i theta lambda``::

    S^nu_t    = lambda S^nu_t-1 + nu (r^2 / gamma u_t - lambda c_t-1)        ([N])
    S^theta_t = lambda S^theta_t-1 + i theta lambda c_t-1                    ([N])
    E_t       = lambda E_t-1 + gamma x_t^T                                   ([N, D])

``E`` is the sensitivity to ``W_1``: a complex, decaying, rotating trace of the inputs -- the
"trace" of the units' name. The sensitivity to ``W_2`` obeys the same recursion driven by
``i gamma x_t`` and starts at 0 as well, so it is ``i E_t`` and is not stored. ``grad(v)``
pulls ``v = [v_a; v_b]`` back through ``f``::

    e_a = v_a (.) f'(a_t),   e_b = v_b (.) f'(b_t)
    grad p   = e_a (.) Re S^p + e_b (.) Im S^p          (p = nu_log, theta_log)
    grad W_1 = e_a (.) Re E + e_b (.) Im E,   grad W_2 = e_b (.) Re E - e_a (.) Im E

Exact RTRL at ``O(N D)`` memory and time per step, the cost of the forward step. The TD
engine's compiled step (``kernels/rtu.cpp``, handed its tensors by ``fused_layout``) runs the
same equations.

Initialisation (the authors' public JAX code): ``r^2 ~ U[r_min^2, r_max^2]`` (uniform on the
ring, as in the LRU) with ``r_min = 0``, ``r_max = 1``; ``theta ~ U[0, max_phase]`` with
``max_phase = 6.28``; ``W_1, W_2`` LeCun normal (variance ``1 / D``, truncated at two standard
deviations, flax's ``Dense`` default); no bias. The output nonlinearity ``f`` defaults to the
authors' ReLU; ``tanh`` and ``linear`` are options.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from agentstate.fused import Kernel, struct_arguments
from agentstate.hookspecs import hookimpl
from agentstate.learner import Carry, StateLearner, zero_streams_
from agentstate.registry import LearnerSpec

REAL, IMAGINARY = range(2)
ACTIVATIONS = ("relu", "tanh", "linear")
TRUNCATED_NORMAL_STD = 0.87962566103423978
"""Standard deviation of a standard normal truncated to [-2, 2] (LeCun normal's correction)."""


@dataclass(frozen=True)
class RTUConfig:
    """Hyper-parameters of the RTU learner (defaults: the authors' code)."""

    n_features: int = 16
    """Size of the agent state, ``2 N``: real and imaginary parts of ``N`` units (even)."""
    activation: str = "relu"
    """Output nonlinearity ``f``: ``relu`` (the authors'), ``tanh`` or ``linear``."""
    r_min: float = 0.0
    """Smallest initial eigenvalue modulus ``r`` (``r^2`` starts uniform in [r_min^2, r_max^2])."""
    r_max: float = 1.0
    """Largest initial eigenvalue modulus ``r``."""
    max_phase: float = 6.28
    """Initial eigenvalue phases ``theta`` are uniform in [0, max_phase]."""

    def __post_init__(self) -> None:
        n_features = self.n_features
        if (
            not isinstance(n_features, int)
            or isinstance(n_features, bool)
            or n_features < 2
            or n_features % 2
        ):
            raise ValueError(
                f"n_features must be a positive even int (2 x units), got {n_features!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not 0 <= self.r_min < self.r_max <= 1:
            raise ValueError(
                f"r_min and r_max must satisfy 0 <= r_min < r_max <= 1, got r_min="
                f"{self.r_min!r}, r_max={self.r_max!r}"
            )
        if not self.max_phase > 0:
            raise ValueError(f"max_phase must be > 0, got {self.max_phase!r}")


class Eigenvalues:
    """``lambda = r e^(i theta)`` and ``gamma`` of every unit, from the parameters.

    Attributes (each ``[P, N]``): ``nu = exp(nu_log)``, ``theta = exp(theta_log)``,
    ``r = exp(-nu)``, ``g = r cos theta``, ``phi = r sin theta`` (``lambda = g + i phi``) and
    ``gamma = sqrt(1 - r^2)``, computed as ``sqrt(-expm1(-2 nu))`` so that it stays positive
    and accurate as ``r`` nears 1.
    """

    def __init__(self, nu_log: Tensor, theta_log: Tensor) -> None:
        self.nu = torch.exp(nu_log)
        self.theta = torch.exp(theta_log)
        self.r = torch.exp(-self.nu)
        self.g = self.r * torch.cos(self.theta)
        self.phi = self.r * torch.sin(self.theta)
        self.gamma = torch.sqrt(-torch.expm1(-2 * self.nu))

    def rotate(self, c: Tensor) -> Tensor:
        """``lambda (.) c`` for ``c: [B, 2, N]`` (real and imaginary parts), a new tensor."""
        a, b = c[:, REAL], c[:, IMAGINARY]
        return torch.stack([self.g * a - self.phi * b, self.phi * a + self.g * b], dim=1)


def input_drive(input_weight: Tensor, x: Tensor) -> Tensor:
    """``[W_1 x; W_2 x]`` per stream.

    Args:
        input_weight: ``[P, 2, N, D]`` with ``P`` 1 (shared) or ``B``.
        x: ``[B, D]``.

    Returns:
        ``[B, 2, N]``. A shared weight is one matrix product for all streams.
    """
    streams, (param_streams, parts, units, inputs) = x.shape[0], input_weight.shape
    flat = input_weight.reshape(param_streams, parts * units, inputs)
    if param_streams == 1:
        drive = x @ flat[0].transpose(0, 1)
    else:
        drive = torch.bmm(flat, x.unsqueeze(-1)).squeeze(-1)
    return drive.view(streams, parts, units)


def activation_and_derivative(name: str, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(c), f'(c))`` of the named nonlinearity (ReLU's derivative at 0 is 0, as autograd's)."""
    if name == "relu":
        return torch.relu(c), (c > 0).to(c.dtype)
    if name == "tanh":
        h = torch.tanh(c)
        return h, 1 - h * h
    return c, torch.ones_like(c)


class RTULearner(StateLearner):
    """Recurrent trace units (linear RTUs) trained by exact RTRL.

    Parameters (leading ``1`` shared or ``B`` independent), ``N = n_features / 2`` units:

    * ``nu_log: [P, N]`` -- ``r = exp(-exp(nu_log))``;
    * ``theta_log: [P, N]`` -- ``theta = exp(theta_log)``;
    * ``input_weight: [P, 2, N, D]`` -- ``W_1`` (real part), ``W_2`` (imaginary part).

    Carry: ``(c,)`` with ``c: [B, 2, N]`` (``Re c``, ``Im c``); the agent state is
    ``h = f(c)`` flattened to ``[B, 2N]``: ``[f(Re c); f(Im c)]``. Credit-assignment memory:
    ``sensitivity: [B, 2, N, D + 2]``, real and imaginary parts of ``[E, S^nu, S^theta]`` (see
    the module docstring), so one multiplication by ``lambda`` advances all three.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner("rtu", 3, streams=2, n_features=8, seed=0)
        >>> h = learner.step(torch.ones(2, 3))
        >>> tuple(h.shape)
        (2, 8)
        >>> grads = learner.grad(torch.ones(2, 8))
        >>> tuple(grads["input_weight"].shape), tuple(grads["nu_log"].shape)
        ((2, 2, 4, 3), (2, 4))

    """

    name = "rtu"
    exact = True

    def __init__(self, input_size: int, config: RTUConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        # tanh bounds every entry of h by 1; relu and the identity leave it unbounded.
        self.state_bound = 1.0 if config.activation == "tanh" else None
        units, param_streams = self.n_units, self.param_streams
        # r^2 uniform on [r_min^2, r_max^2], theta on [0, max_phase]; u in the open (0, 1)
        # keeps nu_log and theta_log finite at the defaults r_min = 0, r_max = 1.
        u = self._open_unit_uniform((param_streams, units))
        r_squared = config.r_min**2 + u * (config.r_max**2 - config.r_min**2)
        nu_log = torch.log(-0.5 * torch.log(r_squared))
        theta_log = torch.log(config.max_phase * self._open_unit_uniform((param_streams, units)))
        weight_std = 1 / math.sqrt(input_size) / TRUNCATED_NORMAL_STD
        input_weight = torch.nn.init.trunc_normal_(
            torch.empty((param_streams, 2, units, input_size), dtype=torch.float64),
            std=weight_std,
            a=-2 * weight_std,
            b=2 * weight_std,
            generator=self.generator,
        )
        self.params = {
            key: value.to(dtype=self.dtype, device=self.device)
            for key, value in (
                ("nu_log", nu_log),
                ("theta_log", theta_log),
                ("input_weight", input_weight),
            )
        }
        self.carry = self.initial_carry()
        self.sensitivity = torch.zeros(
            (self.streams, 2, units, input_size + 2), dtype=self.dtype, device=self.device
        )

    def _open_unit_uniform(self, shape: tuple[int, ...]) -> Tensor:
        """float64 draws uniform on the open interval (0, 1)."""
        tiny = torch.finfo(torch.float64).eps / 2
        draws = torch.rand(shape, dtype=torch.float64, generator=self.generator)
        return draws.clamp_(min=tiny)

    @property
    def n_units(self) -> int:
        """Number of complex units ``N``."""
        return int(self.config.n_features) // 2

    @property
    def n_features(self) -> int:
        """``2 N``: the real and imaginary part of every unit."""
        return int(self.config.n_features)

    # ------------------------------------------------------------------ the cell
    def initial_carry(self) -> Carry:
        """``(c,)`` with ``c: [B, 2, N]`` zeros."""
        return (torch.zeros((self.streams, 2, self.n_units), dtype=self.dtype, device=self.device),)

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure cell step; see the module docstring for the equations."""
        (c_prev,) = carry
        eigenvalues = Eigenvalues(params["nu_log"], params["theta_log"])
        drive = input_drive(params["input_weight"], x)
        c = eigenvalues.rotate(c_prev) + eigenvalues.gamma.unsqueeze(1) * drive
        h, _ = activation_and_derivative(self.config.activation, c)
        return (c,), h.flatten(1)

    # ------------------------------------------------------------------ the rule
    def _advance(self, x: Tensor) -> Tensor:
        (c_prev,) = self.carry
        eigenvalues = Eigenvalues(self.params["nu_log"], self.params["theta_log"])
        drive = input_drive(self.params["input_weight"], x)  # u_t: [B, 2, N]
        rotated = eigenvalues.rotate(c_prev)  # lambda c_t-1
        gamma = eigenvalues.gamma
        c = rotated + gamma.unsqueeze(1) * drive

        # S_t = lambda S_t-1 for [E, S^nu, S^theta] at once: a complex product per unit.
        g, phi = eigenvalues.g.unsqueeze(-1), eigenvalues.phi.unsqueeze(-1)
        real, imaginary = self.sensitivity[:, REAL], self.sensitivity[:, IMAGINARY]
        previous_real = real.clone()
        real.mul_(g).addcmul_(imaginary, phi, value=-1)
        imaginary.mul_(g).addcmul_(previous_real, phi)
        # ... + gamma x_t^T (real), + nu (r^2 / gamma u_t - lambda c_t-1), + i theta lambda c_t-1
        inputs = self.input_size
        real[..., :inputs].addcmul_(gamma.unsqueeze(-1), x.unsqueeze(1))
        nu, theta = eigenvalues.nu, eigenvalues.theta
        drive_scale = eigenvalues.r * eigenvalues.r / gamma
        self.sensitivity[..., inputs] += nu.unsqueeze(1) * (
            drive_scale.unsqueeze(1) * drive - rotated
        )
        real[..., inputs + 1] -= theta * rotated[:, IMAGINARY]
        imaginary[..., inputs + 1] += theta * rotated[:, REAL]

        self.carry = (c,)
        h, _ = activation_and_derivative(self.config.activation, c)
        return h.flatten(1)

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        (c,) = self.carry
        _, slope = activation_and_derivative(self.config.activation, c)
        pulled_back = v.view_as(c) * slope  # [e_a; e_b]: [B, 2, N]
        e_real = pulled_back[:, REAL].unsqueeze(-1)
        e_imaginary = pulled_back[:, IMAGINARY].unsqueeze(-1)
        real, imaginary = self.sensitivity[:, REAL], self.sensitivity[:, IMAGINARY]
        # grad p = e_a Re S^p + e_b Im S^p for W_1, nu_log and theta_log (columns D, D + 1).
        gradient = e_real * real + e_imaginary * imaginary
        inputs = self.input_size
        # dc/dW_2 = i E: grad W_2 = e_b Re E - e_a Im E.
        imaginary_weight = e_imaginary * real[..., :inputs] - e_real * imaginary[..., :inputs]
        return {
            "nu_log": gradient[..., inputs],
            "theta_log": gradient[..., inputs + 1],
            "input_weight": torch.stack([gradient[..., :inputs], imaginary_weight], dim=1),
        }

    def _reset_credit(self, mask: Tensor) -> None:
        zero_streams_((self.sensitivity,), mask)

    def _credit_state(self) -> dict[str, Tensor]:
        return {"sensitivity": self.sensitivity}

    def fused_layout(self) -> RTUCells:
        """The tensors the fused TD step advances in place (``kernels/rtu.cpp``)."""
        params = self.params
        return RTUCells(
            params["nu_log"],
            params["theta_log"],
            params["input_weight"],
            self.carry,
            self.sensitivity,
            ACTIVATIONS.index(self.config.activation),
            self.config.activation,
        )


# ---------------------------------------------------------------------- the compiled step
class RTUArgs(ctypes.Structure):
    """``RTUCells`` for ``kernels/rtu.cpp``.

    ``activation`` indexes ``ACTIVATIONS``; ``parameters`` points at an array of three
    pointers, in ``RTUCells.parameters()`` order.
    """

    _fields_ = [
        ("activation", ctypes.c_int64),
        ("c", ctypes.c_void_p),
        ("sensitivity", ctypes.c_void_p),
        ("parameters", ctypes.c_void_p),
    ]


RTU_KERNEL = Kernel(
    entry="td_rtu",
    sources=(Path(__file__).parent / "kernels" / "rtu.cpp",),
    args_type=RTUArgs,
)


class RTUCells(NamedTuple):
    """Tensors of an RTU learner advanced in place by ``RTU_KERNEL``.

    ``P`` is 1 (shared) or ``B``; ``N`` units, ``D`` inputs. Its three parameters are named
    here in the kernel's order; each has its own trace and optimiser state.
    """

    nu_log: Tensor
    """``[P, N]``."""
    theta_log: Tensor
    """``[P, N]``."""
    input_weight: Tensor
    """``[P, 2, N, D]``: ``W_1, W_2``."""
    carry: tuple[Tensor, ...]
    """``(c,)``, ``[B, 2, N]``: real and imaginary parts."""
    sensitivity: Tensor
    """``[B, 2, N, D + 2]``: real and imaginary parts of ``[E, S^nu, S^theta]``."""
    activation: int
    """Index of the output nonlinearity in ``ACTIVATIONS``."""
    activation_name: str
    """Its name, for ``agent_state``."""

    kernel = RTU_KERNEL

    def parameters(self) -> tuple[Tensor, ...]:
        """The learner's parameters in the kernel's order."""
        return (self.nu_log, self.theta_log, self.input_weight)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor the kernel touches."""
        return (*self.parameters(), *self.carry, self.sensitivity)

    def arguments(self, dtype: torch.dtype) -> tuple[ctypes.Structure, list[Any]]:
        """``RTUArgs`` for these tensors."""
        (c,) = self.carry
        return struct_arguments(
            RTUArgs,
            dtype,
            {
                "activation": self.activation,
                "c": c,
                "sensitivity": self.sensitivity,
                "parameters": self.parameters(),
            },
        )

    def agent_state(self) -> Tensor:
        """``h = f(c)`` flattened to ``[B, 2N]`` after the last fused step (a new tensor)."""
        h, _ = activation_and_derivative(self.activation_name, self.carry[0])
        return h.flatten(1)


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``rtu``."""
    return [
        LearnerSpec(
            name="rtu",
            learner_class=RTULearner,
            config_class=RTUConfig,
            exact=True,
            summary="recurrent trace units (Elelimy et al. 2024), complex diagonal, exact RTRL",
        )
    ]
