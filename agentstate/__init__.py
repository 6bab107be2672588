"""agentstate: online agent-state construction with scalable real-time recurrent learning.

Importing the package registers the benchmark environments with Gymnasium
(``agentstate/TraceConditioning-v0`` and friends).
"""

import agentstate.envs as envs  # noqa: F401  (registers the Gymnasium env ids)
from agentstate.hookspecs import hookimpl
from agentstate.learner import StateLearner
from agentstate.registry import LearnerSpec, available_learners, make_learner
from agentstate.wrappers import AgentStateVectorWrapper, AgentStateWrapper

__version__ = "0.1.0"

__all__ = [
    "AgentStateVectorWrapper",
    "AgentStateWrapper",
    "LearnerSpec",
    "StateLearner",
    "available_learners",
    "hookimpl",
    "make_learner",
    "__version__",
]
