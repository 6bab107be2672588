"""Gymnasium wrappers that give any agent an online-learned agent state.

``AgentStateWrapper`` wraps one env; ``AgentStateVectorWrapper`` wraps a gymnasium vector env
with one learner for all sub-envs (``agentstate.sb3.AgentStateVecEnv`` does the same for SB3).
"""

from agentstate.wrappers.agent_state import AgentStateWrapper
from agentstate.wrappers.core import NONFINITE_INFO_KEY
from agentstate.wrappers.errors import LearnerDivergedError, NonFiniteInputError
from agentstate.wrappers.settings import AgentStateSettings
from agentstate.wrappers.vector import AgentStateVectorWrapper

__all__ = [
    "NONFINITE_INFO_KEY",
    "AgentStateSettings",
    "AgentStateVectorWrapper",
    "AgentStateWrapper",
    "LearnerDivergedError",
    "NonFiniteInputError",
]
