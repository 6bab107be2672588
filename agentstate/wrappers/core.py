"""One TD engine over B streams: learner inputs, online learning, augmented observations.

Every wrapper (single env, gymnasium vector env, SB3 VecEnv) reduces to ``AgentStateCore``:
at each step of stream ``b`` it builds the learner input
``x_t = [enc(o_t), enc(a_t-1), r_t]`` (the action and reward parts are zero at an episode's
first observation), advances the ``TDPredictor`` (which updates the learner online on the
cumulants) and returns ``[enc(o_t), h_t]`` as float32 (with ``observe_past = M``,
``[enc(o_t), enc(o_t-1), ..., enc(o_t-M), h_t]``, zeros before the episode began).

Episode ends, per stream:

* the episode's last observation is stepped with discount 0 if it terminated and ``gamma``
  if it was truncated (TD bootstraps from it), then the next observation starts a new
  episode (``episode_start``: state, credit memory and traces reset, no TD error across);
* with auto-reset in the same step (SB3 VecEnvs, gymnasium ``SAME_STEP``) the terminal
  and the reset observation arrive together. The engine steps all streams at once, so the
  two steps are folded into one: the terminal state ``h_T`` and prediction ``y_T`` are
  computed without advancing (``functional_step``), the learner's state is reset, and the
  reset observation is stepped with discount 0 and cumulant ``c_T + gamma y_T`` (truncated)
  or ``c_T`` (terminated). The TD error is then exactly ``c_T + gamma_T y_T - y_T-1``.

Bad numbers: a NaN/inf input is found before anything changes and raises
``NonFiniteInputError`` naming the step, stream and component; with ``nonfinite="skip"``
the component is replaced by the input normaliser's running mean and the stream's TD error
for the step is forced to 0 (cumulant ``y_t-1``, discount 0). The agent state and the
predictions are checked every step; leaving [-1, 1] (LSTM-family learners) or turning
non-finite raises ``LearnerDivergedError`` before anything reaches the policy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from agentstate.observation import SpaceEncoder, make_observation_encoder, make_space_encoder
from agentstate.registry import make_learner
from agentstate.td import TDConfig, TDPredictor
from agentstate.wrappers.cumulants import CumulantCentre, Cumulants
from agentstate.wrappers.errors import LearnerDivergedError, NonFiniteInputError
from agentstate.wrappers.history import PastObservations
from agentstate.wrappers.settings import AgentStateSettings
from agentstate.wrappers.statistics import LearnerStatistics

STATE_FORMAT = "agentstate.wrapper/1"
NONFINITE_INFO_KEY = "agent_state_nonfinite"
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class StepBatch:
    """What one step of B streams brings to the core.

    Attributes:
        observations: raw batch of observations (leading stream axis).
        rewards: ``[B]`` rewards of the transitions into ``observations``.
        terminated: ``[B]`` bool, ``observations`` ends its episode by termination.
        truncated: ``[B]`` bool, ``observations`` ends its episode by truncation.
        episode_start: ``[B]`` bool, ``observations`` starts a new episode.
        actions: raw batch of the actions that led to ``observations`` (None at reset).
        infos: one info dict per stream (read by a callable cumulant).
        final_observations: stream -> terminal observation, for streams whose episode ended
            at this step and were reset in the same step (``observations`` then holds the
            reset observation; the stream's ``terminated``/``truncated`` describe the end).
        final_infos: stream -> info dict of the terminal observation.
    """

    observations: Any
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    episode_start: np.ndarray
    actions: Any = None
    infos: Sequence[Mapping[str, Any]] | None = None
    final_observations: Mapping[int, Any] = field(default_factory=dict)
    final_infos: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def reset(
        cls, observations: Any, streams: int, infos: Sequence[Mapping[str, Any]] | None
    ) -> StepBatch:
        """The batch of a reset: every stream starts an episode, no reward, nothing ended."""
        return cls(
            observations=observations,
            rewards=np.zeros(streams),
            terminated=np.zeros(streams, dtype=bool),
            truncated=np.zeros(streams, dtype=bool),
            episode_start=np.ones(streams, dtype=bool),
            infos=infos,
        )


@dataclass
class StepResult:
    """What the core returns for one step.

    Attributes:
        observations: ``[B, D]`` float32 augmented observations.
        final_observations: stream -> ``[D]`` float32 augmented terminal observation.
        nonfinite: stream -> names of the non-finite inputs skipped (``nonfinite="skip"``).
    """

    observations: np.ndarray
    final_observations: dict[int, np.ndarray]
    nonfinite: dict[int, list[str]]


@dataclass
class _Rows:
    """Per-row float64 arrays of one step.

    ``encoded: [R, observation_size]``, ``learner_input: [R, input_size]``,
    ``cumulant: [R, n_cumulants]``.
    """

    encoded: np.ndarray
    learner_input: np.ndarray
    cumulant: np.ndarray

    @classmethod
    def empty(cls, core: AgentStateCore) -> _Rows:
        return cls(
            np.zeros((0, core.observation_size)),
            np.zeros((0, len(core.input_names))),
            np.zeros((0, core.cumulants.size)),
        )

    def __iter__(self) -> Any:
        return iter((self.encoded, self.learner_input, self.cumulant))

    def finite(self) -> bool:
        return bool(np.isfinite(self.learner_input).all() and np.isfinite(self.cumulant).all())

    def impute(self, mean: np.ndarray, encoder: SpaceEncoder) -> None:
        """Non-finite inputs become the input normaliser's running mean (normalised 0).

        The observation part returned to the policy gets the same values, kept in bounds.
        """
        bad = ~np.isfinite(self.learner_input)
        self.learner_input = np.where(bad, mean, self.learner_input)
        imputed = np.clip(self.learner_input[:, : encoder.size], encoder.low, encoder.high)
        self.encoded = np.where(bad[:, : encoder.size], imputed, self.encoded)


class AgentStateCore:
    """One learner and TD engine for B streams (see the module docstring).

    Attributes:
        settings: the wrapper settings.
        streams: number of streams ``B``.
        observation_encoder: flat encoder of the observation (``observation_size`` long).
        action_encoder: flat encoder of the previous action, or None.
        cumulants: the cumulants the heads predict.
        learner: the state learner (``n_features`` agent-state features).
        engine: the ``TDPredictor`` that trains it.
        observation_space: float32 Box of one augmented observation, ``[D]``.
        learning: whether the learner is trained.
        state: ``[B, n_features]`` agent state of the last step.
        predictions: ``[B, n_cumulants]`` head predictions of the last step.
        statistics: the learner's running statistics, once ``enable_statistics`` was called.

    Example:
        >>> import numpy as np
        >>> from gymnasium import spaces
        >>> from agentstate.wrappers.settings import AgentStateSettings
        >>> core = AgentStateCore(spaces.Box(-1, 1, (3,)), spaces.Discrete(2), streams=2,
        ...                       settings=AgentStateSettings(seed=0))
        >>> batch = StepBatch(np.zeros((2, 3)), np.zeros(2), np.zeros(2, bool),
        ...                   np.zeros(2, bool), episode_start=np.ones(2, bool))
        >>> core.step(batch).observations.shape  # 3 observed, 3 x 3 before, 7 features
        (2, 19)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        streams: int,
        settings: AgentStateSettings,
    ) -> None:
        self.settings = settings
        self.streams = streams
        self.observation_encoder = make_observation_encoder(observation_space, settings.encoder)
        self.action_encoder: SpaceEncoder | None = None
        if settings.include_prev_action:
            try:
                self.action_encoder = make_space_encoder(action_space, "previous action")
            except TypeError as error:
                raise TypeError(f"{error}; or pass include_prev_action=False") from None
        self.input_names = (
            self.observation_encoder.component_names
            + (self.action_encoder.component_names if self.action_encoder else [])
            + (["previous reward"] if settings.include_prev_reward else [])
        )
        self.cumulants = Cumulants(
            settings.cumulants,
            observation_space,
            self.observation_encoder,
            settings.reconstruct_past,
        )
        self._head_gammas = self._discounts_per_head(settings.gamma, self.cumulants)
        self._centre = CumulantCentre(self.cumulants.size) if settings.center_cumulants else None
        history = max(settings.reconstruct_past, settings.observe_past)
        self._past = (
            PastObservations(streams, history, self.observation_encoder.size) if history else None
        )
        self.learner = make_learner(
            settings.learner,
            len(self.input_names),
            streams=streams,
            seed=settings.seed,
            **settings.learner_kwargs,
        )
        config = TDConfig(**settings.td_config_options())
        self.engine = TDPredictor(self.learner, self.cumulants.size, config)
        bound = self.learner.state_bound  # the learner's own word on the range of h
        self._state_limit = FLOAT32_MAX if bound is None else float(bound)
        self._numpy_dtype = np.float32 if self.learner.dtype == torch.float32 else np.float64
        self.observation_space = self._augmented_space(np.inf if bound is None else float(bound))
        self.learning = settings.learn
        self.state = np.zeros((streams, self.learner.n_features), dtype=np.float32)
        self.predictions = np.zeros((streams, self.cumulants.size))
        self.total_steps = 0
        self.episode_steps = np.zeros(streams, dtype=np.int64)
        self.statistics: LearnerStatistics | None = None
        self._divergence: str | None = None

    # ---------------------------------------------------------------- spaces and shapes
    @property
    def observation_size(self) -> int:
        """Length of the encoded observation."""
        return self.observation_encoder.size

    def _augmented_space(self, state_bound: float) -> spaces.Box:
        n_features = self.learner.n_features
        encoder, shown = self.observation_encoder, self.settings.observe_past
        low = [np.tile(np.minimum(encoder.low, 0.0), shown), np.full(n_features, -state_bound)]
        high = [np.tile(np.maximum(encoder.high, 0.0), shown), np.full(n_features, state_bound)]
        if self.settings.include_observation:
            low.insert(0, encoder.low)
            high.insert(0, encoder.high)
        return spaces.Box(
            np.concatenate(low).astype(np.float32),
            np.concatenate(high).astype(np.float32),
            dtype=np.float32,
        )

    # ---------------------------------------------------------------- learning switch
    def set_learning(self, learn: bool) -> None:
        """Start or stop training.

        Frozen, the state advances by the pure cell (no sensitivities, no traces). On
        resuming, credit memory and traces restart from zero (the recurrent state is kept),
        and the first step forms no TD error.
        """
        if learn and not self.learning:
            carry = self.learner.carry
            self.engine.reset_streams(torch.ones(self.streams, dtype=torch.bool))
            self.learner.carry = carry
        self.learning = bool(learn)

    def enable_statistics(self) -> LearnerStatistics:
        """Start accumulating the learner's statistics (``LearnerStatistics``); idempotent."""
        if self.statistics is None:
            self.statistics = LearnerStatistics(self.streams, self.cumulants.size)
            self.statistics.restart(self._last_predictions())
        return self.statistics

    def _last_predictions(self) -> np.ndarray | None:
        """The predictions the next step's TD error starts from, if any were made."""
        return self.predictions if self.total_steps > 0 else None

    # ---------------------------------------------------------------- the step
    def step(self, batch: StepBatch) -> StepResult:
        """Advance every stream by one observation (see the module docstring)."""
        started = time.perf_counter()
        if self._divergence is not None:
            raise LearnerDivergedError(self._divergence)
        streams, gamma = self.streams, self.settings.gamma
        per_head = self._head_gammas is not None
        episode_start = np.asarray(batch.episode_start, dtype=bool).reshape(streams)
        ended = sorted(batch.final_observations)
        fresh = episode_start.copy()
        fresh[ended] = True
        rewards = np.asarray(batch.rewards, dtype=np.float64).reshape(streams)
        previous_action = self._encode_actions(batch.actions)
        current = self._rows(
            batch.observations, previous_action, rewards, fresh, batch.infos, slice(None)
        )
        current.cumulant[fresh] = 0.0
        final = (
            _Rows.empty(self)
            if not ended
            else self._final_rows(batch, ended, previous_action, rewards)
        )
        terminated = np.asarray(batch.terminated, dtype=bool).reshape(streams) & ~fresh

        nonfinite: dict[int, list[str]] = {}
        if not (current.finite() and final.finite()):
            nonfinite = self._nonfinite(current, final, fresh, ended)
            mean = self.engine.input_normalizer.mean[0].double().numpy()
            current.impute(mean, self.observation_encoder)
            final.impute(mean, self.observation_encoder)

        if self._centre is not None:
            self._centre_cumulants(current, final, fresh, nonfinite)
        x = self._tensor(current.learner_input)
        cumulant = self._tensor(current.cumulant)
        continuation = np.where(terminated, 0.0, 1.0)  # [B]: 0 across an episode boundary
        if per_head:
            gamma = self._head_gammas  # [K]
            discount = continuation[:, None] * gamma  # [B, K]
        else:
            discount = continuation * gamma  # [B]
        uniform_discount = not (per_head or terminated.any() or ended or nonfinite)
        final_states: np.ndarray | None = None
        if ended:
            final_states, final_predictions = self._peek(ended, self._tensor(final.learner_input))
            self._check(final_states, final_predictions, "terminal observation")
            truncated = np.asarray(batch.truncated, dtype=bool).reshape(streams)[ended]
            bootstrap = truncated[:, None] * (gamma if per_head else np.full(1, gamma))
            bootstrapped = self._tensor(bootstrap) * final_predictions
            cumulant[ended] = self._tensor(final.cumulant) + bootstrapped
            discount[ended] = 0.0
            continuation[ended] = 0.0
        if nonfinite:
            # delta = c + 0 * y_t - y_t-1 = 0: the skipped step teaches nothing.
            skipped = torch.zeros(streams, dtype=torch.bool)
            skipped[list(nonfinite)] = True
            skipped &= ~torch.from_numpy(episode_start)
            cumulant[skipped] = self.engine.previous_prediction[skipped]
            discount[list(nonfinite)] = 0.0
            continuation[list(nonfinite)] = 0.0
        if ended:
            mask = torch.zeros(streams, dtype=torch.bool)
            mask[ended] = True
            self.learner.reset(mask)

        discount_tensor = None if uniform_discount else self._tensor(discount)
        state, predictions = self._advance(x, cumulant, discount_tensor, episode_start)
        self._check(state, predictions, "observation")
        self.state, self.predictions = state, predictions
        if self.statistics is not None:
            skipped_streams = np.zeros(streams, dtype=bool)
            skipped_streams[list(nonfinite)] = True
            self.statistics.record(
                cumulant=cumulant.numpy(),
                discount=discount,
                continuation=continuation,
                predictions=predictions,
                state=state,
                episode_start=episode_start,
                skipped=skipped_streams,
                terminated=np.asarray(batch.terminated, dtype=bool).reshape(streams),
                seconds=time.perf_counter() - started,
            )
        shown_past = self._shown_past(slice(None), fresh)
        final_past = self._shown_past(ended, np.zeros(len(ended), dtype=bool))
        if self._past is not None:
            self._past.push(current.encoded, fresh)
        self.total_steps += 1
        self.episode_steps = np.where(fresh, 0, self.episode_steps + 1)

        finals = {}
        if final_states is not None:
            terminal = self._augment(final.encoded, final_past, final_states)
            finals = dict(zip(ended, terminal, strict=True))
        return StepResult(
            observations=self._augment(current.encoded, shown_past, state),
            final_observations=finals,
            nonfinite=nonfinite,
        )

    def _centre_cumulants(
        self, current: _Rows, final: _Rows, fresh: np.ndarray, nonfinite: Mapping[int, Any]
    ) -> None:
        """Subtract the running means from this step's cumulants, then fold them in.

        A reset step's cumulant stays 0 (nothing is learned from it), and rows kept out of
        learning (non-finite) do not move the means.
        """
        assert self._centre is not None
        learned = ~fresh
        learned[list(nonfinite)] = False
        finite_final = np.isfinite(final.cumulant).all(axis=1)
        rows = np.concatenate([current.cumulant[learned], final.cumulant[finite_final]])
        current.cumulant = np.where(fresh[:, None], 0.0, self._centre(current.cumulant))
        final.cumulant = self._centre(final.cumulant)
        self._centre.update(rows)

    def _rows(
        self,
        observations: Any,
        previous_action: np.ndarray,
        rewards: np.ndarray,
        fresh: np.ndarray,
        infos: Sequence[Mapping[str, Any]] | None,
        streams: slice | list[int],
    ) -> _Rows:
        """Encoded observations, learner inputs and cumulants of a batch of ``streams``."""
        encoded = self.observation_encoder.encode(observations, len(rewards))
        cumulant = self.cumulants(observations, encoded, rewards, infos)
        if self.settings.reconstruct_past:
            assert self._past is not None
            targets = self._past.targets(streams, self.settings.reconstruct_past)
            cumulant = np.concatenate([cumulant, targets], axis=1)
        return _Rows(
            encoded, self._learner_input(encoded, previous_action, rewards, fresh), cumulant
        )

    def _final_rows(
        self,
        batch: StepBatch,
        ended: list[int],
        previous_action: np.ndarray,
        rewards: np.ndarray,
    ) -> _Rows:
        """The rows of the terminal observations of the streams in ``ended``."""
        rows = [
            self._rows(
                self.observation_encoder.add_stream_axis(batch.final_observations[stream]),
                previous_action[stream : stream + 1],
                rewards[stream : stream + 1],
                np.zeros(1, dtype=bool),
                [batch.final_infos.get(stream, {})],
                [stream],
            )
            for stream in ended
        ]
        return _Rows(*(np.concatenate(parts) for parts in zip(*rows, strict=True)))

    def _encode_actions(self, actions: Any) -> np.ndarray:
        if self.action_encoder is None:
            return np.zeros((self.streams, 0))
        if actions is None:
            return np.zeros((self.streams, self.action_encoder.size))
        return self.action_encoder.encode(actions, self.streams)

    def _learner_input(
        self,
        encoded: np.ndarray,
        previous_action: np.ndarray,
        rewards: np.ndarray,
        fresh: np.ndarray,
    ) -> np.ndarray:
        """``[enc(o_t), enc(a_t-1), r_t]``, action and reward zeroed at an episode start."""
        parts = [encoded]
        if self.action_encoder is not None:
            parts.append(np.where(fresh[:, None], 0.0, previous_action))
        if self.settings.include_prev_reward:
            parts.append(np.where(fresh, 0.0, rewards)[:, None])
        return np.concatenate(parts, axis=1)

    def _shown_past(self, streams: slice | list[int], fresh: np.ndarray) -> np.ndarray:
        """``[R, observe_past * D]``: what the chosen streams' current observations follow.

        The encoded observations of the ``observe_past`` steps before, zeros for a ``fresh``
        stream; call before this step's push.
        """
        shown = self.settings.observe_past
        if not shown:
            return np.zeros((len(fresh), 0))
        assert self._past is not None
        return np.where(fresh[:, None], 0.0, self._past.latest(shown, streams))

    def _augment(self, encoded: np.ndarray, past: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The policy's observation ``[enc(o_t)?, enc(o_t-1), ..., enc(o_t-M), h_t]``."""
        parts = [encoded, past] if self.settings.include_observation else [past]
        return np.concatenate([*parts, state], axis=1).astype(np.float32, copy=False)

    # ---------------------------------------------------------------- engine access
    def _tensor(self, array: np.ndarray) -> Tensor:
        """A new tensor of the learner's dtype holding ``array``."""
        return torch.from_numpy(np.array(array, dtype=self._numpy_dtype))

    def _advance(
        self, x: Tensor, cumulant: Tensor, discount: Tensor | None, episode_start: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One step of every stream: learning through the engine, or the frozen cell.

        Returns:
            ``(state [B, n_features] float32, predictions [B, K] float64)``, new arrays.
        """
        start = torch.from_numpy(episode_start) if episode_start.any() else None
        if self.learning:
            if start is not None:
                self.engine.reset_streams(start)
            predictions = self.engine.step(x, cumulant, discount=discount)
            state = self.engine.agent_state  # h_t the heads read (fused or eager)
        else:
            if start is not None:
                self.learner.reset(start)
            self.learner.carry, state = self._forward(x)
            predictions = self.engine.head_predictions(state, x)
        return _to_numpy(state, np.float32), _to_numpy(predictions, np.float64)

    def _forward(self, x: Tensor) -> tuple[Any, Tensor]:
        """The learner's next carry and agent state for input ``x``, not advancing it."""
        normalized = self.engine.input_normalizer.normalize(x)
        with torch.no_grad():
            return self.learner.functional_step(self.learner.params, self.learner.carry, normalized)

    def _peek(self, streams: list[int], final_input: Tensor) -> tuple[np.ndarray, Tensor]:
        """Agent state and predictions of ``final_input`` for ``streams``, not advancing.

        Returns:
            ``(state [len(streams), n_features] float32, predictions [len(streams), K])``.
        """
        x = torch.zeros(self.streams, final_input.shape[1], dtype=final_input.dtype)
        x[streams] = final_input
        _, state = self._forward(x)
        predictions = self.engine.head_predictions(state, x)[streams]
        return _to_numpy(state[streams], np.float32), predictions

    # ---------------------------------------------------------------- checks
    def _nonfinite(
        self, current: _Rows, final: _Rows, fresh: np.ndarray, ended: list[int]
    ) -> dict[int, list[str]]:
        """Stream -> names of its non-finite inputs; raises unless ``nonfinite="skip"``."""
        input_names = np.array(self.input_names, dtype=object)
        cumulant_names = np.array([f"cumulant {n}" for n in self.cumulants.names], dtype=object)
        found: dict[int, list[str]] = {}
        for stream in range(self.streams):
            bad_cumulant = ~np.isfinite(current.cumulant[stream]) & ~fresh[stream]
            names = [
                *input_names[~np.isfinite(current.learner_input[stream])],
                *cumulant_names[bad_cumulant],
            ]
            if names:
                found[stream] = names
        for row, stream in enumerate(ended):
            names = [
                *input_names[~np.isfinite(final.learner_input[row])],
                *cumulant_names[~np.isfinite(final.cumulant[row])],
            ]
            if names:
                found.setdefault(stream, []).extend(f"terminal {name}" for name in names)
        if self.settings.nonfinite == "raise":
            stream, names = next(iter(found.items()))
            episode_step = 0 if fresh[stream] else self.episode_steps[stream] + 1
            raise NonFiniteInputError(
                f"non-finite value in {', '.join(map(repr, names[:5]))}"
                f"{' and others' if len(names) > 5 else ''} at step {self.total_steps} "
                f"(stream {stream}, episode step {episode_step}); the learner was not "
                "changed. Fix the environment, or pass nonfinite='skip' to keep such steps "
                "out of learning"
            )
        return found

    def _check(self, state: np.ndarray, predictions: Any, what: str) -> None:
        """Detect a diverged learner before its output reaches the policy."""
        state_ok = np.abs(state).max(initial=0.0) <= self._state_limit  # False for NaN
        if state_ok and bool(np.isfinite(np.asarray(predictions)).all()):
            return
        broken = [k for k, v in self.learner.params.items() if not bool(torch.isfinite(v).all())]
        if not bool(torch.isfinite(self.engine.head_weight).all()):
            broken.append("head weights")
        self._divergence = (
            f"the {self.settings.learner} learner diverged: its agent state or predictions for "
            f"the {what} at step {self.total_steps} are non-finite or outside "
            f"[-{self._state_limit:g}, {self._state_limit:g}] (non-finite parameters: "
            f"{', '.join(broken) or 'none'}). Nothing was passed to the policy. Lower "
            f"step_size (now {self.settings.step_size:g}) or load a saved good state"
        )
        raise LearnerDivergedError(self._divergence)

    @staticmethod
    def _discounts_per_head(
        gamma: float | tuple[float, ...], cumulants: Cumulants
    ) -> np.ndarray | None:
        """``[K]`` discounts where they differ between heads, checked; None for one float.

        ``gamma`` covers the heads of the cumulants; reconstruction heads have discount 0.
        """
        reconstruction = cumulants.size - cumulants.base_size
        if isinstance(gamma, (int, float)):
            if not reconstruction:
                return None
            gamma = (float(gamma),) * cumulants.base_size
        if len(gamma) != cumulants.base_size:
            names = cumulants.names[: cumulants.base_size]
            listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                f"gamma gives {len(gamma)} discounts, but there are {len(names)} heads "
                f"({listed}): give one per head, or one float for all"
            )
        return np.array([*gamma, *(0.0,) * reconstruction], dtype=np.float64)

    # ---------------------------------------------------------------- checkpoints
    def _identity(self) -> dict[str, Any]:
        identity = {
            "settings": self.settings.describe(),
            "observation_size": self.observation_size,
            "input_size": len(self.input_names),
            "n_features": self.learner.n_features,
            "cumulants": list(self.cumulants.names),
            "td_config": dataclasses.asdict(self.engine.config),
        }
        if self._head_gammas is not None:
            identity["discounts_per_head"] = self._head_gammas.tolist()
        if self._centre is not None:
            identity["center_cumulants"] = True
        if self.settings.observe_past:
            identity["observe_past"] = self.settings.observe_past
        return identity

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly.

        The engine (learner, heads, normalisers, traces, optimiser), step counters, and
        what the state was built for (checked by ``load_state_dict``).
        """
        saved = {
            "format": STATE_FORMAT,
            **self._identity(),
            "streams": self.streams,
            "engine": self.engine.state_dict(),
            "total_steps": self.total_steps,
            "episode_steps": self.episode_steps.tolist(),
            "state": torch.from_numpy(self.state.copy()),
            "predictions": torch.from_numpy(self.predictions.copy()),
        }
        if self._past is not None:
            saved["past_observations"] = torch.from_numpy(self._past.buffer.copy())
        if self._centre is not None:
            saved["cumulant_mean"] = torch.from_numpy(self._centre.mean.copy())
            saved["cumulant_count"] = self._centre.count
        return saved

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore ``state_dict``; a state built for another env or learner is refused.

        With a different number of streams (trained on N envs, evaluated on one), the
        shared parts are loaded (parameters, heads, normalisers, optimiser) and every stream
        starts a new episode.
        """
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not an agent-state wrapper state (format {saved.get('format')!r}, expected "
                f"{STATE_FORMAT!r})"
            )
        mine = self._identity()
        differences = [
            f"{key}: saved {_short(saved.get(key))}, here {_short(value)}"
            for key, value in mine.items()
            if saved.get(key) != value
        ]
        if differences:
            raise ValueError(
                "cannot load agent state: it was saved for a different env or learner ("
                + "; ".join(differences)
                + "). Build the wrapper with the saved settings on the same kind of env"
            )
        if saved["streams"] == self.streams:
            self.engine.load_state_dict(saved["engine"])
            self.total_steps = int(saved["total_steps"])
            self.episode_steps = np.asarray(saved["episode_steps"], dtype=np.int64)
            self.state = saved["state"].numpy().copy()
            self.predictions = saved["predictions"].numpy().copy()
            if self._past is not None:
                self._past.buffer[:] = saved["past_observations"].numpy()
        else:
            if self._past is not None:
                self._past.clear()
            self.engine.load_state_dict(_shared_engine_state(saved["engine"], self.engine))
            self.total_steps = int(saved["total_steps"])
            self.episode_steps[:] = 0
        if self._centre is not None:
            self._centre.mean[:] = saved["cumulant_mean"].numpy()
            self._centre.count = int(saved["cumulant_count"])
        if self.statistics is not None:
            same_streams = saved["streams"] == self.streams
            self.statistics.restart(self._last_predictions() if same_streams else None)
        self._divergence = None


def _shared_engine_state(saved: Mapping[str, Any], engine: TDPredictor) -> dict[str, Any]:
    """``engine``'s own state with the stream-independent parts taken from ``saved``."""
    merged = engine.state_dict()
    for key in ("head_weight", "input_normalizer", "feature_normalizer", "optimizer"):
        merged[key] = saved[key]
    for key in ("params", "generator"):
        merged["learner"][key] = saved["learner"][key]
    return merged


def _to_numpy(tensor: Tensor, dtype: type) -> np.ndarray:
    """A new array (never a view of a tensor the engine updates in place)."""
    return np.array(tensor.detach().numpy(), dtype=dtype)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
