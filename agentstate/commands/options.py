"""Options shared by the experiment verbs (``run``, ``predict-atari``); not a verb itself.

Each option is declared once here, with its default taken from the verb's config dataclass
(``RunConfig`` or ``AtariRunConfig``); the verbs word the help of a few options for their own
setting (steps or frames, an env's discount or a fixed one).
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

from agentstate.atari import AtariRunConfig
from agentstate.experiment import RunConfig

OPTIMIZERS = ["sgd", "rmsprop_td", "adam"]
DTYPES = ["float32", "float64"]


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


def add_experiment_options(
    parser: argparse.ArgumentParser,
    defaults: RunConfig | AtariRunConfig,
    *,
    steps_help: str,
    streams_help: str,
    lr_help: str,
    gamma_help: str,
    msre_window_help: str | None,
    learner_kwarg_help: str,
) -> None:
    """Add the learner, TD and scoring options, read back by :func:`experiment_config_kwargs`.

    Args:
        parser: the verb's parser.
        defaults: the verb's config with its default values.
        steps_help: help of ``--steps``.
        streams_help: help of ``--streams``.
        lr_help: help of ``--lr``.
        gamma_help: help of ``--gamma``.
        msre_window_help: help of ``--msre-window`` (None: no help text).
        learner_kwarg_help: help of ``--learner-kwarg``.
    """
    parser.add_argument("--learner", default=defaults.learner, help="registered learner name")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=steps_help)
    parser.add_argument("--streams", type=int, default=defaults.streams, help=streams_help)
    parser.add_argument("--lr", type=float, default=defaults.step_size, help=lr_help)
    parser.add_argument(
        "--head-lr",
        type=float,
        default=defaults.head_step_size,
        help="step size of the prediction head (default: --lr / number of features built)",
    )
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help=gamma_help)
    parser.add_argument(
        "--lambda", dest="lambda_", type=float, default=defaults.lambda_, help="trace decay"
    )
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--msre-window", type=int, default=defaults.msre_window, help=msre_window_help
    )
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--dtype", default=defaults.dtype, choices=DTYPES)
    parser.add_argument(
        "--learner-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=learner_kwarg_help,
    )


def add_normalization_options(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Add the online normalisation and head options, read back by :func:`normalization_kwargs`.

    They govern every normaliser of a run: the TD engine's and, where its config has the same
    settings (CCN), the learner's own.
    """
    parser.add_argument(
        "--normalize-inputs",
        action=argparse.BooleanOptionalAction,
        default=defaults.normalize_inputs,
        help="normalise the observation online",
    )
    parser.add_argument(
        "--normalize-features",
        action=argparse.BooleanOptionalAction,
        default=defaults.normalize_features,
        help="normalise the agent state online before the heads (and a CCN stage) read it",
    )
    parser.add_argument(
        "--normalization-rate",
        type=float,
        default=defaults.normalization_rate,
        help="EMA decay of the running means and variances (1: no normalisation)",
    )
    parser.add_argument(
        "--variance-floor",
        type=float,
        default=defaults.variance_floor,
        help="lower bound of the running variances",
    )
    parser.add_argument(
        "--head-bias",
        action=argparse.BooleanOptionalAction,
        default=defaults.include_bias,
        help="give the heads a bias feature",
    )


def normalization_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by :func:`add_normalization_options`, from parsed ``args``."""
    return {
        "normalize_inputs": args.normalize_inputs,
        "normalize_features": args.normalize_features,
        "normalization_rate": args.normalization_rate,
        "variance_floor": args.variance_floor,
        "include_bias": args.head_bias,
    }


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` and ``--no-progress``."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def experiment_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by :func:`add_experiment_options`, from parsed ``args``."""
    return {
        "learner": args.learner,
        "steps": args.steps,
        "streams": args.streams,
        "seed": args.seed,
        "step_size": args.lr,
        "head_step_size": args.head_lr,
        "gamma": args.gamma,
        "lambda_": args.lambda_,
        "optimizer": args.optimizer,
        "msre_window": args.msre_window,
        "log_every": args.log_every,
        "learner_kwargs": parse_key_values(args.learner_kwarg, "--learner-kwarg"),
        "dtype": args.dtype,
    }
