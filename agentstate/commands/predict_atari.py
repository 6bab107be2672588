"""``agentstate predict-atari``: TD policy evaluation on the Atari Prediction Benchmark."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.atari import AtariRunConfig
from agentstate.commands.options import (
    add_experiment_options,
    add_output_options,
    experiment_config_kwargs,
)

DEFAULTS = AtariRunConfig()


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
    add_experiment_options(
        parser,
        DEFAULTS,
        steps_help="frames per stream",
        streams_help="streams, a multiple of the number of games",
        lr_help="learner step size",
        gamma_help="discount",
        msre_window_help="scored steps in the sliding MSRE (default: the paper's 500k)",
        learner_kwarg_help="learner keyword argument, e.g. n_features=6 (repeatable)",
    )
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution)
    parser.add_argument(
        "--interpolation", default=DEFAULTS.interpolation, choices=["linear", "area"]
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS.torch_threads,
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
        "--sb3-algorithm", default=DEFAULTS.sb3_algorithm, help="SB3 class of --sb3-model"
    )
    add_output_options(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one policy-evaluation experiment and print its final MSREs and speeds."""
    from agentstate.atari import run_atari_prediction  # builds envs: needs ale-py

    config = AtariRunConfig(
        games=args.games,
        policies_dir=args.policies,
        resolution=args.resolution,
        interpolation=args.interpolation,
        sb3_model=args.sb3_model,
        sb3_algorithm=args.sb3_algorithm,
        torch_threads=args.threads,
        **experiment_config_kwargs(args),
    )
    result = run_atari_prediction(config, args.out, progress=not args.no_progress)
    for b, game in enumerate(result.stream_games):
        print(
            f"stream {b} {game}: MSRE {result.final_msre['msre'][b]:.5g}, predict zero "
            f"{result.final_msre['msre_zero'][b]:.5g}, running mean reward "
            f"{result.final_msre['msre_mean_reward'][b]:.5g}"
        )
    print(
        f"{result.steps_per_second:,.0f} steps/s ({result.replay_frames_per_second:,.0f} "
        f"replay frames/s, {result.learner_us_per_step:,.0f} µs per TD step of "
        f"{len(result.stream_games)} streams); wrote {result.out_dir}/metrics.csv, "
        "config.json, summary.json, learning_curve_*.png"
    )
    return 0
