"""Configurations and presets of the animal-learning prediction benchmarks.

Every number of the three benchmark families lives in one frozen dataclass per family:
:class:`TraceConditioningConfig`, :class:`TracePatterningConfig` and
:class:`NoisyPatterningConfig`. Each has a ``from_preset(preset, **overrides)`` constructor;
the field defaults are the ``"jmlr2023"`` preset.

Presets:
    ``"jmlr2023"``: the variant of Javed, Shah, Sutton and White (JMLR 2023): one-step CS and
    US, ISI ~ U{24..36}, ITI ~ U{80..120}, γ = 0.9, and five distractors, the k-th on at each
    step independently with probability 1/(10k). Trace patterning presents exactly 3 of 6 CS
    per trial; 10 of the 20 such patterns are valid (drawn per seed) and only they, always,
    are followed by the US. Noisy patterning sets ISI = CS duration = 1; its noise is the
    distractors (``us_flip_probability`` = 0; raise it for label noise).

    ``"rafiee2022"``: Rafiee et al., "From eye-blinks to state construction: diagnostic
    benchmarks for online representation learning" (Adaptive Behavior, 2022/23). CS lasts 4
    steps, US 2 steps, distractors 4 steps; ISI ~ U{ISI − ⌊ISI/3⌋ .. ISI + ⌊ISI/3⌋} around a
    nominal ISI (default 10; see :func:`rafiee2022_timing` for other ISIs), ITI ~ U{80..120},
    γ = 1 − 1/ISI. Details taken from the authors' public benchmark code: trace-conditioning
    distractors switch on, when off, with probability 1/(10k) per step and then stay on for
    their duration followed by at least one off step (k = 1..10); patterning distractors
    switch on with probability 1/2 each at CS onset; a patterning trial shows a valid pattern
    (half of the CS on) with overall probability 1/2, mixing a drawn valid pattern with a
    uniformly random on/off pattern of all CS (which may be valid, or empty); noisy
    patterning flips the US outcome with a noise probability and sets ISI = CS duration = 4,
    so γ = 0.75. Not found and chosen here: the number of patterning distractors (10, as for
    trace conditioning), the number of CS and valid patterns (6 and 10, as in the JMLR
    variant) and the noisy-patterning noise (0.1).

Trial structure (all families): a trial starts with the CS onset; the US starts ISI steps
after the CS onset (if the trial is followed by a US); the next trial's CS onset comes ITI
steps after that US onset (or after where it would have been). Observation layout, every
family and preset: ``[US, CS_1 .. CS_n_cs, distractor_1 .. distractor_n]``; the cumulant is
the US bit.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

__all__ = [
    "JMLR2023_DISTRACTOR_PROBABILITIES",
    "NoisyPatterningConfig",
    "RAFIEE2022_DISTRACTOR_PROBABILITIES",
    "TraceConditioningConfig",
    "TracePatterningConfig",
    "rafiee2022_timing",
]

DistractorOnset = Literal["any_step", "cs_onset"]
PatternPool = Literal["n_cs_on", "any"]

JMLR2023_DISTRACTOR_PROBABILITIES = tuple(1.0 / (10 * k) for k in range(1, 6))
RAFIEE2022_DISTRACTOR_PROBABILITIES = tuple(1.0 / (10 * k) for k in range(1, 11))
_MAX_CS = 20  # valid patterns are drawn from the enumerated n_cs_on-of-n_cs patterns

ConfigT = TypeVar("ConfigT", bound="_StimulusFields")


def rafiee2022_timing(isi: int) -> dict[str, Any]:
    """ISI range and discount of Rafiee et al.'s trace tasks around a nominal ISI.

    Args:
        isi: nominal inter-stimulus interval in steps (the paper uses 10, 20 and 30).

    Returns:
        ``{"isi_min", "isi_max", "gamma"}``: ISI ~ U{isi − ⌊isi/3⌋ .. isi + ⌊isi/3⌋} and
        γ = 1 − 1/isi, to pass as overrides, e.g.
        ``TraceConditioning(preset="rafiee2022", **rafiee2022_timing(20))``.

    """
    _check_int("isi", isi, low=1)
    return {"isi_min": isi - isi // 3, "isi_max": isi + isi // 3, "gamma": 1.0 - 1.0 / isi}


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    is_integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_integer or int(value) < low or (high is not None and int(value) > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def _check_probability(name: str, value: Any) -> None:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_range(low_name: str, low: int, high_name: str, high: int) -> None:
    if low > high:
        raise ValueError(
            f"{low_name} must be <= {high_name} (the range U{{{low_name}..{high_name}}} is "
            f"empty), got {low_name}={low}, {high_name}={high}"
        )


@dataclass(frozen=True)
class _StimulusFields:
    """Fields every family shares; defaults are the jmlr2023 preset."""

    gamma: float = 0.9
    """Discount of the return to predict, in [0, 1)."""
    iti_min: int = 80
    """Shortest inter-trial interval: steps from US onset to the next CS onset."""
    iti_max: int = 120
    """Longest inter-trial interval (inclusive)."""
    cs_duration: int = 1
    """Steps each CS of a trial stays on, from the trial's first step."""
    us_duration: int = 1
    """Steps the US stays on."""
    distractor_probabilities: tuple[float, ...] = JMLR2023_DISTRACTOR_PROBABILITIES
    """Onset probability of each distractor; its length is the number of distractors."""
    distractor_onset: DistractorOnset = "any_step"
    """When a distractor may switch on: "any_step" (while off) or "cs_onset" (each trial)."""
    distractor_duration: int = 1
    """Steps a distractor stays on once switched on."""
    distractor_min_off_steps: int = 0
    """Steps a distractor stays off after each run before it may switch on ("any_step")."""

    PRESETS: ClassVar[dict[str, Any]]

    @classmethod
    def from_preset(cls: type[ConfigT], preset: str = "jmlr2023", **overrides: Any) -> ConfigT:
        """Build the named preset with ``overrides`` replacing some of its fields.

        Args:
            preset: one of ``"jmlr2023"``, ``"rafiee2022"``.
            **overrides: field names of this config and their values.

        Returns:
            The validated config.

        Raises:
            ValueError: unknown preset or field name, or an invalid value.

        """
        if preset not in cls.PRESETS:
            raise ValueError(f"preset must be one of {list(cls.PRESETS)}, got {preset!r}")
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown argument(s) {unknown} for {cls.__name__}; allowed: {allowed}"
            )
        return dataclasses.replace(cls.PRESETS[preset], **overrides)

    @property
    def n_distractors(self) -> int:
        """Number of distractor bits in the observation."""
        return len(self.distractor_probabilities)

    def _validate_stimulus(self, isi_min: int, isi_max: int) -> None:
        object.__setattr__(self, "distractor_probabilities", tuple(self.distractor_probabilities))
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Real):
            raise ValueError(f"gamma must be a number in [0, 1), got {self.gamma!r}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1) (continuing task), got {self.gamma!r}")
        _check_int("iti_min", self.iti_min, low=1)
        _check_int("iti_max", self.iti_max, low=1)
        _check_range("iti_min", self.iti_min, "iti_max", self.iti_max)
        for name in ("cs_duration", "us_duration", "distractor_duration"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("distractor_min_off_steps", self.distractor_min_off_steps, low=0)
        for k, probability in enumerate(self.distractor_probabilities):
            _check_probability(f"distractor_probabilities[{k}]", probability)
        _check_choice("distractor_onset", self.distractor_onset, ("any_step", "cs_onset"))
        # Consecutive trials must not overlap their CS (or US) runs.
        if isi_min + self.iti_min < max(self.cs_duration, self.us_duration):
            raise ValueError(
                "isi_min + iti_min (shortest trial) must be >= max(cs_duration, us_duration), "
                f"got isi_min={isi_min}, iti_min={self.iti_min}, "
                f"cs_duration={self.cs_duration}, us_duration={self.us_duration}"
            )


@dataclass(frozen=True)
class _TraceGapFields:
    """ISI range of the families with a trace gap; defaults are the jmlr2023 preset."""

    isi_min: int = 24
    """Shortest inter-stimulus interval: steps from CS onset to US onset."""
    isi_max: int = 36
    """Longest inter-stimulus interval (inclusive)."""

    def _validate_isi(self) -> None:
        _check_int("isi_min", self.isi_min, low=1)
        _check_int("isi_max", self.isi_max, low=1)
        _check_range("isi_min", self.isi_min, "isi_max", self.isi_max)


@dataclass(frozen=True)
class _PatternFields:
    """CS-pattern fields of the patterning families; defaults are the jmlr2023 preset."""

    n_cs: int = 6
    """Number of CS bits."""
    n_cs_on: int = 3
    """CS on in a valid pattern (and in every pattern of the "n_cs_on" pool)."""
    n_valid_patterns: int = 10
    """Valid patterns, drawn per stream and seed among the n_cs_on-of-n_cs patterns."""
    valid_trial_probability: float = 0.5
    """Probability that a trial presents a valid pattern."""
    pattern_pool: PatternPool = "n_cs_on"
    """Other trials' patterns: uniform over "n_cs_on"-of-n_cs patterns, or "any" on/off."""
    us_flip_probability: float = 0.0
    """Probability that a trial's US outcome (US iff valid pattern) is flipped."""

    @property
    def pool_size(self) -> int:
        """Number of patterns in the pattern pool."""
        if self.pattern_pool == "any":
            return 2**self.n_cs
        return math.comb(self.n_cs, self.n_cs_on)

    def _validate_patterns(self) -> None:
        _check_int("n_cs", self.n_cs, low=1, high=_MAX_CS)
        _check_int("n_cs_on", self.n_cs_on, low=1, high=self.n_cs)
        _check_int("n_valid_patterns", self.n_valid_patterns, 1, math.comb(self.n_cs, self.n_cs_on))
        _check_choice("pattern_pool", self.pattern_pool, ("n_cs_on", "any"))
        _check_probability("valid_trial_probability", self.valid_trial_probability)
        _check_probability("us_flip_probability", self.us_flip_probability)
        # A trial shows a forced valid pattern or a uniform pool pattern, so the valid share
        # cannot fall below the pool's own share of valid patterns.
        pool_valid_share = self.n_valid_patterns / self.pool_size
        if self.valid_trial_probability < pool_valid_share:
            raise ValueError(
                f"valid_trial_probability must be in [{pool_valid_share:.6g}, 1] "
                f"(n_valid_patterns / pool size for pattern_pool={self.pattern_pool!r}), "
                f"got {self.valid_trial_probability!r}"
            )


@dataclass(frozen=True)
class TracePatterningConfig(_PatternFields, _TraceGapFields, _StimulusFields):
    """Every number of trace patterning; the defaults are the ``"jmlr2023"`` preset.

    The CS pattern shown at a trial's onset decides the US (valid pattern → US), which
    arrives after a trace gap, so the learner must remember a configural cue.

    Example:
        >>> config = TracePatterningConfig.from_preset("rafiee2022", n_cs=8)
        >>> config.n_cs, config.cs_duration, config.isi_min, config.isi_max
        (8, 4, 7, 13)

    """

    def __post_init__(self) -> None:
        self._validate_isi()
        self._validate_stimulus(self.isi_min, self.isi_max)
        self._validate_patterns()

    def as_trace_patterning(self) -> TracePatterningConfig:
        """Return this config: trace patterning is the general form the simulator runs."""
        return self


@dataclass(frozen=True)
class TraceConditioningConfig(_TraceGapFields, _StimulusFields):
    """Every number of trace conditioning; the defaults are the ``"jmlr2023"`` preset.

    A single CS starts every trial and is always followed, ISI steps after its onset, by the
    US. Observation layout ``[US, CS, distractors...]``.

    Example:
        >>> TraceConditioningConfig().isi_min, TraceConditioningConfig().n_distractors
        (24, 5)
        >>> TraceConditioningConfig.from_preset("rafiee2022").gamma
        0.9

    """

    def __post_init__(self) -> None:
        self._validate_isi()
        self._validate_stimulus(self.isi_min, self.isi_max)

    def as_trace_patterning(self) -> TracePatterningConfig:
        """Express trace conditioning as trace patterning with one CS, always valid."""
        return TracePatterningConfig(
            **_shared_values(self),
            isi_min=self.isi_min,
            isi_max=self.isi_max,
            n_cs=1,
            n_cs_on=1,
            n_valid_patterns=1,
            valid_trial_probability=1.0,
            pattern_pool="n_cs_on",
            us_flip_probability=0.0,
        )


@dataclass(frozen=True)
class NoisyPatterningConfig(_PatternFields, _StimulusFields):
    """Every number of noisy patterning; the defaults are the ``"jmlr2023"`` preset.

    Patterning without a trace gap: the US starts right as the CS ends (ISI = cs_duration).
    Noise comes from the distractors and, where ``us_flip_probability`` > 0, from US
    outcomes that disagree with the pattern.

    Example:
        >>> config = NoisyPatterningConfig.from_preset("rafiee2022")
        >>> config.cs_duration, config.us_flip_probability, config.gamma
        (4, 0.1, 0.75)

    """

    def __post_init__(self) -> None:
        self._validate_stimulus(self.cs_duration, self.cs_duration)
        self._validate_patterns()

    def as_trace_patterning(self) -> TracePatterningConfig:
        """Express noisy patterning as trace patterning with ISI fixed to the CS duration."""
        pattern_values = {
            field.name: getattr(self, field.name) for field in dataclasses.fields(_PatternFields)
        }
        return TracePatterningConfig(
            **_shared_values(self),
            **pattern_values,
            isi_min=self.cs_duration,
            isi_max=self.cs_duration,
        )


def _shared_values(config: _StimulusFields) -> dict[str, Any]:
    shared = dataclasses.fields(_StimulusFields)
    return {field.name: getattr(config, field.name) for field in shared}


_RAFIEE2022_DURATIONS: dict[str, Any] = {
    "iti_min": 80,
    "iti_max": 120,
    "cs_duration": 4,
    "us_duration": 2,
    "distractor_duration": 4,
    "distractor_min_off_steps": 1,
}
_RAFIEE2022_PATTERNS: dict[str, Any] = {
    "n_cs": 6,
    "n_cs_on": 3,
    "n_valid_patterns": 10,
    "valid_trial_probability": 0.5,
    "pattern_pool": "any",
    "distractor_probabilities": (0.5,) * 10,
    "distractor_onset": "cs_onset",
}

TraceConditioningConfig.PRESETS = {
    "jmlr2023": TraceConditioningConfig(),
    "rafiee2022": TraceConditioningConfig(
        **_RAFIEE2022_DURATIONS,
        **rafiee2022_timing(10),
        distractor_probabilities=RAFIEE2022_DISTRACTOR_PROBABILITIES,
    ),
}
TracePatterningConfig.PRESETS = {
    "jmlr2023": TracePatterningConfig(),
    "rafiee2022": TracePatterningConfig(
        **_RAFIEE2022_DURATIONS, **rafiee2022_timing(10), **_RAFIEE2022_PATTERNS
    ),
}
NoisyPatterningConfig.PRESETS = {
    "jmlr2023": NoisyPatterningConfig(),
    "rafiee2022": NoisyPatterningConfig(
        **_RAFIEE2022_DURATIONS,
        **_RAFIEE2022_PATTERNS,
        gamma=1.0 - 1.0 / _RAFIEE2022_DURATIONS["cs_duration"],  # γ = 1 − 1/ISI, ISI = CS
        us_flip_probability=0.1,
    ),
}
