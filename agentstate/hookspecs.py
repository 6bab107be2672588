"""Plugin hook specifications (pluggy project name ``agentstate``).

A plugin is any module or object with functions marked ``@agentstate.hookimpl``. Third-party
packages expose it through the entry-point group ``agentstate``::

    [project.entry-points.agentstate]
    my_learner = "my_package.my_plugin"

The built-in learners are registered through the very same entry-point group and hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from agentstate.registry import LearnerSpec

PROJECT_NAME = "agentstate"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def agentstate_learners() -> list[LearnerSpec]:
    """Declare the state learners a plugin provides.

    Called once, the first time the registry is used (``available_learners``,
    ``make_learner``, ``agentstate learners``), after every entry point of the group
    ``agentstate`` has been imported.

    Returns:
        One ``agentstate.LearnerSpec`` per learner: its unique name, the learner class,
        its config dataclass, and whether its gradient is exact.
    """
    # pluggy reads a spec's signature and docstring only; its body never runs.
    raise NotImplementedError
