"""Online TD(lambda) prediction over a learned agent state.

One step of the engine, per stream ``b`` and cumulant ``k`` (background §2)::

    x^    = normalize(x_t)                       (optional, online)
    h_t   = learner.step(x^)
    phi_t = [normalize(h_t), x^ (optional), 1]   (head features, F of them)
    y_t   = W_k . phi_t
    delta = c_t + gamma_t y_t - y_t-1            (0 for a stream's first step after a reset)
    theta <- theta + step * delta * trace        (trace from the previous step; via optimiser)
    trace <- gamma_t lambda trace + d y_t / d theta

``d y_t / d theta`` for the learner's parameters is ``learner.grad(W_k[:n] / std_h)``, the
learner's own online estimate; for the head it is ``phi_t``. With shared parameters
(``[1, ...]``) the per-stream updates are averaged; with independent ones each stream
updates its own copy. ``gamma_t = 0`` marks the end of an episode: no bootstrapping across it.

Two implementations of the step, chosen by ``TDConfig.backend``: the eager one below (torch
ops; any learner, device and optimiser: the reference) and a compiled one (``agentstate.fused``)
for learners whose ``fused_layout()`` names a kernel, on the CPU: every built-in learner but
``rtrl``, and any plugin that ships one. The engine hands the kernel an explicit
``fused.EngineState``; per step it checks the inputs' finiteness, calls ``learner.begin_step()``
and runs the kernel. The two agree to rounding, and the tests hold them to it.
"""

from __future__ import annotations

import copy
import itertools
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from agentstate import fused
from agentstate.learner import StateLearner, zero_streams_
from agentstate.normalization import OnlineNormalizer
from agentstate.optim import OPTIMIZERS, make_optimizer, optimizer_state, restart_entries

BACKENDS = ("auto", "eager", "fused")


