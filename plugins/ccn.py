"""Columnar-constructive network (CCN) with exact RTRL (Javed, Shah, Sutton, White, JMLR 2023).

``T`` scalar-state LSTM columns are built in stages of ``L`` ("T:L:S", ``S`` steps per stage;
columnar is ``T:T:inf``, purely constructive is ``T:1:S``). Stage ``k`` owns the columns
``[kL, (k+1)L)``. Column ``j`` of stage ``k`` reads the raw input, the previous states of every
column of the earlier stages, its own previous state and a bias::

    z_j,t = [x_t, n_k(h_<k,t-1), h_j,t-1, 1]                        (size d + kL + 2)
    a = W_j z_j;  i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
    c_j,t = f c_j,t-1 + i g;   h_j,t = o tanh(c_j,t)

where ``h_<k`` are the states of columns ``[0, kL)``. Only the *active* stage learns: the
earlier stages are frozen (weights and normalisation statistics), and the columns of later
stages are not built yet: their state and carry are exactly 0 until their stage starts, so the
agent state always has ``T`` entries.

Normalisation, as in the authors' code, where every column normalises what it reads: stage
``k`` normalises the raw input (``normalize_inputs``) and the earlier columns' states
(``normalize_features``) with running statistics of its own, ``n_k(u) = (u - mu_k) /
sqrt(var_k)`` (every column of a stage reads the same values over the same steps, so the
authors' per-column statistics coincide). After each step of the active stage ``k``, with rate
``r``, floor ``var_min`` and the values ``u`` that step read (``x_t`` and ``h_<k,t-1``,
averaged over the streams when the parameters are shared)::

    mu_k  <- r mu_k + (1 - r) u
    var_k <- max(r var_k + (1 - r) (u - mu_k)^2, var_min)

A stage's statistics freeze with its weights. A new stage starts from the live statistics of
the stage before it (the authors' not-yet-active columns track them from the start); its
statistics of the columns that stage built start at ``mu = 0, var = 1``. With
``normalize_inputs`` the learner expects the raw observation: a TD engine hands it over
unnormalised (``normalizes_inputs``).

Exactness. The frozen columns and the statistics never depend on the active weights, and the
active columns do not read each other, so each active column is an independent scalar-state
column whose input ``z`` is exogenous: columnar RTRL is exact. With ``kappa = dc/da =
(g i(1-i), c_t-1 f(1-f), i (1-g^2), 0)`` per gate and ``u`` the self-recurrent weights::

    S^c_t = f S^c_t-1 + (kappa . u) S^h_t-1 + kappa (x) z
    S^h_t = tanh(c_t) o(1-o) (u_o S^h_t-1 + e_o (x) z) + o (1 - tanh(c_t)^2) S^c_t

(``agentstate.plugins.columnar.column_sensitivities``). The sensitivities start at 0 when a
stage starts (its columns did not exist before), so ``grad`` is the exact gradient of
``v . h_t`` with respect to the active weights through the network as it actually ran since the
stage began: its frozen columns' trajectories, whatever weights the earlier stages had while
they were trained.

Heads. A TD engine divides its heads' step size by the number of columns built so far
(``n_built_features``: ``alpha / 4, alpha / 8, ...`` for 20:4) and starts the heads and
feature statistics of newly built columns afresh, as the authors' code does.

Schedule. ``begin_step`` (called by ``step``, and by a TD engine before its compiled step)
counts the steps of the active stage; the step after the ``S``-th runs in the next stage
(``advance_stage()`` moves on at once). The last stage stays active forever. On a
stage change the active weights are copied into the frozen store (a later in-place update of
the old ``params`` tensor cannot reach them) and ``params`` becomes a new dict holding the new
stage's tensor: consumers detect the change by tensor identity.

Differences from the authors' C++ (``lstm_incremental_networks.cpp``, ``lstm.cpp``): there,
not-yet-active columns run from the start (with head weight 0), statistics are updated before
the value they normalise, and the sensitivity update re-reads the earlier columns' states after
they advanced (``h_t`` where the forward pass used ``h_t-1``). Here they are 0 until built,
statistics move after the step that read them, and the sensitivities use the forward pass's
own ``z``, which is what makes them exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from agentstate.hookspecs import hookimpl
from agentstate.learner import Carry, StateLearner, zero_streams_
from agentstate.registry import LearnerSpec

from .columnar import (
    N_GATES,
    ColumnStages,
    column_preactivations,
    column_sensitivities,
    gate_activations,
)

CCN_PRESETS: dict[str, dict[str, int]] = {
    "columnar-7": {"n_features": 7, "columns_per_stage": 7, "steps_per_stage": 50_000_000},
    "ccn-20-4": {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": 10_000_000},
    "constructive-10": {"n_features": 10, "columns_per_stage": 1, "steps_per_stage": 5_000_000},
}
"""The JMLR paper's "T:L:S" settings, as keyword arguments of ``make_learner("ccn", ...)``."""


