"""``AgentStateWrapper``: a Gymnasium env whose observation carries an online-learned state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from agentstate.observation import Encoder
from agentstate.wrappers.controls import AgentStateControls
from agentstate.wrappers.core import NONFINITE_INFO_KEY, AgentStateCore, StepBatch, StepResult
from agentstate.wrappers.settings import AgentStateSettings, CumulantFunction


class AgentStateWrapper(AgentStateControls, gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Appends an agent state, learned online by a recurrent state learner, to each observation.

    At every step the learner reads ``x_t = [enc(o_t), enc(a_t-1), r_t]`` (the action and
    reward parts only if ``include_prev_action`` / ``include_prev_reward``), and a
    ``TDPredictor`` trains it online, by TD(lambda) over the learner's RTRL gradients, to
    predict the discounted future of the ``cumulants``. The returned observation is
    ``[enc(o_t), enc(o_t-1), ..., enc(o_t-M), h_t]``, float32, with M = ``observe_past``
    earlier observations (3 by default, zeros before the episode began; ``enc(o_t)`` left out
    if ``include_observation=False``), where ``enc`` flattens Box, one-hot encodes Discrete /
    MultiDiscrete and concatenates Dict / Tuple parts.

    Episodes: ``reset`` starts a new episode (state, credit memory and traces reset); the
    last observation of an episode is learned from with discount 0 if it terminated, and
    bootstrapped (discount ``gamma``) if it was truncated.

    Bounds: the new ``observation_space`` is a float32 Box: the original observation's
    bounds (one-hot parts in [0, 1]) followed by [-1, 1] for the state of LSTM-family
    learners (unbounded for others). Every returned observation lies in it provided the
    env's observations lie in the env's own space. A learner whose state or predictions
    become non-finite raises ``LearnerDivergedError`` instead of reaching the policy.

    Example:
        >>> import gymnasium as gym
        >>> from agentstate import AgentStateWrapper
        >>> env = AgentStateWrapper(gym.make("CartPole-v1"), n_features=8, seed=0)
        >>> env.observation_space.shape
        (24,)
        >>> observation, info = env.reset(seed=0)
        >>> observation, reward, terminated, truncated, info = env.step(0)
        >>> observation.dtype, observation in env.observation_space
        (dtype('float32'), True)
        >>> env.freeze()          # evaluation: the learner stops learning
        >>> env.learning
        False

    Change logs:
        * v0.1.0 - Initially added.
    """

    def __init__(
        self,
        env: gym.Env,
        learner: str = AgentStateSettings.learner,
        *,
        cumulants: str | CumulantFunction = AgentStateSettings.cumulants,
        include_observation: bool = AgentStateSettings.include_observation,
        include_prev_action: bool = AgentStateSettings.include_prev_action,
        include_prev_reward: bool = AgentStateSettings.include_prev_reward,
        gamma: float | tuple[float, ...] = AgentStateSettings.gamma,
        lambda_: float = AgentStateSettings.lambda_,
        reconstruct_past: int = AgentStateSettings.reconstruct_past,
        observe_past: int = AgentStateSettings.observe_past,
        center_cumulants: bool = AgentStateSettings.center_cumulants,
        step_size: float = AgentStateSettings.step_size,
        learn: bool = True,
        seed: int | None = None,
        nonfinite: str = "raise",
        encoder: Encoder | None = None,
        td_options: Mapping[str, Any] | None = None,
        **learner_kwargs: Any,
    ) -> None:
        """Wrap ``env``.

        Args:
            env: the environment (Box, Discrete, MultiDiscrete, MultiBinary, Dict or Tuple
                observations; images need ``encoder``).
            learner: registered state learner (``agentstate.available_learners()``).
            cumulants: ``"reward+observation"`` (default), ``"reward"``,
                ``"observation"`` (one head per encoded observation component), or
                ``(observation, reward, info) -> 1-D array``.
            include_observation: the returned observation starts with ``enc(o_t)``; False
                leaves it out (``h_t`` alone if ``observe_past`` is 0).
            include_prev_action: the learner's input carries the previous action.
            include_prev_reward: the learner's input carries the previous reward.
            gamma: discount of the predicted cumulants: one float, or one per head.
            lambda_: TD(lambda) trace decay.
            reconstruct_past: add supervised heads (discount 0) that reconstruct the encoded
                observations of this many steps before the current one; 0: none.
            observe_past: also return the encoded observations of this many steps before
                the current one (zeros before the episode began); 0: none.
            center_cumulants: subtract each cumulant's running mean before learning.
            step_size: step size of the learner's parameters.
            learn: train online (False: frozen, for evaluation).
            seed: seed of the learner's initial parameters (None: nondeterministic).
            nonfinite: ``"raise"`` on NaN/inf input, or ``"skip"``: keep the step out of
                learning and list the inputs in ``info["agent_state_nonfinite"]``.
            encoder: feature encoder, observation -> 1-D array (required for images).
            td_options: further ``agentstate.td.TDConfig`` fields (``optimizer``, ...).
            **learner_kwargs: the learner's config fields (``n_features``, ...).
        """
        settings = AgentStateSettings(
            learner=learner,
            cumulants=cumulants,
            include_observation=include_observation,
            include_prev_action=include_prev_action,
            include_prev_reward=include_prev_reward,
            gamma=gamma,
            lambda_=lambda_,
            reconstruct_past=reconstruct_past,
            observe_past=observe_past,
            center_cumulants=center_cumulants,
            step_size=step_size,
            learn=learn,
            seed=seed,
            nonfinite=nonfinite,
            encoder=encoder,
            td_options=dict(td_options or {}),
            learner_kwargs=learner_kwargs,
        )
        recorded = {
            field.name: getattr(settings, field.name)
            for field in dataclasses.fields(settings)
            if field.name not in ("td_options", "learner_kwargs")
        }  # gymnasium's record of the call, as the caller wrote it
        gym.utils.RecordConstructorArgs.__init__(
            self, **recorded, td_options=td_options, **learner_kwargs
        )
        gym.Wrapper.__init__(self, env)
        self.core = AgentStateCore(env.observation_space, env.action_space, 1, settings)
        self.observation_space = self.core.observation_space

    # ---------------------------------------------------------------- gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the env and start a new episode of the agent state."""
        observation, info = self.env.reset(seed=seed, options=options)
        observations = self.core.observation_encoder.add_stream_axis(observation)
        result = self.core.step(StepBatch.reset(observations, 1, [info]))
        return result.observations[0], _report(info, result)

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        """Step the env, learn from the transition, return the augmented observation."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        encoder = self.core.action_encoder
        result = self.core.step(
            StepBatch(
                observations=self.core.observation_encoder.add_stream_axis(observation),
                rewards=np.array([reward], dtype=np.float64),
                terminated=np.array([terminated]),
                truncated=np.array([truncated]),
                episode_start=np.zeros(1, dtype=bool),
                actions=encoder.add_stream_axis(action) if encoder is not None else None,
                infos=[info],
            )
        )
        return result.observations[0], reward, terminated, truncated, _report(info, result)


def _report(info: dict[str, Any], result: StepResult) -> dict[str, Any]:
    if result.nonfinite:
        info[NONFINITE_INFO_KEY] = result.nonfinite[0]
    return info
