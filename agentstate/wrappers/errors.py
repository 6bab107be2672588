"""Errors an agent-state wrapper raises instead of passing bad numbers to the policy."""

from __future__ import annotations


class NonFiniteInputError(ValueError):
    """An observation, action, reward or cumulant holds NaN or inf.

    Raised before the learner sees the step, so the learner is unchanged.
    """


class LearnerDivergedError(FloatingPointError):
    """The learner's agent state or predictions became non-finite or left their bounds.

    Raised at the first step it shows and at every later step until a good state is loaded.
    """
