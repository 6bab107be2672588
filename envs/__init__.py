"""Benchmark environments; importing this package registers their Gymnasium ids.

Ids (each with a native ``vector_entry_point`` for ``gymnasium.make_vec``):
``agentstate/TraceConditioning-v0``, ``agentstate/TracePatterning-v0``,
``agentstate/NoisyPatterning-v0``. ``agentstate/AtariPrediction-v0`` (needs the ``atari`` extra:
ale-py, opencv) registers by name only, so importing agentstate never imports ale-py.
"""

import gymnasium

from .trace_conditioning import (
    NoisyPatterning,
    NoisyPatterningVectorEnv,
    TraceConditioning,
    TraceConditioningVectorEnv,
    TracePatterning,
    TracePatterningVectorEnv,
)
from .trace_presets import (
    NoisyPatterningConfig,
    TraceConditioningConfig,
    TracePatterningConfig,
    rafiee2022_timing,
)

__all__ = [
    "NoisyPatterning",
    "NoisyPatterningConfig",
    "NoisyPatterningVectorEnv",
    "TraceConditioning",
    "TraceConditioningConfig",
    "TraceConditioningVectorEnv",
    "TracePatterning",
    "TracePatterningConfig",
    "TracePatterningVectorEnv",
    "rafiee2022_timing",
]

_MODULE = "agentstate.envs.trace_conditioning"


def _register_trace_envs() -> None:
    """Register the trace benchmarks once; importing again leaves the registry untouched."""
    for name in ("TraceConditioning", "TracePatterning", "NoisyPatterning"):
        env_id = f"agentstate/{name}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(
                id=env_id,
                entry_point=f"{_MODULE}:{name}",
                vector_entry_point=f"{_MODULE}:{name}VectorEnv",
            )


_register_trace_envs()


def _register_atari_prediction() -> None:
    """Register the Atari Prediction Benchmark lazily (a string entry point), once."""
    if "agentstate/AtariPrediction-v0" not in gymnasium.registry:
        gymnasium.register(
            id="agentstate/AtariPrediction-v0",
            entry_point="agentstate.envs.atari_prediction:AtariPrediction",
        )


_register_atari_prediction()