@dataclass(frozen=True)
class TDConfig:
    """Hyper-parameters of the TD(lambda) engine (defaults: JMLR 2023 trace patterning)."""

    gamma: float = 0.9
    """Discount of the predicted return (overridable per step, stream and head)."""
    lambda_: float = 0.99
    """Trace decay."""
    step_size: float = 0.001
    """Step size of the learner's parameters (the authors' best on trace patterning)."""
    head_step_size: float | None = None
    """Step size of the linear heads; None: step_size / number of normalised head features
    built so far (agent state, plus the observation if the heads see it), as the authors'."""
    optimizer: str = "rmsprop_td"
    """``sgd``, ``rmsprop_td`` (the authors' normaliser) or ``adam``."""
    include_observation: bool = False
    """Heads also see the (normalised) observation, not only the agent state."""
    include_bias: bool = True
    """Heads have a bias feature."""
    normalize_inputs: bool = True
    """Normalise the observation online before the learner sees it."""
    normalize_features: bool = True
    """Normalise the agent state online before the heads see it."""
    normalization_decay: float = 0.99999
    """EMA decay of the running means and variances (1 disables normalisation)."""
    variance_floor: float = 0.01
    """Lower bound on running variances (the authors' std_cap)."""
    train_learner: bool = True
    """Update the learner's parameters (False: only the heads learn)."""
    backend: str = "auto"
    """``auto``: the fused kernel where it applies (``agentstate.fused``), else eager;
    ``eager``: always the torch ops; ``fused``: the kernel or an error saying why not."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma!r}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must lie in [0, 1], got {self.lambda_!r}")
        if not self.step_size >= 0.0:
            raise ValueError(f"step_size must be >= 0, got {self.step_size!r}")
        if self.head_step_size is not None and not self.head_step_size >= 0.0:
            raise ValueError(f"head_step_size must be >= 0, got {self.head_step_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend {self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}"
            )


class TDPredictor:
    """Predicts ``n_cumulants`` discounted sums of cumulants from a learner's agent state.

    Example:
        >>> import torch, agentstate
        >>> from agentstate.td import TDConfig, TDPredictor
        >>> learner = agentstate.make_learner("columnar", 12, streams=4, seed=0)
        >>> predictor = TDPredictor(learner, n_cumulants=1, config=TDConfig(gamma=0.9))
        >>> prediction = predictor.step(torch.zeros(4, 12), torch.zeros(4, 1))
        >>> tuple(prediction.shape)
        (4, 1)
    """

    def __init__(
        self, learner: StateLearner, n_cumulants: int = 1, config: TDConfig | None = None
    ) -> None:
        if not isinstance(n_cumulants, int) or n_cumulants < 1:
            raise ValueError(f"n_cumulants must be a positive int, got {n_cumulants!r}")
        self.learner = learner
        config = config or TDConfig()
        self.config = config
        self.n_cumulants = n_cumulants
        streams, dtype, device = learner.streams, learner.dtype, learner.device
        param_streams = learner.param_streams
        self.n_head_features = (
            learner.n_features
            + (learner.input_size if self.config.include_observation else 0)
            + (1 if self.config.include_bias else 0)
        )
        self.input_normalizer = self._normalizer(learner.input_size, config.normalize_inputs)
        self.feature_normalizer = self._normalizer(learner.n_features, config.normalize_features)
        self._built_features = learner.n_built_features
        self.head_weight = torch.zeros(
            param_streams, n_cumulants, self.n_head_features, dtype=dtype, device=device
        )
        self.head_trace = torch.zeros(
            streams, n_cumulants, self.n_head_features, dtype=dtype, device=device
        )
        self.previous_prediction = torch.zeros(streams, n_cumulants, dtype=dtype, device=device)
        self.has_previous = torch.zeros(streams, dtype=torch.bool, device=device)
        self._learner_params: dict[str, Tensor] = {}
        self.learner_traces: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Optimizer = self._build_optimizer()
        self._fused_state: fused.EngineState | None = None
        self._fused_state_tensors: tuple[Any, ...] = ()
        self._fused = self._fused_step()
        self._eager_state: Tensor | None = None  # h_t of the latest eager step

    def _fused_step(self) -> fused.FusedTDStep | None:
        """The learner's compiled step if ``config.backend`` asks for it and it applies."""
        if self.config.backend == "eager":
            return None
        learner = self.learner
        reason = fused.unsupported_reason(
            learner, self.config.optimizer, self.optimizer.param_groups
        )
        kernel = learner.fused_layout().kernel if reason is None else None  # type: ignore[attr-defined]
        library = fused.load_kernel(kernel) if kernel is not None else None
        if kernel is not None and library is not None:
            return fused.FusedTDStep(
                kernel,
                library,
                learner.dtype,
                streams=learner.streams,
                input_size=learner.input_size,
                n_cumulants=self.n_cumulants,
            )
        if self.config.backend == "fused":
            reason = reason or "the kernel could not be built (see the warning above)"
            raise ValueError(f"backend='fused' cannot run this predictor: {reason}")
        return None

    def _engine_state(self) -> fused.EngineState:
        """What the compiled step reads and writes of this engine (rebuilt when replaced)."""
        tensors = self._engine_tensors()
        state = self._fused_state
        if (
            state is not None
            and len(tensors) == len(self._fused_state_tensors)
            and all(map(operator.is_, tensors, self._fused_state_tensors))
        ):
            return state
        config, learner = self.config, self.learner
        trains = config.train_learner and bool(self._learner_params)
        optimizer = self.optimizer
        state = fused.EngineState(
            streams=learner.streams,
            param_streams=learner.param_streams,
            input_size=learner.input_size,
            n_features=learner.n_features,
            n_cumulants=self.n_cumulants,
            n_head_features=self.n_head_features,
            include_observation=config.include_observation,
            include_bias=config.include_bias,
            train_learner=trains,
            lambda_=config.lambda_,
            input_decay=self.input_normalizer.decay,
            input_floor=self.input_normalizer.variance_floor,
            feature_decay=self.feature_normalizer.decay,
            feature_floor=self.feature_normalizer.variance_floor,
            optimizer=config.optimizer,
            param_groups=optimizer.param_groups,
            input_mean=self.input_normalizer.mean,
            input_variance=self.input_normalizer.variance,
            feature_mean=self.feature_normalizer.mean,
            feature_variance=self.feature_normalizer.variance,
            previous_prediction=self.previous_prediction,
            has_previous=self.has_previous,
            head_weight=self.head_weight,
            head_trace=self.head_trace,
            head_optimizer_state=optimizer_state(optimizer, self.head_weight),
            learner_parameters=dict(self._learner_params),
            learner_traces=dict(self.learner_traces),
            learner_optimizer_states={
                key: optimizer_state(optimizer, param) if trains else (None, None, None)
                for key, param in self._learner_params.items()
            },
        )
        self._fused_state = state
        self._fused_state_tensors = self._engine_tensors()  # optimiser state now exists
        return state

    def _engine_tensors(self) -> tuple[Any, ...]:
        """Every object of this engine whose replacement calls for a new ``EngineState``."""
        states = self.optimizer.state.values()
        return (
            self.optimizer,
            self.optimizer.state,
            self.previous_prediction,
            self.has_previous,
            self.input_normalizer.mean,
            self.input_normalizer.variance,
            self.feature_normalizer.mean,
            self.feature_normalizer.variance,
            self.head_weight,
            self.head_trace,
            *self.learner_traces.values(),
            *states,
            *itertools.chain.from_iterable(map(dict.values, states)),
        )

    @property
    def backend(self) -> str:
        """The implementation in use: ``fused`` or ``eager``."""
        return "eager" if self._fused is None else "fused"

    @property
    def agent_state(self) -> Tensor:
        """``h_t: [B, n_features]``, the learner's output that the latest step's heads read.

        Valid until the next step (the fused kernel advances its tensors in place): copy it
        to keep it.
        """
        if self._fused is not None:
            return self.learner.fused_layout().agent_state()  # type: ignore[attr-defined]
        if self._eager_state is None:
            raise RuntimeError("agent_state: no step has been taken yet; call step() first")
        return self._eager_state

    # ---------------------------------------------------------------- set-up
    def _normalizer(self, size: int, enabled: bool) -> OnlineNormalizer:
        return OnlineNormalizer(
            size,
            param_streams=self.learner.param_streams,
            decay=self.config.normalization_decay if enabled else 1.0,
            variance_floor=self.config.variance_floor,
            dtype=self.learner.dtype,
            device=self.learner.device,
        )

    @property
    def head_step_size(self) -> float:
        """Step size of the heads (default: step_size / normalised head features built)."""
        if self.config.head_step_size is not None:
            return self.config.head_step_size
        observed = self.learner.input_size if self.config.include_observation else 0
        return self.config.step_size / (self.learner.n_built_features + observed)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """(Re)bind traces and optimiser to the learner's current ``params``.

        Called at start and whenever the learner replaces its parameter tensors (a
        constructive learner moving to its next stage); the heads keep their optimiser state.
        """
        learner = self.learner
        self._learner_params = dict(learner.params)
        self.learner_traces = {
            key: torch.zeros(
                self.n_cumulants,
                learner.streams,
                *param.shape[1:],
                dtype=learner.dtype,
                device=learner.device,
            )
            for key, param in self._learner_params.items()
        }
        groups: list[dict[str, Any]] = [{"params": [self.head_weight], "lr": self.head_step_size}]
        if self.config.train_learner and self._learner_params:
            groups.append(
                {"params": list(self._learner_params.values()), "lr": self.config.step_size}
            )
        optimizer = make_optimizer(self.config.optimizer, groups)
        previous = getattr(self, "optimizer", None)
        if previous is not None and self.head_weight in previous.state:
            optimizer.state[self.head_weight] = previous.state[self.head_weight]
        self._start_built_features(optimizer)
        return optimizer

    def _start_built_features(self, optimizer: torch.optim.Optimizer) -> None:
        """Features a constructive learner has just built start as if new to the heads.

        Until built they were 0: their normaliser variance decayed to the floor and their
        heads' optimiser state decayed with no gradient. Both restart (mean 0, variance 1,
        fresh optimiser state), as in the authors' code, where neither moves before then.
        """
        built = self.learner.n_built_features
        if built > self._built_features:
            new = slice(self._built_features, built)
            restart_entries(optimizer, self.head_weight, new)
            self.feature_normalizer.mean[:, new] = 0.0
            self.feature_normalizer.variance[:, new] = 1.0
        self._built_features = built

    def follow_learner_parameters(self) -> None:
        """Rebind traces and optimiser to the learner's parameters if it has replaced them.

        A constructive learner does at its next stage; otherwise this does nothing.
        """
        current = self.learner.params
        followed = self._learner_params
        if (
            len(current) != len(followed)
            or not all(map(operator.is_, current.values(), followed.values()))
            or current.keys() != followed.keys()
        ):
            self.optimizer = self._build_optimizer()

    # ---------------------------------------------------------------- the step
    def step(
        self,
        observation: Tensor,
        cumulant: Tensor,
        *,
        discount: Tensor | float | None = None,
        episode_start: Tensor | None = None,
    ) -> Tensor:
        """Advance every stream by one observation and learn from the TD error.

        Args:
            observation: ``[B, input_size]``, the learner's dtype.
            cumulant: ``[B, n_cumulants]``, the cumulant that arrived with ``observation``.
            discount: continuation ``gamma_t`` of the transition into ``observation``:
                a float, a ``[B]`` tensor (per stream) or a ``[B, n_cumulants]`` one (per
                stream and cumulant: heads of different horizons; 0 makes a head's TD error
                ``c_t+1 - y_t`` with trace ``d y_t / d theta``, a supervised loss); 0 where
                ``observation`` ends an episode. Default ``config.gamma``.
            episode_start: ``[B]`` bool; these streams start a new episode with this
                observation: recurrent state, credit memory and traces are reset and no
                TD error is formed from the previous episode's last prediction.

        Returns:
            Predictions ``y_t: [B, n_cumulants]``, made before this step's update: a new
            tensor, which later steps leave as it is.
        """
        learner = self.learner
        checked = self._fused is None  # the kernel's library checks finiteness, much cheaper
        self._check(observation, "observation", (learner.streams, learner.input_size), checked)
        self._check(cumulant, "cumulant", (learner.streams, self.n_cumulants), checked)
        gamma = self._discount(discount, checked)
        if episode_start is not None:
            self.reset_streams(episode_start)
        if self._fused is not None:
            if not self._fused.load_inputs(observation, cumulant, gamma):
                # Not finite: nothing changed; the eager checks say where.
                self._check(observation, "observation", (learner.streams, learner.input_size))
                self._check(cumulant, "cumulant", (learner.streams, self.n_cumulants))
                self._discount(discount)
                raise RuntimeError("the fused kernel refused inputs that the eager checks accept")
            learner.begin_step()  # as learner.step does: e.g. a constructive learner's schedule
            self.follow_learner_parameters()
            layout = learner.fused_layout()  # type: ignore[attr-defined]
            return self._fused.run(self._engine_state(), layout)
        if not isinstance(gamma, Tensor):
            gamma = torch.full(
                (learner.streams,), gamma, dtype=learner.dtype, device=learner.device
            )
        if gamma.dim() == 1:
            gamma = gamma.unsqueeze(1).expand(-1, self.n_cumulants)
        return self._eager_step(observation, cumulant, gamma)

    def _eager_step(self, observation: Tensor, cumulant: Tensor, gamma: Tensor) -> Tensor:
        """The step in torch ops: the reference the fused kernel is tested against.

        ``gamma``: ``[B, n_cumulants]``, the discount of every stream and head.
        """
        learner = self.learner
        normalized_observation = self.input_normalizer.normalize(observation)
        self.input_normalizer.update(observation)
        state = learner.step(observation if learner.normalizes_inputs else normalized_observation)
        self._eager_state = state
        self.follow_learner_parameters()  # e.g. a constructive learner's next stage
        feature_std = self.feature_normalizer.std
        normalized_state = self.feature_normalizer.normalize(state)
        self.feature_normalizer.update(state)
        features = self._head_features(normalized_state, normalized_observation)
        prediction = self._heads(features)

        td_error = cumulant + gamma * prediction - self.previous_prediction
        td_error = td_error * self.has_previous.unsqueeze(1)
        self._apply_update(td_error)

        trace_decay = gamma * self.config.lambda_  # [B, K]
        self.head_trace.mul_(trace_decay.unsqueeze(2)).add_(features.unsqueeze(1))
        if self.config.train_learner:
            state_weight = self.head_weight[..., : learner.n_features] / feature_std.unsqueeze(1)
            for k in range(self.n_cumulants):
                gradient = learner.grad(state_weight[:, k].expand(learner.streams, -1))
                for key, trace in self.learner_traces.items():
                    trace_k = trace[k]
                    trace_k.mul_(trace_decay[:, k].view(-1, *([1] * (trace_k.dim() - 1))))
                    trace_k.add_(gradient[key])

        self.previous_prediction.copy_(prediction)
        self.has_previous.fill_(True)
        return prediction

    def _apply_update(self, td_error: Tensor) -> None:
        """Set ``p.grad = -mean_b(delta * trace)`` (or per stream) and step the optimiser."""
        shared = self.learner.param_streams == 1
        head_update = td_error.unsqueeze(2) * self.head_trace
        self.head_weight.grad = -(head_update.mean(0, keepdim=True) if shared else head_update)
        if self.config.train_learner:
            # -sum_k delta_k trace_k (then the mean over streams if shared), without a
            # [K, B, ...] temporary: shared parameters take one matrix-vector product.
            negative_error = -td_error.t()  # [K, B]
            for key, param in self._learner_params.items():
                trace = self.learner_traces[key]  # [K, B, ...]
                if shared:
                    flat = trace.reshape(trace.shape[0] * trace.shape[1], -1)
                    total = negative_error.reshape(1, -1) @ flat
                    param.grad = (total / trace.shape[1]).view(1, *trace.shape[2:])
                    continue
                weights = negative_error.reshape(*negative_error.shape, *([1] * (trace.dim() - 2)))
                grad = trace[0] * weights[0]
                for k in range(1, trace.shape[0]):
                    grad.addcmul_(trace[k], weights[k])
                param.grad = grad
        with torch.no_grad():
            self.optimizer.step()

    def head_predictions(self, state: Tensor, observation: Tensor) -> Tensor:
        """What the heads predict from agent state ``state`` and raw ``observation`` now.

        Args:
            state: ``h: [B, n_features]``, e.g. from the learner's ``functional_step``.
            observation: ``x: [B, input_size]``, not normalised.

        Returns:
            ``[B, n_cumulants]`` with the current weights and normalisers; nothing is
            stepped, learned or counted in the normalisers' statistics.
        """
        features = self._head_features(
            self.feature_normalizer.normalize(state), self.input_normalizer.normalize(observation)
        )
        return self._heads(features)

    def _heads(self, features: Tensor) -> Tensor:
        """``W_k . phi`` for every stream: ``[B, n_cumulants]``."""
        return (features.unsqueeze(1) * self.head_weight).sum(-1)

    def _head_features(self, normalized_state: Tensor, normalized_observation: Tensor) -> Tensor:
        parts = [normalized_state]
        if self.config.include_observation:
            parts.append(normalized_observation)
        if self.config.include_bias:
            parts.append(torch.ones_like(normalized_state[:, :1]))
        return torch.cat(parts, dim=1)

    def _discount(self, discount: Tensor | float | None, finite: bool = True) -> Tensor | float:
        """``discount`` checked: a ``[B]`` or ``[B, K]`` tensor, or a float (None: gamma)."""
        if discount is None:
            return float(self.config.gamma)
        if isinstance(discount, Tensor):
            streams = self.learner.streams
            per_cumulant = (streams, self.n_cumulants)
            if discount.dim() not in (1, 2):
                raise ValueError(
                    f"discount must have shape [{streams}] (per stream) or {list(per_cumulant)} "
                    f"(per stream and cumulant), got {list(discount.shape)}"
                )
            shape = per_cumulant if discount.dim() == 2 else (streams,)
            self._check(discount, "discount", shape, finite)
            return discount
        return float(discount)

    def reset_streams(self, mask: Tensor) -> None:
        """Start a new episode on the streams in ``mask: [B] bool``."""
        if (
            not isinstance(mask, Tensor)
            or mask.dtype != torch.bool
            or tuple(mask.shape) != (self.learner.streams,)
        ):
            raise ValueError(
                f"episode_start must be a bool tensor of shape [{self.learner.streams}]"
            )
        if not bool(mask.any()):
            return
        # The fused kernel advances the learner's carry in place: resetting it in place too
        # keeps the kernel's binding (replacing it would cost a rebinding).
        self.learner.reset(mask, in_place=self._fused is not None)
        zero_streams_((self.head_trace, self.previous_prediction, self.has_previous), mask)
        zero_streams_(self.learner_traces.values(), mask, dim=1)  # [K, B, ...]

    def _check(self, tensor: Any, label: str, shape: tuple[int, ...], finite: bool = True) -> None:
        """Refuse a wrong type, shape, dtype or device, and (if ``finite``) a NaN or inf."""
        learner = self.learner
        if (
            isinstance(tensor, Tensor)
            and tensor.shape == shape
            and tensor.dtype == learner.dtype
            and tensor.device == learner.device
        ):  # the common case in one comparison; the checks below name what is wrong
            if finite and not bool(torch.isfinite(tensor).all()):
                self._refuse_nonfinite(tensor, label)
            return
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor of shape {list(shape)}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{label} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.dtype != self.learner.dtype:
            raise TypeError(
                f"{label} has dtype {tensor.dtype}; the learner uses {self.learner.dtype}: "
                f"convert with .to({self.learner.dtype})"
            )
        if tensor.device.type != self.learner.device.type:
            raise ValueError(
                f"{label} is on {tensor.device} but the learner is on {self.learner.device}; "
                f"move it with .to('{self.learner.device}')"
            )
        if finite and not bool(torch.isfinite(tensor).all()):
            self._refuse_nonfinite(tensor, label)

    @staticmethod
    def _refuse_nonfinite(tensor: Tensor, label: str) -> None:
        stream = int((~torch.isfinite(tensor)).nonzero()[0, 0])
        raise ValueError(
            f"{label} holds a non-finite value (first in stream {stream}); clean the "
            "environment's output before the TD engine sees it"
        )

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Complete engine state: learner, heads, traces, normalisers, optimiser."""
        return {
            "config": asdict(self.config),
            "n_cumulants": self.n_cumulants,
            "learner": self.learner.state_dict(),
            "head_weight": self.head_weight.clone(),
            "head_trace": self.head_trace.clone(),
            "learner_traces": {k: v.clone() for k, v in self.learner_traces.items()},
            "previous_prediction": self.previous_prediction.clone(),
            "has_previous": self.has_previous.clone(),
            "input_normalizer": self.input_normalizer.state_dict(),
            "feature_normalizer": self.feature_normalizer.state_dict(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict``; a different config or shape is refused."""
        if (
            _learning_settings(state["config"]) != _learning_settings(asdict(self.config))
            or state["n_cumulants"] != self.n_cumulants
        ):
            raise ValueError(
                "cannot load TD state: it was saved with config "
                f"{state['config']} and {state['n_cumulants']} cumulant(s), this engine has "
                f"{asdict(self.config)} and {self.n_cumulants}"
            )
        self.learner.load_state_dict(state["learner"])
        self.optimizer = self._build_optimizer()
        for name in ("head_weight", "head_trace", "previous_prediction", "has_previous"):
            getattr(self, name).copy_(state[name])
        for key, trace in self.learner_traces.items():
            trace.copy_(state["learner_traces"][key])
        self.input_normalizer.load_state_dict(state["input_normalizer"])
        self.feature_normalizer.load_state_dict(state["feature_normalizer"])
        self.optimizer.load_state_dict(state["optimizer"])


def _learning_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config without ``backend``: states saved by either implementation load in both."""
    return {key: value for key, value in config.items() if key != "backend"}
