"""``agentstate predict-atari``: TD policy evaluation on the Atari Prediction Benchmark.

The same run as ``agentstate run atari-prediction`` (one ``RunConfig``), with the benchmark's
defaults and flags for its settings (``agentstate.atari``).
"""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.atari import ATARI_GAMMA, ATARI_SETTINGS
from agentstate.commands.options import add_config_options, add_output_options, config_from_args
from agentstate.experiment import ATARI_PREDICTION, RunConfig, run_experiment

DEFAULTS = RunConfig(
    env=ATARI_PREDICTION,
    independent=True,
    step_size=1e-4,
    gamma=ATARI_GAMMA,
    msre_window=500_000,
    log_every=10_000,
)
"""The paper's settings for 30M frames: step size 1e-4, gamma 0.98, a 500k-step MSRE window."""


def add_parser(verbs: Any) -> None:
    """Add ``predict-atari`` to the ``agentstate`` sub-commands."""
    parser = verbs.add_parser(
        "predict-atari",
        help="predict the discounted clipped reward of an Atari expert with TD(lambda)",
        description="Replay the benchmark's recorded expert play (or run an SB3 model) in "
        "ale-py, learn to predict its discounted clipped reward online, and write "
        "metrics.csv, config.json, summary.json and learning_curve_<Game>.png into --out. "
        "Stream b plays the b-th game, cycling: --game Pong Breakout --streams 4 runs two "
        "seeds of each.",
    )
    parser.add_argument(
        "--game",
        dest="games",
        action="extend",
        nargs="+",
        required=True,
        metavar="GAME",
        help="benchmark game name(s), e.g. Pong SpaceInvaders (repeatable)",
    )
    parser.add_argument(
        "--policies",
        default=None,
        metavar="DIR",
        help="folder of <Game>NoFrameskip-v4.txt expert action files "
        "(default: $AGENTSTATE_ATARI_POLICIES)",
    )
    add_config_options(
        parser,
        DEFAULTS,
        exclude={"env", "env_kwargs", "independent", "streams"},
        helps={"steps": "frames per stream", "msre_window": "scored steps in the sliding MSRE"},
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="a multiple of the number of games (default: one each)",
    )
    parser.add_argument("--resolution", type=int, default=ATARI_SETTINGS["resolution"])
    parser.add_argument(
        "--interpolation", default=ATARI_SETTINGS["interpolation"], choices=["linear", "area"]
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: fastest for these tiny tensors)",
    )
    parser.add_argument(
        "--sb3-model",
        default=None,
        metavar="ZIP",
        help="live mode: this Stable-Baselines3 model plays ALE/<Game>-v5 (frameskip 1, no "
        "sticky actions, RGB observations) instead of the recorded expert",
    )
    parser.add_argument(
        "--sb3-algorithm", default=ATARI_SETTINGS["sb3_algorithm"], help="SB3 class of --sb3-model"
    )
    add_output_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one policy-evaluation experiment and print its final MSREs and speeds."""
    config = config_from_args(
        args,
        DEFAULTS,
        env=ATARI_PREDICTION,
        independent=True,
        streams=args.streams if args.streams is not None else len(args.games),
        env_kwargs={
            "games": args.games,
            "policies_dir": args.policies,
            "resolution": args.resolution,
            "interpolation": args.interpolation,
            "sb3_model": args.sb3_model,
            "sb3_algorithm": args.sb3_algorithm,
        },
    )
    result = run_experiment(
        config, args.out, progress=not args.no_progress, torch_threads=args.threads
    )
    final = result.final
    for b, game in enumerate(result.stream_labels):
        print(
            f"stream {b} {game}: MSRE {final['msre'][b]:.5g}, predict zero "
            f"{final['msre_zero'][b]:.5g}, running mean reward {final['msre_mean_reward'][b]:.5g}"
        )
    print(
        f"{result.steps_per_second:,.0f} steps/s ({result.env_steps_per_second:,.0f} replay "
        f"frames/s, {result.learner_us_per_step:,.0f} µs per TD step of "
        f"{len(result.stream_labels)} streams); wrote {result.out_dir}/metrics.csv, "
        "config.json, summary.json, learning_curve_*.png"
    )
    return 0
