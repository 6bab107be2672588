"""A streaming actor-critic whose recurrent state is trained by the RL objective through RTRL.

Any registered state learner is the recurrent core; a linear critic and a linear actor read
its agent state ``h_t`` (and, optionally, the observation). Every step, every env of a
vector env (the streams, one shared network) is updated by AC(lambda) with eligibility traces
(Lemmel & Grosu 2025; Elsayed, Vasan & Mahmood 2024), with no replay, no batch and no
back-propagation through time: the core's gradient comes from ``learner.grad``.

Per stream, with ``phi_t = [h_t, x^_t?, 1]``, ``v_t = w . phi_t`` and the policy ``pi``
(softmax of ``W phi_t`` for discrete actions; a Gaussian with mean ``W phi_t`` and a learned
state-independent log-std for boxes)::

    z_w    <- gamma lambda z_w + phi_t                           (critic head)
    z_W    <- gamma lambda z_W + d log pi(a_t | s_t) / dW        (actor head)
    z_core <- gamma lambda z_core + learner.grad(dv_t/dh_t + d log pi(a_t|s_t)/dh_t)
    delta_t = r~_t+1 + gamma v(s_t+1) - v_t                      (v = 0 past a termination)
    each group += obgd(alpha, kappa, delta_t, z)                  (agentstate.rl.streaming)
    W += alpha_W' tau dH(pi(s_t))/dW                              (entropy bonus, heads only)

``learner.grad`` is linear in its argument, so one call per step gives the core's share of the
critic's and the actor's gradients; the core's trace is exact RTRL for exact learners
(``tests/test_actor_critic.py`` checks it against autograd BPTT through ``functional_step``).
Observations are normalised by their running mean and variance and rewards scaled by the
running std of the discounted return (Elsayed et al.); a truncated episode bootstraps from its
last observation. The learner sees ``[x^_t, a_t-1]`` (``a_t-1`` one-hot for discrete actions,
0 at an episode's start).

The class follows Stable-Baselines3's algorithm conventions: ``learn`` with callbacks and a
progress bar, ``predict`` with RecurrentPPO's signature (``state`` carries the recurrent state
and the previous action), ``save``/``load``, SB3's logger and ``evaluate_policy``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback
from torch import Tensor

from agentstate.learner import StateLearner
from agentstate.observation import SpaceEncoder, make_observation_encoder
from agentstate.registry import make_learner
from agentstate.rl.action_bounds import ActionBounds
from agentstate.rl.fused_step import BACKENDS, fused_step, policy_not_finite
from agentstate.rl.noise import NoiseBlocks
from agentstate.rl.streaming import RewardScaler, RunningMeanStd, obgd_update
from agentstate.wrappers.errors import LearnerDivergedError, NonFiniteInputError

DEFAULT_LEARNER = "rtu"
DEFAULT_LEARNER_KWARGS: Mapping[str, Any] = {"n_features": 32, "activation": "tanh"}
"""The core when none is named: 16 complex recurrent trace units with a bounded (tanh) output,
the best mean return over the memory harness's POPGym suite of the cores and settings tried
(``benchmarks/memory/README.md``)."""


def resolved_core(
    learner: str | None, learner_kwargs: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The core's name and options (the one rule of the actor-critic, ``TrainConfig`` and CLI).

    With no core named: ``DEFAULT_LEARNER`` with ``DEFAULT_LEARNER_KWARGS``, which
    ``learner_kwargs`` override one by one. A named core gets its plugin's defaults and
    ``learner_kwargs`` only (naming ``"rtu"`` gives the plugin's RTU, not the tuned one).
    """
    if learner is None:
        return DEFAULT_LEARNER, {**DEFAULT_LEARNER_KWARGS, **(learner_kwargs or {})}
    return learner, dict(learner_kwargs or {})


