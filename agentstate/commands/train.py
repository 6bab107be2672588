"""``agentstate train``: an actor-critic whose recurrent state learns by RTRL, in any env."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.commands.options import add_output_options, parse_key_values
from agentstate.rl.training import TrainConfig, agent_settings, train

DEFAULTS = TrainConfig(env="")


def add_parser(verbs: Any) -> None:
    """Add ``train`` to the ``agentstate`` sub-commands."""
    parser = verbs.add_parser(
        "train",
        help="online actor-critic with an RTRL-trained recurrent state (agentstate.rl)",
        description="Train agentstate.rl.RTRLActorCritic online and write episodes.csv, "
        "learning_curve.csv, learning_curve.png, config.json and model.zip into --out.",
    )
    parser.add_argument(
        "env", help="a Gymnasium id, or module:id (e.g. popgym:popgym-RepeatPreviousEasy-v0)"
    )
    parser.add_argument(
        "--learner",
        default=None,
        help=f"registered learner name (default: {DEFAULTS.learner} with "
        f"{DEFAULTS.learner_kwargs}, the harness's best; a named core gets its own defaults)",
    )
    parser.add_argument(
        "--learner-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="learner keyword argument (overrides the default core's options one by one; "
        "repeatable)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="env steps in all")
    parser.add_argument("--envs", type=int, default=DEFAULTS.envs, help="envs stepped together")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="actor-critic setting (agentstate.rl.ActorCriticConfig field, e.g. "
        "learner_step_size=0.3; repeatable)",
    )
    parser.add_argument("--window", type=int, default=DEFAULTS.window)
    parser.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    add_output_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one training."""
    learner_kwargs = parse_key_values(args.learner_kwarg, "--learner-kwarg")
    config = TrainConfig(
        env=args.env,
        learner=args.learner,
        learner_kwargs=learner_kwargs,
        steps=args.steps,
        envs=args.envs,
        seed=args.seed,
        agent=agent_settings(parse_key_values(args.agent, "--agent")),
        window=args.window,
        log_every=args.log_every,
    )
    summary = train(config, args.out, progress=not args.no_progress)
    print(
        f"{summary['episodes']} episodes; mean return of the last {config.window}: "
        f"{summary['final_return']:.4g}; wrote {args.out}/episodes.csv, learning_curve.csv, "
        "learning_curve.png, config.json, model.zip"
    )
    return 0
