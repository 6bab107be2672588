"""The settings every agent-state wrapper shares, in one dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agentstate.observation import Encoder

CumulantFunction = Callable[[Any, float, Mapping[str, Any]], Any]
"""``(observation, reward, info) -> 1-D array``: one cumulant per entry."""

CUMULANT_NAMES = ("reward", "observation", "reward+observation")
NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class AgentStateSettings:
    """How a wrapper builds, trains and exposes the agent state.

    The defaults are the setting with the best mean final return of PPO + the wrapper over
    the memory harness's suite (``benchmarks/memory/README.md``: the 14 POPGym Easy tasks and
    the cue task, 3 seeds, 100k env steps), among the leaders of the search's rounds on five
    of them: the columnar learner of 7 features (exact RTRL), reward and observation heads
    on centred cumulants, step size 0.003, and the encoded observations of the three steps
    before the current one returned beside it and the agent state.
    """

    learner: str = "columnar"
    """Registered state learner (``agentstate.available_learners()``)."""
    cumulants: str | CumulantFunction = "reward+observation"
    """What the TD heads predict the discounted future of: ``"reward"``, ``"observation"``
    (one head per encoded observation component), ``"reward+observation"``, or a callable
    ``(observation, reward, info) -> 1-D array``."""
    include_observation: bool = True
    """The returned observation starts with the encoded observation; False leaves it out
    (the agent state alone if ``observe_past`` is 0)."""
    include_prev_action: bool = True
    """The learner's input carries the previous action (one-hot if discrete)."""
    include_prev_reward: bool = True
    """The learner's input carries the previous reward."""
    gamma: float | tuple[float, ...] = 0.9
    """Discount of the predicted cumulants: one for every head, or one per cumulant head (a
    sequence as long as the cumulant vector; the ``reconstruct_past`` heads always have 0). A
    head with discount 0 is a supervised loss on the agent state: it predicts the next
    cumulant alone."""
    lambda_: float = 0.9
    """TD(lambda) trace decay."""
    center_cumulants: bool = True
    """Subtract each cumulant's running mean before the heads learn from it
    (``agentstate.wrappers.cumulants.CumulantCentre``): the state is then not pushed to a
    constant that supplies the returns' mean."""
    reconstruct_past: int = 0
    """Add heads, each a supervised loss on the agent state (discount 0), that reconstruct
    the encoded observations of the last ``reconstruct_past`` steps before the current one
    (``agentstate.wrappers.reconstruction``); 0: none. ``gamma`` then covers the other heads."""
    observe_past: int = 3
    """Also return the encoded observations of this many steps before the current one
    (zeros before the episode began), as four stacked frames would with 3: the policy sees
    the recent past as it was, the agent state what the learner kept of the rest. 0: none."""
    step_size: float = 0.003
    """Step size of the learner's parameters (the heads use ``td_options`` or the engine's
    default, ``step_size / number of head features``)."""
    learn: bool = True
    """Train the learner online; False freezes it (evaluation)."""
    seed: int | None = None
    """Seed of the learner's initial parameters (None: nondeterministic)."""
    nonfinite: str = "raise"
    """On a NaN/inf input: ``"raise"`` a ``NonFiniteInputError``, or ``"skip"`` learning on
    that step and report it in ``info["agent_state_nonfinite"]``."""
    encoder: Encoder | None = None
    """Feature encoder for observations (required for images): observation -> 1-D array."""
    td_options: Mapping[str, Any] = field(default_factory=dict)
    """Other ``agentstate.td.TDConfig`` fields (``head_step_size``, ...). The optimizer
    defaults to ``"adam"``: on the cue-memory example the paper's ``"rmsprop_td"``, whose
    second moment starts at 1, leaves the small early RTRL gradients unscaled and learns the
    memory many times slower."""
    learner_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of the learner's config (``n_features``, ``init_scale``, ...)."""

    def __post_init__(self) -> None:
        if not (callable(self.cumulants) or self.cumulants in CUMULANT_NAMES):
            raise ValueError(
                f"cumulants must be one of {', '.join(map(repr, CUMULANT_NAMES))} or a "
                f"callable (observation, reward, info) -> array, got {self.cumulants!r}"
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        if self.encoder is not None and not callable(self.encoder):
            raise TypeError(f"encoder must be callable, got {type(self.encoder).__name__}")
        if not isinstance(self.gamma, (int, float)):
            try:
                gammas = tuple(float(value) for value in self.gamma)
            except TypeError:
                raise TypeError(
                    f"gamma must be a float or a sequence of floats (one per head), got "
                    f"{self.gamma!r}"
                ) from None
            object.__setattr__(self, "gamma", gammas)
        if not all(0.0 <= value <= 1.0 for value in np.ravel(self.gamma)):
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma!r}")
        _check_steps(
            "reconstruct_past",
            self.reconstruct_past,
            "steps of the past the state is trained to reconstruct",
        )
        _check_steps(
            "observe_past", self.observe_past, "steps of the past returned with each observation"
        )
        if self.seed is not None and not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        reserved = {"streams", "independent_params", "input_size"} & set(self.learner_kwargs)
        if reserved:
            raise TypeError(
                f"{', '.join(sorted(reserved))} are set by the wrapper (one learner, one "
                "stream per env, shared parameters); do not pass them"
            )

    def td_config_options(self) -> dict[str, Any]:
        """Keyword arguments of the engine's ``TDConfig``."""
        return {
            # With a discount per head the wrapper passes each step's [B, K] discounts; the
            # engine's own gamma (its default when none is passed) is then never used.
            "gamma": float(np.max(self.gamma)),
            "lambda_": self.lambda_,
            "step_size": self.step_size,
            "optimizer": "adam",
            **self.td_options,
        }

    def describe(self) -> dict[str, Any]:
        """The settings that shape the learner, as plain data (for saved states)."""
        return {
            "learner": self.learner,
            "cumulants": self.cumulants if isinstance(self.cumulants, str) else "callable",
            "include_prev_action": self.include_prev_action,
            "include_prev_reward": self.include_prev_reward,
            "learner_kwargs": dict(self.learner_kwargs),
        }


def _check_steps(name: str, value: Any, meaning: str) -> None:
    """Refuse a count of steps that is not an int >= 0 (bools included)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 ({meaning}), got {value!r}")


def settings_from_options(learner: str, options: Mapping[str, Any]) -> AgentStateSettings:
    """Split keyword ``options`` into settings fields and the learner's own keywords.

    Example:
        >>> settings = settings_from_options("columnar", {"gamma": 0.8, "n_features": 16})
        >>> settings.gamma, dict(settings.learner_kwargs)
        (0.8, {'n_features': 16})
    """
    names = {f.name for f in dataclasses.fields(AgentStateSettings)} - {"learner_kwargs"}
    chosen = {key: value for key, value in options.items() if key in names}
    learner_kwargs = {key: value for key, value in options.items() if key not in names}
    return AgentStateSettings(learner=learner, learner_kwargs=learner_kwargs, **chosen)
