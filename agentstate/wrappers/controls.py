"""What every agent-state wrapper offers besides its env API: learning switch, state access."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from agentstate.td import TDPredictor
from agentstate.wrappers.core import AgentStateCore
from agentstate.wrappers.statistics import StatisticsTotals


class AgentStateControls:
    """Mixin over an ``AgentStateCore`` held as ``self.core``.

    Example:
        >>> import gymnasium as gym
        >>> from agentstate import AgentStateWrapper
        >>> env = AgentStateWrapper(gym.make("CartPole-v1"), seed=0)
        >>> env.freeze(); env.learning
        False
        >>> env.unfreeze(); env.learning
        True
    """

    core: AgentStateCore

    @property
    def learning(self) -> bool:
        """Whether the learner is trained online."""
        return self.core.learning

    def freeze(self) -> None:
        """Stop learning (evaluation).

        Parameters, heads and normalisers stay fixed while the agent state keeps advancing
        (by the pure cell, without sensitivities).
        """
        self.core.set_learning(False)

    def unfreeze(self) -> None:
        """Resume learning; credit memory and traces restart from zero."""
        self.core.set_learning(True)

    @property
    def predictor(self) -> TDPredictor:
        """The TD engine; its ``learner`` is the state learner (one stream per env)."""
        return self.core.engine

    @property
    def cumulant_names(self) -> list[str]:
        """One name per TD head."""
        return list(self.core.cumulants.names)

    @property
    def agent_states(self) -> np.ndarray:
        """``[streams, n_features]`` agent states at the last observations."""
        return self.core.state.copy()

    @property
    def predictions(self) -> np.ndarray:
        """``[streams, n_cumulants]`` head predictions at the last observations."""
        return self.core.predictions.copy()

    @property
    def cumulant_groups(self) -> dict[str, slice]:
        """Group name (``reward``, ``observation``, ``cumulant``) -> its heads' columns."""
        return dict(self.core.cumulants.groups)

    def enable_statistics(self) -> None:
        """Start accumulating the learner's statistics (``agentstate.wrappers.statistics``).

        They add about 10% to the step time; ``agentstate.sb3.AgentStateLoggerCallback``
        turns them on.
        """
        self.core.enable_statistics()

    def statistics_totals(self) -> StatisticsTotals:
        """The running sums of the statistics (``summarize(later - earlier, groups)``).

        Raises:
            RuntimeError: ``enable_statistics`` was not called.
        """
        if self.core.statistics is None:
            raise RuntimeError("statistics are off: call enable_statistics() first")
        return self.core.statistics.totals()

    def state_dict(self) -> dict[str, Any]:
        """Learner, heads, normalisers, traces, optimiser and step counters."""
        return self.core.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; one saved for another env or learner is refused.

        A state saved with another number of envs (streams) loads its shared parts
        (parameters, heads, normalisers, optimiser) and starts every stream afresh.
        """
        self.core.load_state_dict(state)
