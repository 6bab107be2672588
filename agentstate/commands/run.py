"""``agentstate run``: one online prediction experiment."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.commands.options import add_config_options, add_output_options, config_from_args
from agentstate.experiment import ENV_ALIASES, RunConfig, run_experiment

DEFAULTS = RunConfig(env="")
"""The option defaults; ``env`` is the positional argument and has none."""


def add_parser(verbs: Any) -> None:
    """Add ``run`` to the ``agentstate`` sub-commands."""
    run = verbs.add_parser(
        "run",
        help="online prediction experiment: B streams, TD(lambda), MSRE curve",
        description="Run a prediction experiment and write metrics.csv, config.json, "
        "summary.json, learning_curve.png and msre_curve.png into --out.",
    )
    run.add_argument(
        "env",
        help=f"one of {', '.join(ENV_ALIASES)}, atari-prediction, any registered Gymnasium id, "
        "or module:id (the module is imported first)",
    )
    add_config_options(run, DEFAULTS, exclude={"env"})
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="write the complete run state to OUT/checkpoint.pt every N steps (trace envs)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if there is one (same settings required); "
        "without one the run starts from step 0",
    )
    add_output_options(run)
    run.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one prediction experiment."""
    config = config_from_args(args, DEFAULTS, env=args.env)
    result = run_experiment(
        config,
        args.out,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    resumed = f"resumed at step {result.first_step:,}; " if result.first_step else ""
    print(
        f"final MSRE {result.final_msre.mean():.5g} (predict zero "
        f"{result.final_msre_zero.mean():.5g}; per stream {result.final_ratio:.3f}x "
        f"predict zero) over {config.streams} streams, "
        f"{result.steps_per_second:,.0f} steps/s; {resumed}wrote {result.out_dir}/metrics.csv, "
        "config.json, summary.json, learning_curve.png, msre_curve.png"
    )
    return 0
