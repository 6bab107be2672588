"""Is the wrapper's agent state alive? Its saturation on the search's tasks, per setting.

The wrapper learns online under uniformly random actions (no policy: the state alone), and
over the last ``--window`` steps this reports the mean |h| (1.0: every feature pinned at
+-1, a tanh-bounded state that has saturated) and the mean over features of each feature's
standard deviation over time (0: a constant state, which carries nothing). A few seconds
per cell:

    python benchmarks/memory/state_saturation.py
    python benchmarks/memory/state_saturation.py --tasks RepeatPreviousEasy --steps 50000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from memory_tasks import make_task  # noqa: E402

import agentstate  # noqa: E402

TASKS = [
    "RepeatPreviousEasy",
    "RepeatFirstEasy",
    "CountRecallEasy",
    "PositionOnlyCartPoleEasy",
    "CueMemory",
]
PLAIN = {"center_cumulants": False, "reconstruct_past": 0}
SETTINGS: dict[str, dict[str, Any]] = {
    "columnar 7 (the first defaults)": {"learner": "columnar", **PLAIN},
    "columnar 7, centred": {"learner": "columnar", **PLAIN, "center_cumulants": True},
    "eLSTM 16": {"learner": "elstm", **PLAIN},
    "eLSTM 16, centred, reconstruction (the previous defaults)": {
        "learner": "elstm",
        "center_cumulants": True,
        "reconstruct_past": 4,
    },
}


def saturation(
    task: str, steps: int, window: int, seed: int, **options: Any
) -> tuple[float, float]:
    """``(mean |h|, mean over features of std_t h)`` over the last ``window`` steps."""
    env = agentstate.AgentStateWrapper(make_task(task), seed=seed, **options)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    n_features = env.core.learner.n_features
    states = []
    for step in range(steps):
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if step >= steps - window:
            states.append(observation[-n_features:])  # h_t ends the observation
        if terminated or truncated:
            env.reset()
    recent = np.array(states)
    return float(np.abs(recent).mean()), float(recent.std(axis=0).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| task | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---:|" * len(SETTINGS))
    for task in args.tasks:
        cells = []
        for options in SETTINGS.values():
            level, spread = saturation(task, args.steps, args.window, args.seed, **options)
            cells.append(f"{level:.3f} / {spread:.3f}")
        print(f"| {task} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nmean |h| / mean std over time of h, last {args.window:,} of {args.steps:,} steps")


if __name__ == "__main__":
    main()
