"""Where the time of an `agentstate run` goes: the TD step, the env, and the runner's own loop.

Each case runs ``run_experiment`` on trace patterning with 30 independent streams (the paper
comparison's setting) and splits the wall-clock per step into the TD engine's step
(``TDPredictor.step``: the compiled kernel and the engine's per-step checks), the env (the
streams' observations, rendered in chunks) and the rest (the runner's loop, scoring and
logging). Cases alternate over ``--repeats`` rounds so that a busy machine slows all of them
alike; the median round is reported.

Run: ``python benchmarks/bench_runner.py [--steps 100000] [--repeats 3] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch

from agentstate.experiment import RunConfig, run_experiment

CASES: dict[str, dict[str, Any]] = {
    "columnar 7": {"learner": "columnar", "learner_kwargs": {"n_features": 7}},
    "CCN 20:4, first stage": {
        "learner": "ccn",
        "learner_kwargs": {"n_features": 20, "columns_per_stage": 4},
    },
    "CCN 20:4, all stages built": {
        # Stages of 1 step: every column is built after 5 steps, so the run times the last
        # stage, the longest step of a 50M-step run.
        "learner": "ccn",
        "learner_kwargs": {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": 1},
    },
    "T-BPTT 15, k = 4": {"learner": "tbptt", "learner_kwargs": {"n_features": 15}},
}


def time_case(fields: dict[str, Any], steps: int, streams: int) -> dict[str, float]:
    """Microseconds per step (all streams together): total, TD step, env, rest."""
    config = RunConfig(
        env="trace-patterning",
        steps=steps,
        streams=streams,
        independent=True,
        optimizer="rmsprop_td",
        log_every=50_000,
        **fields,
    )
    with tempfile.TemporaryDirectory() as out:
        result = run_experiment(config, Path(out), progress=False)
    total = 1e6 / result.steps_per_second
    env = 1e6 * streams / result.env_steps_per_second
    td_step = result.learner_us_per_step
    return {"total": total, "td_step": td_step, "env": env, "rest": total - td_step - env}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, fields in CASES.items():
            rounds[name].append(time_case(fields, args.steps, args.streams))
    # The round of median total time (the middle one of an odd number of rounds).
    medians = {
        name: sorted(times, key=lambda t: t["total"])[len(times) // 2]
        for name, times in rounds.items()
    }
    print(
        f"µs per step of {args.streams} streams, median of {args.repeats} rounds, "
        f"{args.steps:,} steps"
    )
    print("| case | total | TD step | env | runner loop, scoring, logging | steps/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in medians.items():
        print(
            f"| {name} | {t['total']:.1f} | {t['td_step']:.1f} | {t['env']:.1f} | "
            f"{t['rest']:.1f} ({t['rest'] / t['total']:.0%}) | {1e6 / t['total']:,.0f} |"
        )
    if args.json:
        record = {
            "date": date.today().isoformat(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "steps": args.steps,
            "streams": args.streams,
            "repeats": args.repeats,
            "us_per_step": medians,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
