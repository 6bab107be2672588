"""``agentstate run``: one online prediction experiment."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

from agentstate.experiment import ENV_ALIASES, RunConfig, run_experiment


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``["n_features=7", "init_scale=0.1"]`` -> ``{"n_features": 7, "init_scale": 0.1}``.

    Values are Python literals where they parse as one (numbers, booleans, tuples), else
    strings.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed[key] = text
    return parsed


def add_parser(verbs: Any) -> None:
    """Add ``run`` to the ``agentstate`` sub-commands."""
    run = verbs.add_parser(
        "run",
        help="online prediction experiment: B streams, TD(lambda), MSRE curve",
        description="Run a prediction experiment and write metrics.csv, config.json and "
        "learning_curve.png into --out.",
    )
    run.add_argument("env", help=f"one of {', '.join(ENV_ALIASES)}, or any registered Gymnasium id")
    run.add_argument("--learner", default="columnar", help="registered learner name")
    run.add_argument("--steps", type=int, default=100_000, help="steps per stream")
    run.add_argument("--streams", type=int, default=8, help="streams stepped together")
    run.add_argument(
        "--independent",
        action="store_true",
        help="one network per stream (B independent runs) instead of one shared network",
    )
    run.add_argument("--lr", type=float, default=0.01, help="step size of the learner")
    run.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="step size of the prediction head (default: --lr / number of head features)",
    )
    run.add_argument("--gamma", type=float, default=None, help="discount (default: the env's)")
    run.add_argument("--lambda", dest="lambda_", type=float, default=0.99, help="trace decay")
    run.add_argument("--optimizer", default="rmsprop_td", choices=["sgd", "rmsprop_td", "adam"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--msre-window", type=int, default=10_000)
    run.add_argument("--log-every", type=int, default=1_000)
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    run.add_argument(
        "--learner-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="learner keyword argument, e.g. n_features=7 (repeatable)",
    )
    run.add_argument(
        "--env-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment constructor argument, e.g. preset=rafiee2022 (repeatable)",
    )
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
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one prediction experiment."""
    config = RunConfig(
        env=args.env,
        learner=args.learner,
        steps=args.steps,
        streams=args.streams,
        independent=args.independent,
        seed=args.seed,
        step_size=args.lr,
        head_step_size=args.head_lr,
        gamma=args.gamma,
        lambda_=args.lambda_,
        optimizer=args.optimizer,
        msre_window=args.msre_window,
        log_every=args.log_every,
        learner_kwargs=parse_key_values(args.learner_kwarg, "--learner-kwarg"),
        env_kwargs=parse_key_values(args.env_kwarg, "--env-kwarg"),
        dtype=args.dtype,
    )
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
        f"{result.final_msre_zero.mean():.5g}) over {config.streams} streams, "
        f"{result.steps_per_second:,.0f} steps/s; {resumed}wrote {result.out_dir}/metrics.csv, "
        "config.json, learning_curve.png"
    )
    return 0
