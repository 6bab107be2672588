"""Reconstruction heads: targets that make the agent state keep the recent past.

A state trained only to predict future cumulants keeps what predicts them; a cue that
predicts nothing that follows (which card came up four steps ago) is let go. Reconstruction
heads ask for it directly: with ``reconstruct_past = N``, the cumulant that arrives with
``o_t+1`` also holds ``[o_t-1, ..., o_t-N]``, the encoded observations of the N steps before
``o_t`` (zeros before the episode began). The heads have discount 0, so each is a supervised
loss ``(y_t - o_t-k)^2 / 2`` on ``h_t``, which has seen ``o_t`` and everything before it; its
learner gradient is the learner's exact RTRL gradient, as for every head.

The targets come from the wrapper's history of encoded observations
(``agentstate.wrappers.history``).
"""

from __future__ import annotations

from collections.abc import Sequence


def reconstruction_names(component_names: Sequence[str], steps: int) -> list[str]:
    """Head names, ``<component> <k> back`` for k = 1..steps, in the order of the targets.

    Example:
        >>> reconstruction_names(["x", "y"], 2)
        ['x 1 back', 'y 1 back', 'x 2 back', 'y 2 back']
    """
    return [f"{name} {k} back" for k in range(1, steps + 1) for name in component_names]