@dataclass(frozen=True)
class ActorCriticConfig:
    """Hyper-parameters of the streaming actor-critic.

    Defaults: Elsayed et al. (2024) for the heads (ObGD, kappa 2 and 3, lambda 0.8, entropy
    0.01); the core's step size and the heads' inputs as measured on cue recall
    (``tests/test_actor_critic.py``).
    """

    gamma: float = 0.99
    """Discount."""
    lambda_: float = 0.8
    """Trace decay."""
    critic_step_size: float = 1.0
    """``alpha`` of the critic head (ObGD bounds the step actually taken)."""
    actor_step_size: float = 1.0
    """``alpha`` of the actor head."""
    learner_step_size: float = 1.0
    """``alpha`` of the recurrent core (ObGD bounds the step by the core's whole trace)."""
    critic_kappa: float = 2.0
    """ObGD's safety factor for the critic head."""
    actor_kappa: float = 3.0
    """ObGD's safety factor for the actor head."""
    learner_kappa: float = 2.0
    """ObGD's safety factor for the core."""
    entropy_coefficient: float = 0.01
    """``tau``: weight of the policy's entropy bonus."""
    normalize_observations: bool = True
    """Normalise observations by their running mean and variance."""
    scale_rewards: bool = True
    """Divide rewards by the running std of the discounted return."""
    include_observation: bool = False
    """The heads read the normalised observation beside ``h_t`` (off: the heads see only the
    learned state, which then has to carry what the policy needs; it learned cue recall
    faster so)."""
    include_prev_action: bool = True
    """The learner reads the previous action beside the observation."""
    initial_log_std: float = 0.0
    """Box actions: the Gaussian's log-std at the start."""
    min_log_std: float = -5.0
    """Box actions: the log-std is kept at or above this, plus the log of the box's half-width
    along a bounded dimension (``exp(-5)`` half-widths)."""
    max_log_std: float = 2.0
    """Box actions: the log-std is kept at or below this, plus the log of the half-width
    (``e^2`` half-widths). A wider Gaussian changes nothing the env executes (it clips), and
    the entropy bonus, whose gradient in the log-std is always 1, would otherwise raise it
    without end until ``exp`` overflows (seen at step 97k on position-only Pendulum)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"gamma and lambda_ must lie in [0, 1], got {self}")
        for name in ("critic_step_size", "actor_step_size", "learner_step_size"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.min_log_std < self.max_log_std:
            raise ValueError(
                f"min_log_std must be below max_log_std, got {self.min_log_std!r} and "
                f"{self.max_log_std!r}"
            )
        for name in ("critic_kappa", "actor_kappa", "learner_kappa"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class RTRLPolicy(BasePolicy):
    """The agent: recurrent core, linear heads, normalisers and eligibility traces.

    ``streams`` is the number of envs it learns from; ``predict`` takes any batch of
    observations with a recurrent ``state`` of the same batch.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        *,
        streams: int = 1,
        learner: str = "columnar",
        learner_kwargs: Mapping[str, Any] | None = None,
        config: ActorCriticConfig | Mapping[str, Any] | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(observation_space, action_space)
        if not isinstance(action_space, spaces.Discrete | spaces.Box):
            raise TypeError(
                f"RTRLActorCritic acts in Discrete or Box action spaces, got {action_space}"
            )
        if isinstance(config, Mapping):
            config = ActorCriticConfig(**config)
        self.config = config or ActorCriticConfig()
        self.streams = streams
        self.learner_name = learner
        self.learner_kwargs = dict(learner_kwargs or {})
        self.value_dtype = dtype
        self.encoder: SpaceEncoder = make_observation_encoder(observation_space, None)
        self.observation_size = len(self.encoder.component_names)
        self.discrete = isinstance(action_space, spaces.Discrete)
        if isinstance(action_space, spaces.Discrete):
            self.n_actions = int(action_space.n)
        else:
            self.n_actions = int(np.prod(action_space.shape or ()))
        self.action_bounds = ActionBounds.of(action_space, self.n_actions)
        log_half_width = self.action_bounds.log_half_width
        self.log_std_low = log_half_width + self.config.min_log_std
        """``[A]`` float64: the log-std's floor per action dimension."""
        self.log_std_high = log_half_width + self.config.max_log_std
        """``[A]`` float64: the log-std's ceiling per action dimension."""
        action_inputs = self.n_actions if self.config.include_prev_action else 0
        self.core: StateLearner = make_learner(
            learner,
            self.observation_size + action_inputs,
            streams=streams,
            dtype=dtype,
            seed=seed,
            **self.learner_kwargs,
        )
        observed = self.observation_size if self.config.include_observation else 0
        self.n_head_features = self.core.n_features + observed + 1
        zeros = torch.zeros
        self.critic_weight = zeros(1, self.n_head_features, dtype=dtype)
        self.actor_weight = zeros(1, self.n_actions, self.n_head_features, dtype=dtype)
        self.log_std = torch.full((1, self.n_actions), self.config.initial_log_std, dtype=dtype)
        self.observation_statistics = RunningMeanStd(self.observation_size)
        self.reward_scaler = RewardScaler(streams, self.config.gamma)
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
        """Draws of ``predict`` (acting without learning)."""
        self.noise = NoiseBlocks(
            streams,
            None if self.discrete else self.n_actions,
            dtype,
            0 if seed is None else int(seed) + 2,
        )
        """Draws of the learning steps (``RTRLActorCritic``)."""
        self.generation = 0
        """Counts the replacements of the agent's tensors (a compiled step rebinds on it)."""
        self.reset_traces()
        self.reset_transition()

    # ------------------------------------------------------------------ parameters
    def head_params(self) -> dict[str, dict[str, Tensor]]:
        """The heads' parameters by update group: ``critic`` and ``actor``."""
        actor = {"weight": self.actor_weight}
        if not self.discrete:
            actor["log_std"] = self.log_std
        return {"critic": {"weight": self.critic_weight}, "actor": actor}

    def reset_traces(self) -> None:
        """Zero every eligibility trace (and create them)."""
        self.generation += 1
        streams, dtype = self.streams, self.value_dtype
        self.critic_trace = {"weight": torch.zeros(streams, self.n_head_features, dtype=dtype)}
        self.actor_trace = {
            key: torch.zeros(streams, *param.shape[1:], dtype=dtype)
            for key, param in self.head_params()["actor"].items()
        }
        self.core_trace = {
            key: torch.zeros(streams, *param.shape[1:], dtype=dtype)
            for key, param in self.core.params.items()
        }

    def match_core_traces(self) -> None:
        """Give a core parameter that changed shape a fresh zero trace.

        A constructive learner's new stage: credit never carries over to parameters that did
        not exist.
        """
        for key, param in self.core.params.items():
            trace = self.core_trace.get(key)
            if trace is None or trace.shape[1:] != param.shape[1:]:
                self.generation += 1
                self.core_trace[key] = torch.zeros(
                    self.streams, *param.shape[1:], dtype=self.value_dtype
                )

    def reset_transition(self) -> None:
        """Forget the step in flight: the next learning step starts episodes afresh.

        What a learning step carries to the next (``RTRLActorCritic``): ``started`` (0-dim
        bool: a transition to learn from), ``action_state`` (``[B, A]``: the learner's
        encoding of the action just taken), ``previous_value`` (``[B]``: ``v(s_t)``),
        ``previous_features`` (``[B, F]``: ``phi_t``), ``previous_entropy_score`` (``[B, A]``:
        ``dH/d logits`` at ``s_t``, discrete actions) and ``log_sums`` (float64 ``[3]``: sums of
        the mean squared TD error and the mean value, and the steps they sum over).
        """
        self.generation += 1
        streams, dtype = self.streams, self.value_dtype
        self.started = torch.zeros((), dtype=torch.bool)
        self.action_state = torch.zeros(streams, self.n_actions, dtype=dtype)
        self.previous_value = torch.zeros(streams, dtype=dtype)
        self.previous_features = torch.zeros(streams, self.n_head_features, dtype=dtype)
        self.previous_entropy_score = torch.zeros(streams, self.n_actions, dtype=dtype)
        self.log_sums = torch.zeros(3, dtype=torch.float64)

    # ------------------------------------------------------------------ the agent's step
    def encode(self, observation: Any, batch: int) -> Tensor:
        """The encoded observations ``[batch, observation_size]``, float64 (unchecked)."""
        encoded = torch.as_tensor(self.encoder.encode(observation, batch))
        return encoded.to(torch.float64).contiguous()

    def check_finite(self, encoded: Tensor) -> None:
        """Raise ``NonFiniteInputError`` naming the first non-finite entry of ``encoded``.

        ``encoded: [B, observation_size]``; the error names the stream and the component.
        """
        if not bool(torch.isfinite(encoded).all()):
            stream, component = (~torch.isfinite(encoded)).nonzero()[0].tolist()
            raise NonFiniteInputError(
                f"observation of stream {stream} holds a non-finite value in "
                f"{self.encoder.component_names[component]!r}; clean the environment's output"
            )

    def learner_input(self, observation: Any, previous_action: Tensor, update: bool) -> Tensor:
        """``[x^, a_t-1]: [B, input_size]`` from raw observations ``[B, ...]``.

        Args:
            observation: a batch of observations as the env gives them, or already encoded
                (a float64 tensor from ``encode``).
            previous_action: ``[B, n_actions]`` (one-hot or the action itself; 0 at a start).
            update: fold the observations into the running statistics first.
        """
        if isinstance(observation, Tensor):
            encoded = observation
        else:
            encoded = self.encode(observation, len(previous_action))
        self.check_finite(encoded)
        if self.config.normalize_observations:
            if update:
                self.observation_statistics.update(encoded)
            encoded = self.observation_statistics.normalize(encoded)
        parts = [encoded.to(self.value_dtype)]
        if self.config.include_prev_action:
            parts.append(previous_action)
        return torch.cat(parts, dim=1)

    def head_features(self, state: Tensor, learner_input: Tensor) -> Tensor:
        """``phi = [h, x^?, 1]: [B, F]``."""
        parts = [state]
        if self.config.include_observation:
            parts.append(learner_input[:, : self.observation_size])
        parts.append(torch.ones_like(state[:, :1]))
        return torch.cat(parts, dim=1)

    def value(self, features: Tensor) -> Tensor:
        """``v = w . phi: [B]``."""
        return features @ self.critic_weight[0]

    def action_scores(self, features: Tensor) -> Tensor:
        """Logits (discrete) or the Gaussian's mean (box): ``[B, n_actions]``."""
        return features @ self.actor_weight[0].T

    def sample(self, scores: Tensor, noise: Tensor | None) -> Tensor:
        """Actions ``[B]`` (discrete, int64) or ``[B, n_actions]`` (box).

        ``noise``: None acts deterministically (the most probable action, or the mean); else
        ``[B]`` uniforms in [0, 1), inverted through the policy's CDF, or ``[B, n_actions]``
        standard normals (``NoiseBlocks``).
        """
        if self.discrete:
            if noise is None:
                return scores.argmax(1)
            cumulative = scores.log_softmax(1).exp().cumsum(1)
            chosen = (cumulative <= noise[:, None]).sum(1)
            return chosen.clamp(max=self.n_actions - 1)
        if noise is None:
            return scores
        return scores + self.log_std.exp() * noise

    def draw(self, batch: int) -> Tensor:
        """Noise for ``sample`` from ``predict``'s own generator."""
        if self.discrete:
            return torch.rand(batch, generator=self.generator, dtype=self.value_dtype)
        shape = (batch, self.n_actions)
        return torch.randn(shape, generator=self.generator, dtype=self.value_dtype)

    def action_input(self, action: Tensor) -> Tensor:
        """The learner's encoding of actions ``[B, A]``: one-hot, or the box action as executed.

        A box action is clipped to its bounds as the env clips it, then mapped to [-1, 1] where
        both bounds are finite (``ActionBounds``). Feeding back the unclipped Gaussian sample
        would close a loop with no bound: a large action drives the core, whose state drives a
        larger action.
        """
        if self.discrete:
            return torch.nn.functional.one_hot(action, self.n_actions).to(self.value_dtype)
        return self.action_bounds.encode(action.to(self.value_dtype).reshape(len(action), -1))

    def policy_gradients(
        self, features: Tensor, scores: Tensor, action: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Gradients of ``log pi(a | s)`` and of the entropy, per stream.

        Returns:
            ``d log pi / d(actor params)`` (``[B, ...]`` each), ``d log pi / d phi: [B, F]``
            and ``dH / d logits: [B, A]`` (zeros for boxes: see ``entropy_gradient``).
        """
        if self.discrete:
            log_p = scores.log_softmax(1)
            probabilities = log_p.exp()
            score = self.action_input(action) - probabilities  # d log pi / d logits
            entropy = -(probabilities * log_p).sum(1, keepdim=True)
            entropy_score = -probabilities * (log_p + entropy)  # dH / d logits
            return (
                {"weight": score[:, :, None] * features[:, None, :]},
                score @ self.actor_weight[0],
                entropy_score,
            )
        variance = torch.exp(2 * self.log_std)
        deviation = action.to(self.value_dtype) - scores
        mean_score = deviation / variance  # d log pi / d mean
        return (
            {
                "weight": mean_score[:, :, None] * features[:, None, :],
                "log_std": deviation**2 / variance - 1.0,
            },
            mean_score @ self.actor_weight[0],
            torch.zeros_like(scores),
        )

    def entropy_gradient(self, features: Tensor, entropy_score: Tensor) -> dict[str, Tensor]:
        """``dH(pi(s))/d(actor params)`` per stream.

        From ``phi: [B, F]`` and ``dH/d logits: [B, A]`` (discrete; a Gaussian's entropy
        depends on its log-std alone).
        """
        if self.discrete:
            return {"weight": entropy_score[:, :, None] * features[:, None, :]}
        return {
            "weight": torch.zeros_like(self.actor_weight).expand(len(features), -1, -1),
            "log_std": torch.ones_like(entropy_score),
        }

    # ------------------------------------------------------------------ SB3's policy API
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not used
        """Not used: the agent acts through ``predict`` and learns in ``RTRLActorCritic``."""
        raise NotImplementedError("RTRLPolicy acts through predict()")

    def _predict(self, observation: Any, deterministic: bool = False) -> Tensor:
        raise NotImplementedError("RTRLPolicy is recurrent: call predict() with its state")

    def initial_state(self, batch: int) -> tuple[np.ndarray, ...]:
        """The recurrent state of ``batch`` fresh episodes.

        The learner's carry, then the previous action (zeros).
        """
        carry = self.core.initial_carry()
        parts = [part[:1].expand(batch, *part.shape[1:]).numpy().copy() for part in carry]
        return (*parts, np.zeros((batch, self.n_actions)))

    def predict(  # type: ignore[override]
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Actions for a batch of observations, and the next recurrent state.

        RecurrentPPO's signature: ``state`` is what the previous call returned (None: fresh
        episodes); ``episode_start: [batch]`` marks observations that start an episode. Nothing
        is learned and no statistics move.
        """
        single = not _is_batched(observation, self.observation_space)
        batch_observation = _add_batch_axis(observation) if single else observation
        batch = _batch_size(batch_observation)
        if state is None:
            state = self.initial_state(batch)
        starts = np.zeros(batch, dtype=bool) if episode_start is None else np.asarray(episode_start)
        fresh = self.initial_state(batch)
        state = tuple(
            np.where(starts.reshape(-1, *([1] * (np.ndim(part) - 1))), start, part)
            for part, start in zip(state, fresh, strict=True)
        )
        carry = tuple(torch.as_tensor(part, dtype=self.value_dtype) for part in state[:-1])
        previous_action = torch.as_tensor(state[-1], dtype=self.value_dtype)
        with torch.no_grad():
            x = self.learner_input(batch_observation, previous_action, update=False)
            carry, h = self.core.functional_step(self.core.params, carry, x)
            scores = self.action_scores(self.head_features(h, x))
            action = self.sample(scores, None if deterministic else self.draw(batch))
        if not bool(torch.isfinite(action).all()):
            raise LearnerDivergedError(
                "predict: the policy's actions are not finite: the agent state or the heads grew "
                "without bound (lower the step sizes, or use a core whose state is bounded, "
                "e.g. rtu with activation='tanh')"
            )
        next_state = (*(part.numpy() for part in carry), self.action_input(action).numpy())
        actions = self._env_actions(action)
        return (actions[0] if single else actions), next_state

    def _env_actions(self, action: Tensor) -> np.ndarray:
        """What the env receives: indices, or the box action clipped to its bounds."""
        if self.discrete:
            return action.numpy()
        assert isinstance(self.action_space, spaces.Box)
        shaped = action.numpy().reshape(len(action), *self.action_space.shape)
        return np.clip(shaped, self.action_space.low, self.action_space.high)

    # ------------------------------------------------------------------ save and load
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Everything the agent learned: core, heads, statistics, traces, random state."""
        return {
            "config": asdict(self.config),
            "learner": self.core.state_dict(),
            "critic_weight": self.critic_weight.clone(),
            "actor_weight": self.actor_weight.clone(),
            "log_std": self.log_std.clone(),
            "observation_statistics": self.observation_statistics.state_dict(),
            "reward_scaler": self.reward_scaler.state_dict(),
            "critic_trace": {k: v.clone() for k, v in self.critic_trace.items()},
            "actor_trace": {k: v.clone() for k, v in self.actor_trace.items()},
            "core_trace": {k: v.clone() for k, v in self.core_trace.items()},
            "transition": {
                name: getattr(self, name).clone()
                for name in (
                    "started",
                    "action_state",
                    "previous_value",
                    "previous_features",
                    "previous_entropy_score",
                    "log_sums",
                )
            },
            "generator": self.generator.get_state(),
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(  # type: ignore[override]
        self, state: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Restore ``state_dict()``; one saved with other settings is refused."""
        if state["config"] != asdict(self.config):
            raise ValueError(
                f"cannot load an actor-critic saved with {state['config']} into one with "
                f"{asdict(self.config)}"
            )
        self.core.load_state_dict(state["learner"])
        for name in ("critic_weight", "actor_weight", "log_std"):
            getattr(self, name).copy_(state[name])
        self.observation_statistics.load_state_dict(state["observation_statistics"])
        self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.reset_traces()
        for name in ("critic_trace", "actor_trace", "core_trace"):
            for key, trace in getattr(self, name).items():
                trace.copy_(state[name][key])
        self.reset_transition()
        for name, value in state["transition"].items():
            getattr(self, name).copy_(value)
        self.generator.set_state(state["generator"])
        self.noise.load_state_dict(state["noise"])
        return None


class RTRLActorCritic(BaseAlgorithm):
    """Streaming actor-critic over any state learner, its core trained through RTRL.

    Example:
        >>> import gymnasium as gym
        >>> from agentstate.rl import RTRLActorCritic
        >>> model = RTRLActorCritic(gym.make("CartPole-v1"), learner="columnar",
        ...                         learner_kwargs={"n_features": 4}, seed=0)
        >>> model = model.learn(200)
        >>> action, state = model.predict(model.env.reset(), deterministic=True)
        >>> action.shape
        (1,)

    Args:
        env: a Gymnasium env, an SB3 ``VecEnv`` (its envs are the streams) or an env id.
        learner: a registered state learner name (the recurrent core). None:
            ``DEFAULT_LEARNER`` with ``DEFAULT_LEARNER_KWARGS`` (then ``learner_kwargs``
            override those one by one).
        learner_kwargs: its keyword arguments (e.g. ``{"n_features": 16}``).
        config: ``ActorCriticConfig`` or its fields as a mapping.
        log_interval: steps between two dumps of the logger (``rollout/`` and ``train/``).
        torch_threads: torch's intra-op threads while learning (the agent's tensors are tiny;
            a thread pool only adds synchronisation).
        backend: ``auto``: the learner's compiled actor-critic step where its kernel has one
            (``agentstate.rl.fused_step``), else torch ops; ``eager``: always torch ops;
            ``fused``: the compiled step or an error saying why not. Both act and learn
            alike (tests/test_actor_critic.py).
        seed, verbose, tensorboard_log, device: as in SB3 (the agent runs on the CPU).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"RTRLPolicy": RTRLPolicy}
    policy: RTRLPolicy

    def __init__(
        self,
        env: GymEnv | str | None,
        learner: str | None = None,
        learner_kwargs: Mapping[str, Any] | None = None,
        config: ActorCriticConfig | Mapping[str, Any] | None = None,
        policy: str | type[RTRLPolicy] = "RTRLPolicy",
        log_interval: int = 1000,
        torch_threads: int = 1,
        backend: str = "auto",
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        _init_setup_model: bool = True,
    ) -> None:
        super().__init__(
            policy,
            env,
            learning_rate=0.0,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            support_multi_env=True,
            seed=seed,
            supported_action_spaces=(spaces.Discrete, spaces.Box),
        )
        self.learner, self.learner_kwargs = resolved_core(learner, learner_kwargs)
        if isinstance(config, Mapping):
            config = ActorCriticConfig(**config)
        self.config = config or ActorCriticConfig()
        self.log_interval = log_interval
        self.torch_threads = torch_threads
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space,
            self.action_space,
            streams=self.n_envs,
            learner=self.learner,
            learner_kwargs=self.learner_kwargs,
            config=self.config,
            seed=self.seed,
        )
        self._episode_starts = np.ones(self.n_envs, dtype=bool)
        self._pending_actions: np.ndarray | None = None
        self._no_bootstrap = torch.zeros(self.n_envs, dtype=self.policy.value_dtype)
        self._fused = fused_step(self.policy, self.backend)

    @property
    def compiled(self) -> bool:
        """Whether learning steps run through the learner's compiled kernel."""
        return self._fused is not None

    def _excluded_save_params(self) -> list[str]:
        transient = ["_episode_starts", "_pending_actions", "_fused", "_no_bootstrap"]
        return [*super()._excluded_save_params(), *transient]

    # ------------------------------------------------------------------ learning
    def learn(  # type: ignore[override]
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int | None = None,
        tb_log_name: str = "RTRLActorCritic",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> RTRLActorCritic:
        """Learn online for ``total_timesteps`` env steps (summed over the envs)."""
        if log_interval is not None:
            self.log_interval = log_interval
        total_timesteps, callback = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        callback.on_training_start(locals(), globals())
        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)  # tiny tensors: threads only synchronise
        try:
            if reset_num_timesteps or getattr(self, "_pending_actions", None) is None:
                self._start_episodes()
            started, last_dump = time.perf_counter(), self.num_timesteps
            callback.on_rollout_start()
            while self.num_timesteps < total_timesteps:
                infos, dones = self._step()
                self.num_timesteps += self.n_envs
                self._update_info_buffer(infos, dones)
                callback.update_locals({"infos": infos, "dones": dones})
                if not callback.on_step():
                    break
                if self.num_timesteps - last_dump >= self.log_interval:
                    self._dump_logs(started)
                    last_dump = self.num_timesteps
        finally:
            torch.set_num_threads(threads)
        callback.on_rollout_end()
        callback.on_training_end()
        return self

    def _start_episodes(self) -> None:
        """Start every stream afresh from the envs' first observations.

        ``_setup_learn`` has just reset the envs: the core's state, the traces and the
        carried transition start over, and the first actions are drawn.
        """
        policy = self.policy
        policy.core.reset(in_place=self._fused is not None)
        policy.reset_traces()
        policy.reset_transition()
        self._pending_actions = self._agent_step(self._last_obs, None, None, None)

    def _step(self) -> tuple[list[dict[str, Any]], np.ndarray]:
        """One transition of every env, and the agent's step that learns from it."""
        assert self.env is not None
        observation, reward, dones, infos = self.env.step(self._pending_actions)
        self._pending_actions = self._agent_step(observation, reward, dones, infos)
        return list(infos), np.asarray(dones, dtype=bool)

    def _agent_step(self, observation: Any, reward: Any, dones: Any, infos: Any) -> np.ndarray:
        """Learn from the transition that ended in ``observation`` and choose the next actions.

        ``reward``, ``dones`` and ``infos`` are the env's for that transition (None on the
        first step of learning, which has no transition behind it). Per stream: the core
        steps on ``[x^, a_t]``; the TD error of the transition drives ObGD steps of the heads
        and the core with the traces of ``s_t``; then ``a_t+1`` is drawn and the traces take
        in the gradients at ``s_t+1`` (module docstring).

        Returns:
            The actions for the envs.
        """
        policy = self.policy
        streams = self.n_envs
        encoded = np.ascontiguousarray(policy.encoder.encode(observation, streams))
        if reward is None:
            done = np.zeros(streams, dtype=bool)
            reward = np.zeros(streams)
        else:
            done = np.ascontiguousarray(dones, dtype=bool)
            reward = np.ascontiguousarray(reward, dtype=np.float64)
        bootstrap = self._no_bootstrap
        if done.any():  # SB3's vector envs end an episode where it is truncated, too
            truncated = np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos])
            if truncated.any():
                bootstrap = self._bootstrap_values(infos, truncated)
            policy.core.reset(torch.from_numpy(done), in_place=self._fused is not None)
        if self._fused is not None:
            status = self._fused.step(encoded, reward, done, bootstrap, policy.noise)
            if status:
                self._check_inputs(encoded, reward)
                self._fused.raise_for(status, self.num_timesteps)
            return policy._env_actions(self._fused.action).copy()
        self._check_inputs(encoded, reward)
        action = self._eager_step(
            torch.from_numpy(encoded),
            torch.from_numpy(reward),
            torch.from_numpy(done),
            bootstrap,
            policy.noise.next(),
        )
        return policy._env_actions(action)

    def _check_inputs(self, encoded: np.ndarray, reward: np.ndarray) -> None:
        """``NonFiniteInputError`` naming the first observation or reward not finite."""
        self.policy.check_finite(torch.from_numpy(encoded))
        if not np.isfinite(reward).all():
            stream = int(np.flatnonzero(~np.isfinite(reward))[0])
            raise NonFiniteInputError(
                f"reward of stream {stream} is not finite at step {self.num_timesteps}; "
                "clean the environment's output"
            )

    def _eager_step(
        self, encoded: Tensor, reward: Tensor, done: Tensor, bootstrap: Tensor, noise: Tensor
    ) -> Tensor:
        """``_agent_step`` in torch ops (the reference for the compiled step)."""
        policy, config = self.policy, self.config
        started = bool(policy.started)
        if started and config.scale_rewards:
            reward = policy.reward_scaler.scale(reward, done)
        previous_action = policy.action_state.masked_fill(done[:, None], 0.0)
        x = policy.learner_input(encoded, previous_action, update=True)
        h = policy.core.step(x)
        if not bool(torch.isfinite(h).all()):
            raise LearnerDivergedError(
                f"the recurrent core's state is not finite at step {self.num_timesteps}"
            )
        policy.match_core_traces()
        features = policy.head_features(h, x)
        if started:
            next_value = torch.where(done, bootstrap, policy.value(features))
            td_error = reward.to(policy.value_dtype) + config.gamma * next_value
            td_error = td_error - policy.previous_value
            entropy_gradient = policy.entropy_gradient(
                policy.previous_features, policy.previous_entropy_score
            )
            self._update(td_error, entropy_gradient)
            one = torch.ones((), dtype=td_error.dtype)
            sums = [(td_error**2).mean(), policy.previous_value.mean(), one]
            policy.log_sums += torch.stack(sums).double()
        # Credit never crosses an episode boundary: the traces of ended episodes restart.
        decay = torch.full_like(policy.previous_value, config.gamma * config.lambda_)
        decay = decay.masked_fill(done, 0.0)
        value = policy.value(features)
        scores = policy.action_scores(features)
        spread = noise if policy.discrete else policy.log_std.exp() * noise
        if not bool(torch.isfinite(scores).all() and torch.isfinite(spread).all()):
            raise LearnerDivergedError(policy_not_finite(self.num_timesteps))
        action = policy.sample(scores, noise)
        log_pi, dlog_pi_dphi, entropy_score = policy.policy_gradients(features, scores, action)
        _accumulate(policy.critic_trace, {"weight": features}, decay)
        _accumulate(policy.actor_trace, log_pi, decay)
        if self._traces_core():
            n = policy.core.n_features
            core_gradient = policy.core.grad(policy.critic_weight[:, :n] + dlog_pi_dphi[:, :n])
            _accumulate(policy.core_trace, core_gradient, decay)
        policy.previous_value.copy_(value)
        policy.previous_features.copy_(features)
        policy.previous_entropy_score.copy_(entropy_score)
        policy.action_state.copy_(policy.action_input(action))
        policy.started.fill_(True)
        return action

    def _traces_core(self) -> bool:
        """Whether the core has parameters to trace (a step size of 0 keeps them put)."""
        return bool(self.policy.core.params)

    def _bootstrap_values(self, infos: Any, truncated: np.ndarray) -> Tensor:
        """``v`` of the last observation of truncated episodes (0 elsewhere).

        With the core, heads and statistics as they stand before this step.
        """
        policy = self.policy
        values = torch.zeros(self.n_envs, dtype=policy.value_dtype)
        streams = np.flatnonzero(truncated)
        last = np.stack([infos[b]["terminal_observation"] for b in streams])
        x = policy.learner_input(last, policy.action_state[streams], update=False)
        carry = tuple(part[streams] for part in policy.core.carry)
        with torch.no_grad():
            _, h = policy.core.functional_step(policy.core.params, carry, x)
        values[streams] = policy.value(policy.head_features(h, x))
        return values

    def _update(self, td_error: Tensor, entropy_gradient: Mapping[str, Tensor]) -> None:
        """ObGD steps of the heads and the core; refused whole if anything is not finite."""
        policy, config = self.policy, self.config
        norms = [
            sum(trace.abs().sum() for trace in traces.values())
            for traces in (policy.critic_trace, policy.actor_trace, policy.core_trace)
        ]
        if not bool(torch.isfinite(td_error).all()) or not all(
            math.isfinite(float(norm)) for norm in norms
        ):
            raise LearnerDivergedError(
                f"the TD error or an eligibility trace is not finite at step "
                f"{self.num_timesteps}; no parameter was changed (lower the step sizes)"
            )
        heads = policy.head_params()
        obgd_update(
            heads["critic"],
            policy.critic_trace,
            td_error,
            config.critic_step_size,
            config.critic_kappa,
        )
        taken = obgd_update(
            heads["actor"], policy.actor_trace, td_error, config.actor_step_size, config.actor_kappa
        )
        if config.entropy_coefficient:
            scale = (config.entropy_coefficient * taken).to(policy.value_dtype)
            for key, param in heads["actor"].items():
                step = scale.view(-1, *([1] * (entropy_gradient[key].dim() - 1)))
                param += (step * entropy_gradient[key]).mean(0, keepdim=True)
        if not policy.discrete:
            dtype = policy.value_dtype
            low, high = policy.log_std_low.to(dtype), policy.log_std_high.to(dtype)
            torch.clamp(policy.log_std, low, high, out=policy.log_std)
        if self._traces_core():
            obgd_update(
                policy.core.params,
                policy.core_trace,
                td_error,
                config.learner_step_size,
                config.learner_kappa,
            )

    def _dump_logs(self, started: float) -> None:
        if self.ep_info_buffer:
            returns = [info["r"] for info in self.ep_info_buffer]
            lengths = [info["l"] for info in self.ep_info_buffer]
            self.logger.record("rollout/ep_rew_mean", float(np.mean(returns)))
            self.logger.record("rollout/ep_len_mean", float(np.mean(lengths)))
        squared, value, steps = self.policy.log_sums.tolist()
        steps = max(steps, 1.0)
        self.logger.record("train/td_error_squared", squared / steps)
        self.logger.record("train/value", value / steps)
        elapsed = max(time.perf_counter() - started, 1e-9)
        self.logger.record("time/fps", int(self.num_timesteps / elapsed))
        self.logger.record("time/total_timesteps", self.num_timesteps)
        self.logger.dump(step=self.num_timesteps)
        self.policy.log_sums.zero_()

    # ------------------------------------------------------------------ acting
    def predict(  # type: ignore[override]
        self,
        observation: Any,
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Actions and the next recurrent state (RecurrentPPO's signature; nothing learns)."""
        return self.policy.predict(observation, state, episode_start, deterministic)


def _accumulate(traces: dict[str, Tensor], gradient: Mapping[str, Tensor], decay: Tensor) -> None:
    """``z <- decay z + g`` in place, for every parameter (``decay: [B]``, per stream)."""
    for key, trace in traces.items():
        trace.mul_(decay.view(-1, *([1] * (trace.dim() - 1)))).add_(gradient[key])


def _is_batched(observation: Any, space: spaces.Space) -> bool:
    if isinstance(space, spaces.Dict):
        first = next(iter(space.spaces))
        return _is_batched(observation[first], space.spaces[first])
    if isinstance(space, spaces.Tuple):
        return _is_batched(observation[0], space.spaces[0])
    shape = space.shape or ()
    return np.ndim(observation) > len(shape)


def _add_batch_axis(observation: Any) -> Any:
    if isinstance(observation, dict):
        return {key: _add_batch_axis(value) for key, value in observation.items()}
    if isinstance(observation, tuple):
        return tuple(_add_batch_axis(value) for value in observation)
    return np.asarray(observation)[None]


def _batch_size(observation: Any) -> int:
    if isinstance(observation, dict):
        return _batch_size(next(iter(observation.values())))
    if isinstance(observation, tuple):
        return _batch_size(observation[0])
    return len(observation)
