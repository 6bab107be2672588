"""``agentstate predict-atari``: TD policy evaluation on the Atari Prediction Benchmark."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.atari import AtariRunConfig
from agentstate.commands.run import parse_key_values

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
    parser.add_argument("--learner", default=DEFAULTS.learner, help="registered learner name")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="frames per stream")
    parser.add_argument(
        "--streams", type=int, default=None, help="streams, a multiple of the number of games"
    )
    parser.add_argument("--lr", type=float, default=DEFAULTS.step_size, help="learner step size")
    parser.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="step size of the prediction head (default: --lr / number of head features)",
    )
    parser.add_argument("--gamma", type=float, default=DEFAULTS.gamma, help="discount")
    parser.add_argument(
        "--lambda", dest="lambda_", type=float, default=DEFAULTS.lambda_, help="trace decay"
    )
    parser.add_argument(
        "--optimizer", default=DEFAULTS.optimizer, choices=["sgd", "rmsprop_td", "adam"]
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument(
        "--msre-window",
        type=int,
        default=DEFAULTS.msre_window,
        help="scored steps in the sliding MSRE (default: the paper's 500k)",
    )
    parser.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution)
    parser.add_argument(
        "--interpolation", default=DEFAULTS.interpolation, choices=["linear", "area"]
    )
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=["float32", "float64"])
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS.torch_threads,
        help="torch intra-op threads (default 1: fastest for these tiny tensors)",
    )
    parser.add_argument(
        "--learner-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="learner keyword argument, e.g. n_features=6 (repeatable)",
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
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one policy-evaluation experiment and print its final MSREs and speeds."""
    from agentstate.atari import run_atari_prediction  # builds envs: needs ale-py

    config = AtariRunConfig(
        games=args.games,
        policies_dir=args.policies,
        learner=args.learner,
        steps=args.steps,
        streams=args.streams,
        seed=args.seed,
        step_size=args.lr,
        head_step_size=args.head_lr,
        gamma=args.gamma,
        lambda_=args.lambda_,
        optimizer=args.optimizer,
        msre_window=args.msre_window,
        log_every=args.log_every,
        resolution=args.resolution,
        interpolation=args.interpolation,
        learner_kwargs=parse_key_values(args.learner_kwarg, "--learner-kwarg"),
        sb3_model=args.sb3_model,
        sb3_algorithm=args.sb3_algorithm,
        dtype=args.dtype,
        torch_threads=args.threads,
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