_STAGE_GROUPS = {
    "weights": "stage_weights",
    "input_mean": "input_mean",
    "input_variance": "input_variance",
    "feature_mean": "feature_mean",
    "feature_variance": "feature_variance",
}
"""``state_dict()["stages"]`` group -> learner attribute (a list with one tensor per stage)."""


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class CCNConfig:
    """Hyper-parameters of the CCN learner (defaults: the paper's 20:4:10M)."""

    n_features: int = 20
    """Total number of columns ``T``, i.e. the size of the agent state."""
    columns_per_stage: int = 4
    """Columns ``L`` built per stage; must divide ``n_features``."""
    steps_per_stage: int = 10_000_000
    """Calls to ``step`` ``S`` before the next stage starts."""
    init_scale: float = 0.01
    """Every weight starts uniform in [-init_scale, init_scale] (the authors' C++)."""
    normalize_inputs: bool = True
    """Each stage normalises the raw input with its own statistics, frozen with the stage."""
    normalize_features: bool = True
    """Normalise the earlier columns' states that a stage reads (running mean and variance)."""
    normalization_rate: float = 0.99999
    """EMA decay ``r`` of the input and feature statistics (the authors' C++; 1: frozen)."""
    variance_floor: float = 0.01
    """Lower bound of the running feature variance (``std_cap`` in the authors' C++)."""

    def __post_init__(self) -> None:
        for name in ("n_features", "columns_per_stage", "steps_per_stage"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.columns_per_stage > self.n_features:
            raise ValueError(
                f"columns_per_stage ({self.columns_per_stage}) must be <= n_features "
                f"({self.n_features})"
            )
        if self.n_features % self.columns_per_stage:
            raise ValueError(
                f"columns_per_stage ({self.columns_per_stage}) must divide n_features "
                f"({self.n_features}) into whole stages"
            )
        if not self.init_scale >= 0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale!r}")
        for name in ("normalize_inputs", "normalize_features"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not 0 <= self.normalization_rate <= 1:
            raise ValueError(
                f"normalization_rate must be in [0, 1], got {self.normalization_rate!r}"
            )
        if not self.variance_floor > 0:
            raise ValueError(f"variance_floor must be > 0, got {self.variance_floor!r}")

    @property
    def n_stages(self) -> int:
        """Number of stages ``T / L``."""
        return self.n_features // self.columns_per_stage


class CCNLearner(StateLearner):
    """Scalar-state LSTM columns built in stages; exact RTRL for the active stage.

    ``params["weight"]: [1 or B, L, 4, input_size + kL + 2]`` for the active stage ``k`` (last
    axis: input weights, weights on the ``kL`` earlier columns' normalised states, self-recurrent
    weight, bias; gates ``i, f, g, o``). ``stage_weights[s]`` holds stage ``s``'s weights (the
    frozen ones for ``s < k``, the initial ones for ``s > k``; ``stage_weights[k]`` is
    ``params["weight"]``). ``input_mean[s]``, ``input_variance[s]``: ``[1 or B, d]``;
    ``feature_mean[s]``, ``feature_variance[s]``: ``[1 or B, sL]``.
    Credit-assignment memory: ``sensitivity_h``, ``sensitivity_c``, both shaped like the
    active weights with ``B`` leading.

    Example:
        >>> import torch, agentstate
        >>> learner = agentstate.make_learner(
        ...     "ccn", 3, streams=2, n_features=6, columns_per_stage=2, steps_per_stage=5, seed=0
        ... )
        >>> for _ in range(6):
        ...     h = learner.step(torch.ones(2, 3))
        >>> learner.active_stage, tuple(h.shape), tuple(learner.params["weight"].shape)
        (1, (2, 6), (1, 2, 4, 7))

    """

    name = "ccn"
    exact = True
    state_bound = 1.0  # h = o tanh(c): every entry in [-1, 1]

    def __init__(self, input_size: int, config: CCNConfig, **options: Any) -> None:
        super().__init__(input_size, config, **options)
        columns = config.columns_per_stage
        self.stage_weights = [
            self._initial_weight(input_size + stage * columns + 2)
            for stage in range(config.n_stages)
        ]
        self.input_mean = [
            self._zeros((self.param_streams, input_size)) for _ in range(config.n_stages)
        ]
        self.input_variance = [torch.ones_like(mean) for mean in self.input_mean]
        self.feature_mean = [
            self._zeros((self.param_streams, stage * columns)) for stage in range(config.n_stages)
        ]
        self.feature_variance = [torch.ones_like(mean) for mean in self.feature_mean]
        self.carry = self.initial_carry()
        self.steps_in_stage = 0
        self._enter_stage(0)

    def _initial_weight(self, column_input_size: int) -> Tensor:
        shape = (self.param_streams, self.config.columns_per_stage, N_GATES, column_input_size)
        initial = torch.empty(shape, dtype=torch.float64).uniform_(
            -self.config.init_scale, self.config.init_scale, generator=self.generator
        )
        return initial.to(dtype=self.dtype, device=self.device)

    def _zeros(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _enter_stage(self, stage: int) -> None:
        """Make ``stage`` the active one: new ``params`` dict and zero sensitivities."""
        self._active_stage = stage
        weight = self.stage_weights[stage]
        self.params = {"weight": weight}
        self.sensitivity_h = self._zeros((self.streams, *weight.shape[1:]))
        self.sensitivity_c = self._zeros((self.streams, *weight.shape[1:]))

    # ------------------------------------------------------------------ stages
    @property
    def n_features(self) -> int:
        """Total number of columns ``T`` (built or not)."""
        return int(self.config.n_features)

    @property
    def n_stages(self) -> int:
        """Number of stages ``T / L``."""
        return int(self.config.n_stages)

    @property
    def n_built_features(self) -> int:
        """Columns built so far: those of the stages up to the active one."""
        return (self._active_stage + 1) * self.config.columns_per_stage

    @property
    def normalizes_inputs(self) -> bool:
        """Whether each stage normalises the raw input itself (``normalize_inputs``)."""
        return bool(self.config.normalize_inputs)

    @property
    def active_stage(self) -> int:
        """Index of the stage whose columns learn now."""
        return self._active_stage

    def _columns(self, stage: int) -> slice:
        width = self.config.columns_per_stage
        return slice(stage * width, (stage + 1) * width)

    def advance_stage(self) -> bool:
        """Freeze the active stage and start the next one.

        Returns:
            True if a new stage started; False at the last stage, which stays active.

        """
        if self._active_stage == self.n_stages - 1:
            return False
        frozen = self._active_stage
        self.stage_weights[frozen] = self.params["weight"].detach().clone()
        # The new stage's statistics carry on from the live ones (the frozen stage keeps its
        # own); those of the columns just frozen start at mean 0, variance 1.
        self.input_mean[frozen + 1].copy_(self.input_mean[frozen])
        self.input_variance[frozen + 1].copy_(self.input_variance[frozen])
        earlier = frozen * self.config.columns_per_stage
        self.feature_mean[frozen + 1][:, :earlier] = self.feature_mean[frozen]
        self.feature_variance[frozen + 1][:, :earlier] = self.feature_variance[frozen]
        self._enter_stage(frozen + 1)
        self.steps_in_stage = 0
        return True

    # ------------------------------------------------------------------ the cell
    def initial_carry(self) -> Carry:
        """``(h, c)``, each ``[B, n_features]`` zeros."""
        shape = (self.streams, self.n_features)
        return (self._zeros(shape), self._zeros(shape))

    def _stage_input(self, stage: int, x: Tensor, h_prev: Tensor) -> Tensor:
        """``n_k([x, h_<k]): [B, d + kL]``, the part of ``z`` shared by stage ``k``'s columns."""
        if self.config.normalize_inputs:
            x = (x - self.input_mean[stage]) / torch.sqrt(self.input_variance[stage])
        earlier_features = h_prev[:, : stage * self.config.columns_per_stage]
        if self.config.normalize_features:
            earlier_features = (earlier_features - self.feature_mean[stage]) / torch.sqrt(
                self.feature_variance[stage]
            )
        return torch.cat([x, earlier_features], dim=1)

    def _cell(
        self, active_weight: Tensor, carry: Carry, x: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """Step the built columns.

        Returns:
            ``h, c: [B, n_features]``, the gates ``(i, f, g, o)`` of the built columns, each
            ``[B, (k+1)L]``, and the active stage's input ``[x, n_k(h_<k)]: [B, d + kL]``.

        """
        h_prev, c_prev = carry
        stage = self._active_stage
        frozen_preactivations = [
            column_preactivations(
                self.stage_weights[earlier],
                h_prev[:, self._columns(earlier)],
                self._stage_input(earlier, x, h_prev),
            )
            for earlier in range(stage)
        ]
        active_input = self._stage_input(stage, x, h_prev)
        active_preactivation = column_preactivations(
            active_weight, h_prev[:, self._columns(stage)], active_input
        )
        gates = gate_activations(torch.cat([*frozen_preactivations, active_preactivation], dim=1))
        input_gate, forget_gate, candidate, output_gate = gates
        n_built = self._columns(stage).stop
        c_built = forget_gate * c_prev[:, :n_built] + input_gate * candidate
        h_built = output_gate * torch.tanh(c_built)
        not_built = h_prev.new_zeros(self.streams, self.n_features - n_built)
        h = torch.cat([h_built, not_built], dim=1)
        c = torch.cat([c_built, not_built], dim=1)
        return h, c, gates, active_input

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """One pure step of the network as it stands now (active stage, frozen stages, stats).

        ``params["weight"]`` replaces the active stage's weights; later stages output 0.
        """
        h, c, _, _ = self._cell(params["weight"], carry, x)
        return (h, c), h

    # ------------------------------------------------------------------ the rule
    def begin_step(self) -> None:
        """Start the next stage when the schedule says so, and count the step in its stage."""
        if self.steps_in_stage >= self.config.steps_per_stage:
            self.advance_stage()
        self.steps_in_stage += 1

    def _advance(self, x: Tensor) -> Tensor:
        weight = self.params["weight"]
        h_prev, c_prev = self.carry
        h, c, gates, active_input = self._cell(weight, self.carry, x)

        active = self._columns(self._active_stage)
        h_prev_active = h_prev[:, active]
        # z = [x, n_k(h_<k), h_j,t-1, 1] for every active column.
        column_input = torch.cat(
            [
                active_input.unsqueeze(1).expand(-1, self.config.columns_per_stage, -1),
                h_prev_active.unsqueeze(-1),
                torch.ones_like(h_prev_active).unsqueeze(-1),
            ],
            dim=-1,
        )
        input_gate, forget_gate, candidate, output_gate = (gate[:, active] for gate in gates)
        column_sensitivities(
            weight[..., active_input.shape[1]],
            column_input,
            (input_gate, forget_gate, candidate, output_gate),
            c_prev[:, active],
            c[:, active],
            self.sensitivity_h,
            self.sensitivity_c,
        )
        stage = self._active_stage
        if self.config.normalize_inputs:
            self._update_statistics(self.input_mean[stage], self.input_variance[stage], x)
        if self.config.normalize_features and stage > 0:
            self._update_statistics(
                self.feature_mean[stage], self.feature_variance[stage], h_prev[:, : active.start]
            )
        self.carry = (h, c)
        return h

    def _update_statistics(self, mean: Tensor, variance: Tensor, values: Tensor) -> None:
        """Fold ``values: [B, size]`` into a running mean and variance (module docstring)."""
        rate = self.config.normalization_rate
        mean.mul_(rate).add_((1 - rate) * self._over_streams(values))
        squared_deviation = self._over_streams((values - mean) ** 2)
        variance.mul_(rate).add_((1 - rate) * squared_deviation)
        variance.clamp_(min=self.config.variance_floor)

    def _over_streams(self, value: Tensor) -> Tensor:
        """``value: [B, ...]`` averaged over the streams when they share one network."""
        return value if self.independent_params else value.mean(dim=0, keepdim=True)

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        v_active = v[:, self._columns(self._active_stage)]
        return {"weight": v_active[..., None, None] * self.sensitivity_h}

    def _reset_credit(self, mask: Tensor) -> None:
        zero_streams_((self.sensitivity_h, self.sensitivity_c), mask)

    def _credit_state(self) -> dict[str, Tensor]:
        return {"sensitivity_h": self.sensitivity_h, "sensitivity_c": self.sensitivity_c}

    def fused_layout(self) -> ColumnStages:
        """The tensors the fused TD step advances in place (the stages built so far)."""
        built = self._active_stage + 1
        return ColumnStages(
            weights=(*self.stage_weights[: built - 1], self.params["weight"]),
            input_mean=self.input_mean[:built] if self.config.normalize_inputs else (),
            input_variance=self.input_variance[:built] if self.config.normalize_inputs else (),
            feature_mean=self.feature_mean[:built],
            feature_variance=self.feature_variance[:built],
            carry=self.carry,
            sensitivity_h=self.sensitivity_h,
            sensitivity_c=self.sensitivity_c,
            columns_per_stage=self.config.columns_per_stage,
            normalize_features=self.config.normalize_features,
            normalization_rate=self.config.normalization_rate,
            variance_floor=self.config.variance_floor,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the base state plus ``stages``: active stage, step count, weights, statistics."""
        state = super().state_dict()
        state["stages"] = {
            "active_stage": self._active_stage,
            "steps_in_stage": self.steps_in_stage,
            "weights": [weight.detach().clone() for weight in self.stage_weights],
            "input_mean": [mean.clone() for mean in self.input_mean],
            "input_variance": [variance.clone() for variance in self.input_variance],
            "feature_mean": [mean.clone() for mean in self.feature_mean],
            "feature_variance": [variance.clone() for variance in self.feature_variance],
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict``, entering the saved stage first (its shapes differ)."""
        stages = state.get("stages")
        saved_stage = stages.get("active_stage") if isinstance(stages, Mapping) else None
        previous = (self._active_stage, self.params, self.sensitivity_h, self.sensitivity_c)
        try:
            if (
                isinstance(saved_stage, int)
                and 0 <= saved_stage < self.n_stages
                and saved_stage != self._active_stage
            ):
                self._enter_stage(saved_stage)
            super().load_state_dict(state)
            if not isinstance(stages, Mapping):
                raise ValueError(f"{self.name}: cannot load state: it has no 'stages' group")
            for group, attribute in _STAGE_GROUPS.items():
                target = dict(enumerate(getattr(self, attribute)))
                self._copy_group(group, target, dict(enumerate(stages[group])))
            self.steps_in_stage = int(stages["steps_in_stage"])
        except Exception:
            self._active_stage, self.params, self.sensitivity_h, self.sensitivity_c = previous
            raise


@hookimpl
def agentstate_learners() -> list[LearnerSpec]:
    """Register ``ccn``."""
    return [
        LearnerSpec(
            name="ccn",
            learner_class=CCNLearner,
            config_class=CCNConfig,
            exact=True,
            summary="columnar-constructive: LSTM columns built in frozen stages, exact RTRL",
        )
    ]
